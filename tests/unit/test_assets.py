"""Where config and tokenizer are looked for: ``search_chain`` and the HF-cache trust root (pure paths)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_consolidate.read.assets import search_chain
from vllm_consolidate.safe_io import trust_root


def _mk(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_chain_of_a_run_climbs_to_the_run(tmp_path: Path):
    step = _mk(tmp_path / "run" / "checkpoint-5" / "global_step5")
    assert search_chain(step, tmp_path / "run") == [step, step.parent, step.parent.parent]


@pytest.mark.parametrize("given", ["checkpoint-5", "checkpoint-5/global_step5"])
def test_chain_of_a_checkpoint_inside_a_run_looks_in_the_run(tmp_path: Path, given: str):
    """HF Trainer leaves config and tokenizer in checkpoint-N or the run folder, above a global_stepN."""
    step = _mk(tmp_path / "run" / "checkpoint-5" / "global_step5")
    assert search_chain(step, tmp_path / "run" / given) == [step, step.parent, step.parent.parent]


def test_chain_of_a_trainer_checkpoint_holding_hf_weights(tmp_path: Path):
    ckpt = _mk(tmp_path / "run" / "checkpoint-5")
    assert search_chain(ckpt, ckpt) == [ckpt, ckpt.parent]


@pytest.mark.parametrize("given", ["actor", "", "../.."])
def test_chain_of_a_verl_role_folder(tmp_path: Path, given: str):
    actor = _mk(tmp_path / "run" / "global_step_3" / "actor")
    assert search_chain(actor, actor / given) == [actor, actor.parent, actor.parent.parent]


def test_chain_of_a_trainer_dcp_folder_given_directly(tmp_path: Path):
    dcp = _mk(tmp_path / "run" / "checkpoint-4" / "pytorch_model_fsdp_0")
    assert search_chain(dcp, dcp) == [dcp, dcp.parent, dcp.parent.parent]


@pytest.mark.parametrize("name", ["model", "dcp", "adapter", "actor", "pytorch_model_fsdp_0", "step-4"])
def test_a_folder_that_is_no_checkpoint_of_a_run_is_searched_alone(tmp_path: Path, name: str):
    """Issue 22: ``--input ~/dl/model`` looked in ``~/dl`` and ``~``; an ``actor`` outside a step is no verl role."""
    model = _mk(tmp_path / "home" / "dl" / name)
    assert search_chain(model, model) == [model]


def test_chain_of_a_deepspeed_tag_of_any_name_given_directly(tmp_path: Path):
    """``engine.save_checkpoint(ckpt, tag="best")``: the tag folder holds the rank files, ``ckpt`` the config."""
    best = _mk(tmp_path / "ckpt" / "best")
    (best / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert search_chain(best, best) == [best, best.parent]


def test_chain_never_climbs_above_the_run(tmp_path: Path):
    step = _mk(tmp_path / "checkpoint-1" / "run" / "checkpoint-5" / "global_step5")
    assert search_chain(step, step.parent.parent) == [step, step.parent, step.parent.parent]


def test_trust_root_of_an_hf_cache_snapshot_is_its_repo_folder(tmp_path: Path):
    snap = tmp_path / "hub" / "models--Qwen--Qwen2.5-7B" / "snapshots" / "abc123"
    assert trust_root(snap) == tmp_path / "hub" / "models--Qwen--Qwen2.5-7B"
    assert trust_root(tmp_path / "plain") == tmp_path / "plain"
