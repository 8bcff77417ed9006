"""``deepcrf tune-crf``: DeepLab's grid search of the dense CRF's parameters."""

from __future__ import annotations

import argparse

from deepcrf.cli._shared import FORMATTER, add_output_flags, emit, fmt, jsonable


def add(sub: argparse._SubParsersAction) -> None:
    """Declare ``deepcrf tune-crf``."""
    from deepcrf.engine.config import DEEPLAB_GRID

    def grid_help(name: str) -> str:
        values = " ".join(f"{v:g}" for v in DEEPLAB_GRID[name])
        return f"values of {name} to search (default DeepLab v1's: {values})"

    p = sub.add_parser(
        "tune-crf",
        help="cross-validate dense-CRF parameters on held-out images (DeepLab's grid search)",
        formatter_class=FORMATTER,
        description=(
            "Grid-search the dense CRF's post-processing parameters by mIoU on a held-out "
            "split, coarse to fine, as DeepLab v1 (w_spatial = θγ = 3 fixed; w_bilateral, "
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
    for name in ("w_bilateral", "theta_alpha", "theta_beta", "w_spatial", "theta_gamma"):
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
    add_output_flags(p)
    p.set_defaults(func=run)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run ``deepcrf tune-crf``."""
    from deepcrf.engine.checkpoint import load_checkpoint, write_json
    from deepcrf.engine.runner import dataset_for, resolve_device
    from deepcrf.engine.tune import TUNABLE, tune_dense_crf

    device = resolve_device(args.device)
    model, config = load_checkpoint(args.checkpoint, device=device)
    run = dict(config.get("run") or {})
    data = dict(run.get("data") or {})
    data["root"] = str(args.data) if args.data is not None else data.get("root")
    data.setdefault("sbd_root", None)
    dataset = dataset_for({"data": data, "model": config["model"]}, args.split, None)
    grid = {name: getattr(args, name) for name in TUNABLE if getattr(args, name) is not None}
    num_classes = int(config["model"]["num_classes"])
    result = tune_dense_crf(
        model, dataset, num_classes=num_classes, grid=grid, iters=args.iters,
        rounds=args.rounds, use_crf=args.use_model_crf, max_images=args.max_images,
        device=device, progress=not args.quiet,
    )  # fmt: skip
    result = {"checkpoint": str(args.checkpoint), "split": args.split, **result}
    if args.out:
        write_json(args.out, jsonable(result))
    best = result["best"]
    human = [
        f"{len(result['trials'])} settings on {result['num_images']} images: best mIoU "
        f"{fmt(best['miou'])} (no CRF {fmt(result['baseline_miou'])})",
        "best: " + " ".join(f"{k}={v:g}" for k, v in best["params"].items()),
    ]
    if args.out:
        human.append(f"written to {args.out} (use with --crf-params)")
    emit(args, result, human)
    return 0
