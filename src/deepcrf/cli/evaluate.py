"""``deepcrf evaluate``: VOC metrics of a checkpoint on a split."""

from __future__ import annotations

import argparse

from deepcrf.cli._shared import FORMATTER, add_inference_flags, add_output_flags, emit, fmt


def add(sub: argparse._SubParsersAction) -> None:
    """Declare ``deepcrf evaluate``."""
    p = sub.add_parser(
        "evaluate",
        help="mIoU, pixel accuracy, per-class IoU and trimap accuracy of a checkpoint",
        formatter_class=FORMATTER,
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
    add_inference_flags(p)
    add_output_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``deepcrf evaluate``."""
    from deepcrf.engine.distributed import shutdown
    from deepcrf.engine.runner import evaluate_checkpoint, read_crf_params

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
        f"{out['crf']}): mIoU {fmt(out['miou'])}  pixel accuracy {fmt(out['pixel_accuracy'])}"
        f"  mean accuracy {fmt(out['mean_accuracy'])}",
        "per-class IoU:",
        *(f"  {name:<14} {fmt(v)}" for name, v in out["per_class_iou"].items()),
    ]
    if out["trimap_accuracy"]:
        bands = "  ".join(f"{b}px {fmt(v, 3)}" for b, v in out["trimap_accuracy"].items())
        human.append(f"trimap accuracy: {bands}")
    human.append(f"{out['seconds_per_image']:.3f} s/image")
    emit(args, out, human)
    return 0
