"""``--quantize`` planning that needs no model: schemes, scale shapes, the config entry, option checks."""

from __future__ import annotations

import pytest

from vllm_consolidate import dtypes
from vllm_consolidate.errors import UsageError
from vllm_consolidate.plan.quantize import SCHEMES, QuantTarget, check_quantize_options, scheme_of
from vllm_consolidate.plan.shards import plan_output
from vllm_consolidate.source import Segment, TensorSpec


def test_scale_shapes() -> None:
    assert SCHEMES["w8a8"].scale_shape((203, 128)) == (203, 1)
    assert SCHEMES["fp8_dynamic"].scale_shape((64, 128)) == (64, 1)
    assert SCHEMES["fp8_block"].scale_shape((128, 203)) == (1, 2)  # a partial block has its own scale
    assert SCHEMES["fp8_block"].scale_shape((257, 128)) == (3, 1)


def test_stored_dtypes_and_ranges() -> None:
    assert SCHEMES["w8a8"].qdtype == dtypes.int8 and (SCHEMES["w8a8"].qmin, SCHEMES["w8a8"].qmax) == (-128, 127)
    assert SCHEMES["fp8_block"].qdtype == dtypes.float8_e4m3fn and SCHEMES["fp8_block"].qmax == 448


def test_quantization_config_lists_the_ignored_modules() -> None:
    qc = SCHEMES["fp8_block"].quantization_config(["model.layers.0.mlp.down_proj", "lm_head"])
    assert qc["ignore"] == ["model.layers.0.mlp.down_proj", "lm_head"]
    assert qc["format"] == "float-quantized" and qc["quant_method"] == "compressed-tensors"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights["strategy"] == "block" and weights["block_structure"] == [128, 128]
    assert SCHEMES["w8a8"].quantization_config([])["config_groups"]["group_0"]["input_activations"]["type"] == "int"


@pytest.mark.parametrize(("name", "ignore", "fmt", "lora", "needle"), [
    ("int4", (), "safetensors", "merge", "unknown --quantize"),
    ("w8a8", ("re:(",), "safetensors", "merge", "regular expression"),
    ("w8a8", (), "bin", "merge", "safetensors only"),
    ("w8a8", (), "safetensors", "adapter", "adapter"),
])
def test_refused_options(name: str, ignore: tuple[str, ...], fmt: str, lora: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        check_quantize_options(name, ignore, fmt, lora)
    check_quantize_options("w8a8", ("re:.*gate$", "model.layers.0.mlp.up_proj"), "safetensors", "merge")
    assert scheme_of("fp8_dynamic").preset == "FP8_DYNAMIC"


def test_a_scale_stays_in_its_weights_file() -> None:
    """One job writes a weight and its scale, so the planner never splits them across shards."""
    w = TensorSpec("a.weight", dtypes.bfloat16, (100, 100), [Segment("x", 0, 20000)])
    s = TensorSpec("a.weight_scale", dtypes.bfloat16, (100, 1), [])
    target = QuantTarget(SCHEMES["w8a8"], dtypes.bfloat16, s.name)
    plan = plan_output([w, s], target_dtype=dtypes.bfloat16, max_shard_size=10000,
                       out_dtypes={w.name: dtypes.int8, s.name: dtypes.bfloat16}, quant={w.name: target})
    (only,) = plan.files
    assert [t.name for t in only.tensors] == ["a.weight", "a.weight_scale"]
    assert only.tensors[0].scale is only.tensors[1] and only.tensors[0].nbytes == 10000
