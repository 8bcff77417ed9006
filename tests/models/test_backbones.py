import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deepcrf.models as models
from deepcrf.models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SMALL_BACKBONE_LAYERS,
    SmallBackbone,
    SmallSegNet,
    VGG16Atrous,
    build_backbone,
    check_image,
    receptive_field,
    upsample_logits,
)


def _image(b=1, h=65, w=81, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 255


# ---------------------------------------------------------------------------- input checks


def test_check_image_errors():
    with pytest.raises(TypeError, match=r"image must be a torch.Tensor"):
        check_image([[1.0]])
    with pytest.raises(ValueError, match=r"image must have 4 dimensions.*got shape \(3, 8, 8\)"):
        check_image(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"image must be \(B, 3, H, W\).*got shape \(1, 4, 8, 8\)"):
        check_image(torch.zeros(1, 4, 8, 8))
    with pytest.raises(TypeError, match=r"image must have a floating-point dtype.*torch.uint8"):
        check_image(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"image must not be empty"):
        check_image(torch.zeros(1, 3, 0, 8))


@pytest.mark.parametrize("factory", [lambda: SmallSegNet(3), lambda: models.create("small", 3)])
def test_model_rejects_bad_images(factory):
    net = factory().eval()
    with pytest.raises(ValueError, match=r"image must be \(B, 3, H, W\)"):
        net(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"image must have 4 dimensions"):
        net(torch.zeros(3, 16, 16))
    with pytest.raises(TypeError, match=r"floating-point dtype"):
        net(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_forward_features_rejects_bad_input():
    bb = SmallBackbone(8)
    with pytest.raises(ValueError, match=r"x must be \(B, 3, H, W\) normalised image"):
        bb.forward_features(torch.zeros(1, 5, 16, 16))
    with pytest.raises(TypeError, match=r"x must have a floating-point dtype"):
        bb.forward_features(torch.zeros(1, 3, 16, 16, dtype=torch.int64))


# ---------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("backbone", [SmallBackbone(8), VGG16Atrous()])
def test_normalize_is_imagenet_and_does_not_mutate(backbone):
    image = _image(2, 5, 7)
    before = image.clone()
    out = backbone.normalize(image)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (image / 255 - mean) / std, rtol=1e-5, atol=1e-5)
    assert torch.equal(image, before)
    # the buffers follow the model's dtype
    assert backbone.double().normalize(image).dtype == torch.float64
    assert "mean" not in backbone.state_dict()  # architecture constants, not checkpoint state


# ---------------------------------------------------------------------------- upsampling


def test_upsample_hits_feature_centres_and_interpolates():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    out = upsample_logits(scores, (29, 37), stride=8)
    assert out.shape == (2, 3, 29, 37)
    # feature (i, j) sits on pixel (8i, 8j)
    torch.testing.assert_close(out[:, :, ::8, ::8], scores)
    # midway between two features: their mean; past the last feature: clamped
    torch.testing.assert_close(out[:, :, 4, 0], (scores[:, :, 0, 0] + scores[:, :, 1, 0]) / 2)
    torch.testing.assert_close(out[:, :, 26, 34], scores[:, :, 3, 4])
    # weights are a partition of unity: constant maps stay constant, in every float dtype
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        const = upsample_logits(torch.full((1, 2, 4, 5), 3.0, dtype=dtype), (29, 37))
        assert const.dtype == dtype
        torch.testing.assert_close(const, torch.full_like(const, 3.0))


def test_upsample_matches_align_corners_on_deeplab_sizes():
    # DeepLab's sizes H = 8(h-1)+1 (e.g. 321 -> 41): its Interp layer is align_corners=True.
    scores = torch.randn(1, 4, 6, 7)
    out = upsample_logits(scores, (41, 49), stride=8)
    ref = F.interpolate(scores, size=(41, 49), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_upsample_single_feature_and_errors():
    scores = torch.randn(1, 2, 1, 1)
    out = upsample_logits(scores, (3, 5))
    torch.testing.assert_close(out, scores.expand(1, 2, 3, 5))
    with pytest.raises(ValueError, match=r"scores must have 4 dimensions"):
        upsample_logits(torch.zeros(2, 3, 4), (8, 8))
    with pytest.raises(ValueError, match=r"size must be positive"):
        upsample_logits(scores, (0, 4))


def test_upsample_gradcheck():
    scores = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: upsample_logits(s, (17, 11)), (scores,))


# ---------------------------------------------------------------------------- small backbone


@pytest.mark.parametrize("size", [(65, 81), (64, 64), (1, 1), (9, 16), (127, 33)])
def test_small_backbone_stride8_shapes(size):
    bb = SmallBackbone(8).eval()
    h, w = size
    feats = bb.forward_features(bb.normalize(_image(2, h, w)))
    assert feats.shape == (2, bb.out_channels, math.ceil(h / 8), math.ceil(w / 8))
    assert bb.stride == 8 and bb.out_channels == 32


def test_small_backbone_dilations():
    convs = [m for m in SmallBackbone(8).modules() if isinstance(m, nn.Conv2d)]
    got = [(c.kernel_size[0], c.stride[0], c.dilation[0]) for c in convs]
    assert got == SMALL_BACKBONE_LAYERS
    assert all(c.padding[0] == c.dilation[0] for c in convs)  # 3x3 kernels stay centred


def test_small_backbone_receptive_field_measured_by_gradient():
    # Positive weights and biases keep every ReLU open, so the network is linear with no
    # cancellations and the gradient support of one feature is exactly its receptive field.
    bb = SmallBackbone(4, norm="none")
    with torch.no_grad():
        for p in bb.parameters():
            p.copy_(p.abs() + 0.01)
    x = torch.zeros(1, 3, 161, 161, requires_grad=True)
    feats = bb.forward_features(x)
    feats[0, :, 10, 10].sum().backward()  # feature (10, 10) is centred on pixel (80, 80)
    rows = torch.nonzero(x.grad[0].abs().sum(dim=(0, 2)))
    cols = torch.nonzero(x.grad[0].abs().sum(dim=(0, 1)))
    rf = receptive_field(SMALL_BACKBONE_LAYERS)
    assert rf == 125
    assert rows.min().item() == 80 - rf // 2 and rows.max().item() == 80 + rf // 2
    assert cols.min().item() == 80 - rf // 2 and cols.max().item() == 80 + rf // 2


def test_receptive_field_formula():
    assert receptive_field([(3, 1, 1)]) == 3
    assert receptive_field([(3, 2, 1), (3, 1, 1)]) == 7
    assert receptive_field([(3, 1, 12)]) == 25


# ---------------------------------------------------------------------------- small model


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_small_segnet_logits_at_input_resolution(norm):
    net = SmallSegNet(5, width=8, hidden=16, norm=norm).eval()
    logits = net(_image(2, 65, 81))
    assert logits.shape == (2, 5, 65, 81)
    assert torch.isfinite(logits).all()
    assert net.num_classes == 5 and net.stride == 8


def test_small_segnet_batch_equals_items_and_noncontiguous():
    net = SmallSegNet(3, width=8, hidden=16).eval()
    image = _image(3, 40, 48)
    full = net(image)
    for i in range(3):
        torch.testing.assert_close(full[i : i + 1], net(image[i : i + 1]), rtol=1e-4, atol=1e-4)
    nc = image.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # same values, strided
    assert not nc.is_contiguous()
    torch.testing.assert_close(net(nc), full, rtol=1e-4, atol=1e-4)


def test_small_segnet_deterministic_on_cpu():
    def run():
        torch.manual_seed(123)
        net = SmallSegNet(4, width=8, hidden=16)
        net.train()
        image = _image(2, 32, 40)
        labels = torch.randint(0, 4, (2, 32, 40), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(7)  # dropout masks
        loss = F.cross_entropy(net(image), labels)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    loss_a, grads_a = run()
    loss_b, grads_b = run()
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))


def test_small_segnet_gradients_reach_every_parameter():
    net = SmallSegNet(4, width=8, hidden=16)
    image = _image(2, 24, 24).requires_grad_(True)
    labels = torch.randint(0, 4, (2, 24, 24))
    F.cross_entropy(net(image), labels).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_small_segnet_argument_errors():
    with pytest.raises(ValueError, match=r"num_classes must be >= 1; got 0"):
        SmallSegNet(0)
    with pytest.raises(ValueError, match=r"norm must be 'batch', 'group' or 'none'; got 'layer'"):
        SmallSegNet(3, norm="layer")
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        SmallSegNet(3, dropout=1.0)
    with pytest.raises(ValueError, match=r"head_dilation must be >= 1"):
        SmallSegNet(3, head_dilation=0)


def test_small_in_registry():
    assert "small" in models.available()
    net = models.create("small", 6, width=8, hidden=16)
    assert isinstance(net, SmallSegNet) and net.num_classes == 6
    assert net.backbone.out_channels == 32
    with pytest.raises(ValueError, match=r"'small' has no ImageNet weights"):
        models.create("small", 6, pretrained="vgg16.pth")


def test_build_backbone():
    assert isinstance(build_backbone("small", width=8), SmallBackbone)
    vgg = build_backbone("vgg16")
    assert isinstance(vgg, VGG16Atrous) and vgg.out_channels == 512 and vgg.stride == 8
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet'"):
        build_backbone("resnet")


@pytest.mark.gpu
def test_small_segnet_cpu_and_cuda_agree():
    net = SmallSegNet(4, width=8, hidden=16).eval()
    image = _image(2, 33, 47)
    with torch.no_grad():
        cpu = net(image)
        gpu = net.to("cuda")(image.to("cuda")).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)
    scores = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(
        upsample_logits(scores.cuda(), (33, 47)).cpu(), upsample_logits(scores, (33, 47))
    )


@pytest.mark.slow  # 60 SGD steps: ~3 s on one idle core, minutes on a loaded shared machine
def test_small_segnet_learns_a_colour_rule():
    # Two classes told apart by colour (red discs on green background): plain SGD on the
    # default architecture must fit them, the sanity check that the net can train at all.
    # (Measured: majority-class plateau for ~30 steps, then ~0.92 pixel accuracy by step 60;
    # the stride-8 score map limits accuracy on 32×32 images.)
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    labels = torch.stack([((yy - cy) ** 2 + (xx - cx) ** 2 < 150).long() for cy, cx in
                          [(10, 12), (20, 22), (16, 8), (8, 24)]])  # fmt: skip
    image = torch.stack([torch.stack([200.0 * lab, 200.0 * (1 - lab), 30.0 + 0 * lab])
                         for lab in labels.float()])  # fmt: skip
    image = image + 20 * torch.rand(image.shape, generator=torch.Generator().manual_seed(1))
    net = SmallSegNet(2, width=8, hidden=16)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.cross_entropy(net(image), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    net.eval()
    with torch.no_grad():
        accuracy = (net(image).argmax(1) == labels).float().mean().item()
    majority = 1 - labels.float().mean().item()  # 0.58
    assert accuracy > majority + 0.25, (accuracy, majority)
    assert losses[-1] < 0.5 * losses[0]
