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
* Ground truth: a ``TrainerCallback.on_save`` runs on every rank right after each
  ``checkpoint-N`` is written; it gathers fp32 masters with
  ``safe_get_full_fp32_param`` (collective) and rank 0 writes
  ``<case>/truth/checkpoint-N.safetensors``.
"""

from __future__ import annotations

import argparse
import json
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
from safetensors.torch import save_file  # noqa: E402
from tests.corpus import common  # noqa: E402
from tests.corpus.ds_train import disable_shm_comm, gather_truth  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

# See module docstring: the bf16 "GPU" check must pass for the CPU accelerator.
transformers.training_args.is_torch_bf16_gpu_available = lambda: True


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random token sequences (labels = inputs)."""

    def __init__(self, vocab: int, n: int = 64, seqlen: int = 16, seed: int = 0) -> None:
        """Pre-generate ``n`` sequences of length ``seqlen`` in ``[4, vocab)``."""
        gen = torch.Generator().manual_seed(seed)
        self.data = torch.randint(4, vocab, (n, seqlen), generator=gen)

    def __len__(self) -> int:
        """Number of sequences."""
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """One training example."""
        return {"input_ids": self.data[i], "labels": self.data[i].clone()}


class TruthCallback(TrainerCallback):
    """Gather fp32 ground truth from the live engine right after every checkpoint save."""

    def __init__(self, case: dict[str, Any], buffers: list[str]) -> None:
        """Remember where to write and which buffers to include."""
        self.case = case
        self.buffers = buffers
        self.checkpoints: list[dict[str, Any]] = []

    def on_save(self, args: TrainingArguments, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        """Collective: every rank must take part in the gather."""
        tag = f"checkpoint-{state.global_step}"
        truth = gather_truth(model, self.case["stage"], self.buffers)
        truth_dir = Path(self.case["case_dir"]) / "truth"
        if dist.get_rank() == 0:
            truth_dir.mkdir(parents=True, exist_ok=True)
            save_file(truth, str(truth_dir / f"{tag}.safetensors"), metadata={"format": "pt"})
        self.checkpoints.append(
            {"tag": tag, "path": f"run/{tag}", "truth": f"truth/{tag}.safetensors", "step": state.global_step}
        )
        dist.barrier()


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


def main() -> None:
    """Entry point under the ``deepspeed`` launcher."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    (case,) = json.loads(Path(args.plan).read_text())["cases"]
    t0 = time.time()
    disable_shm_comm()
    case_dir = Path(case["case_dir"])
    run_dir = case_dir / "run"

    distributed_state()
    targs = TrainingArguments(
        output_dir=str(run_dir),
        deepspeed=ds_config(case),
        use_cpu=False,  # True would bypass DeepSpeed entirely
        ddp_backend="gloo",  # ignored when deepspeed is set; the backend comes from distributed_state()
        bf16=case["precision"] == "bf16",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        max_steps=max(case["save_steps"]),
        save_strategy="steps",
        save_steps=min(case["save_steps"]),
        save_total_limit=None,
        logging_steps=1,
        report_to=[],
        dataloader_num_workers=0,
        seed=case["seed"],
        disable_tqdm=True,
        accelerator_config={"use_configured_state": True},  # see distributed_state()
    )
    assert targs.world_size == dist.get_world_size() == case["world_size"], (targs.world_size, case["world_size"])
    model = common.build_model(case["model"], seed=case["seed"])
    tied = common.tied_map(model)
    buffers = common.persistent_buffer_names(model)
    tokenizer = common.build_tokenizer()
    callback = TruthCallback(case, buffers)
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=RandomTokens(case["model"]["vocab"], seed=case["seed"]),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    optimizer = trainer.model_wrapped.optimizer
    n_groups = len(optimizer.param_groups)
    if dist.get_rank() == 0:
        got = sorted(c["step"] for c in callback.checkpoints)
        assert got == sorted(case["save_steps"]), (got, case["save_steps"])
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
