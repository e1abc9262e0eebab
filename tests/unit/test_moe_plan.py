"""plan.moe on metadata alone: byte ranges both ways, and every refusal (the corpus tests are in tests/test_moe.py)."""

from __future__ import annotations

import pytest

from vllm_consolidate import dtypes
from vllm_consolidate.batch.manifest import content_options
from vllm_consolidate.convert import ConvertOptions
from vllm_consolidate.errors import CorruptCheckpointError, UnsupportedCheckpointError, UsageError
from vllm_consolidate.plan.moe import apply_layout, layout_of
from vllm_consolidate.source import Delta, Segment, TensorSpec

E, F, D = 3, 2, 4  # experts, expert inner size, hidden
MIXTRAL = {"model_type": "mixtral", "num_local_experts": E}
QWEN3 = {"model_type": "qwen3_moe", "num_experts": E}


def _fused(prefix: str = "model.layers.0.mlp") -> list[TensorSpec]:
    gate_up = TensorSpec(f"{prefix}.experts.gate_up_proj", dtypes.float32, (E, 2 * F, D),
                         [Segment("/a", 0, E * 2 * F * D * 4)])
    down = TensorSpec(f"{prefix}.experts.down_proj", dtypes.float32, (E, D, F), [Segment("/b", 0, E * D * F * 4)])
    router = TensorSpec(f"{prefix}.gate.weight", dtypes.float32, (E, D), [Segment("/c", 0, E * D * 4)])
    return [router, gate_up, down]


def test_fused_to_per_expert_slices_gate_before_up_and_renames_mixtral():
    out, summary = apply_layout(_fused(), MIXTRAL)
    by = {t.name: t for t in out}
    pre = "model.layers.0.block_sparse_moe"
    assert set(by) == {f"{pre}.gate.weight"} | {f"{pre}.experts.{e}.{w}.weight" for e in range(E)
                                                 for w in ("w1", "w2", "w3")}
    row = F * D * 4  # bytes of one expert's gate (or up) block
    assert by[f"{pre}.experts.1.w1.weight"].segments == [Segment("/a", 2 * row, row)]  # expert 1: gate first
    assert by[f"{pre}.experts.1.w3.weight"].segments == [Segment("/a", 3 * row, row)]
    assert by[f"{pre}.experts.2.w2.weight"].shape == (D, F)
    assert summary.to_dict() == {"family": "mixtral", "layout": "per-expert", "source_layout": "fused",
                                 "experts": E, "moe_layers": 1}


def test_per_expert_to_fused_concatenates_the_pieces_back():
    per, _ = apply_layout(_fused(), MIXTRAL)
    back, summary = apply_layout(per, MIXTRAL, "fused")
    original = {t.name: t for t in _fused()}
    for t in back:
        want = original[t.name]
        merged = []
        for s in t.segments:  # adjacent ranges of one file read as one
            if merged and merged[-1].path == s.path and merged[-1].offset + merged[-1].nbytes == s.offset:
                merged[-1] = Segment(s.path, merged[-1].offset, merged[-1].nbytes + s.nbytes)
            else:
                merged.append(s)
        assert (t.shape, t.dtype, merged) == (want.shape, want.dtype, want.segments)
    assert summary.layout == "fused" and summary.source_layout == "per-expert"
    assert layout_of([t.name for t in back]) == "fused"


def test_auto_keeps_unknown_families_and_explicit_layouts_refuse_them():
    unknown = {"model_type": "somemoe", "num_experts": E}
    out, summary = apply_layout(_fused(), unknown)
    assert [t.name for t in out] == [t.name for t in _fused()] and summary is None
    with pytest.raises(UsageError, match="not known"):
        apply_layout(_fused(), unknown, "per-expert")
    with pytest.raises(UsageError, match="unknown --moe-layout"):
        apply_layout(_fused(), QWEN3, "stacked")


def test_expert_count_and_shape_disagreements_are_refused():
    with pytest.raises(CorruptCheckpointError, match="config.json: 8 experts"):
        apply_layout(_fused(), {"model_type": "qwen3_moe", "num_experts": 8})
    per, _ = apply_layout(_fused(), QWEN3)
    missing = [t for t in per if not t.name.endswith("experts.2.up_proj.weight")]
    with pytest.raises(CorruptCheckpointError, match="stores 8 expert tensors"):
        apply_layout(missing, QWEN3, "fused")
    wrong = [TensorSpec(t.name, t.dtype, (F, D + 1), t.segments) if t.name.endswith("1.up_proj.weight") else t
             for t in per]
    with pytest.raises(CorruptCheckpointError, match="expert 1's up_proj"):
        apply_layout(wrong, QWEN3, "fused")
    odd = [TensorSpec(t.name, t.dtype, (E, 2 * F + 1, D), t.segments) if t.name.endswith("gate_up_proj") else t
           for t in _fused()]
    with pytest.raises(CorruptCheckpointError, match="even"):
        apply_layout(odd, QWEN3)


def test_an_expert_tensor_with_a_lora_update_is_not_cut():
    tensors = _fused()
    a = TensorSpec("a", dtypes.float32, (1, D), [Segment("/d", 0, 16)])
    tensors[1].delta = Delta(a, a, 1.0, False)
    with pytest.raises(UnsupportedCheckpointError, match="LoRA"):
        apply_layout(tensors, QWEN3)


def test_moe_layout_is_an_output_option_recorded_only_when_set():
    assert "moe_layout" not in content_options(ConvertOptions())
    assert content_options(ConvertOptions(moe_layout="fused"))["moe_layout"] == "fused"
