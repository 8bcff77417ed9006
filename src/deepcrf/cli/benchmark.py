"""``deepcrf benchmark``: the dense CRF timed against pydensecrf."""

from __future__ import annotations

import argparse

from deepcrf.cli._shared import FORMATTER, add_output_flags, emit


def add(sub: argparse._SubParsersAction) -> None:
    """Declare ``deepcrf benchmark``."""
    p = sub.add_parser(
        "benchmark",
        help="time the dense CRF against pydensecrf on generated inputs",
        formatter_class=FORMATTER,
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
    p.add_argument("--num-classes", type=int, default=21, help="number of labels L (default 21)")
    p.add_argument("--iters", type=int, default=5, help="mean-field iterations (default 5)")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs per size, the best kept (default 3)"
    )
    p.add_argument(
        "--device", default="cpu", help="device for deepcrf (default cpu; pydensecrf runs on CPU)"
    )
    p.add_argument("--no-pydensecrf", action="store_true", help="skip pydensecrf")
    add_output_flags(p)
    p.set_defaults(func=run)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run ``deepcrf benchmark``."""
    from deepcrf.engine.benchmark import benchmark_dense_crf, parse_size
    from deepcrf.engine.runner import resolve_device

    sizes = [parse_size(s) for s in args.sizes]
    out = benchmark_dense_crf(
        sizes, num_classes=args.num_classes, iters=args.iters, repeats=args.repeats,
        device=resolve_device(args.device), use_pydensecrf=not args.no_pydensecrf,
        progress=not args.quiet,
    )  # fmt: skip
    human = [f"dense CRF, {args.num_classes} labels, {args.iters} iterations, best of "
             f"{args.repeats}, deepcrf on {out['device']}:"]  # fmt: skip
    for r in out["results"]:
        line = f"  {r['height']}x{r['width']}: deepcrf {r['deepcrf_s']:.3f} s"
        if r["pydensecrf_s"] is not None:
            line += (f", pydensecrf {r['pydensecrf_s']:.3f} s, ratio {r['ratio']:.2f}, "
                     f"labels agree {100 * r['agreement']:.1f}%")  # fmt: skip
        human.append(line)
    if not out["pydensecrf"]:
        human.append("  (pydensecrf not installed or skipped: no ratio)")
    emit(args, out, human)
    return 0
