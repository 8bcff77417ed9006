"""Backbones, heads and CNN+CRF wrappers, built by name through :func:`create`.

Each model module registers its factories on import; importing them here fills the registry.
"""

from __future__ import annotations

from . import backbones, deeplab, featmap, gaussian_head, segmenter
from .registry import available, create, register

__all__ = [
    "available",
    "backbones",
    "create",
    "deeplab",
    "featmap",
    "gaussian_head",
    "register",
    "segmenter",
]
