"""What every command shares: the exit-code table, error printing, SIGTERM, shared options, progress.

Exit codes are decided here and only here, by :data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_consolidate import errors as E
from vllm_consolidate.signals import sigterm_raises_interrupt

if TYPE_CHECKING:
    from vllm_consolidate.convert import ConvertOptions

# Most specific class first; the first isinstance match decides.
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (E.UsageError, 2),
    (E.InputNotFoundError, 3),
    (E.UnsafeInputError, 5),
    (E.LimitExceededError, 4),  # a cap: before its base class, to say so
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
    (E.StorageError, 13),
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


def run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; turn any exception into its exit code, an ``error:`` line and (with ``--json``) a record.

    SIGTERM raises KeyboardInterrupt meanwhile, so a killed command still removes its temporary folders.
    """
    with sigterm_raises_interrupt():
        try:
            return func(args)
        except BrokenPipeError:
            # The reader went away (``... | head``): what it wanted was printed. Point stdout at devnull
            # so the interpreter's final flush does not raise again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except BaseException as exc:  # noqa: BLE001 - the one place errors become exit codes
            if isinstance(exc, SystemExit):
                raise
            return _report(exc, args)


def _report(exc: BaseException, args: argparse.Namespace) -> int:
    """Print what went wrong (stderr; the JSON record on stdout with ``--json``) and return the exit code."""
    if getattr(args, "debug", False):
        import traceback  # only with --debug: 2 ms of every command's start otherwise

        traceback.print_exception(exc)
    if isinstance(exc, E.ConsolidateError):
        from vllm_consolidate.storage.remote import public_error

        public_error(exc)  # an object-store input's stand-in paths read as its URLs
        print(f"error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
    elif isinstance(exc, KeyboardInterrupt):
        print("error: interrupted; no partial output was left behind", file=sys.stderr)
    else:
        print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("hint: rerun with --debug for the traceback and report it.", file=sys.stderr)
    if getattr(args, "json", False) and isinstance(exc, E.ConsolidateError):
        print(json.dumps({**E.error_record(exc), "exit_code": exit_code(exc)}))
    return exit_code(exc)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Options shared by a single conversion and a batch (the guide's model and validation options)."""
    from vllm_consolidate.read.assets import DEFAULT_BASE_MODEL  # not from convert: --help plans nothing
    from vllm_consolidate.read.detect import INPUT_TYPES

    p.add_argument("--type", dest="input_type", choices=INPUT_TYPES, default="auto",
                   help="input type (default: auto); dcp = HF Trainer/Accelerate FSDP or any "
                        "torch.distributed.checkpoint folder")
    p.add_argument("--lora", choices=("merge", "adapter"), default="merge",
                   help="LoRA runs: merge the adapter into its base model (default), or write a clean peft adapter "
                        "folder (adapter_config.json + adapter_model.safetensors) that vLLM serves with --enable-lora")
    p.add_argument("--model-key", default=None, metavar="NAME",
                   help="DCP: the state-dict entry that holds the model when there is more than one (e.g. 'model' "
                        "or 'ema'; '' for the top level)")
    p.add_argument("--moe-layout", choices=("auto", "per-expert", "fused"), default="auto",
                   help="MoE experts: per-expert names (experts.E.gate_proj.weight ...; what vLLM loads), fused 3-D "
                        "tensors (experts.gate_up_proj, transformers 5's in-memory layout), or auto (default: what "
                        "save_pretrained of the installed transformers writes, per-expert)")
    p.add_argument("--force", action="store_true", help="replace an existing output, once the new one is complete")
    p.add_argument("--base-model-name", default=DEFAULT_BASE_MODEL,
                   help="local folder or Hub id for config/tokenizer the checkpoint lacks "
                        f"(default: {DEFAULT_BASE_MODEL}; read from the local HF cache, downloaded only when online)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="output precision of floating-point tensors (default: float32; bfloat16 with --quantize)")
    p.add_argument("--quantize", choices=("fp8_dynamic", "fp8_block", "w8a8"), default=None,
                   help="quantize every Linear weight but lm_head as llm-compressor's QuantizationModifier does, in "
                        "the same pass (compressed-tensors: FP8 per channel, FP8 128x128 blocks, INT8 per channel); "
                        "the weights are cast to --dtype first")
    p.add_argument("--quantize-ignore", action="append", default=[], metavar="PATTERN",
                   help="with --quantize: also leave this module unquantized (a module name, re:REGEX matched from "
                        "the start of the name, or a class name); repeatable")
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
    p.add_argument("--architecture", metavar="NAME", default=None,
                   help="model class for the output's config.json 'architectures' (e.g. LlamaForCausalLM), when "
                        "config.json lacks it and it cannot be inferred from model_type; replaces config.json's")
    p.add_argument("--validate-vllm", action=argparse.BooleanOptionalAction, default=True,
                   help="validate the output before publishing it (default: on; --no-validate-vllm turns it off)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    add_storage_options(p)


def add_storage_options(p: argparse.ArgumentParser) -> None:
    """``--storage-options JSON``: every command that may name an object-store URL takes it."""
    p.add_argument("--storage-options", default=None, metavar="JSON",
                   help="object-store settings beyond the standard environment (AWS_*, GOOGLE_*, AZURE_*), as a "
                        "JSON object of obstore config keys, e.g. '{\"endpoint\": \"http://127.0.0.1:9000\", "
                        "\"region\": \"us-east-1\"}'")


def path_or_url(text: str) -> Path | str:
    """An argparse type: a local path, or an object-store URL kept as text (``Path`` would fold its ``//``)."""
    from vllm_consolidate.storage.urls import is_object_url, parse_object_url

    if not is_object_url(text):
        return Path(text)
    try:
        parse_object_url(text)
    except E.UsageError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return text


def storage_options(args: argparse.Namespace) -> dict[str, str]:
    """The parsed ``--storage-options`` (empty when not given).

    Raises:
        UsageError: not a JSON object of scalars.
    """
    from vllm_consolidate.storage.store import parse_storage_options

    return parse_storage_options(getattr(args, "storage_options", None))


def model_options(args: argparse.Namespace, *, input: Path | None = None, output: Path | str | None = None,
                  checkpoint_dir: Path | None = None) -> ConvertOptions:
    """The options record of :func:`add_model_options`' flags: one conversion's (with paths) or a batch's template.

    Raises:
        UsageError: ``--max-shard-size`` is not a size.
    """
    from vllm_consolidate.convert import ConvertOptions
    from vllm_consolidate.units import parse_size

    return ConvertOptions(
        input=input, output=output, checkpoint_dir=checkpoint_dir, input_type=args.input_type,
        base_model_name=args.base_model_name, dtype=args.dtype or ("bfloat16" if args.quantize else "float32"),
        keep_original_precision=args.keep_original_precision, quantize=args.quantize,
        quantize_ignore=tuple(args.quantize_ignore),
        fmt=args.fmt, max_shard_size=parse_size(args.max_shard_size), force=args.force, validate=args.validate_vllm,
        architecture=args.architecture, model_key=args.model_key, lora=args.lora,
        moe_layout=args.moe_layout, storage_options=storage_options(args),
    )


#: A write rate is shown only above both: below them it is mostly start-up, fsync and validation time.
RATE_MIN_BYTES = 100 * 10**6
RATE_MIN_SECONDS = 0.5


def rate(nbytes: int, seconds: float | None) -> str | None:
    """``"850 MB/s"`` or ``"1.24 GB/s"``, or None when the output is too small or quick for a rate to mean anything.

    A 2 MB model written in 3 s (most of it validation) would otherwise read "1 MB/s", or "0 MB/s".
    """
    if not seconds or seconds < RATE_MIN_SECONDS or nbytes < RATE_MIN_BYTES:
        return None
    per_second = nbytes / seconds
    return f"{per_second / 1e9:.2f} GB/s" if per_second >= 1e9 else f"{per_second / 1e6:.0f} MB/s"


class Progress:
    """Bytes written so far, on stderr: one line redrawn in place on a terminal, else a line every
    :data:`LOG_EVERY_SECONDS` (a log or a CI job keeps a readable record, not a stream of carriage returns).

    Not tqdm: ``import tqdm`` costs 0.17 s (its version lookup imports ``importlib.metadata`` and ``email``),
    a sixth of a whole 0.5B bfloat16 conversion.
    """

    REDRAW_SECONDS = 0.2
    LOG_EVERY_SECONDS = 10.0

    def __init__(self, enabled: bool, stream: Any = None):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.started: float | None = None
        self.shown = 0.0
        self.open = self.tty = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.started is None:
            self.started, self.shown = now, now - self.REDRAW_SECONDS * 2
            self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        finished = done >= total
        if not finished and now - self.shown < (self.REDRAW_SECONDS if self.tty else self.LOG_EVERY_SECONDS):
            return
        self.shown = now
        self.open = True
        self.stream.write(("\r" if self.tty else "") + self.line(done, total, now - self.started)
                          + ("\x1b[K" if self.tty else "\n"))
        self.stream.flush()
        if finished:
            self.close()

    @staticmethod
    def line(done: int, total: int, seconds: float) -> str:
        """``writing:  54% 1.00/1.84 GB, 1.31 GB/s, 1 s left``."""
        unit, scale = ("GB", 1e9) if total >= 1e9 else ("MB", 1e6)
        text = f"writing: {100 * done // max(total, 1):3d}% {done / scale:.2f}/{total / scale:.2f} {unit}"
        if seconds > 0 and done > 0:
            per_second = done / seconds
            text += f", {per_second / 1e9:.2f} GB/s" if per_second >= 1e9 else f", {per_second / 1e6:.0f} MB/s"
            if done < total:
                text += f", {(total - done) / per_second:.0f} s left"
        return text

    def stage(self, text: str) -> None:
        """Announce a long step that has no byte count."""
        if self.enabled:
            self.close()
            print(f"{text}...", file=self.stream, flush=True)

    def close(self) -> None:
        if self.open and self.tty:
            self.stream.write("\n")
            self.stream.flush()
        self.open = False


