"""DDP on 2 CPU processes (gloo backend) launched by torchrun, as `torchrun -m deepcrf train`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from deepcrf import models
from deepcrf.data.voc import VOCSegmentation
from deepcrf.engine import evaluate

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


def _torchrun(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_ranks_end_with_identical_weights_and_metrics(tmp_path, fake_voc):
    out = tmp_path / "out"
    out.mkdir()
    _torchrun([str(WORKER), str(fake_voc), str(out)], tmp_path)
    w0 = load_file(str(out / "rank0.safetensors"))
    w1 = load_file(str(out / "rank1.safetensors"))
    # Parameters through DDP's gradient all-reduce, buffers (BatchNorm statistics) through the
    # final broadcast: every tensor must agree exactly.
    assert w0.keys() == w1.keys()
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    model = models.create("small", 21, width=4, hidden=8)
    m0 = json.loads((out / "rank0.json").read_text())
    m1 = json.loads((out / "rank1.json").read_text())
    # Losses are all-reduced (averaged) across ranks: every rank logs the same numbers.
    assert m0["losses"] == m1["losses"] and len(m0["losses"]) == 2
    # Metrics are all-reduced too, and equal a single-process evaluation of the same weights.
    assert m0["metrics"] == m1["metrics"]
    model.load_state_dict(w0)
    single = evaluate(model, VOCSegmentation(fake_voc, "val"), num_classes=21, progress=False)
    assert single["confusion_matrix"] == m0["metrics"]["confusion_matrix"]
    assert single["miou"] == pytest.approx(m0["metrics"]["miou"])


def test_torchrun_deepcrf_train(tmp_path, fake_voc):
    run = tmp_path / "run"
    proc = _torchrun(["-m", "deepcrf", "train", "--data", str(fake_voc), "--out", str(run),
                      "--max-steps", "2", "--batch-size", "1", "--crop-size", "24",
                      "--set", "model.kwargs.width=4", "--set", "model.kwargs.hidden=8",
                      "--device", "cpu", "--json", "--quiet"], tmp_path)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout  # only rank 0 prints
    result = json.loads(lines[0])
    assert result["world_size"] == 2 and result["steps"] == 2
    assert (run / "model.safetensors").is_file() and (run / "state.safetensors").is_file()
