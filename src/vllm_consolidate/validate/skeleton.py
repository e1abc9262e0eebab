"""Weights against the architecture: the names and shapes config.json implies, built on the meta device.

vLLM does not complain about a missing ``q_proj.weight``, a missing untied ``lm_head.weight`` or a
missing ``embed_tokens.weight``: those parameters keep their uninitialised values and the model loads
with exit code 0 and produces garbage. So the stored names and shapes are compared with a skeleton:
the model class of config.json's first architecture, instantiated on the meta device (no memory, no
weights), as transformers of this interpreter builds it.

Checks: ``missing_tensors``, ``unexpected_tensors`` and ``tensor_shapes`` (plus the step that builds
the skeleton, which reports nothing itself: its failure is the ``missing_tensors`` check).

Decision: the skeleton's names are what ``save_pretrained`` writes: ``model.state_dict()`` of the meta
model (so non-persistent buffers such as rotary ``inv_freq`` are not expected), minus tied parameters
(transformers 5's ``all_tied_weights_keys``), through transformers' reverse weight conversion
(transformers 5 fuses MoE experts in memory but saves them per expert, as vLLM reads them). These are
transformers' names, not this tool's plan (plan/vlm.py): a plan that wrote one family under another's
prefixes would otherwise validate against itself, and transformers' key mapping would even load the folder.
The one intended departure is stated here apart (:data:`_DEPARTURES`: LLaVA's and Gemma 3's vision towers
under ``vision_model.``). The in-memory layout (fused MoE experts: ``--moe-layout fused``, or an unlisted MoE
family's names kept) is accepted with a warning, except for the vision-language families of plan/vlm.py,
whose in-memory names are training names this tool never writes. A tied ``lm_head.weight`` may be absent
(``tied_embeddings`` in :mod:`~vllm_consolidate.validate.values` judges a stored one). Stored names that
the model class lists in ``_keys_to_ignore_on_load_unexpected`` (or that end in ``rotary_emb.inv_freq``) are
warnings.
"""

from __future__ import annotations

import re
from types import ModuleType
from typing import Any

from vllm_consolidate.plan import vlm
from vllm_consolidate.plan.moe import expert_count, family_of
from vllm_consolidate.read.hf import StoredTensor
from vllm_consolidate.units import few
from vllm_consolidate.validate.context import Context, Shapes, Skeleton, quiet  # Skeleton re-exported
from vllm_consolidate.validate.report import FAIL, PASS, SKIPPED, WARN, Check, skipped

#: Stored names loaders ignore even when the model class does not list them.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)
#: The one place this tool's names depart from save_pretrained's on purpose (plan/vlm.py; README
#: "Vision-language models"): LLaVA's CLIP and Gemma 3's SigLIP towers are written under
#: ``vision_tower.vision_model.``, the name vLLM 0.32's tower modules have (transformers loads both).
_TOWER = (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.")
_DEPARTURES: dict[str, tuple[str, str]] = {"llava": _TOWER, "gemma3": _TOWER}


def build_skeleton(ctx: Context) -> list[Check]:
    """Build ``ctx.skeleton`` (or set ``ctx.skeleton_error``); reports no check of its own.

    Runs only with transformers and a parsed config.json.
    """
    if ctx.config is None or ctx.tf is None:
        return []
    tf = ctx.tf
    with quiet(tf):
        try:
            config = tf.AutoConfig.from_pretrained(str(ctx.folder), trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - unknown model_type, custom code, ...
            ctx.skeleton_error = skipped(
                "missing_tensors",
                f"transformers {tf.__version__} cannot read config.json ({type(exc).__name__}: {exc})",
            )
            return []
        archs = [str(a) for a in ctx.config.get("architectures") or []]
        model, errors = _meta_model(tf, config, archs[:1])
        if model is None:
            ctx.skeleton_error = Check(
                "missing_tensors", FAIL,
                f"config.json does not build a model with transformers {tf.__version__}: {'; '.join(errors)}",
            )
            return []
        ctx.skeleton = skeleton_of(model)
    return []


def _meta_model(tf: ModuleType, config: Any, archs: list[str]) -> tuple[Any, list[str]]:
    """The model of the named architecture (else AutoModelForCausalLM) on the meta device, and the errors."""
    import torch  # only here: importing torch costs seconds, and the skeleton needs transformers anyway

    errors: list[str] = []
    for arch in archs:
        try:
            cls = getattr(tf, arch)
        except Exception:  # noqa: BLE001 - not a transformers class
            continue
        if isinstance(cls, type) and issubclass(cls, tf.PreTrainedModel):
            try:
                with torch.device("meta"):
                    return cls._from_config(config), errors
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{arch}: {type(exc).__name__}: {exc}")
    try:
        with torch.device("meta"):
            return tf.AutoModelForCausalLM.from_config(config, trust_remote_code=False), errors
    except Exception as exc:  # noqa: BLE001
        errors.append(f"AutoModelForCausalLM: {type(exc).__name__}: {exc}")
    return None, errors


def skeleton_of(model: Any) -> Skeleton:
    """Names and shapes save_pretrained would write for ``model`` (on the meta device).

    The names are transformers' own (its reverse weight conversion), never this tool's plan: a folder the plan
    wrote under another family's naming must not pass because the skeleton was renamed by the same plan. The
    one naming this tool writes on purpose elsewhere is :data:`_DEPARTURES`' (a vision tower's ``vision_model.``).
    """
    state = dict(model.state_dict())
    for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
        state.pop(key, None)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    if not tied and getattr(model.config, "tie_word_embeddings", False):
        legacy = getattr(model, "_tied_weights_keys", None) or {}
        tied = dict(legacy) if isinstance(legacy, dict) else {k: "" for k in legacy}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: names are saved as in memory, a VLM's through its key mapping
        revert_weight_conversion = _revert_key_mapping
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
        untied = remove_tied_weights_from_state_dict(dict(state), model)
    except ImportError:
        untied = {k: v for k, v in state.items() if k not in tied}
    model_type = str(getattr(model.config, "model_type", None))
    departure = _DEPARTURES.get(model_type)

    def written(name: str) -> str:
        return name if departure is None else re.sub(*departure, name)

    def out(shapes: dict[str, Any]) -> Shapes:
        return {written(k): tuple(v.shape) for k, v in shapes.items()}

    def saved(name: str) -> str:  # one in-memory name as save_pretrained writes it (a renaming, not a fusion)
        if name not in state:
            return name
        names = list(revert_weight_conversion(model, {name: state[name]}))
        return written(names[0] if len(names) == 1 else name)

    required = out(revert_weight_conversion(model, untied))
    allowed = {**out(revert_weight_conversion(model, dict(state))), **required}
    memory_required, memory_allowed = out(untied), out(state)
    # A vision-language model's in-memory names are its training names, which this tool never writes
    # (plan/vlm.py): only save_pretrained's names are accepted. Elsewhere the in-memory layout is the fused MoE
    # layout (--moe-layout fused, or an unlisted MoE family's names kept), accepted with a warning.
    same = memory_required == required or vlm.family_of({"model_type": model_type}) is not None
    embedding = None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        embedding = next((f"{n}.weight" for n, m in model.named_modules() if m is emb), None)
    ignorable = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    tied = {saved(k): saved(v) for k, v in tied.items()}
    return Skeleton(type(model).__name__, required, allowed, tied, ignorable,
                    None if embedding is None else saved(embedding),
                    None if same else memory_required, None if same else memory_allowed)


def _revert_key_mapping(model: Any, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` under the names transformers 4 (>= 4.52) saves: a VLM's ``_checkpoint_conversion_mapping``
    reversed, the first rule that matches a name renaming it (as its ``save_pretrained`` does)."""
    mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}
    rules = [(target, re.sub(r"\(.*\)", "", source.lstrip("^"))) for source, target in mapping.items()]
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key, count = re.subn(pattern, replacement, key)
            if count:
                break
        out[key] = value
    return out


def check_against_skeleton(ctx: Context) -> list[Check]:
    """``missing_tensors``, ``unexpected_tensors`` and ``tensor_shapes`` against the skeleton."""
    names = ("missing_tensors", "unexpected_tensors", "tensor_shapes")
    if ctx.tf is None:
        return [skipped(n, "transformers not installed") for n in names]
    if ctx.config is None:
        return [skipped(n, "no usable config.json") for n in names]
    if ctx.skeleton is None:
        first = ctx.skeleton_error or skipped("missing_tensors", "no model skeleton")
        reason = first.message.removeprefix(SKIPPED)
        return [first] + [skipped(n, reason) for n in names[1:]]
    from vllm_consolidate.validate.quantized import without_scales

    sk, stored = ctx.skeleton, without_scales(ctx)
    layout, required, allowed = _closest_layout(sk, stored)
    unexpected = _unexpected(sk, allowed, stored)
    return [_missing(sk.class_name, layout, required, stored, ctx.config, unexpected.status == FAIL), unexpected,
            _shapes(allowed, stored)]


def _wrong_shapes(allowed: Shapes, stored: dict[str, StoredTensor]) -> dict[str, tuple[list[int], list[int]]]:
    """``{name: (stored shape, expected shape)}`` of every stored tensor whose shape differs."""
    return {n: (list(stored[n].shape), list(allowed[n])) for n in stored
            if n in allowed and tuple(stored[n].shape) != tuple(allowed[n])}


def _closest_layout(sk: Skeleton, stored: dict[str, StoredTensor]) -> tuple[str, Shapes, Shapes]:
    """The layout (save_pretrained's, or transformers 5's in-memory one) the stored names are closest to."""
    layouts = [("save_pretrained", sk.required, sk.allowed)]
    if sk.memory_required is not None and sk.memory_allowed is not None:
        layouts.append(("in-memory", sk.memory_required, sk.memory_allowed))

    def mismatch(layout: tuple[str, Shapes, Shapes]) -> int:
        _, required, allowed = layout
        return (len(set(required) - set(stored)) + len(set(stored) - set(allowed))
                + len(_wrong_shapes(allowed, stored)))

    return min(layouts, key=mismatch)  # the first (save_pretrained) wins ties


def _missing(cls: str, layout: str, required: Shapes, stored: dict[str, StoredTensor], config: dict,
             others: bool = False) -> Check:
    """``missing_tensors``; ``others``: names outside the model are stored too (``unexpected_tensors`` fails)."""
    missing = sorted(set(required) - set(stored))
    if missing and others:  # e.g. another family's prefixes: transformers may map them back, vLLM may not
        return Check("missing_tensors", FAIL,
                     f"{len(missing)} tensors that {cls} needs are not stored under the names save_pretrained "
                     f"writes: {few(missing)}; other names are stored instead (see unexpected_tensors)",
                     {"names": missing})
    if missing:
        return Check("missing_tensors", FAIL,
                     f"{len(missing)} tensors that {cls} needs are not stored: {few(missing)}; vLLM would "
                     "leave them uninitialised without an error", {"names": missing})
    family = family_of(config)
    if layout == "in-memory" and family is not None and family.vllm_loads_fused is False:
        # Measured: vLLM 0.32 refuses Mixtral's and DeepSeek's fused names (see plan.moe.MoeFamily).
        return Check("missing_tensors", FAIL,
                     f"all {len(required)} tensors of {cls} are stored, but in transformers 5's in-memory layout "
                     "(fused MoE experts), whose names vLLM does not load for this model; convert with "
                     "--moe-layout per-expert (the default)", {"layout": layout})
    if family is not None:
        experts = f" ({expert_count(config)} experts per MoE layer, as config.json declares)"
        cls += experts
    if layout == "in-memory":
        return Check("missing_tensors", WARN,
                     f"all {len(required)} tensors of {cls} are stored, but in transformers 5's in-memory "
                     "layout (fused MoE experts) rather than the per-expert names save_pretrained writes; "
                     "recent vLLM and transformers 5 read it, older vLLM versions do not", {"layout": layout})
    return Check("missing_tensors", PASS, f"all {len(required)} tensors of {cls} are stored", {"layout": layout})


def _unexpected(sk: Skeleton, allowed: Shapes, stored: dict[str, StoredTensor]) -> Check:
    extra = sorted(set(stored) - set(allowed))
    ignorable = [n for n in extra if n.endswith(_IGNORABLE_SUFFIXES) or any(re.search(p, n) for p in sk.ignorable)]
    unexpected = [n for n in extra if n not in ignorable]
    if unexpected:
        return Check("unexpected_tensors", FAIL,
                     f"{len(unexpected)} stored tensors are not part of {sk.class_name}: {few(unexpected)}",
                     {"names": unexpected})
    if ignorable:
        return Check("unexpected_tensors", WARN,
                     f"{len(ignorable)} stored tensors that loaders ignore: {few(ignorable)}", {"names": ignorable})
    return Check("unexpected_tensors", PASS, f"no tensors outside {sk.class_name}")


def _shapes(allowed: Shapes, stored: dict[str, StoredTensor]) -> Check:
    wrong = _wrong_shapes(allowed, stored)
    if wrong:
        text = few((f"{n} is {wrong[n][0]}, expected {wrong[n][1]}" for n in sorted(wrong)), 3, sort=False, sep="; ")
        return Check("tensor_shapes", FAIL, f"{len(wrong)} shapes differ from the config's: {text}",
                     {"mismatches": {n: {"stored": s, "expected": e} for n, (s, e) in wrong.items()}})
    return Check("tensor_shapes", PASS,
                 "every stored shape matches the config (a square weight stored transposed has the "
                 "right shape too: --against SOURCE compares the values)")


__all__ = ["Skeleton", "build_skeleton", "check_against_skeleton", "skeleton_of"]
