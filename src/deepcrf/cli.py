"""The ``deepcrf`` command: one entry point with subcommands (``python -m deepcrf`` too).

Each subcommand is a pair of functions: ``_add_<name>(subparsers)`` declares its flags (every flag
has help text) and ``_run_<name>(args) -> int`` does the work, importing heavy modules lazily so
that ``deepcrf --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

_Adder = Callable[[argparse._SubParsersAction], None]
_REGISTRY: list[_Adder] = []


def _subcommand(adder: _Adder) -> _Adder:
    _REGISTRY.append(adder)
    return adder


# ---------------------------------------------------------------------------------------------
# Subcommands are added below this line, one section each (refine, data, train, evaluate,
# predict, tune-crf, benchmark, demo).
# ---------------------------------------------------------------------------------------------

# === refine ===
# === end refine ===

# === data ===
@_subcommand
def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="make datasets: `deepcrf data synth --out DIR` writes the built-in synthetic set",
        description="Dataset utilities.",
    )
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    s = data_sub.add_parser(
        "synth",
        help="write the built-in synthetic segmentation dataset in PASCAL VOC layout",
        description=(
            "Write the deterministic synthetic dataset (deepcrf.data.synthetic) as a VOC "
            "2012-style tree (JPEGImages/*.jpg, SegmentationClass/*.png, "
            "ImageSets/Segmentation/*.txt), so "
            "that train/evaluate/tune-crf can run on it with --data DIR."
        ),
    )
    s.add_argument("--out", required=True, help="output folder (must be new or empty)")
    s.add_argument("--n-train", type=int, default=512, help="images in the train split")
    s.add_argument("--n-val", type=int, default=128, help="images in the val split")
    s.add_argument(
        "--n-tune", type=int, default=64, help="images in the held-out tune split (0: none)"
    )
    s.add_argument(
        "--size", type=int, nargs="+", default=[96], metavar="PX",
        help="image size in pixels: one value (square) or H W",
    )  # fmt: skip
    s.add_argument("--seed", type=int, default=0, help="base seed (same seed, same images)")
    s.add_argument(
        "--num-classes", type=int, default=6, help="classes including background (2-8)"
    )
    s.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of the images")
    s.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    s.set_defaults(func=_run_data_synth)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _run_data_synth(args: argparse.Namespace) -> int:
    from deepcrf.data.synthetic import class_names, write_voc

    if len(args.size) not in (1, 2):
        raise ValueError(f"--size takes one value or two (H W); got {args.size}")
    size = (args.size[0], args.size[-1])
    try:
        out = write_voc(
            args.out,
            n_train=args.n_train,
            n_val=args.n_val,
            n_tune=args.n_tune,
            size=size,
            seed=args.seed,
            num_classes=args.num_classes,
            jpeg_quality=args.jpeg_quality,
            force=args.force,
        )
    except FileExistsError as err:
        raise ValueError(str(err)) from err
    total = args.n_train + args.n_val + args.n_tune
    names = ", ".join(class_names(args.num_classes))
    print(f"wrote {total} images of {size[0]}x{size[1]} px to {out} (classes: {names})")
    print(f"use it with: --data {out} --num-classes {args.num_classes}")
    return 0


# === end data ===

# === train ===
@_subcommand
def _add_train(sub: argparse._SubParsersAction) -> None:
    # Flags and action live in deepcrf.engine.commands (stdlib-only at import time).
    from deepcrf.engine.commands import add_train

    add_train(sub)


# === end train ===

# === evaluate ===
@_subcommand
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    # Flags and action live in deepcrf.engine.commands (stdlib-only at import time).
    from deepcrf.engine.commands import add_evaluate

    add_evaluate(sub)


# === end evaluate ===

# === predict ===
@_subcommand
def _add_predict(sub: argparse._SubParsersAction) -> None:
    # Flags and action live in deepcrf.engine.commands (stdlib-only at import time).
    from deepcrf.engine.commands import add_predict

    add_predict(sub)


# === end predict ===

# === tune-crf ===
@_subcommand
def _add_tune_crf(sub: argparse._SubParsersAction) -> None:
    # Flags and action live in deepcrf.engine.commands (stdlib-only at import time).
    from deepcrf.engine.commands import add_tune_crf

    add_tune_crf(sub)


# === end tune-crf ===

# === benchmark ===
@_subcommand
def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    # Flags and action live in deepcrf.engine.commands (stdlib-only at import time).
    from deepcrf.engine.commands import add_benchmark

    add_benchmark(sub)


# === end benchmark ===

# === demo ===
# === end demo ===


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with one subparser per subcommand."""
    from deepcrf import __version__

    parser = argparse.ArgumentParser(
        prog="deepcrf",
        description="Deep structured models (CNN + CRF) for semantic segmentation.",
    )
    parser.add_argument("--version", action="version", version=f"deepcrf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for adder in _REGISTRY:
        adder(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"deepcrf {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
