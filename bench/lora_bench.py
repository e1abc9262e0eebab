"""Benchmark merging a LoRA adapter into a Qwen2.5-0.5B-shaped fp32 base: ``vllm-consolidate convert`` vs peft.

The inputs are built once and cached under ``.cache/bench/lora-0.5b/`` (complete once ``bench_complete.json``
exists, written last):

* ``base/``: transformers ``save_pretrained`` of a randomly initialised Qwen2 of Qwen2.5-0.5B's shape (the
  ``Qwen2Config`` of ``make_checkpoints.py``: vocab 151936, hidden 896, 24 layers, intermediate 4864, 14 heads,
  2 KV heads, tied embeddings), in float32. No tokenizer (``make_checkpoints.py`` saves none either).
* ``adapter/``: peft ``save_pretrained`` of ``LoraConfig(r=16, lora_alpha=32)`` on all seven linear layers
  (q, k, v, o, gate, up, down), ``lora_B`` set to random non-zero values (N(0, 0.02)), so every merged weight
  changes. Its ``base_model_name_or_path`` is the absolute path of ``base/``.

Measured, in one run, ``--reps`` repetitions (tools alternate inside each), medians reported:

* ``ours_fp32`` / ``ours_bf16``: ``vllm-consolidate convert --input adapter/ --output OUT --no-validate-vllm
  --json`` (``--dtype bfloat16`` for bf16): the merged model, one safetensors file;
* ``ours_fp32_validated``: the same with the default validation on (fp32);
* ``base_fp32`` / ``base_bf16``: our tool converting ``base/`` alone (``--force`` / ``--dtype bfloat16``),
  no LoRA: the reference for "the constant" in the claim below;
* ``peft``: a child Python process running ``AutoModelForCausalLM.from_pretrained(base, dtype=float32)``,
  ``PeftModel.from_pretrained(model, adapter).merge_and_unload()``, ``save_pretrained(OUT)``.

Wall time: ``time.monotonic`` around the child (start-up and imports included; ours' own ``--json`` seconds kept
as ``inner_s``). Peak RSS: ``/usr/bin/time -v``'s "Maximum resident set size" of that one child (as in
``bench/run.py``). Inputs are read once before each command (warm page cache); earlier outputs are deleted and
``sync``-ed first. Ours fsyncs its output; peft's ``save_pretrained`` does not, so the time an fsync of peft's
output takes right after it is recorded (``fsync_s``) but not added.

Untimed, once: our fp32 output is compared with peft's, tensor by tensor, bit for bit, and our bf16 output
with peft's cast to bf16.

The claim checked (issue 15): our peak RSS is about the largest base tensor plus a constant (it does not grow
with the model). Reported: largest base tensor, largest merged (LoRA target) tensor, our peak RSS, the same
tool's peak RSS without LoRA, and peft's.

Writes ``bench/results/lora.json`` and ``bench/results/lora.md``.

Usage::

    python bench/lora_bench.py [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_checkpoints as mk  # noqa: E402
import run as convert_bench  # noqa: E402  (warm, clean, measure)

REPO = mk.REPO
CACHE = mk.CACHE / "lora-0.5b"
BASE = CACHE / "base"
ADAPTER = CACHE / "adapter"
MARKER = CACHE / "bench_complete.json"
WORK = REPO / ".cache" / "bench-work" / "lora"
RESULTS = REPO / "bench" / "results"
BIN = Path(sys.executable).parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
           TOKENIZERS_PARALLELISM="false")
RANK, ALPHA = 16, 32
DISK_MARGIN = 2 * 2**30  # free disk kept beyond an output's size, else the command is skipped
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPEC = {"shape": asdict(mk.QWEN_05B), "r": RANK, "alpha": ALPHA, "targets": TARGETS, "base_dtype": "float32",
        "b_init": "normal(0, 0.02), seed 1", "peft": version("peft"), "transformers": version("transformers")}
PEFT_MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
merged = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
merged.save_pretrained(sys.argv[3])
"""


# --------------------------------------------------------------------------- inputs (built once, in a child)


def build_inputs() -> None:
    """Child process: write ``base/`` and ``adapter/`` (see the module docstring)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    s = mk.QWEN_05B
    config = Qwen2Config(  # make_checkpoints.py's Qwen2.5-0.5B config, in float32
        vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers, intermediate_size=s.intermediate,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, tie_word_embeddings=True,
        max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6, hidden_act="silu",
        bos_token_id=151643, eos_token_id=151643,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(BASE)
    model = AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32)  # so the adapter names BASE
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    peft_model.save_pretrained(ADAPTER)


def ensure_inputs() -> dict[str, Any]:
    """Build the cached inputs unless a complete copy of the same spec exists; return the marker."""
    if MARKER.is_file():
        info = json.loads(MARKER.read_text())
        if info.get("spec") == SPEC:
            return info
    if CACHE.exists():
        shutil.rmtree(CACHE)
    CACHE.mkdir(parents=True)
    t0 = time.monotonic()
    subprocess.run([sys.executable, __file__, "--build"], env=ENV, check=True)
    info = {"spec": SPEC, "build_seconds": round(time.monotonic() - t0, 1), **describe()}
    MARKER.write_text(json.dumps(info, indent=2))
    return info


def describe() -> dict[str, Any]:
    """Sizes from the safetensors headers: base, adapter, largest base tensor, largest LoRA target."""

    def header(path: Path) -> dict[str, Any]:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            return {k: v for k, v in json.loads(fh.read(n)).items() if k != "__metadata__"}

    (base_file,) = sorted(BASE.glob("*.safetensors"))
    base = header(base_file)

    def nbytes(v: dict[str, Any]) -> int:
        return v["data_offsets"][1] - v["data_offsets"][0]

    largest = max(base, key=lambda k: nbytes(base[k]))
    targets = [k for k in base if k.endswith(".weight") and k.split(".")[-2] in TARGETS]
    largest_target = max(targets, key=lambda k: nbytes(base[k]))
    adapter = header(ADAPTER / "adapter_model.safetensors")
    return {
        "base_params": sum(math.prod(v["shape"]) for v in base.values()),
        "base_bytes": base_file.stat().st_size,
        "adapter_bytes": (ADAPTER / "adapter_model.safetensors").stat().st_size,
        "adapter_tensors": len(adapter),
        "lora_modules": len(targets),
        "largest_tensor": {"name": largest, "shape": base[largest]["shape"], "bytes": nbytes(base[largest])},
        "largest_target": {"name": largest_target, "shape": base[largest_target]["shape"],
                           "bytes": nbytes(base[largest_target])},
    }


# --------------------------------------------------------------------------- measuring (as bench/run.py)


def fsync_tree(path: Path) -> float:
    t0 = time.monotonic()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return round(time.monotonic() - t0, 3)


def measure(cmd: list[str], out: Path) -> dict[str, Any]:
    """``run.measure`` with this bench's inputs warmed, ``out`` cleaned first, and its environment."""
    return convert_bench.measure(cmd, [BASE, ADAPTER], [out], env=ENV)


def ours(src: Path, out: Path, *extra: str) -> list[str]:
    return [str(BIN / "vllm-consolidate"), "convert", "--input", str(src), "--output", str(out), "--json", *extra]


def commands() -> dict[str, tuple[list[str], Path]]:
    """Tool name -> (command line, output folder). peft first: in the first repetition its output is kept until
    ours are compared with it."""
    o = {name: WORK / name for name in ("peft", "ours_fp32", "ours_bf16", "ours_fp32_validated", "base_fp32",
                                        "base_bf16", "torch_import")}
    return {
        "peft": ([sys.executable, "-c", PEFT_MERGE, str(BASE), str(ADAPTER), str(o["peft"])], o["peft"]),
        "ours_fp32": (ours(ADAPTER, o["ours_fp32"], "--no-validate-vllm"), o["ours_fp32"]),
        "ours_bf16": (ours(ADAPTER, o["ours_bf16"], "--no-validate-vllm", "--dtype", "bfloat16"), o["ours_bf16"]),
        "ours_fp32_validated": (ours(ADAPTER, o["ours_fp32_validated"]), o["ours_fp32_validated"]),
        "base_fp32": (ours(BASE, o["base_fp32"], "--no-validate-vllm", "--force"), o["base_fp32"]),
        "base_bf16": (ours(BASE, o["base_bf16"], "--no-validate-vllm", "--dtype", "bfloat16"), o["base_bf16"]),
        "torch_import": ([sys.executable, "-c", "import torch"], o["torch_import"]),
    }


def free_disk() -> int:
    st = os.statvfs(WORK)
    return st.f_bavail * st.f_frsize


# --------------------------------------------------------------------------- correctness (untimed, in a child)


def compare(ours_out: Path, peft_out: Path) -> None:
    """Child process: print a JSON verdict of ours (fp32 or bf16) vs peft's fp32 merge, bit for bit."""
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        """Tensor name -> the safetensors file holding it (one file or shards)."""
        where = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "pt") as fh:
                where.update(dict.fromkeys(fh.keys(), f))
        return where

    def get(where: dict[str, Path], key: str) -> torch.Tensor:
        with safe_open(where[key], "pt") as fh:
            return fh.get_tensor(key)

    theirs, mine = tensors(peft_out), tensors(ours_out)
    verdict: dict[str, Any] = {"peft_keys": len(theirs), "ours_keys": len(mine), "same_keys": set(theirs) == set(mine),
                               "differ": []}
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
    for k in sorted(set(theirs) & set(mine)):
        a = get(mine, k)
        t = get(theirs, k).to(a.dtype)
        if a.dtype not in ints or not torch.equal(a.view(ints[a.dtype]), t.view(ints[a.dtype])):
            verdict["differ"].append(k)
    print(json.dumps(verdict))


# --------------------------------------------------------------------------- report


def median(runs: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in runs if r.get("exit") == 0 and key in r]
    return round(statistics.median(vals), 3) if vals else float("nan")


def markdown(res: dict[str, Any]) -> str:
    info, med = res["inputs"], res["median"]
    mib = 2**20
    lt, lg = info["largest_tensor"], info["largest_target"]
    lines = [
        f"# LoRA merge benchmark ({res['when']}, {res['reps']} reps, median)",
        "",
        f"Host: {os.cpu_count()} cpus, {res['mem_total_gib']} GiB, shared (load averages below). Warm page cache.",
        f"Base: Qwen2.5-0.5B-shaped qwen2, {info['base_params'] / 1e9:.3f}B params, fp32, "
        f"{info['base_bytes'] / 1e9:.2f} GB, one safetensors file, tied embeddings. "
        f"Adapter: peft LoRA r={RANK} alpha={ALPHA} on {', '.join(TARGETS)} "
        f"({info['lora_modules']} modules, {info['adapter_bytes'] / 1e6:.1f} MB fp32), random non-zero B.",
        f"Largest base tensor: `{lt['name']}` {lt['shape']} = {lt['bytes'] / mib:.1f} MiB. "
        f"Largest merged (LoRA-target) tensor: `{lg['name']}` {lg['shape']} = {lg['bytes'] / mib:.1f} MiB.",
        f"peft {SPEC['peft']}, transformers {SPEC['transformers']}, torch {version('torch')}, "
        f"vllm-consolidate at git {res['git_head']}.",
        "",
        "| tool | what | wall s | inner s | peak RSS MiB | output GB | load (1m) |",
        "|---|---|---|---|---|---|---|",
    ]
    what = {"ours_fp32": "merge, fp32, --no-validate-vllm", "ours_bf16": "merge, bf16, --no-validate-vllm",
            "ours_fp32_validated": "merge, fp32, validation on (default)", "base_fp32": "base alone, fp32 (--force)",
            "base_bf16": "base alone, bf16", "peft": "from_pretrained + merge_and_unload + save_pretrained",
            "torch_import": "python -c 'import torch' (reference)"}
    for name, m in med.items():
        runs = res["runs"][name]
        loads = [r["loadavg_before"][0] for r in runs]
        inner = "" if m["inner_s"] != m["inner_s"] else f"{m['inner_s']:.2f}"
        out_gb = "" if m["output_gb"] != m["output_gb"] else f"{m['output_gb']:.2f}"
        fs = f" (+fsync {m['fsync_s']:.2f})" if name == "peft" else ""
        lines.append(f"| {name} | {what[name]} | {m['wall_s']:.2f}{fs} | {inner} | {m['rss_mib']:.0f} | "
                     f"{out_gb} | {min(loads):.1f}-{max(loads):.1f} |")
    lines += ["", "Correctness (untimed, first repetition), against peft's fp32 output (cast to bf16 for ours_bf16):"]
    for name, c in res["correctness"].items():
        lines.append(f"* {name}: same keys {c['same_keys']} ({c['ours_keys']} ours, {c['peft_keys']} peft); tensors "
                     f"not bit-identical: {len(c['differ'])} {c['differ'][:5]}")
    lines += [
        "",
        "## The claim: our peak RSS is about the largest base tensor plus a constant",
        "",
    ]
    lines += [f"* {line}" for line in res["claim"]]
    return "\n".join(lines) + "\n"


def claim(res: dict[str, Any]) -> list[str]:
    info, med = res["inputs"], res["median"]
    mib = 2**20
    largest, target = info["largest_tensor"]["bytes"] / mib, info["largest_target"]["bytes"] / mib
    out = []
    for dt in ("fp32", "bf16"):
        ours_rss, base_rss = med[f"ours_{dt}"]["rss_mib"], med[f"base_{dt}"]["rss_mib"]
        out.append(f"{dt}: ours {ours_rss:.0f} MiB; the same tool on the base alone (no LoRA) {base_rss:.0f} MiB; "
                   f"LoRA adds {ours_rss - base_rss:+.0f} MiB. Largest base tensor {largest:.0f} MiB, largest merged "
                   f"tensor {target:.0f} MiB, base file {info['base_bytes'] / mib:.0f} MiB.")
    out.append(f"`import torch` alone: {med['torch_import']['rss_mib']:.0f} MiB (the merge computes with torch; the "
               "plain conversion does not import it).")
    out.append(f"validation on (fp32): {med['ours_fp32_validated']['rss_mib']:.0f} MiB, "
               f"{med['ours_fp32_validated']['wall_s']:.1f} s.")
    out.append(f"peft: {med['peft']['rss_mib']:.0f} MiB "
               f"({med['peft']['rss_mib'] / med['ours_fp32']['rss_mib']:.1f}x ours fp32), "
               f"wall {med['peft']['wall_s']:.1f} s ({med['ours_fp32']['wall_s'] / med['peft']['wall_s']:.2f}x "
               "ours fp32 / peft).")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compare", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        build_inputs()
        return
    if args.compare:
        compare(*args.compare)
        return
    info = ensure_inputs()
    WORK.mkdir(parents=True, exist_ok=True)
    cmds = commands()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in cmds}
    correctness: dict[str, Any] = {}
    needs = {"peft": 2.1e9, "ours_fp32": 2.1e9, "ours_fp32_validated": 2.1e9, "base_fp32": 2.1e9,
             "ours_bf16": 1.1e9, "base_bf16": 1.1e9, "torch_import": 0}
    for rep in range(args.reps):
        for name, (cmd, out) in cmds.items():
            keep = rep == 0 and name == "peft"
            need = needs[name] + (2.1e9 if rep == 0 and name in ("ours_fp32", "ours_bf16") else 0)
            if free_disk() < need + DISK_MARGIN:
                why = f"free disk {free_disk() / 1e9:.1f} GB < {(need + DISK_MARGIN) / 1e9:.1f} GB"
                rec = {"exit": -1, "skipped": why, "wall_s": float("nan"), "loadavg_before": list(os.getloadavg())}
            else:
                rec = measure(cmd, out)
            if rec["exit"] == 0:
                rec["output_gb"] = round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e9, 3)
                if name == "peft":
                    rec["fsync_s"] = fsync_tree(out)
                if rep == 0 and name in ("ours_fp32", "ours_bf16") and cmds["peft"][1].is_dir():
                    proc = subprocess.run([sys.executable, __file__, "--compare", str(out), str(cmds["peft"][1])],
                                          env=ENV, capture_output=True, text=True, check=True)
                    correctness[name] = json.loads(proc.stdout.strip().splitlines()[-1])
                    print(f"correctness {name}: {correctness[name]}", flush=True)
            runs[name].append(rec)
            print(f"rep {rep} {name:20s} wall {rec['wall_s']:7.2f}s rss {rec.get('rss_mib', float('nan')):8.1f} MiB "
                  f"exit {rec['exit']} load {rec['loadavg_before'][0]:.1f}", flush=True)
            if rec["exit"] != 0:
                print(rec.get("stderr_tail", rec.get("skipped", "")), flush=True)
            if not keep:
                convert_bench.clean(out)
        convert_bench.clean(cmds["peft"][1])
    med = {name: {"wall_s": median(r, "wall_s"), "rss_mib": median(r, "rss_mib"), "inner_s": median(r, "inner_s"),
                  "output_gb": median(r, "output_gb"), "fsync_s": median(r, "fsync_s")} for name, r in runs.items()}
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    res = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "reps": args.reps, "inputs": info, "median": med,
           "runs": runs, "correctness": correctness, "git_head": head.stdout.strip(),
           "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    res["claim"] = claim(res)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lora.json").write_text(json.dumps(res, indent=2))
    (RESULTS / "lora.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
