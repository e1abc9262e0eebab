"""Where config and tokenizer are looked for: ``search_chain`` and the HF-cache trust root (pure paths)."""

from __future__ import annotations

from pathlib import Path

from vllm_consolidate.read.assets import search_chain
from vllm_consolidate.safe_io import trust_root


def test_chain_stops_at_the_input(tmp_path: Path):
    step = tmp_path / "run" / "checkpoint-5" / "global_step5"
    step.mkdir(parents=True)
    assert search_chain(step, tmp_path / "run" / "checkpoint-5") == [step, step.parent]
    assert search_chain(step, tmp_path / "run") == [step, step.parent, step.parent.parent]


def test_chain_of_a_global_step_given_directly_looks_two_levels_up(tmp_path: Path):
    step = tmp_path / "run" / "checkpoint-5" / "global_step5"
    step.mkdir(parents=True)
    assert search_chain(step, step) == [step, step.parent, step.parent.parent]


def test_trust_root_of_an_hf_cache_snapshot_is_its_repo_folder(tmp_path: Path):
    snap = tmp_path / "hub" / "models--Qwen--Qwen2.5-7B" / "snapshots" / "abc123"
    assert trust_root(snap) == tmp_path / "hub" / "models--Qwen--Qwen2.5-7B"
    assert trust_root(tmp_path / "plain") == tmp_path / "plain"
