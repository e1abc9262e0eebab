"""Many small checkpoints: one ``vllm-consolidate batch`` against one ``convert`` per checkpoint.

Issue 28: per-job start-up must not dominate a batch of small checkpoints. The input is 20 copies of a small
real DeepSpeed case of the test corpus (default ``qwen2_z3_w2_bf16_tied``: ZeRO-3, 2 ranks, 0.38M params,
4.6 MB) as 20 runs ``run_00`` .. ``run_19`` (each a folder with ``latest`` and ``global_step2/``, plus
config and tokenizer) under ``.cache/bench-work/batch_small/runs``. Measured, alternating in each rep:

* ``batch``: ``vllm-consolidate batch --input-dir RUNS --output-dir OUT`` (default ``--max-workers``, 4);
* ``convert_x20``: a shell loop of 20 ``vllm-consolidate convert --input RUNS/run_NN --output OUT/run_NN``.

Both with ``--no-validate-vllm`` and, as a second pair, with validation on (the default). Outputs are removed
and ``sync``-ed before each command; the inputs (92 MB) stay in the page cache. Wall time is the
``time.monotonic`` span of the whole command, so it includes every interpreter start-up. The load average is
recorded before each command.

Writes ``bench/results/batch_small.{json,md}``.

Usage::

    .venv/bin/python bench/batch_small.py [--reps 2] [--n 20] [--case qwen2_z3_w2_bf16_tied] [--no-validate-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402

CORPUS = run.REPO / ".cache" / "corpus" / "ds-0.19.8-v1"
WORK = run.WORK / "batch_small"


def make_runs(case: str, n: int) -> list[Path]:
    """``n`` copies of the case's checkpoint folder as runs (copies, so no input is shared between jobs)."""
    src = CORPUS / case / "ckpt"
    runs_dir = WORK / "runs"
    run.clean(runs_dir)
    runs_dir.mkdir(parents=True)
    out = []
    for i in range(n):
        dst = runs_dir / f"run_{i:02d}"
        shutil.copytree(src, dst)
        out.append(dst)
    return out


def main() -> None:
    """Build the runs, measure, write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--case", default="qwen2_z3_w2_bf16_tied")
    ap.add_argument("--no-validate-only", action="store_true", help="skip the pair with validation on")
    args = ap.parse_args()
    runs_ = make_runs(args.case, args.n)
    runs_dir = runs_[0].parent
    out_b, out_s = WORK / "out_batch", WORK / "out_convert"
    exe = str(run.BIN / "vllm-consolidate")
    modes = [("novalidate", ["--no-validate-vllm"])] + ([] if args.no_validate_only else [("validate", [])])
    plan: list[tuple[str, list[str], Path]] = []
    for mode, flag in modes:
        batch = [exe, "batch", "--input-dir", str(runs_dir), "--output-dir", str(out_b), *flag]
        loop = " && ".join(f"{exe} convert --input {r} --output {out_s / r.name} {' '.join(flag)} >/dev/null"
                           for r in runs_)
        plan += [(f"batch_{mode}", batch, out_b), (f"convert_x{args.n}_{mode}", run.sh(f"mkdir -p {out_s} && {loop}"),
                                                   out_s)]
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "case": args.case, "n": args.n,
                               "input_bytes_each": sum(p.stat().st_size for p in runs_[0].rglob("*") if p.is_file()),
                               "reps": args.reps, "runs": {name: [] for name, *_ in plan}}
    for rep in range(args.reps):
        for name, cmd, out in plan:
            rec = run.measure(cmd, [runs_dir], [out])
            rec["rep"] = rep
            done = [p for p in out.iterdir() if not p.name.startswith(".")] if out.is_dir() else []
            rec["outputs"] = len(done)
            results["runs"][name].append(rec)
            print(f"  rep {rep} {name:24s} wall {rec['wall_s']:7.2f}s exit {rec['exit']} outputs {len(done)} "
                  f"load {rec['loadavg_before'][0]:.2f}", flush=True)
            run.clean(out)
    run.clean(WORK)
    med = {k: run.median(v, "wall_s") for k, v in results["runs"].items()}
    results["median_wall_s"] = med
    for mode, _ in modes:
        per = [b["wall_s"] / c["wall_s"] for b, c in zip(results["runs"][f"batch_{mode}"],
                                                         results["runs"][f"convert_x{args.n}_{mode}"])]
        results[f"batch_vs_separate_{mode}"] = round(statistics.median(per), 3)
    results["loadavg_end"] = os.getloadavg()
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    (run.RESULTS / "batch_small.json").write_text(json.dumps(results, indent=2, default=str))
    lines = [f"# {args.n} small checkpoints ({args.case}, {results['input_bytes_each'] / 1e6:.1f} MB each): one batch "
             f"vs {args.n} converts ({results['started']}, {args.reps} reps, median)", "",
             "| command | wall s (per rep) | per checkpoint s | outputs | load (1m) per rep |", "|---|---|---|---|---|"]
    for name, rs in results["runs"].items():
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in rs)
        loads = ", ".join(f"{r['loadavg_before'][0]:.1f}" for r in rs)
        lines.append(f"| {name} | {med[name]:.2f} ({walls}) | {med[name] / args.n:.2f} | {rs[0]['outputs']} "
                     f"| {loads} |")
    lines += [""] + [f"- batch / separate converts ({mode}, paired): {results[f'batch_vs_separate_{mode}']}"
                     for mode, _ in modes]
    (run.RESULTS / "batch_small.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
