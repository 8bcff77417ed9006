"""Backbones, heads and CNN+CRF wrappers, built by name through :func:`create`.

Each model module registers itself on import; the imports below fill the registry.
"""

from __future__ import annotations

import importlib

from .registry import available, create, register

__all__ = ["available", "create", "register"]

# Modules that register models.  A module listed here that does not exist yet is skipped so that
# the registry works while the library grows; a module that exists but fails to import raises.
for _name in ("backbones", "deeplab", "segmenter", "gaussian_head", "featmap"):
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _err:
        if _err.name != f"{__name__}.{_name}":
            raise
