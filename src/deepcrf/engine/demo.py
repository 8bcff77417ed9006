"""``deepcrf demo``: train a small CNN on the built-in synthetic data, then compare the CRFs.

One run, on the same validation images, of every structured model of the founding papers that
this installation has:

1. **CNN alone** — the ``small`` stride-8 atrous network trained from scratch (cross-entropy),
   evaluated without a CRF: the unary baseline.
2. **CNN + dense CRF (DeepLab v1)** — Chen et al. (2015): the same network, its logits refined by
   a fully connected CRF (Krähenbühl & Koltun 2011) used as post-processing, with parameters
   grid-searched on the held-out ``tune`` split (:func:`deepcrf.engine.tune.tune_dense_crf`).
3. **CRF-as-RNN** — Zheng et al. (2015): the CRF's mean-field iterations as layers, compatibility
   and kernel weights learned jointly with the network (``crf="dense-learnable"``).
4. **+ learned bandwidths** — Schwing & Urtasun (2015): also the kernel bandwidths θα, θβ, θγ
   (``crf="dense-bandwidths"``).
5. **Deep Gaussian CRF** — Chandra & Kokkinos (2016): quadratic energy, exact inference by
   conjugate gradient on the stride-8 grid (``small_gcrf``), trained end to end.
6. **Contextual CRF** — Lin et al. (2016): CNN pairwise potentials on a range-box graph,
   piecewise training (``small_contextual``).

Two control rows keep the comparison fair: **CNN alone (+N steps)**, the trained CNN trained for
exactly the end-to-end rows' N extra steps (same batch, network lr, optimiser, schedule and seed)
without a CRF, against which every end-to-end row is also judged; and **Contextual CRF: unary
only**, the contextual model's own prediction without pairwise messages.  The contextual CRF's
inference setting (``pairwise_mode``, ``pairwise_scale``) is chosen on the tune split, the
paper's ``("full", 1.0)`` among the candidates.

Every CRF row starts from a copy of the trained CNN's weights
and trains for a few more steps with its CRF in the loop.

Determinism: data are generated from fixed seeds, training seeds every RNG
(:func:`deepcrf.engine.fit`), evaluation has no randomness, and the run enables
``torch.use_deterministic_algorithms`` (restored afterwards).  Two runs on the same machine with
the same number of threads give the same numbers; a different thread count or CPU may change
the float summation order and hence the last digits.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepcrf._checks import check_int

__all__ = ["FULL", "QUICK", "DemoSettings", "run_demo"]


@dataclass(frozen=True)
class DemoSettings:
    """Sizes, steps and learning rates of one demo run.

    Args:
        size: synthetic image side in pixels.
        num_classes: classes including background (2-8).
        n_train: training images.
        n_val: validation images (every row is evaluated on all of them).
        n_tune: held-out images for the dense-CRF grid search.
        width: width of the ``small`` backbone (channels of its first level).
        unary_steps: optimiser steps of the CNN alone.
        batch_size: images per step of the CNN alone.
        lr: Adam learning rate of the CNN alone.
        crf_steps: joint (CNN + CRF) steps of each end-to-end CRF row.
        contextual_steps: piecewise steps of the contextual CRF's new head on the CNN's trunk.
        contextual_pairwise_steps: then steps of its pairwise nets alone with mean-field in
            the loss (everything else fixed, so its unary-only control is unchanged).
        contextual_pairwise_lr: Adam learning rate of those steps.
        contextual_candidates: ``(pairwise_mode, pairwise_scale)`` inference settings of the
            contextual CRF tried on the tune split (best mIoU kept; the paper's ``("full",
            1.0)`` first, so it wins ties).
        crf_batch_size: images per joint step.
        finetune_lr: Adam learning rate of the network during joint training.
        crf_lr: Adam learning rate of the CRF parameters during joint training.
        crf_train_iters: mean-field iterations while training (CRF-as-RNN: 5).
        crf_eval_iters: mean-field iterations at test time (CRF-as-RNN: 10).
        tune_grid: dense-CRF grid ``{param: values}`` searched on the tune split.
        tune_rounds: coarse-to-fine rounds of the grid search.
        trimap_bands: band half-widths (px) of the trimap curve.
        trimap_band: the band reported in the table.
        overlay_images: validation images drawn under every model.
        seed: base seed of data and training.
    """

    size: int = 96
    num_classes: int = 6
    n_train: int = 512
    n_val: int = 32
    n_tune: int = 8
    width: int = 16
    unary_steps: int = 400
    batch_size: int = 8
    lr: float = 3e-3
    crf_steps: int = 30
    contextual_steps: int = 300
    contextual_pairwise_steps: int = 100
    contextual_pairwise_lr: float = 1e-3
    contextual_candidates: tuple[tuple[str, float], ...] = (
        ("full", 1.0),
        ("full", 0.5),
        ("full", 0.3),
        ("full", 0.2),
        ("full", 0.1),
        ("interaction", 0.01),
        ("interaction", 0.03),
    )
    crf_batch_size: int = 4
    finetune_lr: float = 1e-4
    crf_lr: float = 1e-2
    crf_train_iters: int = 5
    crf_eval_iters: int = 10
    tune_grid: Mapping[str, Sequence[float]] = dataclasses.field(
        default_factory=lambda: {
            "w_bilateral": [4.0, 8.0],
            "theta_alpha": [10.0, 25.0],
            "theta_beta": [12.0, 30.0],
            "w_spatial": [3.0],
            "theta_gamma": [1.0],
        }
    )
    tune_rounds: int = 1
    trimap_bands: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16)
    trimap_band: int = 3
    overlay_images: int = 4
    seed: int = 0

    def check(self) -> DemoSettings:
        """Validate every field; returns ``self``."""
        for name in ("size", "n_train", "n_val", "n_tune", "width", "unary_steps", "batch_size",
                     "crf_steps", "contextual_steps", "contextual_pairwise_steps",
                     "crf_batch_size", "crf_train_iters",
                     "crf_eval_iters", "tune_rounds"):  # fmt: skip
            value = getattr(self, name)
            check_int(value, name, minimum=1)
        for name in ("lr", "finetune_lr", "crf_lr", "contextual_pairwise_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite positive number; got {value!r}")
        if not self.contextual_candidates or any(
            mode not in ("full", "interaction")
            or not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0)
            for mode, w in self.contextual_candidates
        ):
            raise ValueError(
                "contextual_candidates must be (mode in {'full', 'interaction'}, weight >= 0) "
                f"pairs; got {self.contextual_candidates!r}"
            )
        if not self.trimap_bands or any(int(b) < 0 for b in self.trimap_bands):
            raise ValueError(f"trimap_bands must be non-negative ints; got {self.trimap_bands}")
        if self.trimap_band not in self.trimap_bands:
            raise ValueError(
                f"trimap_band {self.trimap_band} must be one of trimap_bands {self.trimap_bands}"
            )
        if not 0 <= self.overlay_images <= self.n_val:
            raise ValueError(
                f"overlay_images must be in [0, n_val={self.n_val}]; got {self.overlay_images}"
            )
        return self


FULL = DemoSettings()
"""The full demo (75-85 s wall on two idle CPU cores in session 8; docs/demo.md)."""

QUICK = DemoSettings(
    n_train=256,
    n_val=8,
    n_tune=4,
    unary_steps=250,
    crf_steps=10,
    contextual_steps=150,
    contextual_pairwise_steps=50,
    crf_eval_iters=5,
    tune_grid={
        "w_bilateral": [4.0, 8.0],
        "theta_alpha": [10.0, 25.0],
        "theta_beta": [12.0],
        "w_spatial": [3.0],
        "theta_gamma": [1.0],
    },
    trimap_bands=(1, 2, 3, 4, 8),
    overlay_images=2,
)
"""``--quick``: a short real run (fewer images and steps; ~40 s): its rows differ and the CRF
rows beat the CNN, but by less than in the full demo."""

BASELINE = "CNN alone"
CONTEXTUAL_UNARY = "Contextual CRF: unary only"


def control_name(cfg: DemoSettings) -> str:
    """Name of the control row: the CNN alone trained for the joint rows' extra steps."""
    return f"CNN alone (+{cfg.crf_steps} steps)"


@dataclass(frozen=True)
class _Row:
    key: str
    name: str
    method: str


_ROWS: tuple[_Row, ...] = (
    _Row("unary", BASELINE, "the `small` stride-8 atrous CNN (Chen et al. 2015's "
         "architecture, scaled down), trained from scratch with cross-entropy; no CRF."),
    _Row("control", "CNN alone (+N steps)", "control for the end-to-end CRF rows: the trained "
         "CNN trained further for exactly their extra steps (same batch, network lr, Adam, "
         "schedule and seed), without a CRF."),
    _Row("dense", "CNN + dense CRF (DeepLab v1)", "Chen et al. 2015: the same CNN's logits "
         "refined by a fully connected CRF (Krähenbühl & Koltun 2011, permutohedral lattice) "
         "as post-processing; parameters grid-searched on the held-out tune split."),
    _Row("crfrnn", "CRF-as-RNN", "Zheng et al. 2015: mean-field iterations as recurrent "
         "layers; compatibility matrix and kernel weight matrices learned jointly with the CNN "
         "(initialised from the tuned DeepLab CRF)."),
    _Row("bandwidths", "+ learned bandwidths", "Schwing & Urtasun 2015: as CRF-as-RNN, and the "
         "kernel bandwidths θα, θβ, θγ learned too (exact gradients through the lattice)."),
    _Row("gcrf", "Deep Gaussian CRF", "Chandra & Kokkinos 2016: quadratic energy with "
         "pairwise terms from learned pixel embeddings, exact inference by conjugate gradient "
         "on the stride-8 grid, trained end to end."),
    _Row("contextual_unary", CONTEXTUAL_UNARY, "the trained contextual model's own unary "
         "prediction (`use_crf=False`): FeatMap-Net and the unary net, no pairwise messages; "
         "the control of the contextual CRF row."),
    _Row("contextual", "Contextual CRF (Lin et al.)", "Lin et al. 2016: pairwise potentials "
         "from a CNN on a range-box graph, piecewise training, mean-field inference."),
)  # fmt: skip


def _transfer_unary(
    dst: nn.Module, unary_state: Mapping[str, torch.Tensor], *, prefix: str = ""
) -> list[str]:
    """Copy the trained CNN's weights into ``dst``; returns the names left at initialisation.

    ``dst`` is a ``CRFSegmenter`` (the CNN is ``dst.model``) or a model whose CNN parameters
    have the CNN's names (``backbone.*``, ``head.*``, ``classifier.*``).  With ``prefix`` only
    the CNN's tensors whose names start with it are copied (e.g. ``"backbone."`` for a model
    that shares only the trunk).  Every copied tensor must find its place, with the same shape:
    anything else is a bug and raises.
    """
    state = {k: v for k, v in unary_state.items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"the trained CNN has no weights starting with {prefix!r}")
    target = dst.model if isinstance(getattr(dst, "model", None), nn.Module) else dst
    result = target.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(
            f"the trained CNN's weights {result.unexpected_keys[:5]} have no place in "
            f"{type(dst).__name__}; cannot start this row from the trained CNN"
        )
    return list(result.missing_keys)


def _select(row_model: nn.Module, use_crf: bool, postprocess: Callable | None) -> Callable:
    from .evaluation import predict_logits

    def predict(image: torch.Tensor) -> np.ndarray:
        logits = predict_logits(row_model, image[None], use_crf=use_crf, postprocess=postprocess)
        return logits.argmax(1)[0].to(torch.uint8).numpy()

    return predict


def _crf_stats(model: nn.Module) -> dict[str, Any]:
    """Learned CRF scalars worth printing (bandwidths, mean kernel weights)."""
    crf = getattr(model, "crf", None)
    out: dict[str, Any] = {}
    if crf is None:
        return out
    for name, tensor in crf.state_dict().items():
        if tensor.numel() == 1:
            value = float(tensor)
            out[name] = value
            if name.startswith("log_"):
                out[name[4:]] = math.exp(value)
    return out


def _seeded_create(seed: int, name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """``models.create`` with the initial weights drawn from ``seed``, not the global RNG.

    Without it, every process starts from different random weights and the demo's numbers
    change from run to run; ``fork_rng`` leaves the caller's RNG state untouched.
    """
    from .. import models

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.create(name, num_classes, **kwargs)


def run_demo(
    out_dir: str | os.PathLike[str],
    *,
    quick: bool = False,
    settings: DemoSettings | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train, compare every available CNN+CRF model, and write the report into ``out_dir``.

    Args:
        out_dir: output folder; ``results.json``, ``report.md``, ``trimap.png`` and
            ``overlays/*.png`` are written (atomically) into it.
        quick: use :data:`QUICK` instead of :data:`FULL` (ignored when ``settings`` is given).
        settings: explicit sizes and steps.
        progress: tqdm progress bars on stderr.
        log: where status lines and the final table go.

    Returns:
        ``{"rows": [...], "files": {...}, "seconds": float}``.
    """
    from ..data.synthetic import SyntheticSegmentation
    from ..data.synthetic import class_names as synthetic_class_names
    from . import report

    cfg = (settings or (QUICK if quick else FULL)).check()
    out = Path(out_dir)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    try:
        results = _DemoRun(cfg, SyntheticSegmentation, progress, log).run()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    seconds = time.perf_counter() - t_start
    cpu_seconds = time.process_time() - cpu_start
    meta = {
        "settings": dataclasses.asdict(cfg),
        "mode": "custom" if settings is not None else ("quick" if quick else "full"),
        "dense_crf_params": results.extras.get("dense_crf_params"),
        "learned_crf": results.extras.get("learned_crf"),
        "contextual_inference": results.extras.get("contextual_inference"),
        "total_seconds": seconds,
        "total_cpu_seconds": cpu_seconds,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    notes = _notes(cfg, results.extras, seconds, cpu_seconds)
    files = report.write_report(
        out,
        results.rows,
        baseline=BASELINE,
        images=results.images,
        labels=results.labels,
        predictions=results.predictions,
        meta=meta,
        intro=_intro(cfg),
        notes=notes,
        class_names=synthetic_class_names(cfg.num_classes),
    )
    log("")
    log(files["table"])
    log("")
    for verdict in files["verdicts"]:
        log("- " + verdict.replace("**", ""))
    log(f"\nreport: {files['report']}  ({seconds:.0f} s wall, {cpu_seconds:.0f} s CPU)")
    return {"rows": results.rows, "files": files, "seconds": seconds}


def _intro(cfg: DemoSettings) -> str:
    return (
        f"A `small` stride-8 CNN trained from scratch on {cfg.n_train} built-in synthetic "
        f"{cfg.size}×{cfg.size} images ({cfg.num_classes} classes: textured objects with thin "
        f"parts, occlusion, soft edges and noise on cluttered backgrounds; "
        f"`deepcrf.data.synthetic`), then each structured model evaluated on the same "
        f"{cfg.n_val} validation images. Numbers are fractions shown as percentages; "
        f"trimap accuracy is pixel accuracy within ±{cfg.trimap_band} px of a ground-truth "
        f"boundary."
    )


def _notes(
    cfg: DemoSettings, extras: Mapping[str, Any], seconds: float, cpu_seconds: float
) -> list[str]:
    notes = [
        f"The CNN alone trained {cfg.unary_steps} Adam steps of {cfg.batch_size} images "
        f"(lr {cfg.lr:g}, poly decay). Every end-to-end CRF row starts from a copy of it and "
        f"trains {cfg.crf_steps} more steps of {cfg.crf_batch_size} images with the CRF in the "
        f"loop (network lr {cfg.finetune_lr:g}, CRF lr {cfg.crf_lr:g}); the dense-CRF rows use "
        f"{cfg.crf_train_iters} mean-field iterations in training and {cfg.crf_eval_iters} at "
        f"test time, as CRF-as-RNN does (5 and 10). The control row `{control_name(cfg)}` "
        f"trains the same CNN copy for the same {cfg.crf_steps} steps, batch, network lr, "
        f"optimiser, schedule and seed without a CRF, so each end-to-end row's gain over it is "
        f"the CRF's and not the extra training's.",
        f"Budget rules: every row starts from the same trained CNN (or, for the contextual "
        f"CRF, its trunk); a row that trains more than the CNN alone is judged against a "
        f"control that trains exactly as much without the structured part: the end-to-end "
        f"rows (CRF-as-RNN, learned bandwidths, Deep G-CRF) against `{control_name(cfg)}`, the "
        f"contextual CRF ({cfg.contextual_steps} piecewise steps of its head on the fixed "
        f"trunk, then {cfg.contextual_pairwise_steps} steps of its pairwise nets alone) against "
        f"its own unary, which those last steps leave unchanged (every part of it is fixed, "
        f"BatchNorm statistics included); the dense CRF trains nothing and is tuned on the "
        f"separate tune split.",
        "Time per image is the wall time of the forward pass (network + CRF) measured by "
        "`deepcrf.engine.evaluate`, one image at a time on the CPU; on a shared or loaded "
        "machine it is noisy. Training seconds are wall time too.",
        f"This run took {seconds:.0f} s wall and {cpu_seconds:.0f} s of CPU time with "
        f"{torch.get_num_threads()} torch threads.",
        "Same seeds, same numbers: data, initialisation and batch order are seeded, evaluation "
        "is deterministic and `torch.use_deterministic_algorithms(True)` is on; another thread "
        "count or CPU can change float summation order and so the last digits.",
    ]
    if extras.get("dense_crf_params"):
        p = extras["dense_crf_params"]
        notes.append(
            "Dense-CRF parameters chosen on the tune split: "
            + ", ".join(f"{k}={v:g}" for k, v in p.items() if isinstance(v, (int, float)))
            + f" (tune-split mIoU {100 * extras['tune_miou']:.1f} with CRF vs "
            f"{100 * extras['tune_baseline_miou']:.1f} without)."
        )
    ctx = extras.get("contextual_inference")
    if ctx:
        tried = "; ".join(
            f"{t['pairwise_mode']} w={t['pairwise_scale']:g}: {100 * t['tune_miou']:.1f}"
            for t in ctx["trials"]
        )
        notes.append(
            f"Contextual CRF inference chosen on the tune split by mIoU: pairwise_mode="
            f"{ctx['pairwise_mode']}, pairwise_scale={ctx['pairwise_scale']:g} (tried {tried}; "
            f"unary only {100 * ctx['tune_unary_miou']:.1f}; the paper's inference is "
            f"full, w=1)."
        )
    return notes


@dataclass
class _Results:
    """What the rows produced: table rows, overlay inputs and predictions, and extras."""

    rows: list[dict[str, Any]]
    images: np.ndarray  # (N, H, W, 3) uint8, the overlay images
    labels: np.ndarray  # (N, H, W) uint8, their ground truth
    predictions: dict[str, np.ndarray]  # row name -> (N, H, W) uint8
    extras: dict[str, Any]


class _DemoRun:
    """One demo run: the data, then one method per row, each recording its evaluation."""

    def __init__(
        self, cfg: DemoSettings, dataset_cls: Any, progress: bool, log: Callable[[str], None]
    ) -> None:
        self.cfg, self.progress, self.log = cfg, progress, log
        data_kw = {"size": cfg.size, "seed": cfg.seed, "num_classes": cfg.num_classes}
        self.train = dataset_cls("train", cfg.n_train, **data_kw)
        self.val = dataset_cls("val", cfg.n_val, **data_kw)
        self.tune = dataset_cls("tune", cfg.n_tune, **data_kw)
        self.class_names = list(self.train.class_names)
        samples = [self.val.sample(i) for i in range(cfg.overlay_images)]
        self.results = _Results(
            rows=[],
            images=np.stack([s[0] for s in samples]) if samples else np.zeros((0, 1, 1, 3), "u1"),
            labels=np.stack([s[1] for s in samples]) if samples else np.zeros((0, 1, 1), "u1"),
            predictions={},
            extras={"learned_crf": {}},
        )  # fmt: skip
        self.overlay_inputs = [self.val[i][0] for i in range(cfg.overlay_images)]
        self.specs = {r.key: r for r in _ROWS}
        self.control = control_name(cfg)
        self.unary_state: dict[str, torch.Tensor] = {}
        self.dense_params: dict[str, Any] = {}

    def run(self) -> _Results:
        unary = self.cnn_alone()
        self.cnn_control()
        self.dense_crf(unary)
        self.end_to_end("crfrnn", "dense-learnable")
        self.end_to_end("bandwidths", "dense-bandwidths")
        self.gaussian_crf()
        self.contextual_crf()
        return self.results

    # -- shared steps -----------------------------------------------------------------------

    def record(
        self,
        spec: _Row,
        model: nn.Module,
        *,
        use_crf: bool,
        postprocess: Callable | None = None,
        train_seconds: float | None = None,
        note: str = "",
        name: str | None = None,
        controls: Sequence[str] = (),
    ) -> None:
        """Evaluate one row on the validation split; keep its metrics and overlay labels."""
        from .evaluation import evaluate

        cfg = self.cfg
        name = name or spec.name
        self.log(f"[demo] evaluating {name} on {cfg.n_val} validation images")
        result = evaluate(
            model, self.val, num_classes=cfg.num_classes, use_crf=use_crf,
            postprocess=postprocess, trimap_bands=cfg.trimap_bands, progress=self.progress,
            class_names=self.class_names,
        )  # fmt: skip
        curve = {int(b): v for b, v in result["trimap_accuracy"].items()}
        self.results.rows.append(
            {
                "name": name,
                "method": spec.method,
                "miou": result["miou"],
                "pixel_accuracy": result["pixel_accuracy"],
                "trimap_accuracy": curve[cfg.trimap_band],
                "trimap_band": cfg.trimap_band,
                "trimap_curve": curve,
                "seconds_per_image": result["seconds_per_image"],
                "train_seconds": train_seconds,
                "per_class_iou": result["per_class_iou"],
                "note": note,
                "controls": list(controls),
            }
        )
        predict = _select(model, use_crf, postprocess)
        with torch.no_grad():
            model.eval()
            self.results.predictions[name] = (
                np.stack([predict(x) for x in self.overlay_inputs])
                if self.overlay_inputs
                else np.zeros((0, 1, 1), np.uint8)
            )

    def fit(self, model: nn.Module, settings: Any) -> float:
        """Train ``model`` on the training split; returns the wall seconds."""
        from .train import fit

        return float(fit(model, self.train, settings, progress=self.progress)["seconds"])

    def joint_fit(self, model: nn.Module, stage: str = "joint") -> float:
        """The end-to-end rows' extra training; the control calls it with ``stage="unary"``.

        Every other setting is shared, so the control differs from the joint rows only by the
        absent CRF.
        """
        from .config import TrainSettings

        cfg = self.cfg
        settings = TrainSettings(
            stage=stage,
            steps=cfg.crf_steps,
            batch_size=cfg.crf_batch_size,
            lr=cfg.finetune_lr,
            crf_lr=cfg.crf_lr if stage != "unary" else None,
            seed=cfg.seed + 1,
        )
        return self.fit(model, settings)

    def from_cnn(self, name: str, **kwargs: Any) -> nn.Module:
        """A new ``name`` model holding the trained CNN's weights."""
        model = _seeded_create(self.cfg.seed, name, self.cfg.num_classes, width=self.cfg.width,
                               **kwargs)  # fmt: skip
        _transfer_unary(model, self.unary_state)
        return model

    # -- the rows ---------------------------------------------------------------------------

    def cnn_alone(self) -> nn.Module:
        """1. The CNN alone, trained from scratch: every other row starts from it."""
        from .config import TrainSettings

        cfg = self.cfg
        self.log(f"[demo] training the CNN alone: {cfg.unary_steps} steps on {cfg.n_train} images")
        unary = _seeded_create(cfg.seed, "small", cfg.num_classes, width=cfg.width)
        settings = TrainSettings(
            steps=cfg.unary_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed
        )
        seconds = self.fit(unary, settings)
        self.unary_state = copy.deepcopy(unary.state_dict())
        self.record(self.specs["unary"], unary, use_crf=False, train_seconds=seconds)
        return unary

    def cnn_control(self) -> None:
        """1b. The control of the end-to-end rows: the same extra steps, no CRF."""
        self.log(f"[demo] training {self.control}: the joint rows' {self.cfg.crf_steps} steps "
                 "without a CRF")  # fmt: skip
        model = self.from_cnn("small")
        seconds = self.joint_fit(model, stage="unary")
        self.record(self.specs["control"], model, use_crf=False, train_seconds=seconds,
                    name=self.control)  # fmt: skip

    def dense_crf(self, unary: nn.Module) -> None:
        """2. Dense-CRF post-processing with parameters grid-searched on the tune split."""
        from ..crf.dense import dense_crf
        from .tune import tune_dense_crf

        cfg, extras = self.cfg, self.results.extras
        self.log(f"[demo] tuning the dense CRF on {cfg.n_tune} held-out images")
        tuned = tune_dense_crf(
            unary, self.tune, num_classes=cfg.num_classes, grid=cfg.tune_grid,
            iters=cfg.crf_eval_iters, rounds=cfg.tune_rounds, max_images=None,
            progress=self.progress,
        )  # fmt: skip
        self.dense_params = dict(tuned["best"]["params"])
        extras["dense_crf_params"] = self.dense_params
        extras["tune_miou"] = tuned["best"]["miou"]
        extras["tune_baseline_miou"] = tuned["baseline_miou"]
        post_kw = dict(self.dense_params)

        def postprocess(logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
            return dense_crf(logits, image, **post_kw)

        self.record(
            self.specs["dense"],
            unary,
            use_crf=False,
            postprocess=postprocess,
            train_seconds=float(tuned["seconds"]),
            note=f"Training seconds here are the grid search ({len(tuned['trials'])} settings).",
        )

    def end_to_end(self, key: str, kind: str) -> None:
        """3-4. CRF-as-RNN and learned bandwidths, end to end from the trained CNN."""
        cfg, spec = self.cfg, self.specs[key]
        crf_kwargs: dict[str, Any] = {
            name: float(self.dense_params[name])
            for name in ("theta_alpha", "theta_beta", "theta_gamma", "w_bilateral", "w_spatial")
            if name in self.dense_params
        }
        crf_kwargs.update(
            iters=cfg.crf_train_iters, eval_iters=cfg.crf_eval_iters, weight_shape="matrix"
        )
        self.log(f"[demo] training {spec.name}: {cfg.crf_steps} joint steps from the trained CNN")
        model = self.from_cnn("small", crf=kind, crf_kwargs=crf_kwargs)
        seconds = self.joint_fit(model)
        self.results.extras["learned_crf"][spec.name] = _crf_stats(model)
        self.record(spec, model, use_crf=True, train_seconds=seconds, controls=[self.control])

    def gaussian_crf(self) -> None:
        """5. The Deep Gaussian CRF, end to end from the trained CNN."""
        spec = self.specs["gcrf"]
        self.log(f"[demo] training {spec.name}: {self.cfg.crf_steps} joint steps from the "
                 "trained CNN")  # fmt: skip
        model = self.from_cnn("small_gcrf")
        seconds = self.joint_fit(model)
        self.results.extras["learned_crf"][spec.name] = _crf_stats(model)
        self.record(spec, model, use_crf=True, train_seconds=seconds, controls=[self.control])

    def contextual_crf(self) -> None:
        """6. The contextual CRF with CNN pairwise potentials: piecewise, then its pairwise nets."""
        from ..models.featmap import ContextualSegNet
        from .config import TrainSettings

        cfg, spec = self.cfg, self.specs["contextual"]
        self.log(f"[demo] training {spec.name}: {cfg.contextual_steps} piecewise steps on the "
                 f"trunk, then {cfg.contextual_pairwise_steps} of its pairwise nets")  # fmt: skip
        model = _seeded_create(cfg.seed, "small_contextual", cfg.num_classes, width=cfg.width)
        # Only the trunk is shared: FeatMap-Net's per-scale blocks and the CRF's unary and
        # pairwise nets are new, so they train at the CNN's rate with the trunk fixed.
        _transfer_unary(model, self.unary_state, prefix="backbone.")
        piecewise = TrainSettings(
            stage="piecewise",
            steps=cfg.contextual_steps,
            batch_size=cfg.crf_batch_size,
            lr=cfg.lr,
            seed=cfg.seed + 2,
            freeze_backbone=True,
        )
        seconds = self.fit(model, piecewise)
        self.record(self.specs["contextual_unary"], model, use_crf=False, train_seconds=seconds)
        # Piecewise tables re-count the node evidence the unaries already carry (each is a
        # classifier of label pairs from the two nodes' features) and over-smooth at inference
        # (docs/contextual_crf.md). A few steps of the pairwise nets alone with mean-field in
        # the loss, the paper's inference (full tables, weight 1), fit them to inference;
        # everything the unary-only row depends on stays fixed.
        pairwise = TrainSettings(
            stage="joint",
            steps=cfg.contextual_pairwise_steps,
            batch_size=cfg.crf_batch_size,
            lr=cfg.contextual_pairwise_lr,
            seed=cfg.seed + 3,
            freeze=ContextualSegNet.UNARY_PARTS,
        )
        seconds += self.fit(model, pairwise)
        self.results.extras["contextual_inference"] = _choose_contextual_inference(
            model, self.tune, cfg, self.class_names, self.log
        )
        self.record(
            spec,
            model,
            use_crf=True,
            train_seconds=seconds,
            controls=[CONTEXTUAL_UNARY],
            note=(
                "Only the trained CNN's trunk is shared; its multi-scale FeatMap-Net head and "
                f"the CRF's unary and pairwise nets trained {cfg.contextual_steps} piecewise "
                f"steps from scratch on the fixed trunk, then the pairwise nets alone "
                f"{cfg.contextual_pairwise_steps} steps with mean-field in the loss; its "
                f"inference setting (pairwise_mode={model.crf.pairwise_mode}, pairwise_scale="
                f"{model.crf.pairwise_scale:g}) was chosen on the tune split."
            ),
        )


def _choose_contextual_inference(
    model: nn.Module,
    tune: Any,
    cfg: DemoSettings,
    class_names: Sequence[str],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Pick the contextual CRF's pairwise mode and weight by mIoU on the held-out tune split.

    Inference only (the trained tables are not touched): ``model.crf.pairwise_mode`` and
    ``model.crf.pairwise_scale`` are left at the best of ``cfg.contextual_candidates``; the
    paper's ``("full", 1.0)`` is listed first in the default candidates, so it wins ties.
    """
    from .evaluation import evaluate

    def tune_miou(use_crf: bool) -> float:
        result = evaluate(model, tune, num_classes=cfg.num_classes, use_crf=use_crf,
                          trimap_bands=(cfg.trimap_band,), progress=False,
                          class_names=class_names)  # fmt: skip
        return float(result["miou"])

    trials = []
    for mode, weight in cfg.contextual_candidates:
        model.crf.pairwise_mode = mode
        model.crf.pairwise_scale = float(weight)
        trials.append({"pairwise_mode": mode, "pairwise_scale": float(weight),
                       "tune_miou": tune_miou(True)})  # fmt: skip
    best = max(trials, key=lambda t: t["tune_miou"])  # first of equals: the paper's if tied
    model.crf.pairwise_mode = best["pairwise_mode"]
    model.crf.pairwise_scale = best["pairwise_scale"]
    log(f"[demo] contextual CRF inference chosen on the tune split: {best}")
    return {
        "pairwise_mode": best["pairwise_mode"],
        "pairwise_scale": best["pairwise_scale"],
        "tune_miou": best["tune_miou"],
        "tune_unary_miou": tune_miou(False),
        "trials": trials,
    }


def results_summary(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a ``results.json`` written by :func:`run_demo` (for scripts and tests)."""
    doc = json.loads(Path(path).read_text())
    return list(doc["rows"])
