"""Training, evaluation, checkpoints and multi-process helpers (the layer under the CLI).

The names the demo and the CLI use::

    fit(model, dataset, *, stage="unary", steps, ...) -> {"losses", "seconds", ...}
    evaluate(model, dataset, *, num_classes, ...) -> {"miou", "pixel_accuracy", ...}
    predict_logits(model, image, *, scales, flip, postprocess) -> (B, L, H, W)
    save_checkpoint(path, model, config) / load_checkpoint(path) -> (model, config)
    tune_dense_crf(model, dataset, *, num_classes, ...) -> {"best": {...}, "trials": [...]}
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate import evaluate, metrics_from_confusion, predict_logits
from .train import cross_entropy, fit, poly_lr

__all__ = [
    "cross_entropy",
    "evaluate",
    "fit",
    "load_checkpoint",
    "metrics_from_confusion",
    "poly_lr",
    "predict_logits",
    "save_checkpoint",
]
