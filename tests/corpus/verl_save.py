"""Train tiny verl-style FSDP2 actors/critics on CPU and save them with verl's own checkpoint manager.

Launched by ``fsdp_build.py`` as::

    torchrun --nproc_per_node 2 --master_port P tests/corpus/verl_save.py --plan plan.json

``plan.json`` carries ``verl_path``: an unpacked verl wheel (``fsdp_build.verl_path()``).
verl itself is not installed; :func:`import_verl` puts it on ``sys.path`` and imports
only the modules the checkpoint path needs, with the real source:

* ``verl/__init__.py``, ``verl/utils/__init__.py``, ``verl/utils/checkpoint/__init__.py``
  and ``verl/trainer/__init__.py`` are skipped (replaced by empty package modules whose
  ``__path__`` points into the wheel): they import ray / tensordict / hydra-era code
  that the checkpoint manager never touches;
* ``omegaconf`` (``DictConfig``, only used in type hints / isinstance of a config we
  pass as verl's own ``CheckpointConfig`` dataclass) and ``tensordict`` (``TensorDict``,
  ``tensorclass.NonTensorData``: imported at module level by ``verl.utils.model`` /
  ``verl.utils.torch_functional``, unused on this path) are stub modules.

What runs is verl's code: ``FSDPCheckpointManager.save_checkpoint`` (rank files,
``fsdp_config.json``, ``huggingface/``, ``lora_train_meta.json``), ``apply_fsdp2``
(verl's FSDP2 wrapping: decoder layers, and for untied models embed_tokens/lm_head, then
the root), ``fsdp2_load_full_state_dict`` (rank-0 broadcast of the initial weights),
``fsdp2_clip_grad_norm_`` and ``get_constant_schedule_with_warmup``.  Model loading
mirrors verl's FSDP engine: ``from_pretrained`` of a local HF folder in fp32 (actor; a vision-language actor
with ``AutoModelForImageTextToText``, trained on ``common.train_batch``'s image batches), or
``AutoModelForTokenClassification`` with ``num_labels=1`` (critic, verl's
``load_valuehead_model`` minus ``flash_attention_2``), peft ``get_peft_model`` for LoRA,
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32, cast_forward_inputs=True)``
(verl's default), mesh ``("fsdp",)`` or, for HSDP, ``(2, 1)`` named ``("ddp", "fsdp")``
exactly as verl's ``create_device_mesh(world_size=2, fsdp_size=1)``.  CPU adaptation:
``verl.utils.fsdp_utils.get_device_id`` returns ``"cpu"`` (verl's platform layer reports
CUDA even on a CPU-only box).

The trainer-level files are written here the way verl's ``RayPPOTrainer._save_checkpoint``
does: ``<root>/latest_checkpointed_iteration.txt`` (text: the step) and
``<root>/global_step_N/data.pt`` (``torch.save`` of the dataloader state; torchdata's
``StatefulDataLoader`` is not installed, so a small dict of ints stands in for it).

Ground truth: right after each save, ``get_model_state_dict(module,
StateDictOptions(full_state_dict=True, cpu_offload=True))`` on the live model
(``train_common.save_full_truth``); rank 0 keeps the ``named_parameters()`` names and
writes ``truth/global_step_N.safetensors`` (``truth/global_step_N.<role>.safetensors``
when the case has several roles).
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
import time
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tests.corpus import common, train_common  # noqa: E402
from tests.corpus.train_common import DTYPE_NAMES  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

#: Package ``__init__`` modules of verl that are skipped (see module docstring).
SKIPPED_INITS = ("verl", "verl.utils", "verl.utils.checkpoint", "verl.trainer")


def import_verl(path: str) -> types.SimpleNamespace:
    """Import verl's checkpoint manager + FSDP2 helpers from an unpacked wheel (see module docstring)."""
    root = Path(path)
    sys.path.insert(0, str(root))
    for name in SKIPPED_INITS:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(root / name.replace(".", "/"))]
        sys.modules[name] = pkg

    def stub(name: str, **attrs: Any) -> None:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod

    if "omegaconf" not in sys.modules:
        try:
            import omegaconf  # noqa: F401
        except ImportError:
            stub("omegaconf", DictConfig=type("DictConfig", (dict,), {}), ListConfig=list, OmegaConf=None)
    try:
        import tensordict  # noqa: F401
    except ImportError:
        stub("tensordict", TensorDict=type("TensorDict", (), {}))
        stub("tensordict.tensorclass", NonTensorData=type("NonTensorData", (), {}))

    import verl.utils.fsdp_utils as fsdp_utils
    from verl.trainer.config import CheckpointConfig
    from verl.utils.checkpoint.checkpoint_manager import get_checkpoint_tracker_filename
    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager
    from verl.utils.torch_functional import get_constant_schedule_with_warmup

    fsdp_utils.get_device_id = lambda: "cpu"  # CPU box: verl's platform layer would answer CUDA
    version = (root / "verl" / "version" / "version").read_text().strip()
    return types.SimpleNamespace(
        FSDPCheckpointManager=FSDPCheckpointManager,
        CheckpointConfig=CheckpointConfig,
        fsdp_utils=fsdp_utils,
        get_checkpoint_tracker_filename=get_checkpoint_tracker_filename,
        get_constant_schedule_with_warmup=get_constant_schedule_with_warmup,
        version=version,
    )


class Role:
    """One trained module (actor or critic) with its optimizer, scheduler and verl manager."""

    def __init__(self, name: str, case: dict[str, Any], base: Path, tokenizer: Any, verl: types.SimpleNamespace):
        """Load from ``base`` like verl's FSDP engine, wrap with verl's ``apply_fsdp2``, build the manager."""
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoModelForTokenClassification,
        )

        self.name = name
        opts = case["options"]
        torch.manual_seed(case["seed"] + (1 if name == "critic" else 0))
        config = AutoConfig.from_pretrained(base)
        if name == "critic":  # verl FSDPEngine._build_module, value_model branch
            config.num_labels = 1
            config.classifier_dropout = 0.0
            config.hidden_dropout = "0"
            config.summary_dropout_prob = 0.0
            module = AutoModelForTokenClassification.from_pretrained(base, dtype=torch.float32, config=config)
        else:  # a vision-language actor: verl's engine loads it with the image-text-to-text auto class
            auto = AutoModelForImageTextToText if case["model"].get("vision") else AutoModelForCausalLM
            module = auto.from_pretrained(base, dtype=torch.float32, config=config)
        module.to(torch.float32)
        self.lora = None
        if opts.get("lora") and name == "actor":  # verl FSDPEngine._build_lora_module
            from peft import LoraConfig, TaskType, get_peft_model

            module.enable_input_require_grads()
            lcfg = opts["lora"]
            module = get_peft_model(
                module,
                LoraConfig(
                    task_type=TaskType.CAUSAL_LM,
                    r=lcfg["r"],
                    lora_alpha=lcfg["lora_alpha"],
                    target_modules=lcfg["target_modules"],
                    bias="none",
                ),
            )
            self.lora = dict(lcfg)
        self.tied = common.tied_map(module)
        self.names = [n for n, _ in module.named_parameters()]
        self.num_params = sum(p.numel() for p in module.parameters())
        self.model_class = type(module).__name__
        self.config_architectures = list(getattr(module.config, "architectures", None) or [])

        mesh_shape = tuple(opts.get("mesh", [dist.get_world_size()]))
        names = ("ddp", "fsdp") if len(mesh_shape) == 2 else ("fsdp",)  # verl create_device_mesh
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=True)
        fsdp_kwargs = {"mesh": mesh, "mp_policy": mp, "offload_policy": None, "reshard_after_forward": True}
        full_state = module.state_dict()
        verl.fsdp_utils.apply_fsdp2(module, fsdp_kwargs, {})
        verl.fsdp_utils.fsdp2_load_full_state_dict(module, full_state, mesh, None)
        del full_state
        assert isinstance(module, FSDPModule), type(module)
        self.fsdp_units = [n or "<root>" for n, m in module.named_modules() if isinstance(m, FSDPModule)]
        self.module = module
        self.optimizer = torch.optim.AdamW(
            [p for p in module.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01
        )
        self.lr_scheduler = verl.get_constant_schedule_with_warmup(optimizer=self.optimizer, num_warmup_steps=0)
        self.manager = verl.FSDPCheckpointManager(
            model=module,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            processing_class=tokenizer,
            checkpoint_config=verl.CheckpointConfig(),
            trust_remote_code=False,
        )
        self.clip = verl.fsdp_utils.fsdp2_clip_grad_norm_

    def train_step(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> None:
        """One optimizer step (LM loss for the actor, value MSE for the critic), verl-style clipping.

        ``batch`` is ``common.train_batch``'s: token ids (labels = inputs), and images for a vision-language actor.
        """
        ids = batch["input_ids"]
        if self.name == "critic":
            values = self.module(input_ids=ids).logits.squeeze(-1).float()
            target = torch.randn(values.shape, generator=gen)
            loss = torch.nn.functional.mse_loss(values, target)
        else:
            loss = self.module(**batch).loss
        loss.backward()
        grad_norm = self.clip([p for p in self.module.parameters() if p.requires_grad], max_norm=1.0)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        assert torch.isfinite(grad_norm), grad_norm
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def placements(self) -> list[str]:
        """Placements of the DTensors in ``module.state_dict()`` (what verl's manager pickles)."""
        sd = self.module.state_dict()
        return sorted({str(tuple(v.placements)) for v in sd.values() if isinstance(v, DTensor)})


def hf_architectures(folder: Path) -> list[str] | None:
    """``architectures`` as verl wrote it into ``huggingface/config.json``."""
    return json.loads((folder / "config.json").read_text()).get("architectures")


def run_case(case: dict[str, Any], tokenizer: Any, verl: types.SimpleNamespace) -> None:
    """Train one case and save every step with verl's manager (all ranks), truth + case.json on rank 0."""
    t0 = time.time()
    rank = dist.get_rank()
    cdir = Path(case["case_dir"])
    root = cdir / "ckpt"
    base = cdir / "_base"  # the "HF model path" verl would load from; removed at the end
    if rank == 0:
        model = common.build_model(case["model"], seed=case["seed"])
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
        del model
    dist.barrier()
    role_names = case["options"]["roles"]
    roles = [Role(r, case, base, tokenizer, verl) for r in role_names]
    gen = torch.Generator().manual_seed(case["seed"] * 1000 + rank)
    vocab = case["model"]["vocab"]
    checkpoints: list[dict[str, Any]] = []
    saved_dtypes: set[torch.dtype] = set()
    for step in range(1, max(case["save_steps"]) + 1):
        if case["model"].get("vision"):
            batch = common.train_batch(case["model"], gen, low=4)
        else:  # as before vision-language cases (their random stream, hence their cached truth, unchanged)
            ids = torch.randint(4, vocab, (2, 16), generator=gen)
            batch = {"input_ids": ids, "labels": ids}
        for role in roles:
            role.train_step(batch, gen)
        if step not in case["save_steps"]:
            continue
        tag = f"global_step_{step}"
        for role in roles:
            rel = f"ckpt/{tag}/{role.name}"
            role.manager.save_checkpoint(local_path=str(cdir / rel), hdfs_path=None, global_step=step)
            truth_rel = f"truth/{tag}.safetensors" if len(roles) == 1 else f"truth/{tag}.{role.name}.safetensors"
            truth, _ = train_common.save_full_truth(role.module, role.names, role.tied, cdir / truth_rel)  # collective
            saved_dtypes.update(t.dtype for t in truth.values())
            checkpoints.append({"tag": tag, "role": role.name, "path": rel, "truth": truth_rel, "step": step})
            del truth
        if rank == 0:  # RayPPOTrainer._save_checkpoint: dataloader state, then the tracker file
            torch.save({"_num_yielded": step, "_sampler_iter_yielded": step}, root / tag / "data.pt")
            Path(verl.get_checkpoint_tracker_filename(str(root))).write_text(str(step))
        dist.barrier()

    placements = sorted({p for role in roles for p in role.placements()})
    mesh = next(iter(roles[0].module.parameters())).device_mesh
    if rank == 0:
        shutil.rmtree(base)
        assert {DTYPE_NAMES[d] for d in saved_dtypes} == {case["precision"]}, (saved_dtypes, case["precision"])
        first = cdir / checkpoints[0]["path"]
        fsdp_config = json.loads((first / "fsdp_config.json").read_text())
        hf = first / "huggingface"
        actor = roles[0]
        meta = dict(case["meta"])
        meta.update(
            tied=bool(actor.tied),
            tied_keys=actor.tied,
            checkpoints=checkpoints,
            num_params=actor.num_params,
            torch_version=torch.__version__,
            has_config=all((cdir / c["path"] / "huggingface" / "config.json").is_file() for c in checkpoints),
            has_tokenizer=all((cdir / c["path"] / "huggingface" / "tokenizer.json").is_file() for c in checkpoints),
            placements=placements,
            mesh_shape=list(mesh.shape),
            mesh_dim_names=list(mesh.mesh_dim_names) if mesh.mesh_dim_names else None,
            fsdp_units=actor.fsdp_units,
            verl_version=verl.version,
            fsdp_version=fsdp_config["FSDP_version"],
            fsdp_config=fsdp_config,
            roles={
                r.name: {
                    "model_class": r.model_class,
                    "config_architectures": hf_architectures(first.parent / r.name / "huggingface"),
                    "num_params": r.num_params,
                    "tied_keys": r.tied,
                    "fsdp_units": r.fsdp_units,
                }
                for r in roles
            },
            lora=actor.lora,
            role_files=sorted(p.name for p in first.iterdir()),
            huggingface_files=sorted(p.name for p in hf.iterdir()),
            root_files=sorted(p.name for p in root.iterdir()),
            hf_config_saved_by="verl FSDPCheckpointManager",
            build_seconds=round(time.time() - t0, 2),
        )
        common.write_json_atomic(cdir / "case.json", meta)
        print(f"[verl_save] {case['name']}: done in {time.time() - t0:.1f}s", flush=True)
    for role in roles:
        del role.module, role.optimizer, role.manager
    del roles
    gc.collect()
    dist.barrier()


def main() -> None:
    """Entry point under ``torchrun``."""
    plan = common.read_plan()
    verl = import_verl(plan["verl_path"])
    tokenizer = common.build_tokenizer()
    train_common.run_cases(plan, "verl", lambda case: run_case(case, tokenizer, verl))


if __name__ == "__main__":
    main()
