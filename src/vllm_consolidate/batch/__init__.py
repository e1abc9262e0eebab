"""Batch consolidation: plan many conversions, run them in worker processes, resume where a batch stopped.

This module never prints; it reports through the ``on_event`` callback and its return values. The
CLI (:mod:`vllm_consolidate.cli.batch`) does the printing.

Inputs
------
``--input-dir DIR``: if DIR itself is convertible (a run with ``checkpoint-N`` children, a folder with
``latest``/``global_stepN``, a ``checkpoint-N``/``global_stepN`` folder, or an HF model folder) it is
the one input. Otherwise its children that are convertible are the inputs; if none is, its
grandchildren (so ``--input-dir experiments`` finds ``experiments/ft_runs_*/qwen2.5-7b``).
Folders inside ``--output-dir`` are never inputs (so outputs of an earlier batch are not picked up
again). ``--input-pattern GLOB``: every matching folder is an input (``*``, ``?``, ``[..]``, ``**`` and brace
lists ``{a,b}`` are expanded). ``--input-list FILE``: one folder per line; blank lines and lines
starting with ``#`` are ignored; relative paths are relative to the current directory.

Checkpoint selection
--------------------
Per input, by default the latest checkpoint: the highest ``checkpoint-N``; for a DeepSpeed save
folder the tag in ``latest`` (else the highest ``global_stepN``); a checkpoint or HF model folder is
taken as it is (a run folder that also holds HF weights from ``save_model`` counts as a run, as in
single conversion). ``--all-checkpoints`` takes every ``checkpoint-N`` (or ``global_stepN``).
``--checkpoint-filter PATTERN`` (repeatable) keeps the checkpoints whose folder name matches one of
the patterns (fnmatch globs with brace expansion, e.g. ``checkpoint-{100,200,300}``) and implies
``--all-checkpoints``; an input with no matching checkpoint is an error.

Naming (``--naming-template``, default ``{input_name}_step_{step}``)
-------------------------------------------------------------------
* ``{input_name}``: the name of the input folder; when the input is itself a checkpoint folder
  (``checkpoint-N``/``global_stepN``), the name of the folder holding it (the *model folder*).
* ``{run_name}``: the name of the model folder's parent. The guide's layout is
  ``<experiment>/<model>/checkpoint-N``: for ``./experiments/ft_runs_grad_norm05_16k/qwen2.5-7b``,
  ``input_name`` is ``qwen2.5-7b`` and ``run_name`` is ``ft_runs_grad_norm05_16k``, so Example 2's
  ``{run_name}_final`` gives ``ft_runs_grad_norm05_16k_final``.
* ``{step}``: N of ``checkpoint-N``/``global_stepN``; ``final`` for an HF model folder without one.
* ``{checkpoint_name}``: ``checkpoint-200``, ``global_step200``, or the HF model folder's name.

Two jobs that would write the same output folder are an error before any work starts.

Scheduler
---------
Each job runs in a worker process (at most ``--max-workers``; spawned, reused for several jobs). A
job's needs come from metadata: disk = the output's bytes (tensor count x output dtype size, plus
config/tokenizer files) + 64 MiB + 1 %; RAM = :data:`JOB_BASE_RSS` (interpreter, torch, metadata:
measured peak RSS of one worker converting a tiny model) + the writer's buffers (2 threads x 2 x
``CAST_CHUNK_BYTES`` when a dtype changes; the largest tensor + ``CHUNK_BYTES`` for ``.bin``). A job is started
only when (a) the RAM estimates of the running jobs plus this one fit in ``MemAvailable`` at batch
start minus :func:`ram_margin` (max(1 GiB, 10 % of MemTotal)), (b) ``MemAvailable`` *now* minus the
margin still covers this job, and (c) the disk estimates of every job started so far (outputs stay on
disk) plus this one fit in the output file system's free space at batch start minus
:data:`DISK_MARGIN`. A job that does not fit even with nothing running: RAM -> it runs alone; disk ->
it fails with "not enough disk space".

Resume and the manifest
-----------------------
Every finished output holds ``.vllm-consolidate.json`` (:data:`MANIFEST_NAME`), written into the
staged folder before the atomic rename, so an output either has a complete manifest or does not
exist. It records the source (input, checkpoint, weights folder), the size and mtime of every file
in the weights folder and of the config/tokenizer files used, the content-affecting options, the tool
version, and the size and sha256 of every output file. On a rerun a job is *skipped (up to date)*
when its output's manifest names the same checkpoint, the same source sizes/mtimes and options, and
every listed file is present with its recorded size (``verify_checksums`` also rehashes them; the
tool version is recorded but does not invalidate). A stale output (sources or options changed,
files missing or resized) that the manifest shows is ours, from the same checkpoint, is redone and
replaced once the new one is complete. An existing output without our manifest, or made from another
checkpoint, is replaced only with ``force``; otherwise the job is blocked.

A worker writes into ``.<name>.batch-<id>`` next to the output and renames it into place at the end.
Workers remove their staging folder when they fail or receive SIGTERM/SIGINT, and get SIGTERM when
the batch process dies (Linux ``PR_SET_PDEATHSIG``). A batch holds ``.vllm-consolidate-batch.lock``
in the output folder (exclusive while it cleans up, shared while it runs; workers hold it shared),
and on start removes stale ``.<name>.batch-*`` and ``.<name>.old-*`` folders of the outputs it plans.

Failure policy: without ``continue_on_error`` the first failed job stops the batch: no new job
starts, running jobs finish (their outputs are kept), the rest are reported as not run.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import glob
import hashlib
import json
import os
import shutil
import signal
import string
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_consolidate import __version__
from vllm_consolidate.errors import BatchError, ConsolidateError, InputNotFoundError, UsageError
from vllm_consolidate.readers.deepspeed import is_zero_checkpoint_folder, step_of
from vllm_consolidate.readers.hf import is_hf_folder
from vllm_consolidate.safe_io import MAX_LIST_BYTES, MAX_TAG_BYTES, read_text
from vllm_consolidate.write.publish import MARKER_FORMAT, MARKER_NAME, NAME_MAX, TEMP_NAME_OVERHEAD

MANIFEST_NAME = MARKER_NAME  # the batch's manifest extends the marker every output holds
MANIFEST_FORMAT = MARKER_FORMAT
MANIFEST_VERSION = 1
LOCK_NAME = ".vllm-consolidate-batch.lock"
DEFAULT_TEMPLATE = "{input_name}_step_{step}"
TEMPLATE_FIELDS = ("input_name", "run_name", "step", "checkpoint_name")

MIB = 2**20
GIB = 2**30
#: RSS of a worker before the writer's buffers: Python, torch, transformers (for validation), metadata.
#: Calibrated with the peak RSS workers report (``resource.getrusage``; torch 2.13 CPU, transformers 5):
#: tiny HF Trainer ZeRO-2/3 checkpoints to fp32 with validation 360 MiB; a 74M-parameter ZeRO-2
#: checkpoint without validation 245 MiB (fp32, no cast) and 278 MiB (bf16, cast), with validation
#: 420 MiB (bf16; the estimate is 514 MiB). Rounded up for larger models' metadata.
JOB_BASE_RSS = 450 * MIB
#: Extra RSS per tensor of metadata (specs, segments, pickled headers), generous.
PER_TENSOR_RSS = 8 * 1024
DISK_MARGIN = 1 * GIB
LOCK_WAIT_SECONDS = 60.0
#: Tests only: seconds a worker waits between converting and publishing a job.
TEST_DELAY_ENV = "VLLMC_TEST_JOB_DELAY"

_PARTIAL_TAG = ".batch-"

# ------------------------------------------------------------------------------------------------
# Brace expansion and globbing


#: The most folder names one brace pattern may expand to (``{1..20000000}`` must not run for minutes).
MAX_BRACE_EXPANSIONS = 10_000


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces as bash does (``a{b,c{d,e}}f``, ``{1..3}``, ``{08..10}``), with ``bracex``.

    Raises:
        UsageError: The pattern expands to more than :data:`MAX_BRACE_EXPANSIONS` names.
    """
    import bracex

    try:
        return bracex.expand(pattern, limit=MAX_BRACE_EXPANSIONS)
    except bracex.ExpansionLimitException:
        raise UsageError(f"the pattern {pattern!r} expands to more than {MAX_BRACE_EXPANSIONS:,} names",
                         hint="Use a shorter range, or a glob such as checkpoint-*.") from None


def glob_folders(pattern: str) -> list[Path]:
    """Folders matching a glob with brace expansion and ``**``, sorted, without duplicates."""
    seen: dict[str, None] = {}
    for pat in expand_braces(pattern):
        for hit in sorted(glob.glob(os.path.expanduser(pat), recursive=True)):
            if os.path.isdir(hit):
                seen.setdefault(os.path.normpath(hit), None)
    return [Path(p) for p in seen]


def match_any(name: str, patterns: list[str]) -> bool:
    """Whether ``name`` matches one of the (brace-expanded) fnmatch patterns."""
    return any(fnmatch.fnmatchcase(name, p) for pat in patterns for p in expand_braces(pat))


# ------------------------------------------------------------------------------------------------
# Inputs and checkpoints


@dataclass
class Checkpoint:
    """One convertible checkpoint of an input."""

    name: str  # checkpoint-200, global_step200, or the HF folder's name
    step: int | None
    path: Path  # the folder passed to convert() as checkpoint_dir


@dataclass
class InputFolder:
    """One input of the batch and what it holds."""

    path: Path
    kind: str | None  # "run", "deepspeed_save", "checkpoint", "hf_model", or None (nothing found)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    latest: Checkpoint | None = None
    model_dir: Path | None = None
    error: str | None = None


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted((p for p in path.iterdir() if p.is_dir()), key=lambda p: p.name)
    except OSError:
        return []


def _latest_tag(folder: Path) -> str:
    """The tag ``latest`` names, read bounded; an unusable one gives a name no folder has (detection then says why)."""
    try:
        tag = read_text(folder / "latest", MAX_TAG_BYTES, what="'latest'").strip()
    except ConsolidateError:
        return "latest"
    return tag if tag and "/" not in tag and "\0" not in tag and tag not in (".", "..") else "latest"


def inspect_input(path: Path) -> InputFolder:
    """Classify a folder and list its checkpoints (names only; no file is opened)."""
    path = Path(path)
    if not path.is_dir():
        return InputFolder(path, None, error="not a folder" if path.exists() else "does not exist")
    children = _subdirs(path)
    step = step_of(path.name)
    if step is not None and (is_zero_checkpoint_folder(path) or is_hf_folder(path) or (path / "latest").is_file()
                             or any(step_of(c.name) is not None for c in children)):
        ck = Checkpoint(path.name, step, path)
        holder = path.parent
        if path.name.startswith("global_step") and step_of(holder.name) is not None:
            holder = holder.parent  # run/checkpoint-N/global_stepN
        return InputFolder(path, "checkpoint", [ck], ck, holder)
    ckpts = [Checkpoint(c.name, s, c) for c in children if c.name.startswith("checkpoint-") and (s := step_of(c.name))
             is not None]
    if ckpts:
        ckpts.sort(key=lambda c: c.step or 0)
        return InputFolder(path, "run", ckpts, ckpts[-1], path)
    tags = [Checkpoint(c.name, s, c) for c in children if c.name.startswith("global_step")
            and (s := step_of(c.name)) is not None and is_zero_checkpoint_folder(c)]
    if tags:
        tags.sort(key=lambda c: c.step or 0)
        latest = tags[-1]
        if (path / "latest").is_file():
            tag = _latest_tag(path)
            named = [c for c in tags if c.name == tag]
            latest = named[0] if named else Checkpoint(tag, step_of(tag), path / tag)
        return InputFolder(path, "deepspeed_save", tags, latest, path)
    if is_zero_checkpoint_folder(path) or is_hf_folder(path):
        ck = Checkpoint(path.name, None, path)
        return InputFolder(path, "hf_model" if not is_zero_checkpoint_folder(path) else "checkpoint", [ck], ck, path)
    return InputFolder(path, None, error="no checkpoint-N/, global_stepN/, 'latest', ZeRO files or HF weights")


def collect_inputs(input_dir: Path | None = None, input_pattern: str | None = None,
                   input_list: Path | None = None) -> list[InputFolder]:
    """The batch's inputs, from exactly one of the three sources (see the module docstring).

    Raises:
        UsageError: Not exactly one source given, or the list file is unreadable.
        InputNotFoundError: The directory or pattern yields nothing.
    """
    given = [x is not None for x in (input_dir, input_pattern, input_list)]
    if sum(given) != 1:
        raise UsageError("give exactly one of --input-dir, --input-pattern and --input-list")
    if input_dir is not None:
        root = Path(input_dir)
        if not root.is_dir():
            raise InputNotFoundError("--input-dir is not a folder", path=root)
        top = inspect_input(root)
        if top.kind is not None:
            return [top]
        for level in (_subdirs(root), [g for c in _subdirs(root) for g in _subdirs(c)]):
            found = [f for f in (inspect_input(p) for p in level) if f.kind is not None]
            if found:
                return found
        raise InputNotFoundError("no training run, checkpoint or HF model in the folder or the two levels below it",
                                 path=root)
    if input_pattern is not None:
        hits = glob_folders(input_pattern)
        if not hits:
            raise InputNotFoundError(f"no folder matches the pattern {input_pattern!r}",
                                     hint="Quote the pattern so the shell does not expand it, and check the path.")
        return [inspect_input(p) for p in hits]
    assert input_list is not None
    try:
        lines = read_text(input_list, MAX_LIST_BYTES, what="--input-list", error=UsageError).splitlines()
    except UsageError as exc:
        raise UsageError(f"cannot use --input-list: {exc.message}", path=input_list) from None
    entries = [ln.strip() for ln in lines]
    entries = [e for e in entries if e and not e.startswith("#")]
    if not entries:
        raise InputNotFoundError("the input list names no folder", path=input_list)
    seen: dict[str, None] = {}
    for e in entries:
        seen.setdefault(os.path.normpath(os.path.expanduser(e)), None)
    return [inspect_input(Path(p)) for p in seen]


def select_checkpoints(inp: InputFolder, all_checkpoints: bool, filters: list[str] | None) -> list[Checkpoint]:
    """The checkpoints of ``inp`` to convert (see the module docstring)."""
    if filters:
        return [c for c in inp.checkpoints if match_any(c.name, filters)]
    if all_checkpoints:
        return list(inp.checkpoints)
    return [inp.latest] if inp.latest is not None else []


# ------------------------------------------------------------------------------------------------
# Naming


def template_fields(template: str) -> list[str]:
    """Field names a template uses.

    Raises:
        UsageError: Malformed template or unknown field.
    """
    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise UsageError(f"bad --naming-template {template!r}: {exc}") from None
    fields = [f for f, _, _ in parsed]
    for f, spec, conv in parsed:
        # Every field is a string, so a format spec such as {step:x} or {step:05d} could only fail at run time.
        if spec or conv:
            raise UsageError(f"--naming-template field {{{f}{'!' + conv if conv else ''}{':' + spec if spec else ''}}} "
                             "has a conversion or format spec; fields are plain text",
                             hint="Write the field bare, e.g. {step}.")
        if f not in TEMPLATE_FIELDS:
            raise UsageError(f"unknown field {{{f}}} in --naming-template",
                             hint="Use " + ", ".join("{" + x + "}" for x in TEMPLATE_FIELDS) + ".")
    return fields


def name_fields(inp: InputFolder, ck: Checkpoint) -> dict[str, str]:
    """The template fields of one job."""
    model_dir = (inp.model_dir or inp.path).absolute()
    input_name = model_dir.name if inp.kind == "checkpoint" and step_of(inp.path.name) is not None else \
        inp.path.absolute().name
    run_name = model_dir.parent.name or model_dir.name
    return {
        "input_name": input_name,
        "run_name": run_name,
        "step": str(ck.step) if ck.step is not None else "final",
        "checkpoint_name": ck.name,
    }


def render_name(template: str, fields: dict[str, str]) -> str:
    """Format an output folder name; it must be one plain path component.

    Raises:
        UsageError: The name is empty, hidden, or contains a path separator.
    """
    name = template.format(**fields)
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name or name.startswith("."):
        raise UsageError(f"--naming-template gives {name!r}, which is not a usable folder name",
                         hint="The template must give one non-hidden folder name, without '/'.")
    # The staging folder (.<name>.batch-XXXXXXXX) holds convert's own temporary sibling, which adds more.
    overhead = 1 + len(_PARTIAL_TAG) + 8 + TEMP_NAME_OVERHEAD + 1
    if len(name.encode("utf-8", "surrogateescape")) + overhead > NAME_MAX:
        raise UsageError(f"--naming-template gives a {len(name.encode())}-byte name; at most "
                         f"{NAME_MAX - overhead} bytes fit with the temporary names", hint="Use a shorter template.")
    return name


# ------------------------------------------------------------------------------------------------
# Options, manifest


@dataclass
class BatchOptions:
    """Everything a batch needs; the CLI flags map one to one.

    Attributes:
        output_dir: Where the output folders go.
        input_dir: One of ``input_dir``/``input_pattern``/``input_list``.
        all_checkpoints: Every checkpoint of each input, not only the latest.
        checkpoint_filter: fnmatch patterns with braces on checkpoint folder names.
        max_workers: Most jobs at once.
        naming_template: Output folder name template.
        dry_run: Plan only.
        continue_on_error: Keep going after a failed job.
        force: Redo up-to-date outputs and replace outputs that are not ours.
        verify_checksums: Rehash outputs when deciding whether they are up to date.
        input_type, base_model_name, dtype, keep_original_precision, fmt, max_shard_size, validate:
            The single-conversion options, passed to every job (``dtype`` by name).
        debug: Include tracebacks in job errors.
    """

    output_dir: Path
    input_dir: Path | None = None
    input_pattern: str | None = None
    input_list: Path | None = None
    all_checkpoints: bool = False
    checkpoint_filter: list[str] | None = None
    max_workers: int = 4
    naming_template: str = DEFAULT_TEMPLATE
    dry_run: bool = False
    continue_on_error: bool = False
    force: bool = False
    verify_checksums: bool = False
    input_type: str = "auto"
    base_model_name: str | None = None
    dtype: str = "float32"
    keep_original_precision: bool = False
    fmt: str = "safetensors"
    max_shard_size: int = 40 * 10**9
    validate: bool = True
    debug: bool = False

    def content_options(self) -> dict[str, Any]:
        """The options that change an output's bytes; recorded in and compared with the manifest."""
        return {
            "input_type": self.input_type,
            "base_model_name": self.base_model_name,
            "dtype": None if self.keep_original_precision else self.dtype,
            "keep_original_precision": self.keep_original_precision,
            "format": self.fmt,
            "max_shard_size": self.max_shard_size,
        }


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def source_fingerprint(weights_dir: Path, extra_files: list[Path]) -> dict[str, list[int]]:
    """``{absolute path: [size, mtime_ns]}`` of every file in the weights folder and of ``extra_files``."""
    out: dict[str, list[int]] = {}
    for p in sorted(Path(weights_dir).iterdir()):
        if p.is_file():
            out[str(p.absolute())] = _stat(p)
    for p in extra_files:
        if p.is_file():
            out[str(Path(p).absolute())] = _stat(Path(p))
    return out


def sha256_file(path: Path, bufsize: int = 8 * MIB) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of an output folder, or None when absent or not ours."""
    try:
        data = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return None
    return data


def write_manifest(folder: Path, base: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in ``folder`` and write the manifest there (atomically); return it."""
    files = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            files[str(p.relative_to(folder))] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {
        "format": MANIFEST_FORMAT,
        "manifest_version": MANIFEST_VERSION,
        "tool": "vllm-consolidate",
        "tool_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **base,
        "files": files,
        "result": {k: result.get(k) for k in ("status", "tensors", "parameters", "output_dtype", "bytes_written",
                                               "seconds")},
    }
    tmp = Path(folder) / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, Path(folder) / MANIFEST_NAME)
    return manifest


def output_state(output: Path, checkpoint: Path, sources: dict[str, list[int]], options: dict[str, Any],
                 verify_checksums: bool = False) -> tuple[str, str]:
    """Classify an existing output folder for a job.

    Returns:
        ``(state, reason)`` with state ``"missing"``, ``"current"``, ``"stale"`` (ours, same checkpoint,
        out of date) or ``"foreign"`` (no manifest of ours, or made from another checkpoint).
    """
    if not output.exists():
        return "missing", ""
    m = read_manifest(output)
    if m is None:
        return "foreign", "exists without a vllm-consolidate manifest"
    if m.get("manifest_version") != MANIFEST_VERSION:
        return "stale", f"manifest version {m.get('manifest_version')}"
    if (m.get("source") or {}).get("checkpoint") != str(checkpoint.absolute()):
        return "foreign", f"made from another checkpoint ({(m.get('source') or {}).get('checkpoint')})"
    if m.get("options") != options:
        return "stale", "options changed"
    if m.get("source_files") != sources:
        old, new = m.get("source_files") or {}, sources
        changed = sorted(set(old) ^ set(new) | {k for k in set(old) & set(new) if old[k] != new[k]})
        return "stale", f"source changed ({Path(changed[0]).name}{' ...' if len(changed) > 1 else ''})"
    for rel, info in (m.get("files") or {}).items():
        p = output / rel
        if not p.is_file() or p.stat().st_size != info.get("size"):
            return "stale", f"{rel} missing or resized"
        if verify_checksums and sha256_file(p) != info.get("sha256"):
            return "stale", f"{rel} checksum differs"
    if not m.get("files"):
        return "stale", "manifest lists no files"
    return "current", ""


# ------------------------------------------------------------------------------------------------
# Planning


@dataclass
class Job:
    """One conversion of a batch, planned from metadata.

    ``action`` is ``convert``, ``replace`` (stale or forced), ``skip`` (up to date), ``blocked``
    (output exists and is not ours to replace) or ``error`` (planning failed). ``status`` is set by
    the run: ``done``, ``skipped``, ``failed`` or ``not_run``.
    """

    id: int
    input: Path
    checkpoint: Path | None
    checkpoint_name: str
    step: int | None
    output: Path
    fields: dict[str, str] = field(default_factory=dict)
    detected: dict[str, Any] = field(default_factory=dict)
    est_output_bytes: int = 0
    est_disk_bytes: int = 0
    est_peak_ram: int = 0
    existing_bytes: int = 0
    sources: dict[str, list[int]] = field(default_factory=dict)
    action: str = "convert"
    reason: str = ""
    status: str = "pending"
    error: dict[str, Any] | None = None
    started: float | None = None
    finished: float | None = None
    seconds: float | None = None
    result: dict[str, Any] | None = None
    peak_rss: int | None = None

    @property
    def label(self) -> str:
        return f"{self.input} [{self.checkpoint_name}]"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "input": str(self.input),
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "checkpoint_name": self.checkpoint_name,
            "step": self.step,
            "output": str(self.output),
            "fields": self.fields,
            "detected": self.detected,
            "action": self.action,
            "reason": self.reason or None,
            "status": self.status,
            "est_output_bytes": self.est_output_bytes,
            "est_peak_ram_bytes": self.est_peak_ram,
            "started": self.started,
            "finished": self.finished,
            "seconds": round(self.seconds, 3) if self.seconds is not None else None,
            "bytes_written": (self.result or {}).get("bytes_written"),
            "peak_rss_bytes": self.peak_rss,
            "error": self.error,
        }


@dataclass
class BatchPlan:
    """The planned jobs and the resources they will be admitted against."""

    options: BatchOptions
    jobs: list[Job]
    ram_available: int
    ram_margin: int
    disk_free: int | None
    notes: list[str] = field(default_factory=list)

    @property
    def to_run(self) -> list[Job]:
        return [j for j in self.jobs if j.action in ("convert", "replace")]

    @property
    def problems(self) -> list[Job]:
        return [j for j in self.jobs if j.action in ("blocked", "error")]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ram_available_bytes": self.ram_available,
            "ram_margin_bytes": self.ram_margin,
            "disk_free_bytes": self.disk_free,
            "notes": self.notes,
        }


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes (empty off Linux)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    except OSError:
        pass
    return out


def mem_available() -> int:
    """``MemAvailable`` in bytes (a large number when unknown)."""
    return meminfo().get("MemAvailable", 1 << 50)


def ram_margin() -> int:
    """RAM kept free for everything else: max(1 GiB, 10 % of MemTotal)."""
    return max(GIB, meminfo().get("MemTotal", 0) // 10)


def estimate_peak_ram(plan: Any) -> int:
    """Peak RSS of one worker converting ``plan`` (an :class:`~vllm_consolidate.plan.shards.OutputPlan`)."""
    from vllm_consolidate.write.safetensors import CAST_CHUNK_BYTES, CHUNK_BYTES, WORKERS

    tensors = plan.tensors
    base = JOB_BASE_RSS + PER_TENSOR_RSS * len(tensors)
    if plan.format == "bin":
        largest = max((t.nbytes for t in tensors), default=0)
        return base + largest + CHUNK_BYTES
    casts = any(t.out_dtype != t.spec.dtype for t in tensors)
    return base + (WORKERS * 2 * CAST_CHUNK_BYTES if casts else 0)


def _estimate(job: Job, opts: BatchOptions) -> None:
    """Fill in a job's detected type, size and memory estimates and source fingerprint (metadata only)."""
    from vllm_consolidate.convert import ConvertOptions, plan_conversion
    from vllm_consolidate.plan.shards import DTYPES_BY_NAME

    conv = plan_conversion(ConvertOptions(
        input=job.input, output=job.output, input_type=opts.input_type, checkpoint_dir=job.checkpoint,
        base_model_name=opts.base_model_name, dtype=DTYPES_BY_NAME[opts.dtype],
        keep_original_precision=opts.keep_original_precision, fmt=opts.fmt, max_shard_size=opts.max_shard_size))
    detected, source, assets, plan = conv.detected, conv.source, conv.assets, conv.plan
    asset_files = [p for p in (assets.config, assets.generation_config, *assets.tokenizer_files) if p is not None]
    job.detected = {k: source.info.get(k) for k in ("type", "stage", "world_size", "tag", "trained_dtype")}
    job.detected["weights_dir"] = str(detected.weights_dir)
    job.est_output_bytes = plan.total_size + sum(p.stat().st_size for p in asset_files) + 64 * 1024
    job.est_disk_bytes = job.est_output_bytes + 64 * MIB + job.est_output_bytes // 100
    job.est_peak_ram = estimate_peak_ram(plan)
    job.sources = source_fingerprint(detected.weights_dir, [Path(f) for f in source.source_files] + asset_files)


def _error_info(exc: BaseException, debug: bool = False) -> dict[str, Any]:
    info: dict[str, Any] = {"type": type(exc).__name__, "message": getattr(exc, "message", None) or str(exc)}
    if isinstance(exc, ConsolidateError):
        info.update(path=exc.path, hint=exc.hint)
    if debug:
        info["traceback"] = "".join(traceback.format_exception(exc))
    return info


def plan_batch(opts: BatchOptions) -> BatchPlan:
    """Collect inputs, select checkpoints, name outputs, estimate needs and classify existing outputs.

    Per-job problems (unreadable checkpoint, output blocked) are recorded in the job's ``action``
    (``error``/``blocked``) rather than raised.

    Raises:
        UsageError: Bad template or options.
        InputNotFoundError: The inputs yield nothing.
        BatchError: Two jobs would write the same output, or nothing is selected.
    """
    if opts.max_workers < 1:
        raise UsageError("--max-workers must be at least 1")
    template_fields(opts.naming_template)
    inputs = collect_inputs(opts.input_dir, opts.input_pattern, opts.input_list)
    out_dir = Path(opts.output_dir).absolute()
    jobs: list[Job] = []
    notes: list[str] = []
    for inp in inputs:
        inp_path = inp.path.absolute()
        if inp_path == out_dir or out_dir in inp_path.parents:
            notes.append(f"ignored {inp.path}: it is inside --output-dir (an earlier batch's output)")
            continue
        if inp.kind is None:
            job = Job(len(jobs), inp_path, None, "-", None, out_dir / "-", action="error")
            job.error = {"type": "InputNotFoundError", "message": f"nothing to convert: {inp.error}",
                         "path": str(inp_path)}
            jobs.append(job)
            continue
        chosen = select_checkpoints(inp, opts.all_checkpoints, opts.checkpoint_filter)
        if not chosen:
            job = Job(len(jobs), inp_path, None, "-", None, out_dir / "-", action="error")
            wanted = " ".join(opts.checkpoint_filter or [])
            have = ", ".join(c.name for c in inp.checkpoints) or "none"
            job.error = {"type": "BatchError", "path": str(inp_path),
                         "message": f"no checkpoint matches --checkpoint-filter {wanted} (has {have})"}
            jobs.append(job)
            continue
        for ck in chosen:
            fields = name_fields(inp, ck)
            name = render_name(opts.naming_template, fields)
            jobs.append(Job(len(jobs), inp_path, ck.path.absolute(), ck.name, ck.step, out_dir / name, fields))
    if opts.checkpoint_filter:
        for pat in opts.checkpoint_filter:
            for literal in expand_braces(pat):
                if not any(ch in literal for ch in "*?[") and not any(j.checkpoint_name == literal for j in jobs):
                    notes.append(f"--checkpoint-filter: no input has {literal}")
    if not jobs:
        raise BatchError("nothing selected")

    by_output: dict[Path, list[Job]] = {}
    for j in jobs:
        if j.action != "error":
            by_output.setdefault(j.output, []).append(j)
    clashes = {out: js for out, js in by_output.items() if len(js) > 1}
    if clashes:
        out, js = next(iter(clashes.items()))
        lines = "; ".join(j.label for j in js)
        raise BatchError(
            f"{len(clashes)} output folder(s) would be written by more than one job, e.g. {out.name}: {lines}",
            path=out,
            hint="Make --naming-template tell them apart, e.g. '{run_name}_{input_name}_step_{step}'.",
        )
    for j in jobs:
        if j.action == "error":
            continue
        if j.output == j.input or j.input in j.output.parents or j.output in j.input.parents:
            j.action, j.error = "error", {"type": "UsageError", "path": str(j.output),
                                          "message": "the output folder would be the input, inside it, or hold it"}
            continue
        try:
            _estimate(j, opts)
        except Exception as exc:  # noqa: BLE001 - recorded per job
            j.action, j.error = "error", _error_info(exc, opts.debug)
            continue
        state, reason = output_state(j.output, j.checkpoint or j.input, j.sources, opts.content_options(),
                                     opts.verify_checksums)
        if state == "current":
            j.action, j.reason = ("replace", "up to date; --force") if opts.force else ("skip", "up to date")
        elif state == "stale":
            j.action, j.reason = "replace", f"stale: {reason}"
        elif state == "foreign":
            if opts.force:
                j.action, j.reason = "replace", f"--force: {reason}"
            else:
                j.action, j.reason = "blocked", reason
                j.error = {"type": "OutputExistsError", "path": str(j.output),
                           "message": f"output exists and is not this job's to replace: {reason}",
                           "hint": "Pass --force to replace it, or choose another --output-dir/--naming-template."}
        if j.action == "replace" and j.output.exists():
            j.existing_bytes = sum(p.stat().st_size for p in j.output.rglob("*") if p.is_file())
    disk = None
    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    with contextlib.suppress(OSError):
        disk = shutil.disk_usage(probe).free
    return BatchPlan(opts, jobs, mem_available(), ram_margin(), disk, notes)


# ------------------------------------------------------------------------------------------------
# Running


@dataclass
class BatchEvent:
    """Something that happened to a job: ``start``, ``progress``, ``done``, ``failed``, ``skipped``,
    ``not_run`` or ``waiting`` (for RAM or disk)."""

    kind: str
    job: Job
    message: str = ""
    done: int = 0
    total: int = 0


@dataclass
class BatchResult:
    """The outcome of a batch."""

    plan: BatchPlan
    started: float
    finished: float

    @property
    def jobs(self) -> list[Job]:
        return self.plan.jobs

    def count(self, status: str) -> int:
        return sum(1 for j in self.jobs if j.status == status)

    @property
    def ok(self) -> bool:
        return all(j.status in ("done", "skipped") for j in self.jobs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool_version": __version__,
            "started": self.started,
            "finished": self.finished,
            "seconds": round(self.finished - self.started, 3),
            "ok": self.ok,
            "counts": {s: self.count(s) for s in ("done", "skipped", "failed", "not_run")},
            "plan": self.plan.to_dict(),
            "jobs": [j.to_dict() for j in self.jobs],
        }


EventFn = Callable[[BatchEvent], None]


def _staging(output: Path) -> Path:
    return output.with_name(f".{output.name}{_PARTIAL_TAG}{uuid.uuid4().hex[:8]}")


def clean_stale(output: Path) -> list[Path]:
    """Remove leftovers of killed runs for one output: ``.<name>.batch-*`` (and convert()'s
    ``..<name>.batch-*.partial-*`` inside them) and ``.<name>.old-*``. Returns what was removed."""
    parent = output.parent
    if not parent.is_dir():
        return []
    esc = glob.escape(output.name)
    removed = []
    for pat in (f".{esc}{_PARTIAL_TAG}*", f"..{esc}{_PARTIAL_TAG}*", f".{esc}.old-*"):
        for p in parent.glob(pat):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def _batch_lock(out_dir: Path) -> Iterator[int]:
    """Exclusive lock while cleaning up, then shared while running (workers share it too)."""
    fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BatchError("another batch is writing to this output folder", path=out_dir,
                                     hint="Wait for it to finish, or use another --output-dir.") from None
                time.sleep(0.2)
        yield fd
    finally:
        os.close(fd)


def _set_pdeathsig() -> None:
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _worker_main(conn: Any, lock_path: str) -> None:
    """Worker process: convert jobs sent over ``conn`` until it gets None."""
    _set_pdeathsig()
    signal.signal(signal.SIGTERM, _interrupt)
    lock_fd = os.open(lock_path, os.O_RDWR)
    fcntl.flock(lock_fd, fcntl.LOCK_SH)
    if os.getppid() == 1:  # the batch died before we set PDEATHSIG
        return
    try:
        while True:
            try:
                spec = conn.recv()
            except (EOFError, KeyboardInterrupt):
                return
            if spec is None:
                return
            _worker_job(conn, spec)
    except KeyboardInterrupt:
        return
    finally:
        os.close(lock_fd)


def _worker_job(conn: Any, spec: dict[str, Any]) -> None:
    import resource

    from vllm_consolidate.convert import ConvertOptions, convert
    from vllm_consolidate.plan.shards import DTYPES_BY_NAME
    from vllm_consolidate.write.publish import publish

    staging = Path(spec["staging"])
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or done == total:
            last[0] = now
            conn.send(("progress", spec["id"], done, total))

    try:
        opts = ConvertOptions(
            input=Path(spec["input"]), output=staging, input_type=spec["input_type"],
            checkpoint_dir=Path(spec["checkpoint"]) if spec["checkpoint"] else None,
            base_model_name=spec["base_model_name"], dtype=DTYPES_BY_NAME[spec["dtype"]],
            keep_original_precision=spec["keep_original_precision"], fmt=spec["fmt"],
            max_shard_size=spec["max_shard_size"], force=True, validate=spec["validate"], progress=progress,
        )
        result = convert(opts).to_dict()
        result["output"] = spec["output"]
        if os.environ.get(TEST_DELAY_ENV):  # tests only: widen the window in which a job is unpublished
            time.sleep(float(os.environ[TEST_DELAY_ENV]))
        write_manifest(staging, spec["manifest"], result)
        publish(staging, Path(spec["output"]), force=True)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        conn.send(("done", spec["id"], {"result": result, "peak_rss": rss}))
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, KeyboardInterrupt):
            raise
        conn.send(("failed", spec["id"], _error_info(exc, spec.get("debug", False))))


class _Worker:
    def __init__(self, ctx: Any, lock_path: Path):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, str(lock_path)), daemon=True,
                                name="vllm-consolidate-worker")
        self.proc.start()
        child.close()
        self.job: Job | None = None

    def send(self, job_spec: dict[str, Any] | None) -> None:
        self.conn.send(job_spec)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError, ValueError):
                self.conn.send(None)
            self.proc.join(timeout)
        self.kill()

    def kill(self, timeout: float = 10.0) -> None:
        if self.proc.is_alive():
            self.proc.terminate()  # SIGTERM: the worker removes its staging folder
            self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        with contextlib.suppress(OSError):
            self.conn.close()


class _Scheduler:
    """Admits jobs against RAM and disk budgets (see the module docstring)."""

    def __init__(self, plan: BatchPlan):
        self.max_workers = plan.options.max_workers
        self.margin = plan.ram_margin
        self.ram_budget = plan.ram_available - plan.ram_margin
        self.disk_budget = (plan.disk_free - DISK_MARGIN) if plan.disk_free is not None else None
        self.ram_used = 0
        self.disk_used = 0

    def check(self, job: Job, running: int) -> str:
        """``"go"``, ``"wait"`` or ``"never"`` (disk)."""
        if running >= self.max_workers:
            return "wait"
        if self.disk_budget is not None and self.disk_used + job.est_disk_bytes > self.disk_budget:
            return "never" if running == 0 else "wait"
        if running == 0:
            return "go"
        if self.ram_used + job.est_peak_ram > self.ram_budget:
            return "wait"
        if mem_available() - self.margin < job.est_peak_ram:
            return "wait"
        return "go"

    def take(self, job: Job) -> None:
        self.ram_used += job.est_peak_ram
        self.disk_used += job.est_disk_bytes

    def release(self, job: Job, ok: bool) -> None:
        self.ram_used -= job.est_peak_ram
        self.disk_used -= job.est_disk_bytes if not ok else job.existing_bytes


def _job_spec(job: Job, opts: BatchOptions) -> dict[str, Any]:
    return {
        "id": job.id, "input": str(job.input), "checkpoint": str(job.checkpoint) if job.checkpoint else None,
        "output": str(job.output), "staging": str(_staging(job.output)), "input_type": opts.input_type,
        "base_model_name": opts.base_model_name, "dtype": opts.dtype,
        "keep_original_precision": opts.keep_original_precision, "fmt": opts.fmt,
        "max_shard_size": opts.max_shard_size, "validate": opts.validate, "debug": opts.debug,
        "manifest": {
            "source": {"input": str(job.input), "checkpoint": str((job.checkpoint or job.input).absolute()),
                       "checkpoint_name": job.checkpoint_name, "step": job.step, **job.detected},
            "source_files": job.sources,
            "options": opts.content_options(),
        },
    }


def run_batch(plan: BatchPlan, on_event: EventFn | None = None) -> BatchResult:
    """Run a plan's jobs (see the module docstring for scheduling, failure policy and cleanup).

    Args:
        plan: From :func:`plan_batch`; jobs are updated in place.
        on_event: Called in this process for every :class:`BatchEvent`.

    Returns:
        The result; ``result.ok`` is False when a job failed or did not run.
    """
    import multiprocessing
    from multiprocessing.connection import wait

    opts = plan.options
    emit = on_event or (lambda e: None)
    started = time.time()
    for j in plan.jobs:
        if j.action == "skip":
            j.status = "skipped"
            emit(BatchEvent("skipped", j, j.reason))
        elif j.action in ("blocked", "error"):
            j.status = "failed"
            emit(BatchEvent("failed", j, (j.error or {}).get("message", "")))
    pending = list(plan.to_run)
    stop = bool(plan.problems) and not opts.continue_on_error
    if not pending or stop:
        for j in pending:
            j.status = "not_run"
            emit(BatchEvent("not_run", j))
        return BatchResult(plan, started, time.time())

    out_dir = Path(opts.output_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    sched = _Scheduler(plan)
    workers: list[_Worker] = []
    with _batch_lock(out_dir) as lock_fd:
        for j in plan.jobs:
            clean_stale(j.output)
        fcntl.flock(lock_fd, fcntl.LOCK_SH)
        specs: dict[int, dict[str, Any]] = {}
        running: dict[int, _Worker] = {}
        waiting_note: set[int] = set()
        try:
            while pending or running:
                while pending and not stop:
                    job = pending[0]
                    verdict = sched.check(job, len(running))
                    if verdict == "wait":
                        if job.id not in waiting_note and len(running) < opts.max_workers:
                            waiting_note.add(job.id)
                            emit(BatchEvent("waiting", job, "waiting for RAM or disk"))
                        break
                    pending.pop(0)
                    if verdict == "never":
                        job.status = "failed"
                        job.error = {"type": "InsufficientDiskError", "path": str(out_dir),
                                     "message": f"not enough disk space: the output needs about "
                                                f"{job.est_disk_bytes / 1e9:.2f} GB, "
                                                f"{((sched.disk_budget or 0) - sched.disk_used) / 1e9:.2f} GB "
                                                "are left for this batch"}
                        emit(BatchEvent("failed", job, job.error["message"]))
                        stop = stop or not opts.continue_on_error
                        continue
                    worker = next((w for w in workers if w.job is None and w.proc.is_alive()), None)
                    if worker is None:
                        worker = _Worker(ctx, out_dir / LOCK_NAME)
                        workers.append(worker)
                    spec = _job_spec(job, opts)
                    specs[job.id] = spec
                    sched.take(job)
                    worker.job = job
                    job.status, job.started = "running", time.time()
                    worker.send(spec)
                    running[job.id] = worker
                    emit(BatchEvent("start", job))
                if not running:
                    break
                conns = {w.conn: w for w in running.values()}
                sentinels = {w.proc.sentinel: w for w in running.values()}
                ready = wait(list(conns) + list(sentinels), timeout=1.0)
                for r in ready:
                    w = conns.get(r) or sentinels.get(r)
                    if w is None or w.job is None:
                        continue
                    job = w.job
                    msg = None
                    if r in conns:
                        try:
                            msg = w.conn.recv()
                        except (EOFError, OSError):
                            msg = None
                    elif w.conn.poll():
                        continue  # read its message first
                    if msg is not None and msg[0] == "progress":
                        emit(BatchEvent("progress", job, done=msg[2], total=msg[3]))
                        continue
                    job.finished = time.time()
                    job.seconds = job.finished - (job.started or job.finished)
                    w.job = None
                    del running[job.id]
                    if msg is not None and msg[0] == "done":
                        job.status, job.result, job.peak_rss = "done", msg[2]["result"], msg[2]["peak_rss"]
                        sched.release(job, True)
                        emit(BatchEvent("done", job))
                        continue
                    if msg is not None and msg[0] == "failed":
                        job.error = msg[2]
                    else:
                        w.proc.join(5)
                        code = w.proc.exitcode
                        hint = " (killed: out of memory?)" if code == -signal.SIGKILL else ""
                        job.error = {"type": "WorkerDied", "message": f"the worker process exited with {code}{hint}"}
                        shutil.rmtree(specs[job.id]["staging"], ignore_errors=True)
                        w.kill()
                    job.status = "failed"
                    sched.release(job, False)
                    emit(BatchEvent("failed", job, job.error.get("message", "")))
                    if not opts.continue_on_error:
                        stop = True
            for j in pending:
                j.status = "not_run"
                emit(BatchEvent("not_run", j))
        except BaseException:
            for w in workers:
                w.kill()
            for jid, w in list(running.items()):
                shutil.rmtree(specs[jid]["staging"], ignore_errors=True)
                if w.job is not None:
                    w.job.status = "not_run"
            for j in pending:
                j.status = "not_run"
            raise
        finally:
            for w in workers:
                w.stop()
    return BatchResult(plan, started, time.time())


def run(opts: BatchOptions, on_event: EventFn | None = None) -> tuple[BatchPlan, BatchResult | None]:
    """Plan, then run unless ``opts.dry_run``."""
    plan = plan_batch(opts)
    if opts.dry_run:
        return plan, None
    return plan, run_batch(plan, on_event)
