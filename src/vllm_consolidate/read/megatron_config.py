"""What a Megatron-Core checkpoint's names need from its model config, and the HF config.json built from args.

:func:`layout_from_config` reads the head layout and true vocabulary size from a Hugging Face
``config.json``; :func:`config_from_args` builds that ``config.json`` from Megatron-LM's ``args`` (in
``common.pt``), for a checkpoint that has no HF config beside it. The architecture follows the layout
of the checkpoint's own keys: experts with a shared expert are Qwen2-MoE (Qwen3-MoE with q/k norms),
other experts Mixtral, q/k norms Qwen3, a QKV bias Qwen2, else Llama. Nothing is guessed: a value the
args do not record, which the output needs, is a :class:`~vllm_consolidate.errors.ConfigNotFoundError`
(exit 8) naming ``--base-model-name``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vllm_consolidate.errors import ConfigNotFoundError
from vllm_consolidate.read.megatron_names import Layout

HINT_BASE = ("Pass --base-model-name with the Hugging Face model it was trained from (its config.json gives the "
             "head layout and vocabulary size), or put that config.json beside the checkpoint.")


def _int(value: Any) -> int | None:
    return value if type(value) is int and value > 0 else None


def layout_from_config(config: dict, where: Path) -> Layout:
    """The head layout and vocabulary of an HF config.json (a multimodal one's ``text_config``).

    Raises:
        ConfigNotFoundError: It does not give them.
    """
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    heads = _int(text.get("num_attention_heads"))
    hidden = _int(text.get("hidden_size"))
    groups = _int(text.get("num_key_value_heads")) or heads
    head_dim = _int(text.get("head_dim")) or (hidden // heads if heads and hidden else None)
    vocab = _int(text.get("vocab_size"))
    if not (heads and groups and head_dim and vocab) or heads % groups:
        raise ConfigNotFoundError(
            f"config.json gives no usable head layout and vocabulary size (num_attention_heads {heads}, "
            f"num_key_value_heads {groups}, head_dim {head_dim}, vocab_size {vocab})", path=where, hint=HINT_BASE)
    return Layout(heads, groups, head_dim, vocab, mixtral=text.get("model_type") == "mixtral")


def architecture_of(names: set[str]) -> tuple[str, str]:
    """``(model_type, architecture)`` from the layout of the checkpoint's keys (wrapper prefixes removed)."""
    has = lambda part: any(part in n for n in names)  # noqa: E731
    if has("mlp.experts."):
        if has("mlp.shared_experts."):
            return ("qwen3_moe", "Qwen3MoeForCausalLM") if has("q_layernorm") else ("qwen2_moe", "Qwen2MoeForCausalLM")
        return "mixtral", "MixtralForCausalLM"
    if has("q_layernorm"):
        return "qwen3", "Qwen3ForCausalLM"
    if has("linear_qkv.bias"):
        return "qwen2", "Qwen2ForCausalLM"
    return "llama", "LlamaForCausalLM"


def _need(args: dict[str, Any], field: str, where: Path, source: str = "Megatron-LM's args") -> Any:
    value = args.get(field)
    if value is None or type(value) is bool:
        raise ConfigNotFoundError(f"{source} do not record {field}, which the output's config.json needs",
                                  path=where, hint=HINT_BASE)
    return value


def _moe(args: dict[str, Any], model_type: str, where: Path, source: str) -> dict[str, Any]:
    experts, topk = _need(args, "num_experts", where, source), _need(args, "moe_router_topk", where, source)
    if model_type == "mixtral":
        return {"num_local_experts": experts, "num_experts_per_tok": topk}
    return {"num_experts": experts, "num_experts_per_tok": topk, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "moe_intermediate_size": _need(args, "moe_ffn_hidden_size", where, source),
            "shared_expert_intermediate_size": _need(args, "moe_shared_expert_intermediate_size", where, source),
            "norm_topk_prob": not args.get("moe_router_pre_softmax", False)}


def args_from_run_config(model: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """Megatron-Bridge's ``run_config.yaml`` ``model`` fields (megatron-core's ``TransformerConfig`` names) as the
    Megatron-LM ``args`` fields :func:`config_from_args` reads. A field Bridge did not write is left out (or takes
    megatron-core's default: LayerNorm, no gated unit), so a missing one is refused, not guessed."""
    groups = model.get("num_query_groups")
    share = model.get("share_embeddings_and_output_weights")
    if share is None:  # the keys say it: a separate output layer is an untied head
        share = "output_layer.weight" not in names
    args = {
        "num_layers": model.get("num_layers"), "hidden_size": model.get("hidden_size"),
        "ffn_hidden_size": model.get("ffn_hidden_size"), "num_attention_heads": model.get("num_attention_heads"),
        "group_query_attention": groups is not None, "num_query_groups": groups,
        "kv_channels": model.get("kv_channels"), "vocab_size": model.get("vocab_size"),
        "normalization": model.get("normalization", "LayerNorm"),
        "swiglu": bool(model.get("gated_linear_unit")) and model.get("activation_func") == "silu",
        "seq_length": model.get("seq_length"), "rotary_base": model.get("rotary_base", 10000),
        "untie_embeddings_and_output_weights": not share,
        "num_experts": model.get("num_moe_experts"), "moe_router_topk": model.get("moe_router_topk"),
        "moe_ffn_hidden_size": model.get("moe_ffn_hidden_size"),
        "moe_shared_expert_intermediate_size": model.get("moe_shared_expert_intermediate_size"),
        "moe_router_pre_softmax": model.get("moe_router_pre_softmax", False),
    }
    if "layernorm_epsilon" in model:
        args["norm_epsilon"] = model["layernorm_epsilon"]
    return args


def _epsilon(args: dict[str, Any]) -> float:
    """The norm epsilon: Megatron-LM's ``args`` name it after megatron-core's ``TransformerConfig`` field
    (``layernorm_epsilon``, from ``--norm-epsilon``: 0.16 and 0.19 alike); ``norm_epsilon`` is the older
    Megatron-LM name (and :func:`args_from_run_config`'s). megatron-core's default when neither is recorded."""
    for name in ("norm_epsilon", "layernorm_epsilon"):
        if type(args.get(name)) is float:
            return args[name]
    return 1e-5


def _heads(args: dict[str, Any]) -> tuple[int | None, int | None, int | None, int | None]:
    """``(heads, query groups, head_dim, hidden)`` as the args give them (None where they do not)."""
    heads = _int(args.get("num_attention_heads"))
    groups = _int(args.get("num_query_groups")) if args.get("group_query_attention") else heads
    hidden = _int(args.get("hidden_size"))
    head_dim = _int(args.get("kv_channels")) or (hidden // heads if heads and hidden else None)
    return heads, groups, head_dim, hidden


def check_base_agrees(args: dict[str, Any], layout: Layout, config: dict, where: Path, source: str) -> None:
    """A base model's config.json (``layout`` read from it) describes the model the args describe: the head layout,
    width and depth the args record. The option has a default (a Hub id), which must not give its layout to
    another model whose args lack only the vocabulary size.

    Raises:
        ConfigNotFoundError: They differ (the first difference named).
    """
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    heads, groups, head_dim, hidden = _heads(args)
    pairs = (("num_attention_heads", layout.heads, heads), ("num_key_value_heads", layout.groups, groups),
             ("head_dim", layout.head_dim, head_dim), ("hidden_size", _int(text.get("hidden_size")), hidden),
             ("num_hidden_layers", _int(text.get("num_hidden_layers")), _int(args.get("num_layers"))))
    for field, base, own in pairs:
        if own is not None and base != own:
            raise ConfigNotFoundError(f"the base model's config.json describes another model than {source}: "
                                      f"{field} {base}, not {own}", path=where,
                                      hint="Pass --base-model-name with the model this checkpoint was trained from.")


def config_from_args(args: dict[str, Any], names: set[str], where: Path, source: str = "Megatron-LM's args",
                     no_vocab: str | None = None) -> tuple[Layout, dict[str, Any]]:
    """The layout and an HF config.json for a checkpoint known only by Megatron-LM's ``args`` (or Megatron-Bridge's
    run config, as :func:`args_from_run_config` maps it; ``source`` names which in errors, ``no_vocab`` why nothing
    else gave a missing vocabulary size).

    Raises:
        ConfigNotFoundError: The args lack what the layout or the config needs (the true vocabulary size,
            the head layout), or describe a model no HF architecture here matches (LayerNorm, GELU).
    """
    heads, groups, head_dim, hidden = _heads(args)
    if not (heads and groups and head_dim and hidden) or heads % groups:
        raise ConfigNotFoundError(f"{source} give no usable head layout (num_attention_heads {heads}, "
                                  f"num_query_groups {groups}, kv_channels {head_dim})", path=where, hint=HINT_BASE)
    vocab = _int(args.get("vocab_size"))
    if vocab is None:
        raise ConfigNotFoundError(f"{source} record only the padded vocabulary size, not the tokenizer's"
                                  + (f", and {no_vocab}" if no_vocab else ""), path=where, hint=HINT_BASE)
    if args.get("normalization") not in ("RMSNorm", None) or args.get("swiglu") is False:
        raise ConfigNotFoundError(f"{source} describe a {args.get('normalization')} / "
                                  f"{'SwiGLU' if args.get('swiglu') else 'non-gated'} model, which no architecture "
                                  "written from args matches", path=where, hint=HINT_BASE)
    model_type, arch = architecture_of(names)
    config: dict[str, Any] = {
        "model_type": model_type, "architectures": [arch], "hidden_size": hidden,
        "intermediate_size": _need(args, "ffn_hidden_size", where, source),
        "num_hidden_layers": _need(args, "num_layers", where, source),
        "num_attention_heads": heads, "num_key_value_heads": groups, "head_dim": head_dim, "vocab_size": vocab,
        "max_position_embeddings": args.get("max_position_embeddings") or _need(args, "seq_length", where, source),
        "rms_norm_eps": _epsilon(args), "rope_theta": args.get("rotary_base", 10000),
        "tie_word_embeddings": not args.get("untie_embeddings_and_output_weights", False), "hidden_act": "silu",
    }
    if model_type == "llama":
        config |= {"attention_bias": False, "mlp_bias": False}
    if model_type in ("mixtral", "qwen2_moe", "qwen3_moe"):
        config |= _moe(args, model_type, where, source)
    return Layout(heads, groups, head_dim, vocab, mixtral=model_type == "mixtral"), config


__all__ = ["HINT_BASE", "architecture_of", "args_from_run_config", "check_base_agrees", "config_from_args",
           "layout_from_config"]
