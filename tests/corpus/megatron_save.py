"""Save one Megatron case with megatron-core's ``dist_checkpointing.save`` and record its truth and facts.

Used by ``megatron_train.py`` (inside ``.venv-megatron``).  Two kinds of case:

``torch_dist``   ``ckpt/`` = ``dist_checkpointing.save({"model": sharded_state_dict}, ckpt)``: the bare
                 folder a NeMo/Bridge/verl user hands over; no args (the HF config is in the case's ``hf/``).
``megatron_lm``  ``run/`` as Megatron-LM's ``save_checkpoint`` writes it for ``--ckpt-format torch_dist``:
                 ``iter_NNNNNNN/`` per save and ``latest_checkpointed_iteration.txt`` holding the last
                 iteration; the saved dict is ``generate_state_dict``'s (``args`` Namespace: with
                 megatron-core 0.19+ Megatron-LM's own, :func:`real_megatron_lm_args`,
                 ``checkpoint_version``, ``iteration``, ``model``, ``optimizer`` via megatron-core's
                 ``optim_state_to_sharding_state`` as its ``FP32Optimizer`` does, ``opt_param_scheduler``,
                 ``rng_state`` ShardedObject, ``num_floating_point_operations_so_far``) with Megatron-LM's
                 sharded-state-dict metadata as ``content_metadata``.
``bridge``       ``run/`` laid out as Megatron-Bridge's ``save_checkpoint`` does (assembled: see
                 ``megatron_bridge.py``): the state dict of its ``generate_state_dict`` (no ``args``), and
                 ``run_config.yaml``, ``train_state.pt`` and ``tokenizer/`` in each ``iter_NNNNNNN/``.
"""

from __future__ import annotations

import argparse
import io
import json
import pickletools
import random
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tests.corpus import common, megatron_bridge, megatron_hf

#: A reloaded model's logits vs the live model's: bit-equal except that with TP x EP the MoE combine of a fresh
#: model can round differently in the last bit (3.6e-07 seen); a wrong load moves them by > 1e-2.
RELOAD_TOL = 1e-6


def sd_metadata(case: dict[str, Any]) -> dict[str, Any]:
    """Megatron-LM's ``_build_sharded_state_dict_metadata`` (no distributed optimizer), plus per-layer keys."""
    from megatron.core import parallel_state as ps

    # Megatron-LM saves with singleton_local_shards=False; a case may ask for True (per-expert keys, gate/up apart).
    meta: dict[str, Any] = {"singleton_local_shards": bool(case.get("options", {}).get("singleton")),
                            "chained_optim_avoid_prefix": True}
    if case["layer_keys"] == "per_layer":
        meta["non_homogeneous_layers"] = True  # TransformerBlock then writes decoder.layers.N.<param>
    return {**meta, "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}


def model_state(chunks: list[Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The model part of the saved dict as Megatron-LM's ``generate_state_dict`` lays it out: ``model``, or with
    VPP one ``model<i>`` per virtual stage (nesting only: the ``ShardedTensor`` keys, which are what the files
    hold, carry no such prefix, and their layer numbers are global)."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict(metadata=meta)}
    return {f"model{i}": chunk.sharded_state_dict(metadata=meta) for i, chunk in enumerate(chunks)}


def megatron_lm_args(case: dict[str, Any], step: int) -> argparse.Namespace:
    """The ``args`` Namespace Megatron-LM pickles into the checkpoint (the fields a converter reads, and more)."""
    m, par = case["model"], case["parallel"]
    dtype = megatron_hf_dtype(case)
    return argparse.Namespace(
        num_layers=m["layers"], hidden_size=m["hidden"], ffn_hidden_size=m["ffn"],
        num_attention_heads=m["heads"], group_query_attention=m["kv_heads"] != m["heads"],
        num_query_groups=m["kv_heads"], kv_channels=m["head_dim"], max_position_embeddings=256, seq_length=16,
        position_embedding_type="rope", rotary_base=m["rope_base"], rotary_percent=1.0,
        normalization="RMSNorm", norm_epsilon=m["eps"], swiglu=True, add_bias_linear=False,
        add_qkv_bias=bool(m.get("qkv_bias")), qk_layernorm=bool(m.get("qk_norm")),
        untie_embeddings_and_output_weights=not m["tied"], vocab_size=m["vocab"],
        padded_vocab_size=m["padded_vocab"], make_vocab_size_divisible_by=megatron_hf.VOCAB_DIVISIBLE_BY,
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model="hf",
        num_experts=m.get("experts"), moe_router_topk=m.get("topk", 2), moe_ffn_hidden_size=m.get("moe_ffn"),
        moe_shared_expert_intermediate_size=m.get("shared_ffn"), moe_shared_expert_gate=bool(m.get("shared_ffn")),
        moe_router_pre_softmax=not m.get("norm_topk", True),
        moe_token_dispatcher_type="allgather", moe_grouped_gemm=False,
        tensor_model_parallel_size=par["tp"], pipeline_model_parallel_size=par["pp"],
        expert_model_parallel_size=par["ep"], world_size=dist.get_world_size(),
        bf16=dtype == torch.bfloat16, fp16=False, params_dtype=dtype,
        ckpt_format="torch_dist", use_dist_ckpt=True, use_distributed_optimizer=False,
        iteration=step, train_iters=step, lr=1e-2, seed=case["seed"], transformer_impl="local",
        save=str(Path(case["case_dir"]) / "run"),
    )


def real_megatron_lm_args(case: dict[str, Any]) -> argparse.Namespace:
    """The ``args`` of megatron-core 0.19+'s own Megatron-LM (``megatron.training``, in its wheel):
    ``parse_args`` of this model's command line and ``validate_args``, as ``pretrain`` does, then the padded
    vocabulary its tokenizer set-up adds. Every default and type is Megatron-LM's (hundreds of fields; enums such
    as ``InferenceCudaGraphScope``, ``signal.Signals``, torch dtypes), not a hand-written subset.

    On CPU and Python 3.11: ``typing.override`` (new in 3.12; imported by ``megatron.training.models``) is taken
    from typing_extensions, the GPU-generation query ``validate_args`` makes under TP is answered (pre-Blackwell),
    and ``CUDA_DEVICE_MAX_CONNECTIONS=1`` is set as Megatron-LM's launch scripts do.
    """
    import os
    import sys
    import typing

    import typing_extensions

    if not hasattr(typing, "override"):
        typing.override = typing_extensions.override  # type: ignore[attr-defined]
    from megatron.training import arguments

    m, par = case["model"], case["parallel"]
    argv = ["pretrain_gpt.py", "--num-layers", m["layers"], "--hidden-size", m["hidden"], "--ffn-hidden-size",
            m["ffn"], "--num-attention-heads", m["heads"], "--group-query-attention", "--num-query-groups",
            m["kv_heads"], "--kv-channels", m["head_dim"], "--seq-length", 16, "--max-position-embeddings", 256,
            "--position-embedding-type", "rope", "--rotary-base", m["rope_base"], "--normalization", "RMSNorm",
            "--norm-epsilon", m["eps"], "--swiglu", "--disable-bias-linear", "--vocab-size", m["vocab"],
            "--make-vocab-size-divisible-by", megatron_hf.VOCAB_DIVISIBLE_BY, "--tokenizer-type",
            "HuggingFaceTokenizer", "--tokenizer-model", "hf", "--tensor-model-parallel-size", par["tp"],
            "--pipeline-model-parallel-size", par["pp"], "--micro-batch-size", 2, "--global-batch-size", 2,
            "--lr", 1e-2, "--train-iters", max(case["save_steps"]), "--seed", case["seed"], "--transformer-impl",
            "local", "--ckpt-format", "torch_dist", "--save", Path(case["case_dir"]) / "run", "--save-interval", 1]
    argv += [] if m["tied"] else ["--untie-embeddings-and-output-weights"]
    argv += ["--bf16"] if case["precision"] == "bf16" else []
    assert not (m.get("experts") or m.get("qkv_bias") or m.get("qk_norm")), "dense Llama-like models only"
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    arguments.get_device_arch_version = lambda: 9  # a CUDA query; < 10 = the pre-Blackwell rules
    saved, sys.argv = sys.argv, [str(a) for a in argv]
    try:
        args = arguments.parse_args()
    finally:
        sys.argv = saved
    arguments.validate_args(args)
    args.padded_vocab_size = m["padded_vocab"]  # what Megatron-LM's build_tokenizer sets
    return args


def megatron_hf_dtype(case: dict[str, Any]) -> torch.dtype:
    """The parameters' dtype."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[case["precision"]]


def optimizer_state(opt: torch.optim.Optimizer, model_sd: dict[str, Any]) -> dict[str, Any]:
    """The Adam state as megatron-core's ``FP32Optimizer.sharded_state_dict`` lays it out."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    state = opt.state_dict()
    state["state"] = {i: dict(s) for i, s in state["state"].items()}  # its inner dicts are the live state
    params = [p for group in opt.param_groups for p in group["params"]]
    steps = {float(s.pop("step")) for s in state["state"].values() if "step" in s}
    assert len(steps) <= 1, steps
    optim_state_to_sharding_state(state, get_param_id_to_sharded_param_map(model_sd, params), exclude_keys="step")
    if steps:
        state["state"]["common_step"] = torch.tensor(steps.pop())
    return state


def save(case: dict[str, Any], gpt: list[Any], opt: torch.optim.Optimizer, step: int) -> Path:
    """Write this step's checkpoint (collective); return its folder."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    case_dir = Path(case["case_dir"])
    meta = sd_metadata(case)
    models = model_state(gpt, meta)
    content = {k: v for k, v in meta.items() if k != "dp_cp_group"}
    if case["kind"] == "torch_dist":
        folder, state = case_dir / "ckpt", models
    else:
        assert len(gpt) == 1, "VPP is built as a bare torch_dist case only"
        model_sd = models["model"]
        folder = case_dir / "run" / f"iter_{step:07d}"
        rng = [{"random_rng_state": random.getstate(), "torch_rng_state": torch.get_rng_state()}]
        args = real_megatron_lm_args(case) if case["options"].get("mcore") else megatron_lm_args(case, step)
        state = {
            "args": args,
            "checkpoint_version": 3.0,
            "iteration": step,
            "model": model_sd,
            "optimizer": optimizer_state(opt, model_sd),
            "opt_param_scheduler": {"max_lr": 1e-2, "min_lr": 0.0, "num_steps": step * 2, "lr_warmup_steps": 0,
                                    "lr_decay_steps": 10, "lr_decay_style": "constant"},
            "rng_state": ShardedObject(  # as Megatron-LM's get_rng_state: one object per (PP, TP) rank
                "rng_state", rng,
                (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
                (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                replica_id=ps.get_data_parallel_rank(with_context_parallel=True)),
            "num_floating_point_operations_so_far": 1.0e9 * step,
        }
        if case["kind"] == "bridge":  # Bridge's generate_state_dict: its config is in run_config.yaml instead
            del state["args"], state["num_floating_point_operations_so_far"]
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(state, str(folder), content_metadata=content)
    dist.barrier()
    if case["kind"] == "megatron_lm" and dist.get_rank() == 0:
        (case_dir / "run" / "latest_checkpointed_iteration.txt").write_text(str(step))  # as Megatron-LM: no newline
    return folder


def save_and_verify(case: dict[str, Any], gpt: list[Any], opt: torch.optim.Optimizer, step: int, prompt: torch.Tensor,
                    tok: Any, logits_of: Any) -> dict[str, Any] | None:
    """Save, gather the live global tensors, check the HF mapping by logits, write the truth (rank 0's record).

    ``logits_of(prompt, folder=None)``: fp32 logits of the live model, or (``folder``) of a fresh model that
    megatron-core's own ``dist_checkpointing.load`` filled from the written folder: the files must hold the
    live weights exactly (the framework's own reader agrees with what was saved).
    """
    folder = save(case, gpt, opt, step)
    if case["kind"] == "bridge" and dist.get_rank() == 0:
        megatron_bridge.write_extras(case, folder, step, tok)
    dist.barrier()
    model, dtype = case["model"], megatron_hf_dtype(case)
    gathered = megatron_hf.gather_global(model_state(gpt, sd_metadata(case)))
    logits = (logits_of(prompt), logits_of(prompt, folder))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, logits)
    if dist.get_rank() != 0:
        return None
    ref, reloaded = next(x for x in everyone if x[0] is not None)
    reload_diff = float((reloaded - ref).abs().max())
    if not reload_diff <= RELOAD_TOL:
        raise AssertionError(f"megatron-core's own load of {folder} changes the live logits by {reload_diff}")
    sd = megatron_hf.to_hf(gathered, model, case["layer_keys"] == "per_layer")
    check = megatron_hf.check_logits(model, {k: v.float() for k, v in sd.items()}, prompt, ref)
    tag = f"step{step}" if case["kind"] == "torch_dist" else folder.name
    names = megatron_hf.save_truth(Path(case["case_dir"]), tag, model, sd, dtype, tok)
    return {
        "tag": tag,
        "path": str(folder.relative_to(case["case_dir"])),
        "truth": f"truth/{tag}.safetensors",
        "step": step,
        "logits_check": check,
        "reload_check": {"loader": "megatron.core.dist_checkpointing.load", "max_abs_diff": reload_diff,
                         "tol": RELOAD_TOL},
        "truth_tensors": len(names),
        "gathered_keys": {k: [list(v.shape), str(v.dtype)] for k, v in sorted(gathered.items())},
    }


def pickle_globals(path: Path | io.BytesIO) -> list[str]:
    """``module.name`` of every global a torch zip pickle (``common.pt``, or the archive of the DCP object
    ``common_state``) references, read without unpickling."""
    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            found.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add(f"{strings[-2]}.{strings[-1]}")
        if isinstance(arg, str):
            strings.append(arg)
    return sorted(found)


def folder_facts(folder: Path) -> dict[str, Any]:
    """What the written folder holds: files, metadata.json, the DCP .metadata entries, common.pt's content."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(folder)).read_metadata()
    tensors, objects = {}, []
    for key, value in sorted(md.state_dict_metadata.items()):
        if isinstance(value, TensorStorageMetadata):
            tensors[key] = [list(value.size), str(value.properties.dtype).replace("torch.", "")]
        else:
            objects.append(key)
    facts: dict[str, Any] = {
        "files": common.list_files(folder),
        "metadata_json": json.loads((folder / "metadata.json").read_text()),
        "dcp_tensors": tensors,
        "dcp_objects": objects,
    }
    common_pt = folder / "common.pt"
    if common_pt.is_file():
        obj = torch.load(common_pt, map_location="cpu", weights_only=False)  # our own file, just written
        facts.update(_common_facts("common_pt", obj, common_pt))
    elif COMMON_STATE in objects:  # megatron-core 0.19+: torch.save([common state dict]) as one DCP bytes entry
        (info,) = [v for k, v in md.storage_data.items() if k.fqn == COMMON_STATE]
        with open(folder / info.relative_path, "rb") as fh:
            fh.seek(info.offset)
            blob = fh.read(info.length)
        (obj,) = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)  # our own, just written
        facts.update(_common_facts("common_state", obj, io.BytesIO(blob)))
        facts["common_state_storage"] = {"file": info.relative_path, "offset": info.offset, "length": info.length}
    return facts


#: The DCP key megatron-core 0.19+ saves its common state under (ShardedObject "common_state", shape (1,)).
COMMON_STATE = "common_state/shard_0_1"


def _common_facts(prefix: str, obj: dict[str, Any], source: Path | io.BytesIO) -> dict[str, Any]:
    facts: dict[str, Any] = {f"{prefix}_keys": sorted(obj), f"{prefix}_globals": pickle_globals(source)}
    if "args" in obj:
        facts[f"{prefix}_args"] = {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
                                   for k, v in sorted(vars(obj["args"]).items())}
    return facts


def finish_case(case: dict[str, Any], checkpoints: list[dict[str, Any]], seconds: float) -> None:
    """Write ``case.json`` last (rank 0): the plan's static meta plus what was written and checked."""
    import megatron.core

    case_dir = Path(case["case_dir"])
    last = case_dir / checkpoints[-1]["path"]
    meta = dict(case["meta"])
    meta.update(
        checkpoints=checkpoints,
        expected_step=checkpoints[-1]["step"],
        layout=folder_facts(last),
        megatron_core_version=megatron.core.__version__,
        torch_version=torch.__version__,
        build_seconds=round(seconds, 2),
        num_params=sum(_numel(shape) for shape, _ in checkpoints[-1]["gathered_keys"].values()),
        hf_files=common.list_files(case_dir / "hf"),
    )
    if case["kind"] != "torch_dist":
        meta["tracker"] = (case_dir / "run" / "latest_checkpointed_iteration.txt").read_text()
        meta["run_files"] = common.list_files(case_dir / "run")
    common.write_json_atomic(case_dir / "case.json", meta)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
