"""Train tiny models with real DeepSpeed ZeRO on CPU and save raw checkpoints + truth.

Launched by ``build.py`` as::

    deepspeed --num_gpus N tests/corpus/ds_train.py --plan plan.json

The plan lists several cases with the same world size; they are trained one after
another inside this single launch (one ``deepspeed.initialize`` per case), which
amortises the launcher / import overhead.

For every case the rank-0 process writes, in this order:

* ``ckpt/`` via ``engine.save_checkpoint(ckpt, tag="global_step{N}")`` (all ranks),
  optionally with ``config.json``, ``generation_config.json`` and tokenizer files;
* ``truth/global_step{N}.safetensors``: fp32 values gathered from the live engine;
* ``case.json`` (atomically, last) - the marker that the case is complete.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402
from tests.corpus import common  # noqa: E402

# The CPU accelerator reports fp16 as unsupported, which makes DeepSpeed refuse an
# fp16 config.  Mixed-precision bookkeeping (loss scaling, fp32 masters) works fine
# on CPU, so pretend fp16 is supported.
CPU_Accelerator.is_fp16_supported = lambda self: True  # type: ignore[method-assign]


def disable_shm_comm() -> None:
    """Skip DeepSpeed's shared-memory all-reduce C++ op.

    ``TorchBackend.__init__`` JIT-compiles ``deepspeed_shm_comm`` on the CPU
    accelerator (~80 s on a cold machine, cached in ~/.cache/torch_extensions).
    It is only an all-reduce fast path; plain gloo is fine for us.
    """
    import importlib

    # NB: ``import deepspeed.comm.torch as m`` would bind the *real* torch module,
    # because ``deepspeed.comm`` has a ``torch`` attribute; go through sys.modules.
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    ds_comm_torch.build_shm_op = lambda: None


def ds_config(case: dict[str, Any]) -> dict[str, Any]:
    """DeepSpeed config dict for a raw case."""
    zero: dict[str, Any] = {"stage": case["stage"]}
    if case["stage"] == 3:
        # Partition every parameter (the default threshold would keep all the tiny
        # params persistent/unpartitioned and hide partition padding).
        zero["stage3_param_persistence_threshold"] = 0
    zero.update(case.get("zero_extra", {}))
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10_000,
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1, "torch_adam": True},
        },
        "zero_optimization": zero,
    }
    if case["precision"] == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif case["precision"] == "fp16":
        # Small initial scale so that no step is skipped for overflow: we need the
        # fp32 masters to actually move away from the init.
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 6, "loss_scale_window": 100, "hysteresis": 2}
    return cfg


def zero12_masters(engine: Any) -> dict[str, torch.Tensor]:
    """The fp32 masters of a ZeRO-1/2 engine, cut from its flat partitions (collective: call on all ranks).

    ``safe_get_full_fp32_param`` cannot be used under ``round_robin_gradients``: DeepSpeed 0.19 links
    each parameter to its fp32 fragment at offsets counted in the module's order when the group has no
    alignment padding, while the flat buffers follow the round-robin order, so it returns other
    parameters' values. Here each low-precision parameter, a view into its group's flat buffer, says
    where it lies; the ranks' fp32 partitions, concatenated, are that buffer's masters. The cast of
    each master must equal the live weight, bit for bit.
    """
    opt = engine.optimizer
    names = {p: n for n, p in engine.module.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for g, flat in enumerate(opt.bit16_groups_flat):
        part = opt.single_partition_of_fp32_groups[g].detach().cpu()
        parts = [torch.empty_like(part) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, part)
        full = torch.cat(parts)
        assert full.numel() == flat.numel(), (g, full.numel(), flat.numel())
        for p in opt.bit16_groups[g]:
            assert p.data.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr(), names[p]
            offset = p.data.storage_offset() - flat.storage_offset()
            master = full[offset : offset + p.numel()].view(p.shape).clone()
            assert torch.equal(master.to(p.dtype), p.data), f"{names[p]}: master cast != live weight"
            out[names[p]] = master
    return out


def gather_truth(
    module: torch.nn.Module,
    stage: int,
    buffer_names: list[str],
    trainable_only: bool = False,
    masters: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Gather the full fp32 state from the live engine (collective: call on all ranks).

    Trainable params: their fp32 masters (``masters`` if given, else ``safe_get_full_fp32_param``);
    frozen params (unless ``trainable_only``) and the persistent ``buffer_names``: their live values, as fp32.
    """
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if p.requires_grad and masters is not None:
            out[name] = masters[name]
        elif p.requires_grad:
            full = safe_get_full_fp32_param(p)
            assert full is not None, f"no fp32 master for trainable {name}"
            assert full.dtype == torch.float32, (name, full.dtype)
            out[name] = full.detach().float().cpu().clone()
        elif trainable_only:
            continue
        elif stage == 3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out[name] = p.detach().float().cpu().clone()
        else:
            out[name] = p.detach().float().cpu().clone()
    wanted = set(buffer_names)
    for name, b in module.named_buffers():
        if name in wanted:
            out[name] = b.detach().float().cpu().clone() if b.is_floating_point() else b.detach().cpu().clone()
    return {k: v.contiguous() for k, v in out.items()}


def run_case(case: dict[str, Any], tokenizer: Any) -> None:
    """Train one case and write its folder (rank 0 writes files, all ranks save/gather)."""
    t0 = time.time()
    rank = dist.get_rank()
    case_dir = Path(case["case_dir"])
    ckpt = case_dir / "ckpt"
    truth_dir = case_dir / "truth"
    model_spec = case["model"]

    model = common.build_model(model_spec, seed=case["seed"])
    tied = common.tied_map(model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    buffers = common.persistent_buffer_names(model)
    groups = common.param_groups(model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config(case))

    gen = torch.Generator().manual_seed(case["seed"] * 1000 + rank)
    checkpoints = []
    for step in range(1, max(case["save_steps"]) + 1):
        loss = engine(**common.train_batch(model_spec, gen)).loss
        engine.backward(loss)
        engine.step()
        if step in case["save_steps"]:
            tag = f"global_step{step}"
            engine.save_checkpoint(str(ckpt), tag=tag)
            masters = zero12_masters(engine) if case["zero_extra"].get("round_robin_gradients") else None
            truth = gather_truth(engine.module, case["stage"], buffers, masters=masters)
            if rank == 0:
                common.save_truth(truth_dir / f"{tag}.safetensors", truth)
            checkpoints.append({"tag": tag, "path": f"ckpt/{tag}", "truth": f"truth/{tag}.safetensors", "step": step})
            dist.barrier()
    skipped = int(getattr(engine, "skipped_steps", 0))
    if skipped:
        raise RuntimeError(f"{case['name']}: {skipped} optimizer steps skipped (fp16 overflow)")

    if rank == 0:
        if case["has_config"]:
            common.save_hf_extras(ckpt, engine.module, tokenizer if case["has_tokenizer"] else None, case["precision"])
        elif case["has_tokenizer"]:
            tokenizer.save_pretrained(ckpt)
    dist.barrier()
    if rank == 0:
        meta = dict(case["meta"])
        meta.update(
            tied=bool(tied),
            tied_keys=tied,
            frozen=frozen,
            buffers=buffers,
            param_groups=len(groups),
            checkpoints=checkpoints,
            num_params=sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters()),
            deepspeed_version=deepspeed.__version__,
            torch_version=torch.__version__,
            build_seconds=round(time.time() - t0, 2),
        )
        common.write_json_atomic(case_dir / "case.json", meta)
        print(f"[ds_train] {case['name']}: done in {time.time() - t0:.1f}s", flush=True)
    engine.destroy()
    del engine, model
    gc.collect()
    dist.barrier()


def main() -> None:
    """Entry point under the ``deepspeed`` launcher."""
    plan = common.read_plan()
    disable_shm_comm()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    tokenizer = common.build_tokenizer() if any(c["has_tokenizer"] for c in plan["cases"]) else None
    for case in plan["cases"]:
        run_case(case, tokenizer)


if __name__ == "__main__":
    main()
