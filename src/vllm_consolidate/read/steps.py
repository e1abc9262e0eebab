"""The one parser of a save folder's step number, for detection, ``batch`` and ``inspect``.

Every numbered save a supported trainer writes is ``<word><sep>N``: HF Trainer's ``checkpoint-N``,
DeepSpeed's ``global_stepN``, verl's ``global_step_N``, and the ``step-2``/``step_4``/``epoch_1``/
``iter_0000100`` of FSDP scripts and Megatron. :func:`parse_step` reads them all with one pattern;
:func:`step_of` and :func:`numbered_step` are its two views (the trainer and DeepSpeed spellings only,
or any numbered save), so the three commands cannot disagree on what N a folder has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

#: Not ``optimizer_0`` or ``pytorch_model_fsdp_0``: those hold parts of one save, not a save.
_NUMBERED = re.compile(r"^(step|steps|global_step|checkpoint|ckpt|iter|iteration|epoch)([-_]?)([0-9]+)$")
#: The spellings HF Trainer (``checkpoint-N``) and DeepSpeed (``global_stepN``) use.
TRAINER_SPELLINGS = ("checkpoint-", "global_step")


class StepName(NamedTuple):
    """A numbered save folder's name, split: ``spelling`` is the word and separator (``checkpoint-``)."""

    spelling: str
    step: int


def parse_step(name: str) -> StepName | None:
    """The spelling and N of a numbered save folder name, else None."""
    m = _NUMBERED.match(name)
    return StepName(m.group(1) + m.group(2), int(m.group(3))) if m else None


def step_of(name: str) -> int | None:
    """N of a ``checkpoint-N`` or ``global_stepN`` folder name, else None."""
    found = parse_step(name)
    return found.step if found is not None and found.spelling in TRAINER_SPELLINGS else None


def numbered_step(name: str) -> int | None:
    """N of any numbered save folder (``checkpoint-3``, ``global_step6``, ``step-2``, ``global_step_6``), else None."""
    found = parse_step(name)
    return found.step if found is not None else None


@dataclass
class Checkpoint:
    """One convertible save of a run: what ``batch`` lists and converts, and ``inspect`` shows."""

    name: str  # checkpoint-200, global_step200, or the HF folder's name
    step: int | None
    path: Path  # the folder passed to convert() as checkpoint_dir


class SaveList(NamedTuple):
    """A run's saves of one format, by step, and the one ``convert`` picks from the run."""

    saves: list[Checkpoint]
    latest: Checkpoint


__all__ = ["TRAINER_SPELLINGS", "Checkpoint", "SaveList", "StepName", "numbered_step", "parse_step", "step_of"]
