"""``deepcrf train``: flags, the run config they build, and the action."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from deepcrf.cli._shared import FORMATTER, add_output_flags, emit, fmt

# CLI flag (argparse dest) -> config key it overrides.
_TRAIN_FLAGS = {
    "data": "data.root",
    "model": "model.name",
    "num_classes": "model.num_classes",
    "crf": "model.crf",
    "pretrained": "model.pretrained",
    "split": "data.train_split",
    "val_split": "data.val_split",
    "crop_size": "data.crop_size",
    "num_workers": "data.num_workers",
    "stage": "train.stage",
    "max_steps": "train.steps",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "crf_lr": "train.crf_lr",
    "head_lr": "train.head_lr",
    "optimizer": "train.optimizer",
    "seed": "train.seed",
    "device": "train.device",
    "amp": "train.amp",
    "freeze_backbone": "train.freeze_backbone",
    "freeze": "train.freeze",
    "checkpoint_every": "train.checkpoint_every",
    "checkpoint_minutes": "train.checkpoint_minutes",
    "val_every": "train.val_every",
    "init": "train.init",
}


def add(sub: argparse._SubParsersAction) -> None:
    """Declare ``deepcrf train``."""
    p = sub.add_parser(
        "train",
        help="train a model on a VOC-layout dataset",
        formatter_class=FORMATTER,
        description=(
            "Train a segmentation model (stage 'unary': CNN alone; 'joint': CNN + CRF; "
            "'piecewise': Lin et al.'s piecewise loss) on any VOC-layout folder, writing "
            "RUN/model.safetensors + RUN/config.json (+ resume state, and RUN/best with "
            "--val-split). Settings come from --config (TOML, see configs/), then --set, then "
            "the flags below. Multi-GPU / multi-process: torchrun --nproc-per-node N -m "
            "deepcrf train ..."
        ),
    )
    p.add_argument("--config", help="TOML run config (e.g. configs/voc_deeplab_largefov.toml)")
    p.add_argument("--data", help="VOC-layout folder (VOC2012, VOCdevkit or their parent)")
    p.add_argument("--out", required=True, help="run directory to write checkpoints into")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (same settings)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --out (deletes its checkpoints and best/ first); without it "
        "an existing run is never overwritten",
    )
    p.add_argument(
        "--skip-data-check",
        action="store_true",
        help="do not check every dataset file before the first step",
    )
    p.add_argument("--model", help="registered model name (config model.name; default small)")
    p.add_argument("--num-classes", type=int, help="number of classes (default 21)")
    p.add_argument(
        "--crf",
        help="CRF on top of the model: dense, dense-learnable, dense-bandwidths (config model.crf)",
    )
    p.add_argument("--pretrained", help="local ImageNet weights file for VGG-based models")
    p.add_argument("--split", help="training split in ImageSets/Segmentation (default train)")
    p.add_argument("--val-split", help="validation split; keeps RUN/best by mIoU (default none)")
    p.add_argument("--crop-size", type=int, help="training crop size in pixels (default 128)")
    p.add_argument("--num-workers", type=int, help="DataLoader worker processes (default 0)")
    p.add_argument(
        "--stage", choices=("unary", "joint", "piecewise"), help="training stage (default unary)"
    )
    p.add_argument(
        "--max-steps",
        "--steps",
        dest="max_steps",
        type=int,
        help="number of optimiser steps (default 1000)",
    )
    p.add_argument("--batch-size", type=int, help="images per step and process (default 8)")
    p.add_argument("--lr", type=float, help="base learning rate (default 0.003)")
    p.add_argument("--crf-lr", type=float, help="learning rate of crf.* parameters")
    p.add_argument("--head-lr", type=float, help="learning rate of the classifier head")
    p.add_argument(
        "--optimizer",
        choices=("sgd", "adam"),
        help="optimiser (default adam, no weight decay: what trains the default small model; "
        "the paper configs set sgd)",
    )
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument(
        "--amp",
        action="store_true",
        default=None,
        help="mixed precision (float16 + GradScaler on CUDA)",
    )
    p.add_argument(
        "--freeze-backbone",
        action="store_true",
        default=None,
        help="keep backbone.* fixed (joint / piecewise stages)",
    )
    p.add_argument(
        "--freeze",
        action="append",
        metavar="PREFIX",
        help="keep parameters whose names start with PREFIX fixed, with their BatchNorm "
        "statistics (repeatable; e.g. --freeze crf.unary_net.)",
    )
    p.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps")
    p.add_argument(
        "--checkpoint-minutes",
        type=float,
        help="also checkpoint every M minutes of training (default 10; Ctrl-C / SIGTERM "
        "checkpoint too)",
    )
    p.add_argument("--val-every", type=int, help="validate every N steps (and at the end)")
    p.add_argument("--init", help="initialise weights from this run (e.g. stage 1 for stage 2)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="override any config key, e.g. --set train.momentum=0.99 (repeatable)",
    )
    add_output_flags(p)
    p.set_defaults(func=run)  # fmt: skip


def build_train_config(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults ← --config file (or the run's saved config with --resume) ← --set ← flags."""
    from deepcrf.engine import config as cfg
    from deepcrf.engine.checkpoint import CONFIG_FILE

    if args.resume:
        if args.config:
            raise ValueError("--resume takes its settings from --out's config.json; drop --config")
        from deepcrf.engine.runner import saved_run_config

        saved = Path(args.out) / CONFIG_FILE
        if not saved.is_file():
            raise FileNotFoundError(f"cannot resume: {saved} does not exist")
        config = cfg.merge(cfg.defaults(), saved_run_config(args.out), str(saved))
    else:
        config = cfg.load(args.config)
    for assignment in args.set:
        config = cfg.apply_set(config, assignment)
    flags = {key: getattr(args, dest) for dest, key in _TRAIN_FLAGS.items()}
    if flags["data.root"] is not None:
        flags["data.root"] = str(Path(flags["data.root"]).expanduser().resolve())
    return cfg.apply_flags(config, flags)


def run(args: argparse.Namespace) -> int:
    """Run ``deepcrf train``."""
    from deepcrf.engine.distributed import shutdown
    from deepcrf.engine.runner import train_run

    config = build_train_config(args)
    try:
        result = train_run(
            config,
            args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            check_data=not args.skip_data_check,
            progress=not args.quiet,
        )
    except FloatingPointError as err:
        print(f"deepcrf train: error: {err}", file=sys.stderr)
        return 1
    finally:
        shutdown()
    human = [
        f"trained {config['model']['name']} ({config['train']['stage']}) for steps "
        f"{result['start_step']}..{result['steps']} on {result['device']} "
        f"x{result['world_size']} in {result['seconds']:.1f} s",
        f"final loss {fmt(result['final_loss'])}",
        f"checkpoint: {result['run_dir']}",
    ]
    if result["best_miou"] is not None:
        human.append(f"best val mIoU {fmt(result['best_miou'])} (checkpoint {args.out}/best)")
    emit(args, result, human)
    return 0
