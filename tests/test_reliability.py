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
