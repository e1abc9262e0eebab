"""Generate (and cache) FSDP2 torch.distributed.checkpoint (DCP) folders of Qwen2-shaped models on CPU.

Each checkpoint is written by real FSDP2 at world size 2 (``torchrun --nproc_per_node 2``, gloo, CPU):
the model (same ``Qwen2Config`` as the DeepSpeed bench, built in fp32) is wrapped with ``fully_shard``
on every decoder layer and then the root (bf16 ``MixedPrecisionPolicy`` for compute, fp32 parameters and
gradient reduction, as HF Trainer / Accelerate FSDP with ``bf16=True``), takes one AdamW step on random
tokens, and is saved the way HF Trainer / Accelerate save FSDP2 with ``SHARDED_STATE_DICT`` (Accelerate's
default for FSDP2): ``accelerate.utils.fsdp_utils.save_fsdp_model`` and ``save_fsdp_optimizer`` (use_dcp=True,
model_index 0), which Trainer calls with the ``checkpoint-N`` folder as ``output_dir``::

    opts = StateDictOptions(full_state_dict=False, cpu_offload=True, broadcast_from_rank0=False)
    dcp.save({"model": get_model_state_dict(model, options=opts)},
             storage_writer=FileSystemWriter("checkpoint-N/pytorch_model_fsdp_0"), planner=DefaultSavePlanner())
    dcp.save({"optimizer": get_optimizer_state_dict(model, opt, options=opts)},
             storage_writer=FileSystemWriter("checkpoint-N/optimizer_0"), planner=DefaultSavePlanner())

(``opts`` is what ``_prepare_sd_options`` builds from Accelerate's default ``ShardedStateDictConfig(
offload_to_cpu=True)``; on CPU the offload is a no-op. Each folder holds sharded DTensors: ``.metadata`` +
one ``__R_0.distcp`` per rank; fp32 weights in the first, fp32 Adam moments and steps in the second.)
Rank 0 then writes ``config.json``, ``generation_config.json`` and a tokenizer into ``checkpoint-N/``, so
``vllm-consolidate convert --input checkpoint-N`` needs no flags (it finds ``pytorch_model_fsdp_0/``);
``dcp_to_torch_save`` and ``accelerate merge-weights`` are given ``checkpoint-N/pytorch_model_fsdp_0``.
Trainer's other files (``trainer_state.json``, ``rng_state_*.pth``, ``scheduler.pt``, ``training_args.bin``)
are not written: no tool here reads them. The tokenizer is a small byte-level BPE trained here on a few
lines of text (Qwen's own tokenizer is not available offline on this machine); the tools only copy it.

Memory: under FSDP2 one AdamW step holds, summed over the ranks, fp32 parameters (4 B/param), fp32
gradients (4) and two fp32 moments (8), and ``get_optimizer_state_dict`` creates the moments (zeros,
by a step with zero gradients) even when no step was taken, so saving without a step needs the same
memory. The full Qwen2.5-1.5B shape (1.54B params, ~25 GB) does not fit in this machine's RAM; like
``make_checkpoints.large_spec``, the 1.5B-shaped checkpoint keeps Qwen2.5-1.5B's widths and drops
decoder layers until the estimated peak fits in ``MemAvailable`` minus a safety margin and the checkpoint
plus the bench's outputs fit on disk, and uses at most ``LARGE_MAX_LAYERS`` (13, the 0.84B of the earlier
runs, so the sizes stay comparable).

Cache: ``.cache/bench/<key>/`` (the same root as ``make_checkpoints.py``); the key encodes the shape,
FSDP2, world size, dtypes, steps, the save layout (``LAYOUT``) and the torch version.
``bench_complete.json`` is written last::

    <key>/checkpoint-1/config.json, generation_config.json, tokenizer*
    <key>/checkpoint-1/pytorch_model_fsdp_0/.metadata, __0_0.distcp, __1_0.distcp   # {"model": ...}
    <key>/checkpoint-1/optimizer_0/.metadata, __0_0.distcp, __1_0.distcp            # {"optimizer": ...}
    <key>/bench_complete.json   # generation time, peak memory, sizes (the marker)

Usage::

    python bench/make_fsdp_checkpoints.py [--only NAME ...] [--no-large]

The same file is the FSDP2 worker (``--worker SPEC``), launched as
``torchrun --nproc_per_node 2 --master_port P bench/make_fsdp_checkpoints.py --worker SPEC``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_checkpoints as mk  # noqa: E402

CACHE = mk.CACHE
MARKER = mk.MARKER
WORLD_SIZE = mk.WORLD_SIZE
# Summed over both ranks, per parameter: fp32 params 4 + grads 4 + Adam moments 8, plus the bf16
# all-gathered layer and the unsharded fp32 embedding gradient during the step. Measured at 0.494B params:
# 8.96 GiB peak tree RSS (4.57 GiB per rank, during the step), with MALLOC_MMAP_THRESHOLD_ fixed (below).
FSDP2_STEP_BYTES_PER_PARAM = 18
OVERHEAD_BYTES = 2 * 2**30  # torchrun + two interpreters with torch and transformers, gloo buffers
# glibc raises its mmap threshold (up to 32 MiB) each time a large mmapped block is freed: after the full
# fp32 model is built and sharded, later tensors come from the heap and freed ones are kept, which added
# ~0.8 GiB per rank at 0.5B (10.9 GiB instead of 9.0 GiB summed). A fixed threshold keeps the default
# 128 KiB; it changes nothing in what is written.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
DISK_SAFETY_BYTES = 5 * 2**30  # the disk is shared too
SMALL_NAME = "qwen0.5b-dcp"
LARGE_NAME = "qwen1.5b-shape-dcp"
LARGE_MAX_LAYERS = 13  # 0.842B: the size of the earlier runs (then disk-bound), kept for comparability
# Save layout (in the cache key and the marker): HF Trainer / Accelerate FSDP2 SHARDED_STATE_DICT. The
# earlier one-folder {"model", "optim"} layout (kind "fsdp2-dcp", key "...-dcp-torch...") is not reused.
LAYOUT = "accelerate-sharded"
KIND = "fsdp2-dcp-" + LAYOUT
MODEL_DIR = "pytorch_model_fsdp_0"  # accelerate.utils.constants.FSDP_MODEL_NAME + "_0"
OPTIM_DIR = "optimizer_0"  # accelerate.utils.constants.OPTIMIZER_NAME + "_0"


@dataclass(frozen=True)
class DcpSpec:
    """One FSDP2 DCP checkpoint to generate."""

    name: str
    shape: mk.Shape
    steps: int = 1

    def key(self) -> str:
        """Cache key: shape + FSDP2 + world size + dtypes + steps + save layout + torch version."""
        s = self.shape
        return (f"qwen2-v{s.vocab}-h{s.hidden}-l{s.layers}-i{s.intermediate}-a{s.heads}-kv{s.kv_heads}"
                f"-fsdp2-w{WORLD_SIZE}-fp32-mpbf16-adamw-steps{self.steps}-{LAYOUT}-torch{version('torch')}")

    def folder(self) -> Path:
        """The cache entry."""
        return CACHE / self.key()

    def ckpt(self) -> Path:
        """The ``checkpoint-N`` folder (N = steps), handed to our tool."""
        return self.folder() / f"checkpoint-{self.steps}"


def ckpt_of(info: dict[str, Any]) -> Path:
    """The ``checkpoint-N`` folder of a cached entry, from its marker."""
    return CACHE / info["key"] / info["ckpt_dir"]


def model_dcp_of(info: dict[str, Any]) -> Path:
    """The model DCP folder (``checkpoint-N/pytorch_model_fsdp_0``) of a cached entry, from its marker."""
    return ckpt_of(info) / MODEL_DIR


def small_spec() -> DcpSpec:
    """The Qwen2.5-0.5B shape of the DeepSpeed bench."""
    return DcpSpec(SMALL_NAME, mk.QWEN_05B)


def model_dcp_bytes(shape: mk.Shape) -> int:
    """Estimated size of ``pytorch_model_fsdp_0/``: fp32 weights, and the tied ``lm_head.weight``, which
    ``get_model_state_dict`` lists and DCP writes a second time. ``dcp_to_torch_save``'s and
    ``accelerate merge-weights``' outputs are this size too."""
    return 4 * shape.params() + 4 * shape.vocab * shape.hidden


def dcp_bytes(shape: mk.Shape) -> int:
    """Estimated size of the whole checkpoint: the model folder + 2 fp32 Adam moments per parameter."""
    return model_dcp_bytes(shape) + 8 * shape.params()


def disk_need(shape: mk.Shape) -> int:
    """Disk the bench needs at most: the checkpoint, and two outputs at once (our fp32 file with its ``cp``
    copy, or with ``accelerate merge-weights``' output during the untimed cross-check)."""
    return dcp_bytes(shape) + 4 * shape.params() + model_dcp_bytes(shape)


def large_spec(avail: int | None = None, disk_free: int | None = None) -> tuple[DcpSpec, str]:
    """The largest Qwen2.5-1.5B-shaped model, up to ``LARGE_MAX_LAYERS`` layers, whose FSDP2 AdamW step fits
    in the RAM available now, and whose checkpoint and the bench's outputs fit on disk."""
    avail = mk.mem_available() if avail is None else avail
    CACHE.mkdir(parents=True, exist_ok=True)
    disk_free = shutil.disk_usage(CACHE).free if disk_free is None else disk_free
    budget = avail - mk.SAFETY_BYTES - OVERHEAD_BYTES
    disk_budget = disk_free - DISK_SAFETY_BYTES
    fits = {"ram": mk.QWEN_15B.layers, "disk": mk.QWEN_15B.layers}
    for what in fits:
        while fits[what] > 1:
            shape = mk.Shape(**{**asdict(mk.QWEN_15B), "layers": fits[what]})
            need = shape.params() * FSDP2_STEP_BYTES_PER_PARAM if what == "ram" else disk_need(shape)
            if need <= (budget if what == "ram" else disk_budget):
                break
            fits[what] -= 1
    layers = min(*fits.values(), LARGE_MAX_LAYERS)
    shape = mk.Shape(**{**asdict(mk.QWEN_15B), "layers": layers})
    full = mk.QWEN_15B
    full_gib = full.params() * FSDP2_STEP_BYTES_PER_PARAM / 2**30
    note = (f"MemAvailable {avail / 2**30:.1f} GiB, disk free {disk_free / 2**30:.1f} GiB at selection. RAM: one "
            f"AdamW step needs ~{FSDP2_STEP_BYTES_PER_PARAM} B/param + {OVERHEAD_BYTES / 2**30:.0f} GiB here (the "
            f"full 28 layers, {full.params() / 1e9:.2f}B params, ~{full_gib:.0f} GiB), keeping "
            f"{mk.SAFETY_BYTES / 2**30:.0f} GiB free -> {fits['ram']} layers fit. Disk: the checkpoint "
            f"(~{dcp_bytes(full) / 2**30:.0f} GiB at 28 layers) and two model-sized outputs at once "
            f"(~{disk_need(full) / 2**30:.0f} GiB in all), keeping {DISK_SAFETY_BYTES / 2**30:.0f} GiB free -> "
            f"{fits['disk']} layers fit. Capped at {LARGE_MAX_LAYERS} (the size of the earlier runs). "
            f"Used {layers}/28 layers, {shape.params() / 1e9:.3f}B params")
    return DcpSpec(LARGE_NAME, shape), note


def find_cached(name: str) -> DcpSpec | None:
    """A complete cached checkpoint of that name for this torch (the largest if several)."""
    best: DcpSpec | None = None
    for marker in CACHE.glob(f"*/{MARKER}"):
        info = json.loads(marker.read_text())
        same_torch = info.get("torch_version") == version("torch")
        if info.get("name") == name and info.get("kind") == KIND and same_torch:
            spec = DcpSpec(name, mk.Shape(**info["shape"]), info.get("steps", 1))
            if best is None or spec.shape.params() > best.shape.params():
                best = spec
    return best


def specs(no_large: bool = False) -> list[tuple[DcpSpec, str]]:
    """The DCP checkpoints to benchmark: cached ones first, else those that fit now."""
    small = find_cached(SMALL_NAME)
    out: list[tuple[DcpSpec, str]] = [(small or small_spec(), "cached" if small else "")]
    if not no_large:
        cached = find_cached(LARGE_NAME)
        out.append((cached, "cached") if cached else large_spec())
    return out


def dcp_tensor_bytes(ckpt: Path) -> dict[str, int]:
    """Bytes of the ``model.*`` tensors of ``pytorch_model_fsdp_0/`` and of all tensors of ``optimizer_0/``
    (``other``), from the written ``.metadata`` files (parent side)."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out = {"model": 0, "other": 0, "model_tensors": 0, "other_tensors": 0}
    for sub in (MODEL_DIR, OPTIM_DIR):
        md = FileSystemReader(str(ckpt / sub)).read_metadata()
        for key, meta in md.state_dict_metadata.items():
            if not isinstance(meta, TensorStorageMetadata):
                continue
            nbytes = meta.size.numel() * torch.empty((), dtype=meta.properties.dtype).element_size()
            part = "model" if sub == MODEL_DIR and key.startswith("model.") else "other"
            out[part] += nbytes
            out[part + "_tensors"] += 1
    return out


# -- generation (parent side) -------------------------------------------------------------------------


def generate(spec: DcpSpec, note: str = "") -> dict[str, Any]:
    """Train and save ``spec`` unless a complete copy is cached; return its marker contents."""
    folder = spec.folder()
    marker = folder / MARKER
    cached = mk.cached_marker(folder)
    if cached is not None:
        return cached
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps({"name": spec.name, "shape": asdict(spec.shape), "steps": spec.steps,
                                     "ckpt": str(spec.ckpt()), "worker_json": str(folder / "worker.json")}))
    env = mk.launcher_env(**MALLOC_ENV)
    port = mk._free_port()
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(WORLD_SIZE),
           "--master_port", str(port), str(Path(__file__).resolve()), "--worker", str(spec_path)]
    run = mk.launch_watched(cmd, env, folder / "train.log", f"{spec.name}: torchrun")
    files = sorted(p for p in spec.ckpt().rglob("*") if p.is_file())
    worker_info = json.loads((folder / "worker.json").read_text())
    info = {
        "name": spec.name,
        "kind": KIND,
        "key": spec.key(),
        "ckpt_dir": spec.ckpt().name,
        "shape": asdict(spec.shape),
        "params": spec.shape.params(),
        "world_size": WORLD_SIZE,
        "steps": spec.steps,
        "layout": (f'HF Trainer / Accelerate FSDP2 SHARDED_STATE_DICT: {spec.ckpt().name}/{MODEL_DIR}/ = '
                   'dcp.save({"model": get_model_state_dict(m)}), '
                   f'{spec.ckpt().name}/{OPTIM_DIR}/ = dcp.save({{"optimizer": get_optimizer_state_dict(m, opt)}}), '
                   f'config + tokenizer in {spec.ckpt().name}/'),
        "param_dtype": "float32",
        "mixed_precision": "bf16 params for compute, fp32 reduce (MixedPrecisionPolicy)",
        "torch_version": version("torch"),
        "transformers_version": version("transformers"),
        **run,
        "worker": worker_info,
        "ckpt_bytes": sum(p.stat().st_size for p in files),
        "model_dcp_bytes": sum(p.stat().st_size for p in (spec.ckpt() / MODEL_DIR).rglob("*") if p.is_file()),
        "tensor_bytes": dcp_tensor_bytes(spec.ckpt()),
        "files": {str(p.relative_to(spec.ckpt())): p.stat().st_size for p in files},
        "note": note,
    }
    return mk.write_marker(marker, info)


# -- FSDP2 worker (one per rank, under torchrun) ------------------------------------------------------

_WORDS = ("the a one two three shard tensor weight bias layer model check point fully shard fast slow small "
          "large token head embed norm gate up down proj train step loss grad adam learn rate batch seed cpu "
          "rank world save load merge flat group optimizer state").split()


def build_tokenizer(folder: Path) -> None:
    """Train a small byte-level BPE tokenizer on generated text and save it (no download needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 16))) for _ in range(400)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=480, special_tokens=["<|endoftext|>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                            unk_token="<unk>").save_pretrained(folder)


def worker(spec_path: Path) -> None:
    """Build in fp32, fully_shard per layer + root, one AdamW step, save as Accelerate's FSDP2 SHARDED_STATE_DICT."""
    # If memory runs out anyway, the kernel should kill these ranks, not other users' processes.
    Path("/proc/self/oom_score_adj").write_text("1000")
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM, Qwen2Config

    spec = json.loads(spec_path.read_text())
    s = mk.Shape(**spec["shape"])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    times: dict[str, float] = {}
    rss: dict[str, float] = {}

    def mark(phase: str) -> None:
        """This rank's current and peak RSS (GiB) after a phase."""
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        rss[phase] = round(int(status["VmRSS"].split()[0]) / 2**20, 2)
        rss[phase + "_hwm"] = round(int(status["VmHWM"].split()[0]) / 2**20, 2)
    # The same config as make_checkpoints.worker (the DeepSpeed bench).
    config = Qwen2Config(
        vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers, intermediate_size=s.intermediate,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, tie_word_embeddings=True,
        max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6, hidden_act="silu",
        bos_token_id=151643, eos_token_id=151643, use_cache=False,
    )
    t0 = time.monotonic()
    torch.manual_seed(0)  # same init on every rank
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n = sum(p.numel() for p in model.parameters())
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("fsdp",))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    times["build_s"] = time.monotonic() - t0
    mark("built")
    print(f"rank {rank}: built and sharded {n / 1e6:.1f}M params in {times['build_s']:.1f}s", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(rank)
    t1 = time.monotonic()
    for _ in range(spec["steps"]):
        ids = torch.randint(0, s.vocab, (1, 8), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"rank {rank}: step loss {loss.item():.3f}", flush=True)
    times["steps_s"] = time.monotonic() - t1
    mark("stepped")
    ckpt = Path(spec["ckpt"])
    # As accelerate.utils.fsdp_utils.save_fsdp_model / save_fsdp_optimizer (FSDP2, SHARDED_STATE_DICT,
    # use_dcp=True, index 0) with the options _prepare_sd_options builds from Accelerate's default
    # ShardedStateDictConfig(offload_to_cpu=True): model first, then optimizer, one DCP folder each.
    opts = StateDictOptions(full_state_dict=False, cpu_offload=True, broadcast_from_rank0=False)
    t2 = time.monotonic()
    model_sd = get_model_state_dict(model, options=opts)
    mark("model_state_dict")
    model_dir = ckpt / MODEL_DIR
    model_dir.mkdir(parents=True, exist_ok=True)
    dcp.save(state_dict={"model": model_sd}, storage_writer=FileSystemWriter(str(model_dir)),
             planner=DefaultSavePlanner())
    mark("model_saved")
    optim_sd = get_optimizer_state_dict(model, opt, options=opts)
    mark("optim_state_dict")
    optim_dir = ckpt / OPTIM_DIR
    optim_dir.mkdir(parents=True, exist_ok=True)
    dcp.save(state_dict={"optimizer": optim_sd}, storage_writer=FileSystemWriter(str(optim_dir)),
             planner=DefaultSavePlanner())
    times["save_s"] = time.monotonic() - t2
    mark("saved")
    state = {"model": model_sd, "optimizer": optim_sd}
    per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, rss)
    if rank == 0:
        # architectures by hand: after fully_shard the class is FSDPQwen2ForCausalLM.
        config.architectures = ["Qwen2ForCausalLM"]
        config.dtype = "bfloat16"  # the training precision, as the DeepSpeed bench records it
        config.save_pretrained(ckpt)
        model.generation_config.save_pretrained(ckpt)
        build_tokenizer(ckpt)
        info = {k: round(v, 1) for k, v in times.items()}
        info["state_keys"] = {"model": len(state["model"]), "optimizer.state": len(state["optimizer"]["state"])}
        info["rss_gib_per_rank"] = per_rank
        Path(spec["worker_json"]).write_text(json.dumps(info))
    print(f"rank {rank}: saved in {times['save_s']:.1f}s", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    """Generate the DCP benchmark checkpoints (or act as an FSDP2 rank with ``--worker``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="*", default=None, help="names to generate (default: all)")
    ap.add_argument("--no-large", action="store_true", help="skip the 1.5B-shaped checkpoint")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    for spec, note in specs(args.no_large):
        if args.only and spec.name not in args.only:
            continue
        print(f"{spec.name}: {spec.shape.params() / 1e9:.3f}B params, FSDP2 DCP -> {spec.folder()} {note}", flush=True)
        info = generate(spec, note)
        print(json.dumps({k: v for k, v in info.items() if k != "files"}), flush=True)


if __name__ == "__main__":
    main()
