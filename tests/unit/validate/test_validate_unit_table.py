"""The check table, the report and the context: pure logic, no model, no torch."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import vllm_consolidate.validate as V
from vllm_consolidate.units import few
from vllm_consolidate.validate import report
from vllm_consolidate.validate.context import Context


def _position(name: str) -> int:
    return [n for n, _ in V.CHECKS].index(name)


def test_each_check_is_listed_once():
    names = [n for n, _ in V.CHECKS]
    funcs = [f for _, f in V.CHECKS]
    assert len(set(names)) == len(names)
    assert len(set(funcs)) == len(funcs)


def test_every_check_is_a_function_of_the_context_in_a_validate_module():
    for name, func in V.CHECKS:
        assert func.__module__.startswith("vllm_consolidate.validate."), name
        assert list(inspect.signature(func).parameters) == ["ctx"], name
        assert func.__name__.startswith(("check_", "build_")), name


@pytest.mark.parametrize(("producer", "consumers"), [
    ("weight_files", ["index", "duplicate_tensors", "bin_format", "wrapper_prefixes", "values", "source_values"]),
    ("config", ["architecture", "quantization_config", "skeleton", "vocab_size", "dtype", "tokenizer"]),
    ("skeleton", ["vocab_size", "missing_tensors", "tied_embeddings"]),
])
def test_what_a_check_fills_in_is_there_before_it_is_read(producer, consumers):
    for consumer in consumers:
        assert _position(producer) < _position(consumer), consumer


def test_public_surface():
    assert set(V.__all__) == {"CHECKS", "FAIL", "PASS", "WARN", "Check", "ValidationReport", "add_load_check",
                              "load_check", "validate_adapter_folder", "validate_folder"}
    assert (V.PASS, V.WARN, V.FAIL) == ("pass", "warn", "fail")


def test_a_crashing_check_is_a_failure_with_its_traceback(tmp_path: Path):
    def check_boom(ctx: Context) -> report.Check:
        raise RuntimeError("boom")

    (out,) = V._run(Context(tmp_path), "boom", check_boom)
    assert out.status == report.FAIL and out.message == "the check crashed: RuntimeError: boom"
    assert "RuntimeError: boom" in out.details["traceback"]


def test_a_missing_folder_is_one_failed_check(tmp_path: Path):
    result = V.validate_folder(tmp_path / "nope")
    assert [(c.name, c.status) for c in result.checks] == [("folder", "fail")]


def test_few_shortens_sorted_lists():
    assert few(["c", "a", "b"]) == "a, b, c"
    assert few([str(i) for i in range(7)], 3) == "0, 1, 2 and 4 more"
    assert few(["z", "a", "m"], 2, sort=False) == "z, a and 1 more"


def test_report_counts_and_skipped():
    r = report.ValidationReport(Path("x"), [report.Check("a", report.PASS), report.skipped("b", "no reason"),
                                            report.Check("c", report.FAIL, "bad")])
    assert r.checks[1].status == report.WARN and r.checks[1].message == "skipped: no reason"
    assert not r.ok and r.counts() == {"pass": 1, "warn": 1, "fail": 1}
    assert r.failure_messages() == ["c: bad"] and r.warning_messages() == ["b: skipped: no reason"]
    assert r.get("c").message == "bad" and r.get("nope") is None
    assert r.to_dict()["checks"][2] == {"name": "c", "status": "fail", "message": "bad", "details": {}}
    r.checks.pop()
    assert r.ok


@pytest.mark.parametrize(("given", "used"), [(1000, 992), (10, 64), (2**20, 2**20)])
def test_chunk_bytes_is_a_multiple_of_every_element_size(tmp_path: Path, given: int, used: int):
    assert Context(tmp_path, chunk_bytes=given).chunk_bytes == used


def test_config_value_looks_into_text_config(tmp_path: Path):
    ctx = Context(tmp_path, config={"vocab_size": 5, "text_config": {"vocab_size": 9, "torch_dtype": "bfloat16"}})
    assert ctx.config_value("vocab_size") == 5
    assert ctx.config_value("torch_dtype") == "bfloat16"
    assert ctx.config_value("nope") is None


def test_importing_validate_imports_neither_torch_nor_transformers():
    code = ("import sys, vllm_consolidate.validate; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
