"""Input validation shared by the public boundary of every layer.

Errors name the argument, what was expected and what was given, so that a user sees
``image must be (B, 3, H, W) matching logits (2, 21, 64, 64); got (2, 64, 64, 3)`` rather
than a traceback from deep inside a kernel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and numpy load on first use: the CLI's --help imports this module
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
    import torch

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
    import numpy as np
    import torch

    # CPU float32/64 through numpy: single-threaded, so no OpenMP region is opened whose idle
    # workers would then spin on the cores the compiled lattice kernel is about to use.
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(x.detach().numpy()).all())
    return bool(torch.isfinite(x).all())


def check_positive(value: float, name: str) -> float:
    """Check that a scalar hyper-parameter is a finite positive number; return it as float."""
    return check_number(value, name, positive=True)


def check_positive_scalar(value: float | torch.Tensor, name: str) -> float | torch.Tensor:
    """A positive number, or a one-element tensor holding one (returned 0-d, graph kept).

    A tensor's value is read (a device sync on CUDA): layers that keep their own positive
    parameters (as exp(log)) call the unchecked solvers instead of passing through this.
    """
    import torch

    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(
                f"{name} must be a positive scalar (one floating value); got shape "
                f"{tuple(value.shape)}, dtype {value.dtype}"
            )
        v = float(value.detach())
        if not (math.isfinite(v) and v > 0.0):
            raise ValueError(f"{name} must be a finite positive number; got {v!r}")
        return value.reshape(())
    return check_positive(value, name)


def to_tensor(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A checked number or tensor as a tensor of ``like``'s dtype and device (graph kept)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype)
    return torch.tensor(value, device=like.device, dtype=like.dtype)


def check_number(
    value: object, name: str, *, positive: bool = False, minimum: float | None = None
) -> float:
    """A finite real number (not a bool or a string), ``> 0`` or ``>= minimum`` if asked."""
    if isinstance(value, bool | str | bytes) or not _is_real(value):
        raise TypeError(f"{name} must be a number; got {value!r} ({type(value).__name__})")
    v = float(value)  # type: ignore[arg-type]
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite; got {value!r}")
    if positive and not v > 0.0:
        raise ValueError(f"{name} must be a finite positive number; got {value!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}; got {value!r}")
    return v


def check_int(value: object, name: str, *, minimum: int | None = None) -> int:
    """A whole number (an int or an integral numpy scalar; not a bool or a float) ``>= minimum``."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an integer; got {value!r} ({type(value).__name__})")
    v = int(value.__index__())  # type: ignore[union-attr]
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {v}")
    return v


def check_choice(value: object, name: str, choices: Collection[str]) -> str:
    """One of ``choices`` (strings), named in the message when it is not."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _is_real(value: object) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return not isinstance(value, complex)


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
        import torch

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
