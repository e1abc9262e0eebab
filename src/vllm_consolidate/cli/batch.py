"""``vllm-consolidate batch`` and ``batch-consolidate-for-vllm``: the guide's batch script.

Parsing and printing only; planning, scheduling and resume live in :mod:`vllm_consolidate.batch`.
Progress lines go to stderr, the plan/summary table (or ``--json``) to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_consolidate import errors as E
from vllm_consolidate.batch import (
    DEFAULT_TEMPLATE,
    Action,
    BatchEvent,
    BatchOptions,
    BatchPlan,
    BatchResult,
    EventKind,
    Status,
    plan_batch,
    run_batch,
)
from vllm_consolidate.batch.ray_executor import AUTO, RayExecutor, require_ray
from vllm_consolidate.cli import common

DESCRIPTION = "Consolidate many checkpoints or training runs into folders vLLM loads, in parallel and resumably."

EPILOG = """\
naming template fields:
  {input_name}       the input folder's name (for a checkpoint-N input: the folder holding it)
  {run_name}         the name of that folder's parent: ft_runs_X for ./experiments/ft_runs_X/qwen2.5-7b
  {step}             N of checkpoint-N / global_stepN ('final' for an HF model folder)
  {checkpoint_name}  checkpoint-N or global_stepN
  Two jobs writing the same output folder are an error before any work starts.

scheduling:
  Jobs run in up to --max-workers worker processes. Each job's RAM and disk needs are estimated
  from metadata (disk: output bytes + 64 MiB + 1%; RAM: ~450 MB per worker + the writer's buffers,
  256 MiB when a dtype changes). A job starts only if the running jobs' RAM estimates plus its own
  fit in MemAvailable at start minus max(1 GiB, 10% of RAM), MemAvailable now still covers it, and
  every started job's output plus its own fits in the free disk of --output-dir minus 1 GiB.

resume:
  Each output holds .vllm-consolidate.json (sources' sizes and mtimes, options, sha256 of every
  file). Rerunning the same batch skips outputs that are up to date ("skipped (up to date)"),
  redoes stale or interrupted ones (replacing a stale output only when its manifest shows it was
  made by this tool from the same checkpoint) and never leaves half-written folders.
  An object-store --output-dir (s3://bucket/prefix) keeps the same state in one object,
  <prefix>/.vllm-consolidate-batch.json, written by this process only (source ETags, options, each
  output's object sizes and ETags); each output is committed marker last, and one batch at a time
  holds <prefix>/.vllm-consolidate-batch.lock (delete it if a killed batch left it).

on a Ray cluster (--executor ray; pip install 'vllm-consolidate[ray]'):
  Each job is one Ray task declaring its RAM estimate as `memory`, so Ray admits jobs per node;
  --max-workers caps the tasks in flight. Local inputs and --output-dir must be on storage every
  node sees at the same paths; with s3:// (gs://, az://) inputs and --output-dir no shared file
  system is needed (tasks get URLs and --storage-options only). A job whose node dies is retried
  once on another; --report records each job's attempts and nodes. Plan, naming, manifests and
  resume are those of --executor local.

exit status: 0 if every job was done or skipped, 11 if any failed or did not run, 2 for bad usage.
"""



def _batch_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    src = p.add_argument_group("input selection (choose one)")
    one = src.add_mutually_exclusive_group(required=True)
    one.add_argument("--input-dir", type=common.path_or_url,
                     help="a run, checkpoint or HF model folder, or a folder of runs (local, or s3://bucket/prefix, "
                          "gs://…, az://…)")
    one.add_argument("--input-pattern", help="glob for several folders, e.g. './ft_runs_*/qwen2.5-7b' "
                                             "(quote it; {a,b} braces and ** work; s3://bucket/runs/*/m too)")
    one.add_argument("--input-list", type=Path, help="file with one folder per line (# comments, blank lines ignored)")
    p.add_argument("--output-dir", type=common.path_or_url, required=True,
                   help="folder the outputs are written into (or an object-store prefix: s3://bucket/prefix)")
    proc = p.add_argument_group("processing")
    proc.add_argument("--all-checkpoints", action="store_true",
                      help="every checkpoint-N / global_stepN of each input, not only the latest")
    proc.add_argument("--checkpoint-filter", action="append", metavar="PATTERN",
                      help="only checkpoints whose folder name matches, e.g. 'checkpoint-{100,200,300}' "
                           "(glob with braces; repeatable; implies --all-checkpoints)")
    proc.add_argument("--max-workers", type=int, default=4, metavar="N",
                      help="most conversions at once, each in its own process, admitted only while RAM "
                           "and disk estimates fit (default: 4)")
    proc.add_argument("--naming-template", default=DEFAULT_TEMPLATE,
                      help=f"output folder name (default: {DEFAULT_TEMPLATE}); see below")
    ctl = p.add_argument_group("control")
    ctl.add_argument("--dry-run", action="store_true", help="print the plan with size and memory estimates; "
                                                            "write nothing")
    ctl.add_argument("--continue-on-error", action="store_true",
                     help="keep going past failed jobs and list them at the end")
    ctl.add_argument("--verify-checksums", action="store_true",
                     help="when deciding whether an output is up to date, also rehash its files")
    ctl.add_argument("--report", type=Path, metavar="FILE.json", help="write a JSON report of the batch")
    run = p.add_argument_group("where the jobs run")
    run.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="local: worker processes on this machine (default); ray: one Ray task per job on a "
                          "Ray cluster (needs the 'ray' extra)")
    run.add_argument("--ray-address", default=AUTO, metavar="ADDRESS",
                     help="with --executor ray: 'auto' (the cluster this machine is part of; default), 'local' "
                          "(start a one-machine cluster for this batch) or a head node's HOST:PORT")
    model = p.add_argument_group("model options (as for a single conversion, applied to every job)")
    common.add_model_options(model)
    p.set_defaults(func=cmd_batch)
    return p


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``batch`` to ``vllm-consolidate``'s subcommands."""
    p = sub.add_parser("batch", help="consolidate many checkpoints or runs", description=DESCRIPTION,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    return _batch_parser(p)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``batch-consolidate-for-vllm``."""
    return _batch_parser(argparse.ArgumentParser(prog="batch-consolidate-for-vllm", description=DESCRIPTION,
                                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter))


def main(argv: Sequence[str] | None = None) -> int:
    """``batch-consolidate-for-vllm`` and ``python train/batch_consolidate_for_vllm.py``."""
    args = build_parser().parse_args(argv)
    return common.run(args.func, args)


# -- printing -----------------------------------------------------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _rel(path: Path | str) -> str:
    from vllm_consolidate.storage import remote
    from vllm_consolidate.storage.urls import is_object_url

    text = remote.public(str(path))  # an object-store input's stand-in: its URL
    if is_object_url(text):
        return text
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return rel if not rel.startswith("../../..") else str(path)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


_ACTIONS = {Action.CONVERT: "convert", Action.REPLACE: "redo", Action.SKIP: "skip (up to date)",
            Action.BLOCKED: "BLOCKED", Action.ERROR: "ERROR"}


def print_plan(plan: BatchPlan) -> None:
    """The dry-run table: one row per job with what was detected and the estimates."""
    rows = [["input", "type", "stage", "step", "output", "est. size", "est. peak RAM", "action"]]
    for j in plan.jobs:
        d = j.detected
        kind = d.get("type") or "-"
        if d.get("world_size"):
            kind += f" x{d['world_size']}"
        rows.append([
            f"{_rel(j.input)} [{j.checkpoint_name}]", kind, str(d.get("stage") or "-"),
            str(j.step) if j.step is not None else "-", _rel(j.output) if j.action != Action.ERROR else "-",
            _size(j.est_output_bytes) if j.est_output_bytes else "-",
            _size(j.est_peak_ram) if j.est_peak_ram else "-",
            _ACTIONS[j.action] + (f": {j.reason}" if j.reason and j.action == Action.REPLACE else ""),
        ])
    print(_table(rows))
    todo = plan.to_run
    disk = sum(j.est_disk_bytes for j in todo)
    ram_budget = plan.ram_available - plan.ram_margin
    peak = max((j.est_peak_ram for j in todo), default=0)
    fit = max(1, ram_budget // peak) if peak else 0
    print(f"\n{len(todo)} to convert, {sum(j.action == Action.SKIP for j in plan.jobs)} up to date, "
          f"{len(plan.problems)} with problems; outputs need about {_size(disk)}"
          + (f" of {_size(plan.disk_free)} free" if plan.disk_free is not None else ""))
    if todo:
        print(f"RAM: {_size(plan.ram_available)} available - {_size(plan.ram_margin)} margin -> "
              f"up to {min(fit, plan.options.max_workers, len(todo))} job(s) at once "
              f"(--max-workers {plan.options.max_workers})")
    if plan.disk_free is not None and disk > plan.disk_free:
        print("warning: the outputs do not all fit on the disk; the jobs that do not fit will fail")
    for note in plan.notes:
        print(f"note: {note}")
    for j in plan.problems:
        print(f"{_ACTIONS[j.action]}: {j.label}: {(j.error or {}).get('message')}")


class _Printer:
    """Per-job progress lines on stderr."""

    def __init__(self, total: int):
        self.total = total
        self.n = 0
        self.last: dict[int, float] = {}

    def __call__(self, ev: BatchEvent) -> None:
        line = self._line(ev)
        if line is not None:
            print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    def _line(self, ev: BatchEvent) -> str | None:
        j = ev.job
        if ev.kind == EventKind.START:
            where = f" {ev.message}" if ev.message else ""  # --executor ray: the node
            if j.id in self.last:
                return f"retry    {j.output.name}{where}"
            self.n += 1
            self.last[j.id] = time.monotonic()
            return (f"start    [{self.n}/{self.total}] {_rel(j.input)} [{j.checkpoint_name}] -> {_rel(j.output)}"
                    f" (~{_size(j.est_output_bytes)}){where}")
        if ev.kind == EventKind.DONE:
            written = (j.result or {}).get("bytes_written") or 0
            speed = common.rate(written, j.seconds)
            speed = f", {speed}" if speed else ""
            return f"done     {j.output.name} in {j.seconds:.1f} s ({_size(written)}{speed})"
        if ev.kind == EventKind.FAILED:
            return f"FAILED   {j.label}: {ev.message}"
        if ev.kind == EventKind.SKIPPED:
            return f"skipped  {j.output.name} (up to date)"
        if ev.kind == EventKind.WAITING:
            return f"waiting  {j.output.name}: RAM or disk estimates do not fit yet"
        if ev.kind == EventKind.PROGRESS:
            now = time.monotonic()
            if now - self.last.get(j.id, now) < 30 or not ev.total:
                return None  # a line every 30 s per job at most
            self.last[j.id] = now
            return f"...      {j.output.name}: {100 * ev.done / ev.total:.0f}% of {_size(ev.total)}"
        return None


_STATUS = {Status.DONE: "done", Status.SKIPPED: "skipped (up to date)", Status.FAILED: "FAILED",
           Status.NOT_RUN: "not run"}


def print_summary(result: BatchResult) -> None:
    """The final table of done / skipped / failed / not run jobs, with times."""
    rows = [["status", "output", "source", "time", "size", "note"]]
    for j in result.jobs:
        note = ""
        if j.status == Status.FAILED:
            note = (j.error or {}).get("message", "")
        elif j.status == Status.DONE and j.action == Action.REPLACE:
            note = f"replaced ({j.reason})"
        attempts = result.job_info.get(j.id, {}).get("attempts") or 0
        if attempts > 1:
            nodes = result.job_info[j.id].get("nodes") or []
            note = "; ".join(filter(None, [note, f"retried: {attempts} attempts (on {', '.join(nodes)})"]))
        rows.append([_STATUS.get(j.status, j.status), j.output.name if j.checkpoint else "-",
                     f"{_rel(j.input)} [{j.checkpoint_name}]",
                     f"{j.seconds:.1f} s" if j.seconds is not None else "-",
                     _size((j.result or {}).get("bytes_written")) if j.result else "-", note])
    print(_table(rows))
    c = {s: result.count(s) for s in _STATUS}
    print(f"\n{c[Status.DONE]} done, {c[Status.SKIPPED]} skipped (up to date), {c[Status.FAILED]} failed, "
          f"{c[Status.NOT_RUN]} not run in {result.finished - result.started:.1f} s")
    failed = [j for j in result.jobs if j.status == Status.FAILED]
    if failed:
        print("\nfailed jobs:")
        for j in failed:
            err = j.error or {}
            where = f" [{err['path']}]" if err.get("path") else ""
            print(f"  {j.label}: {err.get('type')} (exit {job_exit_code(err)}): {err.get('message')}{where}")
            if err.get("traceback"):
                print("    " + err["traceback"].replace("\n", "\n    "))


def job_exit_code(error: dict[str, Any] | None) -> int | None:
    """The exit code a single ``convert`` would have exited with for a job's error record (None: no error)."""
    if not error:
        return None
    cls = getattr(E, str(error.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        return common.INTERNAL_ERROR
    return next((code for base, code in common.EXIT_CODES if issubclass(cls, base)), common.INTERNAL_ERROR)


def _write_report(path: Path | None, data: dict[str, Any]) -> None:
    for job in data.get("jobs") or ():  # each failed job's error says which exit code it stands for
        if job.get("error"):
            job["error"]["exit_code"] = job_exit_code(job["error"])
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _fail(args: argparse.Namespace, message: str, report: dict[str, Any]) -> int:
    """Finish a batch that did not succeed: the report (and ``--json``) with the error record, an ``error:`` line."""
    err = E.BatchError(message)
    code = common.exit_code(err)
    report.update(ok=False, **E.error_record(err), exit_code=code)
    _write_report(args.report, report)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    print(f"error: {err}", file=sys.stderr)
    return code


def cmd_batch(args: argparse.Namespace) -> int:
    """Plan and run a batch; print progress, the summary and the report.

    SIGTERM handling comes from :func:`~vllm_consolidate.cli.common.run`, the only way commands run.
    """
    opts = BatchOptions(
        output_dir=args.output_dir, input_dir=args.input_dir, input_pattern=args.input_pattern,
        input_list=args.input_list, all_checkpoints=args.all_checkpoints, checkpoint_filter=args.checkpoint_filter,
        max_workers=args.max_workers, naming_template=args.naming_template, dry_run=args.dry_run,
        continue_on_error=args.continue_on_error, verify_checksums=args.verify_checksums, debug=args.debug,
        model=common.model_options(args),
    )
    if args.executor == "ray":
        require_ray()  # before planning: one clear error naming the extra (exit 2)
    return _batch(args, opts)


def _batch(args: argparse.Namespace, opts: BatchOptions) -> int:
    plan = plan_batch(opts)
    try:
        return _planned(args, opts, plan)
    finally:
        plan.close()  # an object-store input's mirror (temporary stand-ins)


def _planned(args: argparse.Namespace, opts: BatchOptions, plan: BatchPlan) -> int:
    if opts.dry_run:
        report = {"dry_run": True, "plan": plan.to_dict(), "jobs": [j.to_dict() for j in plan.jobs]}
        if args.json:
            report["ok"] = not plan.problems
            print(json.dumps(report, indent=2, default=str))
        else:
            print_plan(plan)
        if plan.problems:
            args.json = False  # already printed
            return _fail(args, f"{len(plan.problems)} job(s) cannot run", report)
        report["ok"] = True
        _write_report(args.report, report)
        return 0
    if plan.problems and not opts.continue_on_error and not args.json:
        print_plan(plan)
    executor = RayExecutor(args.ray_address) if args.executor == "ray" else None
    result = run_batch(plan, _Printer(len(plan.to_run)), executor)
    report = result.to_dict()
    if not args.json:
        print_summary(result)
    if not result.ok:
        bad = result.count(Status.FAILED) + result.count(Status.NOT_RUN)
        if plan.problems and not opts.continue_on_error:
            msg = (f"{len(plan.problems)} job(s) cannot run, so nothing was converted "
                   "(--continue-on-error runs the rest)")
        else:
            msg = f"{bad} of {len(result.jobs)} job(s) failed or did not run"
        return _fail(args, msg, report)
    report["exit_code"] = 0
    _write_report(args.report, report)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0
