"""Benchmark ``vllm-consolidate convert`` on Megatron-Core ``torch_dist`` checkpoints (issue 24).

Checkpoints: Qwen2.5-shaped GPT models (QKV bias, tied embeddings, GQA, SwiGLU, RMSNorm) built by megatron-core
0.16.1 itself in ``.venv-megatron`` (local layer spec, TP=2, fp32, gloo on CPU, freshly initialised: no
training step, no optimizer state) and saved as a Megatron-LM run (``latest_checkpointed_iteration.txt``,
``iter_0000001/`` with ``args`` in ``common.pt``, so the config comes from the args) with megatron-core's own
``dist_checkpointing.save(..., 'torch_dist')``. Cached under ``.cache/bench/<key>/`` (the marker
``bench_complete.json`` is written last). Shapes: ``qwen0.5b`` (Qwen2.5-0.5B: 24 layers, hidden 896) and
``qwen1.5b-8l`` (Qwen2.5-1.5B's widths, 8 layers: its embedding, the largest tensor, is 1.7x 0.5B's).

Measured per checkpoint, alternating inside each repetition in this order (ours fp32, then ``cp``, so each rep is
a pair taken back to back), medians reported (``bench/run.py``'s ``measure``: inputs read once before each
command, outputs deleted and synced before it, peak RSS and CPU seconds of the one child process from
``/usr/bin/time -v``):

* ``ours_fp32`` / ``ours_bf16``: ``vllm-consolidate convert --no-validate-vllm`` of the run folder;
* ``dcp_load``: ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save(iter_0000001, out.pt)`` in a child
  process: the full state dict loaded by DCP, as slime's ``convert_torch_dist_to_hf.py`` does (no fsync);
* ``cp``: ``cp`` of the ``.distcp`` files (the bytes ours reads) to a folder, then ``sync`` of them.

Targets: ours' peak RSS <= 3x the largest tensor + a fixed overhead (the interpreter's RSS with torch imported,
measured as a child that imports our CLI and exits), and flat as the model grows; wall <= 1.3x ``cp`` of the bytes
read: reported as the ratio of medians and, steadier on a shared machine, as the median over reps of each rep's
ours / ``cp`` (``paired``), with the load average around the runs.

Usage::

    python bench/megatron_bench.py [--reps 2] [--only qwen0.5b ...] [--no-dcp-load]

``--no-dcp-load`` leaves out the (slow, 2+ GiB) DCP load baseline from the timed runs; the untimed bit-equality
check against it still runs.

The same file is the megatron-core writer (``--worker SPEC``) under ``.venv-megatron``'s torchrun.
Writes ``bench/results/megatron.json`` and ``bench/results/megatron.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench"
MARKER = "bench_complete.json"
TP = 2
MEGATRON_VENVS = (REPO / ".venv-megatron", Path("/work/wt-mcore/.venv-megatron"))
# Qwen2.5 shapes; the padded vocabulary follows Megatron-LM's rule (a multiple of 128 x TP).
SHAPES: dict[str, dict[str, Any]] = {
    "qwen0.5b": dict(layers=24, hidden=896, ffn=4864, heads=14, kv_heads=2, head_dim=64),
    "qwen1.5b-8l": dict(layers=8, hidden=1536, ffn=8960, heads=12, kv_heads=2, head_dim=128),
}
COMMON = dict(vocab=151936, padded_vocab=152064, eps=1e-6, rope_base=1000000.0, qkv_bias=True, qk_norm=False,
              tied=True)


def key_of(name: str) -> str:
    return f"megatron-{name}-tp{TP}-fp32-mcore0.16.1"


def run_dir(name: str) -> Path:
    return CACHE / key_of(name) / "run"


# -- the writer (megatron-core, .venv-megatron) --------------------------------------------------------


def worker(spec_path: str) -> None:
    """One rank of the writer: build the model with TP=2 and save it as a Megatron-LM run (iteration 1)."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    from tests.corpus import megatron_save as ms
    from tests.corpus import megatron_train as mt

    spec = json.loads(Path(spec_path).read_text())
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mt.stub_cuda()
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=TP)
    torch.manual_seed(0)
    par = {"tp": TP, "pp": 1, "ep": 1}
    case = {"model": spec["model"], "parallel": par, "seed": 0, "precision": "fp32", "case_dir": spec["dir"],
            "layer_keys": "stacked", "kind": "megatron_lm"}
    gpt = mt.build_gpt(spec["model"], par, torch.float32)
    meta = ms.sd_metadata(case)
    state = {"args": ms.megatron_lm_args(case, 1), "checkpoint_version": 3.0, "iteration": 1,
             "model": gpt.sharded_state_dict(metadata=meta)}
    folder = Path(spec["dir"]) / "run" / "iter_0000001"
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state, str(folder), content_metadata={k: v for k, v in meta.items() if k != "dp_cp_group"})
    dist.barrier()
    if dist.get_rank() == 0:
        (Path(spec["dir"]) / "run" / "latest_checkpointed_iteration.txt").write_text("1")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate(name: str) -> Path:
    """The cached run of ``name``, written by megatron-core when missing."""
    top = CACHE / key_of(name)
    if (top / MARKER).is_file():
        return top / "run"
    venv = next((v for v in MEGATRON_VENVS if (v / "bin" / "torchrun").exists()), None)
    if venv is None:
        raise SystemExit("no .venv-megatron: run scripts/setup_megatron_venv.sh")
    shutil.rmtree(top, ignore_errors=True)
    top.mkdir(parents=True)
    spec = top / "spec.json"
    spec.write_text(json.dumps({"model": {**SHAPES[name], **COMMON}, "dir": str(top)}))
    t0 = time.monotonic()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    subprocess.run([str(venv / "bin" / "torchrun"), "--nproc_per_node", str(TP), "--master_port", str(_free_port()),
                    __file__, "--worker", str(spec)], check=True, env=env)
    (top / MARKER).write_text(json.dumps({"seconds": round(time.monotonic() - t0, 1), "shape": SHAPES[name]}))
    return top / "run"


# -- the measurements (main venv) -------------------------------------------------------------------------


def bench_one(name: str, reps: int, dcp_load: bool = True) -> dict[str, Any]:
    import run as rb

    run = generate(name)
    iter_dir = run / "iter_0000001"
    distcp = sorted(iter_dir.glob("*.distcp"))
    work = rb.WORK / key_of(name)
    work.mkdir(parents=True, exist_ok=True)
    out = {"ours_fp32": work / "ours_fp32", "ours_bf16": work / "ours_bf16", "dcp_load": work / "dcp.pt",
           "cp": work / "cp"}
    shape = {**SHAPES[name], **COMMON}
    cmds = {  # ours fp32 then cp: each rep's pair back to back
        "ours_fp32": rb.ours(run, out["ours_fp32"], "--base-model-name", ""),
        "cp": rb.sh(f"mkdir -p {out['cp']} && cp {' '.join(map(str, distcp))} {out['cp']}/ && sync {out['cp']}/*"),
        "ours_bf16": rb.ours(run, out["ours_bf16"], "--base-model-name", "", "--dtype", "bfloat16"),
        "dcp_load": [sys.executable, "-c", rb.DCP_TO_TORCH_SAVE, str(iter_dir), str(out["dcp_load"])],
    }
    if not dcp_load:
        del cmds["dcp_load"]
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in cmds}
    env = timing_env()
    for rep in range(reps):
        for tool, cmd in cmds.items():
            rec = rb.measure(cmd, [iter_dir] if tool != "ours_fp32" else [run], [out[tool]], env=env)
            rec["rep"] = rep
            if tool == "ours_fp32" and rep == 0 and rec["exit"] == 0:
                rec["output_bytes"] = rb.path_bytes(out[tool])
            runs[tool].append(rec)
            print(f"{name} {tool} rep {rep}: {rec['wall_s']:.2f} s, {rec['rss_mib']:.0f} MiB, "
                  f"cpu {rec['cpu_s']:.2f} s, exit {rec['exit']}, load {rec['loadavg_before'][0]:.1f}", flush=True)
    rb.clean(*out.values())
    med = {tool: {"wall_s": rb.median(r, "wall_s"), "rss_mib": rb.median(r, "rss_mib"), "cpu_s": rb.median(r, "cpu_s")}
           for tool, r in runs.items()}
    largest = shape["padded_vocab"] * shape["hidden"] * 4  # the fp32 embedding (tied: no output layer)
    return {"name": name, "shape": shape, "tp": TP, "read_bytes": sum(p.stat().st_size for p in distcp),
            "files": len(distcp), "largest_tensor_mib": round(largest / 2**20, 1), "runs": runs, "median": med}


def timing_env() -> dict[str, str]:
    """The timed children's environment, with our modules compiled (untimed, here) as an installed tool has them:
    with ``PYTHONDONTWRITEBYTECODE`` (set in some shells) every timed run compiled them again, ~0.2 s each."""
    import run as rb

    import vllm_consolidate

    env = {k: v for k, v in rb.ENV.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(vllm_consolidate.__file__).parent)], env=env,
                   check=True, capture_output=True)
    return env


def verify(name: str) -> dict[str, Any]:
    """Untimed: our fp32 output against the model tensors ``torch.distributed.checkpoint.load`` reads, mapped to HF
    names by the corpus's own map (tests/corpus/megatron_hf.py, the one the logits check verified): bit equality."""
    import run as rb
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    sys.path.insert(0, str(REPO))
    from tests.corpus import megatron_hf

    run = run_dir(name)
    out = rb.WORK / key_of(name) / "verify"
    rb.clean(out)
    subprocess.run(rb.ours(run, out, "--base-model-name", ""), check=True, env=rb.ENV, capture_output=True)
    reader = dcp.FileSystemReader(str(run / "iter_0000001"))
    metadata = reader.read_metadata().state_dict_metadata
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.items()
          if isinstance(m, TensorStorageMetadata)}
    dcp.load(sd, storage_reader=reader, no_dist=True)
    want = megatron_hf.to_hf(sd, {**SHAPES[name], **COMMON}, per_layer=False)
    del sd
    got = load_file(rb.single_file(out))
    rb.clean(out)
    equal = sum(1 for k, v in want.items() if k in got and got[k].dtype == v.dtype and torch.equal(got[k], v))
    return {"tensors_ours": len(got), "tensors_dcp": len(want), "same_names": sorted(got) == sorted(want),
            "bit_equal": equal}


def baseline_rss_mib() -> float:
    """Peak RSS of our CLI started with torch imported and nothing to do (the fixed overhead)."""
    import run as rb

    code = "import torch, vllm_consolidate.cli, vllm_consolidate.convert"
    return rb.measure([sys.executable, "-c", code], [], [])["rss_mib"]


def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    """Each target, measured."""
    base, out = results["fixed_overhead_mib"], {}
    for r in results["checkpoints"]:
        med, largest = r["median"], r["largest_tensor_mib"]
        for tool in ("ours_fp32", "ours_bf16"):
            out[f"{r['name']} {tool} rss / (3x largest + overhead)"] = round(
                med[tool]["rss_mib"] / (3 * largest + base), 3)
            out[f"{r['name']} {tool} wall / cp"] = round(med[tool]["wall_s"] / med["cp"]["wall_s"], 3)
            out[f"{r['name']} {tool} wall / cp, paired"] = paired(r["runs"][tool], r["runs"]["cp"])
        if "dcp_load" in med:
            theirs, ours = med["dcp_load"]["rss_mib"], med["ours_fp32"]["rss_mib"]
            out[f"{r['name']} dcp_load rss / ours_fp32 rss"] = round(theirs / ours, 2)
    return out


def paired(ours: list[dict[str, Any]], cp: list[dict[str, Any]]) -> float:
    """Median over reps of ours / ``cp`` in the same rep (runs that failed left out); NaN when none."""
    import statistics

    per = [o["wall_s"] / c["wall_s"] for o, c in zip(ours, cp) if o["exit"] == 0 and c["exit"] == 0]
    return round(statistics.median(per), 3) if per else float("nan")


def load_range(results: dict[str, Any]) -> str:
    """The 1-minute load average before the timed runs: lowest-highest."""
    loads = [rec["loadavg_before"][0] for r in results["checkpoints"] for runs in r["runs"].values() for rec in runs]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a"


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Megatron-Core torch_dist (TP=2, fp32) -> HF folder", "",
             f"Machine: {results['machine']}; load average before the runs {load_range(results)}; reps "
             f"{results['reps']} (median). Fixed overhead (interpreter + torch + our imports): "
             f"{results['fixed_overhead_mib']:.0f} MiB.", "",
             "| checkpoint | read (GB) | largest tensor (MiB) | tool | wall (s) | CPU (s) | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in results["checkpoints"]:
        for tool, m in r["median"].items():
            lines.append(f"| {r['name']} | {r['read_bytes'] / 1e9:.2f} | {r['largest_tensor_mib']:.0f} | {tool} | "
                         f"{m['wall_s']:.2f} | {m.get('cpu_s', float('nan')):.2f} | {m['rss_mib']:.0f} |")
    checks = [f"{r['name']}: {r['verify']['bit_equal']}/{r['verify']['tensors_dcp']} tensors bit-equal"
              f"{'' if r['verify']['same_names'] else ' (names differ)'}" for r in results["checkpoints"]]
    lines += ["", "Our fp32 output vs `torch.distributed.checkpoint.load` of the same save, mapped by the corpus's "
              "map: " + "; ".join(checks)]
    lines += ["", "| target | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in results["verdicts"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=list(SHAPES))
    parser.add_argument("--no-dcp-load", action="store_true", help="leave the DCP load baseline out of the timed runs")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    checkpoints = [bench_one(name, args.reps, not args.no_dcp_load) for name in args.only]
    for record in checkpoints:
        record["verify"] = verify(record["name"])
    results = {"machine": f"{os.cpu_count()} CPUs, loadavg {os.getloadavg()[0]:.1f}", "reps": args.reps,
               "fixed_overhead_mib": baseline_rss_mib(), "checkpoints": checkpoints}
    results["verdicts"] = verdicts(results)
    results_dir = REPO / "bench" / "results"
    (results_dir / "megatron.json").write_text(json.dumps(results, indent=2) + "\n")
    (results_dir / "megatron.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
