"""``deepcrf demo --volume``: the dense CRF on built-in 3-D volumes, unary vs CRF vs learned CRF.

On synthetic MR-like volumes (:mod:`deepcrf.data.synthetic_volume`: an organ and lesions with
partial-volume edges, thick slices, noise and a bias field), for one and for two modalities:

1. **voxel classifier** — the unary: a Gaussian class-conditional intensity model (mean and
   covariance per class over the modalities, and class priors) fitted on the training volumes;
   it classifies each voxel alone, so it is speckled by the noise and confuses the organ's
   partial-volume rim with lesion;
2. **+ dense CRF, isotropic** — the fully connected CRF with spacing ignored (voxel units):
   the control that shows what the physical spacing buys;
3. **+ dense CRF** — the same kernels in millimetres (``spacing`` from the data), kernel
   weights and bandwidths grid-searched on the ``tune`` volumes (as DeepLab tunes its CRF);
4. **+ learned CRF** — :class:`deepcrf.DenseCRF` started from the tuned parameters, then its
   compatibility, kernel weights and per-axis / per-modality bandwidths learned by gradient
   descent on the training volumes (mean-field NLL), the unary fixed.

Scores on the validation volumes: Dice per foreground class and their mean, voxel accuracy,
and boundary accuracy (accuracy within 2 mm of a ground-truth boundary, physical distance).
Writes ``volume/results.json``, ``volume/report.md`` and ``volume/slices_*.png`` (an axial and
a coronal slice per modality setting: reference, ground truth, each row).

Determinism: data from fixed seeds; the learned CRF's training seeds torch.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._atomic import atomic_path
from ..crf.dense import DenseCRF, crf_terms, dense_crf
from ..data.synthetic_volume import VOLUME_CLASSES, SyntheticVolumes
from ..metrics import band_accuracy, dice_scores
from ..ops.meanfield import sweep

__all__ = ["VolumeDemoSettings", "run_volume_demo"]

BAND_MM = 2.0


@dataclass(frozen=True)
class VolumeDemoSettings:
    """Sizes and steps of the volume demo."""

    shape: tuple[int, int, int] = (24, 64, 64)
    spacing: tuple[float, float, float] = (2.5, 1.0, 1.0)
    train: int = 4
    tune: int = 3
    val: int = 4
    iters: int = 5
    learn_steps: int = 30
    learn_batch: int = 2
    learn_lr: float = 0.03
    seed: int = 0


FULL = VolumeDemoSettings()
QUICK = VolumeDemoSettings(shape=(12, 32, 32), train=2, tune=1, val=2, learn_steps=8)

# The grid of the tuned CRF: bandwidths (θα, θγ in mm; θβ in units of the noise σ per
# modality) and, at each, every pair of Potts weights in one engine sweep.
_BANDWIDTHS = {
    "theta_alpha": (2.0, 4.0, 8.0, 16.0, 32.0),
    "theta_beta_sigmas": (1.5, 3.0, 6.0, 12.0),
}
_WEIGHTS = {"w_bilateral": (0.5, 1.0, 3.0, 6.0, 12.0, 24.0, 48.0), "w_spatial": (0.5, 3.0)}
_THETA_GAMMA = 1.5


class GaussianVoxelClassifier:
    """Per-class Gaussian intensity model with priors: the demo's unary.

    Fitted by maximum likelihood on labelled volumes; ``logits`` are log p(x | c) + log p(c).

    Shape:
        fit images: each (C, *S); labels: each (*S)
        logits: (C, *S) -> (L, *S) float32
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.means: np.ndarray | None = None
        self.precisions: np.ndarray | None = None
        self.log_norm: np.ndarray | None = None

    def fit(self, images: list[np.ndarray], labels: list[np.ndarray]) -> GaussianVoxelClassifier:
        """Estimate the class means, covariances and priors from the voxels."""
        x = np.concatenate([im.reshape(im.shape[0], -1).T for im in images]).astype(np.float64)
        y = np.concatenate([lab.reshape(-1) for lab in labels])
        c = x.shape[1]
        means, precisions, log_norm = [], [], []
        for k in range(self.num_classes):
            xk = x[y == k]
            if len(xk) < c + 1:
                raise ValueError(f"class {k} has {len(xk)} voxels: too few to fit its Gaussian")
            mean = xk.mean(0)
            cov = np.cov(xk.T).reshape(c, c) + 1e-3 * np.eye(c)
            prior = len(xk) / len(x)
            _, logdet = np.linalg.slogdet(cov)
            means.append(mean)
            precisions.append(np.linalg.inv(cov))
            log_norm.append(math.log(prior) - 0.5 * logdet - 0.5 * c * math.log(2 * math.pi))
        self.means, self.precisions = np.stack(means), np.stack(precisions)
        self.log_norm = np.array(log_norm)
        return self

    def logits(self, image: np.ndarray) -> np.ndarray:
        """Log joint p(x, c) per voxel."""
        if self.means is None or self.precisions is None or self.log_norm is None:
            raise RuntimeError("fit the classifier first")
        x = image.reshape(image.shape[0], -1).T.astype(np.float64)
        out = np.empty((self.num_classes, x.shape[0]))
        for k in range(self.num_classes):
            d = x - self.means[k]
            out[k] = self.log_norm[k] - 0.5 * np.einsum("ni,ij,nj->n", d, self.precisions[k], d)
        return out.reshape(self.num_classes, *image.shape[1:]).astype(np.float32)


def _scores(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    dice = dice_scores(pred, truth, len(VOLUME_CLASSES))
    out = {f"dice_{name}": d for name, d in zip(VOLUME_CLASSES, dice, strict=True) if name}
    fg = [d for d in dice[1:] if d is not None]
    out["dice_mean"] = float(np.mean(fg)) if fg else float("nan")
    out["accuracy"] = float((pred == truth).mean())
    out["boundary_accuracy"] = band_accuracy(pred, truth, BAND_MM, spacing)
    return out


def _mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = rows[0].keys()
    return {k: float(np.nanmean([np.nan if r[k] is None else r[k] for r in rows])) for k in keys}


def _crf(
    logits: np.ndarray, image: np.ndarray, params: dict[str, Any], spacing: Any, iters: int
) -> np.ndarray:
    with torch.no_grad():
        out = dense_crf(
            torch.from_numpy(logits)[None],
            torch.from_numpy(image)[None],
            iters=iters,
            spacing=spacing,
            **params,
        )
    return out[0].argmax(0).numpy()


def _grid_search(
    unaries: list[np.ndarray],
    images: list[np.ndarray],
    labels: list[np.ndarray],
    spacing: tuple[float, ...] | None,
    sigma: np.ndarray,
    iters: int,
) -> tuple[dict[str, Any], float]:
    """The grid point with the best mean foreground Dice on the tune volumes.

    One :func:`deepcrf.ops.meanfield.sweep` per bandwidth setting and volume runs every
    weight pair on the same lattices (as ``tune-crf`` does for images).
    """
    pairs = list(itertools.product(*_WEIGHTS.values()))
    weights = torch.tensor(pairs, dtype=torch.float32)
    scores: dict[tuple, list[float]] = {}
    for ta, tb in itertools.product(*_BANDWIDTHS.values()):
        theta_beta = tuple(float(s) * tb for s in sigma)
        for u, im, lab in zip(unaries, images, labels, strict=True):
            ref = torch.from_numpy(im)[None]
            terms = crf_terms(ref, ta, torch.tensor(theta_beta), _THETA_GAMMA, spacing=spacing)
            base = torch.from_numpy(u).reshape(u.shape[0], -1).T.contiguous()
            preds = sweep(base, list(terms), weights, iters).argmax(-1)  # (G, N)
            for (wb, wg), pred in zip(pairs, preds, strict=True):
                dice = dice_scores(pred.reshape(lab.shape).numpy(), lab, len(VOLUME_CLASSES))
                fg = [d for d in dice[1:] if d is not None]
                scores.setdefault((wb, ta, theta_beta, wg), []).append(float(np.mean(fg)))
    (wb, ta, theta_beta, wg), best = max(scores.items(), key=lambda kv: float(np.mean(kv[1])))
    params = {"w_bilateral": wb, "theta_alpha": ta, "theta_beta": theta_beta,
              "w_spatial": wg, "theta_gamma": _THETA_GAMMA}  # fmt: skip
    return params, float(np.mean(best))


def _learn(
    start: dict[str, Any],
    unaries: list[np.ndarray],
    images: list[np.ndarray],
    labels: list[np.ndarray],
    spacing: tuple[float, ...],
    cfg: VolumeDemoSettings,
    progress: Callable[[int, float], None],
) -> DenseCRF:
    """DenseCRF from ``start``, compat + weights + per-axis/per-channel bandwidths learned."""
    torch.manual_seed(cfg.seed)
    crf = DenseCRF(
        len(VOLUME_CLASSES),
        theta_alpha=(start["theta_alpha"],) * 3,
        theta_beta=start["theta_beta"],
        theta_gamma=(start["theta_gamma"],) * 3,
        w_bilateral=start["w_bilateral"],
        w_spatial=start["w_spatial"],
        iters=cfg.iters,
        learnable=("compat", "weights", "bandwidths"),
    )
    logits = torch.from_numpy(np.stack(unaries))
    refs = torch.from_numpy(np.stack(images))
    target = torch.from_numpy(np.stack(labels))
    batch = min(cfg.learn_batch, len(unaries))
    # Class-balanced NLL: lesions are ~1 % of the voxels, and Dice weighs them like the organ.
    counts = torch.bincount(target.reshape(-1), minlength=len(VOLUME_CLASSES)).double()
    weight = (counts.sum() / counts.clamp(min=1)).sqrt().float()
    opt = torch.optim.Adam(crf.parameters(), lr=cfg.learn_lr)
    crf.train()
    for step in range(cfg.learn_steps):
        # Mini-batches of `batch` volumes, cycling through the training set.
        pick = [(step * batch + k) % len(unaries) for k in range(batch)]
        opt.zero_grad()
        out = crf(logits[pick], refs[pick], spacing=spacing)
        loss = torch.nn.functional.nll_loss(out, target[pick], weight=weight)
        loss.backward()
        opt.step()
        progress(step, loss.item())
    crf.eval()
    return crf


def _slices_figure(
    path: Path,
    image: np.ndarray,
    truth: np.ndarray,
    predictions: dict[str, np.ndarray],
    spacing: tuple[float, ...],
    title: str,
) -> None:
    """Axial (middle D) and coronal (middle H) slices: reference | truth | each row."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from .report import _save_figure

    colours = ["#000000", "#3c8dde", "#f0b429"]
    cmap = ListedColormap(colours)
    columns = {"reference (modality 0)": image[0], "ground truth": truth, **predictions}
    d, h = truth.shape[0] // 2, truth.shape[1] // 2
    fig = Figure(figsize=(2.0 * len(columns), 4.6))
    axes = fig.subplots(2, len(columns), squeeze=False)
    for j, (name, vol) in enumerate(columns.items()):
        for i, (sl, aspect) in enumerate(((vol[d], 1.0), (vol[:, h], spacing[0] / spacing[2]))):
            ax = axes[i, j]
            if j == 0:
                ax.imshow(sl, cmap="gray", aspect=aspect, interpolation="nearest")
            else:
                ax.imshow(sl, cmap=cmap, vmin=0, vmax=2, aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                label = name
                if j >= 2:
                    dice = _scores(vol, truth, spacing)["dice_mean"]
                    label = f"{name}\nDice {100 * dice:.1f}"
                ax.set_title(label, fontsize=7)
        axes[0, 0].set_ylabel("axial", fontsize=7)
        axes[1, 0].set_ylabel("coronal", fontsize=7)
    legend = [Patch(color=c, label=n) for c, n in zip(colours, VOLUME_CLASSES, strict=True)]
    fig.legend(handles=legend, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(left=0.03, right=0.99, bottom=0.08, top=0.82, wspace=0.05, hspace=0.1)
    _save_figure(fig, path, 110)


def _section(
    modalities: int, cfg: VolumeDemoSettings, log: Callable[[str], None], out: Path
) -> dict[str, Any]:
    def volumes(split: str, count: int) -> SyntheticVolumes:
        return SyntheticVolumes(
            split, count, shape=cfg.shape, spacing=cfg.spacing, modalities=modalities, seed=cfg.seed
        )

    train, tune, val = (volumes(s, n) for s, n in (("train", cfg.train), ("tune", cfg.tune),
                                                    ("val", cfg.val)))  # fmt: skip
    train_items, tune_items, val_items = ([v[i] for i in range(len(v))] for v in (train, tune, val))
    unary_model = GaussianVoxelClassifier(len(VOLUME_CLASSES)).fit(
        [it.image for it in train_items], [it.labels for it in train_items]
    )
    sigma = np.array(
        [np.std(np.concatenate([it.image[c][it.labels == 0] for it in train_items]))
         for c in range(modalities)]
    )  # fmt: skip
    spacing = cfg.spacing

    def unaries(items: list) -> list[np.ndarray]:
        return [unary_model.logits(it.image) for it in items]

    tune_u, val_u = unaries(tune_items), unaries(val_items)
    tune_args = ([it.image for it in tune_items], [it.labels for it in tune_items])
    t0 = time.perf_counter()
    iso_params, _ = _grid_search(tune_u, *tune_args, None, sigma, cfg.iters)
    params, tune_dice = _grid_search(tune_u, *tune_args, spacing, sigma, cfg.iters)
    grid_seconds = time.perf_counter() - t0
    unary_tune = np.mean([_scores(u.argmax(0), it.labels, spacing)["dice_mean"]
                          for u, it in zip(tune_u, tune_items, strict=True)])  # fmt: skip
    shown = {k: _r(v) for k, v in params.items()}
    log(f"  grid on tune: {shown}: Dice {100 * tune_dice:.1f} (unary {100 * unary_tune:.1f})")

    def report(step: int, loss: float) -> None:
        if step % 10 == 0 or step == cfg.learn_steps - 1:
            log(f"  learned CRF step {step + 1}/{cfg.learn_steps}: loss {loss:.4f}")

    t0 = time.perf_counter()
    crf = _learn(
        params, unaries(train_items), [it.image for it in train_items],
        [it.labels for it in train_items], spacing, cfg, report,
    )  # fmt: skip
    learn_seconds = time.perf_counter() - t0

    rows: dict[str, list[dict[str, float]]] = {}
    preds: dict[str, list[np.ndarray]] = {}
    seconds: dict[str, float] = {}
    for it, u in zip(val_items, val_u, strict=True):
        runs: dict[str, Callable[[], np.ndarray]] = {
            "voxel classifier": lambda u=u: u.argmax(0),
            "+ dense CRF, isotropic": lambda u=u, it=it: _crf(u, it.image, iso_params, None,
                                                              cfg.iters),
            "+ dense CRF": lambda u=u, it=it: _crf(u, it.image, params, spacing, cfg.iters),
            "+ learned CRF": lambda u=u, it=it: _learned(crf, u, it.image, spacing),
        }  # fmt: skip
        for name, run in runs.items():
            t0 = time.perf_counter()
            pred = run()
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
            rows.setdefault(name, []).append(_scores(pred, it.labels, spacing))
            preds.setdefault(name, []).append(pred)
    table = [
        {"row": name, **_mean_scores(r), "seconds_per_volume": seconds[name] / len(val_items)}
        for name, r in rows.items()
    ]
    first = val_items[0]
    picture = out / f"slices_{modalities}mod.png"
    _slices_figure(
        picture, first.image, first.labels, {k: v[0] for k, v in preds.items()}, spacing,
        f"{modalities} modalit{'y' if modalities == 1 else 'ies'}: validation volume 0, "
        f"{cfg.shape[0]}x{cfg.shape[1]}x{cfg.shape[2]} voxels of "
        f"{'x'.join(f'{s:g}' for s in spacing)} mm",
    )  # fmt: skip
    learned = {
        "theta_alpha_mm": list(crf.theta_alpha),  # type: ignore[arg-type]
        "theta_beta": list(crf.theta_beta) if isinstance(crf.theta_beta, tuple) else crf.theta_beta,
        "theta_gamma_mm": list(crf.theta_gamma),  # type: ignore[arg-type]
        "w_bilateral": crf.w_bilateral.item(),
        "w_spatial": crf.w_spatial.item(),
        "compat": crf.compat.detach().tolist(),
    }
    return {
        "modalities": modalities,
        "rows": table,
        "tuned_params": params,
        "tuned_params_isotropic": iso_params,
        "learned_params": learned,
        "grid_seconds": grid_seconds,
        "learn_seconds": learn_seconds,
        "picture": picture.name,
    }


def _learned(crf: DenseCRF, logits: np.ndarray, image: np.ndarray, spacing: Any) -> np.ndarray:
    with torch.no_grad():
        out = crf(torch.from_numpy(logits)[None], torch.from_numpy(image)[None], spacing=spacing)
    return out[0].argmax(0).numpy()


def _table(rows: list[dict[str, Any]]) -> str:
    head = "| row | mean Dice | Dice organ | Dice lesion | accuracy | boundary acc. | s/volume |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['row']} | {100 * r['dice_mean']:.1f} | {100 * r['dice_organ']:.1f} | "
            f"{100 * r['dice_lesion']:.1f} | {100 * r['accuracy']:.2f} | "
            f"{100 * r['boundary_accuracy']:.1f} | {r['seconds_per_volume']:.2f} |"
        )
    return "\n".join(lines)


def run_volume_demo(
    out_dir: str | Path,
    *,
    quick: bool = False,
    settings: VolumeDemoSettings | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run both modality settings and write ``results.json``, ``report.md`` and slice PNGs.

    Args:
        out_dir: output folder (the CLI passes ``<--out>/volume``).
        quick: :data:`QUICK` sizes (ignored when ``settings`` is given).
        settings: explicit sizes and steps.
        log: where status lines and the tables go.

    Returns:
        ``{"sections": [...], "files": {...}, "seconds": float}``.
    """
    cfg = settings or (QUICK if quick else FULL)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    sections = []
    for modalities in (1, 2):
        log(f"volume demo, {modalities} modalit{'y' if modalities == 1 else 'ies'}:")
        sections.append(_section(modalities, cfg, log, out))
    seconds = time.perf_counter() - t_start
    results = {"settings": asdict(cfg), "band_mm": BAND_MM, "sections": sections,
               "seconds": seconds, "torch": torch.__version__}  # fmt: skip
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    parts = [
        "# Dense CRF on 3-D volumes (`deepcrf demo --volume`)",
        "",
        f"Synthetic MR-like volumes, {cfg.shape[0]}×{cfg.shape[1]}×{cfg.shape[2]} voxels of "
        f"{' × '.join(f'{s:g}' for s in cfg.spacing)} mm (thick slices), classes "
        f"{', '.join(VOLUME_CLASSES)}; {cfg.train} training, {cfg.tune} tuning and {cfg.val} "
        f"validation volumes; {cfg.iters} mean-field iterations. Scores on the validation "
        f"volumes (Dice and accuracy in %, boundary accuracy within {BAND_MM:g} mm of a "
        "ground-truth boundary). See docs/volumes.md.",
    ]
    tables = []
    for sec in sections:
        table = _table(sec["rows"])
        tables.append(table)
        parts += [
            "",
            f"## {sec['modalities']} modalit{'y' if sec['modalities'] == 1 else 'ies'}",
            "",
            table,
            "",
            f"Tuned on the tune volumes: {sec['tuned_params']} (isotropic control: "
            f"{sec['tuned_params_isotropic']}). Learned: θα "
            f"{_r(sec['learned_params']['theta_alpha_mm'])} mm, θβ "
            f"{_r(sec['learned_params']['theta_beta'])}, θγ "
            f"{_r(sec['learned_params']['theta_gamma_mm'])} mm, w "
            f"{sec['learned_params']['w_bilateral']:.3g} / "
            f"{sec['learned_params']['w_spatial']:.3g}.",
            "",
            f"![slices]({sec['picture']})",
        ]
    parts += ["", f"Total {seconds:.0f} s."]
    report_path = out / "report.md"
    with atomic_path(report_path) as tmp:
        tmp.write_text("\n".join(parts) + "\n")
    for sec, table in zip(sections, tables, strict=True):
        log("")
        log(f"{sec['modalities']} modality setting:")
        log(table)
    log(f"\nreport: {report_path}  ({seconds:.0f} s)")
    return {"sections": sections, "files": {"report": str(report_path)}, "seconds": seconds}


def _r(values: Any) -> str:
    if isinstance(values, (list, tuple)):
        return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"
    return f"{values:.3g}"
