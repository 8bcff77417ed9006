"""Segmentation metrics: confusion matrix, mIoU, pixel/mean accuracy and trimap accuracy.

PASCAL VOC's measure (Everingham et al.) is the intersection over union per class,
IoU_c = TP_c / (TP_c + FP_c + FN_c), accumulated over the whole dataset (not averaged per
image), then averaged over classes: mIoU. Pixels labelled ``ignore_index`` (VOC's void band)
count nowhere.

Conventions:
    * confusion matrix rows are ground-truth classes, columns predicted classes;
    * a class absent from both ground truth and predictions has an undefined IoU: it is
      reported as ``None`` in ``per_class_iou`` and left out of the mean (so a 2-class
      debugging set does not get 19 free zeros or ones); likewise ``mean_accuracy`` averages
      only over classes that occur in the ground truth;
    * the trimap band (Chen et al. 2015, DeepLab v1, Sec. 5 "Boundary localization") is every
      pixel within a Chebyshev distance ``band_width`` of a boundary pixel, where boundary
      pixels are void pixels (VOC draws a ~5 px void band along object outlines) and both
      pixels of every pair of non-void 4-neighbours with different labels (outlines that VOC
      left without a void band, and every outline in void-free data). Void pixels
      themselves are never scored.

Everything works on CPU or GPU tensors; accumulators keep their matrix on the device of the
first update so that the engine can ``torch.distributed.all_reduce`` it under DDP.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ._checks import check_int, check_tensor

IGNORE_INDEX = 255
"""The label of pixels that are not scored or trained on (VOC's object boundaries, "unsure")."""


def _as_int(value: object) -> int | None:
    """``value`` as an int if it is an integer type (int, numpy or 0-d torch integer), else None."""
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _check_label_map(x: object, name: str) -> torch.Tensor:
    t = check_tensor(x, name, layout="(B, H, W) or (H, W)")
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must be (B, H, W) or (H, W) labels; got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class ids; got dtype {t.dtype}")
    return t


def _check_label_maps(pred: torch.Tensor, target: torch.Tensor) -> None:
    _check_label_map(pred, "pred")
    _check_label_map(target, "target")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape; got pred {tuple(pred.shape)} and "
            f"target {tuple(target.shape)}"
        )
    if pred.device != target.device:
        raise ValueError(
            f"pred and target must be on the same device; got {pred.device} and {target.device}"
        )


def _check_labels(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int
) -> None:
    _check_label_maps(pred, target)
    num_classes = check_int(num_classes, "num_classes", minimum=1)
    valid = target != ignore_index
    bad_target = valid & ((target < 0) | (target >= num_classes))
    if bool(bad_target.any()):
        values = torch.unique(target[bad_target]).tolist()[:10]
        raise ValueError(
            f"target labels must be in [0, {num_classes}) or {ignore_index} (ignore); "
            f"found {values}"
        )
    bad_pred = valid & ((pred < 0) | (pred >= num_classes))
    if bool(bad_pred.any()):
        values = torch.unique(pred[bad_pred]).tolist()[:10]
        raise ValueError(
            f"pred labels must be in [0, {num_classes}) where target is not ignored; found {values}"
        )


def _confusion(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int
) -> torch.Tensor:
    cells = num_classes * num_classes
    index = target.to(torch.int64) * num_classes + pred.to(torch.int64)
    # Ignored pixels go to an extra bin that is dropped: no boolean-mask gather (a host sync
    # and a copy on GPU) and no dependence on what pred holds there.
    index = torch.where(target == ignore_index, cells, index)
    counts = torch.bincount(index.reshape(-1), minlength=cells + 1)
    return counts[:cells].reshape(num_classes, num_classes)


def confusion_matrix(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Count pixels by (true class, predicted class), skipping ``ignore_index`` targets.

    ``M[t, p]`` = number of pixels with ground truth ``t`` predicted as ``p``.

    Args:
        pred: predicted class ids (e.g. ``logits.argmax(1)``).
        target: ground-truth class ids, ``ignore_index`` = not scored.
        num_classes: number of classes ``L``.
        ignore_index: label value excluded from the counts.

    Shape:
        pred:   (B, H, W) or (H, W) integer, in [0, L) wherever target is not ignored
        target: same shape as pred, in [0, L) or ignore_index
        return: (L, L) int64 on pred's device

    Raises:
        ValueError: shapes differ, or a label lies outside ``[0, L)`` (other than ignored).
        TypeError: a floating-point or bool label tensor.

    Example:
        >>> confusion_matrix(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]), 2).tolist()
        [[1, 1], [0, 0]]
    """
    _check_labels(pred, target, num_classes, ignore_index)
    return _confusion(pred, target, num_classes, ignore_index)


def scores_from_confusion(matrix: torch.Tensor) -> dict[str, object]:
    """Turn a confusion matrix into VOC's scores.

    IoU_c = M[c, c] / (Σ_p M[c, p] + Σ_t M[t, c] − M[c, c]); pixel accuracy = trace / total;
    class accuracy_c = M[c, c] / Σ_p M[c, p].

    Args:
        matrix: confusion matrix, rows = ground truth, columns = prediction.

    Shape:
        matrix: (L, L) non-negative counts

    Returns:
        ``{"miou", "pixel_accuracy", "mean_accuracy"}`` as floats in [0, 1] (NaN when nothing
        was counted) and ``"per_class_iou"``: a list of L floats, ``None`` for classes absent
        from both ground truth and predictions (excluded from ``miou``).
    """
    check_tensor(matrix, "matrix", ndim=2, layout="(L, L)")
    if matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square (L, L); got {tuple(matrix.shape)}")
    m = matrix.detach().to("cpu", torch.float64)
    tp = m.diagonal()
    gt = m.sum(1)
    predicted = m.sum(0)
    union = gt + predicted - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    total = m.sum()
    nan = float("nan")
    has_gt = gt > 0
    return {
        "miou": float(iou[present].mean()) if bool(present.any()) else nan,
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else nan,
        "mean_accuracy": float((tp[has_gt] / gt[has_gt]).mean()) if bool(has_gt.any()) else nan,
        "per_class_iou": [float(v) if ok else None for v, ok in zip(iou, present, strict=True)],
    }


class ConfusionMatrix:
    """Accumulate a confusion matrix over a dataset and report mIoU, pixel and mean accuracy.

    Args:
        num_classes: number of classes ``L``.
        ignore_index: ground-truth label excluded from every score.

    Attributes:
        matrix: ``(L, L)`` int64 counts, rows = ground truth. It lives on the device of the first
            ``update``; under DDP call :meth:`all_reduce` (or ``torch.distributed.all_reduce``
            on ``matrix``) before :meth:`compute`.

    Shape:
        update(pred, target): (B, H, W) or (H, W) integer class ids each

    Example:
        >>> cm = ConfusionMatrix(2)
        >>> cm.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 1], [0, 255]]))
        >>> round(cm.compute()["miou"], 4)
        0.5
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = check_int(num_classes, "num_classes", minimum=1)
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self._placed = False

    def reset(self) -> None:
        """Zero the counts (keeping the device)."""
        self.matrix = torch.zeros_like(self.matrix)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add the pixels of one batch (see :func:`confusion_matrix` for the checks)."""
        _check_labels(pred, target, self.num_classes, self.ignore_index)
        self._add(_confusion(pred, target, self.num_classes, self.ignore_index))

    def _add(self, counts: torch.Tensor) -> None:
        if not self._placed:
            self.matrix = self.matrix.to(counts.device)
            self._placed = True
        self.matrix += counts.to(self.matrix.device)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another accumulator's counts into this one (same ``num_classes``); returns self."""
        if not isinstance(other, ConfusionMatrix) or other.num_classes != self.num_classes:
            got = getattr(other, "num_classes", type(other).__name__)
            raise ValueError(
                f"can only merge a ConfusionMatrix with num_classes={self.num_classes}; got {got}"
            )
        self.matrix = self.matrix + other.matrix.to(self.matrix.device)
        return self

    def all_reduce(self, group: object | None = None) -> None:
        """Sum ``matrix`` over all DDP processes in place (no-op outside distributed runs).

        With the NCCL backend the matrix must be on the process's GPU: update with GPU tensors
        (or move ``matrix`` there) first.
        """
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM, group=group)

    def compute(self) -> dict[str, object]:
        """Scores of everything accumulated so far (see :func:`scores_from_confusion`)."""
        return scores_from_confusion(self.matrix)


def boundary_band(
    target: torch.Tensor, band_width: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """The trimap band: pixels within Chebyshev distance ``band_width`` of an object boundary.

    Boundary pixels are the ``ignore_index`` (void) pixels and both pixels of every pair of
    non-void 4-neighbours whose labels differ; the band is their dilation by a
    ``(2 * band_width + 1)`` square (max pooling, separable). Void pixels are removed from the
    band, since they are never scored. The image border is not a boundary.

    Args:
        target: ground-truth labels.
        band_width: half-width of the band in pixels (0 = the boundary pixels themselves).
        ignore_index: void label.

    Shape:
        target: (B, H, W) or (H, W) integer
        return: bool, same shape as target
    """
    _check_label_map(target, "target")
    if isinstance(band_width, bool) or _as_int(band_width) is None or band_width < 0:
        raise ValueError(f"band_width must be a non-negative int (pixels); got {band_width!r}")
    t = target if target.dim() == 3 else target[None]
    (out,) = _bands(t, [int(band_width)], ignore_index)
    return out if target.dim() == 3 else out[0]


def _bands(t: torch.Tensor, widths: list[int], ignore_index: int) -> list[torch.Tensor]:
    """Trimap bands of ``t`` (B, H, W) for each width, sharing the dilation work between them."""
    void = t == ignore_index
    valid = ~void
    edge = void.clone()
    # A change into void is not a boundary of its own: the void pixel already is one, and
    # counting its neighbours would widen the band around void by a pixel.
    horizontal = (t[:, :, 1:] != t[:, :, :-1]) & valid[:, :, 1:] & valid[:, :, :-1]
    vertical = (t[:, 1:, :] != t[:, :-1, :]) & valid[:, 1:, :] & valid[:, :-1, :]
    edge[:, :, 1:] |= horizontal
    edge[:, :, :-1] |= horizontal
    edge[:, 1:, :] |= vertical
    edge[:, :-1, :] |= vertical
    # Chebyshev dilations compose (radius a then b = radius a + b), so the widths are visited in
    # increasing order, each dilating the previous band by the difference: the pooling work is
    # that of the widest band alone, not the sum over all widths.
    dilated = edge[:, None].to(torch.float32)
    done = 0
    bands: dict[int, torch.Tensor] = {}
    for width in sorted(set(widths)):
        step = width - done
        if step > 0:
            k = 2 * step + 1
            # max_pool2d pads with -inf, so the image border does not create boundary pixels.
            dilated = F.max_pool2d(dilated, (1, k), stride=1, padding=(0, step))
            dilated = F.max_pool2d(dilated, (k, 1), stride=1, padding=(step, 0))
            done = width
        bands[width] = (dilated[:, 0] > 0) & valid
    return [bands[w] for w in widths]


def trimap_accuracy(
    pred: torch.Tensor,
    target: torch.Tensor,
    band_width: int,
    ignore_index: int = IGNORE_INDEX,
) -> float:
    """Pixel accuracy inside the trimap band around object boundaries (DeepLab v1, Fig. 5).

    accuracy = #{i in band : pred_i = target_i} / #band, with the band of
    :func:`boundary_band`. NaN when the band is empty.

    Args:
        pred: predicted class ids.
        target: ground-truth class ids, ``ignore_index`` = void.
        band_width: band half-width in pixels.
        ignore_index: void label.

    Shape:
        pred, target: (B, H, W) or (H, W) integer, same shape
        return: float in [0, 1]

    Example:
        >>> target = torch.tensor([[0, 0, 0, 1, 1, 1]])
        >>> trimap_accuracy(torch.tensor([[0, 0, 1, 1, 1, 0]]), target, band_width=1)
        0.75
    """
    _check_label_maps(pred, target)
    band = boundary_band(target, band_width, ignore_index)
    total = int(band.sum())
    if total == 0:
        return float("nan")
    return int((band & (pred == target)).sum()) / total


class TrimapAccuracy:
    """Accumulate trimap pixel accuracy (and a confusion matrix) per band width over a dataset.

    Args:
        band_widths: band half-widths in pixels, e.g. ``range(1, 41, 4)``.
        num_classes: when given, also keep a confusion matrix per band so that ``compute``
            reports mIoU within the band (DeepLab v1, Fig. 5c).
        ignore_index: void label.

    Attributes:
        correct, total: ``(len(band_widths),)`` int64 counts (on the first update's device);
            sum them across DDP processes with :meth:`all_reduce`.

    Shape:
        update(pred, target): (B, H, W) or (H, W) integer class ids each
    """

    def __init__(
        self,
        band_widths: Iterable[int],
        *,
        num_classes: int | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        widths = list(band_widths)
        if not widths or any(isinstance(w, bool) or _as_int(w) is None or w < 0 for w in widths):
            raise ValueError(
                f"band_widths must be a non-empty list of non-negative ints; got {widths!r}"
            )
        self.band_widths = [int(w) for w in widths]
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        n = len(self.band_widths)
        self.correct = torch.zeros(n, dtype=torch.int64)
        self.total = torch.zeros(n, dtype=torch.int64)
        self.matrices = (
            [ConfusionMatrix(num_classes, ignore_index) for _ in self.band_widths]
            if num_classes is not None
            else None
        )

    def reset(self) -> None:
        """Zero all counts."""
        self.correct = torch.zeros_like(self.correct)
        self.total = torch.zeros_like(self.total)
        for cm in self.matrices or ():
            cm.reset()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch; the bands are computed on ``target``'s device, widest last."""
        if self.num_classes is not None:
            _check_labels(pred, target, self.num_classes, self.ignore_index)
        else:
            _check_label_maps(pred, target)
        if self.correct.device != target.device:
            self.correct = self.correct.to(target.device)
            self.total = self.total.to(target.device)
        hit = pred == target
        t = target if target.dim() == 3 else target[None]
        bands = _bands(t, self.band_widths, self.ignore_index)
        for k, band in enumerate(bands):
            band = band if target.dim() == 3 else band[0]
            self.correct[k] += (band & hit).sum()
            self.total[k] += band.sum()
            if self.matrices is not None:
                # Outside the band the target is treated as ignored.
                masked = torch.where(band, target, torch.full_like(target, self.ignore_index))
                cm = self.matrices[k]
                cm._add(_confusion(pred, masked, cm.num_classes, cm.ignore_index))

    def all_reduce(self, group: object | None = None) -> None:
        """Sum the counts over all DDP processes in place (no-op outside distributed runs)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.correct, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(self.total, op=dist.ReduceOp.SUM, group=group)
            for cm in self.matrices or ():
                cm.all_reduce(group)

    def compute(self) -> dict[int, float]:
        """Pixel accuracy in each band: ``{band_width: accuracy}`` (NaN for an empty band)."""
        correct = self.correct.cpu().tolist()
        total = self.total.cpu().tolist()
        return {
            w: (c / t if t > 0 else float("nan"))
            for w, c, t in zip(self.band_widths, correct, total, strict=True)
        }

    def compute_miou(self) -> dict[int, float]:
        """Mean IoU in each band: ``{band_width: miou}``; needs ``num_classes`` at construction."""
        if self.matrices is None:
            raise ValueError("TrimapAccuracy(num_classes=None) keeps no confusion matrices")
        pairs = zip(self.band_widths, self.matrices, strict=True)
        return {w: float(cm.compute()["miou"]) for w, cm in pairs}


# ------------------------------------------------------------------------------------------
# volumes (and any N-d label map): Dice and accuracy near boundaries in physical units
# ------------------------------------------------------------------------------------------


def _as_numpy_labels(x: object, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be a non-empty integer label map; got {arr.dtype}{arr.shape}")
    return arr


def dice_scores(
    pred: object, target: object, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> list[float | None]:
    """Dice per class, 2|P ∩ T| / (|P| + |T|), over all points; None when the class is absent.

    Args:
        pred: predicted class ids (numpy array or tensor).
        target: ground-truth class ids; ``ignore_index`` points count nowhere.
        num_classes: number of classes C.
        ignore_index: void label.

    Shape:
        pred, target: any shape, the same (e.g. (D, H, W))
        return: C entries

    Example:
        >>> dice_scores(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), 2)
        [0.6666666666666666, 0.8]
    """
    p, t = _as_numpy_labels(pred, "pred"), _as_numpy_labels(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} must have the same shape")
    valid = t != ignore_index
    p, t = p[valid], t[valid]
    out: list[float | None] = []
    for c in range(num_classes):
        a, b = p == c, t == c
        total = int(a.sum()) + int(b.sum())
        out.append(2.0 * int((a & b).sum()) / total if total else None)
    return out


def surface_band(
    target: object, width: float, spacing: Iterable[float] | None = None
) -> np.ndarray:
    """Points within Euclidean distance ``width`` (physical units) of a label boundary.

    Boundary points are both points of every pair of axis neighbours with different labels
    (the border of the array is not a boundary); distances use the voxel ``spacing`` per axis
    (default 1), so on a volume with thick slices the band is thinner in slices across.

    Shape:
        target: (*S) integer, any number of dims
        return: (*S) bool
    """
    from scipy.ndimage import distance_transform_edt

    t = _as_numpy_labels(target, "target")
    if not (np.isfinite(width) and width >= 0):
        raise ValueError(f"width must be a finite non-negative distance; got {width!r}")
    sampling = None if spacing is None else [float(s) for s in spacing]
    if sampling is not None and (len(sampling) != t.ndim or min(sampling) <= 0):
        raise ValueError(f"spacing must be {t.ndim} positive voxel sizes; got {spacing!r}")
    edge = np.zeros(t.shape, bool)
    for axis in range(t.ndim):
        lo = [slice(None)] * t.ndim
        hi = [slice(None)] * t.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        diff = t[tuple(lo)] != t[tuple(hi)]
        edge[tuple(lo)] |= diff
        edge[tuple(hi)] |= diff
    if not edge.any():
        return edge
    return distance_transform_edt(~edge, sampling=sampling) <= width


def band_accuracy(
    pred: object, target: object, width: float, spacing: Iterable[float] | None = None
) -> float:
    """Accuracy within :func:`surface_band` (the 3-D analogue of the trimap); NaN if empty."""
    p, t = _as_numpy_labels(pred, "pred"), _as_numpy_labels(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} must have the same shape")
    band = surface_band(t, width, spacing)
    total = int(band.sum())
    return float("nan") if total == 0 else int((p[band] == t[band]).sum()) / total
