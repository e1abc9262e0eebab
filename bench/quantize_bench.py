"""Benchmark ``convert --quantize fp8_dynamic`` (one pass) against the two-step chains it replaces (issue 26).

On the cached 0.5B Qwen2 ZeRO-3 checkpoint (``make_checkpoints.py``, ``qwen0.5b-z3``), in one run, N repetitions,
the three alternating inside each repetition, medians reported:

* ``ours``: ``vllm-consolidate convert --quantize fp8_dynamic --no-validate-vllm`` (bf16 working dtype; imports
  neither torch nor transformers);
* ``ours_validated``: the same with the default validation (``--validate-vllm``: the meta model's skeleton and
  quantized-layout checks, which import torch and transformers), reported beside the target, not in the ratios;
* ``chain_model_free``: ``convert --dtype bfloat16`` to a folder, then llm-compressor's
  ``model_free_ptq(folder, out, scheme="FP8_DYNAMIC", ignore=["lm_head"])`` on it (in the llm-compressor venv,
  ``scripts/setup_llmc_venv.sh``);
* ``chain_oneshot``: the same bf16 folder, then ``oneshot`` + ``save_pretrained(save_compressed=True)``
  (``tests/tools/llmc_quantize.py``, what the tests compare with byte for byte).

Each step is measured as in ``run.py`` (``measure``: inputs warmed first, ``/usr/bin/time -v`` peak RSS of the
one process, wall time including interpreter start-up). A chain's wall time is the sum of its steps, its peak RSS
the larger step's, its bytes written the bf16 folder plus the quantized one (the intermediate copy is what the
one pass saves). Ratios against the issue's targets: wall <= 0.6x the model_free_ptq chain, peak RSS <= 0.1x of
oneshot's, bytes written = the quantized output only.

Usage: python bench/quantize_bench.py [--reps 3] [--out quantize]
Writes bench/results/<out>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_checkpoints as mk  # noqa: E402
import run as bench  # noqa: E402

LLMC_PYTHON = Path(os.environ.get("LLMC_PYTHON", str(mk.REPO / ".venv-llmc" / "bin" / "python")))
TOOL = mk.REPO / "tests" / "tools" / "llmc_quantize.py"
MODEL_FREE = ("import sys\nfrom llmcompressor import model_free_ptq\n"
              "model_free_ptq(sys.argv[1], sys.argv[2], scheme='FP8_DYNAMIC', ignore=['lm_head'])")
TARGETS = {"wall_vs_model_free_chain": 0.6, "rss_vs_oneshot_chain": 0.1}
TOOLS = ("ours", "ours_validated", "chain_model_free", "chain_oneshot")


def folder_bytes(folder: Path) -> int:
    """Bytes of every file in ``folder`` (0 when it is missing)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def one_rep(ckpt: Path, work: Path) -> dict[str, Any]:
    """One repetition: ours, then the two chains (sharing one consolidate step per chain, measured each time)."""
    ours_out, bf16, q_free, q_oneshot = (work / n for n in ("ours", "bf16", "q_model_free", "q_oneshot"))
    rec: dict[str, Any] = {}
    rec["ours"] = bench.measure(bench.ours(ckpt, ours_out, "--quantize", "fp8_dynamic"), [ckpt], [ours_out])
    rec["ours"]["bytes_written"] = folder_bytes(ours_out)
    bench.clean(ours_out)
    rec["ours_validated"] = bench.measure(bench.ours(ckpt, ours_out, "--quantize", "fp8_dynamic", "--validate-vllm"),
                                          [ckpt], [ours_out])
    rec["ours_validated"]["bytes_written"] = folder_bytes(ours_out)
    bench.clean(ours_out)
    llmc_env = dict(bench.ENV, PYTHONPATH="")
    for name, out, cmd in (("chain_model_free", q_free, [str(LLMC_PYTHON), "-c", MODEL_FREE, str(bf16), str(q_free)]),
                           ("chain_oneshot", q_oneshot, [str(LLMC_PYTHON), str(TOOL), str(bf16), str(q_oneshot),
                                                         "fp8_dynamic"])):
        first = bench.measure(bench.ours(ckpt, bf16, "--dtype", "bfloat16"), [ckpt], [bf16])
        second = bench.measure(cmd, [bf16], [out], env=llmc_env)
        rec[name] = {"consolidate": first, "quantize": second,
                     "wall_s": round(first["wall_s"] + second["wall_s"], 3),
                     "rss_mib": max(first["rss_mib"], second["rss_mib"]),
                     "exit": first["exit"] or second["exit"],
                     "bytes_written": folder_bytes(bf16) + folder_bytes(out)}
        bench.clean(bf16, out)
    return rec


def summarize(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per tool and the ratios against the targets."""
    med = {tool: {k: statistics.median(r[tool][k] for r in reps) for k in ("wall_s", "rss_mib", "bytes_written")}
           for tool in TOOLS}
    ratios = {"wall_vs_model_free_chain": med["ours"]["wall_s"] / med["chain_model_free"]["wall_s"],
              "wall_vs_oneshot_chain": med["ours"]["wall_s"] / med["chain_oneshot"]["wall_s"],
              "rss_vs_oneshot_chain": med["ours"]["rss_mib"] / med["chain_oneshot"]["rss_mib"],
              "rss_vs_model_free_chain": med["ours"]["rss_mib"] / med["chain_model_free"]["rss_mib"],
              "rss_validated_vs_oneshot_chain": med["ours_validated"]["rss_mib"] / med["chain_oneshot"]["rss_mib"],
              "bytes_vs_model_free_chain": med["ours"]["bytes_written"] / med["chain_model_free"]["bytes_written"]}
    return {"median": med, "ratios": {k: round(v, 3) for k, v in ratios.items()}, "targets": TARGETS}


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| tool | wall s | peak RSS MiB | bytes written |", "|---|---:|---:|---:|"]
    for tool, m in summary["median"].items():
        lines.append(f"| {tool} | {m['wall_s']:.2f} | {m['rss_mib']:.0f} | {m['bytes_written'] / 1e9:.3f} GB |")
    lines.append("")
    lines += [f"- {k}: {v}" + (f" (target <= {summary['targets'][k]})" if k in summary["targets"] else "")
              for k, v in summary["ratios"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="quantize")
    args = parser.parse_args()
    if not LLMC_PYTHON.exists():
        raise SystemExit(f"no llm-compressor venv at {LLMC_PYTHON}: run scripts/setup_llmc_venv.sh")
    spec = next(s for s in mk.small_specs() if s.name == "qwen0.5b-z3")
    if not (spec.folder() / mk.MARKER).is_file():  # cached by make_checkpoints.py (run.py); train it only if not
        mk.generate(spec)
    work = bench.WORK / "quantize"
    work.mkdir(parents=True, exist_ok=True)
    reps = [one_rep(spec.ckpt(), work) for _ in range(args.reps)]
    failed = [(i, t) for i, r in enumerate(reps) for t in TOOLS
              if r[t]["exit"] != 0]
    if failed:
        print(json.dumps(reps, indent=1)[-4000:])
        raise SystemExit(f"failed runs: {failed}")
    summary = summarize(reps)
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    (bench.RESULTS / f"{args.out}.json").write_text(json.dumps({"summary": summary, "reps": reps}, indent=1) + "\n")
    (bench.RESULTS / f"{args.out}.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
