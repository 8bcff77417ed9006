import itertools

import pytest
import torch
from torch import nn

import deepcrf.models as models
from deepcrf.crf.contextual import ContextualCRF
from deepcrf.models.featmap import (
    ContextualSegNet,
    FeatMapNet,
    resample_to_grid,
    sliding_pyramid_pooling,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: thread hand-off costs more than it saves on a loaded 2-core machine.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class StandIn(nn.Module):
    """A tiny backbone with the contract of deepcrf.models.backbones (stride 4)."""

    out_channels = 5
    stride = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, stride=4, padding=1)
        self.calls = []

    def normalize(self, image):
        return (image - 127.5) / 64.0

    def forward_features(self, x):
        self.calls.append(tuple(x.shape[2:]))
        return torch.tanh(self.conv(x))


def test_resample_identity_and_brute_force():
    feats = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    same = resample_to_grid(feats, (5, 7), scale=1.0, feature_stride=4, node_stride=4)
    # scale 1: coordinate ((4j + ½) − ½)/4 = j exactly.
    torch.testing.assert_close(same, feats)
    scale, fs, ns, size = 0.6, 4, 8, (4, 6)
    got = resample_to_grid(feats, size, scale=scale, feature_stride=fs, node_stride=ns)

    def lerp_1d(n_in, j):
        pos = min(max(((ns * j + 0.5) * scale - 0.5) / fs, 0.0), n_in - 1)
        lo = int(pos)
        hi = min(lo + 1, n_in - 1)
        return lo, hi, pos - lo

    for i, j in itertools.product(range(size[0]), range(size[1])):
        y0, y1, fy = lerp_1d(5, i)
        x0, x1, fx = lerp_1d(7, j)
        ref = (
            (1 - fy) * (1 - fx) * feats[..., y0, x0]
            + (1 - fy) * fx * feats[..., y0, x1]
            + fy * (1 - fx) * feats[..., y1, x0]
            + fy * fx * feats[..., y1, x1]
        )
        torch.testing.assert_close(got[..., i, j], ref)


def test_sliding_pyramid_pooling_brute_force():
    x = torch.randn(1, 2, 6, 7)
    out = sliding_pyramid_pooling(x, (3, 5))
    assert out.shape == (1, 6, 6, 7)
    torch.testing.assert_close(out[:, :2], x)
    for c, (k, y, xx) in enumerate(itertools.product((3, 5), range(6), range(7))):
        del c
        r = k // 2
        window = x[0, :, max(0, y - r) : y + r + 1, max(0, xx - r) : xx + r + 1]
        block = 2 if k == 3 else 4
        ref = window.amax(dim=(1, 2))
        torch.testing.assert_close(out[0, block : block + 2, y, xx], ref)


def test_featmap_shares_backbone_across_scales():
    backbone = StandIn()
    net = FeatMapNet(backbone, scales=(1.2, 0.8, 0.4), branch_channels=4, pool_sizes=(5, 9))
    image = torch.rand(2, 3, 30, 41) * 255
    out = net(image)
    assert out.shape == (2, 3 * 4 * 3, 8, 11)  # ceil(30/4), ceil(41/4)
    assert net.out_channels == 36
    assert backbone.calls == [(36, 49), (24, 33), (12, 16)]  # round(s·H), round(s·W)
    names = {n.split(".")[0] for n, _ in net.named_parameters()}
    assert names == {"backbone", "head"}
    # One backbone, three per-scale blocks.
    assert len(net.head) == 3


def test_featmap_gradcheck():
    backbone = StandIn().double()
    net = FeatMapNet(backbone, scales=(1.0, 0.5), branch_channels=2, pool_sizes=(3,)).double()
    image = (torch.rand(1, 3, 12, 16, dtype=torch.float64) * 255).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: net(x), (image,), atol=1e-5)


def make_model(**kw):
    return ContextualSegNet(
        4, StandIn(), scales=(1.0, 0.5), branch_channels=4, hidden_channels=8, **kw
    )


def test_model_contract_and_gradients():
    model = make_model()
    image = torch.rand(2, 3, 29, 38) * 255
    labels = torch.randint(0, 4, (2, 29, 38))
    labels[0, :10] = 255
    out = model(image)
    assert out.shape == (2, 4, 29, 38)
    unary = model(image, use_crf=False)
    assert unary.shape == (2, 4, 29, 38)
    assert not torch.allclose(out, unary)
    assert isinstance(model.crf, ContextualCRF)
    loss = model.piecewise_loss(image, labels)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for prefix in (
        "backbone.",
        "head.",
        "crf.unary_net.",
        "crf.pairwise_nets.surrounding.",
        "crf.pairwise_nets.above_below.",
    ):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), prefix


def test_model_equals_its_pieces():
    model = make_model(label_mode="nearest")
    image = torch.rand(1, 3, 20, 24) * 255
    labels = torch.randint(0, 4, (1, 20, 24))
    feats = model.features(image)
    assert feats.shape[2:] == (5, 6)
    from deepcrf.crf.contextual import downsample_labels
    from deepcrf.models.backbones import upsample_logits

    node = downsample_labels(labels, (5, 6), num_classes=4, stride=4, mode="nearest")
    torch.testing.assert_close(
        model.piecewise_loss(image, labels), model.crf.piecewise_loss(feats, node)
    )
    torch.testing.assert_close(model(image), upsample_logits(model.crf(feats), (20, 24), 4))


def test_model_batch_and_noncontiguous():
    model = make_model().eval()
    image = torch.rand(2, 3, 21, 17) * 255
    with torch.no_grad():
        full = model(image)
        for i in range(2):
            torch.testing.assert_close(full[i : i + 1], model(image[i : i + 1]))
        flipped = image.transpose(2, 3).contiguous().transpose(2, 3)
        assert not flipped.is_contiguous()
        torch.testing.assert_close(model(flipped), full)


def test_model_does_not_mutate_inputs():
    model = make_model()
    image = torch.rand(1, 3, 16, 16) * 255
    labels = torch.randint(0, 4, (1, 16, 16))
    i0, l0 = image.clone(), labels.clone()
    model.piecewise_loss(image, labels).backward()
    model(image)
    assert torch.equal(image, i0) and torch.equal(labels, l0)


def test_bad_input():
    model = make_model()
    with pytest.raises(ValueError, match=r"image must be \(B, 3, H, W\)"):
        model(torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"labels must be \(B, H, W\) matching image"):
        model.piecewise_loss(torch.rand(1, 3, 16, 16), torch.zeros(1, 16, 15, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\) or 255"):
        model.piecewise_loss(torch.rand(1, 3, 16, 16), torch.full((1, 16, 16), 9))
    with pytest.raises(ValueError, match="pool_sizes must be odd"):
        FeatMapNet(StandIn(), pool_sizes=(4,))
    with pytest.raises(ValueError, match="scales must be"):
        FeatMapNet(StandIn(), scales=())
    with pytest.raises(TypeError, match="backbone must have 'normalize'"):
        FeatMapNet(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="label_mode must be"):
        make_model(label_mode="mode")


def test_registry_small_contextual():
    assert {"small_contextual", "vgg16_contextual"} <= set(models.available())
    model = models.create("small_contextual", 3, width=4, branch_channels=4, hidden_channels=8)
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"backbone", "head", "crf"}
    image = torch.rand(1, 3, 40, 48) * 255
    assert model(image).shape == (1, 3, 40, 48)
    assert model.stride == 8 and model.crf.iters == 3
    with pytest.raises(ValueError, match="no ImageNet weights"):
        models.create("small_contextual", 3, pretrained="x.pth")
    with pytest.raises(ValueError, match="crf_kwargs is only used"):
        models.create("small_contextual", 3, crf_kwargs={"iters": 2})


def test_dense_crf_after_upsampling():
    model = models.create(
        "small_contextual",
        3,
        width=4,
        branch_channels=4,
        hidden_channels=8,
        crf="dense",
        crf_kwargs={"iters": 2},
    )
    assert model.dense_crf is not None
    image = torch.rand(1, 3, 24, 24) * 255
    with torch.no_grad():
        with_dense = model(image)
        model_no = model.dense_crf
        model.dense_crf = None
        without = model(image)
        model.dense_crf = model_no
        torch.testing.assert_close(
            model(image, use_crf=False), model.__class__.forward(model, image, use_crf=False)
        )
    assert with_dense.shape == without.shape == (1, 3, 24, 24)
    assert not torch.allclose(with_dense, without)


def test_vgg16_contextual_builds():
    model = models.create(
        "vgg16_contextual", 21, branch_channels=8, hidden_channels=8, scales=(1.0,)
    )
    assert model.node_stride == 16
    with torch.no_grad():
        out = model(torch.rand(1, 3, 40, 40) * 255)
    assert out.shape == (1, 21, 40, 40)


def test_engine_piecewise_stage_trains():
    from deepcrf.data.synthetic import SyntheticSegmentation
    from deepcrf.engine import TrainSettings, fit

    data = SyntheticSegmentation("train", n=8, size=48, num_classes=3, seed=0)
    model = models.create("small_contextual", 3, width=4, branch_channels=8, hidden_channels=16)
    out = fit(
        model,
        data,
        TrainSettings(
            stage="piecewise", steps=12, batch_size=4, lr=3e-3, optimizer="adam", weight_decay=0.0
        ),
        progress=False,
    )
    losses = out["losses"]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])


@pytest.mark.gpu
def test_cpu_cuda_agree():
    model = make_model().eval()
    image = torch.rand(1, 3, 20, 20) * 255
    labels = torch.randint(0, 4, (1, 20, 20))
    with torch.no_grad():
        cpu = model(image)
        loss_cpu = model.piecewise_loss(image, labels)
        model.cuda()
        gpu = model(image.cuda())
        loss_gpu = model.piecewise_loss(image.cuda(), labels.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=1e-4, atol=1e-4)


def test_voc_config_builds_the_paper_model():
    from pathlib import Path

    from deepcrf.engine.config import load
    from deepcrf.engine.runner import build_model

    path = Path(__file__).resolve().parents[2] / "configs" / "voc_contextual_piecewise.toml"
    cfg = load(path)
    assert cfg["train"]["stage"] == "piecewise"
    model = build_model(cfg)
    assert isinstance(model, ContextualSegNet)
    assert model.scales == (1.2, 0.8, 0.4) and model.pool_sizes == (5, 9)
    assert model.crf.relations == ("surrounding", "above_below") and model.crf.iters == 3
    assert model.dense_crf is not None and model.node_stride == 16


def test_bfloat16_autocast_keeps_the_loss_in_float32():
    model = make_model()
    image = torch.rand(1, 3, 24, 24) * 255
    labels = torch.randint(0, 4, (1, 24, 24))
    ref = model.piecewise_loss(image, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.piecewise_loss(image, labels)
        out = model(image)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=5e-2, atol=5e-2)
    assert out.shape == (1, 4, 24, 24) and bool(torch.isfinite(out).all())
