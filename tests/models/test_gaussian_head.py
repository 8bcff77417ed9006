"""CNN + Deep Gaussian CRF models: contract, gradients to every branch, training in the engine."""

import math

import pytest
import torch
from torch import nn

from deepcrf import models
from deepcrf.crf.gaussian import gaussian_crf, multiscale_gaussian_crf
from deepcrf.models.backbones import upsample_logits
from deepcrf.models.gaussian_head import GaussianCRFSegmenter


class _TinyBackbone(nn.Module):
    """Stand-in for the backbone contract: normalize, forward_features, out_channels, stride."""

    out_channels = 6
    stride = 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=8, padding=1)

    def normalize(self, image):
        return (image - 127.5) / 64.0

    def forward_features(self, x):
        return torch.relu(self.conv(x))


def _tiny(num_scales=1, **kw):
    return (
        GaussianCRFSegmenter(
            _TinyBackbone(),
            nn.Identity(),
            6,
            3,
            embedding_dim=4,
            embedding_hidden=5,
            num_scales=num_scales,
            **kw,
        )
        .double()
        .eval()
    )


def test_registered():
    assert {"small_gcrf", "deeplab_largefov_gcrf"} <= set(models.available())


@pytest.mark.parametrize("num_scales", [1, 2, 3])
def test_matches_crf_on_features_then_upsampling(num_scales):
    model = _tiny(num_scales, tol=1e-12, connectivity=4, radius=2)
    image = torch.rand(2, 3, 45, 61, dtype=torch.float64) * 255
    with torch.no_grad():
        out = model(image)
        assert out.shape == (2, 3, 45, 61)
        feats = model.backbone.forward_features(model.backbone.normalize(image))
        unary = model.classifier(feats)
        plain = upsample_logits(unary, (45, 61), 8)
        if num_scales == 1:
            scores = gaussian_crf(
                unary, model.embedding(feats), connectivity=4, radius=2, tol=1e-12
            )
        else:
            pooled = [feats]
            for _ in range(num_scales - 1):
                pooled.append(nn.functional.avg_pool2d(pooled[-1], 2, ceil_mode=True))
            scores = multiscale_gaussian_crf(
                [model.classifier(f) for f in pooled],
                [model.embedding(f) for f in pooled],
                connectivity=4,
                radius=2,
                tol=1e-12,
            )[0]
    torch.testing.assert_close(out, upsample_logits(scores, (45, 61), 8))
    with torch.no_grad():
        torch.testing.assert_close(model(image, use_crf=False), plain)
    assert float((out - plain).abs().max()) > 1e-6


def test_gradients_reach_every_branch_and_crf_names():
    model = _tiny(1).train()
    image = torch.rand(2, 3, 32, 40, dtype=torch.float64) * 255
    labels = torch.randint(0, 3, (2, 32, 40))
    loss = nn.functional.cross_entropy(model(image), labels)
    loss.backward()
    crf_params = [n for n, _ in model.named_parameters() if n.startswith("crf.")]
    assert crf_params == ["crf.log_pairwise_weight"]
    for name, p in model.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    # Without the CRF, the embedding branch and the CRF take no part.
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(image, use_crf=False), labels).backward()
    assert model.embedding[0].weight.grad is None and model.crf.log_pairwise_weight.grad is None


def test_small_gcrf_trains_in_engine():
    from deepcrf.data import SyntheticSegmentation
    from deepcrf.engine import TrainSettings, fit

    torch.manual_seed(0)
    model = models.create("small_gcrf", 3, width=4, hidden=8, embedding_dim=4, embedding_hidden=8)
    data = SyntheticSegmentation("train", n=4, size=32, num_classes=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = fit(
        model,
        data,
        TrainSettings(stage="joint", steps=3, batch_size=2, lr=0.01, crf_lr=0.1),
        progress=False,
    )
    assert len(out["losses"]) == 3 and all(math.isfinite(v) for v in out["losses"])
    for name in ("crf.log_pairwise_weight", "embedding.2.weight", "classifier.weight"):
        assert not torch.equal(before[name], dict(model.named_parameters())[name]), name


def test_small_gcrf_multiscale_and_kwargs():
    model = models.create("small_gcrf", 4, width=4, hidden=8, num_scales=2, connectivity="dense")
    names = {n for n, _ in model.named_parameters() if n.startswith("crf.")}
    assert names == {"crf.log_pairwise_weight", "crf.log_coupling_weight"}
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 40, 48) * 255).shape == (1, 4, 40, 48)


def test_deeplab_largefov_gcrf_builds():
    model = models.create(
        "deeplab_largefov_gcrf", 5, embedding_dim=8, embedding_hidden=16, fc_channels=32
    ).eval()
    assert model.head.fc6.dilation == (12, 12)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 33, 41) * 255)
    assert out.shape == (1, 5, 33, 41)
    assert torch.isfinite(out).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_scales must be 1, 2 or 3"):
        _tiny(num_scales=4)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        GaussianCRFSegmenter(_TinyBackbone(), nn.Identity(), 6, 0)
    with pytest.raises(ValueError, match="pretrained must be None"):
        models.create("small_gcrf", 3, pretrained="vgg.pth")
    with pytest.raises(ValueError, match=r"image must be \(B, 3, H, W\)"):
        _tiny()(torch.rand(1, 4, 16, 16, dtype=torch.float64))


def test_image_resolution_gcrf_follows_colour_edges():
    # Solved on the image grid with colour in the embeddings: smoothing stops at a colour edge.
    torch.manual_seed(0)
    model = models.create("small_gcrf", 2, width=4, hidden=8, embedding_dim=3)
    assert model.resolution == "image" and model.crf.radius == 2
    model.eval()
    image = torch.zeros(1, 3, 16, 16)
    image[..., 8:] = 255.0  # a sharp vertical colour edge
    unary = torch.zeros(1, 2, 16, 16)
    unary[:, 0, :, :8], unary[:, 1, :, 8:] = 1.0, 1.0
    unary[:, :, 5, 3] = torch.tensor([0.0, 0.6])  # one noisy pixel inside the left region
    emb = torch.cat([torch.zeros(1, 3, 16, 16), image / model.colour_scale], dim=1)
    with torch.no_grad():
        x = model.crf(unary, emb)
    assert x[0, 0, 5, 3] > x[0, 1, 5, 3]  # the noisy pixel is smoothed away
    assert (x[0].argmax(0)[:, :8] == 0).all() and (x[0].argmax(0)[:, 8:] == 1).all()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 24, 32) * 255).shape == (1, 2, 24, 32)
    with pytest.raises(ValueError, match="resolution must be 'features' or 'image'"):
        models.create("small_gcrf", 2, width=4, hidden=8, resolution="pixels")
    with pytest.raises(ValueError, match="num_scales must be 1"):
        models.create("small_gcrf", 2, width=4, hidden=8, resolution="image", num_scales=2)
    paper = models.create("small_gcrf", 2, width=4, hidden=8, resolution="features")
    beta = paper.crf.log_pairwise_weight.detach().exp().item()
    assert paper.crf.radius == 1 and beta == pytest.approx(0.1)
