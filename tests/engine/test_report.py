import json

import numpy as np
import pytest
from PIL import Image

from deepcrf.engine.report import (
    compare_to_baseline,
    format_table,
    plot_trimap,
    write_overlays,
    write_report,
    write_results_json,
)


def _rows():
    return [
        {
            "name": "CNN alone",
            "miou": 0.60,
            "pixel_accuracy": 0.90,
            "trimap_accuracy": 0.70,
            "trimap_band": 4,
            "trimap_curve": {1: 0.6, 2: 0.65, 4: 0.70, 8: 0.8},
            "seconds_per_image": 0.010,
            "train_seconds": 12.0,
        },
        {
            "name": "CNN + dense CRF",
            "method": "DeepLab v1 post-processing",
            "miou": 0.63,
            "pixel_accuracy": 0.91,
            "trimap_accuracy": 0.75,
            "trimap_band": 4,
            "trimap_curve": {1: 0.7, 2: 0.72, 4: 0.75, 8: 0.82},
            "seconds_per_image": 0.050,
        },
        {
            "name": "CRF-as-RNN",
            "miou": 0.59,
            "pixel_accuracy": 0.89,
            "trimap_accuracy": 0.72,
            "trimap_band": 4,
            "trimap_curve": {1: 0.62, 2: 0.66, 4: 0.72, 8: 0.79},
            "seconds_per_image": 0.060,
            "note": "Trained for few steps.",
        },
    ]


def test_format_table_plain_and_markdown():
    text = format_table(_rows())
    lines = text.splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("model") and "trimap acc %" in lines[0]
    assert "63.0" in lines[3] and "75.0 (±4px)" in lines[3] and "50.0" in lines[3]
    assert "n/a" in lines[3]  # no train_seconds
    md = format_table(_rows(), markdown=True).splitlines()
    assert md[0].startswith("| model") and md[1].startswith("|---|")
    assert md[2].count("|") == 7


def test_compare_to_baseline_is_computed():
    verdicts = compare_to_baseline(_rows(), "CNN alone")
    assert len(verdicts) == 2
    assert "beats the CNN alone on both" in verdicts[0] and "+3.0 points" in verdicts[0]
    assert "beats the CNN alone on only one" in verdicts[1]
    assert "mIoU -1.0 points" in verdicts[1] and "Trained for few steps." in verdicts[1]
    rows = _rows()
    rows[1]["miou"] = 0.55
    rows[1]["trimap_accuracy"] = 0.70
    verdict = compare_to_baseline(rows, "CNN alone")[0]
    assert "does **not** beat" in verdict and "trimap accuracy tied" in verdict
    rows[1]["miou"] = 0.60 + 4e-4  # +0.04 points prints as +0.0: a tie, not a win
    verdict = compare_to_baseline(rows, "CNN alone")[0]
    assert "does **not** beat" in verdict and "mIoU tied (+0.0 points)" in verdict
    with pytest.raises(ValueError, match="baseline 'nope' is not a row name"):
        compare_to_baseline(rows, "nope")


def test_compare_against_a_control_is_computed():
    rows = _rows()
    control = {**rows[1], "name": "CNN alone (+30 steps)", "miou": 0.62, "trimap_accuracy": 0.76}
    joint = {**rows[1], "name": "CRF-as-RNN", "miou": 0.61, "trimap_accuracy": 0.74,
             "controls": ["CNN alone (+30 steps)"]}  # fmt: skip
    verdicts = compare_to_baseline([rows[0], control, joint], "CNN alone")
    assert len(verdicts) == 2
    # The joint row beats the CNN alone but not the control trained for as many steps.
    assert verdicts[1].startswith("**CRF-as-RNN** beats the CNN alone on both")
    assert "mIoU +1.0 points; trimap accuracy +4.0 points" in verdicts[1]
    assert (
        "Against its control it does **not** beat **CNN alone (+30 steps)** "
        "(mIoU -1.0 points; trimap accuracy -2.0 points)." in verdicts[1]
    )
    assert "Against its control" not in verdicts[0]
    joint["miou"], joint["trimap_accuracy"] = 0.64, 0.77
    verdict = compare_to_baseline([rows[0], control, joint], "CNN alone")[1]
    assert "Against its control it beats **CNN alone (+30 steps)** on both" in verdict
    joint["controls"] = ["nope"]
    with pytest.raises(ValueError, match="names control 'nope', which is not a row name"):
        compare_to_baseline([rows[0], control, joint], "CNN alone")


def test_bad_rows():
    with pytest.raises(ValueError, match="at least one result row"):
        format_table([])
    with pytest.raises(ValueError, match=r"lacks required keys \['miou'\]"):
        format_table([{"name": "a", "trimap_accuracy": 0.1, "seconds_per_image": 1.0}])
    rows = _rows()
    rows[1]["name"] = "CNN alone"
    with pytest.raises(ValueError, match="repeats the name 'CNN alone'"):
        format_table(rows)


def test_results_json(tmp_path):
    rows = _rows()
    rows[0]["miou"] = float("nan")
    rows[0]["per_class_iou"] = np.array([0.5, np.float32(0.25)])
    path = write_results_json(tmp_path / "r" / "results.json", rows, meta={"seed": np.int64(3)})
    doc = json.loads(path.read_text())
    assert [r["name"] for r in doc["rows"]] == ["CNN alone", "CNN + dense CRF", "CRF-as-RNN"]
    assert doc["rows"][0]["miou"] is None  # NaN is not JSON
    assert doc["rows"][0]["per_class_iou"] == [0.5, 0.25]
    assert doc["rows"][1]["trimap_curve"]["4"] == 0.75
    assert doc["meta"] == {"seed": 3}
    for row in doc["rows"]:
        assert {"name", "miou", "trimap_accuracy", "seconds_per_image"} <= set(row)


def _fake_images(n=2, h=20, w=24):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    labels = np.zeros((n, h, w), dtype=np.int64)
    labels[:, 5:15, 6:18] = 1
    labels[:, 0, :] = 255
    return images, labels


def test_write_overlays(tmp_path):
    images, labels = _fake_images()
    preds = {"a": labels.clip(0, 1), "b": np.zeros_like(labels)}
    paths = write_overlays(tmp_path, images, labels, preds)
    assert [p.name for p in paths] == ["overlay_00.png", "overlay_01.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 2.5 * im.height  # four panels side by side
    with pytest.raises(ValueError, match=r"predictions\['b'\] must be"):
        write_overlays(tmp_path, images, labels, {"b": labels[:1]})
    with pytest.raises(ValueError, match=r"images must be \(N, H, W, 3\)"):
        write_overlays(tmp_path, images[..., 0], labels, preds)


def test_plot_trimap(tmp_path):
    path = plot_trimap(tmp_path / "t.png", _rows())
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 300
    rows = [{k: v for k, v in r.items() if k != "trimap_curve"} for r in _rows()]
    with pytest.raises(ValueError, match="no row has a non-empty 'trimap_curve'"):
        plot_trimap(tmp_path / "u.png", rows)


def test_write_report(tmp_path):
    images, labels = _fake_images()
    preds = {r["name"]: labels.clip(0, 1) for r in _rows()}
    out = write_report(
        tmp_path / "demo",
        _rows(),
        baseline="CNN alone",
        images=images,
        labels=labels,
        predictions=preds,
        meta={"steps": 10},
        notes=["Timings on a shared machine."],
    )
    text = out["report"].read_text()
    assert "| CNN + dense CRF | 63.0 |" in text
    assert "does **not**" not in text and "beats the CNN alone on only one" in text
    assert "![trimap accuracy vs band width](trimap.png)" in text
    assert "(overlays/overlay_01.png)" in text
    assert (tmp_path / "demo" / "overlays" / "overlay_00.png").is_file()
    assert json.loads(out["results"].read_text())["meta"] == {"steps": 10}
    assert out["table"] == format_table(_rows())
    # Same inputs, byte-identical files.
    again = write_report(
        tmp_path / "demo2",
        _rows(),
        baseline="CNN alone",
        images=images,
        labels=labels,
        predictions=preds,
        meta={"steps": 10},
        notes=["Timings on a shared machine."],
    )
    for key in ("results", "report", "plot"):
        assert out[key].read_bytes() == again[key].read_bytes(), key
    assert out["overlays"][0].read_bytes() == again["overlays"][0].read_bytes()


def test_overlay_draws_outlines_over_grey_and_a_legend(tmp_path):
    from deepcrf.data.palette import voc_palette
    from deepcrf.engine.report import _overlay

    image = np.zeros((10, 12, 3), np.uint8)
    image[..., 1] = 200  # a green picture: its colour must not show through
    labels = np.zeros((10, 12), np.int64)
    labels[2:8, 3:9] = 2
    out = _overlay(image, labels, 0.55).astype(int)
    grey = out[0, 0]
    assert grey[0] == grey[1] == grey[2]  # background: grey, untinted
    assert (out[2, 5] == voc_palette()[2]).all()  # the region's outline: its class colour
    inside = out[5, 5]
    assert not (inside == voc_palette()[2]).all() and inside[0] != inside[1]  # a light tint
    images, gts = _fake_images()
    paths = write_overlays(tmp_path, images, gts, {"a": gts}, class_names=["bg", "one", "two"])
    with Image.open(paths[0]) as im:
        assert im.height > 250  # room for the legend row
