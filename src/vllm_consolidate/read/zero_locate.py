"""Finding the ZeRO ``global_stepN`` folder an input refers to, without leaving the input.

Accepted inputs: a training run (its highest ``checkpoint-N``), a ``checkpoint-N`` folder, a folder
with DeepSpeed's ``latest`` file and ``global_stepN/`` folders, or a ``global_stepN`` folder.

Safety decisions:

* ``latest`` is read bounded (:data:`~vllm_consolidate.safe_io.MAX_TAG_BYTES`) and strictly UTF-8;
  a FIFO or a 1 GB file named ``latest`` is refused, not read. Its tag must be one plain folder name
  (not empty, no ``/``, not ``.`` or ``..``, no NUL; so never absolute) and that folder, symlinks
  resolved, must lie inside the folder holding ``latest``. Otherwise an
  :class:`~vllm_consolidate.errors.UnsafeInputError` names ``latest``.
* A ``checkpoint-N`` or ``global_stepN`` folder that we pick inside the input (highest step) must,
  symlinks resolved, lie inside the folder we found it in. A symlink out of the input is refused
  (:func:`confine_chosen`): the user chose the input, not where its links lead. The folder the user
  names directly may be a symlink.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vllm_consolidate.errors import ConsolidateError, CorruptCheckpointError, InputNotFoundError, UnsafeInputError
from vllm_consolidate.limits import brief
from vllm_consolidate.read.steps import Checkpoint, SaveList, step_of  # step_of re-exported: readers import it here
from vllm_consolidate.safe_io import MAX_TAG_BYTES, confined, read_text


def is_zero_checkpoint_folder(path: Path) -> bool:
    """True if ``path`` itself holds ``*_model_states.pt`` files (a ``global_stepN`` folder)."""
    return path.is_dir() and any(path.glob("*_model_states.pt"))


@dataclass
class ResolvedCheckpoint:
    """Which ``global_stepN`` folder an input resolved to, and how."""

    folder: Path
    tag: str
    how: str


def latest_checkpoint_folder(run_dir: Path) -> Path | None:
    """The ``checkpoint-N`` sub-folder with the highest N, or None.

    Raises:
        UnsafeInputError: That folder is a symlink that resolves outside ``run_dir`` (see :func:`confine_chosen`).
    """
    candidates = [(s, p) for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
                  and (s := step_of(p.name)) is not None]
    return confine_chosen(max(candidates)[1], run_dir) if candidates else None


def confine_chosen(folder: Path, parent: Path) -> Path:
    """``folder``, picked by us inside ``parent``, if it resolves inside ``parent``.

    A ``checkpoint-N`` or ``global_stepN`` folder that is a symlink out of the folder the user named
    is refused: the user chose ``parent``, not where its links lead, and reading there would
    convert (and publish) files from elsewhere on the machine. A folder named directly (``--input``
    or ``--checkpoint-dir``) may itself be a symlink; only the folders we choose inside it are checked.

    Raises:
        UnsafeInputError: ``folder`` resolves outside ``parent``.
    """
    if not confined(folder, [parent]):
        raise UnsafeInputError(
            f"{folder.name} resolves to {os.path.realpath(folder)}, outside {parent}; refusing to follow it",
            path=folder, hint="Pass the folder it points to directly with --checkpoint-dir if you trust it.")
    return folder


def zero_saves(path: Path) -> SaveList | None:
    """A DeepSpeed save folder's ``global_stepN`` saves, and the one ``latest`` names (else the highest).

    Names only, as ``batch`` lists them: an unusable ``latest`` gives a checkpoint no folder has, and the
    conversion then says why (:func:`resolve_checkpoint` reads it strictly).
    """
    try:
        children = [p for p in path.iterdir() if p.is_dir()]
    except OSError:
        return None
    # by step, then name (global_step5 before global_step05 cannot both exist in a real run, but the order is fixed)
    found = sorted(((s, p) for p in children if p.name.startswith("global_step") and (s := step_of(p.name)) is not None
                    and is_zero_checkpoint_folder(p)), key=lambda sp: (sp[0], sp[1].name))
    if not found:
        return None
    saves = [Checkpoint(p.name, s, p) for s, p in found]
    latest = saves[-1]
    if (path / "latest").is_file():
        tag = _lenient_tag(path / "latest")
        latest = next((c for c in saves if c.name == tag), None) or Checkpoint(tag, step_of(tag), path / tag)
    return SaveList(saves, latest)


def _lenient_tag(latest: Path) -> str:
    """The tag ``latest`` names, read bounded; an unusable one gives a name no folder has (detection then says why)."""
    try:
        tag = read_text(latest, MAX_TAG_BYTES, what="'latest'").strip()
    except ConsolidateError:
        return "latest"
    return tag if tag and "/" not in tag and "\0" not in tag and tag not in (".", "..") else "latest"


def _read_tag(latest: Path) -> str:
    """The tag in DeepSpeed's ``latest``: bounded, UTF-8, one plain folder name."""
    tag = read_text(latest, MAX_TAG_BYTES, what="'latest'").strip()
    if not tag:
        raise CorruptCheckpointError("'latest' is empty; it should name a global_stepN folder", path=latest)
    if tag in (".", "..") or "/" in tag or "\0" in tag:
        raise UnsafeInputError(
            f"'latest' names {brief(tag)}, which is not one folder name next to it; refusing to follow it",
            path=latest, hint="Fix the 'latest' file, or pass the global_stepN folder you want with --checkpoint-dir.")
    return tag


def _from_latest(path: Path, latest: Path) -> ResolvedCheckpoint:
    tag = _read_tag(latest)
    folder = path / tag
    if not confined(folder, [path]):
        raise UnsafeInputError(
            f"'latest' names the tag '{tag}', but {folder} resolves to {os.path.realpath(folder)}, outside {path}; "
            "refusing to follow it", path=latest,
            hint="Pass the global_stepN folder you want with --checkpoint-dir if you trust it.")
    if not is_zero_checkpoint_folder(folder):
        raise CorruptCheckpointError(
            f"'latest' names the tag '{tag}', but {folder} holds no ZeRO checkpoint",
            path=latest,
            hint="Pass the global_stepN folder you want with --checkpoint-dir, or fix the 'latest' file.",
        )
    return ResolvedCheckpoint(folder, tag, f"tag '{tag}' from {latest}")


def resolve_checkpoint(path: Path) -> ResolvedCheckpoint:
    """Find the ZeRO ``global_stepN`` folder an input refers to.

    Accepts a training run folder (its latest ``checkpoint-N`` by step), a ``checkpoint-N`` folder,
    a folder with ``latest`` and ``global_stepN/``, or a ``global_stepN`` folder itself. ``latest``
    is read bounded (:data:`~vllm_consolidate.safe_io.MAX_TAG_BYTES`) and strictly UTF-8; its tag
    must be one plain folder name that, symlinks resolved, lies inside the folder holding ``latest``.
    Every folder chosen here must resolve inside the folder it was found in.

    Raises:
        InputNotFoundError: Nothing that looks like a ZeRO checkpoint is there.
        CorruptCheckpointError: ``latest`` is unreadable, too large, or names a tag that does not exist.
        UnsafeInputError: ``latest`` names a path rather than a folder name, or a chosen folder is a
            symlink out of the input.
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError("input does not exist", path=path)
    if not path.is_dir():
        raise InputNotFoundError("a DeepSpeed checkpoint is a folder, not a file", path=path)
    if is_zero_checkpoint_folder(path):
        return ResolvedCheckpoint(path, path.name, "global_step folder given directly")
    latest = path / "latest"
    if os.path.lexists(latest) and not latest.is_dir():  # a FIFO or huge 'latest' is refused, not skipped
        return _from_latest(path, latest)
    steps = [(s, p) for p in path.iterdir() if p.name.startswith("global_step") and (s := step_of(p.name)) is not None
             and is_zero_checkpoint_folder(p)]
    if steps:
        folder = confine_chosen(max(steps)[1], path)
        return ResolvedCheckpoint(folder, folder.name, "highest global_stepN (no 'latest' file)")
    ckpt = latest_checkpoint_folder(path)
    if ckpt is not None:
        inner = resolve_checkpoint(ckpt)
        inner.how = f"latest checkpoint by step: {ckpt.name}; {inner.how}"
        return inner
    raise InputNotFoundError(
        "no DeepSpeed ZeRO checkpoint found (no *_model_states.pt, 'latest', global_stepN/ or checkpoint-N/)",
        path=path,
    )


__all__ = [
    "ResolvedCheckpoint", "confine_chosen", "is_zero_checkpoint_folder", "latest_checkpoint_folder",
    "resolve_checkpoint", "step_of", "zero_saves",
]
