import numpy as np
import pytest

from deepcrf.data.synthetic_volume import VOLUME_CLASSES, SyntheticVolumes


def test_volumes_are_deterministic_and_disjoint_across_splits():
    a = SyntheticVolumes("train", 2, shape=(8, 20, 24), modalities=2)
    b = SyntheticVolumes("train", 2, shape=(8, 20, 24), modalities=2)
    item = a[1]
    assert item.image.shape == (2, 8, 20, 24) and item.image.dtype == np.float32
    assert item.labels.shape == (8, 20, 24) and item.spacing == (2.5, 1.0, 1.0)
    np.testing.assert_array_equal(item.image, b[1].image)
    assert not np.array_equal(a[0].labels, a[1].labels)
    val = SyntheticVolumes("val", 2, shape=(8, 20, 24), modalities=2)
    assert not np.array_equal(val[0].image, item.image)
    assert set(np.unique(item.labels)) <= set(range(len(VOLUME_CLASSES)))


def test_partial_volume_edges_and_class_contrast():
    vol = SyntheticVolumes("val", 1, shape=(16, 48, 48), modalities=2, noise=0.0)[0]
    img, lab = vol.image, vol.labels
    assert np.bincount(lab.ravel(), minlength=3).min() > 0  # every class is present
    bg, organ = img[0][lab == 0], img[0][lab == 1]
    assert organ.mean() > bg.mean() + 50
    # Voxels on the organ's surface mix organ and background: values strictly in between.
    edge = (lab == 1) & (np.roll(lab, 1, 0) == 0)
    mixed = img[0][edge]
    assert (mixed < organ.max() - 5).mean() > 0.5 and (mixed > bg.min() + 5).all()
    # Modality 1 tells lesions from organ far better than modality 0.
    les = lab == 2
    gap0 = abs(img[0][les].mean() - organ.mean())
    gap1 = abs(img[1][les].mean() - img[1][lab == 1].mean())
    assert gap1 > 1.5 * gap0


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        SyntheticVolumes("test")
    with pytest.raises(ValueError, match="modalities must be 1 or 2"):
        SyntheticVolumes(modalities=3)
    with pytest.raises(ValueError, match="spacing must be 3 positive"):
        SyntheticVolumes(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(IndexError):
        SyntheticVolumes(count=2)[2]
