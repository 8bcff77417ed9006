"""Input validation shared by the public boundary of every layer.

Errors name the argument, what was expected and what was given, so that a user sees
``image must be (B, 3, H, W) matching logits (2, 21, 64, 64); got (2, 64, 64, 3)`` rather
than a traceback from deep inside a kernel.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch


def check_tensor(
    x: object,
    name: str,
    *,
    ndim: int | None = None,
    layout: str | None = None,
    floating: bool = False,
    dtypes: Sequence[torch.dtype] | None = None,
    finite: bool = False,
    nonempty: bool = True,
) -> torch.Tensor:
    """Check that ``x`` is a tensor of the expected rank/dtype and return it.

    Args:
        x: the value to check.
        name: the argument's name, used in the error message.
        ndim: required number of dimensions.
        layout: a shape description such as ``"(B, L, H, W)"`` used in messages.
        floating: require a floating-point dtype.
        dtypes: allowed dtypes.
        finite: require every element to be finite (no NaN/inf).
        nonempty: require every dimension to have a positive size.
    """
    desc = f" {layout}" if layout else ""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{desc}; got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions{desc}; got shape {tuple(x.shape)}")
    if nonempty and x.numel() == 0:
        raise ValueError(f"{name} must not be empty{desc}; got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype; got {x.dtype}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}); got {x.dtype}")
    if finite and x.is_floating_point() and not _all_finite(x):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} must be finite; found {bad} NaN/inf values")
    return x


def _all_finite(x: torch.Tensor) -> bool:
    # CPU float32/64 through numpy: single-threaded, so no OpenMP region is opened whose idle
    # workers would then spin on the cores the compiled lattice kernel is about to use.
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(x.detach().numpy()).all())
    return bool(torch.isfinite(x).all())


def check_positive(value: float, name: str) -> float:
    """Check that a scalar hyper-parameter is a finite positive number."""
    v = float(value)
    if not (v > 0.0) or v == float("inf"):
        raise ValueError(f"{name} must be a finite positive number; got {value!r}")
    return v


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation may use on ``device``, or None when unknown.

    ``DEEPCRF_MEMORY_LIMIT_MB`` caps it (a user limit, e.g. on a shared machine); on CPU it is
    otherwise Linux's MemAvailable, on CUDA the device's free memory.
    """
    limit = os.environ.get("DEEPCRF_MEMORY_LIMIT_MB", "").strip()
    user = None
    if limit:
        try:
            user = int(float(limit) * 2**20)
        except ValueError:
            raise ValueError(f"DEEPCRF_MEMORY_LIMIT_MB must be a number; got {limit!r}") from None
    system = None
    if device.type == "cuda":
        system = int(torch.cuda.mem_get_info(device)[0])
    elif device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        system = int(line.split()[1]) * 1024
                        break
        except OSError:
            system = None
    known = [v for v in (user, system) if v is not None]
    return min(known) if known else None


def check_memory(needed: int, what: str, advice: str, device: torch.device) -> None:
    """Raise MemoryError naming the estimate when ``needed`` bytes exceed what is available."""
    free = available_memory(device)
    if free is not None and needed > free:
        raise MemoryError(
            f"{what} needs about {_size(needed)} of memory but {_size(free)} are available "
            f"(DEEPCRF_MEMORY_LIMIT_MB or the system's): {advice}"
        )


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"
