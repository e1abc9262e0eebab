"""Brace expansion, its bound, and matching checkpoint names against filters (pure logic, one tmp folder)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vllm_consolidate.batch.inputs import (
    MAX_BRACE_DEPTH,
    MAX_BRACE_EXPANSIONS,
    expand_braces,
    glob_folders,
    match_any,
)
from vllm_consolidate.errors import UsageError


@pytest.mark.parametrize("pattern, names", [
    ("checkpoint-{100,200,300}", ["checkpoint-100", "checkpoint-200", "checkpoint-300"]),
    ("a{b,c{d,e}}f", ["abf", "acdf", "acef"]),
    ("{x,y}-{1,2}", ["x-1", "x-2", "y-1", "y-2"]),
    ("s{1..3}", ["s1", "s2", "s3"]),
    ("s{08..10}", ["s08", "s09", "s10"]),
    ("s{3..1}", ["s3", "s2", "s1"]),
    ("{only}", ["{only}"]),
    ("{a,b", ["{a,b"]),
    (r"\{a,b\}", ["{a,b}"]),
    ("{,pre}x", ["x", "prex"]),
    ("checkpoint-*", ["checkpoint-*"]),
])
def test_expand_braces(pattern: str, names: list[str]):
    assert expand_braces(pattern) == names


def test_expansion_limit_is_exact_and_fast():
    assert len(expand_braces(f"{{1..{MAX_BRACE_EXPANSIONS}}}")) == MAX_BRACE_EXPANSIONS
    started = time.monotonic()
    with pytest.raises(UsageError, match="expands to more than 10,000 names") as info:
        expand_braces("checkpoint-{1..20000000}")
    assert time.monotonic() - started < 2 and "checkpoint-*" in (info.value.hint or "")
    with pytest.raises(UsageError):
        expand_braces("{1..200}{1..200}")  # 40,000 through the product of two small ranges


def test_match_any():
    assert match_any("checkpoint-200", ["checkpoint-{100,2*}"])
    assert not match_any("checkpoint-20", ["checkpoint-{100,200}"])
    assert match_any("global_step7", ["checkpoint-*", "global_step?"])
    assert not match_any("checkpoint-1", [])


def test_glob_folders_only_folders_sorted_once(tmp_path: Path):
    for name in ("run_b", "run_a", "run_c"):
        (tmp_path / name).mkdir()
    (tmp_path / "run_file").write_text("")
    hits = glob_folders(str(tmp_path / "run_{a,b,*}"))
    assert [p.name for p in hits] == ["run_a", "run_b", "run_c"]  # run_a/run_b once, though matched twice


@pytest.mark.parametrize("pattern", ["{" * 5000 + "a" + "}" * 5000, "{a," * 5000 + "b" + "}" * 5000, "x{" * 5000,
                                     "{" * (MAX_BRACE_DEPTH + 1) + "a,b" + "}" * (MAX_BRACE_DEPTH + 1)])
def test_deep_nesting_is_a_usage_error_not_a_recursion_error(pattern: str):
    with pytest.raises(UsageError, match="nests braces") as info:
        expand_braces(pattern)
    assert len(str(info.value)) < 300, "a hostile pattern is quoted cut short"


def test_nesting_up_to_the_bound_expands():
    assert expand_braces("{a," * MAX_BRACE_DEPTH + "b" + "}" * MAX_BRACE_DEPTH) == ["a"] * MAX_BRACE_DEPTH + ["b"]
    assert expand_braces("\\{" * 5000) == ["{" * 5000]  # escaped braces do not nest


def test_a_recursion_error_inside_bracex_is_a_usage_error(monkeypatch: pytest.MonkeyPatch):
    import bracex

    def deep(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(bracex, "expand", deep)
    with pytest.raises(UsageError, match="too complex"):
        expand_braces("{a}" * 10)
