"""``inspection.inspect_path`` and the ``inspect`` printer on hand-made folders (no corpus needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_consolidate.cli.inspect import report_json, size
from vllm_consolidate.inspection import inspect_path


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _fake_run(root: Path, steps: list[int]) -> Path:
    """A run whose checkpoints hold empty (unreadable) rank files: enough for detection, not for reading."""
    run = root / "run"
    for s in steps:
        gs = run / f"checkpoint-{s}" / f"global_step{s}"
        gs.mkdir(parents=True)
        for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
            (gs / name).touch()
        (gs.parent / "latest").write_text(gs.name)
    return run


def test_checkpoints_in_step_order_and_every_problem_reported(tmp_path):
    run = _fake_run(tmp_path, [10, 9, 100])
    report = inspect_path(run, base_model_name=None)
    (inp,) = report.inputs
    assert [c.name for c in inp.checkpoints] == [
        "checkpoint-9", "checkpoint-9/global_step9", "checkpoint-10", "checkpoint-10/global_step10",
        "checkpoint-100", "checkpoint-100/global_step100"]
    assert [c.name for c in inp.checkpoints if c.chosen] == ["checkpoint-100/global_step100"]
    assert [c.holds for c in inp.checkpoints[:2]] == [["latest"], ["zero"]]
    # The unreadable rank file and the missing config are both reported; convert would stop at the first.
    assert [p.type for p in report.problems] == ["UnsupportedCheckpointError", "ConfigNotFoundError"]
    assert inp.rank_files == {"optimizer": [0], "model_states": [0]}
    assert (inp.format, inp.zero_stage, inp.tensors, inp.output) == ("deepspeed", None, None, {})
    doc = report_json(report, 4)
    assert doc["exit_code"] == 4 and [p["exit_code"] for p in doc["inputs"][0]["problems"]] == [4, 8]


def test_checkpoint_dir_overrides_detection(tmp_path):
    run = _fake_run(tmp_path, [1, 2])
    (inp,) = inspect_path(run, checkpoint_dir=run / "checkpoint-1", base_model_name=None).inputs
    assert inp.chosen == str(run / "checkpoint-1" / "global_step1") and inp.how.startswith("--checkpoint-dir; ")
    assert [c.name for c in inp.checkpoints if c.chosen] == ["checkpoint-1/global_step1"]


def test_folder_of_inputs_and_a_folder_with_nothing(tmp_path):
    _fake_run(tmp_path / "a", [1])
    _fake_run(tmp_path / "b", [2])
    report = inspect_path(tmp_path, base_model_name=None)  # a folder whose grandchildren are runs
    assert report.kind == "folder" and [Path(i.path).parent.name for i in report.inputs] == ["a", "b"]
    empty = tmp_path / "empty"
    empty.mkdir()
    report = inspect_path(empty)
    assert report.kind == "input" and [p.type for p in report.problems] == ["InputNotFoundError"]
    assert report.to_dict()["inputs"][0]["checkpoints"] == []


@pytest.mark.parametrize("n, text", [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (512_512, "512.5 kB"),
                                     (1_533_952, "1.5 MB"), (6_174_857_216, "6.17 GB")])
def test_sizes_in_the_unit_that_fits(n, text):
    assert size(n) == text


def test_readme_documents_every_json_field(tmp_path):
    import re

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("## Inspect\n"):text.index("## Validation\n")]
    doc = report_json(inspect_path(_fake_run(tmp_path, [1]), base_model_name=None), 4)
    assert set(re.findall(r"^\| `(\w+)` \|", section, re.M)) == set(doc)
    assert set(re.findall(r"^\| `inputs\[\]\.(\w+)`", section, re.M)) == set(doc["inputs"][0])
