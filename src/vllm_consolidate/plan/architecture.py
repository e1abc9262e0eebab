"""The model class written into the output's ``config.json``: kept, inferred, or given by ``--architecture``.

vLLM picks the model implementation by ``config.json``'s ``architectures``, and refuses a folder
without it. A config built with ``AutoConfig.for_model(...)`` (or a config class) and saved on its own
by ``config.save_pretrained`` has ``model_type`` but no ``architectures``: only a model's
``save_pretrained`` fills it in. A raw DeepSpeed engine save from a custom training loop typically
carries such a config.

Rule (see :func:`decide_architectures`):
    * ``--architecture NAME`` is used as given (it replaces what config.json says).
    * Otherwise config.json's own non-empty ``architectures`` is kept.
    * Otherwise the causal-LM class transformers itself maps ``model_type`` to
      (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) is inferred, but only when the tensors agree with a
      causal LM: they hold an output embedding (``lm_head.weight``) or the embeddings are tied
      (:func:`~vllm_consolidate.plan.names.is_tied`). A checkpoint with neither is a base model
      without a language-model head, and calling it ``...ForCausalLM`` would be a guess.
    * Anything else is a :class:`~vllm_consolidate.errors.ConfigInvalidError` (exit 8) naming
      ``--architecture``.

Cost: importing ``transformers.models.auto.modeling_auto`` imports torch (2.7-3.1 s and ~240 MiB
measured on this project's machine, transformers 5.24), while conversion otherwise never imports
torch. So the mapping is read from that module's source with :mod:`ast` instead (about 30 ms,
nothing imported): it is a literal ``OrderedDict([(model_type, class_name), ...])``. If a
transformers release ever writes it differently, the module is imported after all.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_consolidate.errors import ConfigInvalidError, UsageError
from vllm_consolidate.plan.names import LM_HEAD_NAMES, is_tied
from vllm_consolidate.source import SourceModel

#: The transformers mapping ``model_type -> causal-LM class name``, and the module that defines it.
MAPPING_NAME = "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"
_MAPPING_MODULE = ("models", "auto", "modeling_auto.py")

#: Where the output's architectures came from.
FROM_CONFIG, INFERRED, FROM_OPTION = "config", "inferred", "option"

_HINT = ("Pass --architecture NAME with the model class the weights belong to (e.g. --architecture "
         "LlamaForCausalLM), or use a config.json that has 'architectures'.")
#: Ends every error's message, so that the one ``error:`` line names the way out.
_PASS_FLAG = "; pass --architecture NAME"


@dataclass(frozen=True)
class ArchitectureDecision:
    """The ``architectures`` the output's config.json gets, and why.

    Attributes:
        architectures: The value written (a one-element list unless config.json listed more).
        source: ``config`` (kept as found), ``inferred`` (from ``model_type``) or ``option``
            (``--architecture``).
        model_type: config.json's ``model_type`` (None when absent).
        replaced: config.json's own ``architectures`` when ``--architecture`` replaced different ones.
    """

    architectures: tuple[str, ...]
    source: str
    model_type: str | None = None
    replaced: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether the output's config.json differs from the input's in ``architectures``."""
        return self.source != FROM_CONFIG and self.architectures != self.replaced

    def describe(self) -> str | None:
        """One line for the summary, or None when config.json's value was kept as it was."""
        names = ", ".join(self.architectures)
        if self.source == INFERRED:
            return f"inferred {names} from model_type {self.model_type}"
        if self.source == FROM_OPTION:
            was = f" (config.json had {', '.join(self.replaced)})" if self.replaced and self.changed else ""
            return f"{names} from --architecture{was}"
        return None

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` record."""
        return {"architectures": list(self.architectures), "source": self.source, "model_type": self.model_type,
                "replaced": list(self.replaced), "message": self.describe()}


def _statement(source: str) -> str:
    """The mapping's assignment alone (from its line to the first line that is a bare ``)``), else the whole
    source: parsing 120 kB of modeling_auto took 20 ms of every conversion's start, the statement 1 ms."""
    start = source.find(f"\n{MAPPING_NAME} = ")
    end = source.find("\n)\n", start)
    return source[start + 1:end + 2] if start >= 0 and end >= 0 else source


def _literal_mapping(source: str) -> dict[str, str] | None:
    """``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` from modeling_auto's source text, or None if not a plain literal."""
    try:
        body = ast.parse(_statement(source)).body
    except SyntaxError:  # the cut did not give a whole statement: parse it all
        body = ast.parse(source).body
    for node in body:
        if not (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == MAPPING_NAME
                                                     for t in node.targets)):
            continue
        call = node.value
        if not (isinstance(call, ast.Call) and len(call.args) == 1 and not call.keywords):
            return None
        pairs = ast.literal_eval(call.args[0])
        out: dict[str, str] = {}
        for model_type, cls in pairs:
            # A tuple of classes has appeared in other transformers mappings; the first is the default.
            out[model_type] = cls[0] if isinstance(cls, (tuple, list)) else cls
        return out
    return None


@functools.lru_cache(maxsize=1)
def causal_lm_classes() -> Mapping[str, str]:
    """transformers' ``model_type -> causal-LM class`` mapping, read without importing torch when possible.

    Raises:
        ModuleNotFoundError: transformers is not installed.
    """
    spec = importlib.util.find_spec("transformers")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("transformers is not installed")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*_MAPPING_MODULE)
    try:
        found = _literal_mapping(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, TypeError):
        found = None
    if found:
        return found
    # The literal moved or changed shape: import it (this imports torch; see the module docstring).
    from transformers.models.auto import modeling_auto

    return dict(getattr(modeling_auto, MAPPING_NAME))


def _has_output_head(source: SourceModel) -> bool:
    names = {t.name for t in source.tensors} | set(source.aliases)
    return any(name in names for name in LM_HEAD_NAMES)


def _infer(config: dict, source: SourceModel, model_type: str | None) -> ArchitectureDecision:
    """Infer the causal-LM class of ``model_type`` and confirm it against the tensors (see the module rule)."""
    if not isinstance(model_type, str) or not model_type:
        raise ConfigInvalidError("config.json has neither architectures nor model_type, so the model class "
                                 "cannot be inferred" + _PASS_FLAG, hint=_HINT)
    try:
        classes = causal_lm_classes()
    except ModuleNotFoundError:
        raise ConfigInvalidError(
            f"config.json has no architectures, and inferring it from model_type {model_type} needs transformers, "
            "which is not installed" + _PASS_FLAG, hint=_HINT) from None
    cls = classes.get(model_type)
    if cls is None:
        raise ConfigInvalidError(
            f"config.json has no architectures, and transformers knows no causal-LM class for model_type "
            f"{model_type!r}, so it cannot be inferred" + _PASS_FLAG, hint=_HINT)
    if not (_has_output_head(source) or is_tied(config, source)):
        raise ConfigInvalidError(
            f"config.json has no architectures, and the weights contradict {cls} (inferred from model_type "
            f"{model_type}): they hold no {' or '.join(LM_HEAD_NAMES)} and the embeddings are not tied, as in a "
            "base model without a language-model head" + _PASS_FLAG, hint=_HINT)
    return ArchitectureDecision((cls,), INFERRED, model_type)


def decide_architectures(config: dict, source: SourceModel, override: str | None = None) -> ArchitectureDecision:
    """The ``architectures`` for the output's config.json (the rule is in the module docstring).

    Args:
        config: The model's config.json (not modified).
        source: The checkpoint's tensors, to confirm an inferred class.
        override: ``--architecture``, used as given when set.

    Raises:
        UsageError: ``override`` is not a class name.
        ConfigInvalidError: No architectures, and none can be inferred and confirmed.
    """
    model_type = config.get("model_type")
    model_type = model_type if isinstance(model_type, str) else None
    found = config.get("architectures")
    found_names = tuple(str(a) for a in found) if isinstance(found, list) else ()
    if override is not None:
        if not override.isidentifier():
            raise UsageError(f"--architecture {override!r} is not a class name",
                             hint="Give the class name vLLM knows, e.g. --architecture Qwen2ForCausalLM.")
        return ArchitectureDecision((override,), FROM_OPTION, model_type, found_names)
    if found:  # kept as it is, even if malformed: validation reports a bad value, and we do not guess over it
        return ArchitectureDecision(found_names, FROM_CONFIG, model_type, found_names)
    return _infer(config, source, model_type)


__all__ = ["FROM_CONFIG", "FROM_OPTION", "INFERRED", "MAPPING_NAME", "ArchitectureDecision", "causal_lm_classes",
           "decide_architectures"]
