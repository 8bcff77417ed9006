"""The mean-field engine of the fully connected CRF: every dense-CRF entry point runs this.

One iteration of Krähenbühl & Koltun (2011, eq. 4), written in "gain" form over pairwise
terms m, each a Gaussian kernel K_m (eq. 3) with per-point normalisation factors and a label
map A_m:

    Q_0 = softmax(base),     z_{t+1} = base + Σ_m (post_m ⊙ K_m(pre_m ⊙ Q_t)) ∘ A_m,
    Q_{t+1} = softmax(z_{t+1}),   result: log Q_T                                       (1)

``base`` is −U (logits), ``x ∘ A`` is ``x · A`` for a scalar or (L,) vector A and ``x @ A`` for
an (L, L) matrix.  A Potts term with weight w is A = w (pydensecrf's −w·K̄Q message); a label
compatibility μ (a penalty) with kernel weight matrix W is A = −Wᵀ μᵀ.

Two modes, same semantics:

* **inference** (no autograd needed): no graph, buffers reused.  When every term is on the
  compiled lattice kernel with a scalar A (after the exact reduction of Potts-like matrices,
  see :func:`_reduce_coef`), float32 and L ≤ 48, the whole loop is one fused kernel call (one
  pass over the points per iteration); otherwise the iterations run term by term.
* **training**: :class:`_MeanField`, a ``torch.autograd.Function`` over all iterations.  Its
  forward is the same loop (the fused kernel too, keeping Q_0 … Q_{T−1}); its backward is the
  adjoint recursion of (1): per iteration one forward and one transposed filtering per term,
  plus, for learnable bandwidths, the feature moments K(f_d v) and Kᵀ(f_d g) of the Gaussian
  model's derivative ∂k_ij/∂f_i = k_ij (f_j − f_i) (Schwing & Urtasun 2015) — all through the
  same kernel.  Gradients reach ``base``, every A_m, the normalisation factors and the
  features (hence bandwidths).

Filters are :class:`KernelOp` s: the permutohedral lattice (compiled CPU kernel or pure
PyTorch; CUDA runs the PyTorch lattice) or the exact O(N²) sum, the reference every fast path
is tested against.  Points of a batch are stacked: arrays are (P, L) with P = B·N, and the
lattice keeps the images apart.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from deepcrf._checks import check_int

from . import native, workspace
from .filters import METHODS, Method, exact_gaussian_filter
from .permutohedral import PermutohedralLattice

__all__ = [
    "KernelOp",
    "PairwiseTerm",
    "build_term",
    "estimate_peak_bytes",
    "mean_field",
    "row_sum_error",
    "step",
    "sweep",
]

Normalization = Literal["symmetric", "none", "before", "after"]
NORMALIZATIONS = ("symmetric", "none", "before", "after")
# Kernel row sums below this are treated as this value: keeps 1/n finite for a point that has
# no neighbour at all (possible only with exclude_self=True).
_NORM_EPS = 1e-10
# The fused kernel's label rows are padded to multiples of 8, up to 48.
_FUSED_MAX_LABELS = 48


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------


class KernelOp:
    """One Gaussian kernel K on P = B·N points as a fixed linear map, without autograd.

    ``apply(v, transpose, pre, post)`` is ``post ⊙ K(pre ⊙ v)`` (or with Kᵀ) for (P, C) values
    and (P, 1) factors.  ``exclude_self`` makes K the sum over j ≠ i (K − I).

    Args:
        features: (B, N, d) point features divided by their bandwidths (detached here).
        method: ``"lattice"`` (permutohedral, O(N)) or ``"exact"`` (brute force, O(N²)).
        exclude_self: drop the j = i term.
        pydensecrf_compatible: pydensecrf's lattice geometry and scale (compat layer).
        backend: the lattice's implementation, ``"auto"``, ``"torch"`` or ``"native"`` (see
            :class:`~deepcrf.ops.permutohedral.PermutohedralLattice`).
    """

    def __init__(
        self,
        features: torch.Tensor,
        *,
        method: Method = "lattice",
        exclude_self: bool = False,
        pydensecrf_compatible: bool = False,
        backend: str = "auto",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be 'lattice' or 'exact'; got {method!r}")
        self.method = method
        self.exclude_self = bool(exclude_self)
        self.features = features.detach()
        self.batch, self.points, self.dim = features.shape
        self.lattice: PermutohedralLattice | None = None
        self._work: torch.Tensor | None = None  # the last moment pass's vertex buffers
        if method == "lattice":
            self.lattice = PermutohedralLattice(
                self.features, pydensecrf_compatible=pydensecrf_compatible, backend=backend
            )

    @property
    def native(self) -> bool:
        """Whether the compiled CPU kernel filters this kernel."""
        return self.lattice is not None and self.lattice.backend == "native"

    def apply(
        self,
        values: torch.Tensor,
        transpose: bool = False,
        pre: torch.Tensor | None = None,
        post: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        gram: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``post ⊙ K(pre ⊙ values)`` (Kᵀ with ``transpose``); (P, C) in, (P, C) out.

        ``out`` (not ``values``) receives the result when given (the backward reuses arrays:
        fresh ones above glibc's mmap threshold cost a page fault per 4 KB). With
        ``gram = (left (P, C), acc (C, C) float64)``, ``acc += leftᵀ · result`` (in the
        compiled kernel's slice pass for float32).
        """
        if self.native and values.dtype in (torch.float32, torch.float64):
            assert self.lattice is not None
            fused = None if self.exclude_self else gram
            res = native.filter_terms(
                [native.Term(self.lattice.native_arrays(values.dtype), _flat(pre, values.dtype),
                             _flat(post, values.dtype))],
                values.contiguous(), None, out, transpose=transpose, gram=fused,
            )  # fmt: skip
            if self.exclude_self:  # post ⊙ (K − I)(pre ⊙ v)
                x = values if pre is None else pre * values
                res.sub_(x if post is None else post * x)
        else:
            res = self._apply_torch(values, transpose, pre, post)
            res = res if out is None else out.copy_(res)
            fused = None
        if gram is not None and fused is None:
            gram[1].add_((gram[0].transpose(0, 1) @ res).double())
        return res

    def _apply_torch(
        self,
        values: torch.Tensor,
        transpose: bool,
        pre: torch.Tensor | None,
        post: torch.Tensor | None,
    ) -> torch.Tensor:
        x = values if pre is None else pre * values
        if self.lattice is not None:
            y = self.lattice.apply(x.contiguous(), transpose)
        else:
            # the exact kernel is symmetric: K = Kᵀ
            c = x.shape[-1]
            y = exact_gaussian_filter(
                x.reshape(self.batch, self.points, c), self.features.to(x.dtype)
            ).reshape(-1, c)
        if self.exclude_self:
            y = y - x
        return y if post is None else post * y

    def moments(
        self,
        values: torch.Tensor,
        feats: torch.Tensor,
        contract: torch.Tensor,
        transpose: bool = False,
        plain: bool | torch.Tensor = False,
        work: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Contracted feature moments of the filter, for the Gaussian model's backward.

        Returns ``(K v if plain else None, s)`` (``plain`` may be the (P, C) array to write K v
        into; ``work`` a float32 buffer for the kernel's vertex rows, grown as needed) with
        s (P, D+1): s[:, 0] = Σ_l r ⊙ K(v) and
        s[:, d] = Σ_l r ⊙ K(f_d ⊙ v) (Kᵀ with ``transpose``), r = ``contract``.  The compiled
        kernel never stores the D + 1 stacked blocks; elsewhere they are filtered in groups.

        Shape:
            values, contract: (P, C); feats: (P, D); return: (P, C) or None, (P, D + 1)
        """
        if self.native and values.dtype == torch.float32:
            lat = self.lattice
            assert lat is not None
            p, c = values.shape
            nd = feats.shape[1]
            s = workspace.empty((p, nd + 1), values.dtype)
            out = plain if isinstance(plain, torch.Tensor) else None
            if plain is True:
                out = workspace.empty(values.shape, values.dtype)
            vals, fts, con = (x.contiguous() for x in (values, feats.to(values.dtype), contract))
            arrays = lat.native_arrays(values.dtype)
            # splat parts + one more blur buffer of (M + 1) rows of (D + 1)·⌈C/8⌉ 8-float
            # vectors, reused by the next call (every iteration of a backward makes two)
            floats = native.moments_work_floats(arrays, p, c, nd)
            work = self._work if work is None else work
            if work is None or work.numel() < floats:
                work = workspace.empty((floats,), torch.float32)
            self._work = work
            native.moments(
                native.Term(arrays), vals, fts, con, out, s, work,
                transpose=transpose, exclude_self=self.exclude_self,
            )  # fmt: skip
            return out, s
        blocks = [values, *[feats[:, d : d + 1] * values for d in range(feats.shape[1])]]
        ys = _filter_blocks(self, blocks, transpose)
        s = torch.stack([(contract * y).sum(dim=-1) for y in ys], dim=1)
        if isinstance(plain, torch.Tensor):
            return plain.copy_(ys[0]), s
        return (ys[0] if plain else None), s

    def row_sums(self, dtype: torch.dtype) -> torch.Tensor:
        """K·1 per point, (P, 1), no autograd."""
        ones = torch.ones(self.batch * self.points, 1, dtype=dtype, device=self.features.device)
        return self.apply(ones)


def _row_sums_differentiable(op: KernelOp, features: torch.Tensor) -> torch.Tensor:
    """K·1 per point, (P, 1), differentiable w.r.t. ``features`` (the Gaussian model)."""
    from .gaussian import gaussian_filter

    ones = features.new_ones(op.batch, op.points, 1)
    method = "exact" if op.lattice is None else "lattice"
    out = gaussian_filter(
        ones, features, method=method, lattice=op.lattice, exclude_self=op.exclude_self
    )
    return out.reshape(-1, 1)


def row_sum_error(op: KernelOp, *, samples: int = 256, seed: int = 0) -> float:
    """Relative error of the lattice's row sums K·1 against the exact ones, sampled.

    Draws ``samples`` points per image (a fixed generator: the same points every call),
    computes their exact row sums Σ_j exp(−½‖f_i − f_j‖²) over all N points (O(samples·N·d))
    and returns the mean of |lattice − exact| / exact.  The permutohedral lattice under-weights
    narrow Gaussians (features sparse on the lattice's unit cell): this says by how much.
    Returns 0.0 for the exact filter.

    Shape:
        op.features: (B, N, d)
    """
    if op.lattice is None:
        return 0.0
    feats = op.features
    gen = torch.Generator(device="cpu").manual_seed(seed)
    k = min(samples, op.points)
    idx = torch.randperm(op.points, generator=gen)[:k].to(feats.device)
    approx = op.row_sums(feats.dtype).reshape(op.batch, op.points)[:, idx]
    errs = []
    for b in range(op.batch):
        f = feats[b].double()
        exact = torch.zeros(k, dtype=torch.float64, device=feats.device)
        for start in range(0, op.points, 2048):
            diff = f[idx][:, None, :] - f[None, start : start + 2048, :]
            exact += torch.exp(-0.5 * diff.square().sum(-1)).sum(-1)
        if op.exclude_self:
            exact -= 1.0
        exact = exact.clamp_min(_NORM_EPS)
        errs.append(((approx[b].double() - exact).abs() / exact).mean())
    return float(torch.stack(errs).mean())


# ------------------------------------------------------------------------------------------
# terms
# ------------------------------------------------------------------------------------------


@dataclass
class PairwiseTerm:
    """One term of (1): the kernel, its per-point factors and its label map A.

    ``pre``/``post`` are (P, 1) or None (no factor); ``coef`` is a 0-d, (L,) or (L, L) tensor.
    ``features`` is the (B, N, d) tensor the kernel was built from when its gradient is wanted
    (learnable bandwidths), else None.
    """

    op: KernelOp
    pre: torch.Tensor | None
    post: torch.Tensor | None
    coef: torch.Tensor
    features: torch.Tensor | None = None


def normalization_factors(
    row_sums: torch.Tensor, mode: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Pydensecrf's normalisations as (pre, post) factors of k̄ q = post ⊙ K(pre ⊙ q).

    With row sums n: ``symmetric`` n^−½ K n^−½, ``before`` K n⁻¹, ``after`` n⁻¹ K, ``none`` K
    (pydensecrf computes a mean row sum for NO_NORMALIZATION but never applies it).
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got {mode!r}")
    if mode == "none":
        return None, None
    n = row_sums.clamp_min(_NORM_EPS)
    if mode == "symmetric":
        s = n.rsqrt()
        return s, s
    inv = n.reciprocal()
    return (inv, None) if mode == "before" else (None, inv)


def build_term(
    features: torch.Tensor,
    coef: torch.Tensor,
    *,
    normalization: Normalization = "symmetric",
    exclude_self: bool = False,
    method: Method = "lattice",
) -> PairwiseTerm:
    """A pairwise term of (1) from features (B, N, d), already divided by the bandwidths.

    The kernel (lattice) is built once from the detached features; when ``features`` requires
    grad, the normalisation is differentiable w.r.t. them and the term carries them so that
    :func:`mean_field` returns their gradient.

    Args:
        features: point features / bandwidths, (B, N, d), float32 or float64.
        coef: the label map A: 0-d, (L,) or (L, L), in ``z += K̄Q ∘ A`` (see module docs).
        normalization: ``"symmetric"``, ``"before"``, ``"after"`` or ``"none"``.
        exclude_self: drop the j = i term.
        method: ``"lattice"`` or ``"exact"``.
    """
    op = KernelOp(features, method=method, exclude_self=exclude_self)
    learn = features.requires_grad and torch.is_grad_enabled()
    if normalization == "none":
        pre = post = None
    else:
        sums = _row_sums_differentiable(op, features) if learn else op.row_sums(features.dtype)
        pre, post = normalization_factors(sums, normalization)
    return PairwiseTerm(op, pre, post, coef, features if learn else None)


# ------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------


def _reduce_coef(coef: torch.Tensor) -> torch.Tensor:
    """An equivalent scalar or vector A for inference when the matrix form has no effect.

    ``x @ A`` with A = diag(a) + c 𝟙ᵀ (every off-diagonal entry of row l′ equal to c_l′) is
    ``x ⊙ a`` plus Σ_l′ x_l′ c_l′, the same for every label: it cancels in the softmax, so
    ``a = diag(A) − c`` gives the same Q exactly.  A constant vector becomes a scalar.
    """
    if coef.dim() == 2:
        n = coef.shape[0]
        if n < 2:
            return coef.reshape(())
        off = coef.masked_fill(torch.eye(n, dtype=torch.bool, device=coef.device), float("nan"))
        row = off.nanmean(dim=1)
        if not bool(torch.all((off - row[:, None]).abs().nan_to_num(0.0) == 0)):
            return coef
        coef = torch.diagonal(coef) - row
    if coef.dim() == 1 and bool(torch.all(coef == coef[0])):
        return coef[0]
    return coef


def _diagonal_part(coef: torch.Tensor) -> float | None:
    """α when the (L, L) matrix is αI + β𝟙𝟙ᵀ (Potts-like), else None.

    In the backward, x ∘ Aᵀ then differs from α·x by β Σ_l x_l, the same for every label,
    which the softmax's backward removes: ∂L/∂z is the same with α·x.
    """
    n = coef.shape[0]
    diag = torch.diagonal(coef)
    off = coef[~torch.eye(n, dtype=torch.bool, device=coef.device)]
    if n < 2 or not (bool((diag == diag[0]).all()) and bool((off == off[0]).all())):
        return None
    return float(diag[0] - off[0])


def _add_message(z: torch.Tensor, msg: torch.Tensor, coef: torch.Tensor) -> None:
    """Z += msg ∘ A in place."""
    if coef.dim() == 2:
        z.addmm_(msg, coef)
    elif coef.dim() == 1:
        z.addcmul_(msg, coef)
    else:
        z.add_(msg * coef)


def _fusable(base: torch.Tensor, terms: Sequence[PairwiseTerm], coefs: list[torch.Tensor]) -> bool:
    return (
        base.dtype == torch.float32
        and base.device.type == "cpu"
        and base.shape[1] <= _FUSED_MAX_LABELS
        and len(terms) <= 16
        and all(t.op.native and not t.op.exclude_self for t in terms)
        and all(c.dim() == 0 for c in coefs)
    )


def _fused(
    base: torch.Tensor,
    terms: Sequence[PairwiseTerm],
    coefs: list[float],
    iters: int,
    keep: Sequence[int],
    log: bool = True,
    lanes: torch.Tensor | None = None,
    group: int = 0,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The fused kernel: log Q_iters (P, L) (Q_iters if not ``log``) and the Q_t in ``keep``.

    ``lanes`` (M, L) float32 multiplies term m's coefficient per label; ``group`` > 0 splits
    the L labels into blocks of ``group``, each normalised on its own (see :func:`sweep`).
    """
    kernel_terms = [_kernel_term(t, coef, base.dtype) for t, coef in zip(terms, coefs, strict=True)]
    out = workspace.empty(base.shape, base.dtype)
    kept = {t: workspace.empty(base.shape, base.dtype) for t in keep}
    # iterations not kept are written to `out`, which only the last pass writes for real
    history = [kept.get(t, out) for t in range(iters)] if kept else None
    native.meanfield(
        kernel_terms, base, out, history, iters=iters, log=log, lanes=lanes, group=group
    )
    return out, kept


def _kernel_term(term: PairwiseTerm, coef: float, dtype: torch.dtype) -> native.Term:
    """A term on the compiled kernel: its lattice's arrays, per-point factors, coefficient."""
    lattice = term.op.lattice
    assert lattice is not None
    return native.Term(
        lattice.native_arrays(dtype), _flat(term.pre, dtype), _flat(term.post, dtype), coef
    )


def step(
    base: torch.Tensor,
    q: torch.Tensor,
    terms: Sequence[PairwiseTerm],
    coefs: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """One update of (1) before its softmax: z = base + Σ_m K̄_m(q) ∘ A_m, without autograd.

    Scalar terms on the compiled kernel are summed in one pass; ``coefs`` overrides the terms'
    label maps (the loop passes reduced ones).

    Shape:
        base, q, return: (P, L)
    """
    if coefs is None:
        coefs = [t.coef.detach().to(q.dtype) for t in terms]
    fused = [
        i
        for i, (t, c) in enumerate(zip(terms, coefs, strict=True))
        if c.dim() == 0
        and t.op.native
        and not t.op.exclude_self
        and q.dtype in (torch.float32, torch.float64)
    ]
    if fused:
        z = native.filter_terms(
            [_kernel_term(terms[i], float(coefs[i]), q.dtype) for i in fused], q, base, None
        )
    else:
        z = base.clone()
    for i, (t, c) in enumerate(zip(terms, coefs, strict=True)):
        if i not in fused:
            _add_message(z, t.op.apply(q, False, _det(t.pre), _det(t.post)), c.to(q.dtype))
    return z


def _flat(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.detach().to(dtype).reshape(-1).contiguous()


def _det(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach()


def _forward_loop(
    base: torch.Tensor,
    terms: Sequence[PairwiseTerm],
    coefs: list[torch.Tensor],
    iters: int,
    keep: Sequence[int] = (),
    *,
    log: bool = True,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Log Q_iters (Q_iters if not ``log``) of (1) without autograd, and the Q_t in ``keep``."""
    if iters == 0:
        return (base.log_softmax(dim=-1) if log else base.softmax(dim=-1)), {}
    if _fusable(base, terms, coefs):
        return _fused(base, terms, [float(c) for c in coefs], iters, keep, log)
    wanted = set(keep)
    kept: dict[int, torch.Tensor] = {}
    q = base.softmax(dim=-1)
    z = base
    for t in range(iters):
        if t in wanted:
            kept[t] = q
        z = step(base, q, terms, coefs)
        q = z.softmax(dim=-1)
    return (z.log_softmax(dim=-1) if log else q), kept


def estimate_peak_bytes(
    points: int,
    labels: int,
    dims: Sequence[int],
    iters: int,
    *,
    training: bool = False,
    itemsize: int = 4,
) -> int:
    """Rough extra peak memory of one engine call on CPU, bytes (inputs not counted).

    A model fitted to measured peaks (2-core VM, torch 2.13; within ~10 % from 0.2 to 3
    million points, 2 and 21 labels, inference and training): each lattice keeps about 40
    bytes per point and lattice dimension (its d + 1 entries, vertices and blur buffers); the
    loop's per-label rows about 8 float32 copies, and training also keeps Q of every
    iteration and the backward's arrays, about 2 more per iteration.

    Args:
        points: P = B·N.
        labels: L.
        dims: each term's feature dimension d (e.g. (5, 2) for an RGB image's two kernels).
        iters: mean-field iterations.
        training: autograd on (the backward's memory included).
        itemsize: bytes per element of the computation dtype (4 float32, 8 float64).
    """
    lattice = 40 * sum(d + 1 for d in dims)
    per_label = (8 + (2 * iters if training else 0)) * itemsize
    return int(points * (lattice + labels * per_label))


def mean_field(
    base: torch.Tensor,
    terms: Sequence[PairwiseTerm],
    iters: int,
    *,
    checkpoint: bool = False,
    probabilities: bool = False,
) -> torch.Tensor:
    """Run (1) for ``iters`` iterations; returns log Q_iters (Q_iters with ``probabilities``).

    Differentiable (the training mode) when grad is enabled and ``base``, a term's ``coef``,
    ``pre``/``post`` or ``features`` requires grad; otherwise the inference mode.

    Args:
        base: −U, the unary logits, on the points of the terms.
        terms: the pairwise terms, from :func:`build_term` (or made by hand).
        iters: number of iterations (0 returns log_softmax(base)).
        checkpoint: keep only every ⌈√iters⌉-th Q for the backward and recompute the others
            (memory ≈ 2√iters instead of iters (P, L) arrays, about one more forward).
        probabilities: return Q instead of log Q (the fused kernel writes it directly).

    Shape:
        base:   (P, L)  with P = B·N points, labels the fast axis
        return: (P, L)
    """
    iters = check_int(iters, "iters", minimum=0)
    _check_terms(base, terms)
    tensors: list[torch.Tensor | None] = [base]
    for t in terms:
        tensors += [t.coef, t.pre, t.post, t.features]
    track = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)
    if not track:
        with torch.no_grad():
            coefs = [_reduce_coef(t.coef.detach().to(base.dtype)) for t in terms]
            base = base.detach().contiguous()
            return _forward_loop(base, terms, coefs, iters, log=not probabilities)[0]
    out = _MeanField.apply(base, tuple(terms), iters, bool(checkpoint), *tensors[1:])
    return out.exp() if probabilities else out


# Runs of a sweep side by side in one fused call only when at least this many fit (L ≤ 12):
# measured one sweep of 6 weights against 6 calls at 96×96 / 375×500, 10 iterations: L = 4
# 0.43 / 0.56 of the time, 8 0.72 / 1.08, 12 0.95 / 0.72, 16 1.21 / 0.94, 21 1.29 / 1.00.
_SWEEP_MIN_RUNS = 4


def sweep(
    base: torch.Tensor,
    terms: Sequence[PairwiseTerm],
    weights: torch.Tensor,
    iters: int,
    *,
    probabilities: bool = False,
) -> torch.Tensor:
    """G runs of (1) that share the terms' kernels and differ only in their scalar weights.

    Run g is :func:`mean_field` with A_m = ``weights[g, m]`` for term m (the terms' own
    ``coef`` is not used): a grid search over Potts weights at fixed bandwidths (DeepLab's
    w_bilateral, w_spatial; ``tune-crf``).  Inference mode, no autograd.  The runs go side
    by side as label blocks of one loop, each block its own softmax, so that every lattice
    pass serves several runs: on the compiled kernel up to 48 labels per fused call when L ≤
    12 (at least four runs per call; with fewer, wider runs the grouped rows cost as much as
    separate calls or more: benchmarks/bench_tune.py), else one run per call; elsewhere
    PyTorch over all blocks at once.  The result equals G separate :func:`mean_field` calls
    (tested).

    Shape:
        base:    (P, L)     −U, P = B·N points
        weights: (G, M)     M = len(terms)
        return:  (G, P, L)  log Q_iters (Q_iters with ``probabilities``)
    """
    iters = check_int(iters, "iters", minimum=0)
    _check_terms(base, terms)
    if not isinstance(weights, torch.Tensor) or weights.dim() != 2:
        raise ValueError(
            f"weights must be a (G, M) tensor with M = {len(terms)} terms; got "
            + (
                str(tuple(weights.shape))
                if isinstance(weights, torch.Tensor)
                else type(weights).__name__
            )
        )
    if weights.shape[1] != len(terms) or weights.shape[0] < 1:
        raise ValueError(
            f"weights must be (G, M) with G >= 1 and M = {len(terms)} terms; got "
            f"{tuple(weights.shape)}"
        )
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("weights must be finite")
    with torch.no_grad():
        base = base.detach().contiguous()
        w = weights.detach().to("cpu", torch.float64)
        p, num = base.shape
        # as many runs per kernel call as fit, when that is at least _SWEEP_MIN_RUNS
        per_call = _FUSED_MAX_LABELS // num
        per_call = per_call if per_call >= _SWEEP_MIN_RUNS else 1
        out = []
        for g0 in range(0, w.shape[0], per_call):
            wg = w[g0 : g0 + per_call]
            if wg.shape[0] == 1:
                coefs = [wg[0, m].to(base.device, base.dtype) for m in range(len(terms))]
                q = _forward_loop(base, terms, coefs, iters, log=not probabilities)[0]
                out.append(q[None])
                continue
            q = _blocks_loop(base.repeat(1, wg.shape[0]), terms, wg, num, iters, probabilities)
            out.append(q.reshape(p, wg.shape[0], num).permute(1, 0, 2))
        return torch.cat(out)


def _blocks_loop(
    base: torch.Tensor,
    terms: Sequence[PairwiseTerm],
    weights: torch.Tensor,
    num: int,
    iters: int,
    probabilities: bool,
) -> torch.Tensor:
    """(1) for G label blocks of ``num`` side by side: (P, G·L) in and out, weights (G, M)."""
    lanes = weights.t().repeat_interleave(num, dim=1)  # (M, G·L): term m's weight per label
    ones = [torch.ones((), dtype=base.dtype) for _ in terms]
    if iters > 0 and _fusable(base, terms, ones):
        q, _ = _fused(
            base,
            terms,
            [1.0] * len(terms),
            iters,
            (),
            not probabilities,
            lanes.to(torch.float32).contiguous(),
            group=num,
        )
        return q
    lanes = lanes.to(base.device, base.dtype)
    p = base.shape[0]

    def softmax(z: torch.Tensor, log: bool) -> torch.Tensor:
        z = z.reshape(p, -1, num)
        return (z.log_softmax(dim=-1) if log else z.softmax(dim=-1)).reshape(p, -1)

    q, z = softmax(base, False), base
    for _ in range(iters):
        z = base.clone()
        for m, t in enumerate(terms):
            _add_message(z, t.op.apply(q, False, _det(t.pre), _det(t.post)), lanes[m])
        q = softmax(z, False)
    return q if probabilities else softmax(z, True)


def _check_terms(base: torch.Tensor, terms: Sequence[PairwiseTerm]) -> None:
    """Shapes that must agree between ``base`` (P, L) and every term, named when they do not."""
    if not isinstance(base, torch.Tensor) or base.dim() != 2 or not base.is_floating_point():
        raise ValueError(
            "base must be a floating (P, L) tensor (points × labels); got "
            + (
                f"shape {tuple(base.shape)}, {base.dtype}"
                if isinstance(base, torch.Tensor)
                else type(base).__name__
            )
        )
    p, num = base.shape
    for m, t in enumerate(terms):
        if not isinstance(t, PairwiseTerm):
            raise TypeError(f"terms[{m}] must be a PairwiseTerm; got {type(t).__name__}")
        if t.op.batch * t.op.points != p:
            raise ValueError(
                f"terms[{m}] is built on {t.op.batch}×{t.op.points} points but base has P = {p}"
            )
        if tuple(t.coef.shape) not in ((), (num,), (num, num)):
            raise ValueError(
                f"terms[{m}].coef must be a scalar, ({num},) or ({num}, {num}) for L = {num}; "
                f"got shape {tuple(t.coef.shape)}"
            )
        for name in ("pre", "post"):
            f = getattr(t, name)
            if f is not None and tuple(f.shape) != (p, 1):
                raise ValueError(
                    f"terms[{m}].{name} must be (P, 1) = ({p}, 1); got {tuple(f.shape)}"
                )


class _MeanField(torch.autograd.Function):
    """(1) over all iterations with its adjoint recursion as the backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        base: torch.Tensor,
        terms: tuple[PairwiseTerm, ...],
        iters: int,
        checkpoint: bool,
        *flat: torch.Tensor | None,
    ) -> torch.Tensor:
        base = base.detach().contiguous()
        # the reduced label maps give the same Q_t (the backward uses the full ones)
        coefs = [_reduce_coef(t.coef.detach().to(base.dtype)) for t in terms]
        every = math.ceil(math.sqrt(iters)) if checkpoint and iters > 1 else 1
        out, kept = _forward_loop(base, terms, coefs, iters, range(0, iters, every))
        ctx.terms, ctx.iters, ctx.every, ctx.kept = terms, iters, every, kept
        ctx.save_for_backward(base, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        serial = any(t.op.native for t in ctx.terms) and grad_out.device.type == "cpu"
        with native.torch_serial() if serial else contextlib.nullcontext():
            return _MeanField._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        base, out = ctx.saved_tensors
        terms: tuple[PairwiseTerm, ...] = ctx.terms
        iters, every, kept = ctx.iters, ctx.every, ctx.kept
        needs = ctx.needs_input_grad
        coefs = [t.coef.detach().to(base.dtype) for t in terms]
        fwd_coefs = [_reduce_coef(c) for c in coefs]
        need = [needs[4 + 4 * m : 8 + 4 * m] for m in range(len(terms))]
        g_coef = [torch.zeros_like(c) if n[0] else None for c, n in zip(coefs, need, strict=True)]
        g_pre = [
            torch.zeros_like(t.pre) if n[1] else None for t, n in zip(terms, need, strict=True)
        ]
        g_post = [
            torch.zeros_like(t.post) if n[2] else None for t, n in zip(terms, need, strict=True)
        ]
        g_feat = [
            torch.zeros(t.op.batch * t.op.points, t.op.dim, dtype=base.dtype, device=base.device)
            if n[3]
            else None
            for t, n in zip(terms, need, strict=True)
        ]
        centred = [
            (t.op.features - t.op.features.mean(dim=1, keepdim=True))
            .reshape(-1, t.op.dim)
            .to(base.dtype)
            if n[3]
            else None
            for t, n in zip(terms, need, strict=True)
        ]
        grad_out = grad_out.contiguous()
        # log_softmax backward: dL/dz_T = grad − exp(out) Σ_l grad (arrays from the workspace)
        g = torch.exp(out, out=workspace.empty(out.shape, out.dtype, out.device))
        g.mul_(grad_out.sum(dim=-1, keepdim=True))
        torch.sub(grad_out, g, out=g)
        g_base = workspace.empty(g.shape, g.dtype, g.device).copy_(g)
        # (P, L) arrays reused by every iteration: at a batch of 4 VOC images each is 63 MB,
        # above glibc's mmap threshold, and a fresh one costs ~15 k page faults.
        work = _Work(g)
        dq = work.get("dq")
        segment: dict[int, torch.Tensor] = {}
        for t in range(iters - 1, -1, -1):
            q = kept.get(t)
            if q is None:
                q = segment.get(t)
            if q is None:  # recompute the segment that holds t from its kept start
                start = t - t % every
                segment = {start: kept[start]}
                qs = kept[start]
                for s in range(start + 1, t + 1):
                    z = step(base, qs, terms, fwd_coefs)  # workspace memory on the kernel
                    in_place = native.available() and z.device.type == "cpu"
                    qs = native.softmax_rows(z, out=z) if in_place else z.softmax(dim=-1)
                    segment[s] = qs
                q = segment[t]
            dq.zero_()
            for m, term in enumerate(terms):
                _term_backward(
                    term,
                    coefs[m],
                    q,
                    g,
                    dq,
                    g_coef[m],
                    g_pre[m],
                    g_post[m],
                    g_feat[m],
                    centred[m],
                    work,
                )
            # softmax backward: dL/dz_t = q ⊙ (dq − Σ_l q ⊙ dq), written over g; g_base += it
            if not native.softmax_backward(q, dq, g, g_base):
                tmp = torch.mul(q, dq, out=work.get("scratch"))
                dq.sub_(tmp.sum(dim=-1, keepdim=True))
                torch.mul(q, dq, out=g)
                g_base += g
        grads: list[torch.Tensor | None] = [g_base if needs[0] else None, None, None, None]
        for m, term in enumerate(terms):
            gf = g_feat[m]
            if gf is not None:
                gf = gf.reshape(term.op.features.shape).to(term.features.dtype)  # type: ignore[union-attr]
            gc = g_coef[m]
            if gc is not None:
                gc = gc.to(term.coef.dtype)
            grads += [gc, g_pre[m], g_post[m], gf]
        return tuple(grads)


# Channels per call when blocks are filtered stacked (the moments without the compiled moment
# pass: float64 or the PyTorch lattice). The generic passes filtered 42 channels for about the
# cost of 21 (500×375: 21 → 10 ms, 42 → 11 ms, 63 → 30 ms), so blocks go in pairs.
_STACK_CHANNELS = 48


def _filter_blocks(op: KernelOp, blocks: list[torch.Tensor], transpose: bool) -> list[torch.Tensor]:
    """K (or Kᵀ) of each (P, L) block, stacked along channels into few calls."""
    width = blocks[0].shape[1]
    per_call = max(1, _STACK_CHANNELS // width)
    out: list[torch.Tensor] = []
    for i in range(0, len(blocks), per_call):
        group = blocks[i : i + per_call]
        y = op.apply(torch.cat(group, dim=1) if len(group) > 1 else group[0], transpose)
        out.extend(y.split(width, dim=1) if len(group) > 1 else [y])
    return out


class _Work:
    """Named (P, L) arrays like ``like``, allocated once per backward and reused."""

    def __init__(self, like: torch.Tensor) -> None:
        self.like = like
        self.arrays: dict[str, torch.Tensor] = {}
        self.moments: torch.Tensor | None = None  # the moment passes' buffer, shared by terms

    def get(self, name: str) -> torch.Tensor:
        x = self.arrays.get(name)
        if x is None:
            x = self.arrays[name] = workspace.empty(
                self.like.shape, self.like.dtype, self.like.device
            )
        return x

    def gram(self, c: int) -> torch.Tensor:
        """A zeroed (c, c) float64 accumulator."""
        return torch.zeros(c, c, dtype=torch.float64, device=self.like.device)


def _label_product(
    x: torch.Tensor, coef: torch.Tensor, transposed: bool, out: torch.Tensor
) -> torch.Tensor:
    """X ∘ A (or x ∘ Aᵀ) into ``out``."""
    if coef.dim() == 2:
        a = (coef.transpose(0, 1) if transposed else coef).contiguous()
        if native.label_matmul(x, a, out):
            return out
        return torch.mm(x, a, out=out)
    return torch.mul(x, coef, out=out)


def _add_coef_grad(g_coef: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """∂L/∂A += leftᵀ right (matrix), its diagonal (vector) or trace (scalar): no (P, L) temp."""
    _add_gram(g_coef, torch.mm(left.transpose(0, 1), right))


def _add_gram(g_coef: torch.Tensor, prod: torch.Tensor) -> None:
    """∂L/∂A += prod (L, L) as a matrix, its diagonal (vector) or trace (scalar); resets prod."""
    prod = prod.to(g_coef.dtype)
    if g_coef.dim() == 2:
        g_coef += prod
    elif g_coef.dim() == 1:
        g_coef += prod.diagonal()
    else:
        g_coef += prod.diagonal().sum()


def _term_backward(
    term: PairwiseTerm,
    coef: torch.Tensor,
    q: torch.Tensor,
    g: torch.Tensor,
    dq: torch.Tensor,
    g_coef: torch.Tensor | None,
    g_pre: torch.Tensor | None,
    g_post: torch.Tensor | None,
    g_feat: torch.Tensor | None,
    centred: torch.Tensor | None,
    work: _Work,
) -> None:
    """Accumulate one term's share of the backward of one iteration of (1), in place.

    The iteration is z′ = base + (post ⊙ K(v)) ∘ A with v = pre ⊙ q, and g = ∂L/∂z′.
    With W₀ = Kᵀ(post ⊙ g) (filtering commutes with the label map A):

        ∂L/∂q += pre ⊙ (W₀ ∘ Aᵀ),   ∂L/∂A += vᵀ W₀ (matrix; channel sums for vector/scalar),
        ∂L/∂pre += Σ_l W₀ ⊙ (q ∘ A),   ∂L/∂post += Σ_l (g ∘ Aᵀ) ⊙ K(v),

    and for the features (Gaussian model, ∂k_ij/∂f_i = k_ij (f_j − f_i)), with u = post ⊙ (g ∘ Aᵀ),
    Y_d = K(f_d v), W_d = Kᵀ(f_d · post ⊙ g):

        ∂L/∂f_id += Σ_l [u ⊙ Y_d + (v ∘ A) ⊙ W_d] − f_id Σ_l [u ⊙ K(v) + (v ∘ A) ⊙ W₀].

    Without feature or factor gradients that is one transposed filtering per term (the factors
    folded into the kernel's passes).
    """
    op, pre, post = term.op, _det(term.pre), _det(term.post)
    if g_pre is None and g_post is None and g_feat is None:
        # pre ⊙ Kᵀ(post ⊙ g), and qᵀ of it for ∂L/∂A in the same pass
        gram = None if g_coef is None else (q, work.gram(q.shape[1]))
        pw = op.apply(g, True, post, pre, out=work.get("scratch"), gram=gram)
        if g_coef is not None:
            assert gram is not None
            _add_gram(g_coef, gram[1])
        if coef.dim() == 2:
            alpha = _diagonal_part(coef)
            if alpha is not None:
                dq.add_(pw, alpha=alpha)
            elif not native.label_matmul(pw, coef.t().contiguous(), dq, accumulate=True):
                dq.addmm_(pw, coef.transpose(0, 1))
        elif coef.dim() == 1:
            dq.addcmul_(pw, coef)
        else:
            dq.add_(pw, alpha=float(coef))
        return
    v = q if pre is None else torch.mul(pre, q, out=work.get("v"))
    pg = g if post is None else torch.mul(post, g, out=work.get("pg"))
    if centred is None:  # factor gradients only: no feature moments
        centred = q.new_zeros(q.shape[0], 0)
    # s_f[:, d] = Σ_l (g ∘ Aᵀ) ⊙ K(f_d v),  s_t[:, d] = Σ_l (q ∘ A) ⊙ Kᵀ(f_d · post ⊙ g)
    scratch = work.get("scratch")
    contract = _label_product(g, coef, True, scratch)
    _, s_f = op.moments(v, centred, contract, transpose=False, work=work.moments)
    contract = _label_product(q, coef, False, scratch)
    w0, s_t = op.moments(pg, centred, contract, transpose=True, plain=work.get("w0"), work=op._work)
    work.moments, op._work = op._work, None
    assert w0 is not None
    if g_coef is not None:
        _add_coef_grad(g_coef, v, w0)
    ktu = _label_product(w0, coef, True, scratch)
    if pre is None:
        dq.add_(ktu)
    else:
        dq.addcmul_(pre, ktu)
    if g_pre is not None:
        g_pre += s_t[:, :1]  # Σ_l (W₀ ∘ Aᵀ) ⊙ q
    if g_post is not None:
        g_post += s_f[:, :1]  # Σ_l (g ∘ Aᵀ) ⊙ K(v)
    if g_feat is not None:
        sf = s_f if post is None else post * s_f  # u = post ⊙ (g ∘ Aᵀ)
        st = s_t if pre is None else pre * s_t  # v ∘ A = pre ⊙ (q ∘ A)
        both = sf + st
        g_feat += both[:, 1:] - centred * both[:, :1]
