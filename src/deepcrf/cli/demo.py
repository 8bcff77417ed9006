"""``deepcrf demo``: the main job on built-in data."""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    """Declare ``deepcrf demo``."""
    p = sub.add_parser(
        "demo",
        help="train a small CNN on built-in data, compare every CRF, write a report",
        description=(
            "Train the small stride-8 CNN from scratch on the built-in synthetic dataset, then "
            "evaluate on the same validation images the CNN alone, + dense CRF (DeepLab v1), "
            "CRF-as-RNN, + learned bandwidths, the Deep Gaussian CRF and the contextual CRF "
            "(those present in this installation). Prints a table and writes results.json, "
            "report.md, trimap.png and overlays/*.png to --out. No download, CPU is enough."
        ),
    )
    p.add_argument(
        "--quick", action="store_true",
        help="a short real run: fewer images and steps (about 40 s instead of 1-2 minutes)",
    )  # fmt: skip
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument(
        "--volume", action="store_true",
        help="instead: the dense CRF on built-in 3-D volumes (1 and 2 modalities, thick "
             "slices): voxel classifier vs CRF vs learned CRF by Dice and boundary accuracy, "
             "with slice pictures, written to OUT/volume (about 2 minutes; --quick: 15 s)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``deepcrf demo`` (or ``--volume``)."""
    from pathlib import Path

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; the demo writes a folder of results")
    if args.volume:
        from deepcrf.engine.volume_demo import run_volume_demo

        run_volume_demo(Path(args.out) / "volume", quick=args.quick)
        return 0
    from deepcrf.engine.demo import run_demo

    run_demo(args.out, quick=args.quick, progress=not args.no_progress)
    return 0
