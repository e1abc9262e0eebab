"""The Megatron corpus's ground truth: global tensors gathered from the live model, mapped to HF, checked by logits.

Used by ``megatron_train.py`` (inside ``.venv-megatron``).  This mapping is the builder's OWN, written from
megatron-core's layouts (never shared with the reader under test); what makes it the truth is
:func:`check_logits`: the transformers model loaded with it must give the live Megatron model's fp32 logits,
and a deliberately wrong mapping (gate/up swapped, k/v swapped, two query heads permuted) must not.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tests.corpus import common

#: The fixed prompt whose logits are compared.
PROMPT = "The expert layer saves a shard of the tensor weight, then the router picks two experts."
#: Megatron-LM's default ``--make-vocab-size-divisible-by`` (times TP gives the padding multiple).
VOCAB_DIVISIBLE_BY = 128
#: Logits of the HF model loaded with the truth must equal the live Megatron model's within this (fp32).
LOGITS_TOL = 1e-5
#: A wrong mapping must move some logit by more than this.
WRONG_MIN = 1e-3

HF_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}


def tokenizer() -> Any:
    """The corpus's tiny BPE tokenizer (``common.TOKENIZER_VOCAB`` tokens)."""
    return common.build_tokenizer()


def hf_config(model: dict[str, Any], dtype: torch.dtype) -> Any:
    """The transformers config of a model spec."""
    from transformers import AutoConfig

    kw: dict[str, Any] = dict(
        hidden_size=model["hidden"],
        intermediate_size=model["ffn"],
        num_hidden_layers=model["layers"],
        num_attention_heads=model["heads"],
        num_key_value_heads=model["kv_heads"],
        head_dim=model["head_dim"],
        vocab_size=model["vocab"],
        rms_norm_eps=model["eps"],
        rope_theta=float(model["rope_base"]),
        tie_word_embeddings=bool(model["tied"]),
        max_position_embeddings=256,
        bos_token_id=common.BOS_ID,
        eos_token_id=common.EOS_ID,
        pad_token_id=common.PAD_ID,
        dtype=dtype,
    )
    arch = model["arch"]
    if arch == "mixtral":
        kw.update(num_local_experts=model["experts"], num_experts_per_tok=model["topk"])
        kw["intermediate_size"] = model["moe_ffn"]
    if arch == "qwen2_moe":
        kw.update(
            num_experts=model["experts"],
            num_experts_per_tok=model["topk"],
            moe_intermediate_size=model["moe_ffn"],
            shared_expert_intermediate_size=model["shared_ffn"],
            norm_topk_prob=bool(model.get("norm_topk", True)),
            decoder_sparse_step=1,
        )
    cfg = AutoConfig.for_model(arch, **kw)
    cfg.architectures = [HF_CLASSES[arch]]
    return cfg


# --------------------------------------------------------------------------- gathering


def gather_global(sharded_sd: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """Every ``ShardedTensor``'s full global tensor, assembled on rank 0 (None elsewhere; collective).

    ``apply_factories`` first (SwiGLU's ``linear_fc1`` is a factory that saves gate and up as two chunks of one
    global tensor), then each main-replica chunk (the one that is saved) is placed at its ``global_offset``
    (stacked keys carry the layer, and for experts the expert, as leading axes: ``prepend_axis_num``).  Every
    element must be covered.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, is_main_replica

    apply_factories(sharded_sd)
    chunks = []
    for t in nested_values(sharded_sd):
        # Only the main replica of each chunk, the one dist_checkpointing.save writes.
        if isinstance(t, ShardedTensor) and is_main_replica(t.replica_id):
            assert t.flattened_range is None, t.key
            local = t.data.detach().cpu().clone().reshape((1,) * t.prepend_axis_num + tuple(t.data.shape))
            chunks.append((t.key, tuple(t.global_shape), tuple(t.global_offset), local))
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, chunks)
    if dist.get_rank() != 0:
        return None
    out: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}
    for rank_chunks in every:
        for key, shape, offset, local in rank_chunks:
            if key not in out:
                out[key] = torch.zeros(shape, dtype=local.dtype)
                seen[key] = torch.zeros(shape, dtype=torch.bool)
            where = tuple(slice(o, o + n) for o, n in zip(offset, local.shape, strict=True))
            out[key][where] = local
            seen[key][where] = True
    for key, mask in seen.items():
        assert bool(mask.all()), f"{key}: the gathered chunks do not cover the global tensor"
    return out


# --------------------------------------------------------------------------- mapping


def _layer(g: dict[str, torch.Tensor], name: str, i: int, per_layer: bool) -> torch.Tensor:
    """Layer ``i`` of a decoder parameter, from stacked (``decoder.layers.<name>``) or per-layer keys."""
    if per_layer:
        return g[f"decoder.layers.{i}.{name}"]
    return g[f"decoder.layers.{name}"][i]


def split_qkv(w: torch.Tensor, model: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's ``linear_qkv`` rows are per query group ``[q_1..q_n, k, v]`` (``head_dim`` rows each)."""
    groups, hd = model["kv_heads"], model["head_dim"]
    per = model["heads"] // groups
    tail = tuple(w.shape[1:])
    x = w.reshape(groups, per + 2, hd, *tail)
    q = x[:, :per].reshape(groups * per * hd, *tail)
    return q, x[:, per].reshape(groups * hd, *tail), x[:, per + 1].reshape(groups * hd, *tail)


def merge_singletons(g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Global tensors of a ``singleton_local_shards`` save in the layout of a default one.

    Such a save (metadata ``singleton_local_shards=True``) stores SwiGLU's ``linear_fc1`` as two tensors
    ``<key>_w`` (gate) and ``<key>_v`` (up), and each expert under its own key (``mlp.experts.<e>.<param>``; for
    the grouped-GEMM experts ``mlp.experts.experts.<e>.<param>``), layers per key (``decoder.layers.<N>.``); a
    default save has ``[gate; up]`` in one tensor and the experts stacked on a leading axis under
    ``mlp.experts.experts.<param>``. A no-op for a default save.
    """
    out = dict(g)
    for key in [k for k in out if k.endswith("_w")]:
        base = key[:-2]
        out[base] = torch.cat([out.pop(key), out.pop(base + "_v")], dim=0)
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for key in list(out):
        m = re.fullmatch(r"(.*\.mlp\.experts\.)(?:experts\.|local_experts\.)?(\d+)\.(linear_fc[12]\.weight)", key)
        if m:
            experts.setdefault(m[1] + "experts." + m[3], {})[int(m[2])] = out.pop(key)
    for key, per_expert in experts.items():
        assert sorted(per_expert) == list(range(len(per_expert))), key
        out[key] = torch.stack([per_expert[e] for e in range(len(per_expert))])
    return out


def to_hf(g: dict[str, torch.Tensor], model: dict[str, Any], per_layer: bool) -> dict[str, torch.Tensor]:
    """Map gathered Megatron global tensors to the transformers model's ``state_dict`` names."""
    g = merge_singletons(g)
    vocab = model["vocab"]
    out = {
        "model.embed_tokens.weight": g["embedding.word_embeddings.weight"][:vocab],
        "model.norm.weight": g["decoder.final_layernorm.weight"],
    }
    if not model["tied"]:
        out["lm_head.weight"] = g["output_layer.weight"][:vocab]
    for i in range(model["layers"]):
        p = f"model.layers.{i}."

        def get(name: str, i: int = i) -> torch.Tensor:
            return _layer(g, name, i, per_layer)

        out[p + "input_layernorm.weight"] = get("self_attention.linear_qkv.layer_norm_weight")
        out[p + "post_attention_layernorm.weight"] = get("mlp.linear_fc1.layer_norm_weight")
        q, k, v = split_qkv(get("self_attention.linear_qkv.weight"), model)
        out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k})
        out[p + "self_attn.v_proj.weight"] = v
        if model.get("qkv_bias"):
            q, k, v = split_qkv(get("self_attention.linear_qkv.bias"), model)
            out.update({p + "self_attn.q_proj.bias": q, p + "self_attn.k_proj.bias": k})
            out[p + "self_attn.v_proj.bias"] = v
        if model.get("qk_norm"):
            out[p + "self_attn.q_norm.weight"] = get("self_attention.q_layernorm.weight")
            out[p + "self_attn.k_norm.weight"] = get("self_attention.k_layernorm.weight")
        out[p + "self_attn.o_proj.weight"] = get("self_attention.linear_proj.weight")
        if not model.get("experts"):
            gate, up = get("mlp.linear_fc1.weight").chunk(2)
            out.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up})
            out[p + "mlp.down_proj.weight"] = get("mlp.linear_fc2.weight")
            continue
        out[p + "mlp.gate.weight"] = get("mlp.router.weight")
        # SequentialMLP (local spec) experts: [E, 2F, H] with gate rows first, then [E, H, F]; transformers 5
        # holds them fused the same way (gate_up_proj, down_proj).
        out[p + "mlp.experts.gate_up_proj"] = get("mlp.experts.experts.linear_fc1.weight")
        out[p + "mlp.experts.down_proj"] = get("mlp.experts.experts.linear_fc2.weight")
        if model.get("shared_ffn"):
            gate, up = get("mlp.shared_experts.linear_fc1.weight").chunk(2)
            s = p + "mlp.shared_expert."
            out.update({s + "gate_proj.weight": gate, s + "up_proj.weight": up})
            out[s + "down_proj.weight"] = get("mlp.shared_experts.linear_fc2.weight")
            out[p + "mlp.shared_expert_gate.weight"] = get("mlp.shared_experts.gate_weight")
    return {k: v.contiguous() for k, v in out.items()}


def wrong_mappings(sd: dict[str, torch.Tensor], model: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Three plausible mistakes a reader could make, each applied to layer 0 of a copy of ``sd``."""
    p = "model.layers.0."
    out: dict[str, dict[str, torch.Tensor]] = {}
    bad = dict(sd)
    if model.get("experts"):
        gu = sd[p + "mlp.experts.gate_up_proj"]
        bad[p + "mlp.experts.gate_up_proj"] = torch.cat(gu.chunk(2, dim=1)[::-1], dim=1)
    else:
        bad[p + "mlp.gate_proj.weight"], bad[p + "mlp.up_proj.weight"] = sd[p + "mlp.up_proj.weight"], sd[
            p + "mlp.gate_proj.weight"]
    out["swapped_gate_up"] = bad
    bad = dict(sd)
    for suffix in ("weight", "bias"):
        k, v = p + f"self_attn.k_proj.{suffix}", p + f"self_attn.v_proj.{suffix}"
        if k in sd:
            bad[k], bad[v] = sd[v], sd[k]
    out["swapped_k_v"] = bad
    bad = dict(sd)
    hd = model["head_dim"]
    for suffix in ("weight", "bias"):
        q = p + f"self_attn.q_proj.{suffix}"
        if q in sd:
            perm = torch.cat([torch.arange(hd, 2 * hd), torch.arange(hd), torch.arange(2 * hd, sd[q].shape[0])])
            bad[q] = sd[q][perm]
    out["permuted_q_heads_0_1"] = bad
    return out


# --------------------------------------------------------------------------- checking and saving


def hf_model(model: dict[str, Any], sd: dict[str, torch.Tensor], dtype: torch.dtype) -> Any:
    """The transformers model loaded with ``sd`` (strict: every parameter mapped, nothing extra)."""
    import transformers

    cfg = hf_config(model, dtype)
    cls = getattr(transformers, HF_CLASSES[model["arch"]])
    m = cls._from_config(cfg, attn_implementation="eager", dtype=dtype)
    if model.get("experts"):
        m.set_experts_implementation("eager")
    missing, unexpected = m.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if not (model["tied"] and k == "lm_head.weight")]
    assert not missing and not unexpected, (missing, unexpected)
    if model["tied"]:
        m.tie_weights()
    return m.eval()


def logits_diff(model: dict[str, Any], sd: dict[str, torch.Tensor], prompt: torch.Tensor, ref: torch.Tensor) -> float:
    """Max |HF fp32 logits - Megatron fp32 logits| over the true vocabulary."""
    m = hf_model(model, sd, torch.float32)
    with torch.no_grad():
        got = m(prompt).logits.float()
    return float((got - ref[..., : model["vocab"]]).abs().max())


def check_logits(model: dict[str, Any], sd: dict[str, torch.Tensor], prompt: torch.Tensor,
                 ref: torch.Tensor) -> dict[str, Any]:
    """The truth check: the mapping gives the live logits, and each wrong mapping visibly does not."""
    diff = logits_diff(model, sd, prompt, ref)
    wrong = {name: logits_diff(model, bad, prompt, ref) for name, bad in wrong_mappings(sd, model).items()}
    if not diff <= LOGITS_TOL:
        raise AssertionError(f"HF logits differ from the live Megatron model's by {diff:.3g} > {LOGITS_TOL}")
    caught = {name: d > WRONG_MIN for name, d in wrong.items()}
    if not all(caught.values()):
        raise AssertionError(f"a wrong mapping went unnoticed by the logits check: {wrong}")
    return {"tol": LOGITS_TOL, "max_abs_diff": diff, "wrong_min": WRONG_MIN, "wrong_mappings": wrong,
            "prompt_tokens": prompt.shape[1], "equal": True}


def save_truth(case_dir: Path, tag: str, model: dict[str, Any], sd: dict[str, torch.Tensor], dtype: torch.dtype,
               tok: Any) -> list[str]:
    """``truth/<tag>.safetensors`` = what transformers' ``save_pretrained`` writes for the model (saved dtype:
    per-expert names for MoE, no ``lm_head`` when tied); ``hf/`` = its config.json etc. plus the tokenizer.

    Returns the truth's tensor names.
    """
    import transformers
    from safetensors import safe_open

    m = hf_model(model, sd, dtype)
    tmp = case_dir / f"_hf_{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    m.save_pretrained(tmp)
    # save_pretrained may rename (Mixtral: block_sparse_moe.experts.E.w1/w2/w3) and unfuse experts; loading the
    # file back must give the verified tensors bit for bit.
    back = getattr(transformers, HF_CLASSES[model["arch"]]).from_pretrained(tmp, dtype=dtype).state_dict()
    for name, tensor in sd.items():
        assert torch.equal(back[name], tensor.to(dtype)), name
    (case_dir / "truth").mkdir(parents=True, exist_ok=True)
    dest = case_dir / "truth" / f"{tag}.safetensors"
    (tmp / "model.safetensors").replace(dest)
    hf = case_dir / "hf"
    if not hf.is_dir():
        tok.save_pretrained(tmp)
        tmp.replace(hf)
    else:
        shutil.rmtree(tmp)
    with safe_open(str(dest), "pt") as fh:
        return sorted(fh.keys())


def describe_files(folder: Path) -> dict[str, Any]:
    """Facts about a written torch_dist folder (recorded in case.json for the reader's tests)."""
    meta = json.loads((folder / "metadata.json").read_text())
    return {"files": common.list_files(folder), "metadata_json": meta}
