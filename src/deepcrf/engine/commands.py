"""Flags and actions of ``deepcrf train | evaluate | predict | tune-crf | benchmark``.

``cli.py`` registers these (``add_<name>(subparsers)`` declares the flags, each flag with help
text; the ``func`` it sets runs the command). Only the standard library is imported at module
level, so ``deepcrf --help`` does not import torch.

Output: human-readable lines on stdout, or with ``--json`` exactly one JSON object on stdout and
nothing else (progress bars and messages go to stderr). Bad data or settings raise
``ValueError``/``FileNotFoundError``, which ``deepcrf.cli.main`` turns into exit status 2 and an
``error:`` line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

_FORMATTER = argparse.RawDescriptionHelpFormatter


def _emit(args: argparse.Namespace, obj: dict[str, Any], human: list[str]) -> None:
    """Print ``obj`` as one JSON object (``--json``) or the human-readable lines."""
    import os

    # RANK (set by torchrun) still tells the ranks apart after the process group is gone.
    if os.environ.get("RANK", "0") != "0":
        return
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(_jsonable(obj), sort_keys=True) + "\n")
    else:
        sys.stdout.write("\n".join(human) + "\n")
    sys.stdout.flush()


def _jsonable(obj: Any) -> Any:
    """NaN/inf → null so that the output is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def _fmt(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout and nothing else"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars (they go to stderr otherwise)"
    )


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

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
    "checkpoint_every": "train.checkpoint_every",
    "checkpoint_minutes": "train.checkpoint_minutes",
    "val_every": "train.val_every",
    "init": "train.init",
}


def add_train(sub: argparse._SubParsersAction) -> None:
    """Declare ``deepcrf train``."""
    p = sub.add_parser(
        "train",
        help="train a model on a VOC-layout dataset",
        formatter_class=_FORMATTER,
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
    _common(p)
    p.set_defaults(func=run_train)  # fmt: skip


def build_train_config(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults ← --config file (or the run's saved config with --resume) ← --set ← flags."""
    from . import config as cfg
    from .checkpoint import CONFIG_FILE

    if args.resume:
        if args.config:
            raise ValueError("--resume takes its settings from --out's config.json; drop --config")
        saved = Path(args.out) / CONFIG_FILE
        if not saved.is_file():
            raise FileNotFoundError(f"cannot resume: {saved} does not exist")
        run = json.loads(saved.read_text()).get("run")
        if not isinstance(run, dict):
            raise ValueError(f"cannot resume: {saved} holds no run config")
        config = cfg.merge(cfg.defaults(), run, str(saved))
    else:
        config = cfg.load(args.config)
    for assignment in args.set:
        config = cfg.apply_set(config, assignment)
    flags = {key: getattr(args, dest) for dest, key in _TRAIN_FLAGS.items()}
    if flags["data.root"] is not None:
        flags["data.root"] = str(Path(flags["data.root"]).expanduser().resolve())
    return cfg.apply_flags(config, flags)


def run_train(args: argparse.Namespace) -> int:
    """Run ``deepcrf train``."""
    from .distributed import shutdown
    from .runner import train_run

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
        f"final loss {_fmt(result['final_loss'])}",
        f"checkpoint: {result['run_dir']}",
    ]
    if result["best_miou"] is not None:
        human.append(f"best val mIoU {_fmt(result['best_miou'])} (checkpoint {args.out}/best)")
    _emit(args, result, human)
    return 0


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


def _add_inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--crf",
        choices=("none", "dense"),
        help="post-processing CRF on the network's output (default: the run's eval.crf, else none)",
    )
    p.add_argument(
        "--crf-params",
        metavar="JSON",
        help="dense CRF parameters: tune-crf's output or a JSON object "
        "(theta_alpha, theta_beta, theta_gamma, w_bilateral, w_gaussian, iters)",
    )
    p.add_argument(
        "--no-model-crf",
        action="store_true",
        help="bypass the model's own CRF layer (CNN+CRF models)",
    )
    p.add_argument(
        "--scales", type=float, nargs="+", help="test-time scales, softmax averaged (default 1.0)"
    )
    p.add_argument(
        "--flip", action="store_true", default=None, help="also average over the mirrored image"
    )
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")  # fmt: skip


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    """Declare ``deepcrf evaluate``."""
    p = sub.add_parser(
        "evaluate",
        help="mIoU, pixel accuracy, per-class IoU and trimap accuracy of a checkpoint",
        formatter_class=_FORMATTER,
        description=(
            "Evaluate a checkpoint (RUN or RUN/best) on a VOC-layout split with the VOC "
            "protocol (confusion matrix over all pixels, 255 ignored), optionally multi-scale, "
            "flipped and with dense-CRF post-processing."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="run directory or RUN/best")
    p.add_argument("--data", help="VOC-layout folder (default: the one the run trained on)")
    p.add_argument("--split", help="split to evaluate (default val)")
    p.add_argument("--max-images", type=int, help="evaluate only the first N images")
    p.add_argument("--trimap-bands", type=int, nargs="+",
                   help="trimap band half-widths in pixels (default 1 2 4 8 16 32)")  # fmt: skip
    _add_inference_flags(p)
    _common(p)
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    """Run ``deepcrf evaluate``."""
    from .distributed import shutdown
    from .runner import evaluate_checkpoint, read_crf_params

    flags = {
        "eval.split": args.split,
        "eval.crf": args.crf,
        "eval.scales": args.scales,
        "eval.flip": args.flip,
        "eval.max_images": args.max_images,
        "eval.trimap_bands": args.trimap_bands,
        "eval.use_crf": False if args.no_model_crf else None,
    }
    params = read_crf_params(args.crf_params) if args.crf_params else None
    if params is not None and args.crf is None:
        flags["eval.crf"] = "dense"
    try:
        out = evaluate_checkpoint(
            args.checkpoint, args.data, flags, crf_params=params, device=args.device,
            progress=not args.quiet,
        )  # fmt: skip
    finally:
        shutdown()
    human = [
        f"{out['checkpoint']} on {out['split']} ({out['num_images']} images, crf "
        f"{out['crf']}): mIoU {_fmt(out['miou'])}  pixel accuracy {_fmt(out['pixel_accuracy'])}"
        f"  mean accuracy {_fmt(out['mean_accuracy'])}",
        "per-class IoU:",
        *(f"  {name:<14} {_fmt(v)}" for name, v in out["per_class_iou"].items()),
    ]
    if out["trimap_accuracy"]:
        bands = "  ".join(f"{b}px {_fmt(v, 3)}" for b, v in out["trimap_accuracy"].items())
        human.append(f"trimap accuracy: {bands}")
    human.append(f"{out['seconds_per_image']:.3f} s/image")
    _emit(args, out, human)
    return 0


# ---------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------


def add_predict(sub: argparse._SubParsersAction) -> None:
    """Declare ``deepcrf predict``."""
    p = sub.add_parser(
        "predict",
        help="segment an image or a folder of images, writing VOC palette PNGs",
        formatter_class=_FORMATTER,
        description=(
            "Segment INPUT (an image, or every image directly in a folder) with a checkpoint "
            "and write OUT/<name>.png label maps in the VOC palette (atomic writes)."
        ),
    )
    p.add_argument("input", help="image file or folder of images")
    p.add_argument("--checkpoint", required=True, help="run directory or RUN/best")
    p.add_argument("--out", "-o", required=True, help="output folder for the label PNGs")
    p.add_argument(
        "--overwrite", action="store_true", help="replace label PNGs that exist already in --out"
    )
    _add_inference_flags(p)
    _common(p)
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    """Run ``deepcrf predict``."""
    from .checkpoint import load_checkpoint
    from .runner import (
        crf_params_for,
        dense_postprocess,
        eval_settings,
        list_images,
        predict_files,
        read_crf_params,
        resolve_device,
    )

    inputs = list_images(args.input)
    device = resolve_device(args.device)
    model, config = load_checkpoint(args.checkpoint, device=device)
    params = read_crf_params(args.crf_params) if args.crf_params else None
    crf = args.crf or ("dense" if params is not None else None)
    settings = eval_settings(config, {"eval.crf": crf, "eval.scales": args.scales,
                                      "eval.flip": args.flip})  # fmt: skip
    postprocess = None
    used: dict[str, Any] = {}
    if settings["crf"] == "dense":
        used = crf_params_for(config, {**settings["crf_params"], **(params or {})})
        postprocess = dense_postprocess(used)
    written = predict_files(
        model, inputs, args.out, use_crf=not args.no_model_crf, postprocess=postprocess,
        overwrite=args.overwrite,
        scales=[float(s) for s in settings["scales"]], flip=settings["flip"], device=device,
        progress=not args.quiet,
    )  # fmt: skip
    out = {"checkpoint": str(args.checkpoint), "crf": settings["crf"], "crf_params": used,
           "outputs": written}  # fmt: skip
    human = [f"{w['input']} -> {w['output']} (labels {w['labels']})" for w in written]
    _emit(args, out, human)
    return 0


# ---------------------------------------------------------------------------------------------
# tune-crf
# ---------------------------------------------------------------------------------------------


def add_tune_crf(sub: argparse._SubParsersAction) -> None:
    """Declare ``deepcrf tune-crf``."""
    from .config import DEEPLAB_GRID

    def grid_help(name: str) -> str:
        values = " ".join(f"{v:g}" for v in DEEPLAB_GRID[name])
        return f"values of {name} to search (default DeepLab v1's: {values})"

    p = sub.add_parser(
        "tune-crf",
        help="cross-validate dense-CRF parameters on held-out images (DeepLab's grid search)",
        formatter_class=_FORMATTER,
        description=(
            "Grid-search the dense CRF's post-processing parameters by mIoU on a held-out "
            "split, coarse to fine, as DeepLab v1 (w_gaussian = θγ = 3 fixed; w_bilateral, "
            "θα, θβ searched). Prints the best parameters; --out writes them as JSON for "
            "evaluate/predict --crf-params."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="run directory or RUN/best")
    p.add_argument("--data", help="VOC-layout folder (default: the one the run trained on)")
    p.add_argument("--split", default="val", help="held-out split (default val)")
    p.add_argument(
        "--max-images",
        type=int,
        default=100,
        help="use the first N images of the split (default 100, as DeepLab)",
    )
    for name in ("w_bilateral", "theta_alpha", "theta_beta", "w_gaussian", "theta_gamma"):
        p.add_argument(
            f"--{name.replace('_', '-')}", type=float, nargs="+", dest=name, help=grid_help(name)
        )
    p.add_argument(
        "--iters", type=int, default=10, help="mean-field iterations per trial (default 10)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="1 = the grid only; each further round halves the steps around the best (default 2)",
    )
    p.add_argument(
        "--use-model-crf",
        action="store_true",
        help="run the model's own CRF before the tuned one (CNN+CRF models)",
    )
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--out", "-o", help="write the result (best parameters and all trials) here")
    _common(p)
    p.set_defaults(func=run_tune_crf)  # fmt: skip


def run_tune_crf(args: argparse.Namespace) -> int:
    """Run ``deepcrf tune-crf``."""
    from .checkpoint import load_checkpoint, write_json
    from .runner import _dataset, resolve_device
    from .tune import TUNABLE, tune_dense_crf

    device = resolve_device(args.device)
    model, config = load_checkpoint(args.checkpoint, device=device)
    run = dict(config.get("run") or {})
    data = dict(run.get("data") or {})
    data["root"] = str(args.data) if args.data is not None else data.get("root")
    data.setdefault("sbd_root", None)
    dataset = _dataset({"data": data, "model": config["model"]}, args.split, None)
    grid = {name: getattr(args, name) for name in TUNABLE if getattr(args, name) is not None}
    num_classes = int(config["model"]["num_classes"])
    result = tune_dense_crf(
        model, dataset, num_classes=num_classes, grid=grid, iters=args.iters,
        rounds=args.rounds, use_crf=args.use_model_crf, max_images=args.max_images,
        device=device, progress=not args.quiet,
    )  # fmt: skip
    result = {"checkpoint": str(args.checkpoint), "split": args.split, **result}
    if args.out:
        write_json(args.out, _jsonable(result))
    best = result["best"]
    human = [
        f"{len(result['trials'])} settings on {result['num_images']} images: best mIoU "
        f"{_fmt(best['miou'])} (no CRF {_fmt(result['baseline_miou'])})",
        "best: " + " ".join(f"{k}={v:g}" for k, v in best["params"].items()),
    ]
    if args.out:
        human.append(f"written to {args.out} (use with --crf-params)")
    _emit(args, result, human)
    return 0


# ---------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------


def add_benchmark(sub: argparse._SubParsersAction) -> None:
    """Declare ``deepcrf benchmark``."""
    p = sub.add_parser(
        "benchmark",
        help="time the dense CRF against pydensecrf on generated inputs",
        formatter_class=_FORMATTER,
        description=(
            "Time deepcrf.dense_crf (and pydensecrf when it is installed) on generated images "
            "of the given sizes; prints seconds, the ratio deepcrf/pydensecrf and the fraction "
            "of pixels whose labels agree. Timings depend on the machine and its load."
        ),
    )
    p.add_argument(
        "--sizes",
        nargs="+",
        default=["120x160", "240x320", "375x500"],
        help="image sizes as HEIGHTxWIDTH in pixels (default 120x160 240x320 375x500)",
    )
    p.add_argument("--labels", type=int, default=21, help="number of labels (default 21)")
    p.add_argument("--iters", type=int, default=5, help="mean-field iterations (default 5)")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs per size, the best kept (default 3)"
    )
    p.add_argument(
        "--device", default="cpu", help="device for deepcrf (default cpu; pydensecrf runs on CPU)"
    )
    p.add_argument("--no-pydensecrf", action="store_true", help="skip pydensecrf")
    _common(p)
    p.set_defaults(func=run_benchmark)  # fmt: skip


def run_benchmark(args: argparse.Namespace) -> int:
    """Run ``deepcrf benchmark``."""
    from .benchmark import benchmark_dense_crf, parse_size
    from .runner import resolve_device

    sizes = [parse_size(s) for s in args.sizes]
    out = benchmark_dense_crf(
        sizes, num_labels=args.labels, iters=args.iters, repeats=args.repeats,
        device=resolve_device(args.device), use_pydensecrf=not args.no_pydensecrf,
        progress=not args.quiet,
    )  # fmt: skip
    human = [f"dense CRF, {args.labels} labels, {args.iters} iterations, best of "
             f"{args.repeats}, deepcrf on {out['device']}:"]  # fmt: skip
    for r in out["results"]:
        line = f"  {r['height']}x{r['width']}: deepcrf {r['deepcrf_s']:.3f} s"
        if r["pydensecrf_s"] is not None:
            line += (f", pydensecrf {r['pydensecrf_s']:.3f} s, ratio {r['ratio']:.2f}, "
                     f"labels agree {100 * r['agreement']:.1f}%")  # fmt: skip
        human.append(line)
    if not out["pydensecrf"]:
        human.append("  (pydensecrf not installed or skipped: no ratio)")
    _emit(args, out, human)
    return 0
