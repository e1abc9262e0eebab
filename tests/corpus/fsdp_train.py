"""Train tiny FSDP2 (``fully_shard``) models on CPU and save them with ``torch.distributed.checkpoint``.

Launched by ``fsdp_build.py`` as::

    torchrun --nproc_per_node 2 --master_port P tests/corpus/fsdp_train.py --plan plan.json

Every ``dcp`` case of the plan is trained in turn in this one gloo process group:
``fully_shard`` on each decoder layer and on the root (1-D mesh ``("fsdp",)``), a few
AdamW steps on random tokens, and at each save step ``dcp.save(state,
storage_writer=FileSystemWriter(folder))`` where ``state`` depends on
``options["style"]``:

* ``nested``    ``{"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, opt)}``
* ``app``       ``{"app": AppState(m, opt)}`` -- the torch DCP tutorial's ``Stateful``
  (``state_dict() -> {"model": ..., "optim": ...}`` via ``get_state_dict``)
* ``flat``      torchtitan-like: model keys at top level, ``"optimizer"`` (flattened optimizer
  state dict), ``"train_state"`` (0-d int tensor, plain int, ``BytesIO``)
* ``ambiguous`` ``{"model": sd, "ema": <EMA copy of sd, different values>, "optim": ...}``

Ground truth: right after each save, ``get_model_state_dict(m,
StateDictOptions(full_state_dict=True, cpu_offload=True))`` (collective,
``train_common.save_full_truth``) on the live model; rank 0 keeps the
``named_parameters()`` names (tied alias dropped, it goes in ``tied_keys``) in the saved
dtype and writes ``truth/<tag>.safetensors``.  Then ``case.json`` is written (atomically,
last).
"""

from __future__ import annotations

import gc
import io
import pickle
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from tests.corpus import common, train_common  # noqa: E402
from tests.corpus.train_common import DTYPE_NAMES  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter  # noqa: E402
from torch.distributed.checkpoint.metadata import BytesStorageMetadata  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class AppState(Stateful):
    """The torch DCP tutorial's wrapper: one ``Stateful`` holding model + optimizer."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Keep references; the state dict is computed at save time."""
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        """``{"model": ..., "optim": ...}`` from ``get_state_dict`` (sharded DTensors)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (unused here, part of the tutorial's protocol)."""
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"]
        )


def shard(model: torch.nn.Module, mixed_precision: str | None) -> list[str]:
    """``fully_shard`` every decoder layer, then the root; return the wrapped module names."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("fsdp",))
    kw: dict[str, Any] = {"mesh": mesh}
    if mixed_precision:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=DTYPES[mixed_precision], reduce_dtype=torch.float32)
    decoder = getattr(model.model, "language_model", model.model)  # a vision-language model's text decoder
    for layer in decoder.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return [n or "<root>" for n, m in model.named_modules() if isinstance(m, FSDPModule)]


def save_state(
    style: str, model: torch.nn.Module, opt: torch.optim.Optimizer, ema: dict[str, Any] | None, step: int
) -> dict[str, Any]:
    """The dict handed to ``dcp.save`` for one checkpoint style (see module docstring)."""
    if style == "nested":
        return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    if style == "app":
        return {"app": AppState(model, opt)}
    if style == "flat":
        optim = get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
        train_state = {
            "step": torch.tensor(step, dtype=torch.int32),
            "ntokens_seen": step * 64,
            "log_steps": io.BytesIO(pickle.dumps(list(range(1, step + 1)))),
        }
        return {**get_model_state_dict(model), "optimizer": optim, "train_state": train_state}
    if style == "ambiguous":
        assert ema is not None
        return {"model": get_model_state_dict(model), "ema": ema, "optim": get_optimizer_state_dict(model, opt)}
    raise ValueError(f"unknown style {style!r}")


def metadata_facts(folder: Path, prefix: str, model_keys: set[str], aliases: set[str], style: str) -> dict[str, Any]:
    """Layout facts read from the written ``.metadata`` (never used for the truth)."""
    md = FileSystemReader(str(folder)).read_metadata()
    keys = set(md.state_dict_metadata)
    optim_prefixes = ("optim.", "optimizer.", "app.optim.")
    model_like = {prefix + k for k in model_keys | aliases}
    missing = model_like - keys
    assert not missing, f"model keys missing from {folder}/.metadata: {sorted(missing)[:5]}"
    other = sorted(k for k in keys if k not in model_like and not k.startswith(optim_prefixes))
    subtrees = sorted({p for p in ("model.", "ema.", "app.model.", "") if {p + k for k in model_keys} <= keys})
    is_bytes = {k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    return {
        "non_model_entries": [k for k in other if not k.startswith("ema.")],
        "bytes_entries": sorted(k for k in is_bytes if not k.startswith(optim_prefixes)),
        "optimizer_bytes_entries": len([k for k in is_bytes if k.startswith(optim_prefixes)]),
        "model_subtrees": subtrees if style == "ambiguous" else [prefix],
        "num_metadata_entries": len(keys),
        "distcp_files": sorted(p.name for p in folder.glob("*.distcp")),
    }


def run_case(case: dict[str, Any], tokenizer: Any) -> None:
    """Train one case and write its folder (all ranks train/save/gather, rank 0 writes files)."""
    t0 = time.time()
    rank = dist.get_rank()
    opts = case["options"]
    meta_in = case["meta"]
    cdir = Path(case["case_dir"])
    ckpt = cdir / "ckpt"
    model = common.build_model(case["model"], seed=case["seed"])
    if opts.get("cast"):
        model = model.to(DTYPES[opts["cast"]])
    tied = common.tied_map(model)
    buffers = common.persistent_buffer_names(model)
    assert not buffers, buffers  # truth would need them; none of these models has persistent buffers
    names = [n for n, _ in model.named_parameters()]
    num_params = sum(p.numel() for p in model.parameters())
    if rank == 0 and meta_in["has_config"]:
        # Before fully_shard: FSDP2 swaps the class to FSDP<Name>, which would leak into `architectures`.
        common.save_hf_extras(ckpt, model, tokenizer if meta_in["has_tokenizer"] else None, case["precision"])
    dist.barrier()

    fsdp_units = shard(model, meta_in["mixed_precision"])
    opt = torch.optim.AdamW(common.param_groups(model), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    ema = None
    if opts["style"] == "ambiguous":
        ema = {k: v.detach().clone() for k, v in get_model_state_dict(model).items()}
    gen = torch.Generator().manual_seed(case["seed"] * 1000 + rank)
    checkpoints: list[dict[str, Any]] = []
    facts: dict[str, Any] = {}
    saved_dtypes: set[torch.dtype] = set()
    for step in range(1, max(case["save_steps"]) + 1):
        loss = model(**common.train_batch(case["model"], gen, low=4)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            live = get_model_state_dict(model)
            for k, v in ema.items():
                v.lerp_(live[k].detach(), 0.25)
        if step not in case["save_steps"]:
            continue
        tag = f"step-{step}"
        rel = f"ckpt/{tag}" if opts["subdirs"] else "ckpt"
        folder = cdir / rel
        state = save_state(opts["style"], model, opt, ema, step)
        top_keys = sorted(state)
        dcp.save(state, storage_writer=FileSystemWriter(str(folder)))
        truth_rel = f"truth/{tag}.safetensors"
        truth, aliases = train_common.save_full_truth(model, names, tied, cdir / truth_rel)  # collective
        if rank == 0:
            saved_dtypes.update(t.dtype for t in truth.values())
            facts = metadata_facts(folder, meta_in["key_prefix"], set(names), set(tied), opts["style"])
            facts["dcp_top_keys"] = top_keys
            facts["dcp_aliases"] = aliases
        checkpoints.append({"tag": tag, "path": rel, "truth": truth_rel, "step": step})
        dist.barrier()

    placements = sorted({str(tuple(p.placements)) for p in model.parameters()})
    mesh = next(iter(model.parameters())).device_mesh
    if rank == 0:
        assert {DTYPE_NAMES[d] for d in saved_dtypes} == {case["precision"]}, (saved_dtypes, case["precision"])
        meta = dict(meta_in)
        meta.update(
            tied=bool(tied),
            tied_keys=tied,
            checkpoints=checkpoints,
            num_params=num_params,
            torch_version=torch.__version__,
            dcp_style=opts["style"],
            placements=placements,
            mesh_shape=list(mesh.shape),
            mesh_dim_names=list(mesh.mesh_dim_names) if mesh.mesh_dim_names else None,
            fsdp_units=fsdp_units,
            build_seconds=round(time.time() - t0, 2),
            **facts,
        )
        common.write_json_atomic(cdir / "case.json", meta)
        print(f"[fsdp_train] {case['name']}: done in {time.time() - t0:.1f}s", flush=True)
    del model, opt, ema
    gc.collect()
    dist.barrier()


def main() -> None:
    """Entry point under ``torchrun``."""
    plan = common.read_plan()
    tokenizer = common.build_tokenizer() if any(c["meta"]["has_tokenizer"] for c in plan["cases"]) else None
    train_common.run_cases(plan, "dcp", lambda case: run_case(case, tokenizer))


if __name__ == "__main__":
    main()
