import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from deepcrf import models
from deepcrf.engine import checkpoint as ckpt
from deepcrf.engine.checkpoint import load_checkpoint, save_checkpoint
from deepcrf.engine.runner import init_weights

SPEC = {"name": "small", "num_classes": 5, "kwargs": {"width": 4, "hidden": 8}}


def _model(**extra):
    torch.manual_seed(0)
    return models.create("small", 5, width=4, hidden=8, **extra)


def test_round_trip_rebuilds_model_through_registry(tmp_path):
    model = _model()
    with torch.no_grad():
        model.classifier.bias.add_(1.5)  # not the initial value
    save_checkpoint(tmp_path, model, {"model": SPEC, "step": 3, "note": "x"})
    loaded, config = load_checkpoint(tmp_path)
    assert config["step"] == 3 and config["note"] == "x" and config["format"] == ckpt.FORMAT
    assert not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    image = torch.rand(1, 3, 16, 16) * 255
    model.eval()
    assert torch.equal(model(image), loaded(image))
    # A file inside the directory works as well.
    load_checkpoint(tmp_path / "model.safetensors")


def test_crf_model_round_trip(tmp_path):
    spec = {**SPEC, "kwargs": {**SPEC["kwargs"], "crf": "dense-bandwidths"}}
    model = _model(crf="dense-bandwidths")
    with torch.no_grad():
        model.crf.log_theta_alpha.fill_(2.0)
    save_checkpoint(tmp_path, model, {"model": spec})
    loaded, _ = load_checkpoint(tmp_path)
    assert torch.equal(loaded.crf.log_theta_alpha, model.crf.log_theta_alpha)


def test_files_are_json_and_safetensors_only(tmp_path):
    save_checkpoint(tmp_path, _model(), {"model": SPEC, "step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    json.loads((tmp_path / "config.json").read_text())
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["step"] == "1"


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model = _model()
    save_checkpoint(tmp_path, model, {"model": SPEC, "step": 1})
    before = (tmp_path / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, model, {"model": SPEC, "step": 2})
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"missing model\.safetensors"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, _model(), {"model": SPEC})
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"]["kwargs"]["width"] = 8  # weights no longer fit the model it describes
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has shape"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="must contain model"):
        save_checkpoint(tmp_path, _model(), {"step": 1})


def test_optimizer_state_round_trip_sgd_and_adam():
    for make in (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.95)),
    ):
        model = _model()
        opt = make(model.parameters())
        for _ in range(2):
            opt.zero_grad()
            model(torch.rand(1, 3, 16, 16) * 255).sum().backward()
            opt.step()
        tensors, meta = ckpt.optimizer_state(opt)
        meta = json.loads(json.dumps(meta))  # what the checkpoint stores
        fresh = make(_model().parameters())
        ckpt.restore_optimizer(fresh, tensors, meta)
        a, b = opt.state_dict(), fresh.state_dict()
        assert a["param_groups"] == b["param_groups"]
        for pid, entry in a["state"].items():
            for key, value in entry.items():
                other = b["state"][pid][key]
                assert torch.equal(value, other) if torch.is_tensor(value) else value == other


def test_rng_state_round_trip():
    torch.manual_seed(1)
    np.random.seed(2)  # noqa: NPY002 - the legacy global RNG is what the checkpoint saves
    random.seed(3)
    tensors, meta = ckpt.rng_state()
    meta = json.loads(json.dumps(meta))
    expected = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    torch.manual_seed(9)
    np.random.seed(9)  # noqa: NPY002
    random.seed(9)
    ckpt.restore_rng(tensors, meta)
    got = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_resume_state_is_one_self_consistent_file(tmp_path):
    model = _model()
    extra = {"extra": torch.ones(2)}
    save_checkpoint(tmp_path, model, {"model": SPEC, "step": 4}, state_tensors=extra,
                    state_meta={"step": 4, "x": [1]})  # fmt: skip
    weights, others, meta = ckpt.load_training_state(tmp_path)
    assert meta["step"] == 4 and meta["x"] == [1]
    assert torch.equal(others["extra"], torch.ones(2))
    for key, value in model.state_dict().items():
        assert torch.equal(weights[key], value), key
    with pytest.raises(ValueError, match="state step"):
        save_checkpoint(tmp_path, model, {"model": SPEC, "step": 5},
                        state_tensors={}, state_meta={"step": 4})  # fmt: skip


def test_init_weights_from_cnn_into_cnn_plus_crf(tmp_path):
    cnn = _model()
    with torch.no_grad():
        cnn.classifier.bias.fill_(0.5)
    save_checkpoint(tmp_path, cnn, {"model": SPEC})
    joint = _model(crf="dense-learnable")
    skipped = init_weights(joint, tmp_path)
    assert skipped and all(k.startswith("crf.") for k in skipped)
    assert torch.equal(joint.model.classifier.bias, cnn.classifier.bias)
    other = models.create("small", 5, width=8, hidden=8)
    with pytest.raises(ValueError, match="has shape"):
        init_weights(other, tmp_path)
