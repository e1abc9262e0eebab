"""Command-line interface: parses arguments, calls the library, prints. No logic of its own.

One module per command (:mod:`.convert`, :mod:`.validate`, :mod:`.batch`, :mod:`.inspect`); what they
share, the exit-code table among it, is in :mod:`.common`.

A command's module, and with it the library it calls, is imported only when that command runs or
prints its help: ``vllm-consolidate --help`` lists the commands from :data:`COMMANDS` alone, and
``inspect`` never imports the batch runner, numpy or torch (``tests/unit/test_startup.py``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from vllm_consolidate import __version__
from vllm_consolidate.cli.common import EXIT_CODES, INTERNAL_ERROR, exit_code, run

#: The subcommands, in the order ``--help`` lists them: name -> (module, the line ``--help`` shows).
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("vllm_consolidate.cli.convert", "consolidate one checkpoint or model"),
    "validate": ("vllm_consolidate.cli.validate", "check that a model folder is what vLLM will load correctly"),
    "batch": ("vllm_consolidate.cli.batch", "consolidate many checkpoints or runs"),
    "inspect": ("vllm_consolidate.cli.inspect",
                "show what a checkpoint holds and what convert would do, from metadata only"),
}


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser, filled in by its module the first time it parses or prints its usage."""

    _fill: Callable[[argparse.ArgumentParser], Any] | None = None

    def _filled(self) -> None:
        fill, self._fill = self._fill, None
        if fill is not None:
            fill(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._filled()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._filled()
        return super().format_usage()

    def format_help(self) -> str:
        self._filled()
        return super().format_help()


class _Into:
    """Stands in for the subparsers object when a module's ``add_parser(sub)`` fills a parser made earlier.

    Its ``sub.add_parser(name, help=..., description=...)`` hands back that parser with the module's
    description, epilog and formatter; the help line is :data:`COMMANDS`'.
    """

    SETTABLE = ("description", "epilog", "formatter_class")

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser

    def add_parser(self, name: str, help: str | None = None, **settings: Any) -> argparse.ArgumentParser:  # noqa: A002
        unknown = set(settings) - set(self.SETTABLE)
        if unknown:
            raise TypeError(f"the {name} parser cannot take {sorted(unknown)} once made")
        for key, value in settings.items():
            setattr(self.parser, key, value)
        return self.parser


def _filler(name: str) -> Callable[[argparse.ArgumentParser], Any]:
    def fill(parser: argparse.ArgumentParser) -> Any:
        module = importlib.import_module(COMMANDS[name][0])
        if name == "convert":
            return module.convert_parser(parser)
        return module.add_parser(_Into(parser))

    return fill


class _Version(argparse.Action):
    """``--version``: the version, and whether casts run in the C extension, since a build without a C compiler
    falls back to numpy silently (bf16 output then costs about 4x the CPU; casts.py)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from vllm_consolidate import casts

        kernel = casts.kernel()
        if kernel is None:
            how = "numpy (the C extension vllm_consolidate._castkernel was not built: reinstall with a C compiler)"
        else:
            how = "C extension" + (", float16 with F16C" if kernel.float16_hardware() else "")
        sys.stdout.write(f"{parser.prog} {__version__}\ncasts: {how}\n")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-consolidate",
                                     description="Turn training checkpoints into folders vLLM loads.")
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print the version and how casts run (the C extension or numpy), and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    for name, (_module, help_line) in COMMANDS.items():
        sub.add_parser(name, help=help_line)._fill = _filler(name)
    return parser


def _exit_now(code: int) -> None:
    """Exit without tearing down the interpreter: collecting torch's objects at exit costs ~1 s.

    Only for the console scripts, after every file is written, fsynced and closed.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def console_main() -> None:
    """Console script ``vllm-consolidate``."""
    code = main()
    if len(sys.argv) > 1 and sys.argv[1] == "batch":
        sys.exit(code)  # the batch's worker processes are reaped by a normal exit
    _exit_now(code)


def console_convert() -> None:
    """Console script ``consolidate-for-vllm``."""
    _exit_now(convert_main())


def main(argv: Sequence[str] | None = None) -> int:
    """``vllm-consolidate`` with subcommands."""
    args = build_parser().parse_args(argv)
    return run(args.func, args)


def convert_main(argv: Sequence[str] | None = None) -> int:
    """``consolidate-for-vllm``: the guide's single-model script."""
    from vllm_consolidate.cli.convert import convert_parser

    parser = convert_parser(argparse.ArgumentParser(
        prog="consolidate-for-vllm", description="Consolidate one checkpoint into a folder vLLM loads."))
    args = parser.parse_args(argv)
    return run(args.func, args)


__all__ = ["COMMANDS", "EXIT_CODES", "INTERNAL_ERROR", "build_parser", "console_convert", "console_main",
           "convert_main", "exit_code", "main"]
