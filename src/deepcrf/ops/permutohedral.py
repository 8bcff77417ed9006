"""Permutohedral lattice for fast high-dimensional Gaussian filtering (Adams, Baek & Davis 2010).

The lattice turns the O(N²) sum

    out_i = Σ_j exp(−½‖f_i − f_j‖²) v_j        (j = i included)

into three sparse linear maps, built once per image and reused for every mean-field iteration
and every label channel:

* **splat** ``S`` (M × N): each point spreads its value onto the d+1 vertices of the simplex
  that encloses its elevated feature, with barycentric weights;
* **blur** ``B_0 … B_d`` (M × M): along each of the d+1 lattice directions every vertex adds
  half of each of its two neighbours (the kernel [½, 1, ½]);
* **slice** ``Sᵀ`` (N × M): each point reads back from the same vertices with the same weights,
  times a global scale.

so that ``filter(v) = scale · Sᵀ B_d ⋯ B_0 S v``.  The transpose applies the blurs in reverse
order (each ``B_j`` is symmetric, their product is not), which is what the backward uses.

Hashing is done without any Python dictionary: the integer lattice coordinates of every
(point, vertex) pair are packed into one int64 code, a single sort yields the unique vertices
*and* the CSR layout of the splat matrix, and blur neighbours are found by ``searchsorted`` on
the sorted unique codes.  The same code runs on CPU and GPU; batches are handled by putting the
batch index into the code so that images never share vertices.

The geometry (elevation, rounding to the nearest remainder-0 point, rank, barycentric weights,
blur weights) follows Krähenbühl's densecrf implementation bit for bit in float32, so with
``pydensecrf_compatible=True`` the filter equals pydensecrf's up to float summation order.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from deepcrf._checks import check_choice, check_tensor
from deepcrf.ops import native, workspace

__all__ = [
    "NATIVE_FEATURE_SCALE",
    "NATIVE_OUTPUT_SCALE",
    "PermutohedralLattice",
    "lattice_filter",
    "pydensecrf_output_scale",
]

# Calibration of the lattice against the brute-force filter exp(−½‖f_i − f_j‖²) (j = i
# included), per feature dimension d.  The lattice with pydensecrf's geometry approximates a
# kernel whose width and height differ from the target; the native mode therefore multiplies
# the features by NATIVE_FEATURE_SCALE[d] and the output by NATIVE_OUTPUT_SCALE[d] (the latter
# replaces densecrf's 1/(1+2^−d)).  Fitted (feature scale by grid search, step 0.01; output
# scale by least squares of the relative error) on: uniform random clouds of 3 000 points
# spanning 2–6 standard deviations for d = 1, 2, 4; for d = 3 and d = 5 on those plus bilateral
# features (x, y, grey or RGB) of 50×50 crops of a photo with θα ∈ {5 … 121}, θβ ∈ {3 … 13},
# the use the library is built for.  docs/densecrf.md lists the measured errors.  Dimensions
# above 5 use the d = 5 entry (the lattice's own error grows quickly with d there).
NATIVE_FEATURE_SCALE: dict[int, float] = {1: 1.06, 2: 1.05, 3: 1.08, 4: 1.04, 5: 1.00}
NATIVE_OUTPUT_SCALE: dict[int, float] = {1: 0.7639, 2: 0.9926, 3: 1.3323, 4: 1.443, 5: 1.8126}


def pydensecrf_output_scale(d: int) -> float:
    """The slice scale densecrf uses: ``1 / (1 + 2^−d)`` (its "magic" alpha), in float32."""
    return float(torch.tensor(1.0 / (1.0 + 2.0 ** (-d)), dtype=torch.float32))


def _native_scales(d: int) -> tuple[float, float]:
    key = min(max(d, 1), max(NATIVE_FEATURE_SCALE))
    return NATIVE_FEATURE_SCALE[key], NATIVE_OUTPUT_SCALE[key]


def _elevation_scales(d: int) -> tuple[list[float], float]:
    """The per-coordinate elevation factors and 1/(d+1) of densecrf, rounded to float32."""
    inv_std_dev = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
    scale = [
        float(torch.tensor(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev, dtype=torch.float32))
        for i in range(d)
    ]
    return scale, float(torch.tensor(1.0 / (d + 1), dtype=torch.float32))


def _elevate(features_t: torch.Tensor) -> torch.Tensor:
    """Project (d, P) features onto the plane Σx = 0 of R^{d+1}, scaled as in densecrf.

    Works on the transposed (coordinate-major) layout so every column operation reads
    contiguous memory.  Float arithmetic mirrors densecrf (float32 scale factors, accumulation
    from the last dimension down) so that rounding decisions match pydensecrf exactly.
    Returns the (d+1, P) elevated coordinates.
    """
    d = features_t.shape[0]
    scale, _ = _elevation_scales(d)
    elevated = features_t.new_empty(d + 1, features_t.shape[1])
    sm = torch.zeros_like(features_t[0])
    for j in range(d, 0, -1):
        cf = features_t[j - 1] * scale[j - 1]
        torch.sub(sm, j * cf, out=elevated[j])
        sm += cf
    elevated[0] = sm
    return elevated


class _Code:
    """Packing of integer lattice keys (batch, remainder, q_0 … q_{d−1}) into one int64.

    A vertex key of the lattice has coordinates ``(d+1)·q_i + r`` with the same remainder r
    for every coordinate, so it is stored as (r, q) — a (d+1)^d smaller range than the raw
    coordinates.  Each q_i is offset by its minimum minus a margin so that the blur
    neighbours (q ± 1) are representable without collisions.
    """

    def __init__(self, v_min: list[int], v_max: list[int], batch: int, d: int) -> None:
        # Vertices have q_i in [v_min − 1, v_max]; neighbours one further on each side.
        self.lo = [int(v) - 2 for v in v_min]
        ranges = [int(h) + 1 - low + 1 for h, low in zip(v_max, self.lo, strict=True)]
        strides = [1] * d
        for i in range(d - 2, -1, -1):
            strides[i] = strides[i + 1] * ranges[i + 1]
        self.block = strides[0] * ranges[0]
        if batch * (d + 1) * self.block >= 2**62:
            raise ValueError(
                "features span too large a range for the lattice's int64 keys "
                f"(d={d}, {ranges} lattice cells per dimension, batch {batch}); "
                "divide the features by larger bandwidths"
            )
        self.strides = strides
        self.d = d


def _csr(
    crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    with warnings.catch_warnings():
        # torch marks CSR tensors as beta and warns on first use; the ops used here
        # (construction and CSR @ dense) are stable since torch 2.0.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, val, size=size, check_invariants=False)


def _check_precision(features: torch.Tensor, feature_scale: float) -> None:
    """Refuse features whose lattice coordinates would lose integer precision.

    The elevated coordinates are about |f|·scale·(d + 1); rounding them to lattice points
    needs them below 2^22 in float32 (2^50 in float64), else the simplex ranks and the keys
    come out wrong (and index out of range) instead of merely inaccurate.
    """
    if features.numel() == 0:
        return
    d = features.shape[-1]
    if features.device.type == "cpu":
        top = float(np.abs(features.detach().numpy()).max())
    else:
        top = float(features.detach().abs().max())
    limit = 2.0**22 if features.dtype == torch.float32 else 2.0**50
    if top * feature_scale * (d + 1) >= limit:
        raise ValueError(
            f"features reach {top:.3g} (after dividing by the bandwidths): too large for the "
            f"lattice's {features.dtype} coordinates; use larger bandwidths (or float64)"
        )


class PermutohedralLattice:
    """A permutohedral lattice built once for a batch of feature sets, filtered many times.

    Implements the splat–blur–slice approximation (Adams et al. 2010, §3–4) of

        out_i = Σ_j exp(−½‖f_i − f_j‖²) v_j     (j = i included, same batch item only)

    as fixed sparse matrices, so one filtering costs O(N·(d+1)·C) time and memory.

    Two calibrations share the same lattice code:

    * ``pydensecrf_compatible=False`` (default): features are multiplied by
      ``NATIVE_FEATURE_SCALE[d]`` and the output by ``NATIVE_OUTPUT_SCALE[d]``, fitted so the
      result approximates the brute-force Gaussian sum above (relative error documented in
      docs/densecrf.md and bounded in tests).
    * ``pydensecrf_compatible=True``: exactly densecrf's lattice (its feature scaling, its
      [½, 1, ½] blur, its final scale 1/(1+2^−d)), and, like its SSE build, phantom points at
      feature 0 that pad N to a multiple of 4.  Use this only to reproduce pydensecrf.

    Lattice filtering is approximate: compare against
    :func:`deepcrf.ops.filters.exact_gaussian_filter` with a relative tolerance.

    Two implementations share the same index arrays, so either can filter a lattice the other
    built: pure PyTorch (any device; the reference) and, for CPU tensors, an optional compiled
    kernel (:mod:`deepcrf.ops.native`: hash-table build, fused multi-threaded filtering),
    used when a C compiler is present.

    Args:
        features: point features, already divided by their bandwidths (so the kernel has unit
            standard deviation in every dimension).  Float32 or float64.
        pydensecrf_compatible: reproduce pydensecrf's lattice instead of the calibrated one.
        backend: ``"auto"`` (the compiled kernel for CPU tensors when available, else
            PyTorch), ``"torch"`` or ``"native"`` (CPU only; raises if the kernel is missing).

    Shape:
        features: (B, N, d)
        filter(values): (B, N, C) -> (B, N, C)

    Example:
        >>> f = torch.rand(1, 100, 3) * 4
        >>> lat = PermutohedralLattice(f)
        >>> lat.filter(torch.ones(1, 100, 2)).shape
        torch.Size([1, 100, 2])
    """

    def __init__(
        self,
        features: torch.Tensor,
        *,
        pydensecrf_compatible: bool = False,
        backend: str = "auto",
    ) -> None:
        check_tensor(
            features,
            "features",
            ndim=3,
            layout="(B, N, d)",
            dtypes=(torch.float32, torch.float64),
            finite=True,
        )
        batch, n, d = features.shape
        self.batch_size = batch
        self.num_points = n
        self.dim = d
        self.device = features.device
        self.dtype = features.dtype
        self.pydensecrf_compatible = pydensecrf_compatible
        if pydensecrf_compatible:
            feature_scale, self.output_scale = 1.0, pydensecrf_output_scale(d)
        else:
            feature_scale, self.output_scale = _native_scales(d)
        _check_precision(features, feature_scale)
        self._native = self._use_native(features, feature_scale, backend)
        with torch.no_grad():
            if self._native:
                self._build_native(features.detach(), feature_scale)
            else:
                self._build(features.detach(), feature_scale)
        self._cache: dict[torch.dtype, tuple[Any, ...]] = {}
        self._arrays: dict[torch.dtype, native.LatticeArrays] = {}
        self._vertex_buffers: dict[torch.dtype, torch.Tensor] = {}

    @property
    def backend(self) -> str:
        """``"native"`` (compiled CPU kernel) or ``"torch"``: the implementation in use."""
        return "native" if self._native else "torch"

    def _use_native(self, features: torch.Tensor, feature_scale: float, backend: str) -> bool:
        check_choice(backend, "backend", ("auto", "torch", "native"))
        if backend == "torch":
            return False
        if features.device.type != "cpu":
            if backend == "native":
                raise ValueError(
                    f"backend='native' is the CPU kernel; features are on {features.device}"
                )
            return False
        if native.library() is None:
            if backend == "native":
                raise RuntimeError(f"backend='native' unavailable: {native.status()}")
            return False
        batch, n, d = features.shape
        # The kernel keeps lattice coordinates in int32 and indices in int32.
        # numpy, not torch: see deepcrf._checks._all_finite
        magnitude = float(np.abs(features.detach().numpy()).max())
        reach = magnitude * feature_scale * 2 * (d + 1) + 2 * (d + 1)
        fits = (n + 3) * (d + 1) * batch < 2**31 - 1 and reach < 2**30 and 1 <= d <= 64
        if not fits:
            if backend == "native":
                raise ValueError(
                    "backend='native' needs int32 lattice keys and indices and 1 <= d <= 64: "
                    f"features of magnitude {reach:.3g}, {batch}×{n} points × {d + 1} or "
                    f"d = {d} is out of range"
                )
            return False
        return True

    # ------------------------------------------------------------------ construction
    def _build(self, features: torch.Tensor, feature_scale: float) -> None:
        batch, n, d = features.shape
        dev = features.device
        dp1 = d + 1
        f = features.reshape(batch * n, d)
        if feature_scale != 1.0:
            f = f * feature_scale
        pad = (-n) % 4 if self.pydensecrf_compatible else 0
        if pad:
            # densecrf's SSE build processes points in blocks of 4 and inserts the zero
            # features of the padding into its hash table: they add (empty) vertices that
            # carry blurred mass, so reproduce them (with zero splat weight, see below).
            f = torch.cat([f.reshape(batch, n, d), f.new_zeros(batch, pad, d)], dim=1)
            f = f.reshape(-1, d)
        npts = f.shape[0]
        batch_idx = torch.arange(batch, device=dev).repeat_interleave(n + pad)

        # Everything per point is kept coordinate-major, (d+1, P): contiguous column ops.
        elevated = _elevate(f.t().contiguous())
        del f
        inv_dp1 = _elevation_scales(d)[1]
        # Nearest remainder-0 lattice point: round half to even as SSE's cvtps does.
        v = torch.round(elevated * inv_dp1)
        diff = elevated - v * dp1
        # rank_i = number of coordinates with a larger diff, ties going to the lower index —
        # the same pairwise comparisons densecrf makes (d(d+1)/2 cheap row operations).
        rank_u8 = torch.zeros(dp1, npts, dtype=torch.uint8, device=dev)
        for i in range(d):
            for j in range(i + 1, dp1):
                less = diff[i] < diff[j]
                rank_u8[i] += less
                rank_u8[j] += ~less
        # Ranks stay in [−d−1, 2d+1] (the elevated point sums to 0): int8 until an int64
        # index is needed, which keeps the build's transient memory small.
        rank = rank_u8.to(torch.int8)
        del rank_u8, diff
        rank += v.sum(dim=0, keepdim=True).to(torch.int8)
        shift = (rank < 0).to(torch.int8) - (rank > d).to(torch.int8)
        rank += dp1 * shift
        v += shift.to(v.dtype)
        del shift
        bw = (elevated - v * dp1) * inv_dp1
        del elevated
        position = torch.sub(d, rank.to(torch.int64))  # slot d − rank_i, reused below
        del rank
        bary = bw.new_zeros(d + 2, npts)
        bary.scatter_add_(0, position, bw)
        position += 1
        bary.scatter_add_(0, position, -bw)
        position -= 1
        del bw
        bary[0] += 1.0 + bary[d + 1]
        bary = bary[:dp1]

        # Vertex r of the simplex has q_i = v_i − [rank_i > d − r] (remainder r).  Its code is
        # base + r·block − Σ_i stride_i·[rank_i ≥ d − r + 1]: a suffix sum, over ranks, of the
        # stride of the coordinate holding each rank (the implicit last coordinate has none).
        v_int = v[:d].to(torch.int64)
        del v
        book = _Code(v_int.amin(1).tolist(), v_int.amax(1).tolist(), batch, d)
        base = batch_idx * (dp1 * book.block)
        for i in range(d):
            base += (v_int[i] - book.lo[i]) * book.strides[i]
        del v_int
        stride_ext = torch.tensor([*book.strides, 0], dtype=torch.int64, device=dev)
        # Scattering to position d − rank lays the strides out by decreasing rank, so a plain
        # cumulative sum is the suffix sum over ranks.
        codes = torch.empty_like(position).scatter_(
            0, position, stride_ext[:, None].expand(dp1, npts)
        )
        del position
        suffix = torch.cumsum(codes, dim=0)
        # codes[r] = base + r·block − suffix[r − 1] (suffix[−1] = 0): shift by one remainder.
        codes[0] = 0
        codes[1:] = suffix[:-1]
        del suffix
        torch.sub(
            base[None, :] + (torch.arange(dp1, device=dev) * book.block)[:, None], codes, out=codes
        )
        del base
        # Memory is dominated by P·(d+1)-sized index arrays: free each as soon as it is used
        # and keep the final ones in int32 when they fit.
        index_dtype = torch.int32 if npts * dp1 < 2**31 - 1 else torch.int64

        # One sort gives the unique vertices, each entry's vertex and the splat's CSR layout.
        if batch * dp1 * book.block < 2**31:
            # Most images' codes fit in 31 bits: the (radix) sort of int32 keys is ~2x faster.
            codes = codes.to(torch.int32)
        sorted_codes, perm = torch.sort(codes.reshape(-1), stable=True)
        del codes
        is_new = torch.empty_like(sorted_codes, dtype=torch.bool)
        is_new[0] = True
        torch.ne(sorted_codes[1:], sorted_codes[:-1], out=is_new[1:])
        vertex_sorted = torch.cumsum(is_new, 0)
        vertex_sorted -= 1
        unique_codes = sorted_codes[is_new].to(torch.int64)
        del sorted_codes, is_new
        m = unique_codes.shape[0]
        # Entries are numbered r·P + p (coordinate-major), so p = entry mod P.
        vertex_of_entry = torch.empty_like(vertex_sorted).scatter_(0, perm, vertex_sorted)
        vertex_of_entry = vertex_of_entry.to(index_dtype).reshape(dp1, npts)
        splat_w = bary.reshape(-1)[perm]
        point_of_sorted = torch.remainder(perm, npts).to(index_dtype)
        del perm
        if pad:
            real = (torch.arange(n + pad, device=dev) < n).repeat(batch)
            keep = real[point_of_sorted]
            vertex_sorted = vertex_sorted[keep]
            splat_w = splat_w[keep]
            point_of_sorted = point_of_sorted[keep]
            point_of_sorted -= torch.div(point_of_sorted, n + pad, rounding_mode="floor") * pad
            vertex_of_entry = vertex_of_entry[:, real]
            bary = bary[:, real]
        # The slice reads, per point, its d+1 vertices: point-major (P, d+1) rows.
        vertex_of_entry = vertex_of_entry.t().contiguous().reshape(-1)
        bary = bary.t().contiguous()
        # Row m of every matrix is an always-zero vertex that missing neighbours point to, so
        # each blur row has exactly three entries and needs no masking (densecrf's slot 0).
        counts = torch.bincount(vertex_sorted, minlength=m + 1)
        del vertex_sorted
        splat_crow = torch.zeros(m + 2, dtype=torch.int64, device=dev)
        torch.cumsum(counts, 0, out=splat_crow[1:])
        splat_crow = splat_crow.to(index_dtype)
        self._splat_csr = (splat_crow, point_of_sorted, splat_w)
        self._slice_idx = (vertex_of_entry, bary.reshape(-1))
        self.num_vertices = m

        # Blur neighbours along direction j: n1 = key − 1 (+ (d+1) at j), n2 = key + 1
        # (− (d+1) at j); in (r, q) form a remainder step with a borrow/carry.  n2 is the
        # inverse of n1, so only n1 is looked up.
        rem = torch.div(unique_codes, book.block, rounding_mode="floor") % dp1
        wrap = dp1 * book.block - sum(book.strides)
        base1 = unique_codes - book.block + (rem == 0).to(torch.int64) * wrap
        rows = torch.arange(m, device=dev)
        blur_crow = torch.arange(0, 3 * m + 1, 3, device=dev)
        blur_crow = torch.cat([blur_crow, blur_crow[-1:]])
        blur = []
        for j in range(dp1):
            target = base1 + book.strides[j] if j < d else base1
            idx = torch.searchsorted(unique_codes, target).clamp_(max=m - 1)
            n1 = torch.where(unique_codes[idx] == target, idx, m)
            n2 = torch.full((m + 1,), m, dtype=torch.int64, device=dev)
            n2.scatter_(0, n1, rows)
            n2[m] = m
            col = torch.stack([rows, n1, n2[:m]], dim=1).reshape(-1)
            blur.append((blur_crow, col))
        self._blur_idx = [(c.to(index_dtype), i.to(index_dtype)) for c, i in blur]
        self._index_dtype = index_dtype
        self.pad = pad

    def _build_native(self, features: torch.Tensor, feature_scale: float) -> None:
        """The same index arrays as :meth:`_build`, from the compiled kernel's hash table."""
        batch, n, d = features.shape
        dp1 = d + 1
        pad = (-n) % 4 if self.pydensecrf_compatible else 0
        f = features.contiguous()
        if pad:  # densecrf's zero padding points (see _build); numpy: single-threaded copy
            f = torch.from_numpy(
                np.concatenate([f.numpy(), np.zeros((batch, pad, d), f.numpy().dtype)], axis=1)
            )
        scale, inv_dp1 = _elevation_scales(d)
        weights = workspace.empty((batch, n * dp1), features.dtype)
        # the slice columns: item-local vertex ids from the build, made global by finish
        slice_col = workspace.empty((batch, n * dp1), torch.int32)
        handles: list[int] = []
        sizes: list[int] = []
        try:
            for b in range(batch):
                handle, m_b = native.build_lattice(
                    f[b], n, scale, feature_scale, inv_dp1, weights[b], slice_col[b]
                )
                handles.append(handle)
                sizes.append(m_b)
            del f
            m_total = sum(sizes)
            blur = workspace.empty((dp1, 3 * m_total), torch.int32)
            offset = 0
            for handle, m_b in zip(handles, sizes, strict=True):
                native.finish_lattice(handle, offset, m_total, blur)
                offset += m_b
        finally:
            for handle in handles:
                native.free_lattice(handle)
        # numpy: single-threaded (see deepcrf._checks._all_finite)
        blur_crow = torch.from_numpy(
            np.append(np.arange(0, 3 * m_total + 1, 3, dtype=np.int32), np.int32(3 * m_total))
        )
        self._splat_csr: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._slice_idx = (slice_col.reshape(-1), weights.reshape(-1))
        self._blur_idx = [(blur_crow, blur[j]) for j in range(dp1)]
        self._blur_cols = blur
        self._index_dtype = torch.int32
        self.num_vertices = m_total
        self.pad = pad

    def native_arrays(self, dtype: torch.dtype) -> native.LatticeArrays:
        """This lattice as the compiled kernel reads it, weights in ``dtype`` (built once).

        Only for a lattice built by the kernel (:attr:`backend` ``"native"``).
        """
        if not self._native:
            raise ValueError("native_arrays needs a lattice built by the compiled kernel")
        arrays = self._arrays.get(dtype)
        if arrays is None:
            arrays = native.LatticeArrays(
                num_vertices=self.num_vertices,
                dp1=self.dim + 1,
                slice_vertices=self._slice_idx[0],
                slice_weights=self._slice_idx[1].to(dtype),
                blur=self._blur_cols,
                output_scale=self.output_scale,
                buffers=self._vertex_buffers,
            )
            self._arrays[dtype] = arrays
        return arrays

    @property
    def _splat_idx(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Splat matrix in CSR form (crow, col, values), rows = vertices (+ the zero row).

        The PyTorch build makes it directly; after the compiled build (which splats
        pixel-major and never needs it) it is derived on first use from the slice entries:
        the same rows, points in increasing order within each row.
        """
        if self._splat_csr is None:
            vcol, vval = self._slice_idx
            dp1 = self.dim + 1
            order = torch.sort(vcol, stable=True)[1]
            counts = torch.bincount(vcol.to(torch.int64), minlength=self.num_vertices + 1)
            crow = torch.zeros(self.num_vertices + 2, dtype=torch.int64, device=vcol.device)
            torch.cumsum(counts, 0, out=crow[1:])
            self._splat_csr = (
                crow.to(self._index_dtype),
                torch.div(order, dp1, rounding_mode="floor").to(self._index_dtype),
                vval[order],
            )
        return self._splat_csr

    # ------------------------------------------------------------------ matrices
    def _matrices(self, dtype: torch.dtype) -> tuple[Any, ...]:
        cached = self._cache.get(dtype)
        if cached is not None:
            return cached
        n_all = self.batch_size * self.num_points
        m1 = self.num_vertices + 1
        dp1 = self.dim + 1
        crow, col, val = self._splat_idx
        splat = _csr(crow, col, val.to(dtype), (m1, n_all))
        vcol, vval = self._slice_idx
        slice_crow = torch.arange(
            0, n_all * dp1 + 1, dp1, device=self.device, dtype=self._index_dtype
        )
        slice_ = _csr(slice_crow, vcol, (vval * self.output_scale).to(dtype), (n_all, m1))
        weights = torch.tensor([1.0, 0.5, 0.5], dtype=dtype, device=self.device)
        weights = weights.repeat(self.num_vertices)
        blur = [_csr(c, i, weights, (m1, m1)) for c, i in self._blur_idx]
        out = (splat, blur, slice_)
        self._cache[dtype] = out
        return out

    def apply(self, values: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """Filter (B·N, C) values without autograd (:meth:`filter` is the differentiable one).

        The compiled kernel for float32/float64 when it built this lattice, else PyTorch's
        sparse products; the result has the dtype of ``values``.
        """
        if self._native and values.dtype in (torch.float32, torch.float64):
            term = native.Term(self.native_arrays(values.dtype))
            return native.filter_terms([term], values.contiguous(), None, None, transpose=transpose)
        splat, blur, slice_ = self._matrices(values.dtype)
        x = splat @ values
        for b in reversed(blur) if transpose else blur:
            x = b @ x
        return slice_ @ x

    # ------------------------------------------------------------------ public
    def filter(self, values: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """Gaussian-filter ``values`` through the lattice (differentiable w.r.t. ``values``).

        Args:
            values: per-point values to filter; float dtype (converted to the lattice's
                arithmetic dtype per call, the result has the dtype of ``values``).
            transpose: apply the transposed filter (blur directions in reverse order).

        Shape:
            values: (B, N, C)
            return: (B, N, C)
        """
        return lattice_filter(values, self, transpose=transpose)

    def __repr__(self) -> str:
        return (
            f"PermutohedralLattice(batch={self.batch_size}, points={self.num_points}, "
            f"dim={self.dim}, vertices={self.num_vertices}, "
            f"pydensecrf_compatible={self.pydensecrf_compatible})"
        )


class _LatticeFilter(torch.autograd.Function):
    """values (B·N, C) -> lattice-filtered values; backward is the transposed filter."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, values: torch.Tensor, lattice: PermutohedralLattice, transpose: bool
    ) -> torch.Tensor:
        ctx.lattice = lattice
        ctx.transpose = transpose
        return lattice.apply(values, transpose)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        # The filter is linear, so its vector-Jacobian product is the transposed filter; going
        # through apply() again keeps double backward available.
        grad = _LatticeFilter.apply(grad_out.contiguous(), ctx.lattice, not ctx.transpose)
        return grad, None, None


def lattice_filter(
    values: torch.Tensor, lattice: PermutohedralLattice, *, transpose: bool = False
) -> torch.Tensor:
    """Filter ``values`` with a prebuilt :class:`PermutohedralLattice` (differentiable).

    Approximates ``out_i = Σ_j exp(−½‖f_i − f_j‖²) v_j`` (Adams et al. 2010), j = i included,
    within each batch item.  The backward pass is the transposed lattice filter.

    Args:
        values: values to filter, float32 or float64, on the lattice's device.
        lattice: the lattice built from the features of the same points.
        transpose: apply the transposed filter instead.

    Shape:
        values: (B, N, C)
        return: (B, N, C)
    """
    if not isinstance(lattice, PermutohedralLattice):
        raise TypeError(f"lattice must be a PermutohedralLattice; got {type(lattice).__name__}")
    check_tensor(
        values, "values", ndim=3, layout="(B, N, C)", dtypes=(torch.float32, torch.float64)
    )
    expected = (lattice.batch_size, lattice.num_points)
    if tuple(values.shape[:2]) != expected:
        raise ValueError(
            f"values must be (B, N, C) = ({expected[0]}, {expected[1]}, C) matching the "
            f"lattice's features; got {tuple(values.shape)}"
        )
    if values.device != lattice.device:
        raise ValueError(
            f"values must be on the lattice's device {lattice.device}; got {values.device}"
        )
    batch, n, c = values.shape
    flat = values.reshape(batch * n, c).contiguous()
    out = _LatticeFilter.apply(flat, lattice, bool(transpose))
    return out.reshape(batch, n, c)
