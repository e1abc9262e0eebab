"""Command-line interface: parses arguments, calls the library, prints. No logic of its own.

Exit codes are decided here and only here, by :data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from vllm_consolidate import __version__
from vllm_consolidate import errors as E

# Most specific class first; the first isinstance match decides.
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (E.UsageError, 2),
    (E.InputNotFoundError, 3),
    (E.UnsafeInputError, 5),
    (E.CorruptCheckpointError, 4),
    (E.UnsupportedCheckpointError, 4),
    (E.OutputExistsError, 6),
    (E.InsufficientDiskError, 7),
    (E.ConfigNotFoundError, 8),
    (E.ValidationFailedError, 9),
    (E.VllmUnavailableError, 10),
    (E.VllmLoadError, 10),
    (E.BatchError, 11),
    (E.OutputNotWritableError, 12),
    (E.ConsolidateError, 1),
    (KeyboardInterrupt, 130),
]
INTERNAL_ERROR = 70


def exit_code(exc: BaseException) -> int:
    """The process exit code for an exception."""
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return INTERNAL_ERROR


def _on_sigterm(signum, frame):  # noqa: ARG001
    # Turn a kill into an exception so the library's cleanup (removing the temporary folder) runs.
    raise KeyboardInterrupt


def _run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return func(args)
    except BaseException as exc:  # noqa: BLE001 - the one place errors become exit codes
        if isinstance(exc, SystemExit):
            raise
        if getattr(args, "debug", False):
            traceback.print_exc()
        if isinstance(exc, E.ConsolidateError):
            print(f"error: {exc}", file=sys.stderr)
            if exc.hint:
                print(f"hint: {exc.hint}", file=sys.stderr)
        elif isinstance(exc, KeyboardInterrupt):
            print("error: interrupted; no partial output was left behind", file=sys.stderr)
        else:
            print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
            print("hint: rerun with --debug for the traceback and report it.", file=sys.stderr)
        if getattr(args, "json", False) and isinstance(exc, E.ConsolidateError):
            print(json.dumps({"status": "error", "error": exc.message, "path": exc.path, "hint": exc.hint,
                              "exit_code": exit_code(exc)}))
        return exit_code(exc)


# -- convert ------------------------------------------------------------------------------------------

def add_model_options(p: argparse.ArgumentParser) -> None:
    """Options shared by a single conversion and a batch (the guide's model and validation options)."""
    from vllm_consolidate.convert import DEFAULT_BASE_MODEL

    p.add_argument("--type", dest="input_type", choices=("deepspeed", "hf_sharded", "auto"), default="auto",
                   help="input type (default: auto)")
    p.add_argument("--force", action="store_true", help="replace an existing output, once the new one is complete")
    p.add_argument("--base-model-name", default=DEFAULT_BASE_MODEL,
                   help="local folder or Hub id for config/tokenizer the checkpoint lacks "
                        f"(default: {DEFAULT_BASE_MODEL}; read from the local HF cache, downloaded only when online)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="output precision of floating-point tensors (default: float32)")
    p.add_argument("--max-shard-size", default="40GB",
                   help="largest output file before splitting into HF shards with an index (default: 40GB)")
    p.add_argument("--keep-original-precision", action="store_true",
                   help="DeepSpeed: the precision it was trained in (bf16/fp16 from its DeepSpeed config, else "
                        "fp32); HF: each tensor's stored dtype. Overrides --dtype")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--safetensors", dest="fmt", action="store_const", const="safetensors",
                     help="write safetensors (default)")
    fmt.add_argument("--pytorch-bin", dest="fmt", action="store_const", const="bin",
                     help="write PyTorch .bin instead")
    p.set_defaults(fmt="safetensors")
    p.add_argument("--validate-vllm", action=argparse.BooleanOptionalAction, default=True,
                   help="validate the output before publishing it (default: on; --no-validate-vllm turns it off)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _convert_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--input", required=True, type=Path, help="checkpoint, training run or HF model folder")
    p.add_argument("--output", required=True, type=Path, help="output folder")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="a specific checkpoint-N or global_stepN folder (overrides auto-detection)")
    add_model_options(p)
    p.set_defaults(func=cmd_convert)
    return p


class _Progress:
    """A tqdm bar by bytes on stderr."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing",
                            file=sys.stderr, mininterval=0.5, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def stage(self, text: str) -> None:
        """Announce a long step that has no byte count."""
        if self.enabled:
            self.close()
            print(f"{text}...", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def print_summary(result) -> None:
    """Human summary of a :class:`~vllm_consolidate.convert.ConvertResult` on stdout."""
    d = result.detected
    if result.status == "already_consolidated":
        print(f"already consolidated: {result.output} holds one {d.get('format', '')} weights file "
              "and nothing would change")
        print("  vLLM can load it as it is; pass --force, --dtype or --pytorch-bin to convert anyway.")
        return
    parts = [d.get("type", "?")]
    if d.get("stage") is not None:
        parts += [f"ZeRO-{d['stage']}", f"world size {d['world_size']}", f"tag {d['tag']}"]
    if d.get("trained_dtype"):
        parts.append(f"trained in {d['trained_dtype']}")
    print(f"detected:   {', '.join(parts)}")
    print(f"chosen:     {d.get('weights_dir')} ({d.get('how')})")
    extra = f"; dropped tied {', '.join(result.dropped)}" if result.dropped else ""
    print(f"tensors:    {result.tensors} tensors, {result.parameters:,} parameters{extra}")
    if result.renamed:
        print(f"renamed:    {len(result.renamed)} names lost a wrapper prefix")
    print(f"bytes:      read {_gb(result.bytes_read)}, wrote {_gb(result.bytes_written)} as {result.output_dtype}")
    print(f"files:      {', '.join(result.files)}")
    origin = result.assets
    print(f"config:     {origin.get('config')}")
    print(f"tokenizer:  {origin.get('tokenizer') or 'none'}")
    rate = result.bytes_written / 1e6 / result.seconds if result.seconds else 0
    print(f"time:       {result.seconds:.1f} s ({rate:.0f} MB/s)")
    if result.validation is not None:
        counts = result.validation["counts"]
        source = next((c for c in result.validation["checks"] if c["name"] == "source_values"), None)
        print(f"validation: {'passed' if result.validation['ok'] else 'FAILED'} ({counts['pass']} checks passed, "
              f"{counts['warn']} warnings)" + (f"; source: {source['message']}" if source else ""))
    print(f"output:     {result.output}")


def cmd_convert(args: argparse.Namespace) -> int:
    from vllm_consolidate.convert import ConvertOptions, convert
    from vllm_consolidate.planner import DTYPES_BY_NAME, parse_size

    progress = _Progress(enabled=not args.json)
    opts = ConvertOptions(
        input=args.input, output=args.output, input_type=args.input_type, checkpoint_dir=args.checkpoint_dir,
        base_model_name=args.base_model_name, dtype=DTYPES_BY_NAME[args.dtype],
        keep_original_precision=args.keep_original_precision, fmt=args.fmt,
        max_shard_size=parse_size(args.max_shard_size), force=args.force, validate=args.validate_vllm,
        progress=progress, on_stage=progress.stage,
    )
    try:
        result = convert(opts)
    finally:
        progress.close()
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print_summary(result)
    return 0


# -- entry points -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-consolidate",
                                     description="Turn training checkpoints into folders vLLM loads.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _convert_parser(sub.add_parser("convert", help="consolidate one checkpoint or model"))
    try:
        from vllm_consolidate import cli_validate

        cli_validate.add_parser(sub)
    except ImportError:
        pass
    try:
        from vllm_consolidate import cli_batch

        cli_batch.add_parser(sub)
    except ImportError:
        pass
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
    return _run(args.func, args)


def convert_main(argv: Sequence[str] | None = None) -> int:
    """``consolidate-for-vllm``: the guide's single-model script."""
    parser = _convert_parser(argparse.ArgumentParser(
        prog="consolidate-for-vllm", description="Consolidate one checkpoint into a folder vLLM loads."))
    args = parser.parse_args(argv)
    return _run(args.func, args)
