"""Benchmark the generated Qwen2.5-7B-shaped ZeRO-3 checkpoint (``make_zero3_7b.py``) against its I/O floor.

Measured, each from a cold page cache for the files it reads (the checkpoint is ~30 GB against ~23 GiB of
RAM, so a warm cache is not possible; ``drop_caches`` is global and the machine is shared, so each input
file is evicted with ``posix_fadvise(POSIX_FADV_DONTNEED)`` after a ``sync``: only our own files; ``fincore``
confirms 0 cached pages before each command. The host below this VM may still cache the virtual disk):

* ``read_floor``: ``cat`` of the 8 rank optimizer files, one after another, to /dev/null. Those files hold
  only the fp32 flat groups (and a small pickle), so this is the time to read the bytes we must read;
* ``write_floor``: writing as many bytes as our bf16 output (random 16 MiB blocks, ``os.write``) and an
  ``fsync``: the time to write the output;
* ``ours_bf16`` / ``ours_bf16_validate``: ``vllm-consolidate convert --dtype bfloat16`` with
  ``--no-validate-vllm`` and with validation; wall time (interpreter start-up included) and peak RSS
  (``/usr/bin/time -v``);
* ``cat_1`` / ``cat_2`` / ``cat_4``: ``cat`` of one rank file, of two at once and of four at once, to
  /dev/null: whether the disk gives more throughput to parallel reads.

Each repetition runs all of them in turn; ratios ``ours / (read_floor + write_floor)`` are taken per
repetition (paired) and the median is reported. Before the timed runs, untimed, the bf16 output of the
first run is checked: sampled tensors (whole small ones, rows of large ones) equal, bit for bit, the
generator's formula cast to bf16 by torch.

Writes ``bench/results/zero3_7b.{json,md}``.

Usage::

    .venv/bin/python bench/bench_7b.py [--reps 2] [--layers 28] [--out STEM] \\
        [--parts check,ours,validate,floor,parallel]   # the default: all; "check" is untimed
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_zero3_7b as gen  # noqa: E402
import run  # noqa: E402

WORK = run.WORK / "zero3_7b"
POSIX_FADV_DONTNEED = 4


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (after a sync, so every page is clean)."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(path: Path) -> float:
    """Share of ``path``'s bytes in the page cache (util-linux ``fincore``)."""
    r = run.subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                           capture_output=True, text=True)
    size = path.stat().st_size
    return int(r.stdout.split()[0]) / size if r.returncode == 0 and size else float("nan")


WRITE_FLOOR = """
import os, sys
path, total = sys.argv[1], int(sys.argv[2])
block = os.urandom(16 * 2**20)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
done = 0
while done < total:
    done += os.write(fd, memoryview(block)[: min(len(block), total - done)])
os.fsync(fd)
os.close(fd)
"""


def sample_check(out: Path, info: dict[str, Any], shape: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compare sampled tensors of our bf16 output with the generator's formula, bit for bit."""
    import torch
    from safetensors import safe_open

    params, _ = gen.param_list(info["layers"], shape)
    grp = gen.groups(params)
    order = [i for g in grp for i in g]
    number = {params[i][0]: k for k, i in enumerate(order)}
    shapes = dict(params)
    files = sorted(out.glob("*.safetensors"))
    checked, bad, elements = [], [], 0
    last = info["layers"] - 1
    wanted = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
              "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.bias",
              "model.layers.0.input_layernorm.weight", f"model.layers.{last}.mlp.down_proj.weight",
              f"model.layers.{last // 2}.mlp.gate_proj.weight", f"model.layers.{last}.self_attn.v_proj.weight",
              f"model.layers.{last}.post_attention_layernorm.weight"]
    rng = np.random.default_rng(0)
    for f in files:
        with safe_open(f, "pt") as st:
            for name in [n for n in wanted if n in st.keys()]:
                shp = shapes[name]
                sl = st.get_slice(name)
                if list(sl.get_shape()) != list(shp):
                    bad.append(f"{name}: shape {sl.get_shape()} != {shp}")
                    continue
                rows = shp[0]
                if math.prod(shp) <= 2**24:
                    pick = np.arange(rows)
                else:  # first, last and 16 random rows
                    pick = np.unique(np.concatenate([[0, rows - 1], rng.integers(0, rows, 16)]))
                cols = math.prod(shp[1:]) if len(shp) > 1 else 1
                for r0 in pick if len(pick) != rows else [None]:
                    if r0 is None:
                        got = sl[:]
                        idx = np.arange(math.prod(shp), dtype=np.int64)
                    else:
                        got = sl[int(r0):int(r0) + 1]
                        idx = np.arange(int(r0) * cols, (int(r0) + 1) * cols, dtype=np.int64)
                    exp = torch.from_numpy(gen.value(number[name], idx)).to(torch.bfloat16)
                    elements += idx.size
                    if got.dtype != torch.bfloat16 or not torch.equal(got.reshape(-1).view(torch.int16),
                                                                      exp.view(torch.int16)):
                        bad.append(f"{name} row {r0}")
                        break
                checked.append(name)
    return {"tensors_checked": checked, "elements_checked": elements, "mismatches": bad,
            "missing": [n for n in wanted if n not in checked and not any(n in b for b in bad)]}


def check_output(ckpt: Path, out: Path, info: dict[str, Any], shape: dict[str, Any] | None) -> dict[str, Any]:
    """Untimed: convert to bf16 and compare sampled tensors with the formula."""
    r = run.subprocess.run(run.ours(ckpt, out, "--dtype", "bfloat16"), env=run.ENV, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"our tool failed: {r.stderr[-2000:]}")
    res = sample_check(out, info, shape)
    res["output_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    res["output_files"] = sorted(p.name for p in out.iterdir())
    res["when"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    run.clean(out)
    return res


def timed(cmd: list[str], inputs: list[Path], outputs: list[Path]) -> dict[str, Any]:
    """``run.measure`` from a cold cache for ``inputs`` (evicted), outputs removed first."""
    run.clean(*outputs)
    evict(inputs)
    cached = round(cached_fraction(inputs[0]), 3) if inputs else None  # checks the eviction worked
    rec = run.measure(cmd, [], outputs)
    rec["cached_after_evict"] = cached
    return rec


def main() -> None:
    """Generate (or reuse) the checkpoint, measure, write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--out", default="zero3_7b", help="results file stem under bench/results")
    ap.add_argument("--parts", default="check,ours,validate,floor,parallel",
                    help="check: untimed output check (its result kept in bench/results/zero3_7b_check.json)")
    ap.add_argument("--tiny", type=Path, help="a tiny checkpoint from make_zero3_7b.py --tiny (checks this script)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if args.tiny:
        info = json.loads((args.tiny / "bench_complete.json").read_text())
        ckpt = args.tiny / "ckpt"
        shape = {"vocab_size": 1001, "hidden_size": 128, "intermediate_size": 203, "num_attention_heads": 2,
                 "num_key_value_heads": 1}
    else:
        info = gen.generate(args.layers)
        ckpt = gen.folder(args.layers) / "ckpt"
        shape = None
    ranks = sorted((ckpt / gen.TAG).glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                   key=lambda p: int(p.name.split("_")[4]))
    read_bytes = sum(p.stat().st_size for p in ranks)
    WORK.mkdir(parents=True, exist_ok=True)
    out_nv, out_v, wfile = WORK / "ours_bf16", WORK / "ours_bf16_validate", WORK / "write_floor.bin"
    run.clean(out_nv, out_v, wfile)
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "checkpoint": {
        k: v for k, v in info.items() if k != "files"}, "rank_file_bytes": read_bytes, "reps": args.reps,
        "cache_policy": "cold: inputs evicted with posix_fadvise(DONTNEED) after sync before every command",
        "loadavg_start": os.getloadavg(), "writer": run.writer_version()}

    # One check file per layer count: an 8-layer run must not overwrite the 28-layer model's check.
    check_file = run.RESULTS / ("zero3_7b_check_tiny.json" if args.tiny else "zero3_7b_check.json" if args.layers == 28
                                else f"zero3_7b_l{args.layers}_check.json")
    if "check" in parts or not check_file.is_file():
        results["check"] = check_output(ckpt, out_nv, info, shape)
        check_file.write_text(json.dumps(results["check"], indent=2))
    else:
        results["check"] = json.loads(check_file.read_text())
    print(f"check: {results['check']}", flush=True)
    if results["check"]["mismatches"] or results["check"]["missing"]:
        raise SystemExit("output differs from the formula")
    out_bytes = results["output_bytes"] = results["check"]["output_bytes"]
    if not parts - {"check"}:
        return

    ours_cmd = run.ours(ckpt, out_nv, "--dtype", "bfloat16")
    val_cmd = [c for c in run.ours(ckpt, out_v, "--dtype", "bfloat16") if c != "--no-validate-vllm"]
    cat = "cat {} > /dev/null"
    plan: list[tuple[str, str, list[str], list[Path], list[Path]]] = []
    if "floor" in parts:
        plan += [("read_floor", "floor", run.sh("; ".join(cat.format(p) for p in ranks)), ranks, []),
                 ("write_floor", "floor", [sys.executable, "-c", WRITE_FLOOR, str(wfile), str(out_bytes)], [],
                  [wfile])]
    if "ours" in parts:
        plan.append(("ours_bf16", "ours", ours_cmd, ranks, [out_nv]))
    if "validate" in parts:
        plan.append(("ours_bf16_validate", "ours", val_cmd, ranks, [out_v]))
    if "parallel" in parts:
        for n in (1, 2, 4):
            script = " & ".join(cat.format(p) for p in ranks[:n]) + " & wait"
            plan.append((f"cat_{n}", "parallel", run.sh(script), ranks[:n], []))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in plan}
    for rep in range(args.reps):
        for name, _, cmd, inputs, outputs in plan:
            if outputs and run.free_disk() < out_bytes + run.DISK_MARGIN:
                rec = {"exit": -1, "rep": rep, "skipped": f"disk: {run.free_disk() / 2**30:.1f} GiB free"}
                print(f"  rep {rep} {name} SKIPPED {rec['skipped']}", flush=True)
                runs[name].append(rec)
                continue
            rec = timed(cmd, inputs, outputs)
            rec["rep"] = rep
            if name.startswith("cat_"):
                n = int(name[4:])
                rec["bytes"] = sum(p.stat().st_size for p in ranks[:n])
                rec["mb_s"] = round(rec["bytes"] / rec["wall_s"] / 1e6, 1)
            runs[name].append(rec)
            run.clean(*outputs)
            print(f"  rep {rep} {name:19s} wall {rec['wall_s']:7.2f}s rss {rec['rss_mib']:8.1f} MiB exit {rec['exit']} "
                  f"load {rec['loadavg_before'][0]:.2f} cached-after-evict {rec['cached_after_evict']}"
                  + (f" {rec['mb_s']} MB/s" if "mb_s" in rec else ""), flush=True)
    results["runs"] = runs
    results["median"] = {k: run.medians(v) for k, v in runs.items()}
    paired: dict[str, Any] = {}
    if "floor" in parts:
        floors = [a["wall_s"] + b["wall_s"] if a["exit"] == b["exit"] == 0 else float("nan")
                  for a, b in zip(runs["read_floor"], runs["write_floor"])]
        paired["io_floor_s"] = round(statistics.median([f for f in floors if f == f] or [float("nan")]), 3)
        paired["read_mb_s"] = round(read_bytes / run.median(runs["read_floor"], "wall_s") / 1e6, 1)
        paired["write_mb_s"] = round(out_bytes / run.median(runs["write_floor"], "wall_s") / 1e6, 1)
        if "ours" in parts:
            for name in [n for n in ("ours_bf16", "ours_bf16_validate") if n in runs]:
                rs = [o["wall_s"] / f for o, f in zip(runs[name], floors) if o["exit"] == 0 and f == f]
                paired[f"{name}_vs_io_floor"] = round(statistics.median(rs), 3) if rs else float("nan")
                paired[f"{name}_vs_io_floor_per_rep"] = [round(x, 3) for x in rs]
    if "parallel" in parts:
        for n in (1, 2, 4):
            paired[f"cat_{n}_mb_s"] = run.median(runs[f"cat_{n}"], "mb_s")
    results["ratios"] = paired
    results["loadavg_end"] = os.getloadavg()
    run.clean(out_nv, out_v, wfile)
    if not args.tiny:
        run.RESULTS.mkdir(parents=True, exist_ok=True)
        (run.RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=2, default=str))
        (run.RESULTS / f"{args.out}.md").write_text(markdown(results))
    print(markdown(results))


def markdown(res: dict[str, Any]) -> str:
    """The report table."""
    c = res["checkpoint"]
    lines = [f"# Qwen2.5-7B-shaped ZeRO-3 (w{c['world_size']}, {c['layers']} layers, {c['params'] / 1e9:.2f}B params, "
             f"{res['rank_file_bytes'] / 1e9:.1f} GB rank files -> {res['output_bytes'] / 1e9:.1f} GB bf16), "
             f"{res['started']}, {res['reps']} reps, median", "",
             f"Page cache: {res['cache_policy']}. Output check: {len(res['check']['tensors_checked'])} tensors, "
             f"{res['check']['elements_checked']} elements bit-equal to the formula.", "",
             "| command | wall s (per rep) | peak RSS MiB | MB/s | load (1m) per rep |", "|---|---|---|---|---|"]
    for name, rs in res["runs"].items():
        m = res["median"][name]
        walls = ", ".join(f"{r['wall_s']:.1f}" if "wall_s" in r else r.get("skipped", "?") for r in rs)
        loads = ", ".join(f"{r['loadavg_before'][0]:.1f}" for r in rs if "loadavg_before" in r)
        mbs = run.median(rs, "mb_s") if name.startswith("cat_") else ""
        lines.append(f"| {name} | {m['wall_s']:.2f} ({walls}) | {m['rss_mib']:.0f} | {mbs} | {loads} |")
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    for k, v in res["ratios"].items():
        tgt = "<= 1.1 (issue 28)" if k.endswith("_vs_io_floor") else ""
        lines.append(f"| {k} | {v} | {tgt} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
