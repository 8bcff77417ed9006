"""Fault injection: every row of issue 16's table, reproduced and checked for the new behaviour.

(What a user made is never lost, clobbered or silently wrong: runs, outputs and inputs.)
"""

import os
import stat

import numpy as np
import pytest
import torch

from deepcrf.cli import main
from deepcrf.crf.contextual import ContextualCRF
from deepcrf.crf.dense import DenseCRF, ExactFilterWarning, dense_crf
from deepcrf.engine.config import TrainSettings


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _scene(h=12, w=14, labels=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, labels, h, w, generator=g), torch.rand(1, 3, h, w, generator=g) * 255


# ------------------------------------------------------------------------------------------
# files are created with the process umask
# ------------------------------------------------------------------------------------------


def test_written_files_follow_the_umask(tmp_path, umask_022):
    from deepcrf._atomic import atomic_path
    from deepcrf.data.palette import write_label_png

    write_label_png(tmp_path / "labels.png", np.zeros((4, 5), np.uint8))
    with atomic_path(tmp_path / "x.json") as tmp:
        tmp.write_text("{}")
    assert _mode(tmp_path / "labels.png") == 0o644 and _mode(tmp_path / "x.json") == 0o644
    os.umask(0o077)
    write_label_png(tmp_path / "private.png", np.zeros((4, 5), np.uint8))
    assert _mode(tmp_path / "private.png") == 0o600


# ------------------------------------------------------------------------------------------
# inputs that used to be accepted silently
# ------------------------------------------------------------------------------------------


def test_float_image_in_unit_range_is_rejected():
    logits, image = _scene()
    with pytest.raises(ValueError, match=r"looks like RGB scaled to \[0, 1\].*image \* 255"):
        dense_crf(logits, image / 255)
    dense_crf(logits, image)  # 0-255 floats and uint8 are fine
    dense_crf(logits, torch.zeros_like(image))  # a black image too


def test_negative_kernel_weights_need_explicit_consent():
    logits, image = _scene()
    with pytest.raises(ValueError, match=r"w_bilateral must be >= 0.*allow_negative_weights"):
        dense_crf(logits, image, w_bilateral=-10)
    with pytest.raises(ValueError, match=r"w_spatial must be >= 0"):
        dense_crf(logits, image, w_spatial=torch.tensor([1.0, -1.0, 1.0]))
    dense_crf(logits, image, w_bilateral=-10, allow_negative_weights=True)
    with pytest.raises(ValueError, match=r"w_bilateral must be >= 0"):
        DenseCRF(3, w_bilateral=-1.0)
    # Learned weights may cross zero during training without breaking the forward.
    crf = DenseCRF(3, learnable=("weights",))
    with torch.no_grad():
        crf.w_bilateral.fill_(-0.5)
    assert torch.isfinite(crf(logits, image)).all()


def test_contextual_crf_rejects_nan_features():
    crf = ContextualCRF(4, 3, hidden_channels=8)
    feats = torch.randn(1, 4, 6, 6)
    feats[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"features must be finite; found 1 NaN/inf"):
        crf(feats)
    with pytest.raises(ValueError, match=r"features must be finite"):
        crf.piecewise_loss(feats, torch.zeros(1, 6, 6, dtype=torch.long))


# ------------------------------------------------------------------------------------------
# cost: memory estimate before a large call, a warning before a slow exact filter
# ------------------------------------------------------------------------------------------


def test_memory_estimate_fails_before_the_call(monkeypatch, tmp_path, capsys):
    from deepcrf.ops.meanfield import estimate_peak_bytes

    # The model against the measured 1000x750 peaks (703 MB at 21 labels, 360 MB training at 2).
    assert 650 < estimate_peak_bytes(750_000, 21, (5, 2), 5) / 2**20 < 800
    assert 320 < estimate_peak_bytes(750_000, 2, (5, 2), 5, training=True) / 2**20 < 400
    monkeypatch.setenv("DEEPCRF_MEMORY_LIMIT_MB", "64")
    logits, image = _scene(400, 500, 21)
    with pytest.raises(MemoryError, match=r"needs about 1\d\d MiB .* 64 MiB are available.*tile"):
        dense_crf(logits, image)
    np.save(tmp_path / "p.npy", np.full((21, 400, 500), 1 / 21, np.float32))
    from PIL import Image

    Image.fromarray(np.zeros((400, 500, 3), np.uint8)).save(tmp_path / "i.png")
    argv = [
        "refine",
        str(tmp_path / "i.png"),
        str(tmp_path / "p.npy"),
        "-o",
        str(tmp_path / "o.png"),
    ]
    assert main(argv) == 2
    assert "tile the input" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
    monkeypatch.setenv("DEEPCRF_MEMORY_LIMIT_MB", "lots")
    with pytest.raises(ValueError, match="DEEPCRF_MEMORY_LIMIT_MB must be a number"):
        dense_crf(logits, image)


def test_exact_filter_warns_of_its_quadratic_cost():
    logits, image = _scene(65, 65, 2)
    with pytest.warns(ExactFilterWarning, match=r"O\(N²\): 4225 points"):
        dense_crf(logits, image, iters=1, method="exact")
    small_logits, small_image = _scene(20, 20, 2)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error", ExactFilterWarning)
        dense_crf(small_logits, small_image, iters=1, method="exact")


# ------------------------------------------------------------------------------------------
# deepcrf refine: outputs never clobber inputs or earlier results; folders go on past a bad file
# ------------------------------------------------------------------------------------------


def _refine_case(folder, stem="a", h=16, w=20, labels=2, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{stem}.png")
    probs = rng.random((labels, h, w)).astype(np.float32)
    np.save(folder / f"{stem}.npy", probs / probs.sum(0))
    return folder / f"{stem}.png", folder / f"{stem}.npy"


def test_refine_never_overwrites_an_input_or_an_existing_output(tmp_path, capsys):
    image, probs = _refine_case(tmp_path)
    before = image.read_bytes()
    assert main(["refine", str(image), str(probs), "-o", str(image), "--overwrite"]) == 2
    assert "is one of the inputs" in capsys.readouterr().err and image.read_bytes() == before
    out = tmp_path / "out.png"
    out.write_bytes(b"precious")
    assert main(["refine", str(image), str(probs), "-o", str(out)]) == 2
    assert "exist already" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert main(["refine", str(image), str(probs), "-o", str(out), "--overwrite"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_refine_output_format_follows_the_extension(tmp_path, capsys):
    image, probs = _refine_case(tmp_path)
    assert main(["refine", str(image), str(probs), "-o", str(tmp_path / "out.jpg")]) == 2
    assert "one of .png, .npy" in capsys.readouterr().err
    assert not (tmp_path / "out.jpg").exists()
    assert main(["refine", str(image), str(probs), "-o", str(tmp_path / "out.npy")]) == 0
    labels = np.load(tmp_path / "out.npy")
    assert labels.shape == (16, 20) and labels.dtype == np.uint8
    (tmp_path / "dir").mkdir()
    assert main(["refine", str(image), str(probs), "-o", str(tmp_path / "dir")]) == 2
    assert "is a folder: name the output file" in capsys.readouterr().err


def test_refine_checks_ground_truth_before_writing(tmp_path, capsys):
    from deepcrf.data.palette import write_label_png

    image, probs = _refine_case(tmp_path)
    write_label_png(tmp_path / "gt.png", np.zeros((5, 5), np.uint8))
    out = tmp_path / "out.png"
    argv = [str(image), str(probs), "-o", str(out), "--ground-truth", str(tmp_path / "gt.png")]
    assert main(["refine", *argv]) == 2
    assert "ground truth" in capsys.readouterr().err and not out.exists()


def test_refine_folder_reports_each_failure_and_goes_on(tmp_path, capsys):
    import json

    for i in range(6):
        _refine_case(tmp_path / "in", stem=f"im{i}", seed=i)
    np.save(tmp_path / "in" / "im4.npy", np.full((2, 3, 3), 0.5, np.float32))  # wrong size
    out = tmp_path / "out"
    argv = ["refine", str(tmp_path / "in"), str(tmp_path / "in"), "-o", str(out), "--json"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert len(summary["files"]) == 5 and len(summary["failed"]) == 1
    assert summary["failed"][0]["image"].endswith("im4.png") and "im4" in captured.err
    assert sorted(p.name for p in out.iterdir()) == [f"im{i}.png" for i in (0, 1, 2, 3, 5)]
    fast = tmp_path / "fast"
    assert main([*argv[:3], "-o", str(fast), "--fail-fast"]) == 2
    assert sorted(p.name for p in fast.iterdir()) == [f"im{i}.png" for i in range(4)]
    assert main([*argv[:3], "-o", str(tmp_path / "in" / "im0.png")]) == 2
    assert "names a folder" in capsys.readouterr().err


@pytest.mark.parametrize("labels", [256, 300])
def test_many_labels_are_never_wrapped_or_written_as_ignore(tmp_path, capsys, labels):
    image, probs = _refine_case(tmp_path, labels=labels)
    p = np.load(probs)
    p[:] = 0.1 / (labels - 1)
    p[labels - 10] = 0.9  # argmax = labels - 10 (246 or 290) everywhere
    np.save(probs, p)
    assert main(["refine", str(image), str(probs), "-o", str(tmp_path / "o.png")]) == 2
    assert "a PNG label map holds labels 0-254" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
    argv = ["refine", str(image), str(probs), "-o", str(tmp_path / "o.npy"), "--iters", "1"]
    assert main(argv) == 0
    written = np.load(tmp_path / "o.npy")
    assert written.dtype == (np.uint8 if labels <= 256 else np.uint16)
    assert (written == labels - 10).all()


def test_sixteen_bit_grey_image_is_scaled_not_clipped(tmp_path, capsys):
    from PIL import Image

    from deepcrf.data.palette import read_image, read_image_info

    ramp = np.linspace(0, 65535, 16 * 20).reshape(16, 20).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "a.png")  # 16-bit greyscale PNG
    arr, note = read_image_info(tmp_path / "a.png")
    assert arr.dtype == np.float32 and "scaled to 0-255" in note
    np.testing.assert_allclose(arr[..., 0], ramp / 257.0, rtol=1e-5)
    u8 = read_image(tmp_path / "a.png")
    assert u8.dtype == np.uint8 and u8.min() == 0 and u8.max() == 255 and (u8 < 255).mean() > 0.9
    _, probs = _refine_case(tmp_path, stem="b")
    assert main(["refine", str(tmp_path / "a.png"), str(probs), "-o", str(tmp_path / "o.png")]) == 0
    assert "16-bit) image: scaled to 0-255" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# training runs: never overwritten, checkpointed on signals, resumable bit for bit
# ------------------------------------------------------------------------------------------

SPEC = {"model": {"name": "small", "num_classes": 21, "kwargs": {"width": 4, "hidden": 8}}}
STEPS = 8
SETTINGS = TrainSettings(steps=STEPS, batch_size=2, lr=0.02, seed=3)
FIT = dict(progress=False, config=SPEC)
KILL_POINTS = sorted(np.random.default_rng(16).choice(np.arange(1, STEPS - 1), 5, replace=False))


def _small():
    from deepcrf import models

    torch.manual_seed(0)
    return models.create("small", 21, width=4, hidden=8)


@pytest.fixture(scope="module")
def voc_set(tmp_path_factory):
    from deepcrf.data.transforms import train_transform
    from deepcrf.data.voc import VOCSegmentation
    from tests.fakevoc import make_fake_voc

    root = make_fake_voc(tmp_path_factory.mktemp("voc"))
    return root, VOCSegmentation(root, "train", transform=train_transform(24))


@pytest.fixture(scope="module")
def straight(voc_set, tmp_path_factory):
    from deepcrf.engine import fit

    model = _small()
    fit(model, voc_set[1], SETTINGS, run_dir=tmp_path_factory.mktemp("straight"), **FIT)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sigint_checkpoints_and_resume_is_bit_identical_at_five_points(voc_set, straight, tmp_path):
    import signal

    from deepcrf.engine import fit
    from deepcrf.engine.train import TrainingInterrupted

    assert len(KILL_POINTS) == 5
    for k in KILL_POINTS:
        run = tmp_path / f"k{k}"

        def interrupt(step, loss, k=k):
            if step == k:  # Ctrl-C while step k + 1 runs: it completes, is saved, then stop
                os.kill(os.getpid(), signal.SIGINT)

        with pytest.raises(
            TrainingInterrupted, match=rf"SIGINT after step {k + 1} of {STEPS}.*--resume"
        ):
            fit(_small(), voc_set[1], SETTINGS, run_dir=run, callback=interrupt, **FIT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
        torch.manual_seed(999)  # a new process's RNG state: resume must restore its own
        resumed = _small()
        out = fit(resumed, voc_set[1], SETTINGS, run_dir=run, resume=True, **FIT)
        assert out["start_step"] == k + 1
        _same(straight, resumed.state_dict())


_KILLER = """
import os, signal, sys, torch
from deepcrf import models
from deepcrf.data.transforms import train_transform
from deepcrf.data.voc import VOCSegmentation
from deepcrf.engine import TrainSettings, fit
root, run, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = models.create("small", 21, width=4, hidden=8)
spec = {"model": {"name": "small", "num_classes": 21, "kwargs": {"width": 4, "hidden": 8}}}
def die(step, loss):
    if step == k:
        os.kill(os.getpid(), signal.SIGKILL)
settings = TrainSettings(steps=8, batch_size=2, lr=0.02, seed=3)
fit(model, VOCSegmentation(root, "train", transform=train_transform(24)), settings,
    progress=False, config=spec, run_dir=run, checkpoint_every=2, callback=die)
"""


def test_kill_9_then_resume_is_bit_identical_at_five_points(voc_set, straight, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from deepcrf.engine import fit

    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for k in KILL_POINTS:
        run = tmp_path / f"k{k}"
        proc = subprocess.run(
            [sys.executable, str(script), str(voc_set[0]), str(run), str(k)],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == -9, proc.stderr[-2000:]
        resumed = _small()
        if k < 2:  # killed before its first checkpoint: nothing to resume, nothing half-written
            assert not (run / "config.json").exists() and not list(run.glob("*.tmp"))
            fit(resumed, voc_set[1], SETTINGS, run_dir=run, **FIT)
        else:
            assert json.loads((run / "config.json").read_text())["step"] == k // 2 * 2
            out = fit(resumed, voc_set[1], SETTINGS, run_dir=run, resume=True, **FIT)
            assert out["start_step"] == k // 2 * 2
        _same(straight, resumed.state_dict())


TRAIN = ["--crop-size", "24", "--batch-size", "2", "--quiet", "--max-steps", "2",
         "--set", "model.kwargs.width=4", "--set", "model.kwargs.hidden=8"]  # fmt: skip


def _train(data, run, *extra):
    return main(["train", "--data", str(data), "--out", str(run), *TRAIN, *extra])


def test_existing_run_is_never_overwritten_without_consent(voc_set, tmp_path, capsys):
    data = voc_set[0]
    run = tmp_path / "run"
    assert _train(data, run, "--val-split", "val") == 0
    weights = (run / "model.safetensors").read_bytes()
    assert (run / "best" / "model.safetensors").is_file()
    capsys.readouterr()
    assert _train(data, run) == 2
    err = capsys.readouterr().err
    assert "holds a run already (step 2)" in err and "--resume" in err and "--overwrite" in err
    assert (run / "model.safetensors").read_bytes() == weights
    (run / "notes.txt").write_text("mine")
    assert _train(data, run, "--overwrite", "--seed", "5") == 0
    assert not (run / "best").exists()  # best/ of the old run does not stay beside the new one
    assert (run / "notes.txt").read_text() == "mine"  # nothing but the run's own files deleted
    assert (run / "model.safetensors").read_bytes() != weights
    (tmp_path / "file").write_text("x")
    assert _train(data, tmp_path / "file") == 2
    assert "is a file" in capsys.readouterr().err


def test_bad_dataset_files_are_all_reported_before_the_first_step(tmp_path, capsys):
    from PIL import Image

    from tests.fakevoc import make_fake_voc

    data = make_fake_voc(tmp_path / "voc", n_train=4)
    names = (data / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    labels = data / "SegmentationClass"
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(labels / f"{names[1]}.png")
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(labels / f"{names[2]}.png")  # RGB
    Image.fromarray(np.full((48, 64), 40, np.uint8), mode="L").save(labels / f"{names[3]}.png")
    assert _train(data, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "3 bad file(s) in the dataset" in err
    assert f"{names[1]}.png: labels are 10x10" in err
    assert f"{names[2]}.png" in err and "mode RGB" in err
    assert "labels [40] outside [0, 21)" in err
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_damaged_checkpoints_fail_by_name_and_never_exit_zero(voc_set, tmp_path, capsys):
    data = voc_set[0]
    run = tmp_path / "run"
    assert _train(data, run) == 0
    model_file, state_file = run / "model.safetensors", run / "state.safetensors"
    good_model, good_state = model_file.read_bytes(), state_file.read_bytes()
    # bit flips inside the weights: evaluate and resume both refuse, naming the file
    flipped = bytearray(good_model)
    for pos in range(len(flipped) - 200, len(flipped), 37):
        flipped[pos] ^= 0x10
    model_file.write_bytes(bytes(flipped))
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(data), "--quiet"]) == 2
    assert "model.safetensors is damaged" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 2  # a finished run too
    assert "model.safetensors is damaged" in capsys.readouterr().err
    # truncated files: a clear error, no SafetensorError traceback
    model_file.write_bytes(good_model[: len(good_model) // 2])
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(data), "--quiet"]) == 2
    assert "damaged or truncated" in capsys.readouterr().err
    model_file.write_bytes(good_model)
    state_file.write_bytes(good_state[:100])
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 2
    assert "state.safetensors is damaged or truncated" in capsys.readouterr().err
    state_file.write_bytes(good_state)
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0  # intact again


def test_vgg_model_without_pretrained_weights_warns(voc_set, tmp_path):
    from deepcrf.engine.runner import UntrainedBackboneWarning

    argv = ["--model", "deeplab_largefov", "--set", "model.kwargs={}", "--max-steps", "1"]
    with pytest.warns(UntrainedBackboneWarning, match="RANDOM weights.*--pretrained"):
        rc = main(["train", "--data", str(voc_set[0]), "--out", str(tmp_path / "r"), *TRAIN[:5],
                   *argv, "--skip-data-check", "--crop-size", "8"])  # fmt: skip
    assert rc == 0


def test_out_that_is_a_file_and_predictions_over_inputs(voc_set, tmp_path, capsys, umask_022):
    data = voc_set[0]
    run = tmp_path / "run"
    assert _train(data, run) == 0
    for name in ("config.json", "model.safetensors", "state.safetensors"):
        assert _mode(run / name) == 0o644, name
    (tmp_path / "file").write_text("x")
    images = data / "JPEGImages"
    predict = ["predict", str(images), "--checkpoint", str(run), "--quiet"]
    assert main([*predict, "--out", str(tmp_path / "file")]) == 2
    assert "is a file; predictions go into a folder" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    # PNG inputs predicted into their own folder would be replaced by label maps: refused.
    from PIL import Image

    pngs = tmp_path / "pngs"
    pngs.mkdir()
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(pngs / "a.png")
    before = (pngs / "a.png").read_bytes()
    assert main(["predict", str(pngs), "--checkpoint", str(run), "--out", str(pngs), "--quiet",
                 "--overwrite"]) == 2  # fmt: skip
    assert "is one of the inputs; refusing to overwrite it" in capsys.readouterr().err
    assert (pngs / "a.png").read_bytes() == before
    out = tmp_path / "pred"
    assert main([*predict, "--out", str(out)]) == 0
    assert main([*predict, "--out", str(out)]) == 2
    assert "exist already" in capsys.readouterr().err
    assert main([*predict, "--out", str(out), "--overwrite"]) == 0
