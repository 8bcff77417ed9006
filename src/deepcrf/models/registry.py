"""The model registry: ``deepcrf.models.create(name, num_classes, **kwargs)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from deepcrf._checks import check_int

_Factory = Callable[..., nn.Module]
_MODELS: dict[str, _Factory] = {}


def register(name: str) -> Callable[[_Factory], _Factory]:
    """Decorator registering ``factory(num_classes, **kwargs) -> nn.Module`` under ``name``."""

    def wrap(factory: _Factory) -> _Factory:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = factory
        return factory

    return wrap


def available() -> list[str]:
    """Names accepted by :func:`create`, sorted."""
    return sorted(_MODELS)


def create(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` for ``num_classes`` labels.

    Raises:
        ValueError: unknown name (the message lists the known ones) or ``num_classes < 1``.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    num_classes = check_int(num_classes, "num_classes", minimum=1)
    return _MODELS[name](int(num_classes), **kwargs)
