import json
import math

import pytest
import torch
from torch import nn

from deepcrf import models
from deepcrf.data.transforms import train_transform
from deepcrf.data.voc import VOCSegmentation
from deepcrf.engine import TrainSettings, fit, load_checkpoint
from deepcrf.engine.train import (
    _param_groups,
    _Stream,
    _StreamSampler,
    cross_entropy,
)

SPEC = {"model": {"name": "small", "num_classes": 21, "kwargs": {"width": 4, "hidden": 8}}}


def _model():
    torch.manual_seed(0)
    return models.create("small", 21, width=4, hidden=8)


@pytest.fixture
def train_set(fake_voc):
    return VOCSegmentation(fake_voc, "train", transform=train_transform(24))


def test_fit_trains_and_returns_losses(train_set):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = fit(model, train_set, TrainSettings(steps=3, batch_size=2, lr=0.01), progress=False)
    assert len(out["losses"]) == 3 and all(math.isfinite(x) for x in out["losses"])
    assert out["start_step"] == 0 and out["seconds"] > 0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("classifier") for k in changed)
    assert not model.training


def test_fit_is_deterministic(train_set):
    a, b = _model(), _model()
    fit(a, train_set, TrainSettings(steps=2, batch_size=2, seed=3), progress=False)
    fit(b, train_set, TrainSettings(steps=2, batch_size=2, seed=3), progress=False)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


class _Stop(Exception):
    pass


def _stop_at(k):
    def callback(step, loss):
        if step == k:
            raise _Stop

    return callback


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_is_bit_identical(train_set, tmp_path, optimizer):
    # N steps straight vs K steps, "kill", resume to N: the weights must be exactly equal
    # (after step 1 SGD already has momentum buffers and Adam moments to restore).
    n, k = 3, 1
    settings = TrainSettings(steps=n, batch_size=2, lr=0.02, optimizer=optimizer, seed=7)
    kwargs = dict(progress=False, config=SPEC)
    straight = _model()
    fit(straight, train_set, settings, run_dir=tmp_path / "a", **kwargs)

    killed = _model()
    with pytest.raises(_Stop):
        fit(
            killed,
            train_set,
            settings,
            run_dir=tmp_path / "b",
            checkpoint_every=k,
            callback=_stop_at(k),
            **kwargs,
        )
    # Disturb the global RNGs as a new process would have them: resume must restore them.
    torch.manual_seed(12345)
    resumed = _model()
    out = fit(resumed, train_set, settings, run_dir=tmp_path / "b", resume=True, **kwargs)
    assert out["start_step"] == k and len(out["losses"]) == n
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    final, _ = load_checkpoint(tmp_path / "b")
    for key, value in final.state_dict().items():
        assert torch.equal(value, straight.state_dict()[key]), key


def test_resume_rejects_changed_settings(train_set, tmp_path):
    fit(
        _model(),
        train_set,
        TrainSettings(steps=1, batch_size=1),
        progress=False,
        run_dir=tmp_path,
        config=SPEC,
    )
    with pytest.raises(ValueError, match=r"different settings.*lr"):
        fit(
            _model(),
            train_set,
            TrainSettings(steps=1, batch_size=1, lr=0.5),
            progress=False,
            run_dir=tmp_path,
            config=SPEC,
            resume=True,
        )


def test_resume_without_checkpoint(train_set, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fit(
            _model(),
            train_set,
            TrainSettings(steps=1),
            progress=False,
            run_dir=tmp_path,
            config=SPEC,
            resume=True,
        )


def test_stream_positions_cover_epochs_and_ranks(train_set):
    stream = _Stream(train_set, seed=0)
    n = len(train_set)
    assert sorted(stream.order(0)) == list(range(n))
    # Two ranks, batch 2: step 0 reads positions 0-1 (rank 0) and 2-3 (rank 1), disjoint.
    r0 = list(_StreamSampler(0, 2, 2, 0, 2))
    r1 = list(_StreamSampler(0, 2, 2, 1, 2))
    assert r0 == [0, 1, 4, 5] and r1 == [2, 3, 6, 7]
    # The same position gives the same (augmented) sample, whatever the global RNG does.
    a = stream[4]
    torch.manual_seed(99)
    b = stream[4]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # ... and fetching it leaves the global RNG untouched.
    state = torch.get_rng_state()
    stream[5]
    assert torch.equal(state, torch.get_rng_state())


def test_step_schedule():
    step = TrainSettings(steps=6000, lr_policy="step", lr_step=2000, lr_gamma=0.1)
    assert [step.lr_factor(t) for t in (0, 1999, 2000, 4000)] == [
        1.0, 1.0, 0.1, pytest.approx(0.01)]  # fmt: skip


def test_poly_schedule():
    poly = TrainSettings(steps=100, poly_power=0.9)
    assert poly.lr_factor(0) == 1.0
    assert poly.lr_factor(50) == pytest.approx(0.5**0.9)
    assert poly.lr_factor(100) == 0.0
    assert TrainSettings(steps=100, poly_power=0.0).lr_factor(99) == 1.0  # CRF-as-RNN: constant


def test_param_groups_rates_and_stages():
    model = models.create("small", 21, width=4, hidden=8, crf="dense-learnable")
    groups, frozen = _param_groups(
        model,
        TrainSettings(
            stage="joint",
            lr=0.001,
            crf_lr=0.1,
            head_lr=0.01,
            weight_decay=5e-4,
            crf_weight_decay=0.0,
            freeze_backbone=False,
        ),
    )
    by_name = {g["name"]: g for g in groups}
    assert by_name["crf"]["lr"] == 0.1 and by_name["crf"]["weight_decay"] == 0.0
    assert by_name["head"]["lr"] == 0.01 and by_name["backbone"]["lr"] == 0.001
    assert not frozen
    groups, frozen = _param_groups(
        model,
        TrainSettings(
            stage="unary",
            lr=0.001,
            crf_lr=0.1,
            head_lr=None,
            weight_decay=5e-4,
            crf_weight_decay=0.0,
            freeze_backbone=False,
        ),
    )
    assert "crf" not in {g["name"] for g in groups} and frozen
    groups, frozen = _param_groups(
        model,
        TrainSettings(
            stage="joint",
            lr=0.001,
            crf_lr=None,
            head_lr=None,
            weight_decay=5e-4,
            crf_weight_decay=0.0,
            freeze_backbone=True,
        ),
    )
    assert "backbone" not in {g["name"] for g in groups}


def test_joint_stage_trains_crf_and_unary_stage_does_not(train_set):
    model = models.create(
        "small", 21, width=4, hidden=8, crf="dense-learnable", crf_kwargs={"iters": 2}
    )
    crf_before = {k: v.clone() for k, v in model.crf.state_dict().items()}
    fit(model, train_set, TrainSettings(stage="unary", steps=1, batch_size=1), progress=False)
    for k, v in model.crf.state_dict().items():
        assert torch.equal(v, crf_before[k]), k
    assert all(p.requires_grad for p in model.crf.parameters())  # flags restored
    fit(
        model,
        train_set,
        TrainSettings(stage="joint", steps=1, batch_size=1, crf_lr=0.5),
        progress=False,
    )
    assert any(not torch.equal(v, crf_before[k]) for k, v in model.crf.state_dict().items())


class _Piecewise(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, image):
        return image[:, :1] * self.w

    def piecewise_loss(self, image, labels):
        return (self.w - 3.0) ** 2


def test_piecewise_stage_uses_piecewise_loss(train_set):
    model = _Piecewise()
    fit(
        model,
        train_set,
        TrainSettings(
            stage="piecewise",
            steps=3,
            batch_size=1,
            lr=0.1,
            optimizer="sgd",
            momentum=0.0,
            weight_decay=0.0,
            poly_power=0.0,
        ),
        progress=False,
    )
    # Gradient descent on (w - 3)^2 from 1 with lr 0.1: w <- w + 0.2 (3 - w), three times.
    w = 1.0
    for _ in range(3):
        w += 0.2 * (3 - w)
    assert float(model.w.detach()) == pytest.approx(w, rel=1e-6)


def test_bad_arguments(train_set):
    model = _model()
    with pytest.raises(ValueError, match="stage must be one of"):
        fit(model, train_set, TrainSettings(stage="nope", steps=1))
    with pytest.raises(ValueError, match="needs a model with a CRF"):
        fit(model, train_set, TrainSettings(stage="joint", steps=1))
    with pytest.raises(ValueError, match="piecewise_loss"):
        fit(model, train_set, TrainSettings(stage="piecewise", steps=1))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        fit(model, train_set, TrainSettings(steps=0))
    with pytest.raises(ValueError, match="empty"):
        fit(model, [], TrainSettings(steps=1))
    with pytest.raises(ValueError, match="run_dir needs config"):
        fit(model, train_set, TrainSettings(steps=1), run_dir="x")
    with pytest.raises(ValueError, match="must contain model"):
        fit(model, train_set, TrainSettings(steps=1), run_dir="x", config={"step": 1})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        fit(model, train_set, TrainSettings(steps=1), run_dir="x", config={**SPEC, "bad": object()})
    with pytest.raises(ValueError, match="val_kwargs"):
        fit(model, train_set, TrainSettings(steps=1), val_dataset=train_set)
    with pytest.raises(ValueError, match="lr_policy"):
        fit(model, train_set, TrainSettings(steps=1, lr_policy="cosine"))


def test_uncropped_images_of_different_sizes_error(fake_voc, tmp_path):
    from tests.fakevoc import make_fake_voc

    root = make_fake_voc(tmp_path / "mixed", n_train=1, size=(20, 24))
    small = VOCSegmentation(root, "train")
    big = VOCSegmentation(fake_voc, "train")
    mixed = torch.utils.data.ConcatDataset([small, big])
    with pytest.raises(ValueError, match="differ in size"):
        fit(_model(), mixed, TrainSettings(steps=1, batch_size=4), progress=False)


def test_cross_entropy_ignores_void_and_checks_classes():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    labels = torch.tensor([[[0, 255], [2, 1]]])
    ref = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255)
    assert torch.allclose(cross_entropy(logits, labels), ref)
    all_void = torch.full((1, 2, 2), 255)
    loss = cross_entropy(logits, all_void)
    loss.backward()
    assert float(loss.detach()) == 0.0
    with pytest.raises(ValueError, match="class 5 but the model predicts 3"):
        cross_entropy(logits, torch.tensor([[[5, 0], [0, 0]]]))


@pytest.mark.gpu
def test_amp_training_on_cuda_and_cpu_cuda_evaluation_agree(train_set, fake_voc):
    from deepcrf.engine import evaluate

    model = _model()
    out = fit(
        model,
        train_set,
        TrainSettings(steps=2, batch_size=2, amp=True),
        device="cuda",
        progress=False,
    )
    assert all(math.isfinite(x) for x in out["losses"])
    val = VOCSegmentation(fake_voc, "val")
    on_cpu = evaluate(model, val, num_classes=21, device="cpu", progress=False)
    on_gpu = evaluate(model, val, num_classes=21, device="cuda", progress=False)
    # Different kernels may flip the argmax of a few near-tied pixels.
    assert on_gpu["pixel_accuracy"] == pytest.approx(on_cpu["pixel_accuracy"], abs=1e-2)


def test_worker_processes_see_the_same_samples(train_set):
    # Augmentation is seeded per stream position, so worker processes draw the same crops and
    # flips; only the bilinear resize may round differently (workers run single-threaded).
    from torch.utils.data import DataLoader

    batches = []
    for workers in (0, 2):
        loader = DataLoader(
            _Stream(train_set, seed=0), batch_size=2, sampler=_StreamSampler(0, 3, 2, 0, 1),
            num_workers=workers, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        batches.append(list(loader))
    for (img0, lab0), (img2, lab2) in zip(*batches, strict=True):
        assert torch.equal(lab0, lab2)
        assert torch.allclose(img0, img2, atol=1e-3)


def test_cpu_mixed_precision_trains(train_set):
    out = fit(_model(), train_set, TrainSettings(steps=2, batch_size=2, amp=True), progress=False)
    assert all(math.isfinite(x) for x in out["losses"])


def test_diverging_loss_raises(train_set):
    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, image):
            return image[:, :1].expand(-1, 21, -1, -1) * self.w * float("inf")

    with pytest.raises(FloatingPointError, match="loss became nan at step 1"):
        fit(Exploding(), train_set, TrainSettings(steps=2, batch_size=1), progress=False)


def test_frozen_parameters_keep_their_batchnorm_statistics(train_set):
    # freeze_backbone / freeze fix the weights *and* the running statistics of the BatchNorm
    # layers those weights belong to; layers left trainable keep updating theirs.
    model = _model()
    bn = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert bn
    before = {n: m.running_mean.clone() for n, m in bn.items()}
    settings = TrainSettings(steps=2, batch_size=2, freeze=("backbone.",))
    # validating after each step must not put the fixed layers back into training mode
    fit(model, train_set, settings, progress=False, val_dataset=train_set, val_every=1,
        val_kwargs={"num_classes": 21, "trimap_bands": ()})  # fmt: skip
    for n, m in bn.items():
        moved = not torch.equal(m.running_mean, before[n])
        assert moved == (not n.startswith("backbone.")), n
    assert all(m.training is False for m in bn.values())  # fit leaves the model in eval mode
    trained = _model()
    fit(trained, train_set, TrainSettings(steps=2, batch_size=2), progress=False)
    assert any(
        not torch.equal(m.running_mean, before[n])
        for n, m in trained.named_modules()
        if isinstance(m, nn.BatchNorm2d) and n.startswith("backbone.")
    )


def test_freeze_prefixes_and_their_checkpoint_record(train_set, tmp_path):
    model = _model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = TrainSettings(steps=2, batch_size=2, lr=0.05, freeze=["head."])
    assert settings.freeze == ("head.",) and settings.frozen_prefixes == ("head.",)
    fit(model, train_set, settings, progress=False, run_dir=tmp_path / "run", config=SPEC)
    for n, p in model.named_parameters():
        assert torch.equal(p, start[n]) == n.startswith("head."), n
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["fit"]
    assert saved["freeze"] == ["head."] and saved["freeze_backbone"] is False
    # the JSON list reads back as the same settings: resuming finds no difference
    fit(_model(), train_set, settings, progress=False, run_dir=tmp_path / "run", config=SPEC,
        resume=True)  # fmt: skip
    with pytest.raises(TypeError, match="freeze must be a list of parameter-name prefixes"):
        TrainSettings(freeze="head.")
    both = TrainSettings(freeze=["crf.unary_net."], freeze_backbone=True)
    assert both.frozen_prefixes == ("crf.unary_net.", "backbone.")
