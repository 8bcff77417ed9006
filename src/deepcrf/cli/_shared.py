"""What several subcommands share: output flags, JSON output, number parsing."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

FORMATTER = argparse.RawDescriptionHelpFormatter


def emit(args: argparse.Namespace, obj: dict[str, Any], human: list[str]) -> None:
    """Print ``obj`` as one JSON object (``--json``) or the human-readable lines."""
    import os

    # RANK (set by torchrun) still tells the ranks apart after the process group is gone.
    if os.environ.get("RANK", "0") != "0":
        return
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(jsonable(obj), sort_keys=True) + "\n")
    else:
        sys.stdout.write("\n".join(human) + "\n")
    sys.stdout.flush()


def jsonable(obj: Any) -> Any:
    """NaN/inf → null so that the output is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


def fmt(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout and nothing else"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars (they go to stderr otherwise)"
    )


def add_inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--crf",
        choices=("none", "dense"),
        help="post-processing CRF on the network's output (default: the run's eval.crf, else none)",
    )
    p.add_argument(
        "--crf-params",
        metavar="JSON",
        help="dense CRF parameters: tune-crf's output or a JSON object "
        "(theta_alpha, theta_beta, theta_gamma, w_bilateral, w_spatial, iters)",
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


def floats(text: str) -> float | tuple[float, ...]:
    """One number, or comma-separated numbers (one per axis or channel)."""
    parts = [t for t in text.replace(" ", "").split(",") if t]
    try:
        values = tuple(float(t) for t in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or comma-separated numbers; got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}")
    return values[0] if len(values) == 1 else values
