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
    with pytest.raises(ValueError, match=r"w_gaussian must be >= 0"):
        dense_crf(logits, image, w_gaussian=torch.tensor([1.0, -1.0, 1.0]))
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
        dense_crf(logits, image, iters=1, filter="exact")
    small_logits, small_image = _scene(20, 20, 2)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error", ExactFilterWarning)
        dense_crf(small_logits, small_image, iters=1, filter="exact")


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
