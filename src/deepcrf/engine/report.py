"""The comparison report of ``deepcrf demo``: a table, ``results.json``, ``report.md`` and figures.

Input is a list of result rows, one per model, as plain dicts::

    {"name": "CNN + dense CRF", "method": "DeepLab v1: ...", "miou": 0.71,
     "pixel_accuracy": 0.93, "trimap_accuracy": 0.78, "trimap_band": 4,
     "trimap_curve": {1: 0.70, 2: 0.74, ...}, "seconds_per_image": 0.012,
     "per_class_iou": [...], "train_seconds": 41.0, "note": "..."}

``name``, ``miou``, ``trimap_accuracy`` and ``seconds_per_image`` are required; ``trimap_curve``
(band half-width in px -> accuracy) is needed for the plot.  Predictions for the overlay figures
are passed separately, as ``(N, H, W)`` label arrays keyed by row name, so that ``results.json``
stays small.

Every file is written atomically (temporary file + rename).  Figures use matplotlib's Agg canvas
directly, never pyplot, so the report neither needs a display nor touches global plotting state.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import atomic_path
from ..data.palette import colorize, voc_palette
from ..metrics import IGNORE_INDEX

__all__ = [
    "REQUIRED_KEYS",
    "compare_to_baseline",
    "format_table",
    "plot_trimap",
    "write_overlays",
    "write_report",
    "write_results_json",
]

REQUIRED_KEYS = ("name", "miou", "trimap_accuracy", "seconds_per_image")


def _check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    if not rows:
        raise ValueError("rows must contain at least one result row; got none")
    names = set()
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise ValueError(f"rows[{i}] lacks required keys {missing}; has {sorted(row)}")
        if row["name"] in names:
            raise ValueError(f"rows[{i}] repeats the name {row['name']!r}; names must be unique")
        names.add(row["name"])


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def format_table(rows: Sequence[Mapping[str, Any]], *, markdown: bool = False) -> str:
    """The results as an aligned text table (or a Markdown table).

    Columns: model, mIoU (%), pixel accuracy (%), trimap accuracy (%) at each row's
    ``trimap_band``, inference milliseconds per image and training seconds.

    Args:
        rows: result rows (see the module docstring).
        markdown: emit a GitHub Markdown table instead of plain aligned text.

    Returns:
        The table, one line per row after a header and a rule (no trailing newline).
    """
    _check_rows(rows)
    header = ["model", "mIoU %", "pixel acc %", "trimap acc %", "ms / image", "train s"]
    body = []
    for row in rows:
        band = row.get("trimap_band")
        trimap = _fmt(_pct(row["trimap_accuracy"]), ".1f")
        if band is not None and trimap != "n/a":
            trimap = f"{trimap} (±{band}px)"
        body.append(
            [
                str(row["name"]),
                _fmt(_pct(row["miou"]), ".1f"),
                _fmt(_pct(row.get("pixel_accuracy")), ".1f"),
                trimap,
                _fmt(_ms(row["seconds_per_image"]), ".1f"),
                _fmt(row.get("train_seconds"), ".0f"),
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * 5) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(b) for b in body)])


def _pct(value: Any) -> float | None:
    return None if value is None else 100.0 * float(value)


def _ms(value: Any) -> float | None:
    return None if value is None else 1000.0 * float(value)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None  # JSON has no NaN
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_results_json(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    *,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``{"rows": [...], "meta": {...}}`` as JSON, atomically.

    Non-finite numbers become ``null``; dict keys (e.g. trimap band widths) become strings.

    Args:
        path: the file to write (``results.json``).
        rows: result rows, each with at least ``name``, ``miou``, ``trimap_accuracy`` and
            ``seconds_per_image``.
        meta: run settings worth keeping beside the numbers (data sizes, steps, seeds).

    Returns:
        The path written.
    """
    _check_rows(rows)
    out = Path(path)
    doc = {"rows": _jsonable(list(rows)), "meta": _jsonable(dict(meta or {}))}
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return out


def compare_to_baseline(
    rows: Sequence[Mapping[str, Any]], baseline: str, *, tolerance: float = 0.0
) -> list[str]:
    """One sentence per non-baseline row saying whether it beats ``baseline``, computed.

    A row "beats" the baseline on a metric when its value exceeds the baseline's by more than
    ``tolerance`` (a fraction, e.g. 0.002 = 0.2 points) and by at least 0.05 points (a smaller
    difference prints as 0.0 and is called a tie).  A row may name control rows in its
    optional ``"controls"`` list (e.g. the CNN trained for the same extra steps without a CRF,
    or the same model's unary-only prediction); the sentence then also says, computed the same
    way, whether the row beats each control, so that a gain that comes from extra training
    rather than from the CRF is visible.

    Args:
        rows: result rows.
        baseline: the ``name`` of the reference row (the CNN alone).
        tolerance: margin below which a difference is called a tie.

    Returns:
        Markdown sentences, e.g. ``"**CNN + dense CRF** beats the CNN alone on both mIoU and
        trimap accuracy (mIoU +2.1 points; trimap accuracy +5.3 points)."``

    Raises:
        ValueError: ``baseline`` or a row's control is not a row name.
    """
    _check_rows(rows)
    by_name = {r["name"]: r for r in rows}
    if baseline not in by_name:
        raise ValueError(f"baseline {baseline!r} is not a row name; rows: {sorted(by_name)}")
    base = by_name[baseline]
    out = []
    for row in rows:
        if row["name"] == baseline:
            continue
        head, parts = _versus(row, base, "the CNN alone", tolerance)
        sentence = f"**{row['name']}** {head} ({'; '.join(parts)})."
        for control in row.get("controls") or ():
            if control not in by_name:
                raise ValueError(
                    f"row {row['name']!r} names control {control!r}, which is not a row name; "
                    f"rows: {sorted(by_name)}"
                )
            c_head, c_parts = _versus(row, by_name[control], f"**{control}**", tolerance)
            sentence += f" Against its control it {c_head} ({'; '.join(c_parts)})."
        if row.get("note"):
            sentence += f" {row['note']}"
        out.append(sentence)
    return out


def _versus(
    row: Mapping[str, Any], base: Mapping[str, Any], label: str, tolerance: float
) -> tuple[str, list[str]]:
    """Verdict head ("beats X on both ...") and per-metric deltas of ``row`` against ``base``."""
    parts = []
    verdicts = []
    for key, metric in (("miou", "mIoU"), ("trimap_accuracy", "trimap accuracy")):
        a, b = row[key], base[key]
        if a is None or b is None or math.isnan(float(a)) or math.isnan(float(b)):
            parts.append(f"{metric} not measured")
            verdicts.append(None)
            continue
        delta = 100.0 * (float(a) - float(b))
        # A difference that prints as 0.0 points is a tie, whatever the tolerance: the report
        # must not claim a win it cannot show.
        margin = max(100.0 * tolerance, 0.05)
        if delta >= margin:
            verdicts.append(True)
            parts.append(f"{metric} {delta:+.1f} points")
        elif delta <= -margin:
            verdicts.append(False)
            parts.append(f"{metric} {delta:+.1f} points")
        else:
            verdicts.append(False)
            parts.append(f"{metric} tied ({delta:+.1f} points)")
    if all(v is True for v in verdicts):
        head = f"beats {label} on both mIoU and trimap accuracy"
    elif any(v is True for v in verdicts):
        head = f"beats {label} on only one of mIoU and trimap accuracy"
    else:
        head = f"does **not** beat {label}"
    return head, parts


def _overlay(image: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    """Labels over a grey copy of the image: a light tint inside each region, its outline solid.

    The image is shown in grey so that class colours cannot be confused with the picture's own
    colours; background (label 0) is left untinted and unoutlined, ignore (255) is outlined.
    """
    img = image.astype(np.float32)
    grey = (0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2])[..., None]
    base = np.repeat(0.85 * grey, 3, axis=2)
    color = colorize(labels).astype(np.float32)
    objects = (labels != 0)[..., None]
    blend = np.where(objects, (1.0 - 0.5 * alpha) * base + 0.5 * alpha * color, base)
    edge = _outline(labels) & (labels != 0)
    blend[edge] = color[edge]
    return np.clip(blend, 0, 255).astype(np.uint8)


def _outline(labels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label, thickened by one pixel inward."""
    edge = np.zeros(labels.shape, bool)
    diff_y = labels[1:] != labels[:-1]
    diff_x = labels[:, 1:] != labels[:, :-1]
    edge[1:] |= diff_y
    edge[:-1] |= diff_y
    edge[:, 1:] |= diff_x
    edge[:, :-1] |= diff_x
    return edge


def _legend(fig: Any, labels: Sequence[int], names: Sequence[str] | None) -> None:
    """A row of colour swatches with class names under the panels."""
    from matplotlib.patches import Patch

    palette = voc_palette()
    handles = [
        Patch(
            facecolor=palette[k] / 255.0,
            edgecolor="black",
            label=(names[k] if names is not None and k < len(names) else f"class {k}")
            if k != IGNORE_INDEX
            else "ignore",
        )
        for k in labels
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7,
               frameon=False, handlelength=1.2)  # fmt: skip


def _save_figure(fig: Any, path: Path, dpi: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        # Fixed metadata so that the same numbers give byte-identical PNGs across runs.
        fig.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})


def write_overlays(
    out_dir: str | os.PathLike[str],
    images: np.ndarray,
    labels: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    *,
    alpha: float = 0.55,
    prefix: str = "overlay",
    dpi: int = 100,
    class_names: Sequence[str] | None = None,
) -> list[Path]:
    """One PNG per image: image | ground truth | each model's labels, with a class legend.

    Labels are drawn over a grey copy of the image as outlines in the class colour with a
    light tint inside (background untinted). Each model panel's title gives its pixel accuracy
    on that image; ignored (255) pixels of the ground truth are not counted.

    Args:
        out_dir: folder for ``{prefix}_{i:02d}.png``.
        images: RGB images in 0-255.
        labels: ground truth, 255 = ignore.
        predictions: row name -> predicted labels of the same images, in display order.
        alpha: strength of the tint inside object regions (outlines are solid).
        prefix: file name prefix.
        dpi: resolution of the saved figures.
        class_names: names for the legend, indexed by label (default ``class k``).

    Shape:
        images:      (N, H, W, 3) uint8 (or float in 0-255)
        labels:      (N, H, W) integer
        predictions: each (N, H, W) integer

    Returns:
        The paths written, in image order.
    """
    from matplotlib.figure import Figure

    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3); got shape {images.shape}")
    if labels.shape != images.shape[:3]:
        raise ValueError(f"labels must be (N, H, W) = {images.shape[:3]}; got {labels.shape}")
    for name, pred in predictions.items():
        if np.asarray(pred).shape != labels.shape:
            raise ValueError(
                f"predictions[{name!r}] must be {labels.shape} like labels; "
                f"got {np.asarray(pred).shape}"
            )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    out = Path(out_dir)
    paths = []
    columns = ["image", "ground truth", *predictions]
    for i in range(images.shape[0]):
        image = np.clip(images[i], 0, 255).astype(np.uint8)
        gt = labels[i]
        valid = gt != 255
        # Room above the panels for two-line titles (model name, accuracy).
        fig = Figure(figsize=(1.9 * len(columns), 2.9))
        axes = fig.subplots(1, len(columns), squeeze=False)[0]
        panels = [image, _overlay(image, np.where(valid, gt, 0), alpha)]
        titles = ["image", "ground truth"]
        for name, pred in predictions.items():
            p = np.asarray(pred)[i]
            acc = float((p[valid] == gt[valid]).mean()) if valid.any() else float("nan")
            panels.append(_overlay(image, p, alpha))
            titles.append(f"{name}\n{_fmt(_pct(acc), '.1f')}% px acc")
        for ax, panel, title in zip(axes, panels, titles, strict=True):
            ax.imshow(panel, interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.set_axis_off()
        shown = sorted(
            set(np.unique(gt).tolist()).union(
                *(np.unique(np.asarray(p)[i]).tolist() for p in predictions.values())
            )
            - {0}
        )
        _legend(fig, [0, *shown], class_names)
        fig.subplots_adjust(left=0.01, right=0.99, bottom=0.12, top=0.8, wspace=0.05)
        path = out / f"{prefix}_{i:02d}.png"
        _save_figure(fig, path, dpi)
        paths.append(path)
    return paths


def plot_trimap(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    *,
    title: str = "Pixel accuracy near object boundaries (trimap)",
    dpi: int = 110,
) -> Path:
    """Trimap accuracy vs band width for every row with a ``trimap_curve`` (DeepLab v1, Fig. 5).

    Args:
        path: the PNG to write.
        rows: result rows; ``trimap_curve`` maps band half-width in px to accuracy in [0, 1].
        title: the figure title.
        dpi: resolution.

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure

    _check_rows(rows)
    curves = [(r["name"], r.get("trimap_curve")) for r in rows]
    curves = [(n, c) for n, c in curves if c]
    if not curves:
        raise ValueError("no row has a non-empty 'trimap_curve' to plot")
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.subplots()
    markers = "osD^vP*X"
    for k, (name, curve) in enumerate(curves):
        bands = sorted(int(b) for b in curve)
        acc = [_pct(curve[b] if b in curve else curve[str(b)]) for b in bands]
        ax.plot(bands, acc, marker=markers[k % len(markers)], markersize=4, label=name)
    ax.set_xlabel("trimap band half-width (pixels from a boundary)")
    ax.set_ylabel("pixel accuracy in the band (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = Path(path)
    _save_figure(fig, out, dpi)
    return out


def write_report(
    out_dir: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    *,
    baseline: str,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    predictions: Mapping[str, np.ndarray] | None = None,
    meta: Mapping[str, Any] | None = None,
    intro: str = "",
    notes: Sequence[str] = (),
    tolerance: float = 0.0,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write ``results.json``, ``report.md``, the overlay PNGs and the trimap plot to ``out_dir``.

    Args:
        out_dir: output folder (created if needed).
        rows: result rows, the baseline first by convention.
        baseline: name of the row the others are compared with (the CNN alone).
        images: (N, H, W, 3) RGB validation images for :func:`write_overlays`; no overlays
            when ``None``.
        labels: (N, H, W) their ground truth.
        predictions: row name -> (N, H, W) predicted labels of the same images.
        meta: run settings, written to ``results.json`` and listed in the report.
        intro: a Markdown paragraph placed under the title.
        notes: extra Markdown bullet points (how the numbers were obtained, caveats).
        tolerance: see :func:`compare_to_baseline`.
        class_names: class names for the overlays' legend.

    Returns:
        ``{"results": Path, "report": Path, "plot": Path, "overlays": [Path, ...],
        "verdicts": [str, ...], "table": str}``.
    """
    _check_rows(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = write_results_json(out / "results.json", rows, meta=meta)
    verdicts = compare_to_baseline(rows, baseline, tolerance=tolerance)
    plot = plot_trimap(out / "trimap.png", rows)
    overlays: list[Path] = []
    if images is not None:
        if labels is None or predictions is None:
            raise ValueError("images needs labels and predictions to draw overlays")
        overlays = write_overlays(
            out / "overlays", images, labels, predictions, class_names=class_names
        )
    table = format_table(rows)
    lines = ["# deepcrf demo report", ""]
    if intro:
        lines += [intro, ""]
    lines += ["## Results", "", format_table(rows, markdown=True), ""]
    lines += ["## Does the CRF help? (computed from the table)", ""]
    lines += [f"- {v}" for v in verdicts] or ["- (only the baseline was run)"]
    lines.append("")
    lines += [
        "## Boundary accuracy vs band width",
        "",
        "Pixel accuracy restricted to pixels within a band of the given half-width around "
        "ground-truth object boundaries (the trimap of DeepLab v1, Fig. 5).",
        "",
        f"![trimap accuracy vs band width]({plot.name})",
        "",
    ]
    if overlays:
        lines += [
            "## The same validation images under each model",
            "",
            "Columns: image, ground truth, then each model's labels over the image "
            "(background untinted); titles give each model's pixel accuracy on that image.",
            "",
        ]
        lines += [f"![overlay {k}](overlays/{p.name})" for k, p in enumerate(overlays)]
        lines.append("")
    method_rows = [r for r in rows if r.get("method")]
    if method_rows:
        lines += ["## Models", ""]
        lines += [f"- **{r['name']}**: {r['method']}" for r in method_rows]
        lines.append("")
    if notes:
        lines += ["## How these numbers were obtained", ""]
        lines += [f"- {n}" for n in notes]
        lines.append("")
    if meta:
        lines += ["## Settings", "", "```json", json.dumps(_jsonable(dict(meta)), indent=2), "```"]
        lines.append("")
    report = out / "report.md"
    with atomic_path(report) as tmp:
        tmp.write_text("\n".join(lines))
    return {
        "results": results,
        "report": report,
        "plot": plot,
        "overlays": overlays,
        "verdicts": verdicts,
        "table": table,
    }
