"""Training, evaluation, checkpoints and multi-process helpers (the layer under the CLI).

The names the demo and the CLI use::

    fit(model, dataset, TrainSettings(stage="unary", steps=...), ...) -> {"losses", ...}
    evaluate(model, dataset, *, num_classes, ...) -> {"miou", "pixel_accuracy", ...}
    predict_logits(model, image, *, scales, flip, postprocess) -> (B, L, H, W)
    save_checkpoint(path, model, config) / load_checkpoint(path) -> (model, config)
    tune_dense_crf(model, dataset, *, num_classes, ...) -> {"best": {...}, "trials": [...]}

Names resolve on first access (PEP 562), so that ``deepcrf --help``, which declares the
subcommands' flags in :mod:`deepcrf.cli` (reading :mod:`deepcrf.engine.config`), does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "fit": "train",
    "cross_entropy": "train",
    "TrainSettings": "config",
    "evaluate": "evaluation",
    "predict_logits": "evaluation",
    "metrics_from_confusion": "evaluation",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "tune_dense_crf": "tune",
    "benchmark_dense_crf": "benchmark",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
