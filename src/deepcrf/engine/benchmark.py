"""Timing of the dense CRF against pydensecrf on generated inputs (``deepcrf benchmark``).

Each size gets a synthetic image (smooth colour regions plus noise, uint8) and random unary
probabilities; both implementations run the same model (Potts, bilateral θα=80, θβ=13, w=10;
spatial θγ=3, w=3; ``iters`` mean-field iterations, pydensecrf's set-up included) and the best of
``repeats`` wall-clock times is reported with the ratio deepcrf / pydensecrf and the fraction of
pixels whose argmax labels agree. Numbers depend on the machine and its load: they are measured,
never asserted.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from deepcrf._checks import check_int

PARAMS = {"theta_alpha": 80.0, "theta_beta": 13.0, "theta_gamma": 3.0, "w_bilateral": 10.0,
          "w_spatial": 3.0}  # fmt: skip


def parse_size(text: str) -> tuple[int, int]:
    """``"375x500"`` → ``(375, 500)`` (height x width, in pixels)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"size must be HEIGHTxWIDTH in pixels, e.g. 375x500; got {text!r}")
    return int(parts[0]), int(parts[1])


def synthetic_inputs(
    height: int, width: int, num_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """An (H, W, 3) uint8 image of noisy colour blocks and (L, H, W) float32 probabilities."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, size=(max(1, height // 32) + 1, max(1, width // 32) + 1, 3))
    rows = np.minimum(np.arange(height) // 32, cells.shape[0] - 1)
    cols = np.minimum(np.arange(width) // 32, cells.shape[1] - 1)
    image = cells[rows][:, cols].astype(np.float64) + rng.normal(0, 10, size=(height, width, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    logits = rng.normal(0, 1, size=(num_classes, height, width)).astype(np.float32)
    probs = np.exp(logits - logits.max(0, keepdims=True))
    return image, (probs / probs.sum(0, keepdims=True)).astype(np.float32)


def _best_time(fn: Any, repeats: int, sync: Any) -> tuple[float, Any]:
    out = fn()  # warm-up (allocations, lazy imports, CUDA kernels)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _run_pydensecrf(dcrf: Any, image: np.ndarray, probs: np.ndarray, iters: int) -> np.ndarray:
    """Run pydensecrf on the same model: set-up plus ``iters`` iterations; returns Q (L, H, W)."""
    num_classes, height, width = probs.shape
    d = dcrf.DenseCRF2D(width, height, num_classes)  # pydensecrf takes (W, H)
    d.setUnaryEnergy(np.ascontiguousarray(-np.log(probs).reshape(num_classes, -1)))
    d.addPairwiseGaussian(sxy=PARAMS["theta_gamma"], compat=PARAMS["w_spatial"])
    d.addPairwiseBilateral(
        sxy=PARAMS["theta_alpha"],
        srgb=PARAMS["theta_beta"],
        rgbim=np.ascontiguousarray(image),
        compat=PARAMS["w_bilateral"],
    )
    return np.array(d.inference(iters)).reshape(num_classes, height, width)


def _pydensecrf() -> Any:
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        return None
    return dcrf


def benchmark_dense_crf(
    sizes: Sequence[tuple[int, int]],
    *,
    num_classes: int = 21,
    iters: int = 5,
    repeats: int = 3,
    device: str | torch.device = "cpu",
    use_pydensecrf: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Time :func:`deepcrf.crf.dense.dense_crf` (and pydensecrf when importable) per image size.

    Args:
        sizes: ``(height, width)`` pairs in pixels.
        num_classes: number of labels L.
        iters: mean-field iterations.
        repeats: timed runs per size after one warm-up; the minimum is reported.
        device: where deepcrf runs (pydensecrf is CPU only).
        use_pydensecrf: also time pydensecrf if it is installed.
        progress: progress bar on stderr.

    Returns:
        ``{"device", "num_classes", "iters", "repeats", "params", "pydensecrf": bool,
        "results": [{"height", "width", "deepcrf_s", "pydensecrf_s", "ratio", "agreement"}]}``;
        the pydensecrf fields are ``None`` without it.
    """
    from ..crf.dense import dense_crf

    repeats = check_int(repeats, "repeats", minimum=1)
    if not sizes:
        raise ValueError("sizes must list at least one HEIGHTxWIDTH")
    dev = torch.device(device)
    dcrf = _pydensecrf() if use_pydensecrf else None

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    results = []
    for height, width in tqdm(sizes, desc="benchmark", unit="size", disable=not progress):
        image, probs = synthetic_inputs(height, width, num_classes)
        logits = torch.from_numpy(np.log(probs))[None].to(dev)
        img = torch.from_numpy(image.transpose(2, 0, 1).copy())[None].float().to(dev)
        with torch.no_grad():
            ours_s, q = _best_time(
                lambda logits=logits, img=img: dense_crf(logits, img, iters=iters, **PARAMS),
                repeats, sync,
            )  # fmt: skip
        ours = q.argmax(1)[0].cpu().numpy()
        row: dict[str, Any] = {"height": height, "width": width, "deepcrf_s": ours_s,
                               "pydensecrf_s": None, "ratio": None, "agreement": None}  # fmt: skip
        if dcrf is not None:
            peer = functools.partial(_run_pydensecrf, dcrf, image, probs, iters)
            peer_s, peer_q = _best_time(peer, repeats, lambda: None)
            row.update(
                pydensecrf_s=peer_s,
                ratio=ours_s / peer_s,
                agreement=float((peer_q.argmax(0) == ours).mean()),
            )
        results.append(row)
    return {
        "device": str(dev),
        "num_classes": num_classes,
        "iters": iters,
        "repeats": repeats,
        "params": dict(PARAMS),
        "pydensecrf": dcrf is not None,
        "results": results,
    }
