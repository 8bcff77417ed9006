import numpy as np

from deepcrf.data.palette import read_image, read_label_png
from tests.fakevoc import make_fake_voc


def test_fake_voc_layout(fake_voc):
    assert fake_voc.name == "VOC2012"
    sets = fake_voc / "ImageSets" / "Segmentation"
    train = sets.joinpath("train.txt").read_text().split()
    val = sets.joinpath("val.txt").read_text().split()
    assert len(train) == 3 and len(val) == 2 and not set(train) & set(val)
    assert sorted(sets.joinpath("trainval.txt").read_text().split()) == sorted(train + val)
    for name in train + val:
        image = read_image(fake_voc / "JPEGImages" / f"{name}.jpg")
        labels = read_label_png(fake_voc / "SegmentationClass" / f"{name}.png")
        assert image.shape == (48, 64, 3)
        assert labels.shape == (48, 64)
        values = set(np.unique(labels).tolist())
        assert 255 in values and 0 in values
        assert all(v < 21 or v == 255 for v in values)


def test_fake_voc_is_seeded(tmp_path):
    a = make_fake_voc(tmp_path / "a", seed=3)
    b = make_fake_voc(tmp_path / "b", seed=3)
    c = make_fake_voc(tmp_path / "c", seed=4)
    name = "2007_000001"
    for sub, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png")):
        assert (a / sub / f"{name}.{ext}").read_bytes() == (b / sub / f"{name}.{ext}").read_bytes()
    la = read_label_png(a / "SegmentationClass" / f"{name}.png")
    lc = read_label_png(c / "SegmentationClass" / f"{name}.png")
    assert not np.array_equal(la, lc)


def test_fake_voc_colour_predicts_label(fake_voc):
    # Per-class mean colours are far apart relative to the noise, so a tiny CNN can learn.
    name = "2007_000001"
    image = read_image(fake_voc / "JPEGImages" / f"{name}.jpg").astype(np.float64)
    labels = read_label_png(fake_voc / "SegmentationClass" / f"{name}.png")
    classes = [c for c in np.unique(labels) if c != 255]
    means = np.stack([image[labels == c].mean(0) for c in classes])
    stds = np.stack([image[labels == c].std(0) for c in classes])
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1)[~np.eye(len(classes), dtype=bool)]
    assert gaps.min() > 3 * stds.max()
