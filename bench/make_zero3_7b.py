"""Generate (and cache) a synthetic Qwen2.5-7B-shaped ZeRO-3 checkpoint, world size 8, as DeepSpeed 0.19.8 lays it out.

Real 7B training cannot run on this machine, so this writes only what a consolidator reads, in DeepSpeed's
own layout (checked against a real tiny ZeRO-3 case of the test corpus, ``qwen2_z3_w2_bf16_tied``):

* ``global_step1/bf16_zero_pp_rank_R_mp_rank_00_optim_states.pt`` (``torch.save``, as DeepSpeed's
  ``TorchCheckpointEngine`` does): ``{"optimizer_state_dict": {"zero_stage": ZeroStageEnum.weights,
  "loss_scaler": LossScaler, "dynamic_loss_scale", "overflow", "partition_count": 8,
  "optimizer_state_dict": {"state": {}, "param_groups": [...]}, "fp32_flat_groups": [g0, g1]},
  "ds_config", "ds_version"}``. The non-tensor objects are the real ones, taken from the corpus file.
* ``global_step1/zero_pp_rank_R_mp_rank_00_model_states.pt``: ``module`` (every parameter as an empty
  bf16 tensor, as ZeRO-3 saves it), ``param_shapes`` (one OrderedDict per sub-group), ``buffer_names``,
  ``shared_params`` (``{}``: Qwen2.5-7B does not tie its embeddings), ``dp_world_size`` 8, and the other keys
  of the corpus file, in its order.
* ``latest``, ``config.json`` (Qwen2.5-7B's), the corpus case's tokenizer (vocab 1001 < 152064, so every
  special id fits) and its ``zero_to_fp32.py``.

Partition arithmetic (DeepSpeed stage 3, as ``zero_to_fp32.zero3_partitioned_param_info`` undoes it): each
parameter is split on its own into ``ceil(numel / 8)``-element partitions, the last one zero-padded; a rank's
flat group is the concatenation of its partitions of the group's parameters, in parameter order. The two
groups are HF Trainer's: weights with decay (every 2-D weight) and without (biases, norms). DeepSpeed's
``sub_group_size`` default (1e9) exceeds group 0's partition numel (~0.95e9), so each group is one sub-group,
one flat tensor and one ``param_shapes`` entry.

What differs from a real save: no Adam moments (``state`` is ``{}``; a consolidator never reads them, and
they would triple the 30 GB), and the values: element ``i`` of parameter number ``p`` (in ``param_shapes``
order) is :func:`value` -- ``((i + s_p) * 2654435761 mod 2**24 - 2**23) * 2**-26`` with
``s_p = p * 40503 mod 2**24``, exact in fp32 and not in bf16 (so rounding is exercised). The bench checks
sampled output tensors against it exactly.

Only one rank's partition (~3.8 GB) is in RAM at a time. Cached under ``.cache/bench/<key>/``, complete once
``bench_complete.json`` exists (written last).

Usage::

    .venv/bin/python bench/make_zero3_7b.py [--layers 28]   # ~30.5 GB; prints the marker
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_checkpoints as mk  # noqa: E402

WORLD = 8
TEMPLATE = mk.REPO / ".cache" / "corpus" / "ds-0.19.8-v1" / "qwen2_z3_w2_bf16_tied" / "ckpt"
TAG = "global_step1"
MULT = 2654435761
PERIOD = 2**24
# Qwen2.5-7B (config.json of Qwen/Qwen2.5-7B-Instruct).
QWEN25_7B = {"vocab_size": 152064, "hidden_size": 3584, "num_hidden_layers": 28, "intermediate_size": 18944,
             "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False,
             "max_position_embeddings": 32768, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
             "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu"}


def value(p: int, idx: np.ndarray) -> np.ndarray:
    """The fp32 value of elements ``idx`` (int64 array) of parameter number ``p`` (the bench's reference)."""
    s = (p * 40503) % PERIOD
    k = ((idx.astype(np.uint64) + np.uint64(s)) * np.uint64(MULT)) % np.uint64(PERIOD)
    return ((k.astype(np.int64) - 2**23).astype(np.float32)) * np.float32(2.0**-26)


def key(layers: int) -> str:
    """Cache key."""
    return f"qwen2.5-7b-shape-l{layers}-z3-w{WORLD}-synthetic-ds0.19.8-v1"


def folder(layers: int) -> Path:
    """The cache entry."""
    return mk.CACHE / key(layers)


def param_list(layers: int, shape: dict[str, Any] | None = None) -> tuple[list[tuple[str, tuple[int, ...]]], Any]:
    """``(name, shape)`` in ``named_parameters`` order of a meta-device Qwen2ForCausalLM, and its config."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**{**QWEN25_7B, **(shape or {}), "num_hidden_layers": layers}, use_cache=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()], cfg


def groups(params: list[tuple[str, tuple[int, ...]]]) -> list[list[int]]:
    """HF Trainer's two optimizer groups (decay: 2-D weights; no decay: biases and norms), as param indices."""
    return [[i for i, (_, s) in enumerate(params) if len(s) >= 2], [i for i, (_, s) in enumerate(params) if len(s) < 2]]


def table() -> np.ndarray:
    """``value`` over one period, for every ``p`` at once: ``value(p, i) == T[(i + s_p) % 2**24]``."""
    return value(0, np.arange(PERIOD, dtype=np.int64))


def fill_partition(out: np.ndarray, p: int, start: int, count: int, tab: np.ndarray) -> None:
    """``out[:count] = value(p, start .. start+count)`` from the table (wrapping); the rest stays as given."""
    s = (p * 40503) % PERIOD
    pos, done = (start + s) % PERIOD, 0
    while done < count:
        n = min(count - done, PERIOD - pos)
        out[done:done + n] = tab[pos:pos + n]
        done += n
        pos = 0


def rank_flat_groups(rank: int, params: list[tuple[str, tuple[int, ...]]], grp: list[list[int]],
                     tab: np.ndarray) -> list[Any]:
    """Rank ``rank``'s fp32 flat groups (DeepSpeed stage-3 partitions, zero padding)."""
    import torch

    number = {i: k for k, i in enumerate(i for g in grp for i in g)}  # position in param_shapes order
    flats = []
    for g in grp:
        parts = [math.ceil(math.prod(params[p][1]) / WORLD) for p in g]
        flat = torch.zeros(sum(parts), dtype=torch.float32)
        arr = flat.numpy()
        off = 0
        for p, pn in zip(g, parts):
            numel = math.prod(params[p][1])
            start = rank * pn
            count = max(0, min(pn, numel - start))
            fill_partition(arr[off:off + count], number[p], start, count, tab)
            off += pn
        flats.append(flat)
    return flats


def generate(layers: int, entry: Path | None = None, shape: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the checkpoint unless a complete copy is cached; return its marker contents.

    ``entry`` and ``shape`` (overrides of the Qwen2.5-7B config) are for a quick check of this script.
    """
    import torch

    entry = folder(layers) if entry is None else entry
    cached = mk.cached_marker(entry)
    if cached is not None:
        return cached
    t0 = time.monotonic()
    load0 = os.getloadavg()
    params, cfg = param_list(layers, shape)
    grp = groups(params)
    ckpt = entry / "ckpt"
    step = ckpt / TAG
    step.mkdir(parents=True)
    tmpl_step = TEMPLATE / "global_step2"
    # Our own corpus files (written by real DeepSpeed on this machine): trusted, so a full unpickle.
    opt_t = torch.load(tmpl_step / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    mod_t = torch.load(tmpl_step / "zero_pp_rank_1_mp_rank_00_model_states.pt", weights_only=False)
    tab = table()
    shapes = [collections.OrderedDict((params[p][0], torch.Size(params[p][1])) for p in g) for g in grp]
    for rank in range(WORLD):
        flats = rank_flat_groups(rank, params, grp, tab)
        osd = dict(opt_t["optimizer_state_dict"])
        inner = dict(osd["optimizer_state_dict"])
        inner["state"] = {}
        inner["param_groups"] = [dict(pg, params=[i]) for i, pg in enumerate(inner["param_groups"])]
        osd.update(partition_count=WORLD, optimizer_state_dict=inner, fp32_flat_groups=flats)
        optim_file = step / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        torch.save({**opt_t, "optimizer_state_dict": osd}, optim_file)
        del flats, osd
        module = collections.OrderedDict((n, torch.empty(0, dtype=torch.bfloat16)) for n, _ in params)
        torch.save({**mod_t, "module": module, "param_shapes": shapes, "shared_params": {}, "buffer_names": [],
                    "global_steps": 1, "dp_world_size": WORLD},
                   step / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        print(f"rank {rank} written ({time.monotonic() - t0:.0f} s)", flush=True)
    (ckpt / "latest").write_text(TAG)
    cfg.dtype = "bfloat16"
    cfg.architectures = ["Qwen2ForCausalLM"]
    cfg.save_pretrained(ckpt)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "zero_to_fp32.py"):
        if (TEMPLATE / name).is_file():
            shutil.copyfile(TEMPLATE / name, ckpt / name)
    os.sync()
    files = sorted(p for p in ckpt.rglob("*") if p.is_file())
    n_params = sum(math.prod(s) for _, s in params)
    info = {
        "name": f"qwen2.5-7b-shape-z3-w{WORLD}" + ("" if layers == 28 else f"-l{layers}"),
        "key": key(layers), "layers": layers, "params": n_params, "world_size": WORLD, "stage": 3,
        "groups_numel": [sum(math.prod(params[p][1]) for p in g) for g in grp],
        "rank_fp32_bytes": [4 * sum(math.ceil(math.prod(params[p][1]) / WORLD) for p in g) for g in grp],
        "generation_seconds": round(time.monotonic() - t0, 1), "loadavg_start": load0,
        "loadavg_end": os.getloadavg(), "ckpt_bytes": sum(p.stat().st_size for p in files),
        "files": {str(p.relative_to(ckpt)): p.stat().st_size for p in files},
        "note": "synthetic: DeepSpeed 0.19.8 ZeRO-3 layout, values a formula of the index, no Adam moments",
    }
    return mk.write_marker(entry / mk.MARKER, info)


def find_cached() -> dict[str, Any] | None:
    """The marker of the largest complete cached copy, if any."""
    best = None
    for marker in mk.CACHE.glob(f"qwen2.5-7b-shape-l*-z3-w{WORLD}-synthetic-*/{mk.MARKER}"):
        info = json.loads(marker.read_text())
        if best is None or info["layers"] > best["layers"]:
            best = info
    return best


def main() -> None:
    """Generate the checkpoint (``--layers`` fewer than 28 if the disk is short)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--tiny", type=Path, help="write a tiny same-layout checkpoint to this folder (a check)")
    args = ap.parse_args()
    tiny = {"vocab_size": 1001, "hidden_size": 128, "intermediate_size": 203, "num_attention_heads": 2,
            "num_key_value_heads": 1, "bos_token_id": 1, "eos_token_id": 2}
    info = generate(args.layers, args.tiny, tiny) if args.tiny else generate(args.layers)
    print(json.dumps({k: v for k, v in info.items() if k != "files"}, indent=1))


if __name__ == "__main__":
    main()
