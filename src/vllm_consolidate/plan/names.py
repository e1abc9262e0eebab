"""Output names: which tensors a conversion writes, and under which names.

Pure functions of a :class:`~vllm_consolidate.source.SourceModel` and the model's ``config.json``:
tied output embeddings are dropped (as ``save_pretrained`` does), other shared names are written as
copies, and fused MoE experts are split per expert. Nothing here reads a tensor byte.
"""

from __future__ import annotations

from vllm_consolidate.errors import CorruptCheckpointError
from vllm_consolidate.source import SourceModel, TensorSpec

#: Names an output embedding has in the architectures we write; dropped when tied.
LM_HEAD_NAMES = ("lm_head.weight", "embed_out.weight")


def is_tied(config: dict, source: SourceModel) -> bool:
    """Whether the output embedding is tied to the input embedding.

    An explicit ``tie_word_embeddings`` in config.json decides. When config.json omits it (it is
    then the model class's default), a checkpoint that stores ``lm_head.weight`` only as a shared
    alias of the embedding is tied, and one that stores it as its own tensor is not.
    """
    for holder in (config, config.get("text_config") or {}):
        if "tie_word_embeddings" in holder:
            return bool(holder["tie_word_embeddings"])
    return any(name in source.aliases for name in LM_HEAD_NAMES)


def resolve_names(source: SourceModel, tied: bool) -> tuple[list[TensorSpec], list[str]]:
    """Final tensor list: tied output embeddings dropped, other shared names written as copies."""
    tensors = list(source.tensors)
    by_name = {t.name: t for t in tensors}
    dropped = []
    if tied:
        for name in LM_HEAD_NAMES:
            if name in by_name:
                tensors.remove(by_name[name])
                dropped.append(name)
    for alias, target in source.aliases.items():
        if tied and alias in LM_HEAD_NAMES:
            dropped.append(alias)
            continue
        spec = by_name[target]
        tensors.append(TensorSpec(alias, spec.dtype, spec.shape, list(spec.segments)))
    return tensors, dropped


# transformers >= 5 holds these MoE experts fused in memory (so DeepSpeed saves them fused):
# ``experts.gate_up_proj`` [E, 2I, H] (gate rows first) and ``experts.down_proj`` [E, H, I]. Its
# save_pretrained writes them per expert (``experts.{e}.gate_proj.weight`` ...), the layout vLLM and
# transformers 4 load, so we write that too. Only model types checked against save_pretrained are listed.
FUSED_EXPERT_MODEL_TYPES = frozenset({"qwen2_moe", "qwen3_moe"})


#: More experts than any released MoE model has by far; a larger leading dim is a forged shape.
MAX_EXPERTS = 4096


def _check_experts(t: TensorSpec, num_experts: object) -> int:
    """The expert count of a fused tensor, which must match config.json and be sane (it drives a loop)."""
    experts = t.shape[0]
    if experts > MAX_EXPERTS or (isinstance(num_experts, int) and experts != num_experts) or (
            t.name.endswith("gate_up_proj") and t.shape[1] % 2):
        raise CorruptCheckpointError(
            f"{t.name} has shape {list(t.shape)}, which is not a fused expert tensor of this model "
            f"(config.json: num_experts={num_experts!r})", hint="The checkpoint and config.json disagree.")
    return experts


def unfuse_experts(tensors: list[TensorSpec], model_type: str | None, num_experts: object = None) -> list[TensorSpec]:
    """Split fused expert tensors into per-expert ones, as save_pretrained does (byte ranges only).

    Raises:
        CorruptCheckpointError: A fused tensor's expert count is not config.json's ``num_experts``.
    """
    if model_type not in FUSED_EXPERT_MODEL_TYPES:
        return tensors
    out: list[TensorSpec] = []
    for t in tensors:
        prefix, _, last = t.name.rpartition(".")
        if len(t.shape) == 3 and prefix.endswith(".experts") and last in ("gate_up_proj", "down_proj"):
            _check_experts(t, num_experts)
        if len(t.shape) == 3 and prefix.endswith(".experts") and last == "gate_up_proj":
            experts, rows, hidden = t.shape
            half = rows // 2
            for e in range(experts):
                base = e * rows * hidden
                out.append(t.slice(base, (half, hidden), f"{prefix}.{e}.gate_proj.weight"))
                out.append(t.slice(base + half * hidden, (half, hidden), f"{prefix}.{e}.up_proj.weight"))
        elif len(t.shape) == 3 and prefix.endswith(".experts") and last == "down_proj":
            experts, hidden, inner = t.shape
            for e in range(experts):
                out.append(t.slice(e * hidden * inner, (hidden, inner), f"{prefix}.{e}.down_proj.weight"))
        else:
            out.append(t)
    return out


def output_tensors(source: SourceModel, config: dict) -> tuple[list[TensorSpec], list[str]]:
    """The tensors a conversion writes, under their output names, and the names it drops.

    Args:
        source: The checkpoint, as a reader found it.
        config: The model's config.json (it decides tying and MoE expert layout).
    """
    tensors, dropped = resolve_names(source, is_tied(config, source))
    return unfuse_experts(tensors, config.get("model_type"), config.get("num_experts")), dropped




__all__ = ["FUSED_EXPERT_MODEL_TYPES", "LM_HEAD_NAMES", "is_tied", "output_tensors", "resolve_names", "unfuse_experts"]
