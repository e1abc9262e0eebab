"""The format registry: one declared order, "not mine" passes on, "mine but broken" stops."""

from __future__ import annotations

import importlib
import json
import types
from pathlib import Path

import pytest

from vllm_consolidate.errors import CorruptCheckpointError, InputNotFoundError
from vllm_consolidate.read import detect as detection
from vllm_consolidate.read import registry
from vllm_consolidate.read.fsdp_locate import resolve_dcp, resolve_verl
from vllm_consolidate.read.registry import FORMATS, INPUT_TYPES, TRAINING_KINDS, InputKind


def _megatron_run(root: Path) -> Path:
    """A Megatron-Core ``torch_dist`` run as it lays out its files (contents are never read as DCP here)."""
    it = root / "run" / "iter_0000002"
    it.mkdir(parents=True)
    (it / ".metadata").write_bytes(b"\x80\x04N.")
    (it / "__0_0.distcp").write_bytes(b"")
    (it / "common.pt").write_bytes(b"")
    (it / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                  "common_backend": "torch", "common_backend_version": 1}))
    (root / "run" / "latest_checkpointed_iteration.txt").write_text("2")
    return root / "run"


def test_order_is_declared_once() -> None:
    assert [f.kind for f in FORMATS] == ["deepspeed", "megatron", "dcp", "verl", "peft", "hf"]
    assert INPUT_TYPES == ("auto", "deepspeed", "megatron", "dcp", "verl", "peft", "hf_sharded")
    assert TRAINING_KINDS == ("deepspeed", "megatron", "dcp", "verl")
    assert len({f.kind for f in FORMATS}) == len(FORMATS) == len(InputKind)


def _named(value: object) -> list[tuple[str, str]]:
    """The ``(module, function)`` pairs a registry field names: directly, or as ``mod.function`` in a wrapper's code."""
    if isinstance(value, registry._Function):
        return [(value.module, value.name)]
    if isinstance(value, tuple):
        return [pair for v in value for pair in _named(v)]
    code = value.__code__ if isinstance(value, types.FunctionType) else None
    names = code.co_names if code is not None else ()
    return [(mod.module, names[i + 1]) for i, n in enumerate(names[:-1])
            if isinstance(mod := vars(registry).get(n), registry._Module)]


def test_every_function_named_by_string_is_there() -> None:
    """The registry imports a format's module when detection first calls it, so a misspelt name would fail only
    then: every name it gives must be a function of its module."""
    named = {pair for f in FORMATS for value in vars(f).values() for pair in _named(value)}
    assert len(named) >= 25 and {m for m, _ in named} >= {"vllm_consolidate.read.megatron", "vllm_consolidate.read.hf"}
    for module, name in sorted(named):
        assert callable(getattr(importlib.import_module(module), name, None)), f"{module}.{name}"


def test_kind_is_its_word() -> None:
    """JSON, messages and comparisons see the plain word, as before the enum."""
    assert json.dumps({"k": InputKind.DCP}) == '{"k": "dcp"}'
    assert f"{InputKind.VERL}|{InputKind.HF!s}" == "verl|hf"
    assert InputKind.PEFT == "peft"


def test_megatron_run_is_not_verl(tmp_path: Path) -> None:
    """Its ``latest_checkpointed_iteration.txt`` names iter_0000002, not a missing global_step_2."""
    run = _megatron_run(tmp_path)
    with pytest.raises(InputNotFoundError):
        resolve_verl(run)


@pytest.mark.parametrize("where", [".", "iter_0000002"])
def test_megatron_save_is_not_dcp(tmp_path: Path, where: str) -> None:
    """Its iter_N folders hold a DCP ``.metadata``, but Megatron's metadata.json says they are not plain DCP."""
    run = _megatron_run(tmp_path)
    with pytest.raises(InputNotFoundError):
        resolve_dcp(run / where)


def test_megatron_run_is_claimed_by_megatron(tmp_path: Path) -> None:
    """Megatron-Core comes before DCP and verl (which say "not mine" above): the run is its, at the tracker's step."""
    detected = detection.detect(_megatron_run(tmp_path))
    assert detected.kind == InputKind.MEGATRON and detected.weights_dir.name == "iter_0000002"


def test_verl_tracker_beside_verl_steps_is_still_broken(tmp_path: Path) -> None:
    """With global_step_N folders the tracker is verl's, and naming a missing step stays an error."""
    run = tmp_path / "run"
    (run / "global_step_1" / "actor").mkdir(parents=True)
    (run / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(CorruptCheckpointError, match="names step 7, but global_step_7 is missing"):
        resolve_verl(run)


def test_dcp_without_megatron_metadata_is_claimed(tmp_path: Path) -> None:
    """A metadata.json that is not Megatron's (or unreadable) leaves a DCP folder DCP's."""
    save = tmp_path / "step-2"
    save.mkdir()
    (save / ".metadata").write_bytes(b"")
    (save / "metadata.json").write_text("not json")
    assert resolve_dcp(tmp_path).folder == save


def test_megatron_run_is_a_batch_input(tmp_path: Path) -> None:
    """batch lists saves through the same registry: the Megatron run's iter_N folders are Megatron's saves."""
    from vllm_consolidate.batch.inputs import inspect_input

    found = inspect_input(_megatron_run(tmp_path))
    assert found.kind == "megatron_saves" and [c.name for c in found.checkpoints] == ["iter_0000002"]


def test_run_saves_follow_the_registry(tmp_path: Path) -> None:
    """A run's saves come from the first format, in registry order, that finds any; the latest is its pick."""
    from vllm_consolidate.read.registry import run_saves

    run = tmp_path / "run"
    for n in (3, 10):
        (run / f"step-{n}").mkdir(parents=True)
        (run / f"step-{n}" / ".metadata").write_bytes(b"")
    fmt, saves = run_saves(run)
    assert fmt.kind == InputKind.DCP
    assert [(c.name, c.step) for c in saves.saves] == [("step-3", 3), ("step-10", 10)]
    assert saves.latest.name == "step-10"
    assert run_saves(tmp_path) is None
