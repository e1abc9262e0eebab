"""Train a peft LoRA adapter with HF ``Trainer`` + DeepSpeed on CPU, leaving ``checkpoint-N`` folders.

Launched by ``lora_build.py`` (after it saved the fp32 base into ``<case>/base``) as::

    deepspeed --num_gpus 2 tests/corpus/lora_train.py --plan plan.json

The CPU workarounds (bf16 validation patch, gloo ``PartialState`` +
``use_configured_state``, no shm comm op) are the ones of ``trainer_train.py``,
imported from there.  Flow: ``from_pretrained(<base name>)`` in fp32,
``get_peft_model``, THEN ``TrainingArguments`` and ``Trainer(...).train()``.

Why the model comes before ``TrainingArguments``: once ``TrainingArguments`` holds a
ZeRO-3 config, ``from_pretrained`` builds the base inside ``deepspeed.zero.Init``
(params partitioned and cast to bf16 at load), while the LoRA params peft adds
afterwards stay fp32 (``autocast_adapter_dtype``) and unpartitioned.  DeepSpeed
0.19.8 then dies in ``Stage3ZeroOptimizer`` -> ``defragment``
(``assert len(set(t.dtype for t in tensors)) == 1``) as soon as a trainable base
param (``bias="lora_only"``) sits next to fp32 LoRA params.  Built outside
``zero.Init``, the engine casts every param to bf16 and partitions at
``initialize`` (like ``ds_train.py``'s ZeRO-3 cases).

Ground truth (``LoraTruth.on_save``, every rank, right after each ``checkpoint-N``):

* every trainable param's fp32 master via ``safe_get_full_fp32_param`` (collective);
  rank 0 writes ``truth/checkpoint-N.adapter.safetensors`` keyed by live peft names;
* rank 0 then merges with peft itself (fresh fp32 base from ``base/`` + same
  ``LoraConfig`` + those tensors, ``merge_and_unload``) ->
  ``truth/checkpoint-N.merged.safetensors``.

Rank 0 finally writes ``<case>/_meta.json``; ``lora_build`` turns it into ``case.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tests.corpus import common, lora_build  # noqa: E402
from tests.corpus.ds_train import disable_shm_comm  # noqa: E402

# Importing trainer_train applies its CPU bf16 patch (transformers.training_args.is_torch_bf16_gpu_available).
from tests.corpus.trainer_train import RandomTokens, distributed_state, ds_config  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402


def gather_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 masters of every trainable param, keyed by live name (collective: call on all ranks)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = safe_get_full_fp32_param(p)
            assert full is not None, f"no fp32 master for trainable {name}"
            assert full.dtype == torch.float32, (name, full.dtype)
            out[name] = full.detach().float().cpu().contiguous().clone()
    return out


class LoraTruth(TrainerCallback):
    """Gather the adapter truth from the live engine and merge it with peft, right after every save."""

    def __init__(self, case: dict[str, Any]) -> None:
        """Remember where to write."""
        self.case = case
        self.checkpoints: list[dict[str, Any]] = []
        self.last_adapter: dict[str, torch.Tensor] = {}
        self.merged_tied: dict[str, str] | None = None

    def on_save(self, args: TrainingArguments, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        """Collective: every rank must take part in the gather."""
        tag = f"checkpoint-{state.global_step}"
        dist.barrier()  # every rank finished writing checkpoint-N
        adapter = gather_trainable(model)
        cdir = Path(self.case["case_dir"])
        truth_dir = cdir / "truth"
        entry = {
            "tag": tag,
            "path": f"run/{tag}",
            "adapter_truth": f"truth/{tag}.adapter.safetensors",
            "merged_truth": f"truth/{tag}.merged.safetensors",
            "step": state.global_step,
        }
        if dist.get_rank() == 0:
            truth_dir.mkdir(parents=True, exist_ok=True)
            save_file(adapter, str(cdir / entry["adapter_truth"]), metadata={"format": "pt"})
            merged, self.merged_tied = lora_build.reference_merge(
                Path(self.case["base_dir"]), model.peft_config["default"], adapter
            )
            save_file(merged, str(cdir / entry["merged_truth"]), metadata={"format": "pt"})
        self.checkpoints.append(entry)
        self.last_adapter = adapter
        dist.barrier()


def main() -> None:
    """Entry point under the ``deepspeed`` launcher."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    case = json.loads(Path(args.plan).read_text())
    disable_shm_comm()
    cdir = Path(case["case_dir"])
    run_dir = cdir / "run"

    # Model first: see the module docstring (no zero.Init).  By name, like a user would: a hub id resolved
    # through HF_HUB_CACHE offline, or the absolute base/ path.
    base = AutoModelForCausalLM.from_pretrained(case["base_name"], dtype=torch.float32)
    torch.manual_seed(case["seed"])  # LoRA A init; identical on every rank
    model = get_peft_model(base, LoraConfig(**case["lora"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    distributed_state()
    targs = TrainingArguments(
        output_dir=str(run_dir),
        deepspeed=ds_config(case),
        use_cpu=False,  # True would bypass DeepSpeed entirely
        ddp_backend="gloo",
        bf16=case["precision"] == "bf16",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-2,
        weight_decay=0.0,
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
        accelerator_config={"use_configured_state": True},  # see trainer_train.distributed_state()
    )
    assert targs.world_size == dist.get_world_size() == case["world_size"], (targs.world_size, case["world_size"])
    callback = LoraTruth(case)
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=RandomTokens(case["model"]["vocab"], seed=case["seed"]),
        processing_class=common.build_tokenizer(),
        callbacks=[callback],
    )
    trainer.train()
    dist.barrier()

    if dist.get_rank() == 0:
        got = [c["step"] for c in callback.checkpoints]
        assert got == sorted(case["save_steps"]), (got, case["save_steps"])
        # Training really moved the zero-initialised LoRA factors (else merged == base).
        for n in lora_build.zero_init_names(trainable):
            assert callback.last_adapter[n].abs().sum() > 0, f"{n} still zero after training"
        configs = [json.loads((cdir / c["path"] / "adapter_config.json").read_text()) for c in callback.checkpoints]
        assert all(c == configs[0] for c in configs), "adapter_config.json differs between checkpoints"
        with safe_open(str(cdir / callback.checkpoints[0]["path"] / "adapter_model.safetensors"), "pt") as fh:
            dtypes = sorted({str(fh.get_slice(k).get_dtype()) for k in fh.keys()})
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        meta = {
            "checkpoints": callback.checkpoints,
            "lora_config": configs[0],
            "base_name_or_path": configs[0]["base_model_name_or_path"],
            "merged_tied_keys": callback.merged_tied,
            "trainer_wrote": {c["tag"]: lora_build.list_files(cdir / c["path"]) for c in callback.checkpoints},
            "run_top_level": sorted(p.name for p in run_dir.iterdir()),
            "trainable": trainable,
            "zero_init": lora_build.zero_init_names(trainable),
            "adapter_file_dtype": {"BF16": "bf16", "F32": "fp32"}.get("+".join(dtypes), "+".join(dtypes)),
            "peft_version": peft.__version__,
            "deepspeed_version": deepspeed.__version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "num_params": n_params,
            "num_trainable": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad),
        }
        common.write_json_atomic(cdir / "_meta.json", meta)
    dist.barrier()


if __name__ == "__main__":
    main()
