"""The ``shift-edit`` console script: subcommands are thin layers over library functions.

Each subcommand is a module with ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; :data:`COMMANDS` is the only list of them. Bad input
(:class:`~shift_edit.core.errors.ShiftEditError` or an argument error) prints one line on
stderr and exits with code 2; so do OS errors (a disk full, a permission denied). Any other
exception is a bug: one line and exit code 1. ``--debug`` shows the traceback instead. ``edit``
exits with 3 when the edit was made but the target is not the strict top-1 (its ``EPILOG`` says so
in ``--help``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..core.errors import ShiftEditError
from . import apply_patch, bench, data, edit, export, export_lora, lens, lens_stats, models, stats, summarize, sweep

#: optional dependency -> the extra (pyproject.toml) that installs it
EXTRAS = {"matplotlib": "plot", "datasets": "hub", "accelerate": "hub", "peft": "peft"}

COMMANDS = (edit, apply_patch, export_lora, models, bench, summarize, export, sweep, stats, lens, lens_stats, data)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shift-edit", description="Edit facts in language models with the forward pass shift.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.NAME, help=cmd.HELP, description=cmd.HELP, epilog=getattr(cmd, "EPILOG", None))
        cmd.add_arguments(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error instead of one line")
        p.set_defaults(func=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # commands that re-launch themselves (bench --procs) need the exact command line
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("shift-edit: interrupted", file=sys.stderr)
        return 130
    except (ShiftEditError, OSError) as exc:
        if args.debug:
            raise
        print(f"shift-edit: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: still one line unless --debug  # noqa: BLE001
        if args.debug:
            raise
        extra = EXTRAS.get((exc.name or "").split(".")[0]) if isinstance(exc, ModuleNotFoundError) else None
        if extra is not None:  # an optional dependency (an extra of pyproject.toml) is not installed: bad setup
            print(f"shift-edit: error: this needs {exc.name.split('.')[0]}, which is not installed: "
                  f"pip install 'shift_edit[{extra}]'", file=sys.stderr)
            return 2
        print(f"shift-edit: internal error (a bug, please report it; --debug shows the traceback): "
              f"{type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
