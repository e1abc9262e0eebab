"""Planning a batch: the jobs, what each will do with its output, and what each needs.

Everything here reads metadata only. Two jobs that would write the same output folder are an error
before any work starts; per-job problems (an unreadable checkpoint, a blocked output) are recorded in
the job's ``action`` and ``error`` instead.
"""

from __future__ import annotations

import contextlib
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
from vllm_consolidate.batch.objects import ObjectOutputs, mirror_inputs, public_path
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
from vllm_consolidate.convert import ConvertOptions, plan_conversion, validation_ranges
from vllm_consolidate.errors import (
    BatchError,
    InputNotFoundError,
    OutputExistsError,
    UsageError,
    error_record,
)
from vllm_consolidate.read.zero_locate import confine_chosen
from vllm_consolidate.storage import remote
from vllm_consolidate.storage.urls import ObjectURL, is_object_url, parse_object_url
from vllm_consolidate.units import few
from vllm_consolidate.write import remote as rpub
from vllm_consolidate.write.publish import check_output_path, is_ours


def _batch_model_defaults() -> ConvertOptions:
    # A library batch looks for config/tokenizer in the checkpoints only unless told otherwise; the CLI
    # passes its own --base-model-name default.
    return ConvertOptions(base_model_name=None)


@dataclass(frozen=True)
class BatchOptions:
    """Everything a batch needs; the CLI flags map one to one.

    Attributes:
        output_dir: Where the output folders go: a local folder or an object-store URL (``s3://bucket/prefix``).
        input_dir: One of ``input_dir``/``input_pattern``/``input_list``; the first two may be object-store URLs.
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

    output_dir: Path | str
    input_dir: Path | str | None = None
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
    the run (a :class:`~vllm_consolidate.batch.states.Status`). With an object-store input, ``input`` and
    ``checkpoint`` are stand-ins in the plan's mirror (reports name their URLs); with an object-store
    ``--output-dir``, ``output`` is an :class:`~vllm_consolidate.storage.urls.ObjectURL`.
    """

    id: int
    input: Path
    checkpoint: Path | None
    checkpoint_name: str
    step: int | None
    output: Path | ObjectURL
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
        return f"{remote.public(str(self.input))} [{self.checkpoint_name}]"

    def to_dict(self) -> dict[str, Any]:
        return remote.public_value({
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
        })


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
    #: The object-store ``--output-dir`` (its manifest and lock), None for a local one.
    objects: ObjectOutputs | None = None
    #: Closes the mirrors of object-store inputs (:meth:`close`).
    resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def close(self) -> None:
        """Remove the mirrors of object-store inputs (temporary stand-ins); call once the batch is over."""
        self.resources.close()

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
    (``error``/``blocked``) rather than raised. An object-store input is listed once into a mirror the plan
    holds until :meth:`BatchPlan.close`; an object-store ``--output-dir`` is judged by its batch manifest
    object and each output's marker and listing (:mod:`~vllm_consolidate.batch.objects`).

    Raises:
        UsageError: Bad template or options (or an object-store ``--output-dir`` inside ``--input-dir``).
        InputNotFoundError: The inputs yield nothing.
        BatchError: Two jobs would write the same output, or nothing is selected.
        OutputNotWritableError: An output's path would be too long for the file system.
        StorageError: The object store could not be listed or read (exit 13).
    """
    if opts.max_workers < 1:
        raise UsageError("--max-workers must be at least 1")
    template_fields(opts.naming_template)
    stack = contextlib.ExitStack()
    try:
        return _plan(opts, stack)
    except BaseException:
        stack.close()
        raise


def _plan(opts: BatchOptions, stack: contextlib.ExitStack) -> BatchPlan:
    objects = None
    if is_object_url(str(opts.output_dir)):
        objects = ObjectOutputs(parse_object_url(str(opts.output_dir)), dict(opts.model.storage_options))
        if opts.input_dir is not None:  # the local batch ignores earlier outputs inside the input; none here
            rpub.check_output_url(objects.url, [str(opts.input_dir)])
    out_dir: Path | ObjectURL = objects.url if objects is not None else Path(opts.output_dir).absolute()
    input_dir, pattern = mirror_inputs(stack, opts.input_dir, opts.input_pattern, dict(opts.model.storage_options))
    jobs, notes = _select_jobs(collect_inputs(input_dir, pattern, opts.input_list), opts, out_dir)
    notes += _unmatched_filters(opts.checkpoint_filter or (), jobs)
    if not jobs:
        raise BatchError("nothing selected")
    _refuse_shared_outputs(jobs)
    # Before any job looks at its output: a path the kernel refuses (ENAMETOOLONG) is one error, not one per job.
    longest = max((j.output for j in jobs if j.action != Action.ERROR and isinstance(j.output, Path)),
                  key=lambda p: len(os.fsencode(p)), default=None)
    if longest is not None:
        check_output_path(longest, STAGING_NAME_OVERHEAD, what="--output-dir")
    for j in jobs:
        if j.action != Action.ERROR:
            _classify(j, opts, objects)
    free = disk_free(out_dir) if isinstance(out_dir, Path) else None  # an object store: no local disk used
    return BatchPlan(opts, jobs, mem_available(), ram_margin(), free, notes, objects, stack)


def _select_jobs(inputs: list[InputFolder], opts: BatchOptions,
                 out_dir: Path | ObjectURL) -> tuple[list[Job], list[str]]:
    """One job per selected checkpoint (or one ``error`` job per input with none), and notes on ignored inputs."""
    jobs: list[Job] = []
    notes: list[str] = []

    def failed(inp_path: Path, exc: Exception) -> None:
        jobs.append(Job(len(jobs), inp_path, None, "-", None, _join(out_dir, "-"), action=Action.ERROR,
                        error=job_error(exc)))

    for inp in inputs:
        inp_path = inp.path.absolute()
        if isinstance(out_dir, Path) and (inp_path == out_dir or out_dir in inp_path.parents):
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
            jobs.append(Job(len(jobs), inp_path, ck.path.absolute(), ck.name, ck.step, _join(out_dir, name), fields))
    return jobs, notes


def _join(out_dir: Path | ObjectURL, name: str) -> Path | ObjectURL:
    return out_dir / name if isinstance(out_dir, Path) else out_dir.child(name)


def _unmatched_filters(patterns: Sequence[str], jobs: list[Job]) -> list[str]:
    """Notes for the literal checkpoint names a filter asked for that no input has (a typo, or not saved yet)."""
    return [f"--checkpoint-filter: no input has {literal}" for pat in patterns for literal in expand_braces(pat)
            if not any(ch in literal for ch in "*?[") and not any(j.checkpoint_name == literal for j in jobs)]


def _refuse_shared_outputs(jobs: list[Job]) -> None:
    """Raise when two jobs would write the same output folder.

    Raises:
        BatchError: With the first such folder and its jobs.
    """
    by_output: dict[Path | ObjectURL, list[Job]] = {}
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


def _classify(job: Job, opts: BatchOptions, objects: ObjectOutputs | None) -> None:
    """Estimate a job and decide its action from the state of its output."""
    try:
        _check_overlap(job)
        _estimate(job, opts)
    except Exception as exc:  # noqa: BLE001 - recorded per job
        job.action, job.error = Action.ERROR, job_error(exc, debug=opts.debug)
        return
    checkpoint = public_path(job.checkpoint or job.input)
    if objects is not None:
        assert isinstance(job.output, ObjectURL)
        state, reason = objects.state(job.output, checkpoint, public_path(job.detected["weights_dir"]), job.sources,
                                      content_options(opts.model))
        ours = objects.is_ours(job.output) if state == "foreign" else False
    else:
        state, reason = output_state(job.output, checkpoint, job.sources, content_options(opts.model),
                                     opts.verify_checksums)
        ours = is_ours(job.output) if state == "foreign" else False
    _decide(job, opts.model.force, state, reason, ours)
    if job.action == Action.REPLACE and isinstance(job.output, Path) and job.output.exists():
        job.existing_bytes = sum(p.stat().st_size for p in job.output.rglob("*") if p.is_file())


def _check_overlap(job: Job) -> None:
    """Raises: UsageError: the output would be the input, inside it, or hold it."""
    if isinstance(job.output, ObjectURL):
        rpub.check_output_url(job.output, [public_path(p) for p in (job.input, job.checkpoint) if p is not None])
    elif job.output == job.input or job.input in job.output.parents or job.output in job.input.parents:
        raise UsageError("the output folder would be the input, inside it, or hold it", path=job.output)


def _decide(job: Job, force: bool, state: str, reason: str, ours: bool) -> None:
    """The job's action from its output's state (see :func:`~vllm_consolidate.batch.manifest.output_state`)."""
    if state == "current":
        job.action, job.reason = (Action.REPLACE, "up to date; --force") if force else (Action.SKIP, "up to date")
    elif state == "stale":
        job.action, job.reason = Action.REPLACE, f"stale: {reason}"
    elif state == "foreign" and force and ours:
        job.action, job.reason = Action.REPLACE, f"--force: {reason}"
    elif state == "foreign":
        job.action, job.reason = Action.BLOCKED, reason
        job.error = job_error(OutputExistsError(
            f"output exists and is not this job's to replace: {reason}", path=job.output,
            hint="Pass --force to replace it, or choose another --output-dir/--naming-template." if ours else
            "--force replaces only folders vllm-consolidate wrote; remove it yourself or choose another output."))


def _estimate(job: Job, opts: BatchOptions) -> None:
    """Fill in a job's detected type, size and memory estimates and source fingerprint (metadata only)."""
    if job.checkpoint is not None and job.checkpoint != job.input:
        confine_chosen(job.checkpoint, job.input)  # we chose it inside the input: it must not lead elsewhere
    output = str(job.output) if isinstance(job.output, ObjectURL) else job.output
    conv = plan_conversion(opts.job_options(input=job.input, output=output, checkpoint_dir=job.checkpoint))
    detected, source, assets, plan = conv.detected, conv.source, conv.assets, conv.plan
    asset_files = [p for p in (assets.config, assets.generation_config, *assets.tokenizer_files) if p is not None]
    job.detected = {k: source.info.get(k) for k in ("type", "stage", "world_size", "tag", "trained_dtype")}
    job.detected["weights_dir"] = str(detected.weights_dir)
    asset_bytes = sum(p.stat().st_size for p in asset_files)
    job.est_output_bytes = estimate_output_bytes(plan.total_size, asset_bytes)
    job.est_disk_bytes = estimate_disk(job.est_output_bytes)
    to_store = isinstance(job.output, ObjectURL)
    kept = sum(end - start for f in plan.files for start, end in validation_ranges(conv, f.filename)) \
        if to_store and opts.model.validate else 0
    job.est_peak_ram = estimate_peak_ram(plan, object_output=to_store, held=asset_bytes, kept=kept)
    job.sources = source_fingerprint(detected.weights_dir, [Path(f) for f in source.source_files] + asset_files)


__all__ = ["BatchOptions", "BatchPlan", "Job", "job_error", "plan_batch"]
