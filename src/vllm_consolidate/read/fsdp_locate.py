"""Finding the DCP folder or verl role folder an input refers to, without leaving the input.

DCP (torch.distributed.checkpoint) inputs, in the order tried:

* a DCP folder itself (``.metadata`` + ``*.distcp``);
* an HF Trainer / Accelerate ``checkpoint-N`` (or Accelerate ``checkpoint_N``) holding
  ``pytorch_model_fsdp_0/``;
* a training run: its ``checkpoint-N`` with the highest N that holds one;
* a folder of numbered saves (``step-2``, ``step_4``, ``global_step_6``, ``epoch_1``...): the one
  with the highest number that is a DCP folder.

verl inputs: a role folder (``actor``/``critic``, holding ``model_world_size_W_rank_R.pt``); a
``global_step_N`` folder (its ``actor``); a run folder (the step in
``latest_checkpointed_iteration.txt``, else the highest ``global_step_N``).

Every folder chosen inside the input must resolve inside it (:func:`.zero_locate.confine_chosen`).

"Not mine" before "broken" (see :mod:`.registry`): Megatron-Core's ``torch_dist`` saves are DCP folders
(``iter_NNNNNNN/.metadata``) with its own ``metadata.json``, and its run keeps a
``latest_checkpointed_iteration.txt`` too. So a DCP folder whose ``metadata.json`` names a
``sharded_backend`` is not claimed as plain DCP, and the tracker is verl's only beside at least one
``global_step_N`` folder: elsewhere both resolvers say "not mine" instead of refusing another format's run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vllm_consolidate.errors import ConsolidateError, CorruptCheckpointError, InputNotFoundError
from vllm_consolidate.formats.dcp import is_dcp_folder
from vllm_consolidate.limits import brief
from vllm_consolidate.read.steps import (
    Checkpoint,
    SaveList,
    numbered_step,  # re-exported: batch and inspect import it from here
)
from vllm_consolidate.read.verl import is_verl_role_folder
from vllm_consolidate.read.zero_locate import ResolvedCheckpoint, confine_chosen, latest_checkpoint_folder
from vllm_consolidate.safe_io import MAX_TAG_BYTES, read_json, read_text

TRAINER_FSDP_FOLDER = "pytorch_model_fsdp_0"
#: Folders a checkpoint keeps its DCP model in: Accelerate's, and ``pytorch_model.bin/`` (a DCP save
#: under the weights file's name, as some FSDP scripts leave it).
DCP_MODEL_FOLDERS = (TRAINER_FSDP_FOLDER, "pytorch_model.bin")
VERL_TRACKER = "latest_checkpointed_iteration.txt"
VERL_ROLES = ("actor", "critic")
#: Megatron-Core's description of a distributed save, beside its DCP ``.metadata``.
MEGATRON_METADATA = "metadata.json"
_VERL_STEP = re.compile(r"^global_step_(\d+)$")


def _subfolders(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir()]
    except OSError:
        return []


def _trainer_fsdp(path: Path) -> Path | None:
    return next((path / name for name in DCP_MODEL_FOLDERS if is_dcp_folder(path / name)), None)


def is_megatron_save(path: Path) -> bool:
    """True if ``path`` holds Megatron-Core's ``metadata.json`` naming a ``sharded_backend`` (read bounded).

    An unreadable or foreign ``metadata.json`` does not count: the folder stays DCP's, whose reader then
    says what is wrong with it.
    """
    if not os.path.lexists(path / MEGATRON_METADATA):
        return False
    try:
        found = read_json(path / MEGATRON_METADATA, MAX_TAG_BYTES, what=MEGATRON_METADATA)
    except (OSError, ConsolidateError):
        return False
    return "sharded_backend" in found


def _plain_dcp(path: Path) -> bool:
    return is_dcp_folder(path) and not is_megatron_save(path)


def is_dcp_save(path: Path) -> bool:
    """True if ``path`` is a (plain, not Megatron-Core) DCP folder or an HF Trainer checkpoint holding one."""
    return _plain_dcp(path) or _trainer_fsdp(path) is not None


def dcp_saves(path: Path) -> list[tuple[int, Path]]:
    """The numbered sub-folders of ``path`` that are DCP saves, by step."""
    return sorted((n, sub) for sub in _subfolders(path) if (n := numbered_step(sub.name)) is not None
                  and is_dcp_save(sub))


def dcp_save_list(path: Path) -> SaveList | None:
    """A folder of numbered DCP saves, by step; ``convert`` picks the highest."""
    saves = [Checkpoint(p.name, n, p) for n, p in dcp_saves(path)]
    return SaveList(saves, saves[-1]) if saves else None


def verl_save_list(path: Path) -> SaveList | None:
    """A verl run's ``global_step_N`` saves; ``convert`` picks the tracker's step, else the highest."""
    saves = [Checkpoint(p.name, n, p) for n, p in verl_steps(path)]
    if not saves:
        return None
    tracked = verl_tracked_step(path)
    return SaveList(saves, next((c for c in saves if c.step == tracked), saves[-1]))


def is_verl_step(path: Path) -> bool:
    """True if ``path`` is a verl ``global_step_N`` folder with an actor or critic."""
    return bool(_VERL_STEP.match(path.name)) and any(is_verl_role_folder(path / role) for role in VERL_ROLES)


def verl_steps(path: Path) -> list[tuple[int, Path]]:
    """The ``global_step_N`` sub-folders of a verl run that hold an actor or critic, by step."""
    return sorted((int(m.group(1)), p) for p in _subfolders(path) if (m := _VERL_STEP.match(p.name))
                  and any(is_verl_role_folder(p / role) for role in VERL_ROLES))


def verl_tracked_step(path: Path) -> int | None:
    """The step ``latest_checkpointed_iteration.txt`` names (None when absent or unreadable)."""
    try:
        text = read_text(path / VERL_TRACKER, MAX_TAG_BYTES, what=VERL_TRACKER).strip()
    except (OSError, ConsolidateError):
        return None
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def resolve_dcp(path: Path) -> ResolvedCheckpoint:
    """The DCP folder an input refers to (see the module docstring).

    Raises:
        InputNotFoundError: Nothing here is a DCP checkpoint.
        UnsafeInputError: A chosen folder is a symlink out of the input.
    """
    if _plain_dcp(path):
        return ResolvedCheckpoint(path, path.name, "DCP folder given directly")
    inner = _trainer_fsdp(path)
    if inner is not None:
        return ResolvedCheckpoint(confine_chosen(inner, path), path.name, f"DCP weights in {path.name}/{inner.name}")
    ckpt = latest_checkpoint_folder(path)
    if ckpt is not None and (inner := _trainer_fsdp(ckpt)) is not None:
        return ResolvedCheckpoint(confine_chosen(inner, ckpt), ckpt.name,
                                  f"latest checkpoint by step: {ckpt.name}; DCP weights in {inner.name}")
    numbered = dcp_saves(path)
    if numbered:
        sub = confine_chosen(max(numbered)[1], path)
        inner = _trainer_fsdp(sub)
        folder = confine_chosen(inner, sub) if inner is not None else sub
        return ResolvedCheckpoint(folder, sub.name, f"highest numbered DCP save: {sub.name}")
    raise InputNotFoundError("no torch.distributed.checkpoint folder (.metadata + *.distcp) found", path=path)


def _has_verl_steps(path: Path) -> bool:
    """Any ``global_step_N`` sub-folder, saved or not: what makes the tracker beside it verl's."""
    return any(_VERL_STEP.match(p.name) for p in _subfolders(path))


def _verl_step(path: Path) -> Path | None:
    tracker = path / VERL_TRACKER
    if os.path.lexists(tracker) and _has_verl_steps(path):
        text = read_text(tracker, MAX_TAG_BYTES, what=VERL_TRACKER).strip()
        if not (text.isascii() and text.isdigit()) or len(text) > 18:
            raise CorruptCheckpointError(f"{VERL_TRACKER} holds {brief(text)}, not a step number", path=tracker)
        step = path / f"global_step_{int(text)}"
        if not step.is_dir():
            raise CorruptCheckpointError(f"{VERL_TRACKER} names step {int(text)}, but {step.name} is missing",
                                         path=tracker, hint="Pass the global_step_N folder you want directly.")
        return confine_chosen(step, path)
    steps = verl_steps(path)
    return confine_chosen(steps[-1][1], path) if steps else None


def resolve_verl(path: Path) -> ResolvedCheckpoint:
    """The verl role folder an input refers to (see the module docstring).

    Raises:
        InputNotFoundError: Nothing here is a verl checkpoint.
        CorruptCheckpointError: ``latest_checkpointed_iteration.txt`` is unreadable or names a missing step.
        UnsafeInputError: A chosen folder is a symlink out of the input.
    """
    if is_verl_role_folder(path):
        return ResolvedCheckpoint(path, path.parent.name, f"verl {path.name} folder given directly")
    how = ""
    step = path if _VERL_STEP.match(path.name) else _verl_step(path)
    if step is not None and step != path:
        how = f"{step.name} from {VERL_TRACKER}" if (path / VERL_TRACKER).exists() else f"highest step: {step.name}"
    if step is not None:
        for role in VERL_ROLES:
            if is_verl_role_folder(step / role):
                others = [r for r in VERL_ROLES if r != role and is_verl_role_folder(step / r)]
                note = f" ({', '.join(others)} also saved: pass that folder to convert it)" if others else ""
                return ResolvedCheckpoint(confine_chosen(step / role, step), step.name,
                                          "; ".join(filter(None, [how, f"verl {role}{note}"])))
    raise InputNotFoundError("no verl checkpoint (global_step_N/actor/model_world_size_W_rank_R.pt) found", path=path)


__all__ = ["MEGATRON_METADATA", "TRAINER_FSDP_FOLDER", "VERL_ROLES", "VERL_TRACKER", "dcp_save_list", "dcp_saves",
           "is_dcp_save", "is_megatron_save", "is_verl_step", "numbered_step", "resolve_dcp", "resolve_verl",
           "verl_save_list", "verl_steps", "verl_tracked_step"]
