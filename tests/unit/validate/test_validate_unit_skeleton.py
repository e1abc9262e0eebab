"""The skeleton's names under transformers 4, which has no reverse weight conversion (no transformers needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_consolidate.validate.skeleton import _revert_key_mapping

#: ``_checkpoint_conversion_mapping`` of transformers 4.57.6's classes (``.venv-tf4``): saved name -> in-memory name.
LLAVA = {"^language_model.model": "model.language_model", "^vision_tower": "model.vision_tower",
         "^multi_modal_projector": "model.multi_modal_projector", "^language_model.lm_head": "lm_head"}
QWEN2_5_VL = {"^visual": "model.visual", r"^model(?!\.(language_model|visual))": "model.language_model"}


@pytest.mark.parametrize(("mapping", "memory", "saved"), [
    (LLAVA, ["model.language_model.layers.0.mlp.up_proj.weight", "lm_head.weight",
             "model.vision_tower.vision_model.embeddings.patch_embedding.weight",
             "model.multi_modal_projector.linear_1.bias"],
     ["language_model.model.layers.0.mlp.up_proj.weight", "language_model.lm_head.weight",
      "vision_tower.vision_model.embeddings.patch_embedding.weight", "multi_modal_projector.linear_1.bias"]),
    (QWEN2_5_VL, ["model.language_model.embed_tokens.weight", "model.visual.merger.mlp.0.weight", "lm_head.weight"],
     ["model.embed_tokens.weight", "visual.merger.mlp.0.weight", "lm_head.weight"]),
    ({}, ["model.layers.0.self_attn.q_proj.weight"], ["model.layers.0.self_attn.q_proj.weight"]),
])
def test_transformers_4_saves_a_vlm_through_its_key_mapping_reversed(mapping, memory, saved) -> None:
    """What transformers 4's save_pretrained writes (its reversed key mapping; measured with 4.57.6 on the
    corpus' converted Qwen2-VL, Qwen2.5-VL, LLaVA and Gemma 3 folders, whose skeleton checks then pass)."""
    model = SimpleNamespace(_checkpoint_conversion_mapping=mapping)
    assert list(_revert_key_mapping(model, dict.fromkeys(memory, 0))) == saved
