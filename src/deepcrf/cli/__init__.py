"""The ``deepcrf`` command: one entry point with subcommands (``python -m deepcrf`` too).

Every subcommand is one module of this package with two functions: ``add(subparsers)``
declares its flags (each with help text) and sets ``func`` to ``run(args) -> int``, which does
the work. Modules import only the standard library at the top and the heavy parts (torch, the
models) inside ``run``, so ``deepcrf --help`` is instant.

Output: human-readable lines on stdout, or with ``--json`` exactly one JSON object on stdout and
nothing else (progress bars and messages go to stderr). Bad data or settings raise
``ValueError``/``FileNotFoundError``/``TypeError``/``MemoryError``, which :func:`main` turns into
exit status 2 and an ``error:`` line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from deepcrf.cli import benchmark, data, demo, evaluate, predict, refine, train, tune_crf

# In the order `deepcrf --help` lists them.
SUBCOMMANDS = (refine, data, train, evaluate, predict, tune_crf, benchmark, demo)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with one subparser per subcommand."""
    from deepcrf import __version__

    parser = argparse.ArgumentParser(
        prog="deepcrf",
        description="Deep structured models (CNN + CRF) for semantic segmentation.",
    )
    parser.add_argument("--version", action="version", version=f"deepcrf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in SUBCOMMANDS:
        command.add(sub)
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
    except (FileNotFoundError, ValueError, TypeError, MemoryError) as err:
        print(f"deepcrf {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        if "pip install" not in str(err):  # an optional extra that is not installed
            raise
        print(f"deepcrf {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"deepcrf {args.command}: {err or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
