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
# === end data ===

# === train ===
# === end train ===

# === evaluate ===
# === end evaluate ===

# === predict ===
# === end predict ===

# === tune-crf ===
# === end tune-crf ===

# === benchmark ===
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
