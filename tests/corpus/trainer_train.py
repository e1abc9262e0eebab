"""Train a tiny model with HF ``Trainer`` + DeepSpeed on CPU, leaving ``checkpoint-N`` folders.

Launched by ``build.py`` as::

    deepspeed --num_gpus 2 tests/corpus/trainer_train.py --plan plan.json

Running Trainer + DeepSpeed on a CPU-only box (transformers 5.x, accelerate 1.x):

* ``DS_ACCELERATOR=cpu`` (set by the launcher env and defaulted here) makes DeepSpeed
  pick its CPU accelerator.
* ``TrainingArguments(use_cpu=False, deepspeed=<dict>)``:
  ``use_cpu=True`` would route Trainer through the plain CPU/DDP path and ignore the
  DeepSpeed config; with ``use_cpu=False`` Trainer builds an accelerate
  ``PartialState`` and DeepSpeed's CPU accelerator supplies the (cpu) device.
* ...but that ``PartialState`` gets world size 1 on CPU (see ``distributed_state()``),
  so we build it ourselves with ``backend="gloo"`` and pass
  ``accelerator_config={"use_configured_state": True}``.
* ``bf16=True`` with ``use_cpu=False`` fails ``TrainingArguments`` validation
  ("Your setup doesn't support bf16/gpu") because transformers only asks CUDA/XPU/...;
  we patch ``transformers.training_args.is_torch_bf16_gpu_available`` to return True
  (DeepSpeed's CPU accelerator does support bf16).
* The shared-memory comm op is disabled (see ``ds_train.disable_shm_comm``).
* Ground truth: a ``TrainerCallback.on_save`` (``train_common.SaveTruth``) runs on every
  rank right after each ``checkpoint-N`` is written; it gathers fp32 masters with
  ``safe_get_full_fp32_param`` (collective) and rank 0 writes
  ``<case>/truth/checkpoint-N.safetensors``.

The ``TrainingArguments`` / ``Trainer`` settings shared with the other Trainer scripts live in
``train_common.py``; :func:`ds_trainer_args` (also used by ``lora_train.py``) adds the
DeepSpeed-on-CPU ones.
"""

from __future__ import annotations

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
import transformers.training_args  # noqa: E402
from accelerate import PartialState  # noqa: E402
from tests.corpus import common, train_common  # noqa: E402
from tests.corpus.ds_train import disable_shm_comm, gather_truth  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

# See module docstring: the bf16 "GPU" check must pass for the CPU accelerator.
transformers.training_args.is_torch_bf16_gpu_available = lambda: True


class TruthCallback(train_common.SaveTruth):
    """Gather fp32 ground truth from the live engine right after every checkpoint save."""

    def __init__(self, case: dict[str, Any], buffers: list[str]) -> None:
        """Remember where to write and which buffers to include."""
        super().__init__(case)
        self.buffers = buffers

    def collect(self, model: Any, tag: str, step: int) -> dict[str, Any]:
        """Collective gather of every param (+ buffers); rank 0 writes ``truth/<tag>.safetensors``."""
        truth = gather_truth(model, self.case["stage"], self.buffers)
        entry = {"tag": tag, "path": f"run/{tag}", "truth": f"truth/{tag}.safetensors", "step": step}
        if dist.get_rank() == 0:
            common.save_truth(self.case_dir / entry["truth"], truth)
        return entry


def ds_config(case: dict[str, Any]) -> dict[str, Any]:
    """DeepSpeed config in the usual HF-integration style ("auto" values filled by Trainer)."""
    zero: dict[str, Any] = {"stage": case["stage"]}
    if case["stage"] == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=False)
    zero.update(case.get("zero_extra", {}))
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", "torch_adam": True},
        },
        "zero_optimization": zero,
        "steps_per_print": 10_000,
    }


def distributed_state() -> PartialState:
    """Pre-build accelerate's ``PartialState`` for DeepSpeed on gloo.

    Left to itself, ``TrainingArguments`` creates ``PartialState`` without a backend
    when DeepSpeed is enabled; with no GPU, accelerate then resolves backend=None,
    initialises DeepSpeed's process group anyway, but records
    ``num_processes=1, process_index=0`` on every rank.  Trainer then believes each
    rank is the main process (both write config/tokenizer/trainer_state into
    ``checkpoint-N`` concurrently, the sampler does not shard).  Passing
    ``backend="gloo"`` explicitly and reusing the state via
    ``accelerator_config={"use_configured_state": True}`` gives the right world size.
    """
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    return PartialState(backend="gloo")


def ds_trainer_args(case: dict[str, Any], run_dir: Path, **kw: Any) -> TrainingArguments:
    """``train_common.trainer_args`` + DeepSpeed on CPU (see module docstring); checks the world size.

    Builds the gloo ``PartialState`` first (:func:`distributed_state`); ``ddp_backend="gloo"``
    is ignored when deepspeed is set (the backend comes from that state).
    """
    distributed_state()
    targs = train_common.trainer_args(
        case,
        run_dir,
        deepspeed=ds_config(case),
        use_cpu=False,  # True would bypass DeepSpeed entirely
        bf16=case["precision"] == "bf16",
        accelerator_config={"use_configured_state": True},  # see distributed_state()
        **kw,
    )
    assert targs.world_size == dist.get_world_size() == case["world_size"], (targs.world_size, case["world_size"])
    return targs


def main() -> None:
    """Entry point under the ``deepspeed`` launcher."""
    (case,) = common.read_plan()["cases"]
    t0 = time.time()
    disable_shm_comm()
    case_dir = Path(case["case_dir"])

    targs = ds_trainer_args(case, case_dir / "run")
    model = common.build_model(case["model"], seed=case["seed"])
    tied = common.tied_map(model)
    buffers = common.persistent_buffer_names(model)
    callback = TruthCallback(case, buffers)
    trainer = train_common.make_trainer(case, model, targs, common.build_tokenizer(), callback)
    trainer.train()
    optimizer = trainer.model_wrapped.optimizer
    n_groups = len(optimizer.param_groups)
    if dist.get_rank() == 0:
        callback.check_steps()
        for c in callback.checkpoints:
            assert (case_dir / c["path"]).is_dir(), c
        meta = dict(case["meta"])
        meta.update(
            tied=bool(tied),
            tied_keys=tied,
            frozen=[n for n, p in model.named_parameters() if not p.requires_grad],
            buffers=buffers,
            param_groups=n_groups,
            checkpoints=callback.checkpoints,
            num_params=sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
            deepspeed_version=deepspeed.__version__,
            torch_version=torch.__version__,
            build_seconds=round(time.time() - t0, 2),
        )
        common.write_json_atomic(case_dir / "case.json", meta)
    dist.barrier()


if __name__ == "__main__":
    main()
