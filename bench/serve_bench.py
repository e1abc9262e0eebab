"""Benchmark serving a ZeRO checkpoint with vLLM: ``--load-format consolidate`` against ``convert`` + load.

On the 0.5B bench checkpoint (``make_checkpoints.py``: Qwen2.5-0.5B shape, ZeRO-3 by default, world
size 2, bf16 training, fp32 masters + Adam moments on disk, cached under ``.cache/bench/``), N
repetitions in one run, the two paths alternating (their order flips every repetition), medians
reported:

* ``plugin``: one vLLM process (``.venv-vllm``) that builds ``LLM(model=CKPT, load_format="consolidate")``
  and generates one token;
* ``convert + load``: ``vllm-consolidate convert --input CKPT --output OUT --dtype bfloat16
  --no-validate-vllm`` (the fastest convert; its default validation would add to it), then the same
  vLLM process on ``OUT`` (vLLM's default loader).

Both vLLM processes are identical apart from the model and load format: the engine runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``distributed_executor_backend="uni"``, as the project's probe
runs it: a served ``vllm serve`` adds the same engine-process start-up to both paths), eager mode,
bf16, a 1 GiB KV cache, ``skip_tokenizer_init`` (the bench checkpoint has no tokenizer) and a prompt
of token ids.

Measured:

* time to the first token: from just before the vLLM process is started to the moment ``generate``
  returns its first token (``time.time()`` on both sides); for ``convert + load`` the convert's wall
  time is added (the convert's output is still in the page cache when vLLM reads it: no disadvantage);
* peak RSS of the vLLM process (``/usr/bin/time -v``: ``ru_maxrss`` of that one process) and of the convert;
* disk written: ``/usr/bin/time -v``'s "File system outputs" (``ru_oublock``, 512-byte units: Linux
  counts ``write_bytes`` of ``/proc/<pid>/io`` there, at page-dirtying time) for each process, the
  bytes of the convert's output folder, and ``/proc/self/io`` ``write_bytes`` across the plugin's
  weight streaming alone (inside the vLLM process). vLLM writes a little of its own in both paths
  (a few KiB); the plugin itself must write 0 bytes;
* inside the vLLM process: import, ``LLM()`` and ``generate`` seconds, how long the plugin streamed, and
  how long the model loader's ``load_weights`` took in either path (timed around it, the same way for
  both loaders);
* the floor: time to the first token minus ``load_weights`` in the folder path, i.e. everything vLLM does
  besides reading weights (import, config, model and KV cache set-up, one forward). No load format can
  start faster than that, so ``floor / (convert + load)`` is the best ratio any loader could reach here.

Before each measured command the checkpoint is read once (page cache warm for both paths, as
``run.py`` does); outputs are deleted and ``sync``-ed before the next.

Writes ``bench/results/serve_latest.json`` and ``bench/results/serve_latest.md`` and prints the table.

Usage::

    python bench/serve_bench.py [--reps 3] [--checkpoint qwen0.5b-z3|qwen0.5b-z2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_checkpoints as mk  # noqa: E402
import run as convert_bench  # noqa: E402  (warm, clean, /usr/bin/time -v parsing)

REPO = mk.REPO
WORK = REPO / ".cache" / "bench-work" / "serve"
RESULTS = REPO / "bench" / "results"
BIN = Path(sys.executable).parent
VLLM_PYTHON = Path(os.environ.get("VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
TIME = "/usr/bin/time"
TARGET_RATIO = 0.6
PROMPT = [5, 17, 42, 99, 7, 1024, 3000, 151]
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
}

# The vLLM side: one LLM, one generated token, one JSON line on the original stdout.
DRIVER = r'''
import json, os, sys, time
t0 = time.time()
out_fd = os.dup(1)
os.dup2(2, 1)
request = json.loads(sys.argv[1])

def io_write_bytes():
    for line in open("/proc/self/io"):
        if line.startswith("write_bytes:"):
            return int(line.split()[1])

from vllm import LLM, SamplingParams
t_import = time.time()
streamed, loaded = {}, {}

# Time the loader's load_weights (whichever loader it is) without changing what it does.
from vllm.model_executor.model_loader import base_loader
import functools
original_load_model = base_loader.BaseModelLoader.load_model
@functools.wraps(original_load_model)  # keeps the signature the plugin's version guard checks
def timed_load_model(self, *args, **kwargs):
    inner = self.load_weights
    def timed(model, model_config):
        start = time.monotonic()
        inner(model, model_config)
        loaded["seconds"] = round(time.monotonic() - start, 3)
    self.load_weights = timed
    return original_load_model(self, *args, **kwargs)
base_loader.BaseModelLoader.load_model = timed_load_model
if request["llm"].get("load_format") == "consolidate":
    from vllm_consolidate.serve import vllm_plugin as vp
    original = vp.iter_weights
    def watched(*args, **kwargs):
        start, before = time.monotonic(), io_write_bytes()
        n = 0
        for item in original(*args, **kwargs):
            n += 1
            yield item
        streamed.update(tensors=n, seconds=round(time.monotonic() - start, 3), write_bytes=io_write_bytes() - before)
    vp.iter_weights = watched
llm = LLM(**request["llm"])
t_llm = time.time()
params = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)
out = llm.generate([{"prompt_token_ids": request["prompt"]}], params, use_tqdm=False)
t_token = time.time()
result = {"first_token_at": t_token, "started_at": t0, "import_s": round(t_import - t0, 3),
          "llm_s": round(t_llm - t_import, 3), "generate_s": round(t_token - t_llm, 3),
          "token": list(out[0].outputs[0].token_ids), "dtype": str(llm.llm_engine.model_config.dtype),
          "streamed": streamed, "load_weights_s": loaded.get("seconds"), "write_bytes_total": io_write_bytes()}
os.write(out_fd, (json.dumps(result) + "\n").encode())
os._exit(0)
'''


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[dict[str, Any], str]:
    """Run ``cmd`` under ``/usr/bin/time -v``; wall time, peak RSS, bytes written, and its stdout."""
    load_before = os.getloadavg()
    t0 = time.time()
    proc = subprocess.run([TIME, "-v", *cmd], env=env, capture_output=True, text=True)
    wall = time.time() - t0
    parsed = convert_bench._parse_time_v(proc.stderr)
    outputs = 0
    for line in proc.stderr.splitlines():
        if line.strip().startswith("File system outputs:"):
            outputs = int(line.rsplit(":", 1)[1]) * 512
    rec: dict[str, Any] = {
        "started_at": t0, "wall_s": round(wall, 3), "rss_mib": round(parsed.get("rss_mib", float("nan")), 1),
        "exit": int(parsed.get("exit", proc.returncode)), "fs_output_bytes": outputs,
        "loadavg_before": [round(x, 2) for x in load_before],
    }
    if rec["exit"] != 0:
        rec["stderr_tail"] = proc.stderr.split("\tCommand being timed:")[0][-3000:]
    return rec, proc.stdout


def vllm_run(model: Path, load_format: str) -> dict[str, Any]:
    """One vLLM process: load ``model`` and generate a token; time to that token, RSS, bytes written."""
    llm = {"model": str(model), "load_format": load_format, "dtype": "bfloat16", "enforce_eager": True,
           "max_model_len": 256, "max_num_seqs": 1, "skip_tokenizer_init": True, "seed": 0,
           "distributed_executor_backend": "uni"}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(VLLM_ENV)
    rec, stdout = _timed([str(VLLM_PYTHON), "-c", DRIVER, json.dumps({"llm": llm, "prompt": PROMPT})], env)
    if rec["exit"] == 0:
        inner = json.loads(stdout.strip().splitlines()[-1])
        rec["ttft_s"] = round(inner.pop("first_token_at") - rec["started_at"], 3)
        rec["startup_s"] = round(inner.pop("started_at") - rec["started_at"], 3)
        rec.update(inner)
        if rec.get("load_weights_s") is not None:
            rec["without_load_s"] = round(rec["ttft_s"] - rec["load_weights_s"], 3)
    return rec


def convert_run(ckpt: Path, out: Path) -> dict[str, Any]:
    """``vllm-consolidate convert`` to bf16 (no validation): wall time, RSS, bytes written."""
    cmd = [str(BIN / "vllm-consolidate"), "convert", "--input", str(ckpt), "--output", str(out), "--dtype",
           "bfloat16", "--no-validate-vllm", "--json"]
    rec, stdout = _timed(cmd, dict(convert_bench.ENV))
    if rec["exit"] == 0:
        rec["output_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        rec["inner_s"] = round(json.loads(stdout)["seconds"], 3)
    return rec


def median(runs: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in runs if r.get("exit") == 0 and key in r]
    return round(statistics.median(vals), 3) if vals else float("nan")


def bench(spec: mk.Spec, reps: int) -> dict[str, Any]:
    info = mk.generate(spec)
    ckpt = spec.ckpt()
    WORK.mkdir(parents=True, exist_ok=True)
    out = WORK / f"{spec.name}-bf16"
    convert_bench.clean(out)
    runs: dict[str, list[dict[str, Any]]] = {"plugin": [], "convert": [], "folder_load": [], "convert_plus_load": []}
    for rep in range(reps):
        order = ("plugin", "convert") if rep % 2 == 0 else ("convert", "plugin")
        for path in order:
            convert_bench.clean(out)
            warm_s = convert_bench.warm([ckpt])
            if path == "plugin":
                rec = vllm_run(ckpt, "consolidate")
                rec.update(rep=rep, warm_s=round(warm_s, 2))
                runs["plugin"].append(rec)
                print(f"  rep {rep} plugin          ttft {rec.get('ttft_s', float('nan')):7.2f}s "
                      f"rss {rec['rss_mib']:8.1f} MiB wrote {rec['fs_output_bytes']:>10} B exit {rec['exit']} "
                      f"load {rec['loadavg_before'][0]:.2f}", flush=True)
                continue
            conv = convert_run(ckpt, out)
            conv.update(rep=rep, warm_s=round(warm_s, 2))
            load = vllm_run(out, "auto") if conv["exit"] == 0 else {"exit": -1}
            load["rep"] = rep
            runs["convert"].append(conv)
            runs["folder_load"].append(load)
            total = {"rep": rep, "exit": max(conv["exit"], load["exit"])}
            if total["exit"] == 0:
                total["ttft_s"] = round(conv["wall_s"] + load["ttft_s"], 3)
                total["written_bytes"] = conv["fs_output_bytes"] + load["fs_output_bytes"]
            runs["convert_plus_load"].append(total)
            print(f"  rep {rep} convert + load  ttft {total.get('ttft_s', float('nan')):7.2f}s "
                  f"(convert {conv['wall_s']:.2f}s + vLLM {load.get('ttft_s', float('nan')):.2f}s) "
                  f"rss {load.get('rss_mib', float('nan')):8.1f} MiB wrote {total.get('written_bytes', 0):>10} B "
                  f"exit {total['exit']} load {conv['loadavg_before'][0]:.2f}", flush=True)
    convert_bench.clean(out)
    tokens = {tuple(r["token"]) for name in ("plugin", "folder_load") for r in runs[name] if r.get("exit") == 0}
    med = {
        "plugin": {k: median(runs["plugin"], k) for k in ("ttft_s", "rss_mib", "fs_output_bytes", "import_s",
                                                          "llm_s", "generate_s", "load_weights_s",
                                                          "without_load_s")},
        "convert": {k: median(runs["convert"], k) for k in ("wall_s", "inner_s", "rss_mib", "fs_output_bytes",
                                                            "output_bytes")},
        "folder_load": {k: median(runs["folder_load"], k) for k in ("ttft_s", "rss_mib", "fs_output_bytes",
                                                                    "import_s", "llm_s", "generate_s",
                                                                    "load_weights_s", "without_load_s")},
        "convert_plus_load": {k: median(runs["convert_plus_load"], k) for k in ("ttft_s", "written_bytes")},
    }
    med["plugin"]["stream_s"] = round(statistics.median(
        [r["streamed"]["seconds"] for r in runs["plugin"] if r.get("exit") == 0]), 3) if runs["plugin"] else None
    streamed_writes = [r["streamed"].get("write_bytes") for r in runs["plugin"] if r.get("exit") == 0]
    ratio = med["plugin"]["ttft_s"] / med["convert_plus_load"]["ttft_s"]
    return {
        "checkpoint": {k: info.get(k) for k in ("name", "key", "params", "stage", "world_size", "ds_version")},
        "checkpoint_bytes": sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()),
        "median": med,
        "ratio_ttft_plugin_vs_convert_plus_load": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "floor_s": med["folder_load"]["without_load_s"],
        "best_possible_ratio": round(med["folder_load"]["without_load_s"] / med["convert_plus_load"]["ttft_s"], 3),
        "meets_target": ratio <= TARGET_RATIO,
        "plugin_streaming_write_bytes": streamed_writes,
        "same_first_token": len(tokens) == 1,
        "runs": runs,
    }


def markdown(result: dict[str, Any]) -> str:
    m = result["median"]
    p, c, f, t = m["plugin"], m["convert"], m["folder_load"], m["convert_plus_load"]
    ck = result["checkpoint"]

    def gib(n: float) -> str:
        return f"{n / 2**30:.2f} GiB"

    lines = [
        f"# Serve without consolidating: {ck['name']} ({ck['params'] / 1e9:.3f}B params, ZeRO-{ck['stage']}, "
        f"world size {ck['world_size']}, {gib(result['checkpoint_bytes'])} on disk)",
        "",
        f"Medians of {len(result['runs']['plugin'])} (vLLM {result.get('vllm_version', '?')}, bf16, CPU, "
        f"in-process engine). Lower is better.",
        "",
        "| path | time to first token | peak RSS (vLLM process) | disk written |",
        "|---|---:|---:|---:|",
        f"| `--load-format consolidate` | {p['ttft_s']:.2f} s | {p['rss_mib']:.0f} MiB | "
        f"{p['fs_output_bytes']:.0f} B (vLLM's own; plugin streaming: "
        f"{', '.join(str(b) for b in result['plugin_streaming_write_bytes'])} B) |",
        f"| `convert` + vLLM load | {t['ttft_s']:.2f} s ({c['wall_s']:.2f} s + {f['ttft_s']:.2f} s) | "
        f"{f['rss_mib']:.0f} MiB (convert: {c['rss_mib']:.0f} MiB) | {t['written_bytes'] / 1e9:.2f} GB "
        f"(output folder {c['output_bytes'] / 1e9:.2f} GB) |",
        f"| floor: vLLM without reading weights (folder path minus its `load_weights`) | {result['floor_s']:.2f} s "
        f"| - | - |",
        "",
        f"Ratio plugin / (convert + load): **{result['ratio_ttft_plugin_vs_convert_plus_load']:.2f}** "
        f"(target <= {result['target_ratio']}: {'met' if result['meets_target'] else 'NOT met'}). "
        f"Best ratio any load format could reach here (floor / (convert + load)): "
        f"**{result['best_possible_ratio']:.2f}**.",
        "",
        "Inside the vLLM process (medians): "
        f"plugin: import {p['import_s']:.1f} s, LLM() {p['llm_s']:.1f} s (of which streaming the weights "
        f"{p['stream_s']:.1f} s, load_weights {p['load_weights_s']:.1f} s), first token {p['generate_s']:.2f} s; "
        f"folder: import {f['import_s']:.1f} s, LLM() {f['llm_s']:.1f} s (load_weights {f['load_weights_s']:.1f} s), "
        f"first token {f['generate_s']:.2f} s. "
        f"Same first token on every run: {result['same_first_token']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--checkpoint", default="qwen0.5b-z3", choices=[s.name for s in mk.small_specs()])
    args = parser.parse_args()
    if not os.access(VLLM_PYTHON, os.X_OK):
        raise SystemExit(f"no vLLM interpreter at {VLLM_PYTHON}: run scripts/setup_vllm_venv.sh")
    spec = next(s for s in mk.small_specs() if s.name == args.checkpoint)
    version = subprocess.run([str(VLLM_PYTHON), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                             capture_output=True, text=True).stdout.strip()
    started = time.time()
    print(f"{spec.name}: {args.reps} reps, vLLM {version}", flush=True)
    result = bench(spec, args.reps)
    result.update(vllm_version=version, reps=args.reps, seconds=round(time.time() - started, 1),
                  nproc=os.cpu_count(), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_latest.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (RESULTS / "serve_latest.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
