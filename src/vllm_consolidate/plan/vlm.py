"""Vision-language models: the key prefixes transformers' ``save_pretrained`` writes and vLLM loads.

transformers >= 5 trains these models under one set of module names and saves them under another, and a
checkpoint taken from the training modules (ZeRO ``param_shapes``, DCP keys, verl) holds the training
names. Measured with transformers 5.25 and vLLM 0.32 on the tiny corpus models (tests/test_vlm.py)::

    family        training (named_parameters)        save_pretrained writes        this tool writes
    Qwen2-VL,     model.language_model.*             model.*                      model.*
    Qwen2.5-VL    model.visual.*                     visual.*                     visual.*
                  lm_head.*                          lm_head.*                    lm_head.*
    LLaVA,        model.language_model.*             language_model.model.*       language_model.model.*
    Gemma 3       lm_head.*                          language_model.lm_head.*     language_model.lm_head.*
                  model.vision_tower.*               vision_tower.*               vision_tower.vision_model.*
                  model.multi_modal_projector.*      multi_modal_projector.*      multi_modal_projector.*

The one departure from ``save_pretrained``: vLLM 0.32 builds LLaVA's CLIP and Gemma 3's SigLIP towers
with a ``vision_model`` submodule and refuses ``vision_tower.embeddings.*``, while transformers loads
``vision_tower.vision_model.*`` too (its ``CLIPVisionModel``/``SiglipVisionModel`` prefix handling), so
the tool writes the name both load. Any of the forms above is accepted as input: names are first brought
to the training form, then to the output form, so nothing depends on which framework wrapped them.
Nothing here reads a tensor byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from vllm_consolidate.source import SourceModel, TensorSpec

_QWEN_IN = (  # any known form -> training names
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^visual\.", "model.visual."),
    (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
)
_QWEN_OUT = ((r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual."))
_LLAVA_IN = (
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^model\.vision_tower\.vision_model\.", "model.vision_tower."),
)
_LLAVA_OUT = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_tower\.", "vision_tower.vision_model."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
)


@dataclass(frozen=True)
class VlmFamily:
    """How one vision-language family names its parts.

    Attributes:
        to_training: ``(pattern, replacement)`` rules, applied in order, from every known form to the training names.
        to_output: Rules from the training names to the names written.
        parts: ``(part, training-name prefix)`` in match order; a name matching none is the language model's.
    """

    to_training: tuple[tuple[str, str], ...]
    to_output: tuple[tuple[str, str], ...]
    parts: tuple[tuple[str, str], ...]


_QWEN = VlmFamily(_QWEN_IN, _QWEN_OUT, (("projector", "model.visual.merger."), ("vision_tower", "model.visual.")))
_LLAVA = VlmFamily(_LLAVA_IN, _LLAVA_OUT, (("vision_tower", "model.vision_tower."),
                                           ("projector", "model.multi_modal_projector.")))

#: model_type -> family; only families checked against save_pretrained and vLLM (tests/test_vlm.py) are listed.
FAMILIES: dict[str, VlmFamily] = {"qwen2_vl": _QWEN, "qwen2_5_vl": _QWEN, "llava": _LLAVA, "gemma3": _LLAVA}

PARTS = ("vision_tower", "projector", "language_model")


@dataclass
class VlmSummary:
    """The modality parts of a vision-language model, for the summary and ``inspect``."""

    family: str
    parts: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Tensors written under another prefix than the input stored them under (training names moved to
    #: save_pretrained's); not a wrapper prefix lost, which ``SourceModel.renamed`` counts.
    renamed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "parts": {k: dict(v) for k, v in self.parts.items()}, "renamed": self.renamed}


def family_of(config: dict) -> VlmFamily | None:
    """The family of config.json's ``model_type``, or None (not a vision-language model listed here)."""
    return FAMILIES.get(str(config.get("model_type")))


def _apply(rules: tuple[tuple[str, str], ...], name: str) -> str:
    for pattern, repl in rules:
        name = re.sub(pattern, repl, name)
    return name


def to_training_names(source: SourceModel, config: dict) -> SourceModel:
    """``source`` with every tensor and alias under the training names (unchanged for other models).

    Done before tying is resolved, so a tied head under any VLM prefix is recognised as ``lm_head.weight``.
    The moves are not added to ``source.renamed`` (the wrapper prefixes a reader stripped): the summary
    reports them apart (:attr:`VlmSummary.renamed`, :func:`moved_count`).
    """
    family = family_of(config)
    if family is None:
        return source
    rename = {t.name: _apply(family.to_training, t.name) for t in source.tensors}
    rename.update({a: _apply(family.to_training, a) for a in source.aliases})
    rename.update({t: _apply(family.to_training, t) for t in source.aliases.values()})
    tensors = [TensorSpec(rename[t.name], t.dtype, t.shape, t.segments, t.delta) for t in source.tensors]
    aliases = {rename[a]: rename[t] for a, t in source.aliases.items() if rename[a] != rename[t]}
    return replace(source, tensors=tensors, aliases=aliases)


def moved_count(source: SourceModel, config: dict, dropped: list[str] | tuple[str, ...] = ()) -> int:
    """How many of ``source``'s written tensors (``dropped``: training names not written) get another prefix
    than the one they are stored under."""
    if family_of(config) is None:
        return 0
    skip = set(dropped)
    return sum(written_name(config, t.name) != t.name for t in source.tensors
               if training_name(config, t.name) not in skip)


def part_of(family: VlmFamily, training_name: str) -> str:
    """``vision_tower``, ``projector`` or ``language_model`` for a tensor under its training name."""
    return next((part for part, prefix in family.parts if training_name.startswith(prefix)), "language_model")


def to_output_names(tensors: list[TensorSpec], config: dict) -> tuple[list[TensorSpec], VlmSummary | None]:
    """The tensors (under training names) renamed to the written names, and the modality parts' sizes."""
    family = family_of(config)
    if family is None:
        return tensors, None
    summary = VlmSummary(str(config.get("model_type")), {p: {"tensors": 0, "parameters": 0} for p in PARTS})
    out = []
    for t in tensors:
        part = summary.parts[part_of(family, t.name)]
        part["tensors"] += 1
        part["parameters"] += t.numel
        out.append(TensorSpec(_apply(family.to_output, t.name), t.dtype, t.shape, t.segments, t.delta))
    return out, summary


def written_name(config: dict, name: str) -> str:
    """The name this tool writes for a tensor named ``name`` in any known form (unchanged for other models)."""
    family = family_of(config)
    return name if family is None else _apply(family.to_output, _apply(family.to_training, name))


def training_name(config: dict, name: str) -> str:
    """The training name of a tensor named ``name`` in any known form (unchanged for other models)."""
    family = family_of(config)
    return name if family is None else _apply(family.to_training, name)


__all__ = ["FAMILIES", "PARTS", "VlmFamily", "VlmSummary", "family_of", "moved_count", "part_of", "training_name",
           "written_name", "to_output_names", "to_training_names"]
