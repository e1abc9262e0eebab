"""Benchmark ``vllm-consolidate convert`` against DeepSpeed's ``zero_to_fp32.py`` and plain-copy floors.

For every cached checkpoint (see ``make_checkpoints.py``), in one run, N repetitions, the tools
alternate inside each repetition, and the median is reported:

* ``ours_fp32`` / ``ours_bf16``: ``vllm-consolidate convert --no-validate-vllm`` to one safetensors file;
* ``zero_to_fp32``: the copy of DeepSpeed's script that ``save_checkpoint`` put in the checkpoint folder,
  one output file (``--max_shard_size`` far above the model size), safetensors if it works, else .bin;
* ``cp_fp32`` / ``cp_bf16``: ``cp`` of a file the size of our output, then ``sync FILE`` (we fsync too);
* ``read_fp32``: ``dd`` of as many bytes as the fp32 masters from each rank's optimizer file, to
  /dev/null (the bytes we must read);
* paired ratios (issue 28): in each rep ``ours_fp32`` runs right before ``cp_fp32`` and ``ours_bf16`` right
  before ``read_fp32`` and ``cp_bf16``; ``fp32_vs_cp`` is the median over reps of ours_fp32 / cp_fp32 and
  ``bf16_vs_io_floor`` that of ours_bf16 / (read_fp32 + cp_bf16), the I/O floor of a job that reads the fp32
  masters and writes the bf16 file (inputs warm for every command, as for ours). Printed at the end;
* ``merge``: our tool merging our own fp32 output re-sharded at 500MB into one file (no dtype change),
  against ``cat_shards``: ``cat`` of the same shard files into one file, then ``sync FILE``.

Measurement:

* Wall time: ``time.monotonic`` around the subprocess (including interpreter start-up and imports;
  our ``--json`` conversion time is kept too as ``inner_s``).
* Peak RSS: each command runs under ``/usr/bin/time -v``, whose "Maximum resident set size" is the
  ``ru_maxrss`` that ``wait4`` returns for that one child: the peak of the largest single process of
  that command (every measured tool is one process; ``cp``/``dd``/``cat`` run under ``sh``, whose own
  RSS is smaller). ``getrusage(RUSAGE_CHILDREN)`` deltas would be wrong: it is a running max over all
  children ever waited for, so a small run after a big one reports the big one's peak.
* Page cache: before every measured command, everything it reads is read once (``warm``), so both
  tools start from the same warm cache; outputs of the previous command are deleted and ``sync``-ed
  first so no dirty pages from it are written back during the next one. ``drop_caches`` is tested
  and recorded but not used: it is global, and other users share this machine.
* ``os.getloadavg()`` is recorded before and after every measurement.
* A watchdog kills the measured command (its own process group only) if MemAvailable < 1 GiB.

FSDP2 DCP checkpoints (see ``make_fsdp_checkpoints.py``: an FSDP2 model after one AdamW step, saved as
HF Trainer / Accelerate do with ``SHARDED_STATE_DICT``: ``checkpoint-N/pytorch_model_fsdp_0/`` =
``dcp.save({"model": ...})`` (fp32 weights), ``checkpoint-N/optimizer_0/`` = ``dcp.save({"optimizer": ...})``
(fp32 Adam moments), config and tokenizer in ``checkpoint-N/``), measured the same way, in one run:

* ``ours_fp32`` / ``ours_bf16``: as above, given ``checkpoint-N`` (it finds ``pytorch_model_fsdp_0/``);
* ``dcp_to_torch_save``: ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save(MODEL_DCP, out.pt)``
  in a child Python process, on ``checkpoint-N/pytorch_model_fsdp_0`` (model only). It does not fsync; what
  an fsync of its output adds is recorded, as for ``zero_to_fp32``;
* ``accelerate``: ``accelerate merge-weights MODEL_DCP OUT`` on the same folder (its default output:
  ``OUT/model.safetensors``; ``--unsafe_serialization`` would write a ``.bin``). Probed once; if it fails,
  its error, wall time and peak RSS up to the failure are recorded and it is left out of the repetitions.
  It does not fsync either; the fsync is timed afterwards as for ``dcp_to_torch_save``;
* ``cp_fp32`` / ``cp_bf16``: ``cp`` of the file our tool wrote just before (same rep), then ``sync FILE``.
  (Not kept reference files as above: the disk holds the DCP checkpoints and little more.)

Each command's inputs are warmed as above, but only what it reads: the model folder (and, for ours,
``checkpoint-N``'s config and tokenizer files), never ``optimizer_0/``.

Before the repetitions, untimed, our fp32 output is compared tensor by tensor with the model entries
that ``torch.distributed.checkpoint.load`` reads from ``pytorch_model_fsdp_0/`` (bit equality), and, if
``accelerate merge-weights`` works, with its output.

Writes ``bench/results/latest.json`` and ``bench/results/latest.md`` and prints the table.

Usage::

    python bench/run.py [--reps 3] [--only NAME ...] [--skip-generate] [--no-baselines] [--out STEM]
    python bench/run.py --reps 5 --only qwen0.5b-z3 --no-baselines --out floors_0.5b   # issue 28's paired ratios

``--only`` takes checkpoint names (``qwen0.5b-z3``, ``qwen0.5b-dcp``...) and the groups ``deepspeed`` and
``dcp``; ``python bench/run.py --only dcp`` runs the DCP part alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_checkpoints as mk  # noqa: E402
import make_fsdp_checkpoints as mkf  # noqa: E402

REPO = mk.REPO
WORK = REPO / ".cache" / "bench-work"
RESULTS = REPO / "bench" / "results"
BIN = Path(sys.executable).parent
TIME = "/usr/bin/time"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
# Measure the tool as installed: pip compiles an installed package's .pyc files, so every command starts from
# bytecode. The source tree here is an editable install; with PYTHONDONTWRITEBYTECODE (set in some shells) every
# run would compile ~140 modules again (0.14 s, a tenth of a 0.5B conversion). compile_sources() fills the cache.
ENV.pop("PYTHONDONTWRITEBYTECODE", None)
ENV["PYTHONPYCACHEPREFIX"] = str(REPO / ".cache" / "pycache")


def compile_sources() -> None:
    """Byte-compile our package into ``PYTHONPYCACHEPREFIX``, as ``pip install`` would have."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "src")], env=ENV, check=True)

TARGETS = {
    "wall_vs_zero_to_fp32": 0.25,
    "wall_vs_cp_floor": 2.0,
    "rss_vs_zero_to_fp32": 0.15,
    "rss_large_vs_small": 1.3,
    "merge_vs_cp": 1.5,
    "dcp_rss_vs_theirs": 0.1,
    "dcp_wall_vs_cp": 1.5,
    "fp32_vs_cp": 1.2,  # issue 28, paired runs
    "bf16_vs_io_floor": 1.2,  # issue 28, paired runs
}
DCP_TO_TORCH_SAVE = ("import sys\nfrom torch.distributed.checkpoint.format_utils import dcp_to_torch_save\n"
                     "dcp_to_torch_save(sys.argv[1], sys.argv[2])")
DISK_MARGIN = 2 * 2**30  # free disk kept beyond an output's expected size, else the command is skipped


def warm(paths: list[Path]) -> float:
    """Read every file under ``paths`` once (into the page cache); returns seconds taken."""
    t0 = time.monotonic()
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.read(16 * 2**20):
                    pass
    return time.monotonic() - t0


def clean(*paths: Path) -> None:
    """Remove earlier outputs and flush dirty pages, so the next measurement starts clean."""
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    os.sync()


def drop_caches_works() -> str:
    """Whether ``echo 3 > /proc/sys/vm/drop_caches`` is permitted here (tested once, then not used)."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return "permitted (tested once; not used because the machine is shared)"
    except OSError as exc:
        return f"not permitted: {exc}"


def _parse_time_v(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Maximum resident set size (kbytes):"):
            out["rss_mib"] = int(line.rsplit(":", 1)[1]) / 1024
        elif line.startswith(("User time (seconds):", "System time (seconds):")):
            out["cpu_s"] = out.get("cpu_s", 0.0) + float(line.rsplit(":", 1)[1])
        elif line.startswith("Exit status:"):
            out["exit"] = int(line.rsplit(":", 1)[1])
    return out


def measure(cmd: list[str], warm_paths: list[Path], outputs: list[Path],
            env: dict[str, str] | None = None) -> dict[str, Any]:
    """Warm the inputs, run ``cmd`` under ``/usr/bin/time -v`` (with ``env``, else :data:`ENV`), return wall
    time, peak RSS and load; kills it if the machine runs out of memory."""
    clean(*outputs)
    warm_s = warm(warm_paths)
    load_before = os.getloadavg()
    t0 = time.monotonic()
    min_avail = mk.mem_available()
    proc = subprocess.Popen([TIME, "-v", *cmd], env=ENV if env is None else env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, text=True)
    killed = ""
    while True:
        try:
            stdout, stderr = proc.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            avail = mk.mem_available()
            min_avail = min(min_avail, avail)
            if avail < 2**30 and not killed:
                killed = f"killed: MemAvailable {avail / 2**30:.2f} GiB"
                os.killpg(proc.pid, 9)
    wall = time.monotonic() - t0
    parsed = _parse_time_v(stderr)
    rec: dict[str, Any] = {
        "wall_s": round(wall, 3),
        "rss_mib": round(parsed.get("rss_mib", float("nan")), 1),
        "cpu_s": round(parsed.get("cpu_s", float("nan")), 3),
        "exit": int(parsed.get("exit", proc.returncode)),
        "warm_s": round(warm_s, 2),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "min_mem_available_gib": round(min_avail / 2**30, 2),
    }
    if killed:
        rec["killed"] = killed
    if rec["exit"] != 0:
        rec["stderr_tail"] = stderr.split("\tCommand being timed:")[0][-2000:]  # without time -v's report
    if stdout.strip().startswith("{"):
        try:
            rec["inner_s"] = round(json.loads(stdout)["seconds"], 3)
        except (ValueError, KeyError):
            pass
    return rec


def ours(src: Path, out: Path, *extra: str) -> list[str]:
    """Our CLI command line."""
    return [str(BIN / "vllm-consolidate"), "convert", "--input", str(src), "--output", str(out),
            "--no-validate-vllm", "--json", *extra]


def zero_to_fp32_cmd(ckpt: Path, out: Path, safe: bool) -> list[str]:
    """DeepSpeed's script, as copied into the checkpoint folder, writing one file."""
    cmd = [sys.executable, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(out), "--max_shard_size", "1000GB"]
    return cmd + (["--safe_serialization"] if safe else [])


def sh(script: str) -> list[str]:
    """A shell command line."""
    return ["/bin/sh", "-c", script]


def single_file(folder: Path) -> Path:
    """The one weights file of an output folder."""
    files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    if len(files) != 1:
        raise RuntimeError(f"{folder}: expected one weights file, found {[p.name for p in files]}")
    return files[0]


def rank_fp32_bytes(ckpt: Path) -> list[tuple[Path, int]]:
    """Per rank optimizer file, how many fp32-master bytes it holds (from our reader's plan)."""
    from vllm_consolidate.read.deepspeed import read_deepspeed, resolve_checkpoint

    folder = resolve_checkpoint(ckpt).folder
    source = read_deepspeed(folder)
    per: dict[str, int] = {}
    for t in source.tensors:
        for seg in t.segments:
            per[seg.path] = per.get(seg.path, 0) + seg.nbytes
    return sorted((Path(p), n) for p, n in per.items())


def median(runs: list[dict[str, Any]], key: str) -> float:
    """Median of ``key`` over successful runs."""
    vals = [r[key] for r in runs if r.get("exit") == 0 and key in r]
    return round(statistics.median(vals), 3) if vals else float("nan")


def bench_checkpoint(info: dict[str, Any], reps: int, baselines: bool = True) -> dict[str, Any]:
    """All measurements of one checkpoint (without ``baselines``: no zero_to_fp32, no merge)."""
    ckpt = mk.CACHE / info["key"] / "ckpt"
    work = WORK / info["key"]
    work.mkdir(parents=True, exist_ok=True)
    out = {name: work / name for name in ("ours_fp32", "ours_bf16", "z2fp32", "cp", "merge", "shards", "ref")}
    clean(*out.values())
    out["ref"].mkdir()

    # One-off preparation (not timed): reference outputs for the cp floors, shards for the merge.
    prep: dict[str, Any] = {}
    for dtype in ("float32", "bfloat16"):
        target = work / f"ref_{dtype}"
        clean(target)
        r = subprocess.run(ours(ckpt, target, "--dtype", dtype), env=ENV, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"our tool failed on {ckpt}: {r.stderr[-2000:]}")
        prep[f"ref_{dtype}"] = single_file(target)
    reads = rank_fp32_bytes(ckpt)
    dd = "; ".join(f"dd if={p} of=/dev/null bs=16M iflag=count_bytes count={n} status=none" for p, n in reads)
    cp_dst = out["cp"]
    # Pairs run back to back in each rep: ours_fp32 then its floor cp_fp32; ours_bf16 then its I/O floor,
    # read_fp32 (the fp32 master bytes we must read) + cp_bf16 (writing a file of our output's size).
    tools: dict[str, tuple[list[str], list[Path], list[Path]]] = {
        "ours_fp32": (ours(ckpt, out["ours_fp32"]), [ckpt], [out["ours_fp32"]]),
        "cp_fp32": (sh(f"cp {prep['ref_float32']} {cp_dst} && sync {cp_dst}"), [prep["ref_float32"]], [cp_dst]),
        "ours_bf16": (ours(ckpt, out["ours_bf16"], "--dtype", "bfloat16"), [ckpt], [out["ours_bf16"]]),
        "read_fp32": (sh(dd), [p for p, _ in reads], []),
        "cp_bf16": (sh(f"cp {prep['ref_bfloat16']} {cp_dst} && sync {cp_dst}"), [prep["ref_bfloat16"]], [cp_dst]),
    }
    z2_note, probe, shards = "not measured (--no-baselines)", {}, []
    if baselines:
        z2_note, probe, shards = prepare_baselines(ckpt, prep, out)
        safe = z2_note.startswith("safetensors")
        shard_list = " ".join(str(s) for s in shards)
        tools.update({
            "zero_to_fp32": (zero_to_fp32_cmd(ckpt, out["z2fp32"], safe), [ckpt], [out["z2fp32"]]),
            "merge": (ours(out["shards"], out["merge"]), [out["shards"]], [out["merge"]]),
            "cat_shards": (sh(f"cat {shard_list} > {cp_dst} && sync {cp_dst}"), [out["shards"]], [cp_dst]),
        })
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in tools}
    z2_fsync: list[float] = []
    for rep in range(reps):
        for name, (cmd, warm_paths, outputs) in tools.items():
            rec = measure(cmd, warm_paths, outputs)
            rec["rep"] = rep
            if name == "zero_to_fp32" and rec["exit"] == 0:
                # It does not fsync; time what an fsync of its output would have added.
                z2_fsync.append(fsync_path(out["z2fp32"]))
                rec["fsync_after_s"] = round(z2_fsync[-1], 3)
                rec["output_bytes"] = sum(f.stat().st_size for f in out["z2fp32"].iterdir())
            print(f"  rep {rep} {name:13s} wall {rec['wall_s']:7.2f}s rss {rec['rss_mib']:8.1f} MiB "
                  f"exit {rec['exit']} load {rec['loadavg_before'][0]:.2f}", flush=True)
            runs[name].append(rec)
            clean(*outputs)  # disk: one output at a time (up to 4 copies of the fp32 model otherwise)
    sizes = {"fp32": prep["ref_float32"].stat().st_size, "bf16": prep["ref_bfloat16"].stat().st_size,
             "shards": [s.stat().st_size for s in shards]}
    clean(work)  # reference outputs and shards too: ~4x the fp32 model size per checkpoint
    med = {name: medians(r) for name, r in runs.items()}
    if baselines:
        med["zero_to_fp32"]["fsync_after_s"] = round(statistics.median(z2_fsync), 3) if z2_fsync else float("nan")
    return {
        "checkpoint": {k: v for k, v in info.items() if k != "files"},
        "output_bytes": sizes,
        "read_bytes": sum(n for _, n in reads),
        "zero_to_fp32_mode": z2_note,
        "zero_to_fp32_probe": probe,
        "median": med,
        "ratios": ratios(med),
        "paired": paired_ratios(runs),
        "runs": runs,
    }


def prepare_baselines(ckpt: Path, prep: dict[str, Any], out: dict[str, Path]) -> tuple[str, dict[str, Any], list[Path]]:
    """Untimed: shards of our fp32 output for the merge, and a probe of zero_to_fp32's safetensors mode."""
    # --force: without it a single-file HF input whose dtype would not change is reported
    # "already_consolidated" and nothing is written, even with a smaller --max-shard-size.
    r = subprocess.run(ours(prep["ref_float32"].parent, out["shards"], "--max-shard-size", "500MB", "--force"),
                       env=ENV, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"re-sharding failed: {r.stderr[-2000:]}")
    shards = sorted(out["shards"].glob("*.safetensors"))
    if len(shards) < 2:
        raise RuntimeError(f"re-sharding produced {len(shards)} files: {r.stdout[-500:]}")
    # zero_to_fp32: safetensors if it works on this (tied) checkpoint, else .bin.
    probe = measure(zero_to_fp32_cmd(ckpt, out["z2fp32"], safe=True), [ckpt], [out["z2fp32"]])
    err = [ln.strip() for ln in probe.get("stderr_tail", "").splitlines() if "Error" in ln or "share memory" in ln]
    note = "safetensors, one file" if probe["exit"] == 0 else (
        f"--safe_serialization failed ({(err or ['?'])[-1][:160]}); measured its .bin output (fp32, one file)")
    return note, probe, shards


def paired_ratios(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Issue 28's targets, from paired runs (same rep, back to back): median over reps of the per-rep ratio.

    ``fp32_vs_cp``: ours fp32 / ``cp`` + ``sync`` of our fp32 output. ``bf16_vs_io_floor``: ours bf16 /
    (reading the fp32 master bytes + ``cp`` + ``sync`` of our bf16 output). ``*_inner``: the same with our
    ``--json`` conversion time (no interpreter start-up) in place of our wall time.
    """
    out: dict[str, Any] = {}
    for key, ours_name, floor_names in (("fp32_vs_cp", "ours_fp32", ("cp_fp32",)),
                                        ("bf16_vs_io_floor", "ours_bf16", ("read_fp32", "cp_bf16"))):
        for field, suffix in (("wall_s", ""), ("inner_s", "_inner")):
            per = []
            for rep, o in enumerate(runs[ours_name]):
                floors = [runs[f][rep] for f in floor_names]
                if o.get("exit") == 0 and field in o and all(f.get("exit") == 0 for f in floors):
                    per.append(o[field] / sum(f["wall_s"] for f in floors))
            out[key + suffix] = round(statistics.median(per), 3) if per else float("nan")
            out[key + suffix + "_per_rep"] = [round(x, 3) for x in per]
    floors = [r["wall_s"] + c["wall_s"] for r, c in zip(runs["read_fp32"], runs["cp_bf16"])]
    out["io_floor_bf16_s"] = round(statistics.median(floors), 3) if floors else float("nan")
    # CPU seconds (user + system, from time -v): on a machine whose cores are shared with other jobs, a
    # conversion bound by the CPU (a cast) waits for a core while the floor (bound by the disk) does not.
    for name in ("ours_fp32", "ours_bf16"):
        cpus = [r["cpu_s"] for r in runs[name] if r.get("exit") == 0 and r.get("cpu_s") == r.get("cpu_s")]
        out[f"{name}_cpu_s"] = round(statistics.median(cpus), 3) if cpus else float("nan")
    return out


def ratio(a: float, b: float) -> float:
    """``a / b`` rounded, NaN when either is NaN or ``b`` is 0."""
    return round(a / b, 3) if b and b == b and a == a else float("nan")


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians of a command's runs: wall time, peak RSS and the tool's own seconds."""
    return {"wall_s": median(runs, "wall_s"), "rss_mib": median(runs, "rss_mib"), "inner_s": median(runs, "inner_s")}


def ratios(med: dict[str, dict[str, float]]) -> dict[str, float]:
    """Ratios of medians (lower is better for all); NaN for baselines not measured."""
    nan = {"wall_s": float("nan"), "rss_mib": float("nan"), "inner_s": float("nan")}
    med = {"zero_to_fp32": nan, "merge": nan, "cat_shards": nan, **med}
    z = med["zero_to_fp32"]
    read = med["read_fp32"]["wall_s"]
    return {
        "fp32_wall_vs_zero_to_fp32": ratio(med["ours_fp32"]["wall_s"], z["wall_s"]),
        "bf16_wall_vs_zero_to_fp32": ratio(med["ours_bf16"]["wall_s"], z["wall_s"]),
        "fp32_rss_vs_zero_to_fp32": ratio(med["ours_fp32"]["rss_mib"], z["rss_mib"]),
        "bf16_rss_vs_zero_to_fp32": ratio(med["ours_bf16"]["rss_mib"], z["rss_mib"]),
        "fp32_wall_vs_cp": ratio(med["ours_fp32"]["wall_s"], med["cp_fp32"]["wall_s"]),
        "bf16_wall_vs_cp": ratio(med["ours_bf16"]["wall_s"], med["cp_bf16"]["wall_s"]),
        "fp32_wall_vs_read": ratio(med["ours_fp32"]["wall_s"], med["read_fp32"]["wall_s"]),
        "fp32_wall_vs_cp_plus_read": ratio(med["ours_fp32"]["wall_s"], med["cp_fp32"]["wall_s"] + read),
        "bf16_wall_vs_cp_plus_read": ratio(med["ours_bf16"]["wall_s"], med["cp_bf16"]["wall_s"] + read),
        "merge_wall_vs_cat": ratio(med["merge"]["wall_s"], med["cat_shards"]["wall_s"]),
        "fp32_inner_vs_cp": ratio(med["ours_fp32"]["inner_s"], med["cp_fp32"]["wall_s"]),
        "bf16_inner_vs_cp": ratio(med["ours_bf16"]["inner_s"], med["cp_bf16"]["wall_s"]),
        "merge_inner_vs_cat": ratio(med["merge"]["inner_s"], med["cat_shards"]["wall_s"]),
        "fp32_inner_vs_zero_to_fp32": ratio(med["ours_fp32"]["inner_s"], z["wall_s"]),
    }


# -- FSDP2 DCP checkpoints ------------------------------------------------------------------------------

VERIFY_DCP = """
import json, sys
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

ckpt, out = sys.argv[1], sys.argv[2]
md = FileSystemReader(ckpt).read_metadata().state_dict_metadata
keys = {k[len("model."):]: m for k, m in md.items() if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
state = {"model": {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in keys.items()}}
dcp.load(state, checkpoint_id=ckpt, no_dist=True)
equal, differ = 0, []
with safe_open(out, "pt") as f:
    names = set(f.keys())
    for k in sorted(names):
        if torch.equal(f.get_tensor(k), state["model"][k]):
            equal += 1
        else:
            differ.append(k)
print(json.dumps({"dcp_model_keys": len(keys), "output_tensors": len(names), "bit_equal": equal,
                  "differ": differ[:5], "not_in_output": sorted(set(keys) - names)}))
"""


COMPARE_SAFETENSORS = """
import json, sys
import torch
from safetensors import safe_open

with safe_open(sys.argv[1], "pt") as a, safe_open(sys.argv[2], "pt") as b:
    ka, kb = set(a.keys()), set(b.keys())
    common = sorted(ka & kb)
    equal = [k for k in common if torch.equal(a.get_tensor(k), b.get_tensor(k))]
    print(json.dumps({"common": len(common), "bit_equal": len(equal), "differ": sorted(set(common) - set(equal))[:5],
                      "only_a": sorted(ka - kb), "only_b": sorted(kb - ka)}))
"""


def free_disk() -> int:
    """Free bytes on the work disk."""
    WORK.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(WORK).free


def fsync_path(path: Path) -> float:
    """fsync every file of ``path``; returns seconds (what an fsync would have added to a tool that has none)."""
    t0 = time.monotonic()
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.monotonic() - t0


def path_bytes(path: Path) -> int:
    """Size of a file or of every file under a folder."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def error_lines(rec: dict[str, Any]) -> str:
    """The last error line of a failed command's stderr."""
    lines = [ln.strip() for ln in rec.get("stderr_tail", "").splitlines() if "Error" in ln or "error" in ln]
    return (lines or [rec.get("killed", "?")])[-1][:300]


def bench_dcp(info: dict[str, Any], reps: int) -> dict[str, Any]:
    """All measurements of one FSDP2 DCP checkpoint."""
    ckpt = mkf.ckpt_of(info)  # checkpoint-N: given to our tool
    model_dcp = mkf.model_dcp_of(info)  # checkpoint-N/pytorch_model_fsdp_0: given to the others
    ours_reads = [p for p in ckpt.iterdir() if p.name != mkf.OPTIM_DIR]  # model folder, config, tokenizer
    work = WORK / info["key"]
    out = {"ours_fp32": work / "ours_fp32", "ours_bf16": work / "ours_bf16", "torch": work / "dcp_to_torch_save.pt",
           "accelerate": work / "accelerate", "cp": work / "cp.safetensors"}
    clean(*out.values())
    work.mkdir(parents=True, exist_ok=True)

    # Untimed: our fp32 output against torch's own DCP reader (model entries only, bit equality).
    r = subprocess.run(ours(ckpt, out["ours_fp32"]), env=ENV, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"our tool failed on {ckpt}: {r.stderr[-2000:]}")
    summary = json.loads(r.stdout)
    v = subprocess.run([sys.executable, "-c", VERIFY_DCP, str(model_dcp), str(single_file(out["ours_fp32"]))],
                       env=ENV, capture_output=True, text=True)
    if v.returncode != 0:
        raise RuntimeError(f"verification failed: {v.stderr[-2000:]}")
    verify = json.loads(v.stdout)
    verify["dropped_by_ours"] = summary.get("dropped", [])
    print(f"  verify: {verify}", flush=True)
    if verify["bit_equal"] != verify["output_tensors"]:
        raise RuntimeError(f"{info['name']}: our output differs from dcp.load: {verify}")

    # accelerate merge-weights: probed once; kept in the repetitions only if it works on this input.
    acc_cmd = [str(BIN / "accelerate"), "merge-weights", str(model_dcp), str(out["accelerate"])]
    probe = measure(acc_cmd, [model_dcp], [out["accelerate"]])
    acc_ok = probe["exit"] == 0
    acc_note = "safetensors, one file" if acc_ok else (
        f"failed (exit {probe['exit']}) after {probe['wall_s']:.1f} s at {probe['rss_mib']:.0f} MiB peak RSS: "
        f"{error_lines(probe)}")
    print(f"  accelerate merge-weights probe: {acc_note}", flush=True)
    if acc_ok:
        # Untimed: accelerate's output against ours (tensors of both; it also writes the tied lm_head).
        x = subprocess.run([sys.executable, "-c", COMPARE_SAFETENSORS, str(single_file(out["ours_fp32"])),
                            str(single_file(out["accelerate"]))], env=ENV, capture_output=True, text=True)
        if x.returncode != 0:
            raise RuntimeError(f"comparison with accelerate's output failed: {x.stderr[-2000:]}")
        verify["vs_accelerate"] = json.loads(x.stdout)
        print(f"  ours vs accelerate: {verify['vs_accelerate']}", flush=True)
        acc_note = (f"{single_file(out['accelerate']).name}, one file; ours equals it bit for bit on "
                    f"{verify['vs_accelerate']['bit_equal']}/{verify['vs_accelerate']['common']} common tensors "
                    f"(only in its output: {', '.join(verify['vs_accelerate']['only_b']) or 'none'})")
    clean(out["accelerate"], out["ours_fp32"])

    torch_cmd = [sys.executable, "-c", DCP_TO_TORCH_SAVE, str(model_dcp), str(out["torch"])]
    cp = out["cp"]
    # (name, command, warmed inputs, outputs, output whose fsync is timed afterwards, expected output bytes)
    plan: list[tuple[str, list[str], list[Path], list[Path], Path | None, int]] = [
        ("ours_fp32", ours(ckpt, out["ours_fp32"]), ours_reads, [out["ours_fp32"]], None, 0),
        ("cp_fp32", [], [], [cp], None, 0),  # command filled in from ours_fp32's output file
        ("dcp_to_torch_save", torch_cmd, [model_dcp], [out["torch"]], out["torch"], info["tensor_bytes"]["model"]),
        ("ours_bf16", ours(ckpt, out["ours_bf16"], "--dtype", "bfloat16"), ours_reads, [out["ours_bf16"]], None, 0),
        ("cp_bf16", [], [], [cp], None, 0),
    ]
    if acc_ok:
        plan.append(("accelerate", acc_cmd, [model_dcp], [out["accelerate"]], out["accelerate"],
                     info["tensor_bytes"]["model"]))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in plan}
    sizes: dict[str, int] = {}
    for rep in range(reps):
        for name, cmd, warm_paths, outputs, fsync_out, expect in plan:
            src = None
            if name.startswith("cp_"):
                ours_out = out["ours_" + name[3:]]
                if not ours_out.is_dir():
                    runs[name].append({"exit": -1, "skipped": "no output of ours to copy", "rep": rep})
                    continue
                src = single_file(ours_out)
                cmd, warm_paths = sh(f"cp {src} {cp} && sync {cp}"), [src]
            if expect and free_disk() < expect + DISK_MARGIN:
                rec: dict[str, Any] = {"exit": -1, "rep": rep, "skipped": f"disk: {free_disk() / 2**30:.1f} GiB free, "
                                       f"output needs {expect / 2**30:.1f} GiB + margin"}
                print(f"  rep {rep} {name:17s} SKIPPED {rec['skipped']}", flush=True)
                runs[name].append(rec)
                continue
            rec = measure(cmd, warm_paths, outputs)
            rec["rep"] = rep
            if rec["exit"] == 0:
                produced = outputs[0]
                sizes[name] = path_bytes(produced)
                if fsync_out is not None:
                    rec["fsync_after_s"] = round(fsync_path(fsync_out), 3)
            print(f"  rep {rep} {name:17s} wall {rec['wall_s']:7.2f}s rss {rec['rss_mib']:8.1f} MiB "
                  f"exit {rec['exit']} load {rec['loadavg_before'][0]:.2f}", flush=True)
            runs[name].append(rec)
            if name.startswith("ours_"):
                continue  # its output is what the next cp copies; cleaned after that
            clean(*outputs)
            if src is not None:
                clean(src.parent)
    clean(work)
    med: dict[str, dict[str, float]] = {}
    for name, rs in runs.items():
        med[name] = medians(rs)
        if any("fsync_after_s" in x for x in rs):
            med[name]["fsync_after_s"] = median(rs, "fsync_after_s")
    if not acc_ok:
        med["accelerate"] = {"wall_s": float("nan"), "rss_mib": float("nan"), "inner_s": float("nan"),
                             "failed_wall_s": probe["wall_s"], "failed_rss_mib": probe["rss_mib"]}
    return {
        "checkpoint": {k: v for k, v in info.items() if k != "files"},
        "output_bytes": sizes,
        "verify": verify,
        "accelerate_mode": acc_note,
        "accelerate_probe": probe,
        "median": med,
        "ratios": dcp_ratios(med),
        "runs": runs,
    }


def dcp_ratios(med: dict[str, dict[str, float]]) -> dict[str, float]:
    """Ratios of medians for a DCP checkpoint (lower is better for all)."""
    out: dict[str, float] = {}
    for dt in ("fp32", "bf16"):
        ours_m = med[f"ours_{dt}"]
        for theirs in ("dcp_to_torch_save", "accelerate"):
            out[f"{dt}_wall_vs_{theirs}"] = ratio(ours_m["wall_s"], med[theirs]["wall_s"])
            out[f"{dt}_rss_vs_{theirs}"] = ratio(ours_m["rss_mib"], med[theirs]["rss_mib"])
        out[f"{dt}_wall_vs_cp"] = ratio(ours_m["wall_s"], med[f"cp_{dt}"]["wall_s"])
        out[f"{dt}_inner_vs_cp"] = ratio(ours_m["inner_s"], med[f"cp_{dt}"]["wall_s"])
    t = med["dcp_to_torch_save"]
    out["fp32_wall_vs_dcp_to_torch_save_plus_fsync"] = ratio(med["ours_fp32"]["wall_s"],
                                                          t["wall_s"] + t.get("fsync_after_s", float("nan")))
    return out


DCP_RATIO_TARGETS = (
    ("fp32_rss_vs_dcp_to_torch_save", "dcp_rss_vs_theirs"), ("bf16_rss_vs_dcp_to_torch_save", "dcp_rss_vs_theirs"),
    ("fp32_rss_vs_accelerate", "dcp_rss_vs_theirs"), ("bf16_rss_vs_accelerate", "dcp_rss_vs_theirs"),
    ("fp32_wall_vs_cp", "dcp_wall_vs_cp"), ("bf16_wall_vs_cp", "dcp_wall_vs_cp"),
)


def dcp_markdown(results: dict[str, Any]) -> list[str]:
    """The DCP tables."""
    lines = ["", "## FSDP2 DCP checkpoints", "",
             "| checkpoint | params | ckpt GB (model GB) | tool | wall s | inner s | peak RSS MiB | output GB "
             "| load (1m) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in results["dcp"]:
        meta = c["checkpoint"]
        head = (f"| {meta['name']} | {meta['params'] / 1e9:.3f}B | {meta['ckpt_bytes'] / 1e9:.2f} "
                f"({meta['tensor_bytes']['model'] / 1e9:.2f}) |")
        for name, m in c["median"].items():
            rs = c["runs"].get(name, [])
            loads = [x["loadavg_before"][0] for x in rs if "loadavg_before" in x]
            load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else ""
            if name == "accelerate" and "failed_wall_s" in m:
                lines.append(f"{head} accelerate | failed after {m['failed_wall_s']:.2f} | | "
                             f"{m['failed_rss_mib']:.0f} (at failure) | - | "
                             f"{c['accelerate_probe']['loadavg_before'][0]:.1f} |")
                continue
            extra = f" (+fsync {m['fsync_after_s']:.2f}s)" if "fsync_after_s" in m else ""
            done = [x for x in rs if x.get("exit") == 0]
            if len(done) < len(rs):
                why = "; ".join(sorted({x.get("skipped") or f"exit {x.get('exit')}" for x in rs if x.get("exit") != 0}))
                extra += f" [median of {len(done)}/{len(rs)} reps; others: {why}]"
            size = c["output_bytes"].get(name)
            lines.append(f"{head} {name} | {m['wall_s']:.2f}{extra} | "
                         f"{'' if m['inner_s'] != m['inner_s'] else m['inner_s']} | {m['rss_mib']:.0f} | "
                         f"{'' if size is None else f'{size / 1e9:.2f}'} | {load} |")
    lines += ["", "| checkpoint | ratio | value | target | verdict |", "|---|---|---|---|---|"]
    for c in results["dcp"]:
        name = c["checkpoint"]["name"]
        rt = c["ratios"]
        for key, target in DCP_RATIO_TARGETS:
            lines.append(f"| {name} | {key} | {rt[key]} | <= {TARGETS[target]} | {ok(rt[key], TARGETS[target])} |")
        for key in ("fp32_wall_vs_dcp_to_torch_save", "bf16_wall_vs_dcp_to_torch_save",
                    "fp32_wall_vs_dcp_to_torch_save_plus_fsync", "fp32_inner_vs_cp", "bf16_inner_vs_cp"):
            lines.append(f"| {name} | {key} (info) | {rt[key]} | | |")
    for key, val in results.get("dcp_scaling", {}).items():
        if "(info)" in key:
            lines.append(f"| dcp scaling | {key} | {val} | | |")
        else:
            lines.append(f"| dcp scaling | {key} | {val} | <= {TARGETS['rss_large_vs_small']} | "
                         f"{ok(val, TARGETS['rss_large_vs_small'])} |")
    lines.append("")
    for c in results["dcp"]:
        meta = c["checkpoint"]
        w = meta["worker"]
        lines.append(f"- {meta['name']}: FSDP2 w{meta['world_size']}, {meta['steps']} AdamW step, "
                     f"{meta['param_dtype']} params ({meta['mixed_precision']}), {meta['layout']}; generated in "
                     f"{meta['generation_seconds']}s (build {w['build_s']}s, step {w['steps_s']}s, "
                     f"save {w['save_s']}s; "
                     f"peak tree RSS {meta['generation_peak_tree_rss_gib']} GiB). Our fp32 output vs dcp.load: "
                     f"{c['verify']['bit_equal']}/{c['verify']['output_tensors']} tensors bit-equal "
                     f"(dropped: {', '.join(c['verify']['dropped_by_ours']) or 'none'}). accelerate merge-weights: "
                     f"{c['accelerate_mode']}. {meta['note']}")
    return lines


def ok(value: float, target: float) -> str:
    """PASS/FAIL against a ceiling."""
    return "n/a" if value != value else ("PASS" if value <= target else "FAIL")


def markdown(results: dict[str, Any]) -> str:
    """The report tables."""
    lines = [f"# vllm-consolidate benchmark ({results['started']}, {results['reps']} reps, median)", "",
             f"Host: {results['host']}. Page cache: {results['cache_policy']}. drop_caches: {results['drop_caches']}.",
             f"writer.py at start {results['writer_start']}, at end {results.get('writer_end')}."]
    if results["checkpoints"]:
        lines += deepspeed_markdown(results)
    if results.get("dcp"):
        lines += dcp_markdown(results)
    return "\n".join(lines) + "\n"


def deepspeed_markdown(results: dict[str, Any]) -> list[str]:
    """The DeepSpeed tables."""
    lines = ["", "| checkpoint | params | ckpt GB | tool | wall s | inner s | peak RSS MiB | load (1m) |",
             "|---|---|---|---|---|---|---|---|"]
    for c in results["checkpoints"]:
        meta = c["checkpoint"]
        for name, m in c["median"].items():
            loads = [r["loadavg_before"][0] for r in c["runs"][name]]
            extra = f" (+fsync {m.get('fsync_after_s', float('nan')):.2f}s)" if name == "zero_to_fp32" else ""
            lines.append(f"| {meta['name']} | {meta['params'] / 1e9:.3f}B | {meta['ckpt_bytes'] / 1e9:.2f} | {name} | "
                         f"{m['wall_s']:.2f}{extra} | {'' if m['inner_s'] != m['inner_s'] else m['inner_s']} | "
                         f"{m['rss_mib']:.0f} | {min(loads):.1f}-{max(loads):.1f} |")
    lines += ["", "| checkpoint | ratio | value | target | verdict |", "|---|---|---|---|---|"]
    for c in results["checkpoints"]:
        name = c["checkpoint"]["name"]
        rt = c["ratios"]
        for key, target in (("fp32_wall_vs_zero_to_fp32", "wall_vs_zero_to_fp32"),
                            ("bf16_wall_vs_zero_to_fp32", "wall_vs_zero_to_fp32"),
                            ("fp32_wall_vs_cp", "wall_vs_cp_floor"), ("bf16_wall_vs_cp", "wall_vs_cp_floor"),
                            ("fp32_rss_vs_zero_to_fp32", "rss_vs_zero_to_fp32"),
                            ("bf16_rss_vs_zero_to_fp32", "rss_vs_zero_to_fp32"), ("merge_wall_vs_cat", "merge_vs_cp")):
            lines.append(f"| {name} | {key} | {rt[key]} | <= {TARGETS[target]} | {ok(rt[key], TARGETS[target])} |")
        for key in ("fp32_inner_vs_cp", "bf16_inner_vs_cp", "merge_inner_vs_cat", "fp32_inner_vs_zero_to_fp32"):
            lines.append(f"| {name} | {key} (info: conversion only, no start-up) | {rt[key]} | | |")
        lines.append(f"| {name} | fp32_wall_vs_read (info) | {rt['fp32_wall_vs_read']} | | |")
        lines.append(f"| {name} | fp32_wall_vs_cp_plus_read (info) | {rt['fp32_wall_vs_cp_plus_read']} | | |")
        lines.append(f"| {name} | bf16_wall_vs_cp_plus_read (info) | {rt['bf16_wall_vs_cp_plus_read']} | | |")
        pr = c["paired"]
        for key in ("fp32_vs_cp", "bf16_vs_io_floor"):
            lines.append(f"| {name} | {key} (paired, issue 28) | {pr[key]} (per rep {pr[key + '_per_rep']}) | "
                         f"<= {TARGETS[key]} | {ok(pr[key], TARGETS[key])} |")
            lines.append(f"| {name} | {key}_inner (paired, no start-up; info) | {pr[key + '_inner']} | | |")
    for key, val in results.get("scaling", {}).items():
        if "(info)" in key:
            lines.append(f"| scaling | {key} | {val} | | |")
        else:
            lines.append(f"| scaling | {key} | {val} | <= {TARGETS['rss_large_vs_small']} | "
                         f"{ok(val, TARGETS['rss_large_vs_small'])} |")
    lines += [""]
    for c in results["checkpoints"]:
        meta = c["checkpoint"]
        lines.append(f"- {meta['name']}: ZeRO-{meta['stage']} w{meta['world_size']}, generated in "
                     f"{meta['generation_seconds']}s (peak tree RSS {meta['generation_peak_tree_rss_gib']} GiB, "
                     f"load {meta['loadavg_start'][0]:.1f}); zero_to_fp32: {c['zero_to_fp32_mode']}. {meta['note']}")
    return lines


def writer_version() -> dict[str, Any]:
    """Which writer.py is measured (it is edited by others while benchmarks run)."""
    import hashlib

    from vllm_consolidate.write import safetensors as writer

    path = Path(writer.__file__)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "src"], capture_output=True, text=True)
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16], "chunk_bytes": writer.CHUNK_BYTES,
            "cast_chunk_bytes": writer.CAST_CHUNK_BYTES, "workers": writer.WORKERS, "git_head": head.stdout.strip(),
            "src_modified": bool(dirty.stdout.strip())}


def mkf_names() -> set[str]:
    """Names of the DCP checkpoints."""
    return {mkf.SMALL_NAME, mkf.LARGE_NAME}


def main() -> None:
    """Generate (or reuse) the checkpoints, benchmark them, write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None,
                    help="checkpoint names, or the groups 'deepspeed' and 'dcp' (default: all)")
    ap.add_argument("--skip-generate", action="store_true", help="only benchmark checkpoints already cached")
    ap.add_argument("--no-large", action="store_true", help="skip the ~1.5B-shaped checkpoints")
    ap.add_argument("--no-baselines", action="store_true",
                    help="DeepSpeed: ours and the cp / I/O floors only (no zero_to_fp32, no merge)")
    ap.add_argument("--out", default="latest", help="results file stem under bench/results (default: latest)")
    args = ap.parse_args()
    if not Path(TIME).exists():
        raise SystemExit(f"{TIME} missing: apt-get install time")
    compile_sources()

    def wanted(name: str, group: str) -> bool:
        return not args.only or name in args.only or group in args.only

    infos: list[dict[str, Any]] = []
    specs: list[tuple[mk.Spec, str]] = [(s, "") for s in mk.small_specs()]
    if not args.no_large and (not args.only or set(args.only) - {"dcp", *mkf_names()}):
        cached = mk.find_cached_large()
        specs.append((cached, "cached") if cached else mk.large_spec())
    for spec, note in specs:
        if not wanted(spec.name, "deepspeed"):
            continue
        marker = spec.folder() / mk.MARKER
        if marker.is_file():
            infos.append(json.loads(marker.read_text()))
        elif not args.skip_generate:
            infos.append(mk.generate(spec, note))
    dcp_infos: list[dict[str, Any]] = []
    for dspec, note in mkf.specs(args.no_large) if not args.only or set(args.only) & {"dcp", *mkf_names()} else []:
        if not wanted(dspec.name, "dcp"):
            continue
        marker = dspec.folder() / mkf.MARKER
        if marker.is_file():
            dcp_infos.append(json.loads(marker.read_text()))
        elif not args.skip_generate:
            dcp_infos.append(mkf.generate(dspec, note))
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "reps": args.reps,
        "host": f"{os.cpu_count()} cpus, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "cache_policy": "warm: every input read once right before each measured command, for every tool",
        "drop_caches": drop_caches_works(),
        "loadavg_start": os.getloadavg(),
        "writer_start": writer_version(),
        "checkpoints": [],
        "dcp": [],
    }
    for info in infos:
        print(f"{info['name']}: {info['params'] / 1e9:.3f}B, {info['ckpt_bytes'] / 1e9:.2f} GB", flush=True)
        results["checkpoints"].append(bench_checkpoint(info, args.reps, baselines=not args.no_baselines))
    for info in dcp_infos:
        print(f"{info['name']}: {info['params'] / 1e9:.3f}B, {info['ckpt_bytes'] / 1e9:.2f} GB (FSDP2 DCP)", flush=True)
        results["dcp"].append(bench_dcp(info, args.reps))
    by_dcp = {c["checkpoint"]["name"]: c for c in results["dcp"]}
    dsmall, dlarge = by_dcp.get(mkf.SMALL_NAME), by_dcp.get(mkf.LARGE_NAME)
    if dsmall and dlarge:
        sc: dict[str, float] = {}
        for tool in ("ours_fp32", "ours_bf16"):
            sc[f"{tool}_rss_large_vs_small"] = round(
                dlarge["median"][tool]["rss_mib"] / dsmall["median"][tool]["rss_mib"], 3)
        for tool in ("dcp_to_torch_save", "accelerate"):
            a, b = dlarge["median"][tool]["rss_mib"], dsmall["median"][tool]["rss_mib"]
            sc[f"{tool}_rss_large_vs_small (info)"] = round(a / b, 3) if a == a and b == b else float("nan")
        sc["params_large_vs_small (info)"] = round(dlarge["checkpoint"]["params"] / dsmall["checkpoint"]["params"], 3)
        results["dcp_scaling"] = sc
    by_name = {c["checkpoint"]["name"]: c for c in results["checkpoints"]}
    large = by_name.get("qwen1.5b-shape-z3")
    small = by_name.get("qwen0.5b-z3")
    if large and small:
        for tool in ("ours_fp32", "ours_bf16"):
            results.setdefault("scaling", {})[f"{tool}_rss_large_vs_0.5b_z3"] = round(
                large["median"][tool]["rss_mib"] / small["median"][tool]["rss_mib"], 3)
        results["scaling"]["zero_to_fp32_rss_large_vs_0.5b_z3 (info)"] = round(
            large["median"]["zero_to_fp32"]["rss_mib"] / small["median"]["zero_to_fp32"]["rss_mib"], 3)
    results["loadavg_end"] = os.getloadavg()
    results["writer_end"] = writer_version()  # differs from writer_start if writer.py changed mid-run
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=2, default=str))
    table = markdown(results)
    (RESULTS / f"{args.out}.md").write_text(table)
    print(table)
    for c in results["checkpoints"]:
        pr = c["paired"]
        print(f"{c['checkpoint']['name']}: fp32 / (cp+sync) = {pr['fp32_vs_cp']} (target <= {TARGETS['fp32_vs_cp']}), "
              f"bf16 / I/O floor = {pr['bf16_vs_io_floor']} (target <= {TARGETS['bf16_vs_io_floor']}; "
              f"floor {pr['io_floor_bf16_s']} s); paired per rep {pr['fp32_vs_cp_per_rep']}, "
              f"{pr['bf16_vs_io_floor_per_rep']}; CPU s (user + system): ours fp32 {pr.get('ours_fp32_cpu_s')}, "
              f"ours bf16 {pr.get('ours_bf16_cpu_s')}")


if __name__ == "__main__":
    main()
