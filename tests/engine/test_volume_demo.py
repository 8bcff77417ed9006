import json

import numpy as np
import pytest

from deepcrf.cli import main
from deepcrf.data.synthetic_volume import SyntheticVolumes
from deepcrf.engine import volume_demo
from deepcrf.engine.volume_demo import GaussianVoxelClassifier, VolumeDemoSettings

TINY = VolumeDemoSettings(shape=(8, 20, 20), train=2, tune=1, val=1, iters=2, learn_steps=2)


def test_gaussian_voxel_classifier_recovers_the_classes():
    vols = SyntheticVolumes("train", 2, shape=(10, 24, 24), modalities=2)
    items = [vols[i] for i in range(2)]
    model = GaussianVoxelClassifier(3).fit([it.image for it in items], [it.labels for it in items])
    test = SyntheticVolumes("val", 1, shape=(10, 24, 24), modalities=2)[0]
    logits = model.logits(test.image)
    assert logits.shape == (3, 10, 24, 24) and logits.dtype == np.float32
    assert (logits.argmax(0) == test.labels).mean() > 0.9
    with pytest.raises(RuntimeError, match="fit the classifier first"):
        GaussianVoxelClassifier(3).logits(test.image)


def test_volume_demo_writes_report_results_and_slices(tmp_path, monkeypatch):
    monkeypatch.setattr(volume_demo, "QUICK", TINY)
    lines = []
    assert main(["demo", "--volume", "--quick", "--out", str(tmp_path)]) == 0
    out = tmp_path / "volume"
    results = json.loads((out / "results.json").read_text())
    assert [s["modalities"] for s in results["sections"]] == [1, 2]
    for section in results["sections"]:
        rows = {r["row"]: r for r in section["rows"]}
        assert list(rows) == ["voxel classifier", "+ dense CRF, isotropic", "+ dense CRF",
                              "+ learned CRF"]  # fmt: skip
        for r in rows.values():
            assert 0.0 <= r["dice_mean"] <= 1.0 and 0.0 <= r["boundary_accuracy"] <= 1.0
        assert len(section["learned_params"]["theta_alpha_mm"]) == 3
        assert (out / section["picture"]).stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "## 1 modality" in report and "## 2 modalities" in report and "slices_2mod.png" in report
    assert not list(out.glob(".*tmp")) and not lines
