"""What a folder holds as inputs: the one listing ``batch`` converts from and ``inspect`` shows.

:func:`inspect_input` classifies one folder (a run with ``checkpoint-N`` children, a format's run of saves as
the registry lists them, one save, or an HF model) and names its checkpoints; :func:`inputs_in` is what
``batch --input-dir`` takes from a folder (the folder, else its children, else its grandchildren);
:func:`checkpoint_folders` is every numbered save folder ``inspect``'s table lists. Names only: no file is
opened, so listing a run of hostile checkpoints reads nothing from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vllm_consolidate.errors import InputNotFoundError
from vllm_consolidate.read import fsdp_locate as fl
from vllm_consolidate.read.deepspeed import is_zero_checkpoint_folder
from vllm_consolidate.read.hf import is_hf_folder
from vllm_consolidate.read.peft import is_peft_folder
from vllm_consolidate.read.registry import HOLDS, run_saves
from vllm_consolidate.read.steps import Checkpoint, numbered_step, step_of
from vllm_consolidate.read.verl import is_verl_role_folder


@dataclass
class InputFolder:
    """One input folder and what it holds."""

    path: Path
    kind: str | None  # "run", "<format>_saves" (deepspeed_saves...), "checkpoint", "hf_model", or None
    checkpoints: list[Checkpoint] = field(default_factory=list)
    latest: Checkpoint | None = None
    model_dir: Path | None = None
    error: str | None = None


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted((p for p in path.iterdir() if p.is_dir()), key=lambda p: p.name)
    except OSError:
        return []


def _numbered(children: list[Path], prefix: str) -> list[Checkpoint]:
    """The children named ``<prefix>N``, by step."""
    found = [Checkpoint(c.name, s, c) for c in children if c.name.startswith(prefix) and (s := step_of(c.name))
             is not None]
    return sorted(found, key=lambda c: c.step or 0)


def inspect_input(path: Path) -> InputFolder:
    """Classify a folder and list its checkpoints (names only; no file is opened)."""
    path = Path(path)
    if not path.is_dir():
        return InputFolder(path, None, error="not a folder" if path.exists() else "does not exist")
    children = _subdirs(path)
    step = step_of(path.name)
    if step is not None and (is_zero_checkpoint_folder(path) or is_hf_folder(path) or (path / "latest").is_file()
                             or fl.is_dcp_save(path) or any(step_of(c.name) is not None for c in children)):
        ck = Checkpoint(path.name, step, path)
        holder = path.parent
        if path.name.startswith("global_step") and step_of(holder.name) is not None:
            holder = holder.parent  # run/checkpoint-N/global_stepN
        return InputFolder(path, "checkpoint", [ck], ck, holder)
    ckpts = _numbered(children, "checkpoint-")
    if ckpts:
        return InputFolder(path, "run", ckpts, ckpts[-1], path)
    found = run_saves(path)  # global_stepN (ZeRO), numbered DCP saves, verl global_step_N: as the registry orders them
    if found is not None:
        fmt, saves = found
        return InputFolder(path, f"{fmt.kind}_saves", saves.saves, saves.latest, path)
    if _single_save(path):
        ck = Checkpoint(path.name, fl.numbered_step(path.name), path)
        return InputFolder(path, "checkpoint", [ck], ck, path.parent)
    if is_zero_checkpoint_folder(path) or is_hf_folder(path):
        ck = Checkpoint(path.name, None, path)
        return InputFolder(path, "hf_model" if not is_zero_checkpoint_folder(path) else "checkpoint", [ck], ck, path)
    return InputFolder(path, None, error="no checkpoint-N/, global_stepN/, 'latest', ZeRO files, DCP or verl "
                                         "saves, or HF weights")


def _single_save(path: Path) -> bool:
    """One verl, DCP or peft adapter save given directly."""
    return fl.is_dcp_save(path) or is_peft_folder(path) or is_verl_role_folder(path) or any(
        is_verl_role_folder(path / role) for role in fl.VERL_ROLES)


def inputs_in(root: Path) -> list[InputFolder]:
    """The inputs in a folder: itself when convertible, else its convertible children, else grandchildren
    (``experiments/<run>/<model>``).

    Raises:
        InputNotFoundError: ``root`` is not a folder, or nothing convertible is there.
    """
    if not root.is_dir():
        raise InputNotFoundError("--input-dir is not a folder", path=root)
    top = inspect_input(root)
    if top.kind is not None:
        return [top]
    # Children first; grandchildren only when no child is convertible (experiments/<run>/<model>).
    for level in (_subdirs(root), [g for c in _subdirs(root) for g in _subdirs(c)]):
        found = [f for f in (inspect_input(p) for p in level) if f.kind is not None]
        if found:
            return found
    raise InputNotFoundError("no training run, checkpoint or HF model in the folder or the two levels below it",
                             path=root)


def _numbered_saves(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir() and (step_of(p.name) is not None or (
            numbered_step(p.name) is not None and any(h.test(p) for h in HOLDS)))]
    except OSError:
        return []


def _by_step(paths: list[Path]) -> list[Path]:
    # checkpoint-10 after checkpoint-9: by kind, then by N.
    return sorted(paths, key=lambda p: (p.name.startswith("global_step"), numbered_step(p.name) or 0, p.name))


def checkpoint_folders(root: Path) -> list[Path]:
    """Every numbered save folder: ``root`` itself when numbered, its children, and their ``global_stepN``."""
    folders = [root] if numbered_step(root.name) is not None else []
    for child in _by_step(_numbered_saves(root)):
        folders.append(child)
        folders += _by_step([g for g in _numbered_saves(child) if g.name.startswith("global_step")])
    return folders


__all__ = ["InputFolder", "checkpoint_folders", "inputs_in", "inspect_input"]
