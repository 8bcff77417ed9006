import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import deepcrf.models as models
from deepcrf.cli import main
from deepcrf.data.synthetic import SyntheticSegmentation
from deepcrf.engine import demo
from deepcrf.engine.demo import QUICK, DemoSettings, _transfer_unary

REQUIRED = {"name", "miou", "trimap_accuracy", "seconds_per_image"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `deepcrf demo --quick` end to end, shared by the tests below."""
    out = tmp_path_factory.mktemp("demo") / "demo_out"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        status = main(["demo", "--quick", "--out", str(out), "--no-progress"])
    return status, out, buf.getvalue()


def test_quick_demo_writes_results_json(quick_run):
    status, out, _ = quick_run
    assert status == 0
    doc = json.loads((out / "results.json").read_text())
    rows = doc["rows"]
    assert rows[0]["name"] == demo.BASELINE
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names))
    control = demo.control_name(QUICK)
    assert names == [control if r.key == "control" else r.name for r in demo._ROWS]
    by_name = {r["name"]: r for r in rows}
    assert control == f"CNN alone (+{QUICK.crf_steps} steps)" and control in by_name
    # Every end-to-end CRF row is also compared with the CNN trained as many extra steps.
    for name in ("CRF-as-RNN", "+ learned bandwidths", "Deep Gaussian CRF"):
        assert by_name[name]["controls"] == [control]
    assert by_name[demo.BASELINE]["controls"] == [] and by_name[control]["controls"] == []
    for row in rows:
        assert REQUIRED <= set(row), row["name"]
        assert 0.0 <= row["miou"] <= 1.0
        assert 0.0 <= row["trimap_accuracy"] <= 1.0
        assert 0.0 <= row["pixel_accuracy"] <= 1.0
        assert row["seconds_per_image"] > 0
        assert set(row["trimap_curve"]) == {str(b) for b in QUICK.trimap_bands}
        assert row["trimap_curve"][str(QUICK.trimap_band)] == row["trimap_accuracy"]
    meta = doc["meta"]
    assert meta["mode"] == "quick"
    assert meta["settings"]["size"] == QUICK.size
    assert meta["total_seconds"] > 0 and meta["torch_threads"] >= 1
    if "small_contextual" in models.available():
        ctx = meta["contextual_inference"]
        tried = [(t["pairwise_mode"], t["pairwise_scale"]) for t in ctx["trials"]]
        assert tried == [(m, float(w)) for m, w in QUICK.contextual_candidates]
        assert ("full", 1.0) in tried  # the paper's inference competes
        best = max(t["tune_miou"] for t in ctx["trials"])
        assert ctx["tune_miou"] == best
        assert (ctx["pairwise_mode"], ctx["pairwise_scale"]) in tried
        assert by_name["Contextual CRF (Lin et al.)"]["controls"] == [demo.CONTEXTUAL_UNARY]
        assert demo.CONTEXTUAL_UNARY in by_name


def test_quick_demo_report_and_figures(quick_run):
    _, out, stdout = quick_run
    report = (out / "report.md").read_text()
    assert report.startswith("# deepcrf demo report")
    assert "| model | mIoU % |" in report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert "trimap.png" in links
    overlays = [link for link in links if link.startswith("overlays/")]
    assert len(overlays) == QUICK.overlay_images
    for link in links:
        with Image.open(out / link) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 50
    rows = json.loads((out / "results.json").read_text())["rows"]
    # One sentence per CRF row, computed against the CNN alone.
    verdicts = re.findall(r"^- \*\*(.+?)\*\* (beats|does \*\*not\*\*)", report, re.M)
    assert [v[0] for v in verdicts] == [r["name"] for r in rows[1:]]
    # ... and, for rows with a control, against that control too.
    for row in rows:
        for control in row["controls"]:
            assert re.search(
                rf"^- \*\*{re.escape(row['name'])}\*\* .*Against its control it "
                rf"(beats|does \*\*not\*\* beat) \*\*{re.escape(control)}\*\*",
                report,
                re.M,
            ), row["name"]
    # The table is printed.
    assert "model" in stdout and demo.BASELINE in stdout and "report:" in stdout


def test_quick_demo_restores_global_state(quick_run):
    assert not torch.are_deterministic_algorithms_enabled()


def test_transfer_unary_copies_the_cnn():
    unary = models.create("small", 3, width=4)
    state = unary.state_dict()
    with_crf = models.create("small", 3, width=4, crf="dense-learnable")
    assert _transfer_unary(with_crf, state) == []
    for name, tensor in state.items():
        assert torch.equal(with_crf.state_dict()[f"model.{name}"], tensor)
    if "small_gcrf" in models.available():
        gcrf = models.create("small_gcrf", 3, width=4)
        missing = _transfer_unary(gcrf, state)
        assert missing and all(not n.startswith(("backbone.", "classifier.")) for n in missing)
        assert torch.equal(gcrf.state_dict()["classifier.weight"], state["classifier.weight"])
    other = models.create("small", 3, width=8)
    with pytest.raises(RuntimeError, match="size mismatch"):
        _transfer_unary(other, state)
    with pytest.raises(ValueError, match=r"no weights starting with 'nope\.'"):
        _transfer_unary(other, state, prefix="nope.")


def test_transfer_unary_refuses_foreign_weights():
    unary = models.create("small", 3, width=4)
    state = {**unary.state_dict(), "extra.weight": torch.zeros(1)}
    with pytest.raises(RuntimeError, match=r"\['extra.weight'\] have no place"):
        _transfer_unary(models.create("small", 3, width=4), state)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"unary_steps": 0}, "unary_steps must be >= 1"),
        ({"lr": float("nan")}, "lr must be a finite positive number"),
        ({"trimap_band": 5, "trimap_bands": (1, 2)}, "trimap_band 5 must be one of"),
        ({"overlay_images": 7, "n_val": 6}, r"overlay_images must be in \[0, n_val=6\]"),
        ({"contextual_candidates": (("mean", 1.0),)}, "contextual_candidates must be"),
        ({"contextual_candidates": ()}, "contextual_candidates must be"),
    ],
)
def test_settings_are_checked(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(QUICK, **change).check()


def test_demo_data_is_deterministic():
    a = SyntheticSegmentation("val", QUICK.n_val, size=QUICK.size, seed=QUICK.seed)
    b = SyntheticSegmentation("val", QUICK.n_val, size=QUICK.size, seed=QUICK.seed)
    for i in range(QUICK.n_val):
        for x, y in zip(a.sample(i), b.sample(i), strict=True):
            np.testing.assert_array_equal(x, y)


def test_cli_demo_help(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--quick" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_demo_same_numbers_twice(tmp_path, quick_run):
    _, first, _ = quick_run
    settings = DemoSettings(**{**dataclasses.asdict(QUICK)})
    demo.run_demo(tmp_path / "again", settings=settings, progress=False, log=lambda s: None)
    rows_a = json.loads((first / "results.json").read_text())["rows"]
    rows_b = json.loads((tmp_path / "again" / "results.json").read_text())["rows"]
    keys = ("name", "miou", "pixel_accuracy", "trimap_accuracy", "trimap_curve", "per_class_iou")
    assert [[r[k] for k in keys] for r in rows_a] == [[r[k] for k in keys] for r in rows_b]


def test_model_initialisation_does_not_depend_on_the_global_rng():
    from deepcrf.engine.demo import _seeded_create

    torch.manual_seed(123)
    a = _seeded_create(0, "small", 4, width=4)
    after_a = torch.rand(1)
    torch.manual_seed(456)
    b = _seeded_create(0, "small", 4, width=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    # The caller's RNG stream is left as it was.
    torch.manual_seed(123)
    _seeded_create(0, "small", 4, width=4)
    assert torch.equal(torch.rand(1), after_a)
