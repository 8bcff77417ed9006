"""Evaluation: multi-scale + flip inference, CRF post-processing, mIoU and trimap accuracy.

Multi-scale testing averages the class probabilities (softmax) of the network run on the image
resized by each factor in ``scales`` (and on its mirror image when ``flip``), each resized back
to the input size, as DeepLab and CRF-as-RNN do at test time; the averaged probabilities' log is
handed to an optional post-processing CRF. Metrics come from a confusion matrix accumulated over
the whole set (VOC's protocol: IoU_c = TP / (TP + FP + FN) per class, mean over classes that
occur in the ground truth or the predictions), plus DeepLab's trimap accuracy: pixel accuracy
restricted to bands of given widths around object boundaries.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from deepcrf._checks import check_int

from .._checks import check_tensor
from ..metrics import ConfusionMatrix, TrimapAccuracy, scores_from_confusion
from .distributed import all_reduce_sum, is_main_process, rank_and_world

DEFAULT_TRIMAP_BANDS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)

Postprocess = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def has_crf(model: nn.Module) -> bool:
    """Whether ``model`` is a CNN+CRF model: a ``crf`` submodule and ``forward(image, use_crf)``."""
    return isinstance(getattr(model, "crf", None), nn.Module)


def _forward(model: nn.Module, image: torch.Tensor, use_crf: bool) -> torch.Tensor:
    return model(image, use_crf=use_crf) if has_crf(model) else model(image)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    image: torch.Tensor,
    *,
    use_crf: bool = True,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    postprocess: Postprocess | None = None,
) -> torch.Tensor:
    """Test-time prediction: average of softmax over scales (and flips), then post-processing.

    p(l | x) = (1/|S|) Σ_{s∈S} up(softmax(f(resize_s(x))))  (mirrored copies included when
    ``flip``); returns log p, or, with one scale and no flip, the network's logits unchanged.

    Args:
        model: ``forward(image (B, 3, H, W) in 0-255) -> (B, L, H, W)``; CNN+CRF models also get
            ``use_crf``.
        image: colour in 0-255.
        use_crf: run the model's own CRF (when it has one).
        scales: resize factors (> 0) of the input; logits are resized back bilinearly.
        flip: also average over the horizontally mirrored image.
        postprocess: ``postprocess(logits, image) -> logits`` applied last, e.g. a dense CRF.

    Returns:
        Logits or log-probabilities at the input resolution.

    Shape:
        image:  (B, 3, H, W)  colour in 0-255
        return: (B, L, H, W)
    """
    check_tensor(image, "image", ndim=4, layout="(B, 3, H, W)", floating=True)
    if image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W); got {tuple(image.shape)}")
    scales = tuple(float(s) for s in scales)
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"scales must be a non-empty list of positive factors; got {scales}")
    height, width = image.shape[-2:]
    if scales == (1.0,) and not flip:
        logits = _forward(model, image, use_crf).float()
    else:
        total = None
        for s in scales:
            size = (max(1, round(height * s)), max(1, round(width * s)))
            x = (
                image
                if size == (height, width)
                else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
            )
            views = [(x, False), (x.flip(-1), True)] if flip else [(x, False)]
            for view, mirrored in views:
                out = _forward(model, view, use_crf).float()
                if mirrored:
                    out = out.flip(-1)
                if out.shape[-2:] != (height, width):
                    out = F.interpolate(out, size=(height, width), mode="bilinear",
                                        align_corners=False)  # fmt: skip
                probs = out.softmax(1)
                total = probs if total is None else total + probs
        assert total is not None
        count = len(scales) * (2 if flip else 1)
        logits = (total / count).clamp_min(1e-12).log()
    if postprocess is not None:
        logits = postprocess(logits, image)
    return logits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    *,
    num_classes: int,
    use_crf: bool = True,
    postprocess: Postprocess | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    device: str | torch.device = "cpu",
    trimap_bands: Sequence[int] = DEFAULT_TRIMAP_BANDS,
    progress: bool = True,
    max_images: int | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Segmentation metrics of ``model`` on ``dataset`` (VOC protocol), one image at a time.

    IoU_c = TP_c / (TP_c + FP_c + FN_c) from the confusion matrix over all pixels of the set
    (label 255 ignored); mIoU averages over classes present in ground truth or predictions;
    trimap accuracy is the pixel accuracy within ``band`` pixels of a label boundary. Under
    ``torchrun`` each process evaluates every ``world``-th image and the counts are summed.

    Args:
        model: ``forward(image (B, 3, H, W) in 0-255) -> (B, L, H, W)``.
        dataset: yields ``(image (3, H, W) float 0-255, labels (H, W) int64)``.
        num_classes: number of classes L.
        use_crf: run the model's own CRF (CNN+CRF models).
        postprocess: ``postprocess(logits, image) -> logits`` (e.g. a dense CRF).
        scales: test-time resize factors (probabilities averaged).
        flip: also average over mirrored images.
        device: where to run.
        trimap_bands: band half-widths in pixels for trimap accuracy.
        progress: show a tqdm progress bar (stderr).
        max_images: evaluate only the first this many images.
        class_names: names for ``per_class_iou`` keys (default: ``"0"``, ``"1"``, ...).

    Returns:
        ``{"miou", "pixel_accuracy", "mean_accuracy", "per_class_iou": {name: iou or None},
        "trimap_accuracy": {band: acc}, "seconds_per_image", "num_images",
        "confusion_matrix": L×L list}`` (IoU of a class absent from both is ``None``).

    Shape:
        image:  (3, H, W)  colour in 0-255 (per item)
        labels: (H, W)     int64, 255 = ignore
    """
    num_classes = check_int(num_classes, "num_classes", minimum=1)
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    if n == 0:
        raise ValueError("the evaluation dataset is empty")
    bands = tuple(int(b) for b in trimap_bands)
    if any(b < 0 for b in bands):
        raise ValueError(f"trimap_bands must be non-negative pixel widths; got {bands}")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(
            f"class_names must have num_classes={num_classes} entries; got {len(class_names)}"
        )
    dev = torch.device(device)
    rank, world = rank_and_world()
    was_training = model.training
    model.to(dev).eval()
    conf = ConfusionMatrix(num_classes)
    trimap = TrimapAccuracy(bands) if bands else None
    seconds = torch.zeros((), dtype=torch.float64)
    indices = range(rank, n, world)
    for i in tqdm(
        indices, desc="evaluate", unit="img", disable=not progress or not is_main_process()
    ):
        image, labels = dataset[i]
        image = torch.as_tensor(image)
        labels = torch.as_tensor(labels)
        if image.dim() != 3 or image.shape[0] != 3 or labels.shape != image.shape[1:]:
            raise ValueError(
                f"dataset item {i} must be (image (3, H, W), labels (H, W)); got "
                f"{tuple(image.shape)} and {tuple(labels.shape)}"
            )
        x = image[None].to(dev, torch.float32)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        logits = predict_logits(
            model, x, use_crf=use_crf, scales=scales, flip=flip, postprocess=postprocess
        )
        pred = logits.argmax(1)[0].cpu()
        seconds += time.perf_counter() - t0
        if logits.shape[1] != num_classes:
            raise ValueError(
                f"the model predicts {logits.shape[1]} classes but num_classes is {num_classes}"
            )
        labels = labels.to(torch.int64)
        conf.update(pred, labels)
        if trimap is not None:
            trimap.update(pred, labels)
    # Counts live on the CPU; all_reduce_sum carries them through the backend's device.
    conf.matrix = all_reduce_sum(conf.matrix)
    seconds = all_reduce_sum(seconds)
    trimap_acc: dict[str, float | None] = {}
    if trimap is not None:
        trimap.correct = all_reduce_sum(trimap.correct)
        trimap.total = all_reduce_sum(trimap.total)
        trimap_acc = {str(b): _nan_to_none(v) for b, v in trimap.compute().items()}
    if was_training:
        model.train()
    return {
        **metrics_from_confusion(conf.matrix, class_names),
        "trimap_accuracy": trimap_acc,
        "seconds_per_image": float(seconds) / n,
        "num_images": n,
    }


def _nan_to_none(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def metrics_from_confusion(
    conf: torch.Tensor, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """mIoU, pixel accuracy, mean class accuracy and per-class IoU from a confusion matrix.

    IoU_c = C[c, c] / (Σ_p C[c, p] + Σ_t C[t, c] − C[c, c]) (see
    :func:`deepcrf.metrics.scores_from_confusion`); undefined values are ``None`` (JSON null).

    Shape:
        conf: (L, L) counts, rows = ground truth, columns = prediction
    """
    scores = scores_from_confusion(conf)
    per_class = scores["per_class_iou"]
    names = (
        list(class_names) if class_names is not None else [str(c) for c in range(len(per_class))]
    )
    return {
        "miou": _nan_to_none(scores["miou"]),
        "pixel_accuracy": _nan_to_none(scores["pixel_accuracy"]),
        "mean_accuracy": _nan_to_none(scores["mean_accuracy"]),
        "per_class_iou": {n: _nan_to_none(v) for n, v in zip(names, per_class, strict=True)},
        "confusion_matrix": conf.to(torch.int64).cpu().tolist(),
    }
