import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from deepcrf.data import VOC_CLASSES, VOCSegmentation, train_transform
from deepcrf.data.palette import read_image, read_label_png, write_label_png
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


# --- VOCSegmentation ------------------------------------------------------------------------


def _rewrite_label(voc, name, labels):
    write_label_png(voc / "SegmentationClass" / f"{name}.png", labels)


def test_voc_items_match_files(fake_voc):
    ds = VOCSegmentation(fake_voc, "train")
    assert len(ds) == 3
    assert ds.names == ["2007_000001", "2007_000002", "2007_000003"]
    for i, name in enumerate(ds.names):
        image, labels = ds[i]
        assert image.dtype == torch.float32 and image.shape == (3, 48, 64)
        assert labels.dtype == torch.int64 and labels.shape == (48, 64)
        assert image.is_contiguous()
        expected_image = read_image(fake_voc / "JPEGImages" / f"{name}.jpg")
        expected_labels = read_label_png(fake_voc / "SegmentationClass" / f"{name}.png")
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected_image)
        np.testing.assert_array_equal(labels.numpy(), expected_labels)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 255.0
    image_neg, _ = ds[-1]
    assert torch.equal(image_neg, image)


@pytest.mark.parametrize("level", ["voc2012", "vocdevkit", "parent"])
def test_voc_root_levels_accepted(fake_voc, level):
    root = {"voc2012": fake_voc, "vocdevkit": fake_voc.parent, "parent": fake_voc.parent.parent}
    ds = VOCSegmentation(root[level], "val")
    assert ds.root == fake_voc
    assert len(ds) == 2
    assert len(VOCSegmentation(str(root[level]), "trainval")) == 5


def test_voc_not_a_voc_dir(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(ValueError, match=r"not a PASCAL VOC 2012 directory.*something"):
        VOCSegmentation(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VOCSegmentation(tmp_path / "nope", "train")


def test_voc_unknown_split_lists_available(fake_voc):
    with pytest.raises(
        FileNotFoundError, match=r"split 'test' not found.*\['train', 'trainval', 'val'\]"
    ):
        VOCSegmentation(fake_voc, "test")


def test_voc_empty_split(fake_voc):
    (fake_voc / "ImageSets" / "Segmentation" / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        VOCSegmentation(fake_voc, "empty")


def test_voc_missing_files_listed_with_count(fake_voc):
    names = [f"2010_{i:06d}" for i in range(8)]
    (fake_voc / "ImageSets" / "Segmentation" / "ghost.txt").write_text("\n".join(names))
    with pytest.raises(FileNotFoundError, match=r"8 of 8 images .*2010_000000\.jpg.* and 3 more"):
        VOCSegmentation(fake_voc, "ghost")
    (fake_voc / "SegmentationClass" / "2007_000002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 label files .*2007_000002\.png"):
        VOCSegmentation(fake_voc, "train")


def test_voc_corrupt_image_names_file(fake_voc):
    (fake_voc / "JPEGImages" / "2007_000002.jpg").write_bytes(b"not a jpeg at all")
    ds = VOCSegmentation(fake_voc, "train")
    ds[0]  # the others still load
    with pytest.raises(ValueError, match=r"2007_000002\.jpg \(corrupt"):
        ds[1]


def test_voc_corrupt_or_rgb_label_names_file(fake_voc):
    (fake_voc / "SegmentationClass" / "2008_000001.png").write_bytes(b"\x89PNG truncated")
    Image.new("RGB", (64, 48)).save(fake_voc / "SegmentationClass" / "2008_000002.png")
    ds = VOCSegmentation(fake_voc, "val")
    with pytest.raises(ValueError, match=r"cannot read label image .*2008_000001\.png"):
        ds[0]
    with pytest.raises(ValueError, match=r"2008_000002\.png must be a palette \(P\)"):
        ds[1]


def test_voc_size_mismatch_names_files(fake_voc):
    _rewrite_label(fake_voc, "2007_000003", np.zeros((40, 64), dtype=np.uint8))
    ds = VOCSegmentation(fake_voc, "train")
    with pytest.raises(ValueError, match=r"2007_000003\.jpg is 48x64.*2007_000003\.png are 40x64"):
        ds[2]


def test_voc_label_out_of_range_names_file(fake_voc):
    labels = np.zeros((48, 64), dtype=np.uint8)
    labels[0, :3] = 21
    labels[1, 0] = 255  # ignore is fine
    _rewrite_label(fake_voc, "2007_000001", labels)
    ds = VOCSegmentation(fake_voc, "train")
    with pytest.raises(
        ValueError, match=r"2007_000001\.png must be in \[0, 21\).*\[21\] in 3 pixels"
    ):
        ds[0]
    # With fewer classes, labels the fake tree draws become out of range.
    small = VOCSegmentation(fake_voc, "val", num_classes=2)
    with pytest.raises(ValueError, match=r"must be in \[0, 2\)"):
        small[0]


def test_voc_index_out_of_range(fake_voc):
    ds = VOCSegmentation(fake_voc, "val")
    with pytest.raises(IndexError, match="index 2 out of range"):
        ds[2]


def test_voc_bad_arguments(fake_voc):
    with pytest.raises(ValueError, match="num_classes must be an int in"):
        VOCSegmentation(fake_voc, "train", num_classes=0)
    with pytest.raises(TypeError, match="transform must be callable"):
        VOCSegmentation(fake_voc, "train", transform=3)


def test_voc_transform_applied(fake_voc):
    calls = []

    def transform(image, labels):
        calls.append((image.shape, labels.shape))
        return image[:, :10, :12], labels[:10, :12]

    ds = VOCSegmentation(fake_voc, "train", transform=transform)
    image, labels = ds[1]
    assert image.shape == (3, 10, 12) and labels.shape == (10, 12)
    assert calls == [((3, 48, 64), (48, 64))]


def test_voc_dataloader_batches(fake_voc):
    ds = VOCSegmentation(fake_voc, "trainval", transform=train_transform(32))
    images, labels = next(iter(DataLoader(ds, batch_size=4, shuffle=False)))
    assert images.shape == (4, 3, 32, 32) and labels.shape == (4, 32, 32)


def test_voc_classes():
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background"
    assert VOC_CLASSES[15] == "person"


def test_synthetic_voc_export_is_readable(tmp_path):
    # The demo's VOC export must be readable by VOCSegmentation (the CLI's --data path).
    from deepcrf.data.synthetic import write_voc

    root = write_voc(tmp_path / "synth", n_train=2, n_val=1, size=32, num_classes=4)
    ds = VOCSegmentation(root, "train", num_classes=4)
    assert len(ds) == 2
    image, labels = ds[0]
    assert image.shape == (3, 32, 32) and labels.shape == (32, 32)
    assert int(labels.max()) < 4


def test_fake_voc_colour_separates_classes(fake_voc):
    # A nearest-class-mean rule on RGB (a linear classifier a 1x1 conv can represent) labels
    # almost every non-void pixel right, far above always-background: a tiny CNN can learn it.
    ds = VOCSegmentation(fake_voc, "trainval")
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    labels = torch.stack([ds[i][1] for i in range(len(ds))])
    valid = labels != 255
    pixels, truth = images.permute(0, 2, 3, 1)[valid], labels[valid]
    classes = truth.unique()
    assert len(classes) > 3
    means = torch.stack([pixels[truth == c].mean(0) for c in classes])
    pred = classes[torch.cdist(pixels, means).argmin(1)]
    accuracy = float((pred == truth).float().mean())
    background = float((truth == 0).float().mean())
    assert accuracy > 0.98 and background < 0.9
