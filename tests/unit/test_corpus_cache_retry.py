"""The corpus builder runs a failed build step once more (a framework that dies at exit after a good run), and
still fails, naming both errors, when the step fails again."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from tests.corpus.cache import Cache


@dataclass
class Spec:
    name: str

    def spec_hash(self) -> str:
        return "h-" + self.name


def _cache(tmp_path, monkeypatch) -> Cache:
    monkeypatch.setenv("VLLMC_CORPUS_DIR", str(tmp_path))
    return Cache(lambda: "unit-v1", "unit-corpus")


def _steps(cache: Cache, failures: list[int], calls: list[list[str]]):
    def steps(todo):
        def fn():
            calls.append([s.name for s in todo])
            if failures[0] > 0:
                failures[0] -= 1
                raise RuntimeError("launch 'x' failed (rc=-6)")
            for s in todo:
                cache.case_dir(s.name).mkdir(parents=True, exist_ok=True)
                (cache.case_dir(s.name) / "case.json").write_text(json.dumps({"spec_hash": s.spec_hash()}))
        return [("all", fn)]
    return steps


def test_a_step_that_fails_once_is_run_again(tmp_path, monkeypatch):
    cache = _cache(tmp_path, monkeypatch)
    calls: list[list[str]] = []
    dirs = cache.build([Spec("a"), Spec("b")], _steps(cache, [1], calls))
    assert calls == [["a", "b"], ["a", "b"]]
    assert all((d / "case.json").is_file() for d in dirs.values())


def test_a_step_that_fails_twice_fails_with_both_errors(tmp_path, monkeypatch):
    cache = _cache(tmp_path, monkeypatch)
    calls: list[list[str]] = []
    with pytest.raises(RuntimeError, match=r"cases not built: \['a'\]") as info:
        cache.build([Spec("a")], _steps(cache, [2], calls))
    assert len(calls) == 2 and str(info.value).count("rc=-6") == 2
