"""Shared pytest fixtures: the on-disk DeepSpeed checkpoint corpus."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:  # make ``tests.corpus`` importable from any cwd
    sys.path.insert(0, str(_REPO_ROOT))

from tests.corpus import build  # noqa: E402


@pytest.fixture(scope="session")
def corpus() -> dict[str, Path]:
    """All corpus cases, ``{name: case_dir}``; built on first use, then served from the cache."""
    return build.build_all()


@pytest.fixture(scope="session")
def case_dir(corpus: dict[str, Path]) -> Callable[[str], Path]:
    """Factory: ``case_dir("qwen2_z3_w2_bf16_tied") -> Path`` of a built case."""

    def _get(name: str) -> Path:
        if name not in corpus:
            raise KeyError(f"unknown corpus case {name!r}; known: {sorted(corpus)}")
        return corpus[name]

    return _get


@pytest.fixture(scope="session")
def case_meta(corpus: dict[str, Path]) -> Callable[[str], dict[str, Any]]:
    """Factory: ``case_meta(name) -> dict`` parsed from the case's ``case.json``."""

    def _get(name: str) -> dict[str, Any]:
        return build.load_case(name)

    return _get


@pytest.fixture(scope="session")
def fsdp_corpus() -> dict[str, Path]:
    """The FSDP / DCP / verl corpus cases, ``{name: case_dir}``; built on first use, then served from the cache."""
    from tests.corpus import fsdp_build

    return fsdp_build.build_all()


@pytest.fixture(scope="session")
def lora_corpus() -> dict[str, Path]:
    """The LoRA / peft corpus cases (``tests/corpus/LORA_README.md``), ``{name: case_dir}``; built on first use."""
    from tests.corpus import lora_build

    return lora_build.build_all()
