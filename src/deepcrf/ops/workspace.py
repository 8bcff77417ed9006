"""Large CPU work arrays of the mean-field engine, kept between calls.

Fresh memory costs a page fault per 4 KB page on first touch, and glibc hands arrays above its
mmap threshold (at most 32 MB) straight back to the system when they are freed: every training
step of a CRF layer at a batch of four VOC images then faults its Q history and backward arrays
in again (~320 000 faults per forward + backward on the development VM, where one costs about
3 µs: 40 % of the step).  The engine takes those arrays from here instead: an array is kept
after use and handed out again once nothing references its memory any more (its storage's use
count: every tensor on that memory counts, views, detached aliases and autograd's saved copies
included), so a step reuses the previous step's memory.

Only CPU arrays of at least 1 MB are kept, at most :func:`limit` bytes in all (the
``DEEPCRF_WORKSPACE_MB`` environment variable, default 2048 or an eighth of the machine's
memory, whichever is smaller; 0 turns the reuse off).  :func:`release` frees what is kept.
CUDA tensors come from PyTorch's caching allocator, which already does this.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence

import torch

__all__ = ["empty", "kept_bytes", "limit", "release"]

_MIN_BYTES = 1 << 20
_lock = threading.Lock()
_kept: list[torch.Tensor] = []  # flat arrays, least recently handed out first


def limit() -> int:
    """The most bytes kept (``DEEPCRF_WORKSPACE_MB``; see the module docs)."""
    value = os.environ.get("DEEPCRF_WORKSPACE_MB")
    if value is not None:
        try:
            mb = float(value)
        except ValueError:
            raise ValueError(
                f"DEEPCRF_WORKSPACE_MB must be a number of megabytes; got {value!r}"
            ) from None
        return max(0, int(mb * 2**20))
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        memory = 16 << 30
    return min(2 << 30, memory // 8)


_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _in_use(flat: torch.Tensor) -> bool:
    """Whether any tensor other than ``flat`` itself is on its memory."""
    assert _use_count is not None
    # the count includes ``flat`` and the temporary storage object made here
    return _use_count(flat.untyped_storage()._cdata) > 2


def _drop(flat: torch.Tensor) -> None:
    """Remove ``flat`` from the kept list (by identity: ``==`` on tensors compares values)."""
    for i, t in enumerate(_kept):
        if t is flat:
            del _kept[i]
            return


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def kept_bytes() -> int:
    """Bytes currently kept (in use or free)."""
    with _lock:
        return sum(_nbytes(t) for t in _kept)


def release() -> int:
    """Forget every kept array (those still in use stay alive with their users); returns bytes."""
    with _lock:
        total = sum(_nbytes(t) for t in _kept)
        _kept.clear()
    return total


def empty(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """An uninitialised contiguous tensor like ``torch.empty``, from the kept arrays when it can.

    The result is a view of a kept flat array: while it (or any view of it) is alive the array
    is not handed out again.
    """
    dev = torch.device(device)
    numel = math.prod(int(s) for s in shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if dev.type != "cpu" or nbytes < _MIN_BYTES or _use_count is None:
        return torch.empty(tuple(shape), dtype=dtype, device=dev)
    cap = limit()
    with _lock:
        free = [t for t in _kept if not _in_use(t)]
        fits = [t for t in free if t.dtype == dtype and t.numel() >= numel]
        if fits:
            flat = min(fits, key=lambda t: t.numel())
        else:
            if nbytes > cap:
                return torch.empty(tuple(shape), dtype=dtype, device=dev)
            total = sum(_nbytes(t) for t in _kept)
            for t in free:  # the least recently used free arrays make room
                if total + nbytes <= cap:
                    break
                _drop(t)
                total -= _nbytes(t)
            if total + nbytes > cap:  # everything kept is in use
                return torch.empty(tuple(shape), dtype=dtype, device=dev)
            flat = torch.empty(numel, dtype=dtype)
            _kept.append(flat)
        out = flat[:numel].view(tuple(shape))
        _drop(flat)
        _kept.append(flat)
        return out
