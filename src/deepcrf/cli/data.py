"""``deepcrf data synth``: write the built-in synthetic set as a VOC tree."""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    """Declare ``deepcrf data`` and its action ``synth``."""
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
    s.add_argument("--num-classes", type=int, default=6, help="classes including background (2-8)")
    s.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of the images")
    s.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    s.set_defaults(func=run_synth)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_synth(args: argparse.Namespace) -> int:
    """Run ``deepcrf data synth``."""
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
