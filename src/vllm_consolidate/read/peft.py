"""PEFT LoRA adapters: their ``adapter_config.json``, their tensors, and the base model they apply to.

A LoRA fine-tune leaves low-rank factors, not a model. They come from one of two places:

* the DeepSpeed ``global_stepN/`` of an HF Trainer checkpoint: the fp32 masters, under the live peft
  names (``base_model.model.<module>.lora_A.default.weight``); preferred, as they are what the
  optimizer updated (the Trainer's ``adapter_model.safetensors`` is their 16-bit copy);
* ``adapter_model.safetensors`` (or ``.bin``) of a plain peft folder, under peft's saved names
  (``base_model.model.<module>.lora_A.weight``).

:func:`read_adapter` turns either into an :class:`Adapter`: per target module its A and B factors
and scale, plus the full tensors that replace base tensors (``modules_to_save`` copies, trained
biases with ``bias="lora_only"``/``"all"``). What peft features mean for merging, and which are
refused, is in :func:`read_lora_config`.

``rank_pattern`` / ``alpha_pattern`` keys are regular expressions that peft matches against module
names (``re.match(rf"(.*\\.)?({key})$", module)``, the first key that matches). A hostile key can make
a backtracking engine run for ever, so they are checked with Python's parser (what peft refuses is
refused) and matched with RE2, whose time is linear in the name (:class:`_Patterns`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_consolidate import safe_io
from vllm_consolidate.errors import (
    CorruptCheckpointError,
    InputNotFoundError,
    UnsafeInputError,
    UnsupportedCheckpointError,
)
from vllm_consolidate.limits import brief
from vllm_consolidate.read.hf import check_weight_file, read_bin_state_dict, read_safetensors_header
from vllm_consolidate.read.zero_locate import ResolvedCheckpoint, latest_checkpoint_folder
from vllm_consolidate.source import SourceModel, TensorSpec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
#: ``adapter_config.json`` settings that change what a merge must compute, refused when set: merging
#: them as plain LoRA would be silently wrong.
_REFUSED = {
    "use_dora": "DoRA (use_dora), which rescales each merged column by a learned magnitude",
    "lora_bias": "a bias on the B factor (lora_bias)",
    "layer_replication": "layer replication (layer_replication), which duplicates base layers",
    "target_parameters": "LoRA on raw parameters (target_parameters, e.g. MoE experts)",
    "trainable_token_indices": "trainable token rows (trainable_token_indices)",
    "use_qalora": "QA-LoRA (use_qalora), which pools the input before A",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens), which applies only after its tokens",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}
#: Longest ``rank_pattern`` / ``alpha_pattern`` key (peft's are module names or short regexes).
MAX_PATTERN_CHARS = 1024
#: Pattern matches a whole adapter may need (keys x modules, each a few microseconds with RE2).
MAX_PATTERN_MATCHES = 1_000_000
#: Largest merge scale (``lora_alpha / r``) accepted: real ones are at most a few hundred; a huge one
#: overflows the merged weights to Inf.
MAX_SCALE = 1e4
_NAME = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<factor>lora_A|lora_B)(?:\.[^.]+)?\.weight|(?P<emb>lora_embedding_A|lora_embedding_B)"
    r"(?:\.[^.]+)?|modules_to_save\.[^.]+\.(?P<mts>.+)|base_layer\.(?P<base>.+))$")


def _quoted(value: Any) -> str:
    """A value from the file for a message, a string always in quotes (``bias 'none'``, not ``bias none``)."""
    text = brief(value)
    return repr(text) if isinstance(value, str) and not text.startswith(("'", '"')) else text  # brief quotes some


class _Patterns:
    """``rank_pattern`` or ``alpha_pattern``: keys in file order, each compiled for RE2, matched as peft does.

    Raises (when built):
        CorruptCheckpointError: A key is not a valid regular expression (peft would fail on it too), or too long.
        UnsupportedCheckpointError: A key uses what only a backtracking engine can match (backreferences,
            lookaround), which is never run on a checkpoint's text.
    """

    def __init__(self, field_name: str, values: dict[str, Any], path: Path):
        import re2  # google-re2; imported here, so that the vLLM plugin's venv (no-deps install) imports this module

        self.field, self.values, self.path = field_name, values, path
        options = re2.Options()
        options.log_errors = False  # RE2 would print its own parse error to stderr
        options.never_capture = True
        self.compiled = [(key, self._compile(key, options)) for key in values]

    def _compile(self, key: str, options: Any) -> Any:
        import re2

        where = f"{ADAPTER_CONFIG}: {self.field} key {_quoted(key)}"
        if len(key) > MAX_PATTERN_CHARS:
            raise CorruptCheckpointError(f"{where} is {len(key):,} characters long, more than the "
                                         f"{MAX_PATTERN_CHARS:,} a module pattern can plausibly be", path=self.path)
        text = rf"(.*\.)?({key})$"  # peft's get_pattern_key
        try:
            re.compile(text)  # parsing is bounded by the length; only matching can backtrack
        except (re.error, RecursionError, OverflowError, ValueError) as exc:
            raise CorruptCheckpointError(f"{where} is not a valid regular expression ({brief(str(exc))})",
                                         path=self.path, hint="Fix or remove the key; peft cannot load it either.") \
                from None
        try:
            return re2.compile(text, options)
        except re2.error as exc:
            why = exc.args[0] if exc.args else ""
            why = why.decode(errors="replace") if isinstance(why, bytes) else str(why)
            raise UnsupportedCheckpointError(
                f"{where} uses a regular expression feature that cannot be matched in bounded time ({brief(why)})",
                path=self.path, hint="Rewrite the key without backreferences or lookaround (list the module names).") \
                from None

    def first(self, module: str, budget: list[int]) -> Any:
        """The value of the first key matching ``module`` (peft's rule), else None; each match costs ``budget``."""
        for key, compiled in self.compiled:
            budget[0] -= 1
            if budget[0] < 0:
                raise CorruptCheckpointError(
                    f"{ADAPTER_CONFIG}: rank_pattern and alpha_pattern need more than {MAX_PATTERN_MATCHES:,} pattern "
                    "matches for this adapter's modules; refusing", path=self.path)
            if compiled.match(module) is not None:
                return self.values[key]
        return None


@dataclass(frozen=True)
class LoraConfig:
    """The settings of ``adapter_config.json`` that a merge uses."""

    path: Path
    r: int
    alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    fan_in_fan_out: bool
    bias: str
    modules_to_save: tuple[str, ...]
    base_model: str | None
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    _memo: dict[str, tuple[int, float]] = field(repr=False, compare=False, default_factory=dict)
    _compiled: list[Any] = field(repr=False, compare=False, default_factory=list)

    def _patterns(self) -> tuple[_Patterns, _Patterns, list[int]]:
        if not self._compiled:  # compiled once (read_lora_config compiles them first, to refuse a bad key early)
            self._compiled.extend([_Patterns("rank_pattern", self.rank_pattern, self.path),
                                   _Patterns("alpha_pattern", self.alpha_pattern, self.path), [MAX_PATTERN_MATCHES]])
        return self._compiled[0], self._compiled[1], self._compiled[2]

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """``(r, lora_alpha)`` of one target module, after ``rank_pattern`` / ``alpha_pattern``."""
        if module not in self._memo:
            ranks, alphas, budget = self._patterns()
            r, alpha = ranks.first(module, budget), alphas.first(module, budget)
            self._memo[module] = (self.r if r is None else r, self.alpha if alpha is None else alpha)
        return self._memo[module]

    def scale(self, module: str) -> float:
        """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (as peft computes it, a Python float).

        Raises:
            CorruptCheckpointError: The scale is not finite or implausibly large (it would overflow the merge).
        """
        r, alpha = self.rank_and_alpha(module)
        scale = alpha / math.sqrt(r) if self.use_rslora else alpha / r
        if not math.isfinite(scale) or scale > MAX_SCALE:
            raise CorruptCheckpointError(
                f"{module}: the LoRA scale lora_alpha / {'sqrt(r)' if self.use_rslora else 'r'} = {alpha:g} / {r} is "
                f"{scale:g}, more than the {MAX_SCALE:g} a real adapter uses (it would overflow the merged weights)",
                path=self.path)
        return scale


def read_verl_lora_meta(path: Path) -> LoraConfig:
    """The LoRA settings verl records beside a LoRA run's rank files (``lora_train_meta.json``).

    verl records only ``r`` and ``lora_alpha`` (its LoRA has no rsLoRA, patterns or DoRA); the factor
    shapes are checked against ``r`` when the adapter is read.
    """
    raw = safe_io.read_json(path, what=path.name)
    if not isinstance(raw, dict) or type(raw.get("r")) is not int or type(raw.get("lora_alpha")) not in (int, float) \
            or raw["r"] <= 0 or raw["lora_alpha"] <= 0:
        raise CorruptCheckpointError(f"{path.name} does not hold a positive integer r and lora_alpha", path=path)
    return LoraConfig(path, raw["r"], float(raw["lora_alpha"]), False, {}, {}, False, "none", (), None, raw)


def check_config_file(path: Path) -> None:
    """``adapter_config.json`` must be a regular file whose resolved path lies inside the folder it was found in
    (in the HF cache, inside its ``models--*`` folder), as any asset (README "Safety").

    Raises:
        UnsafeInputError: It is a link out of its folder.
        CorruptCheckpointError: It is not a regular file (a FIFO, device, socket or folder).
    """
    folder = path.parent
    if not os.path.lexists(path):
        raise CorruptCheckpointError(f"{ADAPTER_CONFIG} is missing", path=path,
                                     hint="Copy the adapter's adapter_config.json next to its weights.")
    if not safe_io.confined(path, [safe_io.trust_root(folder)]):
        raise UnsafeInputError(
            f"{ADAPTER_CONFIG} resolves to {os.path.realpath(path)}, outside its folder {folder}; refusing to read it",
            path=path, hint="Copy the real adapter_config.json into the adapter folder (a link out of it is never "
            "followed).")
    if not safe_io.is_regular_file(path):
        raise CorruptCheckpointError(
            f"{ADAPTER_CONFIG} is not a regular file (a FIFO, device, socket, folder or broken link); refusing to "
            "read it",
            path=path, hint="Replace it with the adapter's real adapter_config.json.")


def read_lora_config(path: Path) -> LoraConfig:
    """Read and check ``adapter_config.json``.

    Raises:
        UnsupportedCheckpointError: Not a LoRA adapter, or one using a feature listed in ``_REFUSED``.
        CorruptCheckpointError: A field has the wrong type.
    """
    check_config_file(path)
    raw = safe_io.read_json(path, what=ADAPTER_CONFIG)
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(f"{ADAPTER_CONFIG} is not a JSON object", path=path)
    kind = raw.get("peft_type", "LORA")
    if type(kind) is not str:
        raise CorruptCheckpointError(f"peft_type is {brief(kind)}, not the name of a peft method such as 'LORA'",
                                     path=path)
    if kind != "LORA":
        article = "an" if kind[:1].upper() in "AEIOU" else "a"
        raise UnsupportedCheckpointError(f"this is {article} {brief(kind)} adapter; only LoRA adapters can be merged",
                                         path=path, hint="Merge it with peft's merge_and_unload, then convert that.")
    for key, what in _REFUSED.items():
        if raw.get(key) not in (None, False, {}, [], 0):
            raise UnsupportedCheckpointError(
                f"this adapter uses {what}, which is not supported: merging it as plain LoRA would be wrong, "
                "and vLLM does not serve it as an adapter",
                path=path, hint="Merge it with peft's merge_and_unload on the base model, then convert that.")

    def number(key: str, default: Any, integer: bool = False) -> Any:
        value = raw.get(key, default)
        if not _positive(value, integer):
            raise CorruptCheckpointError(f"{key} is {_quoted(value)}, not a positive "
                                         f"{'integer' if integer else 'finite number'}", path=path)
        return value

    def mapping(key: str, integer: bool) -> dict[str, Any]:
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            raise CorruptCheckpointError(f"{key} is {brief(value)}, not a mapping of module names to numbers",
                                         path=path)
        for name, number_ in value.items():
            if not _positive(number_, integer):
                raise CorruptCheckpointError(f"{key} gives {_quoted(name)} {_quoted(number_)}, not a positive "
                                             f"{'integer' if integer else 'finite number'}", path=path)
        return value

    bias = raw.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise CorruptCheckpointError(f"bias is {_quoted(bias)}, not one of 'none', 'all', 'lora_only'", path=path)
    mts = raw.get("modules_to_save") or []
    if not isinstance(mts, list) or not all(type(m) is str and m for m in mts):
        raise CorruptCheckpointError(f"modules_to_save is {brief(mts)}, not a list of module names", path=path)
    base = raw.get("base_model_name_or_path")
    config = LoraConfig(path, number("r", 8, integer=True), float(number("lora_alpha", 8)),
                        bool(raw.get("use_rslora")), mapping("rank_pattern", True), mapping("alpha_pattern", False),
                        bool(raw.get("fan_in_fan_out")), bias, tuple(mts), base if type(base) is str else None, raw)
    config._patterns()  # a bad pattern key is refused here, before any tensor is read
    return config


def _positive(value: Any, integer: bool) -> bool:
    """A positive int (``integer``: never ``4.5`` nor ``True``), or a positive finite int or float."""
    if type(value) is int:  # a 400-digit int would not even convert to float
        return 0 < value and value.bit_length() <= 64
    return not integer and type(value) is float and value > 0 and math.isfinite(value)


@dataclass(frozen=True)
class LoraModule:
    """One target module's factors: ``delta = B @ A * scale`` (transposed for embeddings and Conv1D)."""

    module: str
    a: TensorSpec
    b: TensorSpec
    scale: float
    embedding: bool


@dataclass
class Adapter:
    """A LoRA adapter ready to merge.

    Attributes:
        config: Its ``adapter_config.json``.
        modules: Target modules by base module name (``model.layers.0.self_attn.q_proj``).
        replacements: Full tensors that replace base tensors, by base tensor name.
        source: Where the tensors were read, for the summary.
    """

    config: LoraConfig
    modules: dict[str, LoraModule]
    replacements: dict[str, TensorSpec]
    source: str


def _strip(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def read_adapter(config: LoraConfig, tensors: list[TensorSpec], source: str, where: Path) -> Adapter:
    """Sort an adapter's tensors (either naming scheme) into factors and replacements, and check them.

    Raises:
        CorruptCheckpointError: A factor is missing, or its rank disagrees with the config.
        UnsupportedCheckpointError: A tensor is neither a LoRA factor nor a replacement.
    """
    factors: dict[str, dict[str, TensorSpec]] = {}
    embedding: set[str] = set()
    replacements: dict[str, TensorSpec] = {}
    for spec in tensors:
        name = _strip(spec.name)
        m = _NAME.match(name)
        if m and (m["factor"] or m["emb"]):
            kind = (m["factor"] or m["emb"])[-1]
            factors.setdefault(m["module"], {})[kind] = spec
            if m["emb"]:
                embedding.add(m["module"])
        elif m and m["mts"]:
            replacements[f"{m['module']}.{m['mts']}"] = spec
        elif m and m["base"]:  # a trained bias (bias="lora_only"/"all"), or peft's copy of a resized embedding
            replacements[f"{m['module']}.{m['base']}"] = spec
        elif any(name == f"{mod}.weight" or name.startswith(f"{mod}.") for mod in config.modules_to_save) or (
                config.bias != "none" and name.endswith(".bias")):
            replacements[name] = spec  # peft's saved names for modules_to_save copies and biases
        else:
            raise UnsupportedCheckpointError(f"the adapter holds {brief(spec.name)}, which is not a LoRA factor, a "
                                             "modules_to_save copy or a bias", path=where)
    modules = {}
    for module, parts in factors.items():
        if set(parts) != {"A", "B"}:
            raise CorruptCheckpointError(f"the adapter has lora_{''.join(parts)} but not both factors for {module}",
                                         path=where)
        a, b = parts["A"], parts["B"]
        r, _ = config.rank_and_alpha(module)
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1] or a.shape[0] != r:
            raise CorruptCheckpointError(
                f"{module}: factors of shapes {a.shape} and {b.shape} do not have the rank {r} that "
                f"{ADAPTER_CONFIG} gives it", path=where)
        modules[module] = LoraModule(module, a, b, config.scale(module), module in embedding)
    if not modules and not replacements:
        raise CorruptCheckpointError("the adapter holds no LoRA tensors", path=where)
    return Adapter(config, modules, replacements, source)


def is_peft_folder(path: Path) -> bool:
    """True if ``path`` holds ``adapter_config.json`` and an adapter weights file."""
    # lexists, not is_file: a FIFO or an outside link is refused by name when read, not taken for "no adapter"
    return os.path.lexists(path / ADAPTER_CONFIG) and any(os.path.lexists(path / f) for f in ADAPTER_FILES)


def resolve_peft(path: Path) -> ResolvedCheckpoint:
    """A peft adapter folder: the folder itself, or a run's latest ``checkpoint-N`` holding one.

    Raises:
        InputNotFoundError: No adapter here.
    """
    if is_peft_folder(path):
        return ResolvedCheckpoint(path, path.name, "peft adapter folder")
    ckpt = latest_checkpoint_folder(path)
    if ckpt is not None and is_peft_folder(ckpt):
        return ResolvedCheckpoint(ckpt, ckpt.name, f"peft adapter in the latest {ckpt.name}")
    raise InputNotFoundError("no peft adapter (adapter_config.json + adapter_model.*) here", path=path)


def read_peft_folder(folder: Path, root: Path | None = None) -> SourceModel:
    """The adapter's own tensors (``adapter_model.safetensors``, else ``.bin``), from metadata only."""
    roots = [Path(root) if root is not None else folder]
    for name in ADAPTER_FILES:
        path = folder / name
        if os.path.lexists(path):
            check_weight_file(path, roots)
            pairs = read_safetensors_header(path) if name.endswith(".safetensors") else read_bin_state_dict(path)[0]
            specs = [spec for _, spec in pairs]
            dtypes_seen = sorted({s.dtype.name for s in specs})
            return SourceModel(kind="peft", path=folder, tensors=specs,
                               info={"type": "peft", "adapter_file": name, "adapter_dtype": ", ".join(dtypes_seen)})
    raise InputNotFoundError("no adapter_model.safetensors or adapter_model.bin", path=folder)


def find_adapter_config(folders: list[Path]) -> Path | None:
    """The nearest ``adapter_config.json`` in ``folders`` (nearest first), whatever it is: reading it checks it
    (:func:`check_config_file`)."""
    return next((f / ADAPTER_CONFIG for f in folders if os.path.lexists(f / ADAPTER_CONFIG)), None)


__all__ = ["ADAPTER_CONFIG", "ADAPTER_FILES", "Adapter", "LoraConfig", "LoraModule", "check_config_file",
           "find_adapter_config", "is_peft_folder", "read_adapter", "read_lora_config", "read_peft_folder",
           "read_verl_lora_meta", "resolve_peft"]
