"""Batch naming: template fields, the fields of a job, and the folder names they render (pure logic)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_consolidate.batch.inputs import (
    STAGING_TAG,
    TEMPLATE_FIELDS,
    Checkpoint,
    InputFolder,
    name_fields,
    render_name,
    staging_path,
    template_fields,
)
from vllm_consolidate.errors import UsageError
from vllm_consolidate.write.publish import NAME_MAX

RUN = Path("/exp/ft_runs_a/qwen2.5-7b")


def test_template_fields_in_order():
    assert template_fields("{run_name}_{input_name}_step_{step}") == ["run_name", "input_name", "step"]
    assert template_fields("{checkpoint_name}-{step}-{step}") == ["checkpoint_name", "step", "step"]
    assert template_fields("no_fields") == []
    assert set(TEMPLATE_FIELDS) == {"input_name", "run_name", "step", "checkpoint_name"}


@pytest.mark.parametrize("template, message", [
    ("{model}", "unknown field {model}"),
    ("{step:x}", "has a conversion or format spec"),
    ("{step:05d}", "has a conversion or format spec"),
    ("{run_name!r}", "has a conversion or format spec"),
    ("{step[0]}", "unknown field"),
    ("{step.real}", "unknown field"),
    ("{}", "unknown field"),
    ("{step", "bad --naming-template"),
    ("step}", "bad --naming-template"),
])
def test_template_refusals(template: str, message: str):
    with pytest.raises(UsageError, match=message.replace("{", r"\{").replace("}", r"\}")):
        template_fields(template)


def test_fields_of_a_run_checkpoint():
    inp = InputFolder(RUN, "run", model_dir=RUN)
    ck = Checkpoint("checkpoint-200", 200, RUN / "checkpoint-200")
    assert name_fields(inp, ck) == {"input_name": "qwen2.5-7b", "run_name": "ft_runs_a", "step": "200",
                                    "checkpoint_name": "checkpoint-200"}


def test_fields_of_a_checkpoint_folder_input_name_its_model_folder():
    ck_dir = RUN / "checkpoint-4"
    inp = InputFolder(ck_dir, "checkpoint", model_dir=RUN)
    fields = name_fields(inp, Checkpoint("checkpoint-4", 4, ck_dir))
    assert (fields["input_name"], fields["run_name"], fields["step"]) == ("qwen2.5-7b", "ft_runs_a", "4")


def test_fields_of_an_hf_model_folder_step_final():
    folder = Path("/models/ft_runs_b/merged")
    fields = name_fields(InputFolder(folder, "hf_model", model_dir=folder), Checkpoint("merged", None, folder))
    assert fields == {"input_name": "merged", "run_name": "ft_runs_b", "step": "final", "checkpoint_name": "merged"}


def test_render_name():
    fields = {"input_name": "m", "run_name": "r", "step": "6", "checkpoint_name": "checkpoint-6"}
    assert render_name("{run_name}_final", fields) == "r_final"
    assert render_name("{input_name}_step_{step}", fields) == "m_step_6"


@pytest.mark.parametrize("value", ["", ".", "..", "a/b", ".hidden", "nul\0byte"])
def test_render_name_refuses_non_folder_names(value: str):
    with pytest.raises(UsageError, match="not a usable folder name"):
        render_name("{input_name}", {"input_name": value})


def test_render_name_leaves_room_for_the_staging_names():
    overhead = 1 + len(STAGING_TAG) + 8 + 18 + 1  # ".<name>.batch-XXXXXXXX" and convert()'s own temporary sibling
    longest = "x" * (NAME_MAX - overhead)
    assert render_name("{step}", {"step": longest}) == longest
    with pytest.raises(UsageError, match=f"at most {NAME_MAX - overhead} bytes"):
        render_name("{step}", {"step": longest + "x"})
    with pytest.raises(UsageError, match="byte name"):  # bytes, not characters
        render_name("{step}", {"step": "é" * (len(longest) // 2 + 1)})


def test_staging_path_is_a_hidden_sibling_and_fresh():
    out = Path("/o/run_final")
    a, b = staging_path(out), staging_path(out)
    assert a.parent == out.parent and a.name.startswith(f".run_final{STAGING_TAG}") and a != b
    assert len(a.name) == 1 + len("run_final") + len(STAGING_TAG) + 8
