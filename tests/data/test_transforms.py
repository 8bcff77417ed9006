import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepcrf.data.transforms import (
    MEAN_RGB,
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    rescale,
    train_transform,
)


def _pair(h=12, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, h, w, generator=g) * 255
    labels = torch.randint(0, 21, (h, w), generator=g)
    labels[0, 0] = 255
    return image, labels


def _coord_pair(h, w):
    """Image whose channels encode (row, col, 0) and labels encoding row * w + col."""
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    image = torch.stack([rows, cols, torch.zeros(h, w)])
    labels = (rows * w + cols).to(torch.int64)
    return image, labels


def _nearest_reference(labels, out_h, out_w):
    """Half-pixel-centre nearest neighbour, one output pixel at a time."""
    h, w = labels.shape
    out = np.empty((out_h, out_w), dtype=np.int64)
    for i in range(out_h):
        for j in range(out_w):
            si = min(math.floor((i + 0.5) * h / out_h), h - 1)
            sj = min(math.floor((j + 0.5) * w / out_w), w - 1)
            out[i, j] = labels[si, sj]
    return out


@pytest.mark.parametrize("scale", [0.5, 0.73, 1.0, 1.3, 2.0])
def test_rescale_matches_references(scale):
    image, labels = _pair(11, 17)
    out_image, out_labels = rescale(image, labels, scale)
    size = (round(11 * scale), round(17 * scale))
    assert out_image.shape == (3, *size) and out_labels.shape == size
    assert out_labels.dtype == torch.int64
    expected = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out_image, expected)
    np.testing.assert_array_equal(out_labels.numpy(), _nearest_reference(labels.numpy(), *size))


def test_rescale_by_two_repeats_labels():
    image, labels = _pair(5, 7)
    _, out = rescale(image, labels, 2.0)
    torch.testing.assert_close(out, labels.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_rescale_keeps_colour_range_and_inputs():
    image, labels = _pair()
    before = image.clone(), labels.clone()
    out_image, _ = rescale(image, labels, 1.37)
    assert float(out_image.min()) >= float(image.min()) - 1e-4
    assert float(out_image.max()) <= float(image.max()) + 1e-4
    assert torch.equal(image, before[0]) and torch.equal(labels, before[1])
    same_image, same_labels = rescale(image, labels, 1.0)
    assert torch.equal(same_image, image) and same_image.data_ptr() != image.data_ptr()
    assert torch.equal(same_labels, labels) and same_labels.data_ptr() != labels.data_ptr()


def test_rescale_non_contiguous_input():
    image, labels = _pair(10, 14)
    image_nc = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    labels_nc = labels.t().contiguous().t()
    assert not image_nc.is_contiguous() and not labels_nc.is_contiguous()
    a = rescale(image, labels, 0.8)
    b = rescale(image_nc, labels_nc, 0.8)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_bad_inputs_raise():
    image, labels = _pair()
    with pytest.raises(ValueError, match=r"image must have 3 dimensions \(3, H, W\)"):
        rescale(image[None], labels, 1.0)
    with pytest.raises(ValueError, match=r"image must be \(3, H, W\) matching labels \(12, 16\)"):
        rescale(image[:, :, :5], labels, 1.0)
    with pytest.raises(ValueError, match=r"image must be \(3, H, W\) matching"):
        rescale(image[:2], labels, 1.0)
    with pytest.raises(TypeError, match="labels must have dtype in"):
        rescale(image, labels.to(torch.int32), 1.0)
    with pytest.raises(TypeError, match="image must have a floating-point dtype"):
        rescale(image.to(torch.uint8), labels, 1.0)
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        rescale(image, labels, 0.0)
    with pytest.raises(ValueError, match="scale range must satisfy"):
        RandomScale(1.5, 0.5)
    with pytest.raises(ValueError, match="size must be a positive int"):
        RandomCrop((0, 3))
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\]"):
        RandomHorizontalFlip(1.5)
    with pytest.raises(TypeError, match="every transform must be callable"):
        Compose([RandomHorizontalFlip(), "flip"])
    with pytest.raises(ValueError, match="image must be"):
        RandomCrop(4)(image[:, :3], labels)


def test_random_scale_range_and_determinism():
    image, labels = _pair(20, 30)
    t = RandomScale(0.5, 1.5)
    sizes = set()
    for _ in range(20):
        out_image, out_labels = t(image, labels)
        h, w = out_labels.shape
        assert 10 <= h <= 30 and 15 <= w <= 45
        assert out_image.shape == (3, h, w)
        sizes.add((h, w))
    assert len(sizes) > 3
    torch.manual_seed(7)
    first = [t(image, labels)[1].shape for _ in range(5)]
    torch.manual_seed(7)
    second = [t(image, labels)[1].shape for _ in range(5)]
    assert first == second


def test_random_crop_window_is_consistent():
    image, labels = _coord_pair(20, 30)
    t = RandomCrop((8, 10))
    offsets = set()
    for _ in range(20):
        crop_image, crop_labels = t(image, labels)
        assert crop_image.shape == (3, 8, 10) and crop_labels.shape == (8, 10)
        top, left = int(crop_image[0, 0, 0]), int(crop_image[1, 0, 0])
        assert 0 <= top <= 12 and 0 <= left <= 20
        torch.testing.assert_close(crop_image, image[:, top : top + 8, left : left + 10])
        torch.testing.assert_close(crop_labels, labels[top : top + 8, left : left + 10])
        offsets.add((top, left))
    assert len(offsets) > 5


def test_random_crop_pads_with_mean_and_ignore():
    image, labels = _pair(5, 6)
    crop_image, crop_labels = RandomCrop((9, 8))(image, labels)
    torch.testing.assert_close(crop_image[:, :5, :6], image)
    torch.testing.assert_close(crop_labels[:5, :6], labels)
    assert (crop_labels[5:, :] == 255).all() and (crop_labels[:, 6:] == 255).all()
    mean = torch.tensor(MEAN_RGB)
    torch.testing.assert_close(crop_image[:, 5:, :].amax((1, 2)), mean)
    torch.testing.assert_close(crop_image[:, :, 6:].amin((1, 2)), mean)


def test_random_crop_pads_one_side_and_crops_other():
    image, labels = _coord_pair(4, 30)
    t = RandomCrop((6, 10), fill=(1.0, 2.0, 3.0), ignore_index=99)
    crop_image, crop_labels = t(image, labels)
    left = int(crop_image[1, 0, 0])
    torch.testing.assert_close(crop_labels[:4], labels[:, left : left + 10])
    assert (crop_labels[4:] == 99).all()
    torch.testing.assert_close(
        crop_image[:, 4:, 0], torch.tensor([[1.0] * 2, [2.0] * 2, [3.0] * 2])
    )


def test_random_crop_does_not_alias_input():
    image, labels = _pair()
    crop_image, crop_labels = RandomCrop((12, 16))(image, labels)
    crop_image += 1
    crop_labels += 1
    assert torch.equal(image, _pair()[0]) and torch.equal(labels, _pair()[1])


def test_flip():
    image, labels = _pair()
    flipped = RandomHorizontalFlip(p=1.0)(image, labels)
    torch.testing.assert_close(flipped[0], image.flip(-1))
    torch.testing.assert_close(flipped[1], labels.flip(-1))
    kept = RandomHorizontalFlip(p=0.0)(image, labels)
    torch.testing.assert_close(kept[0], image)
    torch.testing.assert_close(kept[1], labels)
    t = RandomHorizontalFlip()
    outcomes = {bool(torch.equal(t(image, labels)[1], labels)) for _ in range(30)}
    assert outcomes == {True, False}


def test_train_transform_shapes_and_ignore():
    image, labels = _pair(40, 50)
    t = train_transform((33, 35))
    for _ in range(5):
        out_image, out_labels = t(image, labels)
        assert out_image.shape == (3, 33, 35) and out_labels.shape == (33, 35)
        assert out_image.dtype == torch.float32 and out_labels.dtype == torch.int64
        assert set(torch.unique(out_labels).tolist()) <= set(range(21)) | {255}
    assert len(train_transform(8, scale_range=None, flip=False).transforms) == 1


def test_train_transform_global_rng_reproducible():
    image, labels = _pair(40, 50)
    t = train_transform(32)
    torch.manual_seed(123)
    a = [t(image, labels) for _ in range(3)]
    torch.manual_seed(123)
    b = [t(image, labels) for _ in range(3)]
    for (ia, la), (ib, lb) in zip(a, b, strict=True):
        assert torch.equal(ia, ib) and torch.equal(la, lb)
    assert not all(torch.equal(x[1], a[0][1]) for x in a[1:])


def test_train_transform_generator_independent_of_global_rng():
    image, labels = _pair(40, 50)

    def run(global_seed):
        torch.manual_seed(global_seed)
        t = train_transform(32, generator=torch.Generator().manual_seed(5))
        return [t(image, labels) for _ in range(3)]

    for (ia, la), (ib, lb) in zip(run(0), run(1), strict=True):
        assert torch.equal(ia, ib) and torch.equal(la, lb)


@pytest.mark.gpu
def test_transforms_cpu_cuda_agree():
    image, labels = _pair(40, 50)
    cpu = rescale(image, labels, 0.77)
    gpu = rescale(image.cuda(), labels.cuda(), 0.77)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1])
    crop = RandomCrop((45, 55), generator=torch.Generator().manual_seed(0))
    crop_cpu = crop(image, labels)
    crop.generator.manual_seed(0)
    crop_gpu = crop(image.cuda(), labels.cuda())
    torch.testing.assert_close(crop_gpu[0].cpu(), crop_cpu[0])
    torch.testing.assert_close(crop_gpu[1].cpu(), crop_cpu[1])
