import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import loadmat, savemat

from deepcrf.data import (
    SBDSegmentation,
    SegmentationFiles,
    VOCSegmentation,
    build_dataset,
    read_sbd_mat,
    train_aug,
)
from deepcrf.data.palette import read_label_png
from deepcrf.data.sbd import train_aug_names
from tests.fakevoc import make_fake_sbd, make_fake_voc


@pytest.fixture
def trees(tmp_path):
    voc = make_fake_voc(tmp_path)
    sbd = make_fake_sbd(tmp_path)
    return voc, sbd


def test_read_sbd_mat_matches_savemat(tmp_path):
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4) % 21
    savemat(tmp_path / "a.mat", {"GTcls": {"Segmentation": labels, "Boundaries": np.zeros(1)}})
    np.testing.assert_array_equal(read_sbd_mat(tmp_path / "a.mat"), labels)


def test_read_sbd_mat_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="SBD label file not found"):
        read_sbd_mat(tmp_path / "none.mat")
    (tmp_path / "junk.mat").write_bytes(b"\x00garbage" * 20)
    with pytest.raises(ValueError, match=r"cannot read SBD label file .*junk\.mat"):
        read_sbd_mat(tmp_path / "junk.mat")
    savemat(tmp_path / "other.mat", {"GTinst": {"Segmentation": np.zeros((2, 2), np.uint8)}})
    with pytest.raises(ValueError, match=r"other\.mat has no GTcls\.Segmentation"):
        read_sbd_mat(tmp_path / "other.mat")
    savemat(tmp_path / "flat.mat", {"GTcls": {"Segmentation": np.zeros((2, 2, 2), np.uint8)}})
    with pytest.raises(ValueError, match="must be a non-empty 2-D integer label map"):
        read_sbd_mat(tmp_path / "flat.mat")


def test_sbd_dataset_items(trees):
    _, sbd = trees
    ds = SBDSegmentation(sbd, "train")
    assert ds.names == ["2007_000001", "2009_000001", "2009_000002"]
    image, labels = ds[1]
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32
    assert labels.dtype == torch.int64
    mat = loadmat(sbd / "cls" / "2009_000001.mat")["GTcls"]["Segmentation"][0, 0]
    np.testing.assert_array_equal(labels.numpy(), mat)
    expected = np.asarray(Image.open(sbd / "img" / "2009_000001.jpg").convert("RGB"))
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected)
    # Parents of the dataset directory are accepted.
    assert len(SBDSegmentation(sbd.parent, "val")) == 2
    assert len(SBDSegmentation(sbd.parent.parent, "val")) == 2


def test_sbd_errors(trees, tmp_path):
    _, sbd = trees
    with pytest.raises(ValueError, match="is not an SBD directory"):
        SBDSegmentation(tmp_path / "VOCdevkit", "train")
    with pytest.raises(FileNotFoundError, match=r"split file not found: .*test\.txt"):
        SBDSegmentation(sbd, "test")
    (sbd / "cls" / "2009_000002.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 3 label files .*2009_000002\.mat"):
        SBDSegmentation(sbd, "train")


def test_train_aug_set_algebra(trees):
    voc, sbd = trees
    # SBD train {07_1, 09_1, 09_2} + SBD val {08_1, 09_3} + VOC train {07_1, 07_2, 07_3}
    # - VOC val {08_1, 08_2}.
    expected = ["2007_000001", "2007_000002", "2007_000003", "2009_000001", "2009_000002",
                "2009_000003"]  # fmt: skip
    assert train_aug_names(voc, sbd) == expected
    ds = train_aug(voc, sbd)
    assert isinstance(ds, SegmentationFiles)
    assert ds.names == expected
    assert "2008_000001" not in ds.names  # a VOC val image in SBD val must be removed


def test_train_aug_prefers_voc_labels(trees):
    voc, sbd = trees
    ds = train_aug(voc, sbd)
    by_name = dict(zip(ds.names, range(len(ds)), strict=True))
    # 2007_000001 is annotated by both: VOC's PNG (with its 255 band) wins.
    _, labels = ds[by_name["2007_000001"]]
    voc_png = read_label_png(voc / "SegmentationClass" / "2007_000001.png")
    np.testing.assert_array_equal(labels.numpy(), voc_png)
    assert (labels == 255).any()
    assert ds.label_paths[by_name["2007_000001"]].suffix == ".png"
    # 2009_000003 exists only in SBD: labels from the .mat, image from SBD's img/.
    index = by_name["2009_000003"]
    assert ds.label_paths[index].suffix == ".mat"
    assert ds.image_paths[index] == sbd / "img" / "2009_000003.jpg"
    _, labels = ds[index]
    np.testing.assert_array_equal(labels.numpy(), read_sbd_mat(sbd / "cls" / "2009_000003.mat"))


def test_train_aug_prefers_voc_images(trees):
    voc, sbd = trees
    # VOC 2012's JPEGImages holds every SBD image: use it when present.
    Image.new("RGB", (64, 48), (1, 2, 3)).save(voc / "JPEGImages" / "2009_000001.jpg")
    ds = train_aug(voc, sbd)
    index = ds.names.index("2009_000001")
    assert ds.image_paths[index] == voc / "JPEGImages" / "2009_000001.jpg"
    image, _ = ds[index]
    assert torch.allclose(image[:, 0, 0], torch.tensor([1.0, 2.0, 3.0]), atol=2)


def test_build_dataset_splits(trees, tmp_path):
    voc, sbd = trees
    val = build_dataset(voc.parent, "val")
    assert isinstance(val, VOCSegmentation) and len(val) == 2
    # train_aug finds benchmark_RELEASE beside VOCdevkit, or takes sbd_root explicitly.
    assert len(build_dataset(voc, "train_aug")) == 6
    assert len(build_dataset(voc, "train_aug", sbd_root=sbd.parent)) == 6
    with pytest.raises(ValueError, match="not a PASCAL VOC 2012 directory"):
        build_dataset(sbd, "train")


def test_build_dataset_train_aug_from_segmentationclassaug(tmp_path):
    voc = make_fake_voc(tmp_path)
    with pytest.raises(ValueError, match="split 'train_aug' needs SBD"):
        build_dataset(voc, "train_aug")
    aug = voc / "SegmentationClassAug"
    aug.mkdir()
    names = ["2007_000001", "2007_000003"]
    for name in names:
        labels = read_label_png(voc / "SegmentationClass" / f"{name}.png")
        # The shared "Aug" PNGs are greyscale (mode L) label ids.
        Image.fromarray(np.where(labels == 255, 0, labels).astype(np.uint8), mode="L").save(
            aug / f"{name}.png"
        )
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("\n".join(names) + "\n")
    ds = build_dataset(voc, "train_aug")
    assert ds.names == names
    _, labels = ds[1]
    assert not (labels == 255).any()
