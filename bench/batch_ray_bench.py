"""The overhead of ``batch --executor ray`` against ``--executor local`` on this machine (issue 17).

The batch: 8 small jobs from the test corpus (``python -m tests.corpus.build`` makes it; cached in
``.cache/corpus``): the HF Trainer runs ``trainer_qwen2_z2_bf16`` and ``trainer_llama_z3_bf16``
(checkpoint-2/4/6 each, ZeRO-2 and ZeRO-3, world size 2) and the raw ZeRO checkpoints
``mistral_z2_w2_fp16_frozen`` and ``qwen2_z3_w2_bf16_tied``; 0.4-0.5 M parameters each, written as fp32
safetensors with ``--no-validate-vllm`` (``--validate`` keeps validation on), so the numbers are mostly
the orchestration's.

Measured, ``--reps`` times each (the modes alternate inside each repetition; outputs deleted first),
medians reported:

* ``local``: ``vllm-consolidate batch --executor local --max-workers 2`` (this machine has 2 cores);
* ``ray_cluster``: ``--executor ray --ray-address HEAD`` against a one-node cluster with 2 CPUs that
  was started once with ``ray start --head`` (in a private temp dir, on free ports) and stays up, as on
  a real cluster; ``--max-workers 8``: every task is submitted and Ray admits 2 at a time;
* ``ray_local``: ``--executor ray --ray-address local``: the driver starts a one-node cluster for the
  batch and stops it after (its start-up is part of the time).

``wall_s``: ``time.monotonic`` around the CLI process (interpreter start-up and imports included);
``batch_s``: the report's ``seconds`` (``run_batch``: connecting to or starting Ray, submitting, the
jobs, collecting; not the interpreter's start-up, imports and planning). The cluster and the drivers
use a private Ray temp dir and token (``RAY_TMPDIR``, ``RAY_AUTH_TOKEN``): nothing is written to
``/tmp/ray`` or ``~/.ray``. The cluster's processes are ended by id at the end.

Writes ``bench/results/batch_ray.json`` and ``bench/results/batch_ray.md``.

Usage::

    python bench/batch_ray_bench.py [--reps 3] [--validate]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.corpus import build  # noqa: E402
from tests.test_batch_ray import end_processes, free_port  # noqa: E402

BIN = Path(sys.executable).parent
RUNS = ["trainer_qwen2_z2_bf16", "trainer_llama_z3_bf16"]  # checkpoint-2/4/6 each
CKPTS = ["mistral_z2_w2_fp16_frozen", "qwen2_z3_w2_bf16_tied"]
JOBS = 3 * len(RUNS) + len(CKPTS)
RESULTS = REPO / "bench" / "results"


@contextlib.contextmanager
def head_node(env: dict[str, str], root: Path) -> Iterator[str]:
    """A one-node Ray cluster (2 CPUs) for the duration; yields its address. Ends its processes by id."""
    ip = "127.0.0.2"  # Ray rewrites 127.0.0.1 to the machine's network address; 127.0.0.2 is loopback too
    port = free_port()
    ports = [free_port() for _ in range(9)]
    args = ["--head", "--port", str(port), "--node-ip-address", ip, "--num-cpus", "2", "--temp-dir", str(root),
            "--include-dashboard", "false", "--dashboard-port", str(ports[0]),
            "--ray-client-server-port", str(ports[1]), "--node-manager-port", str(ports[2]),
            "--object-manager-port", str(ports[3]), "--metrics-export-port", str(ports[4]),
            "--dashboard-agent-listen-port", str(ports[5]), "--dashboard-agent-grpc-port", str(ports[6]),
            "--runtime-env-agent-port", str(ports[7]), "--object-store-memory", str(200 * 1024**2),
            "--disable-usage-stats", "--log-style", "record"]
    proc = subprocess.Popen([str(BIN / "ray"), "start", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    session = proc.pid
    try:
        out = proc.communicate(timeout=120)[0]
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{out[-3000:]}")
        yield f"{ip}:{port}"
    finally:
        _end_session(session)


def _end_session(session: int) -> None:
    """SIGTERM, then SIGKILL, every process of one session and every child of its raylet."""
    import psutil

    procs: dict[int, Any] = {}
    for p in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(p.pid) == session:
                procs[p.pid] = p
                if p.info["name"] == "raylet":
                    procs.update({c.pid: c for c in p.children(recursive=True)})
    end_processes(procs)


def _input_list(path: Path) -> Path:
    folders = [build.case_dir(c) / "run" for c in RUNS] + [build.case_dir(c) / "ckpt" for c in CKPTS]
    missing = [f for f in folders if not f.is_dir()]
    if missing:
        raise SystemExit(f"corpus cases missing ({missing[0]} ...): run `python -m tests.corpus.build` first")
    path.write_text("".join(f"{f}\n" for f in folders))
    return path


def _run(mode: str, argv: list[str], out: Path, report: Path, env: dict[str, str]) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    report.unlink(missing_ok=True)
    subprocess.run(["sync"], check=False)
    t = time.monotonic()
    proc = subprocess.run([str(BIN / "vllm-consolidate"), "batch", *argv, "--output-dir", str(out),
                           "--report", str(report)], capture_output=True, text=True, env=env, timeout=900)
    wall = time.monotonic() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    data = json.loads(report.read_text())
    assert data["counts"]["done"] == JOBS, data["counts"]
    return {"wall_s": round(wall, 3), "batch_s": data["seconds"],
            "job_s_sum": round(sum(j["seconds"] or 0 for j in data["jobs"]), 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--validate", action="store_true", help="keep validation on (default: --no-validate-vllm)")
    ap.add_argument("--out", type=Path, default=RESULTS / "batch_ray")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vc-raybench-", dir="/tmp"))  # short: Ray's socket paths
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_TMPDIR=str(work / "tmp"))
    (work / "tmp").mkdir()
    common = ["--input-list", str(_input_list(work / "runs.txt")), "--all-checkpoints",
              "--naming-template", "{run_name}_{step}"] + ([] if args.validate else ["--no-validate-vllm"])
    runs: dict[str, list[dict[str, Any]]] = {"local": [], "ray_cluster": [], "ray_local": []}
    try:
        with head_node(env, work / "cluster") as address:
            modes = {"local": [*common, "--max-workers", "2"],
                     "ray_cluster": [*common, "--max-workers", "8", "--executor", "ray", "--ray-address", address],
                     "ray_local": [*common, "--max-workers", "8", "--executor", "ray", "--ray-address", "local"]}
            for rep in range(args.reps):
                for mode, mode_argv in modes.items():
                    r = _run(mode, mode_argv, work / f"out_{mode}", work / "report.json", env)
                    runs[mode].append(r)
                    print(f"rep {rep + 1}/{args.reps} {mode:12s} wall {r['wall_s']:6.2f} s  "
                          f"batch {r['batch_s']:6.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _write(args, runs)
    return 0


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key] for r in rows), 2)


def _write(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> None:
    med = {m: {k: _median(rows, k) for k in ("wall_s", "batch_s", "job_s_sum")} for m, rows in runs.items()}
    base = med["local"]["wall_s"]
    for m in med:
        med[m]["overhead_s"] = round(med[m]["wall_s"] - base, 2)
        med[m]["per_job_overhead_s"] = round((med[m]["wall_s"] - base) / JOBS, 2)
    result = {
        "what": f"batch of {JOBS} small jobs: --executor local vs ray (wall, medians of {args.reps})",
        "validate": args.validate,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": version("ray"),
                    "torch": version("torch")},
        "medians": med,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# batch --executor ray vs local: {JOBS} small jobs, medians of {args.reps}", "",
             f"Ray {version('ray')}, {os.cpu_count()} CPUs, validation {'on' if args.validate else 'off'}.", "",
             "| mode | wall (s) | batch (s) | sum of job times (s) | overhead vs local (s) | per job (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for m, v in med.items():
        lines.append(f"| {m} | {v['wall_s']:.2f} | {v['batch_s']:.2f} | {v['job_s_sum']:.2f} | "
                     f"{v['overhead_s']:+.2f} | {v['per_job_overhead_s']:+.2f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
