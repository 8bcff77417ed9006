import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deepcrf.models as models
from deepcrf.models.backbones import (
    TORCHVISION_VGG16_CONV_INDEX,
    SmallSegNet,
    VGG16Atrous,
    load_vgg16_imagenet,
    receptive_field,
)
from deepcrf.models.deeplab import DeepLabV1, MultiScaleBranch
from deepcrf.models.segmenter import CRFSegmenter

# torchvision ``vgg16`` state-dict keys and shapes, written out (torchvision is not installed):
# features = [conv, relu, conv, relu, pool, ...], classifier = [fc, relu, dropout, fc, relu,
# dropout, fc].
_CONV_SHAPES = {
    0: (64, 3), 2: (64, 64),
    5: (128, 64), 7: (128, 128),
    10: (256, 128), 12: (256, 256), 14: (256, 256),
    17: (512, 256), 19: (512, 512), 21: (512, 512),
    24: (512, 512), 26: (512, 512), 28: (512, 512),
}  # fmt: skip
_CLASSIFIER_SHAPES = {0: (4096, 25088), 3: (4096, 4096), 6: (1000, 4096)}


def _torchvision_vgg16_state(features_only=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for idx, (out_ch, in_ch) in _CONV_SHAPES.items():
        state[f"features.{idx}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=g)
        state[f"features.{idx}.bias"] = torch.randn(out_ch, generator=g)
    if not features_only:
        for idx, (out_f, in_f) in _CLASSIFIER_SHAPES.items():
            state[f"classifier.{idx}.weight"] = torch.randn(out_f, in_f, generator=g)
            state[f"classifier.{idx}.bias"] = torch.randn(out_f, generator=g)
    return state


@pytest.fixture(scope="module")
def vgg_state():
    return _torchvision_vgg16_state()


@pytest.fixture(scope="module")
def largefov():
    return models.create("deeplab_largefov", 21).eval()


def _image(b=1, h=65, w=81, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


# ---------------------------------------------------------------------------- architecture


def test_registry_names():
    names = models.available()
    for name in ("deeplab_largefov", "deeplab_msc_largefov", "deeplab_v1", "small"):
        assert name in names


def test_largefov_output_at_input_resolution(largefov):
    with torch.no_grad():
        image = _image(1, 65, 81)
        scores = largefov.forward_scores(image)
        logits = largefov(image)
    assert scores.shape == (1, 21, 9, 11)  # ceil(65/8), ceil(81/8)
    assert logits.shape == (1, 21, 65, 81)
    torch.testing.assert_close(logits[:, :, ::8, ::8], scores)


@pytest.mark.parametrize("size", [(1, 1), (8, 8), (17, 9)])
def test_trunk_stride8_on_odd_and_tiny_sizes(size):
    trunk = VGG16Atrous()
    h, w = size
    with torch.no_grad():
        pools = trunk.forward_stages(trunk.normalize(_image(2, h, w)))
    expected = [(64, 2), (128, 4), (256, 8), (512, 8), (512, 8)]
    for out, (ch, stride) in zip(pools, expected, strict=True):
        assert out.shape == (2, ch, math.ceil(h / stride), math.ceil(w / stride))


def _layer_chain(net):
    chain = []
    for m in net.backbone.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
            s = m.stride if isinstance(m.stride, int) else m.stride[0]
            d = m.dilation if isinstance(m.dilation, int) else m.dilation[0]
            chain.append((k, s, d))
    chain.append((net.fc6.kernel_size[0], 1, net.fc6.dilation[0]))
    return chain


def test_largefov_atrous_settings(largefov):
    trunk = largefov.backbone
    pools = [m for m in trunk.modules() if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride, p.padding) for p in pools] == [
        (3, 2, 1), (3, 2, 1), (3, 2, 1), (3, 1, 1), (3, 1, 1)
    ]  # fmt: skip
    for name in ("conv5_1", "conv5_2", "conv5_3"):
        conv = trunk.conv(name)
        assert conv.dilation == (2, 2) and conv.padding == (2, 2)
    for name in ("conv1_1", "conv3_3", "conv4_3"):
        assert trunk.conv(name).dilation == (1, 1)
    fc6, fc7, fc8 = largefov.fc6, largefov.fc7, largefov.fc8
    assert fc6.weight.shape == (1024, 512, 3, 3)
    assert fc6.dilation == (12, 12) and fc6.padding == (12, 12)
    assert fc7.weight.shape == (1024, 1024, 1, 1) and fc8.weight.shape == (21, 1024, 1, 1)
    assert largefov.dropout.p == 0.5 and largefov.stride == 8
    # Receptive field in image pixels, by r = 1 + Σ (k-1)·d·Π strides: 227 at pool5, 419 at fc6.
    assert receptive_field(_layer_chain(largefov)[:-1]) == 227
    assert receptive_field(_layer_chain(largefov)) == 419
    n_params = sum(p.numel() for p in largefov.parameters())
    assert abs(n_params / 1e6 - 20.5) < 0.05  # Table 2 of the paper: 20.5M


@pytest.mark.slow  # a 134M-parameter network: ~0.5 GB and 5-15 s to build on a loaded CPU
def test_deeplab_v1_is_7x7_dilation4_and_imagenet_mapping_is_a_reshape(vgg_state):
    net = models.create("deeplab_v1", 21, pretrained=vgg_state).eval()
    assert net.fc6.weight.shape == (4096, 512, 7, 7)
    assert net.fc6.dilation == (4, 4) and net.fc6.padding == (12, 12)
    assert net.fc7.weight.shape == (4096, 4096, 1, 1)
    # the paper's point: LargeFOV keeps DeepLab-7×7's field of view with far fewer parameters
    assert receptive_field(_layer_chain(net)) == 419
    assert abs(sum(p.numel() for p in net.parameters()) / 1e6 - 134.3) < 0.05  # Table 2
    assert torch.equal(net.fc6.weight, vgg_state["classifier.0.weight"].view(4096, 512, 7, 7))
    assert torch.equal(net.fc7.weight[:, :, 0, 0], vgg_state["classifier.3.weight"])
    with torch.no_grad():
        assert net(_image(1, 9, 17)).shape == (1, 21, 9, 17)


def test_msc_branches_add_scores_to_largefov():
    torch.manual_seed(0)
    msc = models.create("deeplab_msc_largefov", 5).eval()
    branches = msc.msc_branches
    assert [b.conv1.stride[0] for b in branches] == [8, 4, 2, 1, 1]
    assert [b.conv1.in_channels for b in branches] == [3, 64, 128, 256, 512]
    assert all(b.conv1.kernel_size == (3, 3) and b.conv2.kernel_size == (1, 1) for b in branches)
    assert all(b.conv1.out_channels == 128 and b.conv2.out_channels == 128 for b in branches)
    plain = DeepLabV1(5).eval()
    missing, unexpected = plain.load_state_dict(msc.state_dict(), strict=False)
    assert not missing and all(k.startswith("msc_branches.") for k in unexpected)
    image = _image(1, 33, 41)
    with torch.no_grad():
        total = msc.forward_scores(image)
        main = plain.forward_scores(image)
        x = msc.backbone.normalize(image)
        pools = msc.backbone.forward_stages(x)
        extra = sum(b(inp) for b, inp in zip(branches, (x, *pools[:4]), strict=True))
    assert total.shape == (1, 5, 5, 6)
    torch.testing.assert_close(total, main + extra, rtol=1e-4, atol=1e-5)
    assert extra.abs().max() > 0
    assert msc(image).shape == (1, 5, 33, 41)


def test_branch_alignment_single_pixel_response():
    # A 3×3/stride-8/padding-1 conv puts output i on input pixel 8i: an impulse at pixel (8, 16)
    # reaches output (1, 2) through the kernel's centre tap only.
    branch = MultiScaleBranch(3, 8, 2, channels=4, dropout=0.0)
    with torch.no_grad():
        branch.conv1.weight.zero_()
        branch.conv1.weight[:, :, 1, 1] = 1.0
    x = torch.zeros(1, 3, 24, 32)
    x[0, :, 8, 16] = 1.0
    h = branch.conv1(x)
    assert h.shape[-2:] == (3, 4)
    assert torch.nonzero(h[0, 0]).tolist() == [[1, 2]]


def test_gradients_reach_every_parameter():
    net = models.create("deeplab_msc_largefov", 3, dropout=0.0, msc_dropout=0.0)
    image = _image(1, 17, 25)
    labels = torch.randint(0, 3, (1, 17, 25))
    F.cross_entropy(net(image), labels).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_freeze_main_network_trains_only_msc_branches():
    net = models.create("deeplab_msc_largefov", 3, dropout=0.0, msc_dropout=0.0)
    net.freeze_main_network()
    F.cross_entropy(net(_image(1, 9, 9)), torch.randint(0, 3, (1, 9, 9))).backward()
    for name, p in net.named_parameters():
        if name.startswith("msc_branches."):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    with pytest.raises(ValueError, match=r"needs the multi-scale branches \(msc=True\)"):
        DeepLabV1(3).freeze_main_network()


def test_bad_inputs_and_arguments(largefov):
    with pytest.raises(ValueError, match=r"image must be \(B, 3, H, W\).*got shape \(1, 4, 9, 9\)"):
        largefov(torch.zeros(1, 4, 9, 9))
    with pytest.raises(ValueError, match=r"image must have 4 dimensions"):
        largefov(torch.zeros(3, 9, 9))
    with pytest.raises(TypeError, match=r"floating-point dtype.*torch.uint8"):
        largefov(torch.zeros(1, 3, 9, 9, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"fc6_kernel must be a positive odd number; got 4"):
        DeepLabV1(21, fc6_kernel=4)
    with pytest.raises(ValueError, match=r"num_classes must be >= 1"):
        models.create("deeplab_largefov", 0)
    with pytest.raises(ValueError, match=r"msc_dropout must be in \[0, 1\)"):
        DeepLabV1(21, msc=True, msc_dropout=1.5)


def test_eval_is_deterministic_and_batch_equals_items(largefov):
    image = _image(2, 17, 25)
    with torch.no_grad():
        a = largefov(image)
        b = largefov(image)
        one = largefov(image[1:])
    assert torch.equal(a, b)
    torch.testing.assert_close(a[1:], one, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- ImageNet weights


def _check_trunk(trunk, state):
    for name, idx in TORCHVISION_VGG16_CONV_INDEX.items():
        assert torch.equal(trunk.conv(name).weight, state[f"features.{idx}.weight"]), name
        assert torch.equal(trunk.conv(name).bias, state[f"features.{idx}.bias"]), name


def test_largefov_imagenet_mapping_and_decimation(vgg_state):
    net = DeepLabV1(21)
    fc8_before = net.fc8.weight.clone()
    report = load_vgg16_imagenet(net, vgg_state)
    _check_trunk(net.backbone, vgg_state)
    w6 = vgg_state["classifier.0.weight"]
    # fc6: filter o of ours = ImageNet filter 4o; tap (ty, tx) = ImageNet tap (3ty, 3tx); the
    # 25088 inputs are flattened (channel, row, column) as torchvision's view(N, -1) of pool5.
    for o, c, ty, tx in [(0, 0, 0, 0), (1, 7, 1, 2), (1023, 511, 2, 2), (500, 250, 2, 0)]:
        assert net.fc6.weight[o, c, ty, tx] == w6[4 * o, c * 49 + 3 * ty * 7 + 3 * tx]
    torch.testing.assert_close(
        net.fc6.weight, w6.view(4096, 512, 7, 7)[::4][:, :, [0, 3, 6]][:, :, :, [0, 3, 6]]
    )
    assert torch.equal(net.fc6.bias, vgg_state["classifier.0.bias"][::4])
    w7 = vgg_state["classifier.3.weight"]
    assert net.fc7.weight[5, 9, 0, 0] == w7[20, 36]
    assert torch.equal(net.fc7.weight[:, :, 0, 0], w7[::4, ::4])
    assert torch.equal(net.fc7.bias, vgg_state["classifier.3.bias"][::4])
    assert torch.equal(net.fc8.weight, fc8_before)  # the new classifier keeps its init
    assert report["ignored"] == ["classifier.6.bias", "classifier.6.weight"]
    assert "backbone.stages.0.conv1_1.weight" in report["loaded"] and "fc7.bias" in report["loaded"]


def test_pretrained_through_create_and_crf_wrapper(vgg_state):
    class _StandInCRF(nn.Module):
        def forward(self, logits, image):
            return logits

    net = models.create("deeplab_msc_largefov", 4, pretrained=vgg_state)
    _check_trunk(net.backbone, vgg_state)
    assert torch.equal(net.fc6.bias, vgg_state["classifier.0.bias"][::4])
    wrapped = CRFSegmenter(DeepLabV1(4), _StandInCRF())
    report = load_vgg16_imagenet(wrapped, vgg_state)
    assert "model.fc6.weight" in report["loaded"]
    _check_trunk(wrapped.model.backbone, vgg_state)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_trunk_weights_from_file(tmp_path, suffix):
    state = _torchvision_vgg16_state(features_only=True, seed=3)
    path = tmp_path / f"vgg16{suffix}"
    if suffix == ".pth":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)  # DataParallel prefix
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    trunk = VGG16Atrous()
    report = load_vgg16_imagenet(trunk, path)
    _check_trunk(trunk, state)
    assert report["ignored"] == [] and len(report["loaded"]) == 26


def test_load_errors_leave_model_unchanged(vgg_state, tmp_path):
    net = DeepLabV1(3)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    missing = {k: v for k, v in vgg_state.items() if k != "features.28.bias"}
    with pytest.raises(ValueError, match=r"missing keys: features.28.bias"):
        load_vgg16_imagenet(net, missing)
    no_fc = {k: v for k, v in vgg_state.items() if not k.startswith("classifier.0")}
    with pytest.raises(ValueError, match=r"missing keys: classifier.0.weight, classifier.0.bias"):
        load_vgg16_imagenet(net, no_fc)
    bn = dict(vgg_state, **{"features.1.running_mean": torch.zeros(64)})
    with pytest.raises(ValueError, match=r"unexpected keys: features.1.running_mean.*vgg16_bn"):
        load_vgg16_imagenet(net, bn)
    bad_shape = dict(vgg_state, **{"features.0.weight": torch.zeros(64, 3, 5, 5)})
    with pytest.raises(ValueError, match=r"features.0.weight has shape \(64, 3, 5, 5\), expected"):
        load_vgg16_imagenet(net, bad_shape)
    odd = DeepLabV1(3, fc6_kernel=5, fc6_dilation=3)  # 7 taps cannot be decimated evenly to 5
    with pytest.raises(ValueError, match=r"cannot subsample the 7×7 kernel of classifier.0"):
        load_vgg16_imagenet(odd, vgg_state)
    pickled = tmp_path / "model.pth"
    torch.save(nn.Linear(2, 2), pickled)  # a pickled module, not a state dict
    with pytest.raises(ValueError, match=r"cannot be read with torch.load\(weights_only=True\)"):
        load_vgg16_imagenet(net, pickled)
    with pytest.raises(FileNotFoundError, match=r"pretrained weights file not found"):
        load_vgg16_imagenet(net, tmp_path / "nope.pth")
    with pytest.raises(TypeError, match=r"exactly one VGG16Atrous.*found 0 in SmallSegNet"):
        load_vgg16_imagenet(SmallSegNet(3), vgg_state)

    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not odd_p.isnan().any() for odd_p in odd.parameters())


@pytest.mark.gpu
def test_msc_largefov_cpu_and_cuda_agree():
    net = models.create("deeplab_msc_largefov", 5).eval().double()
    image = _image(1, 33, 41).double()
    with torch.no_grad():
        cpu = net(image)
        gpu = net.to("cuda")(image.to("cuda")).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-6, atol=1e-6)
