"""`deepcrf refine`: files, folders, label-PNG input, demo input, JSON summary, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepcrf.cli import main
from deepcrf.crf.dense import refine
from deepcrf.data.palette import read_label_png, write_label_png

FAST = ["--iters", "3", "--theta-alpha", "10", "--theta-beta", "20"]


def _write_case(folder, stem="a", h=20, w=24, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.zeros((h, w), np.uint8)
    labels[:, w // 2 :] = 1
    image = np.where(labels[..., None] == 1, 200, 40) + rng.integers(0, 20, (h, w, 3))
    image = image.astype(np.uint8)
    logits = 1.5 * np.eye(2)[labels].transpose(2, 0, 1) + rng.normal(0, 1.2, (2, h, w))
    probs = np.exp(logits) / np.exp(logits).sum(0)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{stem}.png")
    np.save(folder / f"{stem}.npy", probs.astype(np.float32))
    write_label_png(folder / f"{stem}_gt.png", labels)
    return image, probs.astype(np.float32), labels


def test_refine_npy_to_png_matches_python_api(tmp_path, capsys):
    image, probs, labels = _write_case(tmp_path)
    out = tmp_path / "out" / "refined.png"
    argv = [str(tmp_path / "a.png"), str(tmp_path / "a.npy"), "-o", str(out), *FAST]
    assert main(["refine", *argv, "--json", "--ground-truth", str(tmp_path / "a_gt.png")]) == 0
    summary = json.loads(capsys.readouterr().out)
    expected = refine(probs, image, iters=3, theta_alpha=10.0, theta_beta=20.0).argmax(0)
    np.testing.assert_array_equal(read_label_png(out), expected)
    row = summary["files"][0]
    assert row["num_classes"] == 2 and summary["params"]["iters"] == 3
    assert row["accuracy_after"] == pytest.approx(float((expected == labels).mean()))
    assert row["accuracy_after"] > row["accuracy_before"]
    assert not list(out.parent.glob(".*tmp"))  # atomic write left nothing behind


def test_refine_label_png_with_confidence(tmp_path):
    _, _, labels = _write_case(tmp_path)
    noisy = labels.copy()
    noisy[5:8, 3:6] = 1  # a wrong blob inside label 0
    noisy[0, 0] = 255  # unsure pixel: uniform probabilities
    write_label_png(tmp_path / "noisy.png", noisy)
    out = tmp_path / "r.png"
    argv = [str(tmp_path / "a.png"), str(tmp_path / "noisy.png"), "-o", str(out), *FAST]
    assert main(["refine", *argv, "--confidence", "0.6"]) == 0
    refined = read_label_png(out)
    assert (refined[5:8, 3:6] == 0).all()
    assert (refined == labels).mean() > (noisy == labels).mean()


def test_refine_folders_match_stems(tmp_path, capsys):
    for i, stem in enumerate(["x", "y"]):
        _write_case(tmp_path / "img", stem=stem, seed=i)
    probs_dir = tmp_path / "probs"
    probs_dir.mkdir()
    for stem in ["x", "y"]:
        (tmp_path / "img" / f"{stem}.npy").rename(probs_dir / f"{stem}.npy")
        (tmp_path / "img" / f"{stem}_gt.png").unlink()
    write_label_png(probs_dir / "x.png", np.zeros((20, 24), np.uint8))  # .npy must win
    out = tmp_path / "out"
    argv = [str(tmp_path / "img"), str(probs_dir), "-o", str(out), *FAST]
    assert main(["refine", *argv, "--json", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["x.png", "y.png"]
    assert [row["probs"][-5:] for row in summary["files"]] == ["x.npy", "y.npy"]
    (probs_dir / "y.npy").unlink()
    assert main(["refine", *argv]) == 2
    assert "have no probabilities" in capsys.readouterr().err


def test_refine_demo_input_roundtrip(tmp_path, capsys):
    demo = tmp_path / "demo"
    assert main(["refine", "--demo-input", str(demo)]) == 0
    assert "deepcrf refine" in capsys.readouterr().out
    argv = [str(demo / "image.png"), str(demo / "probs.npy"), "-o", str(tmp_path / "r.png")]
    gt = ["--ground-truth", str(demo / "labels.png")]
    assert main(["refine", *argv, *gt, "--theta-alpha", "20", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["files"][0]
    # The demo's blurry stride-8 unary is what a dense CRF is for: it must help.
    assert row["accuracy_after"] > row["accuracy_before"] + 0.01, row


def test_refine_errors(tmp_path, capsys):
    _write_case(tmp_path)
    img, npy = str(tmp_path / "a.png"), str(tmp_path / "a.npy")
    out = str(tmp_path / "o.png")
    assert main(["refine", img, str(tmp_path / "missing.npy"), "-o", out]) == 2
    assert "PROBS not found" in capsys.readouterr().err
    assert main(["refine", img, npy]) == 2
    assert "needs IMAGE, PROBS and -o OUT" in capsys.readouterr().err
    np.save(tmp_path / "bad.npy", np.ones((2, 5, 5), np.float32))
    assert main(["refine", img, str(tmp_path / "bad.npy"), "-o", out]) == 2
    err = capsys.readouterr().err  # the file, and the shapes that do not match
    assert "bad.npy: probs (L, *S) (2, 5, 5) must match the image" in err and "(20, 24, 3)" in err
    np.save(tmp_path / "unnorm.npy", np.ones((2, 20, 24), np.float32))
    assert main(["refine", img, str(tmp_path / "unnorm.npy"), "-o", out]) == 2
    assert "must sum to 1" in capsys.readouterr().err
    assert main(["refine", img, str(tmp_path / "a_gt.png"), "-o", out, "--confidence", "1.5"]) == 2
    assert "--confidence must lie in (0, 1)" in capsys.readouterr().err
    assert main(["refine", str(tmp_path), npy, "-o", out]) == 2
    assert "all files or all folders" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


# ------------------------------------------------------------------------------------------
# volumes: .npy and NIfTI
# ------------------------------------------------------------------------------------------

VOL = ["--iters", "3", "--theta-alpha", "6", "--theta-beta", "25", "--theta-gamma", "2"]


def _volume_case(tmp_path, shape=(6, 10, 12), channels=1, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int64)
    labels[:, :, shape[2] // 2 :] = 1
    means = rng.uniform(20, 120, (2, channels))
    ref = means[labels] + rng.normal(0, 6, (*shape, channels))  # (*S, C)
    logits = 1.2 * np.eye(2)[labels] + rng.normal(0, 1.0, (*shape, 2))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return ref.astype(np.float32), np.moveaxis(probs, -1, 0).astype(np.float32), labels


def test_refine_npy_volume_matches_python_api_in_every_layout(tmp_path, capsys):
    ref, probs, labels = _volume_case(tmp_path, channels=2)
    np.save(tmp_path / "probs.npy", probs)
    np.save(tmp_path / "gt.npy", labels)
    expected = refine(probs, ref, iters=3, theta_alpha=6.0, theta_beta=25.0, theta_gamma=2.0,
                      spacing=(2.0, 1.0, 1.0)).argmax(0)  # fmt: skip
    for name, arr in (("last", ref), ("first", np.moveaxis(ref, -1, 0))):
        np.save(tmp_path / f"{name}.npy", arr)
        out = tmp_path / f"out_{name}.npy"
        argv = [str(tmp_path / f"{name}.npy"), str(tmp_path / "probs.npy"), "-o", str(out)]
        argv += [*VOL, "--spacing", "2,1,1", "--ground-truth", str(tmp_path / "gt.npy"), "--json"]
        assert main(["refine", *argv]) == 0
        row = json.loads(capsys.readouterr().out)["files"][0]
        written = np.load(out)
        assert written.dtype == np.uint8
        np.testing.assert_array_equal(written, expected)
        assert row["shape"] == [6, 10, 12] and row["channels"] == 2
        assert row["spacing"] == [2.0, 1.0, 1.0] and len(row["dice_after"]) == 2
        assert row["accuracy_after"] >= row["accuracy_before"]
    # one channel without its axis, and a label volume with --confidence
    np.save(tmp_path / "grey.npy", ref[..., 0])
    np.save(tmp_path / "labels.npy", probs.argmax(0).astype(np.int16))
    out = tmp_path / "out_labels.npy"
    argv = [str(tmp_path / "grey.npy"), str(tmp_path / "labels.npy"), "-o", str(out), *VOL]
    assert main(["refine", *argv, "--confidence", "0.6"]) == 0
    assert np.load(out).shape == (6, 10, 12)


def test_refine_nifti_round_trip_keeps_affine_and_reads_spacing(tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    ref, probs, labels = _volume_case(tmp_path, shape=(8, 9, 5))
    affine = np.array([[0.0, -1.0, 0, 40], [2.0, 0, 0, -12], [0, 0, 1.5, 7], [0, 0, 0, 1]])
    image = nib.Nifti1Image(ref[..., 0], affine)  # zooms (2, 1, 1.5) from the affine
    image.header["descrip"] = b"deepcrf test"
    nib.save(image, tmp_path / "ref.nii.gz")
    np.save(tmp_path / "probs.npy", probs)
    for suffix in (".nii.gz", ".nii"):
        out = tmp_path / f"labels{suffix}"
        argv = [str(tmp_path / "ref.nii.gz"), str(tmp_path / "probs.npy"), "-o", str(out)]
        assert main(["refine", *argv, *VOL, "--json"]) == 0
        row = json.loads(capsys.readouterr().out)["files"][0]
        assert row["spacing"] == [2.0, 1.0, 1.5]
        written = nib.load(out)
        np.testing.assert_allclose(written.affine, affine)
        assert written.header["descrip"].tobytes().startswith(b"deepcrf test")
        assert written.get_data_dtype() == np.uint8
        expected = refine(probs, ref[..., 0], iters=3, theta_alpha=6.0, theta_beta=25.0,
                          theta_gamma=2.0, spacing=(2.0, 1.0, 1.5)).argmax(0)  # fmt: skip
        np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
    # a label NIfTI as PROBS (whole numbers) and as ground truth
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), tmp_path / "gt.nii")
    out = tmp_path / "from_labels.nii.gz"
    argv = [str(tmp_path / "ref.nii.gz"), str(tmp_path / "gt.nii"), "-o", str(out), *VOL]
    assert main(["refine", *argv, "--ground-truth", str(tmp_path / "gt.nii")]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_refine_volume_errors_name_the_problem(tmp_path, capsys, monkeypatch):
    ref, probs, _ = _volume_case(tmp_path)
    np.save(tmp_path / "ref.npy", ref[..., 0])
    np.save(tmp_path / "probs.npy", probs)
    np.save(tmp_path / "small.npy", probs[:, :, :5])
    base = [str(tmp_path / "ref.npy"), str(tmp_path / "probs.npy")]
    cases = [
        ([str(tmp_path / "ref.npy"), str(tmp_path / "small.npy"), "-o", str(tmp_path / "o.npy")],
         "does not match the probabilities' spatial shape"),
        ([*base, "-o", str(tmp_path / "o.png")], "-o for a volume must end in"),
        ([*base, "-o", str(tmp_path / "ref.npy")], "is one of the inputs; refusing to overwrite"),
        ([*base, "-o", str(tmp_path / "o.npy"), "--spacing", "1,0,1"], "spacing must be finite"),
        ([*base, "-o", str(tmp_path / "o.npy"), "--spacing", "1,1"], "one length per spatial"),
        ([*base, "-o", str(tmp_path / "o.npy"), "--theta-beta", "3,4"], "theta_beta must be"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(["refine", *argv]) == 2, message
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()
    np.testing.assert_array_equal(np.load(tmp_path / "ref.npy"), ref[..., 0])  # untouched
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(ref[:, :, :5, 0], np.eye(4)), tmp_path / "other.nii.gz")
    argv = [str(tmp_path / "other.nii.gz"), str(tmp_path / "probs.npy"), "-o", "x.nii.gz"]
    assert main(["refine", *argv]) == 2
    assert "does not match the probabilities' spatial shape" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "nibabel", None)
    assert main(["refine", *argv]) == 2
    assert 'pip install "deepcrf[medical]"' in capsys.readouterr().err


def test_refine_folders_of_volumes(tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    refs, probs_dir, out = tmp_path / "refs", tmp_path / "probs", tmp_path / "out"
    refs.mkdir()
    probs_dir.mkdir()
    for i in range(3):
        ref, probs, _ = _volume_case(tmp_path, shape=(5, 6, 7), seed=i)
        nib.save(nib.Nifti1Image(ref[..., 0], np.diag([2.0, 1.0, 1.0, 1.0])), refs / f"v{i}.nii.gz")
        np.save(probs_dir / f"v{i}.npy", probs if i != 1 else probs[:, :3])  # v1 is broken
    argv = ["refine", str(refs), str(probs_dir), "-o", str(out), *VOL, "--json", "--no-progress"]
    assert main(argv) == 1
    summary = json.loads(capsys.readouterr().out)
    assert [Path(r["output"]).name for r in summary["files"]] == ["v0.nii.gz", "v2.nii.gz"]
    assert summary["files"][0]["spacing"] == [2.0, 1.0, 1.0]
    assert len(summary["failed"]) == 1 and "v1" in summary["failed"][0]["image"]
    assert sorted(p.name for p in out.iterdir()) == ["v0.nii.gz", "v2.nii.gz"]
    assert main(argv) == 2  # outputs exist now
    assert "exist already" in capsys.readouterr().err
