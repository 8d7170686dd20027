"""The ``fxprune`` command line: ``profile``, ``compile`` and ``bench``.

Each subcommand lives in its own module with ``register(subparsers)`` (adds its parser and sets
``func``). Errors fxprune raises on purpose are printed as one clear message and exit with code 2;
nothing else is caught, so real bugs still show their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fxprune import progress
from fxprune.errors import FxpruneError

__all__ = ["main", "build_parser"]

_SUBCOMMANDS = ("profile", "compile", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxprune",
        description="Compile PyTorch models to a hard MAC budget, export to ONNX, measure latency.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars (they go to stderr, and only when it is a terminal)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _SUBCOMMANDS:
        importlib.import_module(f"fxprune.cli.{name}").register(sub)
    for child in sub.choices.values():  # --quiet also after the subcommand (fxprune compile X --quiet)
        child.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                           help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    before = progress._enabled  # --quiet holds for this call only (main() may run in-process)
    if args.quiet:
        progress.set_enabled(False)
    try:
        return int(args.func(args) or 0)
    except FxpruneError as err:
        print(f"fxprune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        progress.set_enabled(before)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
