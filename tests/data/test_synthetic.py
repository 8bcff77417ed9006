import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from deepcrf.cli import main
from deepcrf.data.palette import read_image, read_label_png
from deepcrf.data.synthetic import (
    CLASS_NAMES,
    DEFAULT_SIZES,
    SyntheticSegmentation,
    class_names,
    write_voc,
)


def _digest(ds: SyntheticSegmentation, indices) -> str:
    h = hashlib.sha256()
    for i in indices:
        image, labels = ds.sample(i)
        h.update(image.tobytes())
        h.update(labels.tobytes())
    return h.hexdigest()


def test_item_contract():
    ds = SyntheticSegmentation("train", n=3, size=(48, 64), num_classes=5)
    assert len(ds) == 3
    image, labels = ds[1]
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, 48, 64)
    assert labels.dtype == torch.int64 and tuple(labels.shape) == (48, 64)
    assert image.min() >= 0 and image.max() <= 255
    assert torch.equal(image, image.round())  # 8-bit like a photograph
    assert labels.min() >= 0 and labels.max() < 5
    assert ds.class_names == CLASS_NAMES[:5] == class_names(5)
    assert [tuple(t.shape) for t in ds[-1]] == [(3, 48, 64), (48, 64)]
    assert len(list(iter(ds))) == 3


def test_defaults():
    for split, n in DEFAULT_SIZES.items():
        assert len(SyntheticSegmentation(split)) == n
    assert SyntheticSegmentation("val").size == (96, 96)


def test_deterministic_and_independent_of_access_order():
    a = SyntheticSegmentation("val", n=6, size=64, seed=3)
    b = SyntheticSegmentation("val", n=6, size=64, seed=3)
    # b is read backwards and only partly: item i depends only on (seed, split, i).
    for i in reversed(range(2, 6)):
        b.sample(i)
    assert _digest(a, range(6)) == _digest(b, range(6))
    # n does not change the items either.
    c = SyntheticSegmentation("val", n=100, size=64, seed=3)
    assert _digest(a, range(6)) == _digest(c, range(6))


def test_seeds_and_splits_differ():
    base = SyntheticSegmentation("train", n=2, size=64, seed=0)
    other_seed = SyntheticSegmentation("train", n=2, size=64, seed=1)
    other_split = SyntheticSegmentation("tune", n=2, size=64, seed=0)
    digests = {_digest(d, range(2)) for d in (base, other_seed, other_split)}
    assert len(digests) == 3


def test_sample_returns_copies():
    ds = SyntheticSegmentation("train", n=1, size=48)
    image, labels = ds.sample(0)
    image[:] = 0
    labels[:] = 7
    image2, labels2 = ds.sample(0)
    assert image2.any() and (labels2 != 7).any()
    t_image, _ = ds[0]
    t_image.zero_()
    assert ds[0][0].any()


def test_statistics_classes_boundaries_and_thin_parts():
    ds = SyntheticSegmentation("train", n=40, size=96, num_classes=6)
    counts = np.zeros(6)
    thin = 0
    boundary_fraction = []
    fg_contrast = []
    for i in range(len(ds)):
        image, labels = ds.sample(i)
        counts += np.bincount(labels.ravel(), minlength=6)
        edges = (labels[1:, :] != labels[:-1, :]).mean() + (labels[:, 1:] != labels[:, :-1]).mean()
        boundary_fraction.append(edges)
        # Thin parts: foreground pixels whose 5x5 neighbourhood is mostly another label.
        fg = labels > 0
        pad = np.pad(fg, 2)
        window = sum(
            pad[2 + dy : 2 + dy + 96, 2 + dx : 2 + dx + 96]
            for dy in range(-2, 3)
            for dx in range(-2, 3)
        )
        thin += int((fg & (window <= 10)).sum())
        if fg.any() and (~fg).any():
            fg_contrast.append(np.abs(image[fg].mean(0) - image[~fg].mean(0)).max())
    frac = counts / counts.sum()
    assert (counts > 0).all(), f"every class appears: {counts}"
    assert 0.55 < frac[0] < 0.95, f"background fraction {frac[0]}"
    assert frac[1:].min() > 0.01, f"object classes too rare: {frac}"
    assert np.mean(boundary_fraction) > 0.02  # plenty of boundaries per image
    assert thin > 200  # legs, stems, arms narrower than a stride-8 cell exist
    assert np.mean(fg_contrast) > 10  # objects differ from background on average


def test_class_colour_statistics_overlap_but_differ():
    ds = SyntheticSegmentation("train", 60, size=64, num_classes=6)
    pixels = {c: [] for c in range(6)}
    for i in range(len(ds)):
        image, labels = ds.sample(i)
        for c in range(6):
            pixels[c].append(image[labels == c].astype(np.float64))
    colours = {c: np.concatenate(v) for c, v in pixels.items()}
    centres = np.stack([colours[c].mean(0) for c in range(6)])
    dists = [np.linalg.norm(centres[a] - centres[b]) for a in range(1, 6) for b in range(a + 1, 6)]
    assert min(dists) > 30  # object classes are distinct on average (nearest pair: 90)
    # ... but pixels overlap: a nearest-mean-colour classifier over the object classes gets a
    # sizeable fraction wrong (texture, shading, jitter and noise), so colour alone is not enough.
    fg = np.concatenate([colours[c] for c in range(1, 6)])
    truth = np.concatenate([np.full(len(colours[c]), c) for c in range(1, 6)])
    nearest = 1 + np.argmin(((fg[:, None, :] - centres[None, 1:, :]) ** 2).sum(-1), axis=1)
    error = (nearest != truth).mean()
    assert 0.015 < error < 0.5, error  # 0.031 with these settings
    # Backgrounds are muted on average but cover the object colours in places (clutter).
    bg = colours[0]
    near_object = (((bg[:, None, :] - centres[None, 1:, :]) ** 2).sum(-1) < 40.0**2).any(1)
    assert 0.008 < near_object.mean() < 0.5, near_object.mean()  # 0.016


def test_noise_and_soft_edges():
    ds = SyntheticSegmentation("val", n=5, size=96)
    image, labels = ds.sample(0)
    img = image.astype(np.float64)
    # Pixel noise: horizontal differences inside uniform label regions are never all zero.
    same = labels[:, 1:] == labels[:, :-1]
    diffs = np.abs(img[:, 1:] - img[:, :-1])[same]
    assert diffs.mean() > 2
    # Soft edges: across label boundaries colour changes over more than one pixel, so some
    # pixels just inside boundaries take intermediate values (neither side's colour exactly).
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 1000


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "test"}, "split must be one of"),
        ({"n": 0}, "n must be an int >= 1"),
        ({"size": 8}, r"size \(H, W\) must lie in"),
        ({"size": (64, 64, 3)}, "size must be an int or an"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"num_classes": 1}, r"num_classes must be in \[2, 8\]"),
        ({"num_classes": 9}, r"num_classes must be in \[2, 8\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticSegmentation(**kwargs)


def test_bad_index():
    ds = SyntheticSegmentation("val", n=2, size=32)
    with pytest.raises(IndexError, match="out of range"):
        ds[2]
    with pytest.raises(TypeError, match="index must be an int"):
        ds["0"]


def test_write_voc_layout_and_readback(tmp_path):
    out = write_voc(tmp_path / "synth", n_train=4, n_val=3, n_tune=2, size=(48, 64), seed=5)
    sets = out / "ImageSets" / "Segmentation"
    assert (sets / "train.txt").read_text().split() == [f"train_{i:05d}" for i in range(4)]
    assert (sets / "val.txt").read_text().split() == [f"val_{i:05d}" for i in range(3)]
    assert len((sets / "trainval.txt").read_text().split()) == 7
    assert len((sets / "tune.txt").read_text().split()) == 2
    meta = json.loads((out / "deepcrf_synthetic.json").read_text())
    assert meta["class_names"] == list(CLASS_NAMES[:6]) and meta["size"] == [48, 64]
    ds = SyntheticSegmentation("val", n=3, size=(48, 64), seed=5)
    for i, image_id in enumerate(ds.ids()):
        image, labels = ds.sample(i)
        with Image.open(out / "SegmentationClass" / f"{image_id}.png") as im:
            assert im.mode == "P"
        np.testing.assert_array_equal(read_label_png(out / "SegmentationClass" / f"{image_id}.png"),
                                      labels)  # fmt: skip
        jpg = read_image(out / "JPEGImages" / f"{image_id}.jpg")
        assert jpg.shape == image.shape
        # JPEG quality 95 without chroma subsampling: close, not exact.
        assert np.abs(jpg.astype(float) - image).mean() < 4
    # No staging folder is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]


def test_write_voc_readable_by_voc_reader(tmp_path):
    voc = pytest.importorskip("deepcrf.data.voc")
    out = write_voc(tmp_path / "synth", n_train=3, n_val=2, size=48, num_classes=4)
    ds = voc.VOCSegmentation(out, "val", num_classes=4)
    assert len(ds) == 2
    image, labels = ds[1]
    assert tuple(image.shape) == (3, 48, 48) and labels.dtype == torch.int64
    _, expected = SyntheticSegmentation("val", n=2, size=48, num_classes=4)[1]
    assert torch.equal(labels, expected)


def test_write_voc_refuses_non_empty_unless_forced(tmp_path):
    out = tmp_path / "synth"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        write_voc(out, n_train=1, n_val=1, size=32)
    write_voc(out, n_train=1, n_val=1, size=32, force=True)
    assert (out / "keep.txt").read_text() == "user data"
    assert (out / "JPEGImages" / "train_00000.jpg").is_file()
    # An existing empty folder is fine without force.
    empty = tmp_path / "empty"
    empty.mkdir()
    write_voc(empty, n_train=1, n_val=1, size=32)
    assert (empty / "SegmentationClass" / "val_00000.png").is_file()


def test_write_voc_failure_leaves_nothing(tmp_path, monkeypatch):
    import deepcrf.data.synthetic as synthetic

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "write_label_png", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_voc(tmp_path / "synth", n_train=1, n_val=1, size=32)
    assert list(tmp_path.iterdir()) == []


def test_cli_data_synth(tmp_path, capsys):
    out = tmp_path / "voc"
    argv = ["data", "synth", "--out", str(out), "--n-train", "2", "--n-val", "2"]
    assert main([*argv, "--n-tune", "1", "--size", "40", "48", "--num-classes", "3"]) == 0
    assert "wrote 5 images of 40x48 px" in capsys.readouterr().out
    assert read_label_png(out / "SegmentationClass" / "tune_00000.png").shape == (40, 48)
    # A second run into the same (now non-empty) folder is refused with a clear error.
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    assert main([*argv[:-4], "--size", "1", "2", "3"]) == 2
