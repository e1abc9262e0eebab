"""``--quantize``: which weights become compressed-tensors FP8/INT8, their names, shapes and the config entry.

The anchor is llm-compressor 0.14 (compressed-tensors 0.19) running
``oneshot(model, recipe=QuantizationModifier(targets="Linear", scheme=S, ignore=["lm_head", *IGNORE]))`` and
``save_pretrained(save_compressed=True)`` on the model loaded in bf16. What that writes, read from its output
and its code (``tests/test_quantize.py`` compares ours with it byte for byte):

* every module whose class is ``Linear`` (or a subclass) is quantized unless its name is ``lm_head``, equals an
  ignore entry, or matches an ``re:`` entry (``re.match``); an ignore entry may also name a module class;
* a quantized module's ``weight`` is stored as ``int8`` (``w8a8``) or ``float8_e4m3fn`` (the FP8 schemes), in its
  own shape, and a ``weight_scale`` is added next to it in the weight's (working) dtype: one scale per output
  row, shape ``(rows, 1)``, or one per 128x128 block, shape ``(ceil(rows/128), ceil(cols/128))``; the
  symmetric zero point is not stored; biases, norms and embeddings are left as they are (cast to ``--dtype``);
* config.json gains ``quantization_config`` (:func:`quantization_config`), whose ``ignore`` lists the Linear
  modules left alone by name (not the patterns), in module order.

Which modules are Linear is decided from names and shapes (:func:`linear_modules_by_name`), so the pass imports
neither transformers nor torch (together about 350 MiB of RSS, 90% of the pass's peak on a 0.5B model): a 2-D
floating ``*.weight`` whose module is not an embedding, an MoE router or ``lm_head``; routers and ``lm_head``
(present even when tied) are listed in ``ignore``. ``tests/test_quantize_choice.py`` checks that this is
llm-compressor's own choice for every corpus architecture (dense, MoE, DeepSeek-V2, and the vision-language
families, whose vision towers it quantizes too). With ``--quantize-ignore`` the model built from config.json on
the meta device decides (:func:`linear_modules`): ``ignore`` lists the modules in the model's module order, which
a Hugging Face folder's sorted names do not give, and an entry may name a module class.

Mixture-of-experts models (the families of :mod:`vllm_consolidate.plan.moe`): transformers 5 holds their experts
as fused 3-D parameters, which ``targets="Linear"`` does not reach, so llm-compressor 0.14 first *linearizes*
each fused experts module (``llmcompressor.modeling.moe.linearize``): expert ``e`` becomes a module with three
Linear children, in the order ``up_proj``, ``gate_proj``, ``down_proj``, holding ``gate_up_proj[e]``'s halves
and ``down_proj[e]`` as they are (not transposed). So every expert projection is quantized like any Linear and
saved per expert as ``<block>.experts.{e}.{gate,up,down}_proj.weight`` (+ ``weight_scale``), Mixtral included
(not its ``w1/w3/w2``); ``--quantize`` therefore writes that layout and refuses ``--moe-layout fused``. The
routers (``mlp.gate``, class ``*TopKRouter``) are not Linear and stay in ``--dtype``, but compressed-tensors
counts a class named like a router or gate as Linear for vLLM, so they are listed in ``ignore`` (as are Linear
modules left alone), under their checkpoint names (Mixtral's ``block_sparse_moe.gate``). Qwen2-MoE's
``shared_expert_gate`` is a plain Linear and is quantized. Checked byte for byte by ``tests/test_quantize_moe.py``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.dtypes import DType
from vllm_consolidate.errors import UnsupportedCheckpointError, UsageError
from vllm_consolidate.plan.moe import FUSED, MoeFamily, checkpoint_module_name, family_of, layout_of, linearized_names
from vllm_consolidate.source import TensorSpec

#: The compressed-tensors version whose output we reproduce; written into ``quantization_config.version``.
COMPRESSED_TENSORS_VERSION = "0.19.0"
#: Modules llm-compressor's examples (and so ours) always leave alone.
ALWAYS_IGNORED = ("lm_head",)
BLOCK = 128


@dataclass(frozen=True)
class Scheme:
    """One calibration-free scheme.

    Attributes:
        name: Ours (``--quantize``): ``fp8_dynamic``, ``fp8_block`` or ``w8a8``.
        preset: llm-compressor's preset name.
        kind: ``float`` or ``int`` (compressed-tensors' ``type``).
        block: 128 for 128x128 block scales, None for one scale per output row.
    """

    name: str
    preset: str
    kind: str
    block: int | None = None

    @property
    def qdtype(self) -> DType:
        """The stored weight dtype."""
        return dtypes.int8 if self.kind == "int" else dtypes.float8_e4m3fn

    @property
    def qmin(self) -> float:
        return -128.0 if self.kind == "int" else -448.0

    @property
    def qmax(self) -> float:
        return 127.0 if self.kind == "int" else 448.0

    @property
    def format(self) -> str:
        return "int-quantized" if self.kind == "int" else "float-quantized"

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The ``weight_scale`` shape of a weight of ``shape`` (2-D)."""
        rows, cols = shape
        if self.block is None:
            return (rows, 1)
        return (math.ceil(rows / self.block), math.ceil(cols / self.block))

    def rows_per_group(self) -> int:
        """Rows that share scales: a writer's job covers a multiple of this."""
        return self.block or 1

    def quantization_config(self, ignored: list[str]) -> dict[str, Any]:
        """config.json's ``quantization_config``, field for field as llm-compressor writes it."""
        def args(**over: Any) -> dict[str, Any]:
            base = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None, "num_bits": 8,
                    "observer": None, "observer_kwargs": {}, "scale_dtype": None, "strategy": "channel",
                    "symmetric": True, "type": self.kind, "zp_dtype": None}
            base.update(over)
            return base

        if self.block is None:
            weights = args(observer="memoryless_minmax")
            activations = args(dynamic=True, strategy="token")
        else:
            weights = args(observer="memoryless_minmax", strategy="block", block_structure=[self.block, self.block])
            activations = args(dynamic=True, strategy="group", group_size=self.block)
        group = {"format": self.format, "input_activations": activations, "output_activations": None,
                 "targets": ["Linear"], "weights": weights}
        return {"config_groups": {"group_0": group}, "format": self.format, "global_compression_ratio": None,
                "ignore": list(ignored), "kv_cache_scheme": None, "quant_method": "compressed-tensors",
                "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
                "version": COMPRESSED_TENSORS_VERSION}


SCHEMES: dict[str, Scheme] = {
    "fp8_dynamic": Scheme("fp8_dynamic", "FP8_DYNAMIC", "float"),
    "fp8_block": Scheme("fp8_block", "FP8_BLOCK", "float", BLOCK),
    "w8a8": Scheme("w8a8", "W8A8", "int"),
}


def scheme_of(name: str) -> Scheme:
    """The scheme called ``name``.

    Raises:
        UsageError: No such scheme.
    """
    try:
        return SCHEMES[name]
    except KeyError:
        raise UsageError(f"unknown --quantize {name!r}", hint=f"Use one of {', '.join(SCHEMES)}.") from None


@dataclass(frozen=True)
class QuantTarget:
    """A weight to quantize as it is written.

    Attributes:
        scheme: How.
        work_dtype: The dtype the weight is cast to first (``--dtype``); the scale is stored in it.
        scale_name: The name of its ``weight_scale`` tensor (planned right after it, in the same file).
    """

    scheme: Scheme
    work_dtype: DType
    scale_name: str


@dataclass
class QuantPlan:
    """What :func:`plan_quantization` decided."""

    tensors: list[TensorSpec]  # the output tensors, each scale right after its weight
    targets: dict[str, QuantTarget] = field(default_factory=dict)  # weight name -> how
    out_dtypes: dict[str, DType] = field(default_factory=dict)  # per-tensor dtypes that override --dtype
    config: dict[str, Any] = field(default_factory=dict)  # config.json's quantization_config


def check_pattern(pattern: str) -> None:
    """Refuse an ``re:`` ignore pattern that is not a regular expression.

    Raises:
        UsageError: It does not compile.
    """
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise UsageError(f"--quantize-ignore {pattern!r} is not a regular expression: {exc}") from None


def _matches(name: str, classes: list[str], pattern: str) -> bool:
    """compressed-tensors' rule: ``re:`` + re.match on the name, else the exact name or a class name."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name or pattern in classes


def linear_modules(config: dict[str, Any], ignore: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """``(quantized, ignored)``: the Linear module names of config.json's model, split by the ignore rules.

    Names are the output's (checkpoint) names; MoE experts are counted as llm-compressor linearizes them and
    routers are listed as ignored (see the module docstring). The ignore rules see the in-memory names, as
    llm-compressor's do.

    Raises:
        UsageError: The model cannot be built from config.json.
        UnsupportedCheckpointError: It holds experts llm-compressor's linearization is not reproduced for.
    """
    model = _meta_model(config)
    family = family_of(config)
    patterns = (*ALWAYS_IGNORED, *ignore)
    quantized: list[str] = []
    ignored: list[str] = []
    for name, module in model.named_modules():
        classes = [cls.__name__ for cls in type(module).__mro__]
        if name.rsplit(".", 1)[-1] == "experts":
            modules = _linearized_experts(name, module, family)
            classes = ["Linear"]
        elif _is_router(type(module).__name__):
            ignored.append(checkpoint_module_name(name, family))
            continue
        elif "Linear" in classes:
            modules = [name]
        else:
            continue
        for m in modules:
            hit = any(_matches(m, classes, p) for p in patterns)
            (ignored if hit else quantized).append(checkpoint_module_name(m, family))
    return quantized, ignored


def _is_router(class_name: str) -> bool:
    """compressed-tensors' ``get_vllm_module_type``: a router or gate class counts as Linear for vLLM."""
    return "ExpertMLP" not in class_name and (
        "Router" in class_name or "Gating" in class_name or re.search(r"Gate(?![a-z])", class_name) is not None)


def _linearized_experts(name: str, module: Any, family: MoeFamily | None) -> list[str]:
    """The Linear modules llm-compressor's linearization makes of a fused experts module, in its module order.

    Raises:
        UnsupportedCheckpointError: Not fused experts of a family we lay out per expert, or stored transposed or
            with biases (which the linearization handles and we do not).
    """
    params = dict(module.named_parameters(recurse=False))
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    if (family is None or gate_up is None or down is None or gate_up.dim() != 3 or len(params) != 2
            or getattr(module, "is_transposed", False) or getattr(module, "has_bias", False)):
        raise UnsupportedCheckpointError(
            f"--quantize does not support the experts of this model ({name}: {type(module).__name__})",
            hint="Convert without --quantize, then quantize with llm-compressor.")
    return [f"{name}.{e}.{leaf}" for e in range(gate_up.shape[0]) for leaf in ("up_proj", "gate_proj", "down_proj")]


def _meta_model(config: dict[str, Any]) -> Any:
    import torch
    import transformers

    try:
        cfg = transformers.AutoConfig.for_model(**config)
    except Exception as exc:  # noqa: BLE001 - an unknown model_type, a bad field: the user's config
        raise UsageError(f"--quantize needs a model transformers can build from config.json "
                         f"({type(exc).__name__}: {exc})") from None
    archs = [a for a in config.get("architectures") or () if isinstance(getattr(transformers, a, None), type)]
    with torch.device("meta"):
        try:
            if archs:
                return getattr(transformers, archs[0])._from_config(cfg)
            return transformers.AutoModelForCausalLM.from_config(cfg)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"--quantize needs a model transformers can build from config.json "
                             f"({type(exc).__name__}: {exc})") from None


def plan_quantization(tensors: list[TensorSpec], config: dict[str, Any], scheme: Scheme, ignore: tuple[str, ...],
                      work_dtype: DType | None) -> QuantPlan:
    """Decide which output tensors are quantized and insert their scales.

    Args:
        tensors: The output tensors, in order (after naming and dropping tied ones).
        config: The output's config.json.
        scheme: The scheme.
        ignore: ``--quantize-ignore`` patterns (besides ``lm_head``).
        work_dtype: ``--dtype``; None keeps each weight's stored dtype.

    Raises:
        UsageError: A bad pattern, a model that cannot be built, ``--moe-layout fused``, or a weight of an
            unexpected shape.
        UnsupportedCheckpointError: Experts whose linearization is not reproduced (see :func:`linear_modules`).
    """
    for p in ignore:
        check_pattern(p)
    family = family_of(config)
    if family is not None:  # llm-compressor writes experts per expert, under its linearized names
        if layout_of([t.name for t in tensors]) == FUSED:
            raise UsageError("--quantize writes MoE experts per expert, as llm-compressor does",
                             hint="Drop --moe-layout fused.")
        tensors = linearized_names(tensors, family)
    found = linear_modules_by_name(tensors, config, ignore)
    quantized, ignored = found if found is not None else linear_modules(config, ignore)
    wanted = {f"{m}.weight" for m in quantized}
    plan = QuantPlan([], config=scheme.quantization_config(ignored))
    for spec in tensors:
        plan.tensors.append(spec)
        if spec.name not in wanted:
            continue
        if len(spec.shape) != 2 or not spec.dtype.is_floating_point:
            raise UsageError(f"cannot quantize {spec.name}: expected a 2-D floating weight, found "
                             f"{spec.dtype} {list(spec.shape)}")
        work = work_dtype or spec.dtype
        scale = TensorSpec(f"{spec.name}_scale", work, scheme.scale_shape(spec.shape), [])
        plan.targets[spec.name] = QuantTarget(scheme, work, scale.name)
        plan.out_dtypes[spec.name] = scheme.qdtype
        plan.out_dtypes[scale.name] = work
        plan.tensors.append(scale)
    return plan


#: An MoE router's weight (``mlp.gate``, Mixtral's ``block_sparse_moe.gate``): not a Linear module.
_ROUTER_WEIGHT = re.compile(r"\.(?:mlp|block_sparse_moe)\.gate\.weight$")
#: Architecture suffixes of the classes that hold an ``lm_head`` (tied or not).
_HEAD_CLASSES = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")


def _is_linear_weight(t: TensorSpec) -> bool:
    """Whether ``t`` is the weight of a module llm-compressor counts as Linear (not lm_head, not a router).

    A 2-D floating ``*.weight`` whose module is not an embedding (its name contains ``embed``), an MoE router or
    an ``lm_head``. Convolutions are 4-D or 5-D; norms, biases and bare parameters are 1-D or not ``weight``.
    """
    parts = t.name.rsplit(".", 2)
    return (len(t.shape) == 2 and t.dtype.is_floating_point and len(parts) >= 2 and parts[-1] == "weight"
            and parts[-2] != "lm_head" and "embed" not in parts[-2] and not _ROUTER_WEIGHT.search(t.name))


def modules_by_name(tensors: list[TensorSpec], config: dict[str, Any]) -> list[tuple[str, bool]]:
    """``(module, is_linear)`` from names and shapes: the Linear modules (True) and the routers (False), each
    stack's layers in numeric order, then ``lm_head`` (False) when the architecture has one (even tied, so not in
    ``tensors``).

    ``tensors`` are the output tensors (MoE experts under their linearized names).
    """
    out: list[tuple[str, bool]] = []
    head = False
    for t in tensors:
        module = t.name.removesuffix(".weight")
        if _ROUTER_WEIGHT.search(t.name):
            out.append((module, False))
        elif module.rsplit(".", 1)[-1] == "lm_head":
            head = True
        elif _is_linear_weight(t):
            out.append((module, True))
    archs = config.get("architectures") or []
    head = head or not archs or any(str(a).endswith(_HEAD_CLASSES) for a in archs)
    return _layers_in_order(out) + ([("lm_head", False)] if head else [])


_LAYER = re.compile(r"^(?P<stack>.+\.(?:layers|blocks))\.(?P<n>\d+)\.")


def _layers_in_order(modules: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """``modules`` with each stack's layers in numeric order (a Hugging Face folder lists ``layers.10`` before
    ``layers.2``), each layer's modules in their given order, at the place of the stack's first module."""
    first: dict[str, int] = {}
    keys = []
    for i, (module, _) in enumerate(modules):
        m = _LAYER.match(module)
        if m is None:
            keys.append((i, -1, i))
        else:
            keys.append((first.setdefault(m["stack"], i), int(m["n"]), i))
    return [modules[k[2]] for k in sorted(keys)]


def linear_modules_by_name(tensors: list[TensorSpec], config: dict[str, Any],
                           ignore: tuple[str, ...]) -> tuple[list[str], list[str]] | None:
    """``(quantized, ignored)`` as :func:`linear_modules` decides them, from names and shapes (no transformers).

    Returns None when there are ``ignore`` patterns: the modules they leave alone are listed in ``ignore`` in the
    model's module order, which a layer's tensors follow in a state-dict-ordered checkpoint but not in a Hugging
    Face folder (sorted by name), and an entry may name a module class; only the model transformers builds
    knows both. Without patterns, ``ignore`` is the routers, one per layer, and ``lm_head``, in layer order.
    """
    for t in tensors:
        if ".experts." in t.name and len(t.shape) > 2:  # fused experts of a family not laid out per expert
            raise UnsupportedCheckpointError(f"--quantize does not support the experts of this model ({t.name}: "
                                             f"{len(t.shape)}-D)",
                                             hint="Convert without --quantize, then quantize with llm-compressor.")
    if ignore:
        return None
    quantized: list[str] = []
    ignored: list[str] = []
    for module, linear in modules_by_name(tensors, config):
        (quantized if linear else ignored).append(module)
    return quantized, ignored


def weights_to_quantize_by_name(tensors: list[TensorSpec]) -> list[TensorSpec]:
    """The weights ``--quantize`` quantizes (no ``--quantize-ignore``), from names and shapes alone.

    The rule :func:`plan_quantization` uses (:func:`_is_linear_weight`), for ``inspect``. The same set as
    :func:`linear_modules` for every corpus architecture (``tests/test_quantize_moe.py``); a 2-D weight of
    another module class (GPT-2's ``Conv1D``) would be counted wrongly, so ``inspect`` says it is from names and
    shapes.
    """
    return [t for t in tensors if _is_linear_weight(t)]


def quantized_output(tensors: list[TensorSpec], scheme: Scheme,
                     work_dtype: DType) -> tuple[list[TensorSpec], dict[str, DType]]:
    """``(tensors with scales, per-tensor dtypes)`` of ``--quantize`` by :func:`weights_to_quantize_by_name`."""
    chosen = {t.name for t in weights_to_quantize_by_name(tensors)}
    out: list[TensorSpec] = []
    out_dtypes: dict[str, DType] = {}
    for t in tensors:
        out.append(t)
        if t.name in chosen:
            scale = TensorSpec(f"{t.name}_scale", work_dtype, scheme.scale_shape(t.shape), [])
            out_dtypes[t.name], out_dtypes[scale.name] = scheme.qdtype, work_dtype
            out.append(scale)
    return out, out_dtypes


def check_quantize_options(name: str, ignore: tuple[str, ...], fmt: str, lora: str) -> None:
    """Refuse ``--quantize`` with options it cannot go with, before anything is read.

    Raises:
        UsageError: An unknown scheme or bad ignore pattern, ``--pytorch-bin`` or ``--lora adapter``.
    """
    scheme_of(name)
    for p in ignore:
        check_pattern(p)
    if fmt != "safetensors":
        raise UsageError("--quantize writes safetensors only (compressed-tensors reads nothing else)",
                         hint="Drop --pytorch-bin.")
    if lora == "adapter":
        raise UsageError("--quantize quantizes a full model, not a LoRA adapter folder", hint="Use --lora merge.")
