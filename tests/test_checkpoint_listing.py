"""``inspect``, ``batch --dry-run`` and ``convert`` list and pick the same checkpoints, for every corpus run.

Three commands find checkpoints (detection, the batch's input listing, inspect's table). Whatever each
does inside, on every real run they must agree: batch's latest checkpoint is the one ``convert --input``
converts, inspect marks that one as chosen, and inspect's table and batch's list hold the same saves.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_consolidate.batch.inputs import inspect_input
from vllm_consolidate.inspection import inspect_path
from vllm_consolidate.read import detect as detection

#: The folder of a case that is its input, the first present (as the corpus tests use them).
INPUT_FOLDERS = ("ckpt", "run", "model", "adapter")


def _inputs(*groups: dict[str, Path]) -> list[tuple[str, Path]]:
    out = []
    for corpus in groups:
        for name, case in sorted(corpus.items()):
            found = next((case / f for f in INPUT_FOLDERS if (case / f).is_dir()), None)
            if found is not None:
                out.append((name, found))
    return out


def _check(name: str, path: Path) -> None:
    detected = detection.detect(path)
    listed = inspect_input(path)
    assert listed.kind is not None and listed.latest is not None, name
    # batch converts its latest checkpoint with --checkpoint-dir: the same weights as convert --input
    via_batch = detection.detect(path, checkpoint_dir=listed.latest.path)
    assert via_batch.weights_dir == detected.weights_dir, name
    assert via_batch.kind == detected.kind, name
    # inspect lists the same saves (names relative to the input; "." when the input is the save)
    report = inspect_path(path).inputs[0]
    top = [e for e in report.checkpoints if "/" not in e.name]
    shown = {e.path for e in top}
    if top:  # a plain HF folder or a single save is not a table of saves
        assert {str(c.path) for c in listed.checkpoints} <= shown | {str(path)}, name
        assert [e.step for e in top] == sorted(e.step for e in top), name
    chosen = [e for e in report.checkpoints if e.chosen]
    if len(listed.checkpoints) > 1:
        assert len(chosen) == 1, name
        assert Path(chosen[0].path) in (detected.weights_dir, detected.weights_dir.parent,
                                        listed.latest.path), name
    assert report.chosen == str(detected.weights_dir), name


def test_every_corpus_run_agrees(corpus: dict[str, Path], fsdp_corpus: dict[str, Path],
                                 lora_corpus: dict[str, Path]) -> None:
    cases = _inputs(corpus, fsdp_corpus, lora_corpus)
    assert len(cases) >= 30, [n for n, _ in cases]
    failed = []
    for name, path in cases:
        try:
            _check(name, path)
        except AssertionError as exc:
            failed.append(f"{name}: {exc}")
    assert not failed, failed


@pytest.mark.parametrize("name", ["step-2", "checkpoint-3", "global_step6", "global_step_6", "iter_0000100", "epoch_1"])
def test_one_step_parser(name: str) -> None:
    """The step numbers batch's {step} and inspect's table show come from one parser."""
    from vllm_consolidate.read.steps import numbered_step, parse_step

    assert numbered_step(name) == int("".join(c for c in name if c.isdigit()).lstrip("0") or 0)
    assert parse_step(name) is not None
