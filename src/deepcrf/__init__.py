"""deepcrf: deep structured models (CNN + CRF) for semantic image segmentation in PyTorch.

The public API is what ``__all__`` lists; everything else is importable but not promised stable.

Example:
    >>> import deepcrf
    >>> crf = deepcrf.DenseCRF(num_classes=21)          # doctest: +SKIP
    >>> refined_logits = crf(logits, image)             # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> module that defines it.  Resolved on first access (PEP 562) so that
# ``import deepcrf`` stays cheap and each layer is imported only when used.
_EXPORTS: dict[str, str] = {
    "DenseCRF": "deepcrf.crf.dense",
    "dense_crf": "deepcrf.crf.dense",
    "lattice_error": "deepcrf.crf.dense",
    "refine": "deepcrf.crf.dense",
    "GaussianCRF": "deepcrf.crf.gaussian",
    "MultiScaleGaussianCRF": "deepcrf.crf.gaussian",
    "ContextualCRF": "deepcrf.crf.contextual",
    "PermutohedralLattice": "deepcrf.ops.permutohedral",
    "conjugate_gradient": "deepcrf.ops.cg",
}
_SUBMODULES = ("ops", "crf", "models", "data", "metrics", "engine", "compat")

__all__ = ["__version__", *_EXPORTS, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"deepcrf.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'deepcrf' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the public names only: not this module's own imports (Any, importlib, annotations)
    return sorted(__all__)
