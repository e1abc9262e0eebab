"""A batch's inputs, the checkpoints chosen from each, and the names of their outputs.

Inputs
------
``--input-dir DIR``: if DIR itself is convertible (a run with ``checkpoint-N`` children, a folder with
``latest``/``global_stepN``, a ``checkpoint-N``/``global_stepN`` folder, a folder of numbered DCP saves
(``step-N``...), a verl run with ``global_step_N/actor``, a DCP or verl save, or an HF model folder) it is
the one input. Otherwise its children that are convertible are the inputs; if none is, its
grandchildren (so ``--input-dir experiments`` finds ``experiments/ft_runs_*/qwen2.5-7b``).
``--input-pattern GLOB``: every matching folder is an input (``*``, ``?``, ``[..]``, ``**`` and brace
lists ``{a,b}`` are expanded). ``--input-list FILE``: one folder per line; blank lines and lines
starting with ``#`` are ignored; relative paths are relative to the current directory.

Checkpoint selection
--------------------
Per input, by default the latest checkpoint: the highest ``checkpoint-N``; for a DeepSpeed save
folder the tag in ``latest`` (else the highest ``global_stepN``); for a verl run the step in
``latest_checkpointed_iteration.txt`` (else the highest ``global_step_N``); for numbered DCP saves the
highest number; a checkpoint or HF model folder is
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

A job writes into the staging folder ``.<name>.batch-XXXXXXXX`` (:func:`staging_path`) beside its
output and renames it into place when complete, so a name must leave room for that prefix and suffix.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import string
import uuid
from collections.abc import Sequence
from pathlib import Path

from vllm_consolidate.errors import InputNotFoundError, UsageError
from vllm_consolidate.read.runs import InputFolder, inputs_in, inspect_input
from vllm_consolidate.read.steps import Checkpoint, step_of
from vllm_consolidate.safe_io import MAX_LIST_BYTES, read_text
from vllm_consolidate.storage.urls import is_object_url
from vllm_consolidate.write.publish import NAME_MAX, TEMP_NAME_OVERHEAD

DEFAULT_TEMPLATE = "{input_name}_step_{step}"
TEMPLATE_FIELDS = ("input_name", "run_name", "step", "checkpoint_name")
#: The most folder names one brace pattern may expand to (``{1..20000000}`` must not run for minutes).
MAX_BRACE_EXPANSIONS = 10_000
#: The deepest brace nesting a pattern may have (real ones nest once or twice).
MAX_BRACE_DEPTH = 32
#: Marks a job's staging folder, ``.<name>.batch-XXXXXXXX``; leftovers of killed runs are found by it.
STAGING_TAG = ".batch-"
_STAGING_ID_LEN = 8
#: What the longest temporary name adds to an output's name: the staging folder (.<name>.batch-XXXXXXXX)
#: has convert's own temporary sibling, which adds more.
STAGING_NAME_OVERHEAD = 1 + len(STAGING_TAG) + _STAGING_ID_LEN + TEMP_NAME_OVERHEAD + 1

# ------------------------------------------------------------------------------------------------
# Brace expansion and globbing


def _brace_depth(pattern: str) -> int:
    """How deep unescaped ``{`` nest in ``pattern`` (an unclosed one counts as open to the end)."""
    depth = deepest = 0
    escaped = False
    for ch in pattern:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == "}" and depth:
            depth -= 1
    return deepest


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces as bash does (``a{b,c{d,e}}f``, ``{1..3}``, ``{08..10}``), with ``bracex``.

    Raises:
        UsageError: The pattern nests braces more than :data:`MAX_BRACE_DEPTH` deep, or expands to more
            than :data:`MAX_BRACE_EXPANSIONS` names.
    """
    import bracex  # only batches with patterns need it

    # bracex recurses once per nesting level: thousands of nested braces would raise RecursionError.
    depth = _brace_depth(pattern)
    if depth > MAX_BRACE_DEPTH:
        raise UsageError(f"the pattern {_shown(pattern)} nests braces {depth:,} deep; at most {MAX_BRACE_DEPTH} "
                         "are accepted", hint="Use a flat list such as checkpoint-{100,200}, or a glob.")
    try:
        return bracex.expand(pattern, limit=MAX_BRACE_EXPANSIONS)
    except bracex.ExpansionLimitException:
        raise UsageError(f"the pattern {_shown(pattern)} expands to more than {MAX_BRACE_EXPANSIONS:,} names",
                         hint="Use a shorter range, or a glob such as checkpoint-*.") from None
    except RecursionError:  # a shape deep in bracex's recursion that the depth bound above does not foresee
        raise UsageError(f"the pattern {_shown(pattern)} is too complex to expand",
                         hint="Use a flat list such as checkpoint-{100,200}, or a glob.") from None


def _shown(pattern: str, limit: int = 80) -> str:
    """The pattern as a message quotes it: repr, cut to ``limit`` characters (a hostile one can be megabytes)."""
    return repr(pattern) if len(pattern) <= limit else f"{pattern[:limit]!r}... ({len(pattern):,} characters)"


def glob_folders(pattern: str) -> list[Path]:
    """Folders matching a glob with brace expansion and ``**``, sorted, without duplicates."""
    seen: dict[str, None] = {}
    for pat in expand_braces(pattern):
        for hit in sorted(glob.glob(os.path.expanduser(pat), recursive=True)):
            if os.path.isdir(hit):
                seen.setdefault(os.path.normpath(hit), None)
    return [Path(p) for p in seen]


def match_any(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` matches one of the (brace-expanded) fnmatch patterns."""
    return any(fnmatch.fnmatchcase(name, p) for pat in patterns for p in expand_braces(pat))


# ------------------------------------------------------------------------------------------------
# Inputs and checkpoints (what a folder holds is read.runs's: the listing inspect shows too)


def collect_inputs(input_dir: Path | None = None, input_pattern: str | None = None,
                   input_list: Path | None = None) -> list[InputFolder]:
    """The batch's inputs, from exactly one of the three sources (see the module docstring).

    Raises:
        UsageError: Not exactly one source given, or the list file is unreadable.
        InputNotFoundError: The directory or pattern yields nothing.
    """
    if sum(x is not None for x in (input_dir, input_pattern, input_list)) != 1:
        raise UsageError("give exactly one of --input-dir, --input-pattern and --input-list")
    if input_dir is not None:
        return inputs_in(Path(input_dir))
    if input_pattern is not None:
        return _from_pattern(input_pattern)
    assert input_list is not None
    return _from_list(Path(input_list))


def _from_pattern(pattern: str) -> list[InputFolder]:
    hits = glob_folders(pattern)
    if not hits:
        raise InputNotFoundError(f"no folder matches the pattern {pattern!r}",
                                 hint="Quote the pattern so the shell does not expand it, and check the path.")
    return [inspect_input(p) for p in hits]


def _from_list(input_list: Path) -> list[InputFolder]:
    try:
        lines = read_text(input_list, MAX_LIST_BYTES, what="--input-list", error=UsageError).splitlines()
    except UsageError as exc:
        raise UsageError(f"cannot use --input-list: {exc.message}", path=input_list) from None
    entries = [e for e in (ln.strip() for ln in lines) if e and not e.startswith("#")]
    if not entries:
        raise InputNotFoundError("the input list names no folder", path=input_list)
    remote = next((e for e in entries if is_object_url(e)), None)
    if remote is not None:  # Path() would fold s3://b/x into a local folder s3:/b/x
        raise UsageError(f"--input-list names local folders only, not {remote}", path=input_list,
                         hint="For object storage use --input-dir s3://bucket/prefix or --input-pattern.")
    seen = dict.fromkeys(os.path.normpath(os.path.expanduser(e)) for e in entries)  # first mention wins
    return [inspect_input(Path(p)) for p in seen]


def select_checkpoints(inp: InputFolder, all_checkpoints: bool, filters: Sequence[str] | None) -> list[Checkpoint]:
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
        UsageError: Malformed template, unknown field, or a field with a conversion or format spec.
    """
    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise UsageError(f"bad --naming-template {template!r}: {exc}") from None
    for f, spec, conv in parsed:
        # Every field is a string, so a format spec such as {step:x} or {step:05d} could only fail at run time.
        if spec or conv:
            raise UsageError(f"--naming-template field {{{f}{'!' + conv if conv else ''}{':' + spec if spec else ''}}} "
                             "has a conversion or format spec; fields are plain text",
                             hint="Write the field bare, e.g. {step}.")
        if f not in TEMPLATE_FIELDS:
            raise UsageError(f"unknown field {{{f}}} in --naming-template",
                             hint="Use " + ", ".join("{" + x + "}" for x in TEMPLATE_FIELDS) + ".")
    return [f for f, _, _ in parsed]


def name_fields(inp: InputFolder, ck: Checkpoint) -> dict[str, str]:
    """The template fields of one job."""
    model_dir = (inp.model_dir or inp.path).absolute()
    input_name = model_dir.name if inp.kind == "checkpoint" and step_of(inp.path.name) is not None else \
        inp.path.absolute().name
    return {
        "input_name": input_name,
        "run_name": model_dir.parent.name or model_dir.name,
        "step": str(ck.step) if ck.step is not None else "final",
        "checkpoint_name": ck.name,
    }


def render_name(template: str, fields: dict[str, str]) -> str:
    """Format an output folder name; it must be one plain path component.

    Raises:
        UsageError: The name is empty, hidden, contains a path separator, or is too long for its staging names.
    """
    name = template.format(**fields)
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name or name.startswith("."):
        raise UsageError(f"--naming-template gives {name!r}, which is not a usable folder name",
                         hint="The template must give one non-hidden folder name, without '/'.")
    overhead = STAGING_NAME_OVERHEAD
    if len(name.encode("utf-8", "surrogateescape")) + overhead > NAME_MAX:
        raise UsageError(f"--naming-template gives a {len(name.encode())}-byte name; at most "
                         f"{NAME_MAX - overhead} bytes fit with the temporary names", hint="Use a shorter template.")
    return name


def staging_path(output: Path) -> Path:
    """A fresh staging folder for ``output``: ``.<name>.batch-XXXXXXXX`` beside it."""
    return output.with_name(f".{output.name}{STAGING_TAG}{uuid.uuid4().hex[:_STAGING_ID_LEN]}")


__all__ = ["DEFAULT_TEMPLATE", "MAX_BRACE_DEPTH", "MAX_BRACE_EXPANSIONS", "STAGING_NAME_OVERHEAD", "STAGING_TAG",
           "TEMPLATE_FIELDS", "Checkpoint", "InputFolder", "collect_inputs", "expand_braces", "glob_folders",
           "inspect_input", "match_any", "name_fields", "render_name", "select_checkpoints", "staging_path",
           "template_fields"]
