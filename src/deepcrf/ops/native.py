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
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "available",
    "cache_dir",
    "library",
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


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    for suf in ("f32", "f64"):
        build = getattr(lib, f"lattice_build_{suf}")
        build.restype = p
        build.argtypes = [p, i64, i64, i32, p, f64, f64, p, p, ctypes.POINTER(i64), i32]
        soft = getattr(lib, f"softmax_rows_{suf}")
        soft.restype = None
        soft.argtypes = [i64, i64, p, p, i32]
        fsum = getattr(lib, f"lattice_filter_sum_{suf}")
        fsum.restype = i32
        fsum.argtypes = [i64, i64, i32, p, p, p, p, p, p, p, p, p, p, p, p, p, p]
        fsum.argtypes += [i32, i32, i32, i32]
    lib.lattice_finish.restype = i32
    lib.lattice_finish.argtypes = [p, i64, i64, i64, p, i32]
    mf = lib.lattice_meanfield_f32
    mf.restype = i32
    mf.argtypes = [i64, i64, i32, p, p, p, p, p, p, p, p, p, i64, p, p, p, i32, i32, i32]
    filt = lib.lattice_filter_f32
    filt.restype = i32
    filt.argtypes = [i64, i64, i32, p, p, p, p, p, p, p, p, p, p, p, i32, p, p, i32]
    lm = lib.label_matmul_f32
    lm.restype = i32
    lm.argtypes = [i64, i64, p, p, p, i32, i32]
    smb = lib.softmax_backward_f32
    smb.restype = None
    smb.argtypes = [i64, i64, p, p, p, p, i32]
    mom = lib.lattice_moments_f32
    mom.restype = i32
    mom.argtypes = [i64, i64, i32, i64, i32, p, p, p, f64, p, p, p, i32, i32, p, p, p, i32, i32]
    lib.lattice_release_workspace.restype = i64
    lib.lattice_release_workspace.argtypes = []
    lib.lattice_free.restype = None
    lib.lattice_free.argtypes = [p]


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
        _declare(lib)
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
