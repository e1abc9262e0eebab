"""Config, value and tokenizer checks that need neither transformers nor torch, on hand-made folders."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from vllm_consolidate.validate import config, context, files, tokenizer, values
from vllm_consolidate.validate.context import Context
from vllm_consolidate.validate.report import FAIL, PASS, WARN


@pytest.fixture(autouse=True)
def _no_transformers_no_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks that would import transformers skip; vLLM's registry is empty (as without vLLM)."""
    monkeypatch.setattr(context, "transformers_module", lambda: None)
    monkeypatch.setattr(config, "_vllm_registry", frozenset)


def _ctx(folder: Path) -> Context:
    """A context after the file and config checks, as the table runs them."""
    ctx = Context(folder)
    files.check_weight_files(ctx)
    config.check_config(ctx)
    return ctx


def test_config_must_parse_and_name_the_model(tmp_path: Path):
    assert config.check_config(Context(tmp_path)).message == "no config.json"
    (tmp_path / "config.json").write_text("[1]")
    assert config.check_config(Context(tmp_path)).message == "config.json holds a JSON list, not an object"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    ctx = Context(tmp_path)
    check = config.check_config(ctx)
    assert check.status == FAIL and check.message == "config.json lacks architectures; vLLM needs both"
    assert ctx.config == {"model_type": "llama"}  # later checks still read what is there


def test_architecture_and_quantization(model_folder: Callable[..., Path]):
    ctx = _ctx(model_folder())
    assert config.check_architecture(ctx).status == PASS
    assert config.check_quantization(ctx).status == PASS
    ctx = _ctx(model_folder(architectures=["FooForCausalLM"], quantization_config={"quant_method": "gptq"}))
    assert config.check_architecture(ctx).status == FAIL
    assert "the package's list of vLLM architectures" in config.check_architecture(ctx).message
    assert "quant_method gptq" in config.check_quantization(ctx).message


@pytest.mark.parametrize(("vocab", "rows", "status", "text"), [
    (4, 4, PASS, "vocab_size 4 equals the rows of model.embed_tokens.weight"),
    (6, 4, FAIL, "token ids 4..5 have no embedding"),
    (3, 4, FAIL, "vLLM's embedding loader requires them equal"),
])
def test_vocab_size_equals_the_embedding_rows(model_folder: Callable[..., Path], vocab, rows, status, text):
    folder = model_folder(vocab=rows)
    doc = json.loads((folder / "config.json").read_text())
    doc.pop("vocab_size")
    doc["text_config"] = {"vocab_size": vocab}  # nested, as multimodal configs have it
    (folder / "config.json").write_text(json.dumps(doc))
    check = config.check_vocab(_ctx(folder))
    assert check.status == status and text in check.message


@pytest.mark.parametrize(("recorded", "status"), [
    ("float32", PASS), ("fp32", PASS), ("bfloat16", WARN), (None, WARN),
])
def test_dtype_recorded_as_stored(model_folder: Callable[..., Path], recorded, status):
    check = config.check_dtype(_ctx(model_folder(torch_dtype=recorded)))
    assert check.status == status
    assert check.details == {"config": recorded, "stored": "float32"}


def test_float64_recorded_and_stored(tmp_path: Path, st_file: Callable[..., Path]):
    st_file(tmp_path / "model.safetensors", {"w": ("F64", [2], [1.0, 2.0])})
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float64"}))
    assert config.check_dtype(_ctx(tmp_path)).status == PASS


def test_config_dtype_names():
    assert str(config.config_dtype("bf16")) == "torch.bfloat16"
    assert str(config.config_dtype("float64")) == "torch.float64"
    assert config.config_dtype("nonsense") is None


def test_empty_tensors_and_no_value_scan(tmp_path: Path, st_file: Callable[..., Path]):
    st_file(tmp_path / "model.safetensors", {"w": ("F32", [0, 4], []), "b": ("F32", [1], [1.0])})
    ctx = _ctx(tmp_path)
    assert values.check_empty(ctx).status == FAIL and "1 empty tensors" in values.check_empty(ctx).message
    ctx.scan_values = False
    assert values.check_values(ctx).message == "skipped: value scan turned off"


def test_without_transformers_tied_and_tokenizer_are_skipped(model_folder: Callable[..., Path]):
    folder = model_folder()
    ctx = _ctx(folder)
    assert values.check_tied(ctx).message == "skipped: transformers not installed"
    (check,) = tokenizer.check_tokenizer(ctx)
    assert check.status == WARN and "no tokenizer files" in check.message
    (folder / "tokenizer.json").write_text("{}")
    assert [c.message for c in tokenizer.check_tokenizer(ctx)] == ["skipped: transformers not installed"] * 4
