"""Output names: which tensors a conversion writes, and under which names.

Pure functions of a :class:`~vllm_consolidate.source.SourceModel` and the model's ``config.json``:
tied output embeddings are dropped (as ``save_pretrained`` does), other shared names are written as
copies, MoE experts are written in the layout asked for (:mod:`vllm_consolidate.plan.moe`), and
vision-language models under the prefixes save_pretrained writes and vLLM loads (:mod:`vllm_consolidate.plan.vlm`).
Nothing here reads a tensor byte.
"""

from __future__ import annotations

from typing import NamedTuple

from vllm_consolidate.plan import vlm
from vllm_consolidate.plan.moe import MoeSummary, apply_layout
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


class NamePlan(NamedTuple):
    """What :func:`plan_names` decided: the tensors under their output names and what it found on the way.

    Attributes:
        tensors: The tensors a conversion writes, under their output names.
        dropped: Names not written (tied output embeddings).
        moe: The MoE layout written, or None for a model without experts.
        vlm: A vision-language model's parts and its prefix moves, or None for other models.
    """

    tensors: list[TensorSpec]
    dropped: list[str]
    moe: MoeSummary | None
    vlm: vlm.VlmSummary | None


def plan_names(source: SourceModel, config: dict, moe_layout: str = "auto") -> NamePlan:
    """The tensors a conversion writes, under their output names, the names it drops, the MoE layout and the
    modality parts (computed here once: the summary, ``inspect`` and the marker all take them from this).

    Args:
        source: The checkpoint, as a reader found it.
        config: The model's config.json (it decides tying and the MoE family).
        moe_layout: ``--moe-layout`` (see :mod:`vllm_consolidate.plan.moe`).
    """
    training = vlm.to_training_names(source, config)
    tensors, dropped = resolve_names(training, is_tied(config, training))
    tensors, moe = apply_layout(tensors, config, moe_layout)
    tensors, parts = vlm.to_output_names(tensors, config)
    if parts is not None:
        parts.renamed = vlm.moved_count(source, config, dropped)
    return NamePlan(tensors, dropped, moe, parts)


def output_tensors(source: SourceModel, config: dict, moe_layout: str = "auto") -> tuple[list[TensorSpec], list[str]]:
    """:func:`plan_names` without the MoE and modality summaries."""
    named = plan_names(source, config, moe_layout)
    return named.tensors, named.dropped


__all__ = ["LM_HEAD_NAMES", "NamePlan", "is_tied", "output_tensors", "plan_names", "resolve_names"]
