"""Helpers shared by the training scripts the corpus registries launch.

The scripts (``ds_train``, ``trainer_train``, ``lora_train``, ``trainer_fsdp_train``,
``fsdp_train``, ``verl_save``) run as ``deepspeed`` / ``torchrun`` entry points, not as
modules: each puts the repo root on ``sys.path`` before its ``tests.corpus`` imports, and
imports this module as ``tests.corpus.train_common``.  No DeepSpeed import here (the FSDP
scripts use it too); the DeepSpeed-specific Trainer pieces stay in ``trainer_train.py``.

* HF ``Trainer`` runs (``trainer_train``, ``lora_train``, ``trainer_fsdp_train``):
  :class:`RandomTokens`, :func:`trainer_args` (the ``TrainingArguments`` they share),
  :func:`make_trainer`, and :class:`SaveTruth`, the ``on_save`` callback base that gathers
  ground truth from the live model right after each ``checkpoint-N`` is written.
* FSDP2 runs (``fsdp_train``, ``verl_save``, ``trainer_fsdp_train``): :func:`save_full_truth`
  (ground truth = full state dict of the live model) and :func:`run_cases`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tests.corpus import common
from transformers import Trainer, TrainerCallback, TrainingArguments

#: Names of the dtypes the FSDP cases save.
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# --------------------------------------------------------------------------- HF Trainer runs


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


class ImageBatches(torch.utils.data.Dataset):
    """Fixed whole batches for a vision-language model (``common.train_batch``: 2 sequences, one image each).

    Each item is already a batch (Qwen2-VL's ``pixel_values`` are the patches of every image of the batch,
    concatenated), so the Trainer loads one item per step (:func:`trainer_args`) with :func:`whole_batch`.
    """

    def __init__(self, model: dict[str, Any], n: int = 16, seed: int = 0) -> None:
        """Pre-generate ``n`` batches for the model spec ``model``."""
        gen = torch.Generator().manual_seed(seed)
        self.data = [common.train_batch(model, gen, low=4) for _ in range(n)]

    def __len__(self) -> int:
        """Number of batches."""
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """One whole batch."""
        return self.data[i]


def whole_batch(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Collator of :class:`ImageBatches`: the single item is the batch."""
    (batch,) = features
    return batch


def trainer_args(case: dict[str, Any], run_dir: Path, **kw: Any) -> TrainingArguments:
    """``TrainingArguments`` every corpus Trainer run shares; ``kw`` adds (or overrides) the backend's own.

    2 sequences per rank, constant lr 1e-2, AdamW weight decay 0.1, grad clip 1.0, a
    checkpoint every ``min(save_steps)`` steps up to ``max(save_steps)``, gloo, no reporting.
    """
    args: dict[str, Any] = dict(
        output_dir=str(run_dir),
        ddp_backend="gloo",
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
    )
    if case["model"].get("vision"):  # ImageBatches: one whole batch per step; keep the image inputs
        args.update(per_device_train_batch_size=1, remove_unused_columns=False)
    args.update(kw)
    return TrainingArguments(**args)


def make_trainer(
    case: dict[str, Any], model: Any, args: TrainingArguments, tokenizer: Any, callback: TrainerCallback
) -> Trainer:
    """``Trainer`` on :class:`RandomTokens` (case vocab and seed), or :class:`ImageBatches` for a
    vision-language model, with one truth callback."""
    images = bool(case["model"].get("vision"))
    return Trainer(
        model=model,
        args=args,
        train_dataset=ImageBatches(case["model"], seed=case["seed"]) if images else RandomTokens(
            case["model"]["vocab"], seed=case["seed"]),
        data_collator=whole_batch if images else None,
        processing_class=tokenizer,
        callbacks=[callback],
    )


class SaveTruth(TrainerCallback):
    """Base of the ground-truth callbacks.

    ``on_save`` runs on every rank right after ``checkpoint-N`` is written: :meth:`collect`
    gathers from the live model (collective) and rank 0 writes the truth file(s); the
    checkpoint entry it returns goes to :attr:`checkpoints`; then all ranks meet at a barrier.
    """

    def __init__(self, case: dict[str, Any]) -> None:
        """Remember the case (``case_dir``, ``save_steps``)."""
        self.case = case
        self.case_dir = Path(case["case_dir"])
        self.checkpoints: list[dict[str, Any]] = []

    def on_save(self, args: TrainingArguments, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        """Collective: every rank must take part in the gather."""
        step = state.global_step
        self.checkpoints.append(self.collect(model, f"checkpoint-{step}", step))
        dist.barrier()

    def collect(self, model: Any, tag: str, step: int) -> dict[str, Any]:
        """Gather and (rank 0) write the truth of checkpoint ``tag``; return its ``checkpoints`` entry."""
        raise NotImplementedError

    def check_steps(self) -> None:
        """Assert that a checkpoint was saved (in order) at every planned step."""
        got = [c["step"] for c in self.checkpoints]
        assert got == sorted(self.case["save_steps"]), (got, self.case["save_steps"])


# --------------------------------------------------------------------------- FSDP2 runs


def save_full_truth(
    model: torch.nn.Module, keys: list[str], tied: dict[str, str], path: Path
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Ground truth of a live FSDP2 model (collective: call on every rank).

    ``get_model_state_dict(model, StateDictOptions(full_state_dict=True, cpu_offload=True))``;
    rank 0 checks that it holds exactly ``keys`` (``named_parameters()`` names [+ persistent
    buffers]) plus tied aliases, and writes the ``keys`` to ``path`` in the live dtype.
    Returns ``(truth, aliases present in the full state dict)`` on rank 0, ``({}, [])`` elsewhere.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return {}, []
    missing = [k for k in keys if k not in full]
    assert not missing, missing
    extra = set(full) - set(keys) - set(tied)
    assert not extra, f"unexpected state dict keys {sorted(extra)[:5]}"
    truth = {k: full[k].detach().to("cpu").contiguous().clone() for k in keys}
    common.save_truth(path, truth)
    return truth, sorted(k for k in full if k in tied)


def run_cases(plan: dict[str, Any], kind: str, run_case: Callable[[dict[str, Any]], None]) -> None:
    """Body of a ``torchrun`` script: gloo process group, one thread, then every case of ``plan`` in turn.

    Each case must be of ``kind`` and planned for this world size; rank 0 wipes its folder first.
    """
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for case in plan["cases"]:
        assert case["kind"] == kind and case["world_size"] == dist.get_world_size(), case["name"]
        if dist.get_rank() == 0:
            shutil.rmtree(case["case_dir"], ignore_errors=True)
        dist.barrier()
        run_case(case)
    dist.destroy_process_group()
