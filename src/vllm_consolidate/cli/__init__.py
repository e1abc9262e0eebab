"""Command-line interface: parses arguments, calls the library, prints. No logic of its own.

One module per command (:mod:`.convert`, :mod:`.validate`, :mod:`.batch`); what they share, the
exit-code table among it, is in :mod:`.common`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from vllm_consolidate import __version__
from vllm_consolidate.cli import batch as cli_batch
from vllm_consolidate.cli import inspect as cli_inspect
from vllm_consolidate.cli import validate as cli_validate
from vllm_consolidate.cli.common import EXIT_CODES, INTERNAL_ERROR, exit_code, run
from vllm_consolidate.cli.convert import convert_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-consolidate",
                                     description="Turn training checkpoints into folders vLLM loads.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    convert_parser(sub.add_parser("convert", help="consolidate one checkpoint or model"))
    cli_validate.add_parser(sub)
    cli_batch.add_parser(sub)
    cli_inspect.add_parser(sub)
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
    parser = convert_parser(argparse.ArgumentParser(
        prog="consolidate-for-vllm", description="Consolidate one checkpoint into a folder vLLM loads."))
    args = parser.parse_args(argv)
    return run(args.func, args)


__all__ = ["EXIT_CODES", "INTERNAL_ERROR", "build_parser", "console_convert", "console_main", "convert_main",
           "exit_code", "main"]
