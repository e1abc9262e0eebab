"""MoE expert layouts: fused (transformers 5 in memory) and per expert (save_pretrained, vLLM), both ways.

transformers >= 5 holds the routed experts of the families below as two 3-D parameters per layer, so a
checkpoint taken from the training modules (ZeRO ``param_shapes``, DCP keys, verl) stores them fused::

    <layer>.mlp.experts.gate_up_proj   [E, 2F, D]   rows [0, F) of expert e: gate, rows [F, 2F): up
    <layer>.mlp.experts.down_proj      [E, D, F]

while its ``save_pretrained`` writes one 2-D weight per expert and projection (``experts.{e}.gate_proj.weight``
[F, D], ``up_proj`` [F, D], ``down_proj`` [D, F]; Mixtral: ``block_sparse_moe.experts.{e}.w1`` (gate),
``w3`` (up), ``w2`` (down), and its whole ``mlp.`` module is named ``block_sparse_moe.``, router included).
Every per-expert tensor is one contiguous run of the fused tensor's row-major bytes, so either direction
is a list of byte ranges: fused -> per expert slices (:meth:`TensorSpec.slice`), per expert -> fused
concatenates the pieces' segments. Which half is the gate, and that no piece is stored transposed, was
read from the model classes (``MixtralExperts.forward``: ``linear(x, gate_up_proj[e]).chunk(2)`` gives
gate then up) and is checked by ``tests/test_moe.py`` against ``save_pretrained`` of the installed
transformers for every family listed here.

Layouts: ``per-expert`` (what save_pretrained of transformers 5.25 writes for every family here, and
what vLLM 0.32 loads for all of them), ``fused`` (the in-memory names; transformers 5 loads them as
they are; vLLM 0.32 refuses Mixtral's and DeepSeek's), ``auto`` (= what save_pretrained writes: per-expert).
Nothing here reads a tensor byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vllm_consolidate.errors import CorruptCheckpointError, UnsupportedCheckpointError, UsageError
from vllm_consolidate.source import TensorSpec

MOE_LAYOUTS = ("auto", "per-expert", "fused")
PER_EXPERT, FUSED = "per-expert", "fused"

#: More experts than any released MoE model has by far; a larger leading dim is a forged shape.
MAX_EXPERTS = 4096


@dataclass(frozen=True)
class MoeFamily:
    """How one model family names its experts.

    Attributes:
        block: The MoE module's name in the per-expert layout (``mlp`` is its name when fused).
        leaves: The per-expert projection names (gate, up, down).
        vllm_loads_fused: Whether vLLM 0.32 loads the fused names of this family: measured for Mixtral
            (no: "no module or parameter named 'layers.0.mlp'"), Qwen2-MoE and Qwen3-MoE (yes), DeepSeek-V2
            (no: ``KeyError: 'layers.1.mlp.experts.down_proj'``; V3 is the same vLLM module); None: not measured.
    """

    block: str
    leaves: tuple[str, str, str]
    vllm_loads_fused: bool | None


#: config.json keys of the routed expert count; families alias them (transformers 5.25 saves Qwen3-MoE's
#: ``num_experts`` as ``num_local_experts``), so any of them counts, the first present one first.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")

_LEAVES = ("gate_proj", "up_proj", "down_proj")
_QWEN = MoeFamily("mlp", _LEAVES, True)
_DEEPSEEK = MoeFamily("mlp", _LEAVES, False)

#: model_type -> family; only families checked against save_pretrained (tests/test_moe.py) are listed.
FAMILIES: dict[str, MoeFamily] = {
    "mixtral": MoeFamily("block_sparse_moe", ("w1", "w3", "w2"), False),
    "qwen2_moe": _QWEN,
    "qwen3_moe": _QWEN,
    "olmoe": MoeFamily("mlp", _LEAVES, None),
    "deepseek_v2": _DEEPSEEK,
    "deepseek_v3": _DEEPSEEK,
}

_FUSED_NAME = re.compile(r"^(?P<module>.+\.layers\.\d+)\.mlp\.experts\.(?P<leaf>gate_up_proj|down_proj)$")
_LAYER_MODULE = re.compile(r"^(?P<layer>.+\.layers\.\d+)\.(?P<block>mlp|block_sparse_moe)\.(?P<rest>.+)$")
_EXPERT_NAME = re.compile(r"^(?P<module>.+\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(?P<e>\d+)\."
                          r"(?P<leaf>\w+)\.weight$")


@dataclass
class MoeSummary:
    """What the layout step found and did, for the output marker, the summary and ``inspect``."""

    family: str
    layout: str
    source_layout: str
    experts: int | None
    moe_layers: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def family_of(config: dict) -> MoeFamily | None:
    """The family of config.json's ``model_type`` (or its ``text_config``'s), or None."""
    for holder in (config, config.get("text_config") or {}):
        family = FAMILIES.get(str(holder.get("model_type")))
        if family is not None:
            return family
    return None


def expert_count(config: dict) -> int | None:
    """The routed expert count config.json declares, if it does."""
    for holder in (config, config.get("text_config") or {}):
        for key in EXPERT_COUNT_KEYS:
            if isinstance(holder.get(key), int) and not isinstance(holder.get(key), bool):
                return int(holder[key])
    return None


def layout_of(names: list[str]) -> str | None:
    """``fused``, ``per-expert``, ``mixed`` or None (no expert tensors) from tensor names alone."""
    fused = any(_FUSED_NAME.match(n) for n in names)
    per = any(_EXPERT_NAME.match(n) for n in names)
    return "mixed" if fused and per else FUSED if fused else PER_EXPERT if per else None


def apply_layout(tensors: list[TensorSpec], config: dict, layout: str = "auto") -> tuple[list[TensorSpec],
                                                                                        MoeSummary | None]:
    """The tensors in the requested expert layout, and a summary (None for a model without experts).

    Args:
        tensors: Output tensors under save_pretrained's or the in-memory names.
        config: The model's config.json.
        layout: One of :data:`MOE_LAYOUTS`.

    Raises:
        UsageError: ``layout`` is unknown, or not ``auto`` for experts of a family not listed here.
        CorruptCheckpointError: An expert tensor's shape or count disagrees with config.json.
        UnsupportedCheckpointError: An expert tensor carries a LoRA update (it cannot be cut by ranges).
    """
    if layout not in MOE_LAYOUTS:
        raise UsageError(f"unknown --moe-layout {layout}", hint=f"Use one of {', '.join(MOE_LAYOUTS)}.")
    source_layout = layout_of([t.name for t in tensors])
    family = family_of(config)
    if source_layout is None:
        return tensors, None
    if family is None:
        if layout != "auto":
            raise UsageError(f"--moe-layout {layout}: the expert layouts of model_type "
                             f"{config.get('model_type')!r} are not known to this tool",
                             hint=f"Use --moe-layout auto (names kept); known: {', '.join(sorted(FAMILIES))}.")
        return tensors, None
    target = PER_EXPERT if layout == "auto" else layout
    count = expert_count(config)
    out = _to_per_expert(tensors, family, count) if target == PER_EXPERT else _to_fused(tensors, family, count)
    layers = {m.group("layer") for t in out if (m := _LAYER_MODULE.match(t.name)) and ".experts." in t.name}
    return out, MoeSummary(str(config.get("model_type")), target, source_layout, count, len(layers))


def checkpoint_module_name(name: str, family: MoeFamily | None) -> str:
    """A module's name in the per-expert files: the in-memory ``<layer>.mlp.`` renamed to the family's block."""
    return _rename_block(name, family.block) if family is not None else name


def linearized_names(tensors: list[TensorSpec], family: MoeFamily) -> list[TensorSpec]:
    """Per-expert tensors under the names llm-compressor's linearized experts save (``--quantize``).

    llm-compressor 0.14 replaces a fused experts module by one ``gate_proj``/``up_proj``/``down_proj`` Linear per
    expert and saves them under those names in the family's block (Mixtral too:
    ``block_sparse_moe.experts.{e}.gate_proj``, which vLLM 0.32's Mixtral maps to ``w1``).
    """
    out = []
    for t in tensors:
        name = expert_leaf_renamed(t.name, family.leaves, _LEAVES)
        out.append(t if name == t.name else TensorSpec(name, t.dtype, t.shape, t.segments, t.delta))
    return out


def expert_leaf_renamed(name: str, leaves: tuple[str, str, str], to: tuple[str, str, str]) -> str:
    """A per-expert weight name with its projection renamed from ``leaves`` to ``to`` (gate, up, down); other
    names as they are. ``to=family.leaves`` undoes :func:`linearized_names` (``leaves`` = gate/up/down_proj)."""
    m = _EXPERT_NAME.match(name)
    rename = dict(zip(leaves, to, strict=True))
    if m is None or m.group("leaf") not in rename:
        return name
    return name[: m.start("leaf")] + rename[m.group("leaf")] + ".weight"


LINEARIZED_LEAVES = _LEAVES


def _check_no_delta(t: TensorSpec) -> None:
    if t.delta is not None:
        raise UnsupportedCheckpointError(
            f"{t.name} carries a LoRA update, and an expert tensor with one cannot be re-laid out by byte ranges",
            hint="Merge the adapter with the training framework, or keep the adapter separate (--lora adapter).")


def _bad(t: TensorSpec, count: int | None, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{t.name} has shape {list(t.shape)}, which is not an expert tensor of this model ({why}; "
        f"config.json: {count!r} experts)", hint="The checkpoint and config.json disagree.")


def _rename_block(name: str, block: str) -> str:
    """``<layer>.mlp.rest`` / ``<layer>.block_sparse_moe.rest`` with the MoE module named ``block``."""
    m = _LAYER_MODULE.match(name)
    return f"{m.group('layer')}.{block}.{m.group('rest')}" if m else name


def _to_per_expert(tensors: list[TensorSpec], family: MoeFamily, count: int | None) -> list[TensorSpec]:
    """Fused expert tensors sliced per expert; the MoE module renamed to save_pretrained's."""
    gate, up, down = family.leaves
    out: list[TensorSpec] = []
    for t in tensors:
        m = _FUSED_NAME.match(t.name)
        if m is None:
            out.append(TensorSpec(_rename_block(t.name, family.block), t.dtype, t.shape, t.segments, t.delta))
            continue
        _check_no_delta(t)
        if len(t.shape) != 3 or t.shape[0] > MAX_EXPERTS or (count is not None and t.shape[0] != count):
            raise _bad(t, count, "its first dimension is the expert count")
        prefix = f"{m.group('module')}.{family.block}.experts"
        experts, rows, cols = t.shape
        if m.group("leaf") == "gate_up_proj":
            if rows % 2:
                raise _bad(t, count, "gate and up rows are stacked, so their count is even")
            half = rows // 2
            for e in range(experts):
                base = e * rows * cols
                out.append(t.slice(base, (half, cols), f"{prefix}.{e}.{gate}.weight"))
                out.append(t.slice(base + half * cols, (half, cols), f"{prefix}.{e}.{up}.weight"))
        else:
            for e in range(experts):
                out.append(t.slice(e * rows * cols, (rows, cols), f"{prefix}.{e}.{down}.weight"))
    return out


def _to_fused(tensors: list[TensorSpec], family: MoeFamily, count: int | None) -> list[TensorSpec]:
    """Per-expert tensors concatenated into the fused ones (in place of each layer's first expert tensor)."""
    groups: dict[str, dict[tuple[int, str], TensorSpec]] = {}
    order: list[TensorSpec | str] = []
    for t in tensors:
        m = _EXPERT_NAME.match(t.name)
        if m is None or m.group("leaf") not in family.leaves:
            order.append(TensorSpec(_rename_block(t.name, "mlp"), t.dtype, t.shape, t.segments, t.delta))
            continue
        _check_no_delta(t)
        module = m.group("module")
        if module not in groups:
            groups[module] = {}
            order.append(module)
        groups[module][(int(m.group("e")), m.group("leaf"))] = t
    out: list[TensorSpec] = []
    for item in order:
        out.extend(_fuse_layer(item, groups[item], family, count) if isinstance(item, str) else [item])
    return out


def _fuse_layer(module: str, pieces: dict[tuple[int, str], TensorSpec], family: MoeFamily,
                count: int | None) -> list[TensorSpec]:
    """``gate_up_proj`` and ``down_proj`` of one layer from its per-expert pieces, checked for completeness."""
    gate, up, down = family.leaves
    experts = 1 + max(e for e, _ in pieces)
    first = next(iter(pieces.values()))
    if experts > MAX_EXPERTS or (count is not None and experts != count) or len(pieces) != 3 * experts:
        raise _bad(first, count, f"layer {module} stores {len(pieces)} expert tensors, not 3 for each of "
                                 f"{count if count is not None else experts} experts")
    g0, d0 = pieces[(0, gate)], pieces[(0, down)]
    want = {gate: g0.shape, up: g0.shape, down: d0.shape}
    for (e, leaf), t in pieces.items():
        if len(t.shape) != 2 or t.shape != want[leaf] or t.dtype != g0.dtype or d0.shape != want[gate][::-1]:
            raise _bad(t, count, f"expert {e}'s {leaf} differs from expert 0's gate {list(g0.shape)} / "
                                 f"down {list(d0.shape)} ({g0.dtype.name})")
    inner, hidden = g0.shape
    gate_up = [s for e in range(experts) for leaf in (gate, up) for s in pieces[(e, leaf)].segments]
    downs = [s for e in range(experts) for s in pieces[(e, down)].segments]
    prefix = f"{module}.mlp.experts"
    return [TensorSpec(f"{prefix}.gate_up_proj", g0.dtype, (experts, 2 * inner, hidden), gate_up),
            TensorSpec(f"{prefix}.down_proj", g0.dtype, (experts, hidden, inner), downs)]


__all__ = ["EXPERT_COUNT_KEYS", "FAMILIES", "FUSED", "LINEARIZED_LEAVES", "MAX_EXPERTS", "MOE_LAYOUTS", "PER_EXPERT",
           "MoeFamily", "MoeSummary", "apply_layout", "checkpoint_module_name", "expert_count", "expert_leaf_renamed",
           "family_of", "layout_of", "linearized_names"]
