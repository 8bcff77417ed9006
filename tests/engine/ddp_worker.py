"""Run under torchrun by test_distributed.py: fit + evaluate on 2 CPU processes (gloo).

Usage: python -m torch.distributed.run --standalone --nproc-per-node 2 ddp_worker.py VOC OUT
Each rank writes OUT/rank<r>.safetensors (its final weights) and OUT/rank<r>.json (its metrics).
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from deepcrf import models
from deepcrf.data.transforms import train_transform
from deepcrf.data.voc import VOCSegmentation
from deepcrf.engine import TrainSettings, evaluate, fit
from deepcrf.engine.distributed import init_from_env, rank_and_world, shutdown


def main(voc: str, out: str) -> None:
    device = init_from_env("cpu")
    rank, world = rank_and_world()
    assert world == 2, world
    train = VOCSegmentation(voc, "train", transform=train_transform(24))
    val = VOCSegmentation(voc, "val")
    # Different initial weights per rank: DDP must broadcast rank 0's.
    torch.manual_seed(100 + rank)
    model = models.create("small", 21, width=4, hidden=8)
    result = fit(model, train, TrainSettings(steps=2, batch_size=1), device=device, progress=False)
    metrics = evaluate(model, val, num_classes=21, device=device, progress=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(Path(out) / f"rank{rank}.safetensors"))
    metrics.pop("seconds_per_image")
    (Path(out) / f"rank{rank}.json").write_text(
        json.dumps({"losses": result["losses"], "metrics": metrics})
    )
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
