"""Cross-validation of the dense CRF's parameters on held-out images (DeepLab v1, Sec. 4.1).

Chen et al. fix the smoothness kernel (w_spatial = 3, θγ = 3) and search the appearance kernel's
weight w_bilateral and bandwidths θα (pixels) and θβ (colour units) on a small held-out set
(100 VOC val images), coarse to fine: a first grid (w_bilateral ∈ [5, 10], θα ∈ [50 : 10 : 100],
θβ ∈ [3 : 6] in the paper), then finer steps around the best values. mIoU after 10 mean-field
iterations is the criterion. The network's unaries are computed once per image and reused by
every trial.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from deepcrf._checks import check_int

from ..metrics import ConfusionMatrix
from ..ops import native
from .config import DEEPLAB_GRID, TUNABLE
from .evaluation import predict_logits

# Pixels per engine call of the grid search (images of one size, at least one): the lattices
# of about this many pixels stay in a core's 2 MB L2 cache. Measured on the built-in 96×96
# images: one image per call with the weights as label blocks ran the README example 2.3x
# faster than eight images per call and one weight at a time (benchmarks/RESULTS.md).
_CALL_PIXELS = 16384


def refine_grid(grid: Mapping[str, Sequence[float]], best: Mapping[str, float]) -> dict:
    """The next, finer grid around ``best`` (coarse-to-fine search).

    For each searched parameter: the best value and the midpoints towards its neighbours in the
    previous grid (half the step); fixed parameters stay fixed.

    Example:
        >>> refine_grid({"w": [3.0, 4.0, 5.0]}, {"w": 4.0})
        {'w': [3.5, 4.0, 4.5]}
    """
    out: dict[str, list[float]] = {}
    for name, values in grid.items():
        vals = sorted({float(v) for v in values})
        b = float(best[name])
        if len(vals) < 2:
            out[name] = [b]
            continue
        i = vals.index(b)
        candidates = {b}
        if i > 0:
            candidates.add((vals[i - 1] + b) / 2)
        if i < len(vals) - 1:
            candidates.add((vals[i + 1] + b) / 2)
        out[name] = sorted(candidates)
    return out


@torch.no_grad()
def tune_dense_crf(
    model: nn.Module,
    dataset: Any,
    *,
    num_classes: int,
    grid: Mapping[str, Sequence[float]] | None = None,
    iters: int = 10,
    rounds: int = 2,
    use_crf: bool = False,
    max_images: int | None = 100,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Grid-search dense-CRF post-processing parameters by mIoU on ``dataset`` (coarse to fine).

    For every point of the grid, Q = dense_crf(unary, image; θ) with ``iters`` mean-field
    iterations, prediction argmax Q, and mIoU over all held-out pixels; the next round searches
    :func:`refine_grid` around the best point. Unaries (log-probabilities) are computed once and
    kept in float16 on the CPU (L·H·W·2 bytes per image).

    Args:
        model: the network (its own CRF, if any, is bypassed unless ``use_crf``).
        dataset: yields ``(image (3, H, W) 0-255, labels (H, W) int64)``.
        num_classes: number of classes L.
        grid: ``{param: values}`` over :data:`TUNABLE`; missing ones use :data:`DEEPLAB_GRID`.
        iters: mean-field iterations per trial.
        rounds: 1 = the grid only; each further round refines around the best point.
        use_crf: let a CNN+CRF model run its own CRF before the post-processing one.
        max_images: use the first this many images (DeepLab: 100).
        device: where to run.
        progress: progress bars on stderr.

    Returns:
        ``{"best": {"params": {...}, "miou", "pixel_accuracy"}, "baseline_miou" (no CRF),
        "trials": [{"round", "params", "miou", "pixel_accuracy"}], "num_images", "seconds"}``.

    Shape:
        image:  (3, H, W)  colour in 0-255 (per item)
        labels: (H, W)     int64, 255 = ignore
    """
    unknown = sorted(set(grid or {}) - set(TUNABLE))
    if unknown:
        raise ValueError(f"unknown grid parameters {unknown}; tunable: {', '.join(TUNABLE)}")
    full = {k: [float(v) for v in (grid or {}).get(k, DEEPLAB_GRID[k])] for k in TUNABLE}
    for name, values in full.items():
        if not values or any(not v > 0 for v in values):
            raise ValueError(
                f"grid {name} must be a non-empty list of positive values; got {values}"
            )
    rounds = check_int(rounds, "rounds", minimum=1)
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    if n == 0:
        raise ValueError("the held-out dataset for tuning is empty")
    dev = torch.device(device)
    model.to(dev).eval()
    t0 = time.perf_counter()
    cache = []
    baseline = ConfusionMatrix(num_classes)
    for i in tqdm(range(n), desc="unaries", unit="img", disable=not progress):
        image, labels = dataset[i]
        x = torch.as_tensor(image)[None].float()
        unary = predict_logits(model, x.to(dev), use_crf=use_crf).log_softmax(1)
        labels = torch.as_tensor(labels).to(torch.int64)
        baseline.update(unary.argmax(1)[0].cpu(), labels)
        cache.append((x.to(torch.uint8), unary.to("cpu", torch.float16), labels))

    # Images of one size are filtered as one batch of about _CALL_PIXELS pixels.
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, (image, _, _) in enumerate(cache):
        by_size.setdefault(tuple(image.shape), []).append(i)
    groups = []
    for shape, idx in by_size.items():
        per = max(1, _CALL_PIXELS // (shape[-2] * shape[-1]))
        groups += [idx[k : k + per] for k in range(0, len(idx), per)]
    trials: list[dict[str, Any]] = []
    seen: set[tuple[float, ...]] = set()
    best: dict[str, Any] | None = None
    current = full
    for round_index in range(int(rounds)):
        points = [p for p in itertools.product(*(current[k] for k in TUNABLE)) if p not in seen]
        seen.update(points)
        bar = tqdm(
            total=len(points) * n, desc=f"tune-crf round {round_index + 1}", unit="img",
            disable=not progress,
        )  # fmt: skip
        # torch's per-image ops between kernel calls on one thread: its idle OpenMP workers
        # would spin on the cores the lattice kernel's threads need
        with native.torch_serial() if dev.type == "cpu" else contextlib.nullcontext():
            scores = _score_points(cache, groups, points, num_classes, iters, dev, bar)
        bar.close()
        for point in points:
            params = dict(zip(TUNABLE, point, strict=True))
            result = scores[point].compute()
            trial = {
                "round": round_index + 1,
                "params": params,
                "miou": float(result["miou"]),
                "pixel_accuracy": float(result["pixel_accuracy"]),
            }
            trials.append(trial)
            if best is None or trial["miou"] > best["miou"]:
                best = trial
        assert best is not None
        current = refine_grid(current, best["params"])
    assert best is not None
    return {
        "best": {
            "params": {**best["params"], "iters": int(iters)},
            "miou": best["miou"],
            "pixel_accuracy": best["pixel_accuracy"],
        },
        "baseline_miou": float(baseline.compute()["miou"]),
        "trials": trials,
        "num_images": n,
        "seconds": time.perf_counter() - t0,
    }


def _score_points(
    cache: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    groups: list[list[int]],
    points: list[tuple[float, ...]],
    num_classes: int,
    iters: int,
    dev: torch.device,
    bar: Any,
) -> dict[tuple[float, ...], ConfusionMatrix]:
    """Confusion matrices of every grid point: kernels built once per bandwidth setting.

    Points that share (θα, θβ, θγ) share the lattices and normalisations and differ only in
    the kernel weights: they run as one :func:`~deepcrf.ops.meanfield.sweep` (the weights side
    by side as label blocks of one mean-field loop) per batch of images.  On the CPU, batches
    of small images run on one Python thread per kernel thread, one kernel thread each (the
    counts are sums: the result does not depend on the order).
    """
    ia, ib, ig = (TUNABLE.index(k) for k in ("theta_alpha", "theta_beta", "theta_gamma"))
    by_bandwidth: dict[tuple[float, float, float], list[tuple[float, ...]]] = {}
    for p in points:
        by_bandwidth.setdefault((p[ia], p[ib], p[ig]), []).append(p)
    scores = {p: ConfusionMatrix(num_classes) for p in points}
    workers = native.threads() if dev.type == "cpu" and native.library() is not None else 1
    small = all(cache[i][0].shape[-2] * cache[i][0].shape[-1] <= _CALL_PIXELS
                for idx in groups for i in idx)  # fmt: skip
    if workers > 1 and small and len(groups) > 1:

        def one(idx: list[int]) -> dict[tuple[float, ...], ConfusionMatrix]:
            with native.kernel_threads(1):
                return _score_batch(cache, idx, by_bandwidth, num_classes, iters, dev)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = zip(groups, pool.map(one, groups), strict=True)
            for idx, part in results:
                for p in points:
                    scores[p].merge(part[p])
                bar.update(len(idx) * len(points))
        return scores
    for idx in groups:
        part = _score_batch(cache, idx, by_bandwidth, num_classes, iters, dev)
        for p in points:
            scores[p].merge(part[p])
        bar.update(len(idx) * len(points))
    return scores


def _score_batch(
    cache: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    idx: list[int],
    by_bandwidth: dict[tuple[float, float, float], list[tuple[float, ...]]],
    num_classes: int,
    iters: int,
    dev: torch.device,
) -> dict[tuple[float, ...], ConfusionMatrix]:
    """The confusion matrices of every grid point on the images ``idx`` (one size).

    ``by_bandwidth`` maps (θα, θβ, θγ) to the grid points with those bandwidths.
    """
    from ..crf.dense import bilateral_term, spatial_term
    from ..ops.meanfield import sweep

    iwb, iws = TUNABLE.index("w_bilateral"), TUNABLE.index("w_spatial")
    scores = {p: ConfusionMatrix(num_classes) for members in by_bandwidth.values() for p in members}
    images = torch.cat([cache[i][0] for i in idx]).to(dev).float()
    unary = torch.cat([cache[i][1] for i in idx]).to(dev).float()
    labels = torch.stack([cache[i][2] for i in idx])
    b, num, h, w = unary.shape
    base = unary.reshape(b, num, h * w).transpose(1, 2).reshape(b * h * w, num)
    spatial_by_gamma: dict[float, Any] = {}  # the grid usually fixes θγ: one lattice
    for (ta, tb, tg), members in by_bandwidth.items():
        if tg not in spatial_by_gamma:
            spatial_by_gamma[tg] = spatial_term(images, tg)
        terms = [bilateral_term(images, ta, tb), spatial_by_gamma[tg]]
        weights = torch.tensor([[p[iwb], p[iws]] for p in members], dtype=torch.float64)
        preds = sweep(base, terms, weights, iters).argmax(dim=-1).reshape(-1, b, h, w)
        for p, pred in zip(members, preds.cpu(), strict=True):
            scores[p].update(pred, labels)
    return scores
