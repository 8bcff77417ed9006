import pytest

from deepcrf.engine import config as cfg


def test_defaults_cover_the_schema():
    d = cfg.defaults()
    assert d["model"]["name"] == "small" and d["train"]["steps"] == 1000
    d["model"]["kwargs"]["x"] = 1
    assert cfg.defaults()["model"]["kwargs"] == {}  # a fresh copy each time


def test_load_merges_and_coerces(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('description = "d"\n[train]\nlr = 1\nsteps = 5\n[model.kwargs]\nwidth = 4\n')
    c = cfg.load(path)
    assert c["train"]["lr"] == 1.0 and isinstance(c["train"]["lr"], float)
    assert c["train"]["steps"] == 5 and c["model"]["kwargs"] == {"width": 4}
    assert c["train"]["batch_size"] == 8  # untouched default


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[trian]\nlr = 1\n", r"unknown config table \[trian\]"),
        ("[train]\nlearning_rate = 1\n", "unknown config key train.learning_rate"),
        ('[train]\nsteps = "many"\n', "train.steps must be integer"),
        ("[train]\namp = 1\n", "train.amp must be boolean"),
        ("[data]\nflip = true\n[data.extra]\nx = 1\n", "unknown config key data.extra"),
        ("[model]\nkwargs = 3\n", "model.kwargs must be a table"),
        ("stray = 1\n", "unknown config key 'stray'"),
        ("[train\n", "not valid TOML"),
    ],
)
def test_bad_files(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        cfg.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        cfg.load(tmp_path / "none.toml")


def test_set_and_flags():
    c = cfg.apply_set(cfg.defaults(), "train.lr=0.5")
    c = cfg.apply_set(c, "train.optimizer=adam")  # bare word -> string
    c = cfg.apply_set(c, "eval.scales=[0.5, 1.0]")
    c = cfg.apply_set(c, "model.crf_kwargs.iters=3")
    c = cfg.apply_set(c, "model.crf_kwargs.theta_alpha=50.0")
    assert c["train"]["lr"] == 0.5 and c["train"]["optimizer"] == "adam"
    assert c["eval"]["scales"] == [0.5, 1.0]
    assert c["model"]["crf_kwargs"] == {"iters": 3, "theta_alpha": 50.0}
    c = cfg.apply_flags(c, {"train.steps": 7, "train.lr": None})
    assert c["train"]["steps"] == 7 and c["train"]["lr"] == 0.5
    with pytest.raises(ValueError, match=r"expects table\.key=value"):
        cfg.apply_set(c, "lr=1")
    with pytest.raises(ValueError, match="not a table of keyword arguments"):
        cfg.apply_set(c, "train.lr.x=1")
