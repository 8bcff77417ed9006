import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deepcrf.models as models
from deepcrf.crf.dense import DenseCRF
from deepcrf.models.backbones import SmallSegNet
from deepcrf.models.deeplab import DEEPLAB_CRF_DEFAULTS, DeepLabV1
from deepcrf.models.segmenter import CRF_KINDS, CRFSegmenter, build_crf, with_crf


class _ShiftCRF(nn.Module):
    """Stand-in CRF: records its inputs and adds a learnable per-label shift."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.shift = nn.Parameter(torch.arange(num_classes, dtype=torch.float32))
        self.calls = []

    def forward(self, logits, image):
        self.calls.append((logits, image))
        return logits + self.shift.view(1, -1, 1, 1)


def _image(b=1, h=24, w=32, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


def _small(num_classes=3):
    return SmallSegNet(num_classes, width=4, hidden=8).eval()


# ---------------------------------------------------------------------------- the wrapper


def test_wrapper_applies_crf_to_logits_and_image():
    net = CRFSegmenter(_small(), _ShiftCRF(3)).eval()
    image = _image()
    logits = net.model(image)
    out = net(image)
    assert out.shape == (1, 3, 24, 32)
    torch.testing.assert_close(out, logits + torch.arange(3.0).view(1, 3, 1, 1))
    seen_logits, seen_image = net.crf.calls[-1]
    torch.testing.assert_close(seen_logits, logits)
    assert seen_image is image  # the CRF sees the 0-255 image, not the normalised one
    torch.testing.assert_close(net(image, use_crf=False), logits)
    assert len(net.crf.calls) == 1  # use_crf=False did not call it
    assert net.num_classes == 3


def test_wrapper_without_crf_and_parameter_names():
    bare = CRFSegmenter(_small(), None)
    torch.testing.assert_close(bare(_image()), bare.model(_image()))
    net = CRFSegmenter(_small(), _ShiftCRF(3))
    names = [n for n, _ in net.named_parameters()]
    assert "crf.shift" in names
    assert all(n.startswith(("model.", "crf.")) for n in names)


def test_wrapper_gradients_reach_model_and_crf():
    net = CRFSegmenter(SmallSegNet(3, width=4, hidden=8), _ShiftCRF(3))
    labels = torch.randint(0, 3, (2, 24, 32))
    F.cross_entropy(net(_image(2)), labels).backward()
    assert net.crf.shift.grad is not None and net.crf.shift.grad.abs().sum() > 0
    assert net.model.classifier.weight.grad.abs().sum() > 0


def test_wrapper_errors():
    with pytest.raises(ValueError, match=r"crf has num_classes=4 but the model has 3"):
        CRFSegmenter(_small(3), _ShiftCRF(4))
    with pytest.raises(TypeError, match=r"model must be an nn.Module; got str"):
        CRFSegmenter("small", None)
    with pytest.raises(TypeError, match=r"crf must be an nn.Module or None; got function"):
        CRFSegmenter(_small(), lambda logits, image: logits)


def test_plain_models_take_no_use_crf_and_the_engine_does_not_pass_it():
    from deepcrf.engine.evaluation import has_crf, predict_logits

    net = _small().eval()
    with pytest.raises(TypeError, match="use_crf"):
        net(_image(), use_crf=False)  # no CRF: no switch that would be silently ignored
    assert not has_crf(net) and has_crf(models.create("small", 3, crf=_ShiftCRF(3)))
    with torch.no_grad():
        torch.testing.assert_close(predict_logits(net, _image(), use_crf=True), net(_image()))


# ---------------------------------------------------------------------------- create(crf=...)


def test_create_with_a_crf_module_on_every_registered_backbone_factory():
    for name in ("small", "deeplab_largefov"):
        net = models.create(name, 3, crf=_ShiftCRF(3))
        assert isinstance(net, CRFSegmenter) and isinstance(net.crf, _ShiftCRF)
    assert isinstance(models.create("small", 3), SmallSegNet)
    with pytest.raises(ValueError, match=r"crf_kwargs is only used with crf='dense'"):
        models.create("small", 3, crf=_ShiftCRF(3), crf_kwargs={"iters": 3})
    with pytest.raises(ValueError, match=r"crf_kwargs is only used"):
        models.create("small", 3, crf_kwargs={"iters": 3})
    with pytest.raises(ValueError, match=r"crf must be None, an nn.Module or one of.*got 'crfrnn'"):
        models.create("small", 3, crf="crfrnn")
    with pytest.raises(TypeError, match=r"crf must be None, a string or an nn.Module; got int"):
        with_crf(_small(), 5, num_classes=3)


@pytest.mark.parametrize("kind", sorted(CRF_KINDS))
def test_create_dense_kinds(kind):
    net = models.create("small", 3, width=4, hidden=8, crf=kind, crf_kwargs={"method": "exact"})
    assert isinstance(net, CRFSegmenter) and isinstance(net.crf, DenseCRF)
    assert net.crf.learnable == CRF_KINDS[kind]["learnable"]
    assert net.crf.method == "exact" and net.crf.num_classes == 3
    crf_params = {n for n, _ in net.named_parameters() if n.startswith("crf.")}
    expected = {
        "dense": set(),
        "dense-learnable": {"crf.compat", "crf.w_bilateral", "crf.w_spatial"},
        "dense-bandwidths": {
            "crf.compat", "crf.w_bilateral", "crf.w_spatial",
            "crf.log_theta_alpha", "crf.log_theta_beta", "crf.log_theta_gamma",
        },
    }[kind]  # fmt: skip
    assert crf_params == expected
    if kind != "dense":
        assert net.crf.w_bilateral.shape == (3, 3)  # CRF-as-RNN's L×L kernel weights
    # DenseCRF's own defaults for the small model (pydensecrf's example values)
    assert math.isclose(net.crf.theta_alpha, 80.0, rel_tol=1e-6)
    assert math.isclose(net.crf.theta_beta, 13.0, rel_tol=1e-6)


def test_dense_crf_joint_forward_and_backward():
    torch.manual_seed(0)
    net = models.create(
        "small", 3, width=4, hidden=8, crf="dense-bandwidths",
        crf_kwargs={"method": "exact", "iters": 2, "theta_alpha": 5.0, "theta_beta": 20.0},
    )  # fmt: skip
    net.train()
    image = _image(1, 12, 16)
    out = net(image)
    assert out.shape == (1, 3, 12, 16) and torch.isfinite(out).all()
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(image), net.crf(net.model(image), image))
        assert not torch.allclose(net(image), net(image, use_crf=False))
    net.train()
    F.cross_entropy(net(image), torch.randint(0, 3, (1, 12, 16))).backward()
    assert net.crf.log_theta_alpha.grad is not None
    assert net.crf.compat.grad.abs().sum() > 0
    assert net.model.classifier.weight.grad.abs().sum() > 0


def test_deeplab_crf_defaults_are_the_papers():
    net = models.create("deeplab_largefov", 21, crf="dense")
    crf = net.crf
    ref = DEEPLAB_CRF_DEFAULTS["deeplab_largefov"]
    assert math.isclose(crf.theta_alpha, 121.0, rel_tol=1e-6)
    assert math.isclose(crf.theta_beta, 5.0, rel_tol=1e-6)
    assert math.isclose(crf.theta_gamma, 3.0, rel_tol=1e-6)
    assert float(crf.w_bilateral) == ref["w_bilateral"] == 4.0
    assert float(crf.w_spatial) == 3.0 and crf.eval_iters == 10
    assert isinstance(net.model, DeepLabV1)
    # crf_kwargs override the defaults
    over = build_crf("dense", 21, {"theta_alpha": 50.0}, defaults=ref)
    assert math.isclose(over.theta_alpha, 50.0, rel_tol=1e-6) and over.eval_iters == 10
    msc = DEEPLAB_CRF_DEFAULTS["deeplab_msc_largefov"]
    assert msc["theta_alpha"] == 83.0 and msc["theta_beta"] == 5.0
