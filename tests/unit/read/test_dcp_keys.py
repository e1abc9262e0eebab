"""Which entries of a DCP checkpoint are the model: :func:`vllm_consolidate.read.dcp.model_keys` (names only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_consolidate.errors import UnsupportedCheckpointError, UsageError
from vllm_consolidate.read.dcp import model_keys

HF = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]
WHERE = Path("/x/.metadata")


def _nested(container: tuple[str, ...], names: list[str]) -> dict[str, tuple[str, ...]]:
    return {".".join((*container, n)): (*container, n) for n in names}


def _optim(root: tuple[str, ...], names: list[str]) -> dict[str, tuple[str, ...]]:
    return {".".join((*root, "state", n, "exp_avg")): (*root, "state", n, "exp_avg") for n in names}


@pytest.mark.parametrize("with_paths", [True, False])
@pytest.mark.parametrize(("container", "names", "optim_root"), [
    ((), HF + ["lm_head.weight"], ("optimizer",)),  # torchtitan-style flat keys
    ((), HF, ("optimizer",)),  # flat and tied: every key starts with "model."
    (("model",), HF + ["lm_head.weight"], ("optim",)),  # {"model": sd, "optim": osd} (Accelerate, torch docs)
    (("model",), HF, ("optim",)),  # the same, tied: keys model.model.*
    (("app", "model"), HF, ("app", "optim")),  # the torch DCP tutorial's AppState
])
def test_the_model_container_is_found(with_paths, container, names, optim_root):
    paths = {**_nested(container, names), **_optim(optim_root, names)}
    chosen, found = model_keys(list(paths), paths if with_paths else {}, None, WHERE)
    assert chosen == ".".join(container)
    assert sorted(found.values()) == sorted(names)


def test_two_models_are_ambiguous_and_model_key_picks_one():
    paths = {**_nested(("model",), HF), **_nested(("ema",), HF), **_optim(("optim",), HF)}
    with pytest.raises(UnsupportedCheckpointError) as err:
        model_keys(list(paths), paths, None, WHERE)
    assert "'ema', 'model'" in err.value.message and "--model-key" in err.value.hint
    chosen, found = model_keys(list(paths), paths, "ema", WHERE)
    assert chosen == "ema" and sorted(found) == sorted(f"ema.{n}" for n in HF)


def test_non_hf_names_are_refused_with_a_pointer():
    paths = _nested(("model",), ["tok_embeddings.weight", "layers.0.attention.wq.weight", "output.weight"])
    with pytest.raises(UnsupportedCheckpointError, match="no model weights with Hugging Face parameter names"):
        model_keys(list(paths), paths, None, WHERE)


def test_an_unknown_model_key_is_a_usage_error():
    paths = _nested(("model",), HF)
    with pytest.raises(UsageError, match="names no tensors"):
        model_keys(list(paths), paths, "ema", WHERE)
