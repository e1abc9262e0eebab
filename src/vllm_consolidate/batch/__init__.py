"""Batch consolidation: plan many conversions, run them in worker processes, resume where a batch stopped.

This package never prints; it reports through the ``on_event`` callback and its return values. The
CLI (:mod:`vllm_consolidate.cli.batch`) does the printing. The flow, one module per step:

* :mod:`.inputs`: the inputs (``--input-dir``/``--input-pattern``/``--input-list``), the checkpoints
  chosen from each, and the output names (``--naming-template``);
* :mod:`.manifest`: the manifest every output holds, and whether an existing output is up to date;
* :mod:`.resources`: what a job needs and the machine has, and the scheduler that admits jobs;
* :mod:`.plan`: :class:`BatchOptions` and :func:`plan_batch`, the jobs and what each will do;
* :mod:`.worker`: the worker processes that convert and publish the jobs;
* :mod:`.executor`: where the jobs run: the scheduling loop, its events, and the local worker processes;
* :mod:`.run`: :func:`run_batch` (the output's lock and cleanup around the loop) and its :class:`BatchResult`;
* :mod:`.states`: the words they report in (actions, statuses, event kinds, admission decisions).

Each module's docstring holds the rules of its step.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_consolidate.batch.inputs import (
        DEFAULT_TEMPLATE,
        MAX_BRACE_EXPANSIONS,
        TEMPLATE_FIELDS,
        Checkpoint,
        InputFolder,
        collect_inputs,
        expand_braces,
        glob_folders,
        inspect_input,
        match_any,
        name_fields,
        render_name,
        select_checkpoints,
        template_fields,
    )
    from vllm_consolidate.batch.manifest import MANIFEST_NAME, output_state, read_manifest, sha256_file
    from vllm_consolidate.batch.plan import BatchOptions, BatchPlan, Job, plan_batch
    from vllm_consolidate.batch.resources import Scheduler
    from vllm_consolidate.batch.run import LOCK_NAME, BatchEvent, BatchResult, EventFn, clean_stale, run_batch
    from vllm_consolidate.batch.states import Action, Admission, EventKind, Status
    from vllm_consolidate.batch.worker import TEST_DELAY_ENV
    from vllm_consolidate.units import GIB

# Each name is imported from its step's module on first use (PEP 562): ``inspect`` needs only .inputs
# and .resources, and must not pay for the runner's modules (and multiprocessing) at start-up.
_SOURCES = {
    "inputs": ("DEFAULT_TEMPLATE", "MAX_BRACE_EXPANSIONS", "TEMPLATE_FIELDS", "Checkpoint", "InputFolder",
               "collect_inputs", "expand_braces", "glob_folders", "inspect_input", "match_any", "name_fields",
               "render_name", "select_checkpoints", "template_fields"),
    "manifest": ("MANIFEST_NAME", "output_state", "read_manifest", "sha256_file"),
    "plan": ("BatchOptions", "BatchPlan", "Job", "plan_batch"),
    "resources": ("Scheduler",),
    "run": ("LOCK_NAME", "BatchEvent", "BatchResult", "EventFn", "clean_stale", "run_batch"),
    "states": ("Action", "Admission", "EventKind", "Status"),
    "worker": ("TEST_DELAY_ENV",),
}
_MODULE_OF = {name: f"vllm_consolidate.batch.{module}" for module, names in _SOURCES.items() for name in names}
_MODULE_OF["GIB"] = "vllm_consolidate.units"


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "DEFAULT_TEMPLATE", "GIB", "LOCK_NAME", "MANIFEST_NAME", "MAX_BRACE_EXPANSIONS", "TEMPLATE_FIELDS",
    "TEST_DELAY_ENV", "Action", "Admission", "BatchEvent", "BatchOptions", "BatchPlan", "BatchResult", "Checkpoint",
    "EventFn", "EventKind", "InputFolder", "Job", "Scheduler", "Status", "clean_stale", "collect_inputs",
    "expand_braces", "glob_folders", "inspect_input", "match_any", "name_fields", "output_state", "plan_batch",
    "read_manifest", "render_name", "run_batch", "select_checkpoints", "sha256_file", "template_fields",
]
