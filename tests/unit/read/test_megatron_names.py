"""The Megatron-Core name map (:mod:`vllm_consolidate.read.megatron_names`), checked on bytes.

Each test builds Hugging Face tensors, lays them out the way Megatron-Core's ``dist_checkpointing``
stores the global tensor (written here independently, with torch: q/k/v interleaved per query group,
``[gate; up]``, a stacked layer or expert axis, padded vocabulary), writes that tensor's bytes to a
file, and checks that the byte ranges the map picks read back each HF tensor bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vllm_consolidate.dtypes import BY_NAME
from vllm_consolidate.errors import CorruptCheckpointError, UnsupportedCheckpointError
from vllm_consolidate.read.megatron import _segments
from vllm_consolidate.read.megatron_names import Layout, model_name, picks
from vllm_consolidate.source import Segment, TensorSpec

H, HEADS, GROUPS, HD, V, VP, FFN, E = 16, 4, 2, 8, 10, 16, 12, 3
LAYOUT = Layout(HEADS, GROUPS, HD, V)


def _read(picked: list, tensor: torch.Tensor, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Each pick's bytes, read from a file holding ``tensor``'s bytes, as a tensor of its shape."""
    path = tmp_path / "global.bin"
    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    path.write_bytes(raw)
    spec = TensorSpec("g", BY_NAME[str(tensor.dtype).removeprefix("torch.")], tuple(tensor.shape),
                      [Segment(str(path), 0, len(raw))])
    out = {}
    for p in picked:
        data = b"".join(raw[s.offset:s.offset + s.nbytes] for s in _segments(spec, p))
        out[p.name] = torch.frombuffer(bytearray(data), dtype=tensor.dtype).reshape(p.shape)
    return out


def _qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Megatron's linear_qkv: per query group, its q heads then its k head then its v head."""
    per = HEADS // GROUPS
    rest = q.shape[1:]
    return torch.cat([q.view(GROUPS, per * HD, *rest), k.view(GROUPS, HD, *rest), v.view(GROUPS, HD, *rest)],
                     dim=1).reshape(-1, *rest)


def _dense_layer(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return {"q": r(HEADS * HD, H), "k": r(GROUPS * HD, H), "v": r(GROUPS * HD, H), "qb": r(HEADS * HD),
            "kb": r(GROUPS * HD), "vb": r(GROUPS * HD), "gate": r(FFN, H), "up": r(FFN, H)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_qkv_weight_is_split_per_group_and_layer(tmp_path, dtype):
    layers = [_dense_layer(i, dtype) for i in range(3)]
    stacked = torch.stack([_qkv(t["q"], t["k"], t["v"]) for t in layers])
    got = _read(picks("decoder.layers.self_attention.linear_qkv.weight", tuple(stacked.shape), LAYOUT), stacked,
                tmp_path)
    assert len(got) == 9
    for i, t in enumerate(layers):
        for proj in "qkv":
            assert torch.equal(got[f"model.layers.{i}.self_attn.{proj}_proj.weight"], t[proj])


def test_qkv_bias_of_a_per_layer_key(tmp_path):
    t = _dense_layer(7)
    bias = _qkv(t["qb"], t["kb"], t["vb"])
    got = _read(picks("decoder.layers.5.self_attention.linear_qkv.bias", tuple(bias.shape), LAYOUT), bias, tmp_path)
    assert torch.equal(got["model.layers.5.self_attn.q_proj.bias"], t["qb"])
    assert torch.equal(got["model.layers.5.self_attn.k_proj.bias"], t["kb"])
    assert torch.equal(got["model.layers.5.self_attn.v_proj.bias"], t["vb"])


def test_a_wrong_head_layout_is_caught_by_the_shape_or_the_bytes(tmp_path):
    t = _dense_layer(1)
    fused = _qkv(t["q"], t["k"], t["v"])
    # Multi-head read of a GQA tensor: the row count cannot match.
    with pytest.raises(CorruptCheckpointError, match="query groups"):
        picks("decoder.layers.0.self_attention.linear_qkv.weight", tuple(fused.shape), Layout(HEADS + 2, HEADS + 2,
                                                                                              HD, V))
    # A plain [q; k; v] split of the interleaved tensor gives other q rows: de-interleaving is what makes it right.
    got = _read(picks("decoder.layers.0.self_attention.linear_qkv.weight", tuple(fused.shape), LAYOUT), fused,
                tmp_path)
    assert not torch.equal(fused[: HEADS * HD], t["q"])
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], t["q"])


def test_fc1_is_gate_then_up_at_any_tp(tmp_path):
    """The global fc1 is [gate; up] whatever the TP (apply_swiglu_sharded_factory places the halves so)."""
    layers = [_dense_layer(i) for i in range(2)]
    stacked = torch.stack([torch.cat([t["gate"], t["up"]]) for t in layers])
    got = _read(picks("decoder.layers.mlp.linear_fc1.weight", tuple(stacked.shape), LAYOUT), stacked, tmp_path)
    for i, t in enumerate(layers):
        assert torch.equal(got[f"model.layers.{i}.mlp.gate_proj.weight"], t["gate"])
        assert torch.equal(got[f"model.layers.{i}.mlp.up_proj.weight"], t["up"])


@pytest.mark.parametrize("key", ["embedding.word_embeddings.weight", "output_layer.weight"])
def test_vocab_padding_is_trimmed(tmp_path, key):
    table = torch.randn(VP, H)
    got = _read(picks(key, (VP, H), LAYOUT), table, tmp_path)
    (name, value), = got.items()
    assert name == ("model.embed_tokens.weight" if key.startswith("embedding") else "lm_head.weight")
    assert torch.equal(value, table[:V])
    with pytest.raises(CorruptCheckpointError, match="fewer rows than the vocabulary"):
        picks(key, (V - 1, H), LAYOUT)


def _experts(seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"gate": torch.randn(FFN, H, generator=g), "up": torch.randn(FFN, H, generator=g),
             "down": torch.randn(H, FFN, generator=g)} for _ in range(E)]


@pytest.mark.parametrize("prefix", ["decoder.layers.mlp.experts.", "decoder.layers.mlp.experts.experts."])
@pytest.mark.parametrize("mixtral", [False, True])
def test_stacked_experts_of_stacked_layers(tmp_path, mixtral, prefix):
    layers = [_experts(i) for i in range(2)]
    fc1 = torch.stack([torch.stack([torch.cat([x["gate"], x["up"]]) for x in ex]) for ex in layers])
    fc2 = torch.stack([torch.stack([x["down"] for x in ex]) for ex in layers])
    layout = Layout(HEADS, GROUPS, HD, V, mixtral=mixtral)
    got = _read(picks(prefix + "linear_fc1.weight", tuple(fc1.shape), layout), fc1, tmp_path)
    got.update(_read(picks(prefix + "linear_fc2.weight", tuple(fc2.shape), layout), fc2, tmp_path))
    assert len(got) == 2 * E * 3
    for i, ex in enumerate(layers):
        for e, x in enumerate(ex):
            if mixtral:
                base = f"model.layers.{i}.block_sparse_moe.experts.{e}."
                names = {"gate": base + "w1.weight", "up": base + "w3.weight", "down": base + "w2.weight"}
            else:
                base = f"model.layers.{i}.mlp.experts.{e}."
                names = {p: f"{base}{p}_proj.weight" for p in ("gate", "up", "down")}
            for part, name in names.items():
                assert torch.equal(got[name], x[part]), name


@pytest.mark.parametrize("key", ["decoder.layers.1.mlp.experts.2.linear_fc1.weight",
                                 "decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight",
                                 "decoder.layers.1.mlp.experts.experts.2.linear_fc1.weight",
                                 "decoder.layers.1.mlp.experts.linear_fc1.weight2"])
def test_per_expert_forms(tmp_path, key):
    x = _experts(3)[2]
    fc1 = torch.cat([x["gate"], x["up"]])
    got = _read(picks(key, tuple(fc1.shape), LAYOUT), fc1, tmp_path)
    assert torch.equal(got["model.layers.1.mlp.experts.2.gate_proj.weight"], x["gate"])
    assert torch.equal(got["model.layers.1.mlp.experts.2.up_proj.weight"], x["up"])


def test_singleton_swiglu_halves_and_shared_experts(tmp_path):
    x = _experts(4)[0]
    got = _read(picks("decoder.layers.0.mlp.linear_fc1.weight_w", (FFN, H), LAYOUT), x["gate"], tmp_path)
    assert torch.equal(got["model.layers.0.mlp.gate_proj.weight"], x["gate"])
    got = _read(picks("decoder.layers.0.mlp.linear_fc1.weight_v", (FFN, H), LAYOUT), x["up"], tmp_path)
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], x["up"])
    shared = torch.cat([x["gate"], x["up"]])
    got = _read(picks("decoder.layers.0.mlp.shared_experts.linear_fc1.weight", tuple(shared.shape), LAYOUT), shared,
                tmp_path)
    assert torch.equal(got["model.layers.0.mlp.shared_expert.gate_proj.weight"], x["gate"])
    assert torch.equal(got["model.layers.0.mlp.shared_expert.up_proj.weight"], x["up"])


@pytest.mark.parametrize(("key", "name"), [
    ("decoder.layers.self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    ("decoder.layers.input_layernorm.weight", "input_layernorm.weight"),
    ("decoder.layers.pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
    ("decoder.layers.mlp.linear_fc1.layer_norm_weight", "post_attention_layernorm.weight"),
    ("decoder.layers.self_attention.q_layernorm.weight", "self_attn.q_norm.weight"),
    ("decoder.layers.self_attention.k_layernorm.weight", "self_attn.k_norm.weight"),
])
def test_norms_of_stacked_layers(tmp_path, key, name):
    norms = torch.randn(3, H)
    got = _read(picks(key, (3, H), LAYOUT), norms, tmp_path)
    assert [got[f"model.layers.{i}.{name}"].tolist() for i in range(3)] == norms.tolist()


def test_not_model_state_is_skipped_and_wrappers_stripped():
    assert model_name("optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight") is None
    assert model_name("decoder.layers.self_attention.linear_proj._extra_state") is None
    assert model_name("rng_state") is None
    assert model_name("model0.decoder.final_layernorm.weight") == "decoder.final_layernorm.weight"
    assert model_name("module.output_layer.weight") == "output_layer.weight"


@pytest.mark.parametrize("key", ["decoder.layers.self_attention.linear_proj.bias", "vision_model.patch.weight",
                                 "decoder.layers.3.mlp.mystery.weight"])
def test_an_unknown_key_is_refused_by_name(key):
    with pytest.raises(UnsupportedCheckpointError) as err:
        picks(key, (2, H, H), LAYOUT)
    assert key in err.value.message


def test_forged_leading_axes_are_bounded():
    with pytest.raises(CorruptCheckpointError, match="not stacked layers"):
        picks("decoder.layers.input_layernorm.weight", (10**9, H), LAYOUT)
    with pytest.raises(CorruptCheckpointError, match="more than any model"):
        picks("decoder.layers.99999.input_layernorm.weight", (H,), LAYOUT)
    with pytest.raises(CorruptCheckpointError, match="not stacked experts"):
        picks("decoder.layers.mlp.experts.linear_fc2.weight", (2, 10**9, H, FFN), LAYOUT)
