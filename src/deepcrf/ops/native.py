"""Optional compiled CPU kernel for the permutohedral lattice, with the PyTorch path as fallback.

The benchmarks (benchmarks/bench_densecrf.py, bench_crf_layer.py; docs/densecrf.md
"Performance") showed that pure PyTorch leaves the lattice build and filtering behind
pydensecrf's C++ on the 2-core CPU.  ``kernel/lattice_kernel.c`` (portable GNU C11 with vector
extensions, no dependencies besides pthreads) builds exactly the index arrays the PyTorch
lattice uses (slice entries, blur neighbours) with a hash table instead of a sort, and runs the
mean-field engine's passes on them (docs/meanfield.md): the fused mean-field loop, plain and
transposed filters, sums of filters, and the feature moments of the bandwidth gradient.

It is compiled on first use with the system C compiler (``$CC``, else ``cc``) into a per-user
cache (``$DEEPCRF_CACHE_DIR``, else ``$XDG_CACHE_HOME/deepcrf``, else ``~/.cache/deepcrf``),
written to a temporary file and renamed, keyed by a hash of the source, the flags and the CPU.
Nothing is compiled at install time and nothing else changes when no compiler is present: every
caller falls back to the PyTorch implementation, which stays the tested reference (the tests
run every lattice operation both ways and compare).  CUDA tensors always take the PyTorch path.

``DEEPCRF_NATIVE`` selects the behaviour: ``auto`` (default: use the kernel when it builds),
``0`` (never), ``1`` (always; raise if it cannot be built).  :func:`status` says which applies
and why.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepcrf.ops import workspace

__all__ = [
    "LatticeArrays",
    "Term",
    "available",
    "build_lattice",
    "cache_dir",
    "filter_terms",
    "finish_lattice",
    "free_lattice",
    "library",
    "meanfield",
    "moments",
    "moments_work_floats",
    "release_workspace",
    "softmax_backward",
    "softmax_rows",
    "status",
    "threads",
]

_KERNEL_DIR = Path(__file__).with_name("kernel")
_SOURCE = _KERNEL_DIR / "lattice_kernel.c"  # the one translation unit; it includes the rest
# The calling convention: bump it with any change of an entry point's arguments.  It is passed
# to the compiler (-DDEEPCRF_KERNEL_ABI) and read back from the library, so the prototypes
# below and the compiled code cannot disagree.
_ABI = 14
# -ffp-contract=off: no fused multiply-adds, so the build's float rounding decisions are the
# PyTorch path's exactly.  -march=native is tried first (the library is built for this CPU).
_FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-ffp-contract=off", "-pthread"]
_lock = threading.Lock()
_loaded: dict[str, object] = {}


def _mode() -> str:
    value = os.environ.get("DEEPCRF_NATIVE", "auto").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("1", "on", "true", "yes"):
        return "on"
    raise ValueError(f"DEEPCRF_NATIVE must be auto, 0 or 1; got {value!r}")


def cache_dir() -> Path:
    """Folder of the compiled kernel (created on demand)."""
    env = os.environ.get("DEEPCRF_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "deepcrf"


def _cpu_tag() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    model += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return f"{platform.system()}-{platform.machine()}-{model}"


def _compile(compiler: str, dest: Path) -> str | None:
    """Compile the kernel into ``dest`` (atomically); returns an error text or None."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    errors = []
    try:
        for extra in (["-march=native"], []):
            cmd = [compiler, *_FLAGS, f"-DDEEPCRF_KERNEL_ABI={_ABI}", *extra, str(_SOURCE)]
            cmd += ["-o", tmp, "-lm"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as exc:
                return f"{' '.join(cmd)}: {exc}"
            if proc.returncode == 0:
                os.replace(tmp, dest)
                return None
            errors.append(f"{' '.join(cmd)}:\n{proc.stderr.strip()[-2000:]}")
        return "\n".join(errors)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> tuple[ctypes.CDLL | None, str]:
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        return None, f"no C compiler ({compiler!r} not found): using the PyTorch lattice"
    source = b"".join(f.name.encode() + f.read_bytes() for f in sorted(_KERNEL_DIR.iterdir()))
    key = hashlib.sha256(source + repr((_FLAGS, compiler, _cpu_tag(), _ABI)).encode()).hexdigest()[
        :16
    ]
    dest = cache_dir() / f"lattice_kernel_{key}.so"
    try:
        if not dest.exists():
            err = _compile(compiler, dest)
            if err is not None:
                return None, f"compiling the lattice kernel failed: {err}"
        lib = ctypes.CDLL(str(dest))
        if lib.deepcrf_kernel_abi() != _ABI:
            return None, f"{dest} has another calling convention"
        mismatch = _declare(lib)
        if mismatch is not None:
            return None, f"{dest}: {mismatch}"
    except OSError as exc:  # unwritable cache, unloadable library
        return None, f"cannot build or load the lattice kernel ({exc}): using the PyTorch lattice"
    return lib, f"compiled kernel {dest}"


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None when it is disabled or cannot be built (see :func:`status`)."""
    mode = _mode()
    if mode == "off":
        return None
    with _lock:
        if "lib" not in _loaded:
            _loaded["lib"], _loaded["why"] = _load()
    lib = _loaded["lib"]
    if lib is None and mode == "on":
        raise RuntimeError(f"DEEPCRF_NATIVE=1 but {_loaded['why']}")
    return lib  # type: ignore[return-value]


def available() -> bool:
    """Whether the compiled CPU kernel is in use."""
    return library() is not None


def status() -> str:
    """One line saying which lattice implementation CPU tensors use, and why."""
    if _mode() == "off":
        return "DEEPCRF_NATIVE=0: using the PyTorch lattice"
    library()
    return str(_loaded["why"])


def release_workspace() -> int:
    """Free the vertex buffers the fused mean field keeps between calls; returns their bytes.

    The compiled mean-field loop and filters (the engine's, docs/meanfield.md) keep their working
    memory, about ``4 · CS · (threads + 1) · Σ_t (M_t + 1)`` bytes (M_t the lattice vertex
    counts, CS the label count rounded up to a multiple of 8; 21 MB for a 500×375 image with
    21 labels on 2 threads, at most 256 MB), for the next call: it spares the page faults of
    fresh memory.  Call this to hand it back to the system, e.g. after a batch of images.
    Returns 0 when nothing is kept (or the kernel is not in use).  The engine's large arrays
    (Q history, backward work arrays) are kept too, by :mod:`deepcrf.ops.workspace`:
    ``workspace.release()`` frees those.
    """
    lib = library()
    return 0 if lib is None else int(lib.lattice_release_workspace())


_serial = threading.local()


def threads() -> int:
    """Threads the kernel uses: torch's intra-op thread count (outside :func:`torch_serial`)."""
    kept = getattr(_serial, "threads", None)
    return max(1, kept if kept is not None else torch.get_num_threads())


@contextlib.contextmanager
def torch_serial() -> Iterator[None]:
    """Run torch's CPU ops on one thread inside, while the kernel keeps its thread count.

    After a parallel region torch's OpenMP workers spin for milliseconds; between kernel
    calls they take the cores the kernel's threads need (measured: the CRF layer's backward at
    500×375 took 0.78 s with torch's ops parallel, 0.47 s with OMP_WAIT_POLICY=PASSIVE). The
    small per-pixel ops between kernel calls are memory-bound, so one thread loses little.
    """
    if getattr(_serial, "threads", None) is not None:
        yield
        return
    before = torch.get_num_threads()
    _serial.threads = before
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        _serial.threads = None


@contextlib.contextmanager
def kernel_threads(n: int) -> Iterator[None]:
    """The kernel's thread count inside, for the calling Python thread only.

    For callers that run independent small problems on several Python threads at once (one
    kernel thread each): on a 96×96 image two kernel threads share one lattice's buffers
    across cores and lose to one (benchmarks/RESULTS.md, tune-crf).
    """
    before = getattr(_serial, "threads", None)
    _serial.threads = max(1, int(n))
    try:
        yield
    finally:
        _serial.threads = before


# ------------------------------------------------------------------------- calling convention
# Mirrors of the argument structs of kernel/common.h, field for field (order and types).
_P, _I64, _I32, _F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_double


class _Terms(ctypes.Structure):
    _fields_ = [
        ("count", _I32),
        ("vertices", _P),
        ("dp1", _P),
        ("slice_vertex", _P),
        ("slice_weight", _P),
        ("blur", _P),
        ("pre", _P),
        ("post", _P),
        ("coef", _P),
    ]


class _BuildArgs(ctypes.Structure):
    _fields_ = [
        ("features", _P),
        ("n", _I64),
        ("n_real", _I64),
        ("scale", _P),
        ("feature_scale", _F64),
        ("inv_dp1", _F64),
        ("entry_weight", _P),
        ("entry_vertex", _P),
        ("vertices_out", _P),
        ("d", _I32),
        ("nthreads", _I32),
    ]


class _FilterSumArgs(ctypes.Structure):
    _fields_ = [
        ("n", _I64),
        ("c", _I64),
        ("values", _P),
        ("base", _P),
        ("out", _P),
        ("buf_a", _P),
        ("buf_b", _P),
        ("scratch", _P),
        ("nparts", _I32),
        ("softmax", _I32),
        ("transpose", _I32),
        ("nthreads", _I32),
    ]


class _FilterArgs(ctypes.Structure):
    _fields_ = [
        ("n", _I64),
        ("c", _I64),
        ("values", _P),
        ("base", _P),
        ("out", _P),
        ("gram_left", _P),
        ("gram", _P),
        ("transpose", _I32),
        ("nthreads", _I32),
    ]


class _MeanFieldArgs(ctypes.Structure):
    _fields_ = [
        ("n", _I64),
        ("c", _I64),
        ("group", _I64),
        ("coefv", _P),
        ("base", _P),
        ("q", _P),
        ("hist", _P),
        ("log_out", _I32),
        ("iters", _I32),
        ("nthreads", _I32),
    ]


class _MomentsArgs(ctypes.Structure):
    _fields_ = [
        ("n", _I64),
        ("c", _I64),
        ("values", _P),
        ("feats", _P),
        ("contract", _P),
        ("plain", _P),
        ("s", _P),
        ("work", _P),
        ("nd", _I32),
        ("transpose", _I32),
        ("exclude_self", _I32),
        ("nparts", _I32),
        ("nthreads", _I32),
    ]


def _ptr(struct: type[ctypes.Structure]) -> Any:
    return ctypes.POINTER(struct)


# Every entry point: name -> (return type, argument types).  The only declarations of the
# kernel's functions; _declare applies them and the wrappers below are the only callers.
_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    "deepcrf_kernel_abi": (_I32, []),
    "deepcrf_kernel_struct_sizes": (None, [_P]),
    "lattice_build_f32": (_P, [_ptr(_BuildArgs)]),
    "lattice_build_f64": (_P, [_ptr(_BuildArgs)]),
    "lattice_finish": (_I32, [_P, _I64, _I64, _I64, _P, _I32]),
    "lattice_free": (None, [_P]),
    "lattice_filter_sum_f32": (_I32, [_ptr(_Terms), _ptr(_FilterSumArgs)]),
    "lattice_filter_sum_f64": (_I32, [_ptr(_Terms), _ptr(_FilterSumArgs)]),
    "lattice_filter_f32": (_I32, [_ptr(_Terms), _ptr(_FilterArgs)]),
    "lattice_meanfield_f32": (_I32, [_ptr(_Terms), _ptr(_MeanFieldArgs)]),
    "lattice_moments_f32": (_I32, [_ptr(_Terms), _ptr(_MomentsArgs)]),
    "lattice_release_workspace": (_I64, []),
    "softmax_rows_f32": (None, [_I64, _I64, _P, _P, _I32]),
    "softmax_rows_f64": (None, [_I64, _I64, _P, _P, _I32]),
    "softmax_backward_f32": (None, [_I64, _I64, _P, _P, _P, _P, _I32]),
    "label_matmul_f32": (_I32, [_I64, _I64, _P, _P, _P, _I32, _I32]),
}


# The struct mirrors in the order deepcrf_kernel_struct_sizes reports the C sizes.
_STRUCTS = (_Terms, _BuildArgs, _FilterSumArgs, _FilterArgs, _MeanFieldArgs, _MomentsArgs)


def _declare(lib: ctypes.CDLL) -> str | None:
    """Apply the prototypes; returns why the library does not match them, or None."""
    for name, (restype, argtypes) in _PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    sizes = (ctypes.c_int64 * len(_STRUCTS))()
    lib.deepcrf_kernel_struct_sizes(ctypes.cast(sizes, _P))
    wrong = [
        f"{s.__name__} {ctypes.sizeof(s)} vs {size} bytes"
        for s, size in zip(_STRUCTS, sizes, strict=True)
        if ctypes.sizeof(s) != size
    ]
    return f"argument structs differ from the kernel's: {', '.join(wrong)}" if wrong else None


# ------------------------------------------------------------------------- typed entry points
# The compiled kernel splats pixel-major into one vertex buffer per thread, at most this many
# (each is a (vertices × channels) array).
_SPLAT_PARTS = 4
# float32 rows up to this many channels go through the vectorised mean-field passes.
_VECTOR_ROWS = 48


@dataclass(frozen=True)
class LatticeArrays:
    """One built lattice as the kernel reads it (``PermutohedralLattice.native_arrays``).

    Shape:
        slice_vertices: (P·(d+1),) int32, the vertex of every slice entry (P points)
        slice_weights:  (P·(d+1),) float32 or float64, their barycentric weights
        blur:           (d+1, 3·M) int32, per direction (self, n1, n2) of every vertex
    """

    num_vertices: int
    dp1: int
    slice_vertices: torch.Tensor
    slice_weights: torch.Tensor
    blur: torch.Tensor
    output_scale: float
    buffers: dict[torch.dtype, torch.Tensor]  # filter_terms' vertex buffers, kept between calls


@dataclass(frozen=True)
class Term:
    """One term ``coef · post ⊙ K(pre ⊙ values)`` of a sum of lattice filters.

    ``pre``/``post`` are (P,) contiguous tensors of the values' dtype, or None (ones).
    """

    lattice: LatticeArrays
    pre: torch.Tensor | None = None
    post: torch.Tensor | None = None
    coef: float = 1.0


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"the compiled lattice kernel is not in use: {status()}")
    return lib


def _addr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _terms(terms: Sequence[Term]) -> tuple[_Terms, list[Any]]:
    """The struct of a call's terms, and the ctypes arrays it points at (keep them alive)."""
    k = len(terms)
    if not 1 <= k <= 16:
        raise ValueError(f"the kernel takes 1 to 16 lattice terms; got {k}")
    ptrs = ctypes.c_void_p * k
    keep = [
        (ctypes.c_int64 * k)(*[t.lattice.num_vertices for t in terms]),
        (ctypes.c_int * k)(*[t.lattice.dp1 for t in terms]),
        ptrs(*[t.lattice.slice_vertices.data_ptr() for t in terms]),
        ptrs(*[t.lattice.slice_weights.data_ptr() for t in terms]),
        ptrs(*[t.lattice.blur.data_ptr() for t in terms]),
        ptrs(*[_addr(t.pre) for t in terms]),
        ptrs(*[_addr(t.post) for t in terms]),
        (ctypes.c_double * k)(*[t.coef * t.lattice.output_scale for t in terms]),
    ]
    struct = _Terms(k, *[ctypes.cast(a, _P) for a in keep])
    return struct, keep


def build_lattice(
    features: torch.Tensor,
    n_real: int,
    scale: Sequence[float],
    feature_scale: float,
    inv_dp1: float,
    weights: torch.Tensor,
    vertices: torch.Tensor,
) -> tuple[int, int]:
    """Hash one item's points into a lattice; returns (handle, vertex count M).

    Writes the barycentric ``weights`` and item-local ``vertices`` of the first ``n_real``
    points; the handle goes to :func:`finish_lattice`, then :func:`free_lattice`.

    Shape:
        features: (N, d) contiguous float32/float64 (N >= n_real: padding points last)
        weights, vertices: (n_real·(d+1),) of features' dtype / int32
    """
    n, d = features.shape
    m = ctypes.c_int64(0)
    args = _BuildArgs(
        features.data_ptr(), n, n_real, ctypes.cast((ctypes.c_double * d)(*scale), _P),
        feature_scale, inv_dp1, weights.data_ptr(), vertices.data_ptr(),
        ctypes.cast(ctypes.pointer(m), _P), d, threads(),
    )  # fmt: skip
    suffix = "f32" if features.dtype == torch.float32 else "f64"
    handle = getattr(_lib(), f"lattice_build_{suffix}")(ctypes.byref(args))
    if not handle:
        raise MemoryError("the lattice kernel could not allocate its hash table")
    return int(handle), int(m.value)


def finish_lattice(handle: int, offset: int, total: int, blur: torch.Tensor) -> None:
    """Write one item's blur neighbours into ``blur`` (d+1, 3·total), its vertices from ``offset``.

    Missing neighbours point at row ``total`` (the zero row).
    """
    err = _lib().lattice_finish(handle, offset, total, total, blur.data_ptr(), threads())
    if err:
        raise ValueError(f"the lattice kernel takes d <= 64 features; got d = {blur.shape[0] - 1}")


def free_lattice(handle: int) -> None:
    """Free a build handle (its hash table)."""
    _lib().lattice_free(handle)


def filter_terms(
    terms: Sequence[Term],
    values: torch.Tensor,
    base: torch.Tensor | None,
    out: torch.Tensor | None,
    *,
    softmax: bool = False,
    transpose: bool = False,
    gram: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``base + Σ_t coef_t · post_t ⊙ K_t(pre_t ⊙ values)`` (K_tᵀ with ``transpose``).

    Row softmax of the result with ``softmax``; with ``gram = (left (P, C) float32, acc (C, C)
    float64)``, ``acc += leftᵀ · result``.  ``out`` may be ``base``, not ``values``.

    Shape:
        values, base, out, return: (P, C) contiguous, one dtype (float32 or float64), CPU
    """
    dtype = values.dtype
    if out is None:
        out = workspace.empty(values.shape, dtype)
    n, c = values.shape
    struct, keep = _terms(terms)
    lib = _lib()
    if dtype == torch.float32 and c <= _VECTOR_ROWS and not softmax:
        # The mean-field kernel's passes as a plain filter: rows as whole vectors, per-thread
        # splat buffers summed inside the first blur (2-2.5x faster than the passes below).
        # With `gram` the product is accumulated in the slice pass (no second pass).
        left = None if gram is None else gram[0].contiguous()
        if gram is not None and (gram[1].dtype != torch.float64 or not gram[1].is_contiguous()):
            raise ValueError("gram's accumulator must be a contiguous float64 (C, C) tensor")
        args = _FilterArgs(
            n, c, values.data_ptr(), _addr(base), out.data_ptr(), _addr(left),
            None if gram is None else gram[1].data_ptr(), int(transpose), threads(),
        )  # fmt: skip
        err = lib.lattice_filter_f32(ctypes.byref(struct), ctypes.byref(args))
        if err == -1:
            raise MemoryError("the lattice kernel could not allocate its vertex buffers")
        if err:
            raise RuntimeError(f"lattice_filter failed with code {err}")
        return out
    nthreads = threads()
    nparts = min(nthreads, _SPLAT_PARTS) if n >= 4096 * nthreads else 1
    a_ptrs, b_ptrs, s_ptrs = [], [], []
    for term in terms:
        # Vertex buffers are kept between calls: fresh multi-MB allocations cost page faults
        # comparable to the arithmetic (mean-field filters the same shapes every iteration).
        size = (term.lattice.num_vertices + 1) * c
        bufs = term.lattice.buffers.get(dtype)
        if bufs is None or bufs.numel() < (nparts + 1) * size + 1:
            bufs = torch.empty((nparts + 1) * size + 1, dtype=dtype)
            term.lattice.buffers[dtype] = bufs
        a_ptrs.append(bufs.data_ptr())
        b_ptrs.append(bufs[size:].data_ptr())
        s_ptrs.append(bufs[2 * size :].data_ptr())
    arrays = [(ctypes.c_void_p * len(terms))(*p) for p in (a_ptrs, b_ptrs, s_ptrs)]
    args = _FilterSumArgs(
        n, c, values.data_ptr(), _addr(base), out.data_ptr(),
        *[ctypes.cast(a, _P) for a in arrays], nparts, int(softmax), int(transpose), nthreads,
    )  # fmt: skip
    suffix = "f32" if dtype == torch.float32 else "f64"
    err = getattr(lib, f"lattice_filter_sum_{suffix}")(ctypes.byref(struct), ctypes.byref(args))
    del keep, arrays
    if err:
        raise RuntimeError(f"lattice_filter_sum failed with code {err}")
    if gram is not None:
        gram[1].add_((gram[0].transpose(0, 1) @ out).double())
    return out


def meanfield(
    terms: Sequence[Term],
    base: torch.Tensor,
    out: torch.Tensor,
    history: Sequence[torch.Tensor] | None,
    *,
    iters: int,
    log: bool,
    lanes: torch.Tensor | None = None,
    group: int = 0,
) -> None:
    """The fused mean-field loop: ``out`` = (log) Q_iters; ``history[t]`` = Q_t when given.

    Q_{k+1} = softmax(base + Σ_t coef_t post_t ⊙ K_t(pre_t ⊙ Q_k)); ``lanes`` (T, C) float32
    multiplies term t's coefficient per label; ``group`` > 0 normalises blocks of ``group``
    labels apart (docs/meanfield.md).

    Shape:
        base, out, history[t]: (P, C) contiguous float32, C <= 48
    """
    struct, keep = _terms(terms)
    hist = None
    if history is not None:
        hist = (ctypes.c_void_p * iters)(*[h.data_ptr() for h in history])
    n, c = base.shape
    args = _MeanFieldArgs(
        n, c, int(group), _addr(lanes), base.data_ptr(), out.data_ptr(),
        None if hist is None else ctypes.cast(hist, _P), int(log), int(iters), threads(),
    )  # fmt: skip
    err = _lib().lattice_meanfield_f32(ctypes.byref(struct), ctypes.byref(args))
    del keep, hist
    if err == -1:
        raise MemoryError("the lattice kernel could not allocate its vertex buffers")
    if err:
        raise RuntimeError(f"lattice_meanfield failed with code {err}")


def moments_work_floats(lattice: LatticeArrays, points: int, channels: int, nd: int) -> int:
    """float32s of work :func:`moments` needs: splat parts and a blur buffer of vertex rows."""
    return (_moment_parts(points) + 1) * (lattice.num_vertices + 1) * (nd + 1) * 8 * -(
        -channels // 8
    ) + 16


def _moment_parts(points: int) -> int:
    nthreads = min(threads(), 64)
    return nthreads if points >= 4096 * nthreads else 1


def moments(
    term: Term,
    values: torch.Tensor,
    feats: torch.Tensor,
    contract: torch.Tensor,
    plain: torch.Tensor | None,
    s: torch.Tensor,
    work: torch.Tensor,
    *,
    transpose: bool,
    exclude_self: bool,
) -> None:
    """The contracted feature moments of one lattice's filter (the bandwidth gradient).

    s[:, 0] = Σ_l contract ⊙ K v, s[:, d] = Σ_l contract ⊙ K(f_d ⊙ v) (Kᵀ with ``transpose``,
    K − I with ``exclude_self``); ``plain`` receives K v when given.

    Shape:
        values, contract, plain: (P, C); feats: (P, D); s: (P, D + 1); all float32
        work: (moments_work_floats(...),) float32
    """
    struct, keep = _terms([term])
    p, c = values.shape
    args = _MomentsArgs(
        p, c, values.data_ptr(), feats.data_ptr(), contract.data_ptr(), _addr(plain),
        s.data_ptr(), work.data_ptr(), feats.shape[1], int(transpose), int(exclude_self),
        _moment_parts(p), min(threads(), 64),
    )  # fmt: skip
    err = _lib().lattice_moments_f32(ctypes.byref(struct), ctypes.byref(args))
    del keep
    if err:
        raise RuntimeError(f"lattice_moments failed with code {err}")


def softmax_backward(
    q: torch.Tensor, dq: torch.Tensor, g: torch.Tensor, total: torch.Tensor
) -> bool:
    """``g = q ⊙ (dq − Σ_l q ⊙ dq)`` and ``total += g`` in one pass; False if not done here.

    The softmax's vector-Jacobian product row by row, for contiguous float32 (N, C) CPU arrays
    with the kernel; otherwise the caller does it with torch.
    """
    arrays = (q, dq, g, total)
    lib = library() if q.device.type == "cpu" else None
    if lib is None or any(
        a.dtype != torch.float32
        or a.dim() != 2
        or not a.is_contiguous()
        or a.requires_grad
        or a.shape != q.shape
        for a in arrays
    ):
        return False
    n, c = q.shape
    lib.softmax_backward_f32(
        n, c, q.data_ptr(), dq.data_ptr(), g.data_ptr(), total.data_ptr(), threads()
    )
    return True


def label_matmul(
    x: torch.Tensor, a: torch.Tensor, out: torch.Tensor, *, accumulate: bool = False
) -> bool:
    """``out = x @ a`` (``out += x @ a`` with ``accumulate``); False if not done here.

    For the engine's products with an (L, L) label map: contiguous float32 CPU arrays, x and
    out (N, L), L <= 48, with the kernel; otherwise the caller uses torch.  ``out`` must not
    alias ``x``.
    """
    lib = library() if x.device.type == "cpu" else None
    n, c = x.shape
    if (
        lib is None
        or c > 48
        or any(
            t.dtype != torch.float32 or not t.is_contiguous() or t.requires_grad
            for t in (x, a, out)
        )
        or tuple(a.shape) != (c, c)
        or out.shape != x.shape
    ):
        return False
    err = lib.label_matmul_f32(
        n, c, x.data_ptr(), a.data_ptr(), out.data_ptr(), int(accumulate), threads()
    )
    return err == 0


def softmax_rows(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last axis of a contiguous (N, C) array (``out`` may be ``x``).

    The compiled kernel on CPU float32/float64 when available, ``torch.softmax`` otherwise.
    """
    if out is None:
        out = torch.empty_like(x)
    lib = library() if x.device.type == "cpu" else None
    if (
        lib is None
        or x.dtype not in (torch.float32, torch.float64)
        or x.dim() != 2
        or not x.is_contiguous()
        or not out.is_contiguous()
        or x.requires_grad
    ):
        return torch.ops.aten._softmax.out(x, -1, False, out=out)
    suf = "f32" if x.dtype == torch.float32 else "f64"
    getattr(lib, f"softmax_rows_{suf}")(
        x.shape[0], x.shape[1], x.data_ptr(), out.data_ptr(), threads()
    )
    return out
