import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepcrf.engine import evaluate, metrics_from_confusion, predict_logits
from deepcrf.metrics import boundary_band


class _Oracle(nn.Module):
    """Reads the label back from the image (channel 0 holds it): a perfect segmenter."""

    def __init__(self, num_classes, noise_class=None):
        super().__init__()
        self.num_classes = num_classes
        self.noise_class = noise_class

    def forward(self, image):
        labels = image[:, 0].round().long().clamp(0, self.num_classes - 1)
        if self.noise_class is not None:
            labels = torch.full_like(labels, self.noise_class)
        return F.one_hot(labels, self.num_classes).permute(0, 3, 1, 2).float() * 10


class _Pointwise(nn.Module):
    """A 1x1 convolution: commutes with flips and resizing of the logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, image):
        return self.conv(image / 255)


def _dataset(n=3, size=(12, 16), num_classes=3):
    gen = torch.Generator().manual_seed(0)
    items = []
    for _ in range(n):
        labels = torch.zeros(size, dtype=torch.int64)
        labels[2:8, 3:10] = int(torch.randint(1, num_classes, (), generator=gen))
        labels[0, :] = 255
        image = labels.clamp(max=num_classes - 1).float()[None].expand(3, -1, -1).clone()
        items.append((image, labels))
    return items


def test_perfect_model_scores_one():
    out = evaluate(_Oracle(3), _dataset(), num_classes=3, progress=False)
    assert out["miou"] == 1.0 and out["pixel_accuracy"] == 1.0
    assert all(v == 1.0 for v in out["trimap_accuracy"].values())
    assert out["num_images"] == 3 and out["seconds_per_image"] > 0
    assert set(out["per_class_iou"]) == {"0", "1", "2"}


def test_constant_model_matches_hand_computed_scores():
    data = _dataset()
    out = evaluate(
        _Oracle(3, noise_class=0), data, num_classes=3, progress=False, trimap_bands=(1, 3)
    )
    labels = torch.stack([lab for _, lab in data])
    valid = labels != 255
    background = int(((labels == 0) & valid).sum())
    total = int(valid.sum())
    # Everything predicted as 0: IoU_0 = #bg / #valid; foreground classes present get IoU 0.
    present = sorted({int(c) for c in labels[valid].unique()})
    assert out["per_class_iou"]["0"] == pytest.approx(background / total)
    assert out["miou"] == pytest.approx((background / total) / len(present))
    assert out["pixel_accuracy"] == pytest.approx(background / total)
    for band in (1, 3):
        mask = boundary_band(labels, band)
        ref = float(((labels == 0) & mask).sum()) / float(mask.sum())
        assert out["trimap_accuracy"][str(band)] == pytest.approx(ref)


def test_multiscale_flip_average_against_reference():
    model = _Pointwise()
    image = torch.rand(1, 3, 10, 14) * 255
    got = predict_logits(model, image, scales=(0.5, 1.0), flip=True)
    probs = []
    for s in (0.5, 1.0):
        x = F.interpolate(image, size=(5, 7), mode="bilinear") if s == 0.5 else image
        for mirrored in (False, True):
            out = model(x.flip(-1) if mirrored else x)
            out = out.flip(-1) if mirrored else out
            out = F.interpolate(out, size=(10, 14), mode="bilinear")
            probs.append(out.softmax(1))
    ref = torch.stack(probs).mean(0).log()
    assert torch.allclose(got, ref, atol=1e-5)


def test_single_scale_returns_raw_logits_and_postprocess_is_applied():
    model = _Pointwise()
    image = torch.rand(2, 3, 6, 5) * 255
    with torch.no_grad():
        assert torch.equal(predict_logits(model, image), model(image))
    seen = {}

    def post(logits, img):
        seen["shapes"] = (tuple(logits.shape), tuple(img.shape))
        return -logits

    with torch.no_grad():
        out = predict_logits(model, image, postprocess=post)
        assert torch.equal(out, -model(image))
    assert seen["shapes"] == ((2, 4, 6, 5), (2, 3, 6, 5))


def test_evaluate_uses_model_crf_switch():
    class WithCRF(nn.Module):
        def __init__(self):
            super().__init__()
            self.crf = nn.Identity()
            self.calls = []

        def forward(self, image, use_crf=True):
            self.calls.append(use_crf)
            return _Oracle(3)(image)

    model = WithCRF()
    evaluate(model, _dataset(1), num_classes=3, use_crf=False, progress=False)
    evaluate(model, _dataset(1), num_classes=3, use_crf=True, progress=False)
    assert model.calls == [False, True]


def test_metrics_from_confusion_none_for_absent_classes():
    conf = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    out = metrics_from_confusion(conf, ["a", "b", "c"])
    assert out["per_class_iou"]["c"] is None
    assert out["per_class_iou"]["a"] == pytest.approx(3 / 4)
    assert out["miou"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert math.isclose(out["pixel_accuracy"], 5 / 6)


def test_evaluate_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        evaluate(_Oracle(3), [], num_classes=3, progress=False)
    with pytest.raises(ValueError, match="predicts 3 classes but num_classes is 5"):
        evaluate(_Oracle(3), _dataset(1), num_classes=5, progress=False)
    with pytest.raises(ValueError, match="scales"):
        evaluate(_Oracle(3), _dataset(1), num_classes=3, scales=(0.0,), progress=False)
    with pytest.raises(ValueError, match="dataset item 0"):
        evaluate(
            _Oracle(3), [(torch.zeros(3, 4, 4), torch.zeros(5, 5))], num_classes=3, progress=False
        )
    with pytest.raises(ValueError, match="image must be"):
        predict_logits(_Pointwise(), torch.zeros(1, 4, 4, 3))


def test_evaluate_restores_training_mode():
    model = _Pointwise().train()
    evaluate(model, _dataset(1), num_classes=4, progress=False)
    assert model.training


def test_crf_params_inline_json_or_file(tmp_path):
    from deepcrf.engine.runner import read_crf_params

    assert read_crf_params(' {"w_bilateral": 4, "iters": 5}') == {"w_bilateral": 4, "iters": 5}
    f = tmp_path / "crf.json"
    f.write_text('{"best": {"params": {"theta_alpha": 60.0}, "miou": 0.5}}')
    assert read_crf_params(f) == {"theta_alpha": 60.0}
    with pytest.raises(ValueError, match="inline JSON object"):
        read_crf_params("{w_bilateral: 4}")
    with pytest.raises(FileNotFoundError, match="inline object"):
        read_crf_params(tmp_path / "missing.json")
    f.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object of dense CRF parameters"):
        read_crf_params(f)


def test_report_class_names_come_from_a_synthetic_tree(tmp_path, fake_voc):
    from deepcrf.data.synthetic import class_names as synthetic_names
    from deepcrf.data.synthetic import write_voc
    from deepcrf.data.voc import VOC_CLASSES
    from deepcrf.engine.runner import class_names

    tree = write_voc(tmp_path / "synth", n_train=2, n_val=2, n_tune=0, size=(32, 32),
                     num_classes=4)  # fmt: skip
    assert class_names(4, tree) == list(synthetic_names(4))
    assert class_names(5, tree) is None  # names for another class count are not used
    assert class_names(21, fake_voc) == list(VOC_CLASSES)  # a VOC tree: VOC's names
    assert class_names(6, fake_voc) is None  # no names known: ids
