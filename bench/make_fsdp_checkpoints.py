"""Generate (and cache) FSDP2 torch.distributed.checkpoint (DCP) folders of Qwen2-shaped models on CPU.

Each checkpoint is written by real FSDP2 at world size 2 (``torchrun --nproc_per_node 2``, gloo, CPU):
the model (same ``Qwen2Config`` as the DeepSpeed bench, built in fp32) is wrapped with ``fully_shard``
on every decoder layer and then the root (bf16 ``MixedPrecisionPolicy`` for compute, fp32 parameters and
gradient reduction, as HF Trainer / Accelerate FSDP with ``bf16=True``), takes one AdamW step on random
tokens, and is saved with::

    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=ckpt)

(sharded DTensors: ``.metadata`` + one ``__R_0.distcp`` per rank, fp32 weights and fp32 Adam moments).
Rank 0 then writes ``config.json``, ``generation_config.json`` and a tokenizer next to it, so
``vllm-consolidate convert --input ckpt`` needs no flags. The tokenizer is a small byte-level BPE trained
here on a few lines of text (Qwen's own tokenizer is not available offline on this machine); the tools
only copy it.

Memory: under FSDP2 one AdamW step holds, summed over the ranks, fp32 parameters (4 B/param), fp32
gradients (4) and two fp32 moments (8), and ``get_optimizer_state_dict`` creates the moments (zeros,
by a step with zero gradients) even when no step was taken, so saving without a step needs the same
memory. The full Qwen2.5-1.5B shape (1.54B params, ~25 GB) does not fit in this machine's RAM; like
``make_checkpoints.large_spec``, the 1.5B-shaped checkpoint keeps Qwen2.5-1.5B's widths and drops
decoder layers until the estimated peak fits in ``MemAvailable`` minus a safety margin.

Cache: ``.cache/bench/<key>/`` (the same root as ``make_checkpoints.py``); the key encodes the shape,
FSDP2, world size, dtypes, steps and the torch version. ``bench_complete.json`` is written last::

    <key>/ckpt/.metadata, __0_0.distcp, __1_0.distcp, config.json, generation_config.json, tokenizer*
    <key>/bench_complete.json   # generation time, peak memory, sizes (the marker)

Usage::

    python bench/make_fsdp_checkpoints.py [--only NAME ...] [--no-large]

The same file is the FSDP2 worker (``--worker SPEC``), launched as
``torchrun --nproc_per_node 2 --master_port P bench/make_fsdp_checkpoints.py --worker SPEC``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
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


@dataclass(frozen=True)
class DcpSpec:
    """One FSDP2 DCP checkpoint to generate."""

    name: str
    shape: mk.Shape
    steps: int = 1

    def key(self) -> str:
        """Cache key: shape + FSDP2 + world size + dtypes + steps + torch version."""
        s = self.shape
        return (f"qwen2-v{s.vocab}-h{s.hidden}-l{s.layers}-i{s.intermediate}-a{s.heads}-kv{s.kv_heads}"
                f"-fsdp2-w{WORLD_SIZE}-fp32-mpbf16-adamw-steps{self.steps}-dcp-torch{version('torch')}")

    def folder(self) -> Path:
        """The cache entry."""
        return CACHE / self.key()

    def ckpt(self) -> Path:
        """The DCP folder handed to the tools."""
        return self.folder() / "ckpt"


def small_spec() -> DcpSpec:
    """The Qwen2.5-0.5B shape of the DeepSpeed bench."""
    return DcpSpec(SMALL_NAME, mk.QWEN_05B)


def dcp_bytes(shape: mk.Shape) -> int:
    """Estimated size of the DCP folder: fp32 weights + 2 fp32 Adam moments per parameter, and the tied
    ``lm_head.weight``, which ``get_model_state_dict`` lists and DCP writes a second time."""
    return 12 * shape.params() + 4 * shape.vocab * shape.hidden


def large_spec(avail: int | None = None, disk_free: int | None = None) -> tuple[DcpSpec, str]:
    """The largest Qwen2.5-1.5B-shaped model whose FSDP2 AdamW step fits in the RAM available now, and whose
    checkpoint fits on disk twice (``dcp_to_torch_save`` writes everything, optimizer state included)."""
    avail = mk.mem_available() if avail is None else avail
    CACHE.mkdir(parents=True, exist_ok=True)
    disk_free = shutil.disk_usage(CACHE).free if disk_free is None else disk_free
    budget = avail - mk.SAFETY_BYTES - OVERHEAD_BYTES
    disk_budget = disk_free - DISK_SAFETY_BYTES
    fits = {"ram": mk.QWEN_15B.layers, "disk": mk.QWEN_15B.layers}
    for what in fits:
        while fits[what] > 1:
            shape = mk.Shape(**{**asdict(mk.QWEN_15B), "layers": fits[what]})
            need = shape.params() * FSDP2_STEP_BYTES_PER_PARAM if what == "ram" else 2 * dcp_bytes(shape)
            if need <= (budget if what == "ram" else disk_budget):
                break
            fits[what] -= 1
    layers = min(fits.values())
    shape = mk.Shape(**{**asdict(mk.QWEN_15B), "layers": layers})
    full = mk.QWEN_15B
    full_gib = full.params() * FSDP2_STEP_BYTES_PER_PARAM / 2**30
    note = (f"MemAvailable {avail / 2**30:.1f} GiB, disk free {disk_free / 2**30:.1f} GiB at selection. RAM: one "
            f"AdamW step needs ~{FSDP2_STEP_BYTES_PER_PARAM} B/param + {OVERHEAD_BYTES / 2**30:.0f} GiB here (the "
            f"full 28 layers, {full.params() / 1e9:.2f}B params, ~{full_gib:.0f} GiB), keeping "
            f"{mk.SAFETY_BYTES / 2**30:.0f} GiB free -> {fits['ram']} layers fit. Disk: the checkpoint "
            f"and dcp_to_torch_save's output (~{dcp_bytes(full) / 2**30:.0f} GiB each at 28 layers), keeping "
            f"{DISK_SAFETY_BYTES / 2**30:.0f} GiB free -> {fits['disk']} layers fit. Used {layers}/28 layers, "
            f"{shape.params() / 1e9:.3f}B params")
    return DcpSpec(LARGE_NAME, shape), note


def find_cached(name: str) -> DcpSpec | None:
    """A complete cached checkpoint of that name for this torch (the largest if several)."""
    best: DcpSpec | None = None
    for marker in CACHE.glob(f"*/{MARKER}"):
        info = json.loads(marker.read_text())
        same_torch = info.get("torch_version") == version("torch")
        if info.get("name") == name and info.get("kind") == "fsdp2-dcp" and same_torch:
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


def dcp_model_bytes(ckpt: Path) -> dict[str, int]:
    """Bytes of the ``model.*`` and of all other tensors, from the written ``.metadata`` (parent side)."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(ckpt)).read_metadata()
    out = {"model": 0, "other": 0, "model_tensors": 0}
    for key, meta in md.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            continue
        nbytes = meta.size.numel() * torch.empty((), dtype=meta.properties.dtype).element_size()
        if key.startswith("model."):
            out["model"] += nbytes
            out["model_tensors"] += 1
        else:
            out["other"] += nbytes
    return out


# -- generation (parent side) -------------------------------------------------------------------------


def generate(spec: DcpSpec, note: str = "") -> dict[str, Any]:
    """Train and save ``spec`` unless a complete copy is cached; return its marker contents."""
    import psutil

    folder = spec.folder()
    marker = folder / MARKER
    if marker.is_file():
        return json.loads(marker.read_text())
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps({"name": spec.name, "shape": asdict(spec.shape), "steps": spec.steps,
                                     "ckpt": str(spec.ckpt()), "worker_json": str(folder / "worker.json")}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **MALLOC_ENV)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    port = mk._free_port()
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(WORLD_SIZE),
           "--master_port", str(port), str(Path(__file__).resolve()), "--worker", str(spec_path)]
    log_path = folder / "train.log"
    load0 = os.getloadavg()
    t0 = time.monotonic()
    peak = 0
    min_avail = mk.mem_available()
    killed = ""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=mk.REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak = max(peak, mk._tree_rss(ps))
            avail = mk.mem_available()
            min_avail = min(min_avail, avail)
            if avail < 1 * 2**30 and not killed:
                # Protect the other users of the machine: stop our own process group only.
                killed = f"MemAvailable fell to {avail / 2**30:.2f} GiB"
                os.killpg(proc.pid, 9)
            time.sleep(0.25)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{spec.name}: torchrun failed (rc={proc.returncode}) {killed}\n{tail}")
    files = sorted(p for p in spec.ckpt().rglob("*") if p.is_file())
    worker_info = json.loads((folder / "worker.json").read_text())
    info = {
        "name": spec.name,
        "kind": "fsdp2-dcp",
        "key": spec.key(),
        "shape": asdict(spec.shape),
        "params": spec.shape.params(),
        "world_size": WORLD_SIZE,
        "steps": spec.steps,
        "layout": 'dcp.save({"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, opt)})',
        "param_dtype": "float32",
        "mixed_precision": "bf16 params for compute, fp32 reduce (MixedPrecisionPolicy)",
        "torch_version": version("torch"),
        "transformers_version": version("transformers"),
        "generation_seconds": round(seconds, 1),
        "generation_peak_tree_rss_gib": round(peak / 2**30, 2),
        "generation_min_mem_available_gib": round(min_avail / 2**30, 2),
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
        "worker": worker_info,
        "ckpt_bytes": sum(p.stat().st_size for p in files),
        "tensor_bytes": dcp_model_bytes(spec.ckpt()),
        "files": {str(p.relative_to(spec.ckpt())): p.stat().st_size for p in files},
        "note": note,
    }
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, marker)  # the marker is written last: the entry is complete
    return info


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
    """Build in fp32, fully_shard per layer + root, one AdamW step, dcp.save model + optimizer."""
    # If memory runs out anyway, the kernel should kill these ranks, not other users' processes.
    Path("/proc/self/oom_score_adj").write_text("1000")
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
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
    t2 = time.monotonic()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    mark("state_dicts")
    dcp.save(state, checkpoint_id=str(ckpt))
    times["save_s"] = time.monotonic() - t2
    mark("saved")
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
        info["state_keys"] = {k: len(v) for k, v in state.items()}
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
