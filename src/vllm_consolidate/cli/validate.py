"""The ``validate`` subcommand: run :func:`vllm_consolidate.validate.validate_folder` and print the report.

``vllm-consolidate validate DIR`` prints one line per check (PASS / WARN / FAIL) and exits non-zero
when any check failed (a :class:`~vllm_consolidate.errors.ValidationFailedError`; the code comes from
``cli.common.EXIT_CODES``). ``--json`` prints the report as one JSON document instead; ``--load`` adds the
real-vLLM load tier.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from vllm_consolidate.errors import ConsolidateError, ValidationFailedError

_LABELS = {"pass": "PASS", "warn": "WARN", "fail": "FAIL"}

#: Environment variable naming the interpreter with vLLM that ``--load`` uses by default.
VLLM_PYTHON_ENV = "VLLM_CONSOLIDATE_VLLM_PYTHON"
#: The venv scripts/setup_vllm_venv.sh makes, relative to the current directory.
_VLLM_VENV_PYTHON = Path(".venv-vllm", "bin", "python")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``validate`` on the CLI's subparsers.

    Args:
        sub: The object returned by ``ArgumentParser.add_subparsers``.

    Returns:
        The new subparser.
    """
    p = sub.add_parser(
        "validate",
        help="check that a model folder is what vLLM will load correctly",
        description="Static checks of a model folder (files, index, config, weights against the architecture, "
                    "NaN/Inf, tokenizer); --against compares every tensor with the source checkpoint; --load also "
                    "loads it with real vLLM and compares greedy tokens with "
                    "transformers.",
    )
    from vllm_consolidate.cli.common import add_storage_options, path_or_url

    p.add_argument("dir", type=path_or_url, help="the model folder (local, or s3://bucket/prefix, gs://…, az://…)")
    p.add_argument("--load", action="store_true",
                   help="also load the folder with real vLLM and compare its greedy tokens with transformers'")
    p.add_argument("--vllm-python", default=None, metavar="PATH",
                   help=f"python of a venv with vLLM for --load (default: ${VLLM_PYTHON_ENV} if set, else "
                        f"./{_VLLM_VENV_PYTHON} in the current directory if it exists, else this interpreter)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens generated per prompt with --load (default: 8)")
    p.add_argument("--against", type=path_or_url, default=None, metavar="SOURCE",
                   help="the checkpoint the folder was made from (anything convert --input accepts): compare "
                        "every tensor with it, element for element; catches wrong bytes that no check of the "
                        "folder alone can see, such as a square weight stored transposed")
    from vllm_consolidate.read.detect import INPUT_TYPES

    p.add_argument("--against-type", choices=INPUT_TYPES, default="auto",
                   help="input type of --against, as convert --type (default: auto)")
    p.add_argument("--model-key", default=None, metavar="NAME",
                   help="DCP --against: the state-dict entry that holds the model, as convert --model-key")
    p.add_argument("--base-model-name", default=None, metavar="FOLDER_OR_ID",
                   help="LoRA --against: the base model the adapter was merged into, as convert --base-model-name")
    p.add_argument("--no-value-scan", dest="scan_values", action="store_false",
                   help="skip the NaN/Inf scan (it reads every weight byte once)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks (also of checks that crashed)")
    add_storage_options(p)
    p.set_defaults(func=cmd_validate)
    return p


def _default_vllm_python() -> str | None:
    """The interpreter ``--load`` uses when ``--vllm-python`` is not given.

    ``$VLLM_CONSOLIDATE_VLLM_PYTHON`` if set (even to a path that does not exist: the load tier then
    says so, rather than quietly using another interpreter), else ``.venv-vllm/bin/python`` in the
    current directory if it exists (where scripts/setup_vllm_venv.sh puts it when run from a
    checkout), else None, which lets the load tier use this interpreter when it can import vLLM.
    Nothing is looked up next to the installed package: an installed wheel has no venv beside it.
    """
    explicit = os.environ.get(VLLM_PYTHON_ENV)
    if explicit:
        return explicit
    local = Path.cwd() / _VLLM_VENV_PYTHON
    return str(local) if local.is_file() else None


def print_report(report: Any, debug: bool = False) -> None:
    """Human form of a :class:`~vllm_consolidate.validate.ValidationReport` on stdout (an object-store folder
    and source by their URLs)."""
    from vllm_consolidate.storage.remote import public

    print(f"validate {public(str(report.path))}")
    width = max((len(c.name) for c in report.checks), default=0)
    for c in report.checks:
        print(f"  {_LABELS.get(c.status, c.status.upper()):4}  {c.name:<{width}}  {public(c.message)}")
        if debug and c.details.get("traceback"):
            print(c.details["traceback"], file=sys.stderr)
    n = report.counts()
    verdict = "passed" if report.ok else "FAILED"
    print(f"result: {verdict} ({n['fail']} failed, {n['warn']} warnings, {n['pass']} passed)")


def cmd_validate(args: argparse.Namespace) -> int:
    """Run the checks on ``args.dir`` and print them.

    Returns:
        0 when no check failed; with ``--json``, the exit code of a validation failure.

    Raises:
        ValidationFailedError: A check failed (text mode).
        VllmUnavailableError: ``--load`` without an interpreter that has vLLM.
        VllmLoadError: ``--load`` and vLLM failed to load or run the folder.
    """
    import contextlib

    from vllm_consolidate.cli.common import storage_options
    from vllm_consolidate.storage import remote

    options = storage_options(args)
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(remote.local_input(args.dir, options))
        mirror = remote.mirror_of(folder)
        if mirror is not None:  # transformers opens config and tokenizer files by name: make those real
            mirror.materialize()
        against = args.against
        if against is not None:
            against = stack.enter_context(remote.local_input(against, options))
        return _validate(args, folder, against)


def _validate(args: argparse.Namespace, folder: Path, against: Path | None) -> int:
    from vllm_consolidate.cli.common import exit_code
    from vllm_consolidate.errors import InputNotFoundError, UsageError
    from vllm_consolidate.storage.remote import public_value
    from vllm_consolidate.validate import add_load_check, validate_folder

    if not folder.is_dir():
        raise InputNotFoundError("not a folder", path=folder, hint="Pass the model folder that holds config.json.")
    if args.max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    python = args.vllm_python
    if args.load and python is None:
        python = _default_vllm_python()
    reference = None
    if args.against is not None:
        from vllm_consolidate.validate.source import reference_for_folder

        reference = reference_for_folder(folder, against, input_type=args.against_type,
                                         model_key=args.model_key, base_model_name=args.base_model_name)
    report = validate_folder(folder, scan_values=args.scan_values, reference=reference)
    if args.load:
        try:
            add_load_check(report, python=python, max_tokens=args.max_tokens)
        except ConsolidateError:
            if not args.json:
                print_report(report, args.debug)  # what the static tier found, before the load tier's error
            raise

    failed = report.failure_messages()
    error = None
    if failed:
        error = ValidationFailedError(
            f"{len(failed)} check(s) failed: " + "; ".join(c.name for c in report.checks if c.status == "fail"),
            path=folder,
            hint="See the FAIL lines (or the failed checks in --json); fix them before serving the folder with vLLM.",
            report=report,
        )
    if args.json:
        doc = {"status": "passed" if report.ok else "failed", "exit_code": exit_code(error) if error else 0}
        doc.update(public_value(report.to_dict()))
        print(json.dumps(doc, indent=2, default=str))
        if error is not None:
            print(f"error: {error}", file=sys.stderr)
            return exit_code(error)
        return 0
    print_report(report, args.debug)
    if error is not None:
        raise error
    return 0
