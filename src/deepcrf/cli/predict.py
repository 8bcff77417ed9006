"""``deepcrf predict``: label PNGs for an image or a folder of images."""

from __future__ import annotations

import argparse
from typing import Any

from deepcrf.cli._shared import FORMATTER, add_inference_flags, add_output_flags, emit


def add(sub: argparse._SubParsersAction) -> None:
    """Declare ``deepcrf predict``."""
    p = sub.add_parser(
        "predict",
        help="segment an image or a folder of images, writing VOC palette PNGs",
        formatter_class=FORMATTER,
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
    add_inference_flags(p)
    add_output_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``deepcrf predict``."""
    from deepcrf.engine.checkpoint import load_checkpoint
    from deepcrf.engine.runner import (
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
    emit(args, out, human)
    return 0
