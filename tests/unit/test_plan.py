"""The planner: exact file names, offsets and index from metadata alone (synthetic specs, pure logic)."""

from __future__ import annotations

import pytest

from vllm_consolidate import dtypes
from vllm_consolidate.errors import UsageError
from vllm_consolidate.plan.names import output_tensors
from vllm_consolidate.plan.shards import plan_output
from vllm_consolidate.source import Segment, SourceModel, TensorSpec


def _spec(name: str, shape: tuple[int, ...], dtype=dtypes.float32) -> TensorSpec:
    n = 1
    for s in shape:
        n *= s
    return TensorSpec(name, dtype, shape, [Segment("/src", 0, n * dtype.itemsize)])


def test_one_file_when_it_fits():
    plan = plan_output([_spec("a", (4, 4)), _spec("b", (8,))], target_dtype=None, max_shard_size=10**9)
    assert [f.filename for f in plan.files] == ["model.safetensors"]
    assert [(t.name, t.offset) for t in plan.files[0].tensors] == [("a", 0), ("b", 64)]
    assert plan.index() is None and plan.total_size == 96


def test_shards_hf_names_and_index():
    specs = [_spec(f"t{i}", (10,)) for i in range(5)]  # 40 bytes each
    plan = plan_output(specs, target_dtype=dtypes.bfloat16, max_shard_size=45)  # 20 bytes each in bf16
    assert [f.filename for f in plan.files] == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                                "model-00003-of-00003.safetensors"]
    assert plan.index_filename == "model.safetensors.index.json"
    assert plan.index() == {
        "metadata": {"total_size": 100},
        "weight_map": {"t0": "model-00001-of-00003.safetensors", "t1": "model-00001-of-00003.safetensors",
                       "t2": "model-00002-of-00003.safetensors", "t3": "model-00002-of-00003.safetensors",
                       "t4": "model-00003-of-00003.safetensors"},
    }


def test_a_tensor_larger_than_the_shard_size_gets_its_own_file():
    plan = plan_output([_spec("small", (2,)), _spec("big", (100,)), _spec("tail", (2,))], target_dtype=None,
                       max_shard_size=50, fmt="bin")
    assert [[t.name for t in f.tensors] for f in plan.files] == [["small"], ["big"], ["tail"]]
    assert plan.files[0].filename == "pytorch_model-00001-of-00003.bin"
    assert plan.index_filename == "pytorch_model.bin.index.json"


def test_only_floating_tensors_are_cast():
    plan = plan_output([_spec("w", (2,)), _spec("ids", (2,), dtypes.int64)], target_dtype=dtypes.float16,
                       max_shard_size=10**9)
    assert [t.out_dtype.name for t in plan.tensors] == ["float16", "int64"]


def test_duplicate_names_and_unknown_format_are_refused():
    with pytest.raises(UsageError):
        plan_output([_spec("a", (1,)), _spec("a", (1,))], target_dtype=None, max_shard_size=10)
    with pytest.raises(UsageError):
        plan_output([_spec("a", (1,))], target_dtype=None, max_shard_size=10, fmt="gguf")


def test_tied_lm_head_is_dropped_and_experts_unfused():
    emb = _spec("model.embed_tokens.weight", (8, 4))
    gate_up = TensorSpec("model.layers.0.mlp.experts.gate_up_proj", dtypes.float32, (2, 6, 4),
                         [Segment("/src", 1000, 2 * 6 * 4 * 4)])
    source = SourceModel("deepspeed", path=None, tensors=[emb, gate_up],  # type: ignore[arg-type]
                         aliases={"lm_head.weight": "model.embed_tokens.weight"})
    tensors, dropped = output_tensors(source, {"tie_word_embeddings": True, "model_type": "qwen2_moe"})
    assert dropped == ["lm_head.weight"]
    names = [t.name for t in tensors]
    assert names == ["model.embed_tokens.weight"] + [f"model.layers.0.mlp.experts.{e}.{p}.weight"
                                                     for e in range(2) for p in ("gate_proj", "up_proj")]
    # Expert 1's up_proj: rows 3..5 of expert 1 = element 1*24 + 3*4 = 36, 12 elements.
    up1 = tensors[-1]
    assert up1.shape == (3, 4) and up1.segments == [Segment("/src", 1000 + 36 * 4, 48)]


def test_untied_shared_names_are_written_as_copies():
    emb = _spec("model.embed_tokens.weight", (8, 4))
    source = SourceModel("deepspeed", path=None, tensors=[emb],  # type: ignore[arg-type]
                         aliases={"lm_head.weight": "model.embed_tokens.weight"})
    tensors, dropped = output_tensors(source, {"tie_word_embeddings": False})
    assert [t.name for t in tensors] == ["model.embed_tokens.weight", "lm_head.weight"] and dropped == []
    assert tensors[1].segments == emb.segments


def test_forged_expert_count_is_refused_before_looping():
    from vllm_consolidate.errors import CorruptCheckpointError

    big = TensorSpec("model.layers.0.mlp.experts.down_proj", dtypes.float32, (10**9, 1, 1), [Segment("/src", 0, 4)])
    source = SourceModel("deepspeed", path=None, tensors=[big])  # type: ignore[arg-type]
    with pytest.raises(CorruptCheckpointError, match="not an expert tensor"):
        output_tensors(source, {"model_type": "qwen2_moe"})
    ok = TensorSpec("model.layers.0.mlp.experts.down_proj", dtypes.float32, (4, 2, 2), [Segment("/src", 0, 64)])
    with pytest.raises(CorruptCheckpointError):
        output_tensors(SourceModel("deepspeed", path=None, tensors=[ok]),  # type: ignore[arg-type]
                       {"model_type": "qwen2_moe", "num_experts": 8})
