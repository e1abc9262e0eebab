"""A batch of many tiny checkpoints against one ``convert`` call each: walls, CPU and per-job start-up.

Issue 28: per-job start-up must not dominate a batch of small checkpoints. The input is ``--n`` copies
(default 20) of a tiny real DeepSpeed case of the test corpus (``qwen2_z3_w2_bf16_tied``: ZeRO-3, 2 ranks,
4.7 MB), made by ``batch_small.make_runs``. In each repetition, alternating which goes first:

* ``batch``: one ``vllm-consolidate batch --input-dir RUNS --output-dir OUT --max-workers W --json`` (W: 4,
  the batch's default);
* ``separate``: ``--n`` calls of ``vllm-consolidate convert --input RUNS/run_NN --output OUT/run_NN --json``,
  one after the other.

Both with ``--no-validate-vllm``. Recorded per command: wall time (``time.monotonic``, every interpreter
start-up included), the CPU seconds of the children (user + system, from ``getrusage(RUSAGE_CHILDREN)``
deltas: a figure that the other jobs on a shared machine disturb far less than the wall), and the sum of the
jobs' own conversion times (``seconds`` in ``convert --json``, and per job in the batch's ``--json``
report). Per-job start-up is what is not conversion: for ``separate``, (sum of walls - sum of conversion
seconds) / n; for ``batch``, (wall - the span from the first job's start to the last one's end) / n: the
one-time costs (interpreter, planning the batch, spawning the workers, exit) shared by the jobs. Jobs in a
batch run side by side, so the sum of their seconds exceeds the wall.

Usage::

    .venv/bin/python bench/batch_many.py [--reps 3] [--n 20] [--case qwen2_z3_w2_bf16_tied] [--max-workers 4]
        [--out batch_many]

Writes ``bench/results/{--out}.json`` and prints one line per command and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import batch_small  # noqa: E402
import run  # noqa: E402

WORK = batch_small.WORK


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _timed(cmd: list[str]) -> tuple[float, float, dict[str, Any]]:
    """Run ``cmd``; wall seconds, children CPU seconds and its parsed ``--json`` stdout."""
    cpu0, t0 = _cpu(), time.monotonic()
    proc = subprocess.run(cmd, env=run.ENV, capture_output=True, text=True)
    wall, cpu = time.monotonic() - t0, _cpu() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])}: exit {proc.returncode}: {proc.stderr[-1500:]}")
    return wall, cpu, json.loads(proc.stdout)


def run_batch(runs_dir: Path, out: Path, n: int, workers: int) -> dict[str, Any]:
    """One batch over every run."""
    exe = str(run.BIN / "vllm-consolidate")
    wall, cpu, report = _timed([exe, "batch", "--input-dir", str(runs_dir), "--output-dir", str(out),
                                "--max-workers", str(workers), "--no-validate-vllm", "--json"])
    jobs = [j for j in report["jobs"] if j.get("seconds") is not None]
    if len(jobs) != n or not report["ok"]:
        raise SystemExit(f"batch: {len(jobs)} jobs timed, statuses {sorted({j['status'] for j in report['jobs']})}")
    # Start-up is the time during which no job runs: interpreter, planning, spawning workers, and the exit.
    span = max(j["finished"] for j in jobs) - min(j["started"] for j in jobs)
    return {"wall_s": wall, "cpu_s": cpu, "jobs_s": sum(j["seconds"] for j in jobs), "jobs_span_s": span,
            "workers": min(n, workers), "startup_total_s": wall - span, "startup_per_job_s": (wall - span) / n}


def run_separate(runs: list[Path], out: Path) -> dict[str, Any]:
    """One ``convert`` call per run, one after the other."""
    exe = str(run.BIN / "vllm-consolidate")
    walls, cpus, inner = [], [], []
    for r in runs:
        wall, cpu, res = _timed([exe, "convert", "--input", str(r), "--output", str(out / r.name),
                                 "--no-validate-vllm", "--json"])
        walls.append(wall)
        cpus.append(cpu)
        inner.append(res["seconds"])
    return {"wall_s": sum(walls), "cpu_s": sum(cpus), "jobs_s": sum(inner),
            "startup_per_job_s": (sum(walls) - sum(inner)) / len(runs),
            "median_convert_wall_s": statistics.median(walls), "median_convert_cpu_s": statistics.median(cpus)}


def main() -> None:
    """Build the runs, measure, print and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--case", default="qwen2_z3_w2_bf16_tied")
    ap.add_argument("--max-workers", type=int, default=4, help="the batch's --max-workers (its default: 4)")
    ap.add_argument("--out", default="batch_many", help="results file stem under bench/results/")
    args = ap.parse_args()
    runs_ = batch_small.make_runs(args.case, args.n)
    runs_dir = runs_[0].parent
    out_b, out_s = WORK / "out_batch", WORK / "out_separate"
    res: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "case": args.case, "n": args.n,
                           "reps": args.reps, "max_workers": args.max_workers, "batch": [], "separate": []}
    for rep in range(args.reps):
        for kind in (("batch", "separate") if rep % 2 == 0 else ("separate", "batch")):
            out = out_b if kind == "batch" else out_s
            run.clean(out)
            out.mkdir(parents=True)
            load = os.getloadavg()[0]
            rec = run_batch(runs_dir, out, args.n, args.max_workers) if kind == "batch" else run_separate(runs_, out)
            rec.update(rep=rep, load=round(load, 2))
            res[kind].append(rec)
            print(f"rep {rep} {kind:8s} wall {rec['wall_s']:6.2f} s  CPU {rec['cpu_s']:6.2f} s  conversion "
                  f"{rec['jobs_s']:5.2f} s  start-up per job {rec['startup_per_job_s']:.3f} s  load {load:.1f}",
                  flush=True)
            run.clean(out)
    run.clean(WORK)
    summary: dict[str, Any] = {}
    for key in ("wall_s", "cpu_s", "startup_per_job_s"):
        summary[key] = {k: round(statistics.median(r[key] for r in res[k]), 3) for k in ("batch", "separate")}
        summary[f"batch_over_separate_{key}"] = round(statistics.median(
            b[key] / s[key] for b, s in zip(res["batch"], res["separate"])), 3)
    res["summary"] = summary
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    (run.RESULTS / f"{args.out}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
