"""Planning a batch: the jobs, what each will do with its output, and what each needs.

Everything here reads metadata only. Two jobs that would write the same output folder are an error
before any work starts; per-job problems (an unreadable checkpoint, a blocked output) are recorded in
the job's ``action`` and ``error`` instead.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_consolidate.batch.inputs import (
    DEFAULT_TEMPLATE,
    STAGING_NAME_OVERHEAD,
    InputFolder,
    collect_inputs,
    expand_braces,
    name_fields,
    render_name,
    select_checkpoints,
    template_fields,
)
from vllm_consolidate.batch.manifest import content_options, output_state, source_fingerprint
from vllm_consolidate.batch.resources import (
    Scheduler,
    disk_free,
    estimate_disk,
    estimate_output_bytes,
    estimate_peak_ram,
    mem_available,
    ram_margin,
)
from vllm_consolidate.batch.states import Action, Status
from vllm_consolidate.convert import ConvertOptions, plan_conversion
from vllm_consolidate.errors import (
    BatchError,
    InputNotFoundError,
    OutputExistsError,
    UsageError,
    error_record,
)
from vllm_consolidate.read.zero_locate import confine_chosen
from vllm_consolidate.units import few
from vllm_consolidate.write.publish import check_output_path, is_ours


def _batch_model_defaults() -> ConvertOptions:
    # A library batch looks for config/tokenizer in the checkpoints only unless told otherwise; the CLI
    # passes its own --base-model-name default.
    return ConvertOptions(base_model_name=None)


@dataclass(frozen=True)
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
        verify_checksums: Rehash outputs when deciding whether they are up to date.
        debug: Include tracebacks in job errors.
        model: The single-conversion options every job uses (its paths are ignored: each job gets its
            own). ``model.force`` redoes up-to-date outputs and replaces outputs that are not ours.
    """

    output_dir: Path
    input_dir: Path | None = None
    input_pattern: str | None = None
    input_list: Path | None = None
    all_checkpoints: bool = False
    checkpoint_filter: Sequence[str] | None = None
    max_workers: int = 4
    naming_template: str = DEFAULT_TEMPLATE
    dry_run: bool = False
    continue_on_error: bool = False
    verify_checksums: bool = False
    debug: bool = False
    model: ConvertOptions = field(default_factory=_batch_model_defaults)

    def __post_init__(self) -> None:
        if self.checkpoint_filter is not None:  # a tuple, so the frozen record cannot change under a run
            object.__setattr__(self, "checkpoint_filter", tuple(self.checkpoint_filter))

    def job_options(self, *, input: Path, output: Path, checkpoint_dir: Path | None) -> ConvertOptions:
        """The options record of one job: :attr:`model` with the job's paths."""
        return dataclasses.replace(self.model, input=input, output=output, checkpoint_dir=checkpoint_dir)


@dataclass
class Job:
    """One conversion of a batch, planned from metadata.

    ``action`` is set by the plan (an :class:`~vllm_consolidate.batch.states.Action`), ``status`` by
    the run (a :class:`~vllm_consolidate.batch.states.Status`).
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
    action: Action = Action.CONVERT
    reason: str = ""
    status: Status = Status.PENDING
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


def job_error(exc: BaseException, *, debug: bool = False) -> dict[str, Any]:
    """A job's ``error`` record: :func:`~vllm_consolidate.errors.error_record`'s fields, as reports name them.

    Reports have always called the text ``message`` (the job's ``status`` says it failed), so the
    record's ``error`` is renamed and its ``status`` left out; ``debug`` adds the traceback.
    """
    record = error_record(exc)
    info: dict[str, Any] = {"type": record["type"], "message": record["error"], "path": record["path"],
                            "hint": record["hint"]}
    if debug:
        info["traceback"] = "".join(traceback.format_exception(exc))
    return info


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
        return [j for j in self.jobs if j.action in (Action.CONVERT, Action.REPLACE)]

    @property
    def problems(self) -> list[Job]:
        return [j for j in self.jobs if j.action in (Action.BLOCKED, Action.ERROR)]

    def scheduler(self) -> Scheduler:
        """A fresh scheduler for this plan's budgets."""
        return Scheduler(self.options.max_workers, self.ram_available, self.ram_margin, self.disk_free)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ram_available_bytes": self.ram_available,
            "ram_margin_bytes": self.ram_margin,
            "disk_free_bytes": self.disk_free,
            "notes": self.notes,
        }


def plan_batch(opts: BatchOptions) -> BatchPlan:
    """Collect inputs, select checkpoints, name outputs, estimate needs and classify existing outputs.

    Per-job problems (unreadable checkpoint, output blocked) are recorded in the job's ``action``
    (``error``/``blocked``) rather than raised.

    Raises:
        UsageError: Bad template or options.
        InputNotFoundError: The inputs yield nothing.
        BatchError: Two jobs would write the same output, or nothing is selected.
        OutputNotWritableError: An output's path would be too long for the file system.
    """
    if opts.max_workers < 1:
        raise UsageError("--max-workers must be at least 1")
    template_fields(opts.naming_template)
    out_dir = Path(opts.output_dir).absolute()
    jobs, notes = _select_jobs(collect_inputs(opts.input_dir, opts.input_pattern, opts.input_list), opts, out_dir)
    notes += _unmatched_filters(opts.checkpoint_filter or (), jobs)
    if not jobs:
        raise BatchError("nothing selected")
    _refuse_shared_outputs(jobs)
    # Before any job looks at its output: a path the kernel refuses (ENAMETOOLONG) is one error, not one per job.
    longest = max((j.output for j in jobs if j.action != Action.ERROR), key=lambda p: len(os.fsencode(p)), default=None)
    if longest is not None:
        check_output_path(longest, STAGING_NAME_OVERHEAD, what="--output-dir")
    for j in jobs:
        if j.action != Action.ERROR:
            _classify(j, opts)
    return BatchPlan(opts, jobs, mem_available(), ram_margin(), disk_free(out_dir), notes)


def _select_jobs(inputs: list[InputFolder], opts: BatchOptions, out_dir: Path) -> tuple[list[Job], list[str]]:
    """One job per selected checkpoint (or one ``error`` job per input with none), and notes on ignored inputs."""
    jobs: list[Job] = []
    notes: list[str] = []

    def failed(inp_path: Path, exc: Exception) -> None:
        jobs.append(Job(len(jobs), inp_path, None, "-", None, out_dir / "-", action=Action.ERROR,
                        error=job_error(exc)))

    for inp in inputs:
        inp_path = inp.path.absolute()
        if inp_path == out_dir or out_dir in inp_path.parents:
            notes.append(f"ignored {inp.path}: it is inside --output-dir (an earlier batch's output)")
            continue
        if inp.kind is None:
            failed(inp_path, InputNotFoundError(f"nothing to convert: {inp.error}", path=inp_path))
            continue
        chosen = select_checkpoints(inp, opts.all_checkpoints, opts.checkpoint_filter)
        if not chosen:
            wanted = " ".join(opts.checkpoint_filter or [])
            have = few([c.name for c in inp.checkpoints], sort=False) or "none"
            failed(inp_path, BatchError(f"no checkpoint matches --checkpoint-filter {wanted} (has {have})",
                                        path=inp_path))
            continue
        for ck in chosen:
            fields = name_fields(inp, ck)
            name = render_name(opts.naming_template, fields)
            jobs.append(Job(len(jobs), inp_path, ck.path.absolute(), ck.name, ck.step, out_dir / name, fields))
    return jobs, notes


def _unmatched_filters(patterns: Sequence[str], jobs: list[Job]) -> list[str]:
    """Notes for the literal checkpoint names a filter asked for that no input has (a typo, or not saved yet)."""
    return [f"--checkpoint-filter: no input has {literal}" for pat in patterns for literal in expand_braces(pat)
            if not any(ch in literal for ch in "*?[") and not any(j.checkpoint_name == literal for j in jobs)]


def _refuse_shared_outputs(jobs: list[Job]) -> None:
    """Raise when two jobs would write the same output folder.

    Raises:
        BatchError: With the first such folder and its jobs.
    """
    by_output: dict[Path, list[Job]] = {}
    for j in jobs:
        if j.action != Action.ERROR:
            by_output.setdefault(j.output, []).append(j)
    clashes = {out: js for out, js in by_output.items() if len(js) > 1}
    if clashes:
        out, js = next(iter(clashes.items()))
        raise BatchError(
            f"{len(clashes)} output folder(s) would be written by more than one job, e.g. {out.name}: "
            f"{few([j.label for j in js], sort=False)}",
            path=out,
            hint="Make --naming-template tell them apart, e.g. '{run_name}_{input_name}_step_{step}'.",
        )


def _classify(job: Job, opts: BatchOptions) -> None:
    """Estimate a job and decide its action from the state of its output."""
    if job.output == job.input or job.input in job.output.parents or job.output in job.input.parents:
        job.action = Action.ERROR
        job.error = job_error(UsageError("the output folder would be the input, inside it, or hold it",
                                         path=job.output))
        return
    try:
        _estimate(job, opts)
    except Exception as exc:  # noqa: BLE001 - recorded per job
        job.action, job.error = Action.ERROR, job_error(exc, debug=opts.debug)
        return
    state, reason = output_state(job.output, job.checkpoint or job.input, job.sources, content_options(opts.model),
                                 opts.verify_checksums)
    force = opts.model.force
    if state == "current":
        job.action, job.reason = (Action.REPLACE, "up to date; --force") if force else (Action.SKIP, "up to date")
    elif state == "stale":
        job.action, job.reason = Action.REPLACE, f"stale: {reason}"
    elif state == "foreign" and force and is_ours(job.output):
        job.action, job.reason = Action.REPLACE, f"--force: {reason}"
    elif state == "foreign":
        job.action, job.reason = Action.BLOCKED, reason
        ours = is_ours(job.output)
        job.error = job_error(OutputExistsError(
            f"output exists and is not this job's to replace: {reason}", path=job.output,
            hint="Pass --force to replace it, or choose another --output-dir/--naming-template." if ours else
            "--force replaces only folders vllm-consolidate wrote; remove it yourself or choose another output."))
    if job.action == Action.REPLACE and job.output.exists():
        job.existing_bytes = sum(p.stat().st_size for p in job.output.rglob("*") if p.is_file())


def _estimate(job: Job, opts: BatchOptions) -> None:
    """Fill in a job's detected type, size and memory estimates and source fingerprint (metadata only)."""
    if job.checkpoint is not None and job.checkpoint != job.input:
        confine_chosen(job.checkpoint, job.input)  # we chose it inside the input: it must not lead elsewhere
    conv = plan_conversion(opts.job_options(input=job.input, output=job.output, checkpoint_dir=job.checkpoint))
    detected, source, assets, plan = conv.detected, conv.source, conv.assets, conv.plan
    asset_files = [p for p in (assets.config, assets.generation_config, *assets.tokenizer_files) if p is not None]
    job.detected = {k: source.info.get(k) for k in ("type", "stage", "world_size", "tag", "trained_dtype")}
    job.detected["weights_dir"] = str(detected.weights_dir)
    job.est_output_bytes = estimate_output_bytes(plan.total_size, sum(p.stat().st_size for p in asset_files))
    job.est_disk_bytes = estimate_disk(job.est_output_bytes)
    job.est_peak_ram = estimate_peak_ram(plan)
    job.sources = source_fingerprint(detected.weights_dir, [Path(f) for f in source.source_files] + asset_files)


__all__ = ["BatchOptions", "BatchPlan", "Job", "job_error", "plan_batch"]
