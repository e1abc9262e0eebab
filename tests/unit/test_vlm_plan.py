"""plan.vlm on metadata alone: every known input form gives the same output names (corpus tests: tests/test_vlm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_consolidate import dtypes
from vllm_consolidate.plan import vlm
from vllm_consolidate.plan.names import output_tensors, plan_names
from vllm_consolidate.source import Segment, SourceModel, TensorSpec

LLAVA = {"model_type": "llava", "tie_word_embeddings": False}
GEMMA3 = {"model_type": "gemma3", "tie_word_embeddings": True}
QWEN2VL = {"model_type": "qwen2_vl", "tie_word_embeddings": False}

#: One tensor per part, under (training, save_pretrained, older / vLLM-style, written) names.
LLAVA_FORMS = [
    ("model.language_model.layers.0.mlp.up_proj.weight", "language_model.model.layers.0.mlp.up_proj.weight",
     "language_model.model.layers.0.mlp.up_proj.weight", "language_model.model.layers.0.mlp.up_proj.weight"),
    ("lm_head.weight", "language_model.lm_head.weight", "language_model.lm_head.weight",
     "language_model.lm_head.weight"),
    ("model.vision_tower.encoder.layers.0.mlp.fc1.weight", "vision_tower.encoder.layers.0.mlp.fc1.weight",
     "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
     "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"),
    ("model.multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.weight",
     "multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.weight"),
]
QWEN_FORMS = [
    ("model.language_model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight",
     "language_model.model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
    ("model.language_model.embed_tokens.weight", "model.embed_tokens.weight",
     "language_model.model.embed_tokens.weight", "model.embed_tokens.weight"),
    ("lm_head.weight", "lm_head.weight", "language_model.lm_head.weight", "lm_head.weight"),
    ("model.visual.blocks.0.attn.qkv.weight", "visual.blocks.0.attn.qkv.weight", "visual.blocks.0.attn.qkv.weight",
     "visual.blocks.0.attn.qkv.weight"),
    ("model.visual.merger.mlp.0.weight", "visual.merger.mlp.0.weight", "visual.merger.mlp.0.weight",
     "visual.merger.mlp.0.weight"),
]


def _spec(name: str, n: int = 4) -> TensorSpec:
    return TensorSpec(name, dtypes.float32, (n,), [Segment("/x", 0, 4 * n)])


def _source(names: list[str], aliases: dict[str, str] | None = None) -> SourceModel:
    return SourceModel("deepspeed", Path("/ckpt"), [_spec(n) for n in names], aliases=aliases or {})


@pytest.mark.parametrize(("config", "forms"), [(LLAVA, LLAVA_FORMS), (QWEN2VL, QWEN_FORMS)])
@pytest.mark.parametrize("form", [0, 1, 2])
def test_every_input_form_is_written_under_the_same_names(config, forms, form):
    out, dropped = output_tensors(_source([f[form] for f in forms]), config)
    assert [t.name for t in out] == [f[3] for f in forms] and not dropped
    assert all(vlm.written_name(config, f[form]) == f[3] for f in forms)


@pytest.mark.parametrize("head", ["lm_head.weight", "language_model.lm_head.weight"])
def test_tied_head_is_dropped_under_any_prefix(head):
    """Gemma 3 ties its head: a stored head alias is dropped whatever prefix the input gave it."""
    emb = "language_model.model.embed_tokens.weight"
    out, dropped = output_tensors(_source([emb], {head: emb}), GEMMA3)
    assert [t.name for t in out] == [emb] and dropped == ["lm_head.weight"]


def test_other_models_are_untouched():
    names = ["model.layers.0.mlp.up_proj.weight", "visual.x.weight", "vision_tower.y.weight"]
    out, _ = output_tensors(_source(names), {"model_type": "qwen2"})
    assert [t.name for t in out] == names
    assert plan_names(_source(names), {"model_type": "qwen2"}).vlm is None


@pytest.mark.parametrize(("form", "moved"), [(0, 4), (1, 0), (2, 3)])
def test_summary_counts_each_part(form, moved):
    """The parts whatever the input form; ``renamed`` counts the names written under another prefix than the
    input's (training: all but lm_head; save_pretrained's: none), and they are not wrapper renames."""
    source = _source([f[form] for f in QWEN_FORMS])
    named = plan_names(source, QWEN2VL)
    assert named.vlm.to_dict() == {"family": "qwen2_vl", "parts": {
        "vision_tower": {"tensors": 1, "parameters": 4}, "projector": {"tensors": 1, "parameters": 4},
        "language_model": {"tensors": 3, "parameters": 12}}, "renamed": moved}
    assert vlm.to_training_names(source, QWEN2VL).renamed == {}


def test_tied_head_dropped_is_not_counted_as_moved():
    emb = "model.language_model.embed_tokens.weight"
    source = SourceModel("deepspeed", Path("/ckpt"), [_spec(emb), _spec("lm_head.weight")])
    named = plan_names(source, GEMMA3)
    assert named.dropped == ["lm_head.weight"] and named.vlm.renamed == 1


@pytest.mark.parametrize(("config", "forms"), [(LLAVA, LLAVA_FORMS), (QWEN2VL, QWEN_FORMS)])
def test_training_name_of_every_form(config, forms):
    """What a LoRA merge matches adapter modules and base tensors by (plan.lora.read_base)."""
    for training, *others, _written in forms:
        for name in (training, *others):
            assert vlm.training_name(config, name) == training
    assert vlm.training_name({"model_type": "llama"}, "model.layers.0.mlp.up_proj.weight") == \
        "model.layers.0.mlp.up_proj.weight"
