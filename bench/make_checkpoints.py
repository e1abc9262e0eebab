"""Generate (and cache) realistic DeepSpeed ZeRO checkpoints of Qwen2-shaped models on CPU.

Each checkpoint is trained for one step with real DeepSpeed (CPU accelerator, gloo, ``torch_adam``,
bf16) at world size 2 and saved with ``engine.save_checkpoint``. The cache lives under
``/work/main/.cache/bench/<key>/`` where the key encodes the shape, the ZeRO stage, the world size
and the DeepSpeed version. A folder is complete only once ``bench_complete.json`` exists; it is
written last, so an interrupted generation is simply redone.

Layout of one cache entry::

    <key>/ckpt/latest, global_step1/..., zero_to_fp32.py, config.json
    <key>/bench_complete.json   # generation time, peak memory, sizes (the marker)

Usage::

    python bench/make_checkpoints.py [--only NAME ...]

The same file is also the DeepSpeed worker (``--worker SPEC``), launched as
``deepspeed --master_port P --num_gpus 2 bench/make_checkpoints.py --worker SPEC``.
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
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench"
MARKER = "bench_complete.json"
WORLD_SIZE = 2
BASE_PORT = 29750
# Keep this much RAM free for the other users of the machine while DeepSpeed trains.
SAFETY_BYTES = 4 * 2**30
# Training one step under ZeRO-3 bf16 measured 17.1 GiB summed RSS at 0.494B params here (~35 B/param),
# so a 1.2-1.5B model cannot take an optimizer step in 24 GiB. Saving right after initialize (no step,
# hence no Adam moments yet) keeps per parameter, summed over ranks: bf16 partition 2, fp32 master 4,
# bf16 grad buffer 2, plus ~2 while the partitions are flattened (each rank first builds the full bf16
# model: deepspeed.zero.Init fails with torch 2.13 here, "Signature mismatch ... tensor_pynew").
ZERO3_NOSTEP_BYTES_PER_PARAM = 10
OVERHEAD_BYTES = 3 * 2**30  # four interpreters with torch, gloo buffers


@dataclass(frozen=True)
class Shape:
    """A Qwen2 decoder shape."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int

    def params(self) -> int:
        """Parameter count with tied embeddings (no lm_head of its own)."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        attn = self.hidden * self.hidden * 2 + self.hidden * kv * 2 + self.hidden + 2 * kv  # q, o, k, v + biases
        mlp = 3 * self.hidden * self.intermediate
        layer = attn + mlp + 2 * self.hidden
        return self.vocab * self.hidden + self.layers * layer + self.hidden


QWEN_05B = Shape(vocab=151936, hidden=896, layers=24, intermediate=4864, heads=14, kv_heads=2)
QWEN_15B = Shape(vocab=151936, hidden=1536, layers=28, intermediate=8960, heads=12, kv_heads=2)


@dataclass(frozen=True)
class Spec:
    """One checkpoint to generate."""

    name: str
    shape: Shape
    stage: int
    sub_group_size: int = 1_000_000_000
    steps: int = 1  # optimizer steps before saving; 0 saves no Adam moments (see large_spec)
    zero_init: bool = False  # build the model under deepspeed.zero.Init (never holds a full copy)

    def key(self) -> str:
        """Cache key: shape + stage + world size + steps + DeepSpeed version."""
        s = self.shape
        extra = ("" if self.steps == 1 else f"-steps{self.steps}") + ("-zinit" if self.zero_init else "")
        return (f"qwen2-v{s.vocab}-h{s.hidden}-l{s.layers}-i{s.intermediate}-a{s.heads}-kv{s.kv_heads}"
                f"-z{self.stage}-w{WORLD_SIZE}-bf16-sg{self.sub_group_size}{extra}-ds{version('deepspeed')}")

    def folder(self) -> Path:
        """The cache entry."""
        return CACHE / self.key()

    def ckpt(self) -> Path:
        """The checkpoint folder handed to the tools."""
        return self.folder() / "ckpt"


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def large_spec(avail: int | None = None) -> tuple[Spec, str]:
    """The largest Qwen2.5-1.5B-shaped ZeRO-3 model that trains in the RAM available now.

    Layers are dropped from the 28 of Qwen2.5-1.5B until the estimated DeepSpeed peak fits in
    ``MemAvailable - SAFETY_BYTES``. Returns the spec and a note explaining the choice.
    """
    avail = mem_available() if avail is None else avail
    budget = avail - SAFETY_BYTES - OVERHEAD_BYTES
    layers = QWEN_15B.layers
    while layers > 1:
        shape = Shape(**{**asdict(QWEN_15B), "layers": layers})
        if shape.params() * ZERO3_NOSTEP_BYTES_PER_PARAM <= budget:
            break
        layers -= 1
    shape = Shape(**{**asdict(QWEN_15B), "layers": layers})
    note = (f"MemAvailable {avail / 2**30:.1f} GiB at selection; 0 optimizer steps (no Adam moments on disk): "
            f"a step needs ~35 B/param here; saving after initialize needs ~{ZERO3_NOSTEP_BYTES_PER_PARAM} B/param "
            f"+ {OVERHEAD_BYTES / 2**30:.0f} GiB, keeping {SAFETY_BYTES / 2**30:.0f} GiB free "
            f"-> {layers}/28 layers, {shape.params() / 1e9:.3f}B params")
    return Spec("qwen1.5b-shape-z3", shape, 3, sub_group_size=100_000_000, steps=0), note


def small_specs() -> list[Spec]:
    """The 0.5B checkpoints (ZeRO-2 and ZeRO-3)."""
    return [Spec("qwen0.5b-z2", QWEN_05B, 2), Spec("qwen0.5b-z3", QWEN_05B, 3)]


def find_cached_large() -> Spec | None:
    """A complete large checkpoint already in the cache (whatever layer count fitted then)."""
    best: Spec | None = None
    for marker in CACHE.glob(f"*/{MARKER}"):
        info = json.loads(marker.read_text())
        if info.get("name") == "qwen1.5b-shape-z3" and info.get("ds_version") == version("deepspeed"):
            spec = Spec(info["name"], Shape(**info["shape"]), info["stage"], info["sub_group_size"],
                        info.get("steps", 1), info.get("zero_init", False))
            if best is None or spec.shape.layers > best.shape.layers:
                best = spec
    return best


# -- generation (parent side) -------------------------------------------------------------------------


def _free_port(start: int = BASE_PORT) -> int:
    for port in range(start, start + 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def _tree_rss(proc: Any) -> int:
    """Summed RSS of a psutil process and its descendants (the ranks are separate processes)."""
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def launch_watched(cmd: list[str], env: dict[str, str], log_path: Path, label: str) -> dict[str, Any]:
    """Run a training launcher (``deepspeed``/``torchrun``) to completion, logging to ``log_path``.

    Watches the summed RSS of its process tree and the machine's free memory; stops its own process
    group if MemAvailable falls under 1 GiB (other users share the machine).

    Returns:
        The marker fields: ``generation_seconds``, ``generation_peak_tree_rss_gib``,
        ``generation_min_mem_available_gib``, ``loadavg_start``, ``loadavg_end``.

    Raises:
        RuntimeError: It failed or was stopped; the message ends with the log's last 40 lines.
    """
    import psutil

    load0 = os.getloadavg()
    t0 = time.monotonic()
    peak = 0
    min_avail = mem_available()
    killed = ""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak = max(peak, _tree_rss(ps))
            avail = mem_available()
            min_avail = min(min_avail, avail)
            if avail < 1 * 2**30 and not killed:
                killed = f"MemAvailable fell to {avail / 2**30:.2f} GiB"
                os.killpg(proc.pid, 9)
            time.sleep(0.25)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{label} failed (rc={proc.returncode}) {killed}\n{tail}")
    return {"generation_seconds": round(seconds, 1), "generation_peak_tree_rss_gib": round(peak / 2**30, 2),
            "generation_min_mem_available_gib": round(min_avail / 2**30, 2), "loadavg_start": load0,
            "loadavg_end": os.getloadavg()}


def cached_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a complete cached copy in ``folder``; else None, with ``folder`` emptied for a new one."""
    marker = folder / MARKER
    if marker.is_file():
        return json.loads(marker.read_text())
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return None


def write_marker(marker: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write a cache entry's marker atomically, last: from then on the entry counts as complete."""
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, marker)
    return info


def launcher_env(**extra: str) -> dict[str, str]:
    """The environment of a training launcher: offline, unbuffered, one OMP thread, this venv first on PATH."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def generate(spec: Spec, note: str = "") -> dict[str, Any]:
    """Train and save ``spec`` unless a complete copy is cached; return its marker contents."""
    folder = spec.folder()
    marker = folder / MARKER
    cached = cached_marker(folder)
    if cached is not None:
        return cached
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps({"name": spec.name, "shape": asdict(spec.shape), "stage": spec.stage,
                                     "sub_group_size": spec.sub_group_size, "steps": spec.steps,
                                     "zero_init": spec.zero_init, "ckpt": str(spec.ckpt())}))
    env = launcher_env(DS_ACCELERATOR="cpu")
    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--master_port", str(port), "--num_gpus", str(WORLD_SIZE),
           str(Path(__file__).resolve()), "--worker", str(spec_path)]
    run = launch_watched(cmd, env, folder / "train.log", f"{spec.name}: deepspeed")
    files = sorted(p for p in spec.ckpt().rglob("*") if p.is_file())
    info = {
        "name": spec.name,
        "key": spec.key(),
        "shape": asdict(spec.shape),
        "params": spec.shape.params(),
        "stage": spec.stage,
        "world_size": WORLD_SIZE,
        "sub_group_size": spec.sub_group_size,
        "steps": spec.steps,
        "zero_init": spec.zero_init,
        "ds_version": version("deepspeed"),
        "torch_version": version("torch"),
        **run,
        "ckpt_bytes": sum(p.stat().st_size for p in files),
        "files": {str(p.relative_to(spec.ckpt())): p.stat().st_size for p in files},
        "note": note,
    }
    return write_marker(marker, info)


# -- DeepSpeed worker (one per rank) ------------------------------------------------------------------


def worker(spec_path: Path) -> None:
    """Build the model in bf16, train ``steps`` steps under ZeRO, save the checkpoint and config.json."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # If memory runs out anyway, the kernel should kill these ranks, not other users' processes.
    Path("/proc/self/oom_score_adj").write_text("1000")
    import deepspeed
    import deepspeed.comm.torch as ds_comm_torch
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, Qwen2Config

    # The shared-memory all-reduce op is an optional fast path that JIT-compiles for minutes.
    ds_comm_torch.build_shm_op = lambda: None
    spec = json.loads(spec_path.read_text())
    s = Shape(**spec["shape"])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    config = Qwen2Config(
        vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers, intermediate_size=s.intermediate,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, tie_word_embeddings=True,
        max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6, hidden_act="silu",
        bos_token_id=151643, eos_token_id=151643, use_cache=False,
    )
    torch.manual_seed(0)  # same init on every rank
    zero: dict[str, Any] = {"stage": spec["stage"]}
    if spec["stage"] == 3:
        zero["sub_group_size"] = spec["sub_group_size"]
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10_000,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": zero,
    }
    t0 = time.monotonic()
    # Built directly in bf16: half the memory of an fp32 build, and what DeepSpeed keeps anyway.
    if spec.get("zero_init"):
        with deepspeed.zero.Init(config_dict_or_path=cfg, dtype=torch.bfloat16):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        n = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        n = sum(p.numel() for p in model.parameters())
    print(f"rank {rank}: built {n / 1e6:.1f}M params in {time.monotonic() - t0:.1f}s", flush=True)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(spec.get("steps", 1)):
        ids = torch.randint(0, s.vocab, (1, 8), generator=gen)
        t1 = time.monotonic()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        print(f"rank {rank}: step loss {loss.item():.3f} in {time.monotonic() - t1:.1f}s", flush=True)
    ckpt = Path(spec["ckpt"])
    t2 = time.monotonic()
    engine.save_checkpoint(str(ckpt), tag="global_step1")
    dist.barrier()
    if rank == 0:
        config.dtype = "bfloat16"
        config.save_pretrained(ckpt)  # config only: the tools look for config.json next to the checkpoint
    print(f"rank {rank}: saved in {time.monotonic() - t2:.1f}s", flush=True)
    dist.barrier()


def main() -> None:
    """Generate the benchmark checkpoints (or act as a DeepSpeed rank with ``--worker``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="*", default=None, help="names to generate (default: all)")
    ap.add_argument("--no-large", action="store_true", help="skip the ~1.5B-shaped checkpoint")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    specs: list[tuple[Spec, str]] = [(s, "") for s in small_specs()]
    if not args.no_large:
        cached = find_cached_large()
        specs.append((cached, "cached") if cached else large_spec())
    for spec, note in specs:
        if args.only and spec.name not in args.only:
            continue
        print(f"{spec.name}: {spec.shape.params() / 1e9:.3f}B params, ZeRO-{spec.stage} -> {spec.folder()} {note}",
              flush=True)
        info = generate(spec, note)
        print(json.dumps({k: v for k, v in info.items() if k != "files"}), flush=True)


if __name__ == "__main__":
    main()
