"""Megatron-Core parameter names and layouts to Hugging Face ones: a pure map from keys and shapes.

Every Megatron-Core ``ShardedTensor`` is a chunk of one global tensor, so each key here is a whole
global tensor (:mod:`.megatron` assembles it from the DCP chunks). This module says, for each key,
which Hugging Face tensors it holds and where: a :class:`Pick` is a list of element ranges of the
flat global tensor whose concatenation is one output tensor. Nothing here reads a byte.

Layouts (Megatron-Core ``dist_checkpointing``, checked against its source):

* Stacked layers: a homogeneous ``TransformerBlock`` saves ``decoder.layers.<param>`` with a leading
  axis of ``num_layers`` (global layer index, across pipeline stages and virtual stages); with
  ``non_homogeneous_layers`` or singleton shards, ``decoder.layers.<N>.<param>`` per global layer.
* ``linear_qkv``: rows grouped per query group ``[q heads of the group; k; v]``, each ``head_dim`` rows
  per head. Tensor parallelism splits whole groups, so the global tensor is this layout at any TP.
* ``linear_fc1`` under SwiGLU: ``apply_swiglu_sharded_factory`` stores each rank's gate half at offset
  ``rank`` and its up half at ``rank + tp`` along the rows, so the global tensor is ``[gate; up]`` at any
  TP (with singleton shards, ``<key>_w`` is gate and ``<key>_v`` is up).
* Experts: the sequential and grouped-GEMM forms both save ``mlp.experts.linear_fc1.weight`` (0.16's
  SequentialMLP: ``mlp.experts.experts.linear_fc1.weight``) with an expert axis after the layer axis;
  singleton shards give ``mlp.experts.<e>.linear_fc1.weight`` or ``mlp.experts.linear_fc1.weight<e>``;
  older saves ``mlp.experts.local_experts.<e>.linear_fc1.weight``.
* Vocabulary: the embedding and output layer are padded to a multiple of TP x 128; the first
  ``vocab_size`` rows are the model's.

Keys that are not model weights (``_extra_state``, optimizer and RNG state) are skipped; a model key
not understood is refused by name (:class:`~vllm_consolidate.errors.UnsupportedCheckpointError`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from vllm_consolidate.errors import CorruptCheckpointError, UnsupportedCheckpointError
from vllm_consolidate.limits import brief

#: Wrapper prefixes: DDP's ``module.``, Megatron-LM's ``model.`` and per virtual stage ``model0.``...
_WRAPPER = re.compile(r"^(module\.|model\d*\.)+")
#: Non-model state Megatron-LM and NeMo save beside the weights.
_NOT_MODEL_ROOTS = ("optimizer", "optim", "rng_state", "rerun_state_machine_state", "lr_scheduler",
                    "opt_param_scheduler")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
#: ``mlp.experts.`` then, by version and form, ``experts.`` (SequentialMLP's own prefix) or ``local_experts.``.
_EXPERT = re.compile(r"^mlp\.experts\.(?:local_experts\.|experts\.)?(\d+)\.(linear_fc[12])\.(weight|bias)(_w|_v)?$")
_GROUPED = re.compile(r"^mlp\.experts\.(?:experts\.)?(linear_fc[12])\.(weight|bias)(\d+)(_w|_v)?$")
_STACKED_EXPERT = re.compile(r"^mlp\.experts\.(?:experts\.)?(linear_fc[12])\.(weight|bias)(_w|_v)?$")
#: More layers or experts than any model has; a larger leading axis is a forged shape driving a loop.
MAX_LAYERS = 4096
MAX_EXPERTS = 4096


@dataclass(frozen=True)
class Layout:
    """What the map needs to know beyond the keys: the head layout and the true vocabulary size.

    Attributes:
        heads: Attention (query) heads.
        groups: Query groups (key/value heads).
        head_dim: Rows per head in ``linear_qkv``.
        vocab_size: The tokenizer's vocabulary (rows kept of the padded embedding), None when unknown.
        mixtral: Experts are written with Mixtral's names (``block_sparse_moe.experts.N.w1``...).
    """

    heads: int
    groups: int
    head_dim: int
    vocab_size: int | None
    mixtral: bool = False


@dataclass(frozen=True)
class Pick:
    """One output tensor: its name, shape, and the element ranges ``(start, count)`` of the source key."""

    name: str
    key: str
    shape: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]


def model_name(key: str) -> str | None:
    """The key without wrapper prefixes, or None when it is not a model weight (skipped)."""
    name = _WRAPPER.sub("", key)
    root = name.split(".", 1)[0]
    if root in _NOT_MODEL_ROOTS or key.split(".", 1)[0] in _NOT_MODEL_ROOTS or name.endswith("_extra_state"):
        return None
    return name


def _rows(key: str, name: str, start: int, shape: tuple[int, ...], first: int, count: int) -> Pick:
    """Rows ``[first, first + count)`` of a tensor of ``shape`` that begins at element ``start``."""
    inner = math.prod(shape[1:])
    return Pick(name, key, (count, *shape[1:]), ((start + first * inner, count * inner),))


def _whole(key: str, name: str, start: int, shape: tuple[int, ...]) -> Pick:
    return Pick(name, key, shape, ((start, math.prod(shape)),))


def _halves(key: str, names: tuple[str, str], start: int, shape: tuple[int, ...]) -> list[Pick]:
    if not shape or shape[0] % 2:
        raise CorruptCheckpointError(f"{brief(key)} has shape {list(shape)}: a SwiGLU fc1 has an even number of rows")
    half = shape[0] // 2
    return [_rows(key, names[0], start, shape, 0, half), _rows(key, names[1], start, shape, half, half)]


def _qkv(key: str, prefix: str, start: int, shape: tuple[int, ...], layout: Layout, what: str) -> list[Pick]:
    """q/k/v from ``linear_qkv``, de-interleaved per query group (one range per group and projection)."""
    per_group = layout.heads // layout.groups
    rows = layout.groups * (per_group + 2) * layout.head_dim
    if not shape or shape[0] != rows:
        raise CorruptCheckpointError(
            f"{brief(key)} has shape {list(shape)}, but {layout.heads} heads in {layout.groups} query groups of "
            f"head_dim {layout.head_dim} make {rows} rows", hint="The checkpoint and its config disagree.")
    inner = math.prod(shape[1:])
    out = []
    for proj, skip, count in (("q", 0, per_group), ("k", per_group, 1), ("v", per_group + 1, 1)):
        ranges = tuple((start + ((g * (per_group + 2) + skip) * layout.head_dim) * inner,
                        count * layout.head_dim * inner) for g in range(layout.groups))
        out.append(Pick(f"{prefix}self_attn.{proj}_proj.{what}", key,
                        (layout.groups * count * layout.head_dim, *shape[1:]), _merge(ranges)))
    return out


def _merge(ranges: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for start, count in ranges:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + count)
        else:
            out.append((start, count))
    return tuple(out)


def _expert_names(prefix: str, e: int, layout: Layout) -> tuple[str, str, str]:
    """(gate, up, down) weight names of expert ``e``."""
    if layout.mixtral:
        return tuple(f"{prefix}block_sparse_moe.experts.{e}.{w}.weight" for w in ("w1", "w3", "w2"))  # type: ignore
    return tuple(f"{prefix}mlp.experts.{e}.{p}_proj.weight" for p in ("gate", "up", "down"))  # type: ignore


def _expert(key: str, prefix: str, e: int, fc: str, what: str, half: str | None, start: int,
            shape: tuple[int, ...], layout: Layout) -> list[Pick]:
    if what != "weight":
        raise UnsupportedCheckpointError(f"{brief(key)}: expert biases are not supported")
    gate, up, down = _expert_names(prefix, e, layout)
    if fc == "linear_fc2":
        return [_whole(key, down, start, shape)]
    if half is not None:
        return [_whole(key, gate if half == "_w" else up, start, shape)]
    return _halves(key, (gate, up), start, shape)


#: Per-layer parameters that map to one HF tensor (after ``model.layers.N.``).
_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "mlp.linear_fc1.weight_w": "mlp.gate_proj.weight",
    "mlp.linear_fc1.weight_v": "mlp.up_proj.weight",
    "mlp.router.expert_bias": "mlp.gate.e_score_correction_bias",
    "mlp.shared_experts.linear_fc2.weight": "mlp.shared_expert.down_proj.weight",
    "mlp.shared_experts.linear_fc1.weight_w": "mlp.shared_expert.gate_proj.weight",
    "mlp.shared_experts.linear_fc1.weight_v": "mlp.shared_expert.up_proj.weight",
    "mlp.shared_experts.gate_weight": "mlp.shared_expert_gate.weight",
}


def layer_picks(key: str, index: int, param: str, start: int, shape: tuple[int, ...], layout: Layout) -> list[Pick]:
    """The HF tensors of one layer's parameter ``param`` (a tensor of ``shape`` at element ``start``).

    Raises:
        UnsupportedCheckpointError: ``param`` is not a parameter this map knows.
    """
    prefix = f"model.layers.{index}."
    if param in _SIMPLE:
        return [_whole(key, prefix + _SIMPLE[param], start, shape)]
    if param in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        return _qkv(key, prefix, start, shape, layout, param.rsplit(".", 1)[1])
    if param == "mlp.linear_fc1.weight":
        return _halves(key, (prefix + "mlp.gate_proj.weight", prefix + "mlp.up_proj.weight"), start, shape)
    if param == "mlp.shared_experts.linear_fc1.weight":
        shared = prefix + "mlp.shared_expert."
        return _halves(key, (shared + "gate_proj.weight", shared + "up_proj.weight"), start, shape)
    if param == "mlp.router.weight":
        gate = "block_sparse_moe.gate.weight" if layout.mixtral else "mlp.gate.weight"
        return [_whole(key, prefix + gate, start, shape)]
    if m := _EXPERT.match(param):
        return _expert(key, prefix, int(m.group(1)), m.group(2), m.group(3), m.group(4), start, shape, layout)
    if m := _GROUPED.match(param):
        return _expert(key, prefix, int(m.group(3)), m.group(1), m.group(2), m.group(4), start, shape, layout)
    if m := _STACKED_EXPERT.match(param):
        experts = _leading(key, shape, MAX_EXPERTS, "experts")
        per = math.prod(shape[1:])
        return [p for e in range(experts) for p in _expert(key, prefix, e, m.group(1), m.group(2), m.group(3),
                                                             start + e * per, shape[1:], layout)]
    raise UnsupportedCheckpointError(
        f"the Megatron-Core parameter {brief(key)} is not one this converter understands",
        hint="Supported: GPT models (Llama, Qwen2, Qwen3, Mistral, Mixtral, Qwen2-MoE layouts). Please report the key.")


def _leading(key: str, shape: tuple[int, ...], cap: int, what: str) -> int:
    if len(shape) < 2 or not 0 < shape[0] <= cap:
        raise CorruptCheckpointError(f"{brief(key)} has shape {list(shape)}, which is not stacked {what}")
    return shape[0]


def _vocab_rows(key: str, name: str, shape: tuple[int, ...], layout: Layout) -> Pick:
    if layout.vocab_size is None:
        return _whole(key, name, 0, shape)
    if len(shape) != 2 or layout.vocab_size > shape[0]:
        raise CorruptCheckpointError(f"{brief(key)} has shape {list(shape)}, fewer rows than the vocabulary size "
                                     f"{layout.vocab_size}", hint="The checkpoint and its config disagree.")
    return _rows(key, name, 0, shape, 0, layout.vocab_size)


def picks(key: str, shape: tuple[int, ...], layout: Layout) -> list[Pick]:
    """The HF tensors held by the global tensor ``key`` (already without wrapper prefixes) of ``shape``.

    Raises:
        UnsupportedCheckpointError: The key is not understood.
        CorruptCheckpointError: Its shape does not fit the layout.
    """
    if key == "embedding.word_embeddings.weight":
        return [_vocab_rows(key, "model.embed_tokens.weight", shape, layout)]
    if key == "output_layer.weight":
        return [_vocab_rows(key, "lm_head.weight", shape, layout)]
    if key in ("decoder.final_layernorm.weight", "decoder.final_norm.weight"):
        return [_whole(key, "model.norm.weight", 0, shape)]
    if m := _LAYER.match(key):
        index = int(m.group(1))
        if index >= MAX_LAYERS:
            raise CorruptCheckpointError(f"{brief(key)} names layer {index}, more than any model has")
        return layer_picks(key, index, m.group(2), 0, shape, layout)
    if key.startswith("decoder.layers."):
        layers = _leading(key, shape, MAX_LAYERS, "layers")
        per = math.prod(shape[1:])
        param = key[len("decoder.layers."):]
        return [p for i in range(layers) for p in layer_picks(key, i, param, i * per, shape[1:], layout)]
    raise UnsupportedCheckpointError(
        f"the Megatron-Core parameter {brief(key)} is not one this converter understands",
        hint="Supported: GPT decoder models. Please report the key.")


__all__ = ["MAX_EXPERTS", "MAX_LAYERS", "Layout", "Pick", "layer_picks", "model_name", "picks"]
