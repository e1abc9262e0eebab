"""Train a peft LoRA adapter with HF ``Trainer`` + DeepSpeed on CPU, leaving ``checkpoint-N`` folders.

Launched by ``lora_build.py`` (after it saved the fp32 base into ``<case>/base``) as::

    deepspeed --num_gpus 2 tests/corpus/lora_train.py --plan plan.json

The CPU workarounds (bf16 validation patch, gloo ``PartialState`` +
``use_configured_state``, no shm comm op) are the ones of ``trainer_train.py``,
imported from there (``ds_trainer_args``), and the Trainer settings are ``train_common``'s
(weight decay 0 here).  Flow: ``from_pretrained(<base name>)`` in fp32,
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

* every trainable param's fp32 master via ``safe_get_full_fp32_param`` (collective,
  ``ds_train.gather_truth(..., trainable_only=True)``); rank 0 writes
  ``truth/checkpoint-N.adapter.safetensors`` keyed by live peft names;
* rank 0 then merges with peft itself (fresh fp32 base from ``base/`` + same
  ``LoraConfig`` + those tensors, ``merge_and_unload``) ->
  ``truth/checkpoint-N.merged.safetensors``.

Rank 0 finally writes ``<case>/_meta.json``; ``lora_build`` turns it into ``case.json``.
"""

from __future__ import annotations

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
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tests.corpus import common, lora_build, train_common  # noqa: E402
from tests.corpus.ds_train import disable_shm_comm, gather_truth  # noqa: E402

# Importing trainer_train applies its CPU bf16 patch (transformers.training_args.is_torch_bf16_gpu_available).
from tests.corpus.trainer_train import ds_trainer_args  # noqa: E402


class LoraTruth(train_common.SaveTruth):
    """Gather the adapter truth from the live engine and merge it with peft, right after every save."""

    def __init__(self, case: dict[str, Any]) -> None:
        """Remember where to write."""
        super().__init__(case)
        self.last_adapter: dict[str, torch.Tensor] = {}
        self.merged_tied: dict[str, str] | None = None

    def collect(self, model: Any, tag: str, step: int) -> dict[str, Any]:
        """Collective gather of the trainable params; rank 0 writes them and peft's merge of them."""
        dist.barrier()  # every rank finished writing checkpoint-N
        adapter = gather_truth(model, self.case["stage"], [], trainable_only=True)
        entry = {
            "tag": tag,
            "path": f"run/{tag}",
            "adapter_truth": f"truth/{tag}.adapter.safetensors",
            "merged_truth": f"truth/{tag}.merged.safetensors",
            "step": step,
        }
        if dist.get_rank() == 0:
            common.save_truth(self.case_dir / entry["adapter_truth"], adapter)
            merged, self.merged_tied = lora_build.reference_merge(
                Path(self.case["base_dir"]), model.peft_config["default"], adapter
            )
            common.save_truth(self.case_dir / entry["merged_truth"], merged)
        self.last_adapter = adapter
        return entry


def main() -> None:
    """Entry point under the ``deepspeed`` launcher."""
    case = common.read_plan()
    disable_shm_comm()
    cdir = Path(case["case_dir"])
    run_dir = cdir / "run"

    # Model first: see the module docstring (no zero.Init).  By name, like a user would: a hub id resolved
    # through HF_HUB_CACHE offline, or the absolute base/ path.
    base = lora_build.auto_class(case["base_name"]).from_pretrained(case["base_name"], dtype=torch.float32)
    torch.manual_seed(case["seed"])  # LoRA A init; identical on every rank
    model = get_peft_model(base, LoraConfig(**case["lora"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    targs = ds_trainer_args(case, run_dir, weight_decay=0.0)
    callback = LoraTruth(case)
    trainer = train_common.make_trainer(case, model, targs, common.build_tokenizer(), callback)
    trainer.train()
    dist.barrier()

    if dist.get_rank() == 0:
        callback.check_steps()
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
