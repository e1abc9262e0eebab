"""Merging a LoRA adapter into its base model, one block of rows at a time.

:func:`merge_plan` describes the merged model before anything is read: every base tensor, with
``modules_to_save`` copies and trained biases in place of the base's, and a
:class:`~vllm_consolidate.source.Delta` on each target weight. The writer then calls
:func:`~vllm_consolidate.plan.lora_rows.merged_rows` for each block of rows it writes: the base rows in float32 plus
``(B @ A) * scale`` for those rows (transposed for embeddings and ``fan_in_fan_out`` layers). Only
one block of one tensor, a few tiles of the update (below) and the adapter's small factors are ever in
memory.

The row arithmetic the writer and validation share (fixed tiles, so both agree bit for bit) is in
:mod:`vllm_consolidate.plan.lora_rows`; finding the adapter and its base model is in
:mod:`vllm_consolidate.read.lora_find`.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from vllm_consolidate.errors import ConfigNotFoundError, CorruptCheckpointError, InputNotFoundError, UsageError
from vllm_consolidate.plan import vlm
from vllm_consolidate.read import hf, peft
from vllm_consolidate.read.assets import DEFAULT_BASE_MODEL, read_config
from vllm_consolidate.read.lora_find import find_base, find_lora, verl_lora, vllm_unsupported
from vllm_consolidate.read.peft import Adapter, LoraModule
from vllm_consolidate.read.registry import LoraLayout, format_of_source
from vllm_consolidate.safe_io import confined, trust_root
from vllm_consolidate.source import Delta, LoraOutcome, LoraResult, SourceModel, TensorSpec


def check_fit(base: SourceModel, adapter: Adapter, base_dir: Path) -> None:
    """Refuse an adapter that does not fit ``base`` (what :func:`merge_plan` merges, from metadata alone).

    ``--lora adapter`` checks the base with this alone: the merged model it would describe is not needed.

    Raises:
        CorruptCheckpointError: The adapter names a module the base does not have, or with another
            shape (an adapter for another model), or lacks a ``modules_to_save`` copy.
    """
    by_name = {t.name: t for t in base.tensors}

    def mismatch(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"the adapter does not fit the base model {base_dir}: {what}",
                                      path=adapter.config.path,
                                      hint="Pass the model the adapter was trained on with --base-model-name.")

    _check_saved_modules(adapter, by_name)
    for name, spec in adapter.replacements.items():
        if name not in by_name:
            raise mismatch(f"it replaces {name}, which the base does not have")
        if spec.shape != by_name[name].shape:
            raise mismatch(f"{name} is {spec.shape} in the adapter, {by_name[name].shape} in the base")
    for module, lora in adapter.modules.items():
        weight = by_name.get(f"{module}.weight")
        if weight is None:
            raise mismatch(f"it targets {module}, which the base does not have")
        b_rows, a_cols = lora.b.shape[0], lora.a.shape[1]
        want = (a_cols, b_rows) if _transposed(adapter, lora) else (b_rows, a_cols)
        if len(weight.shape) != 2 or weight.shape != want:  # a replacement has the base's shape (checked above)
            raise mismatch(f"{module} has factors for a weight of shape {want}, the base's is {weight.shape}")


def _transposed(adapter: Adapter, lora: LoraModule) -> bool:
    """Whether ``B @ A`` is the weight's transpose (embeddings, and ``fan_in_fan_out`` layers such as GPT-2's)."""
    return bool(lora.embedding or adapter.config.fan_in_fan_out)


def merge_plan(base: SourceModel, adapter: Adapter, base_dir: Path) -> SourceModel:
    """The merged model: the base's tensors with the adapter's updates and replacements.

    Raises:
        CorruptCheckpointError: The adapter does not fit the base (see :func:`check_fit`).
    """
    check_fit(base, adapter, base_dir)
    tensors = {t.name: t for t in base.tensors}
    for name, spec in adapter.replacements.items():
        tensors[name] = TensorSpec(name, spec.dtype, spec.shape, spec.segments)
    for module, lora in adapter.modules.items():
        weight = tensors[f"{module}.weight"]
        tensors[weight.name] = TensorSpec(weight.name, weight.dtype, weight.shape, weight.segments,
                                          Delta(lora.a, lora.b, lora.scale, _transposed(adapter, lora)))
    info = dict(base.info, type=str(LoraOutcome.MERGED), lora_source=adapter.source,
                lora_modules=len(adapter.modules), lora_replaced=sorted(adapter.replacements), base_model=str(base_dir))
    return SourceModel(kind=str(LoraOutcome.MERGED), path=base.path, tensors=[tensors[t.name] for t in base.tensors],
                       asset_dirs=[], trained_dtype=base.trained_dtype, info=info, aliases=base.aliases,
                       renamed=base.renamed, lora=LoraResult(LoraOutcome.MERGED, base_model=base_dir))


def _check_saved_modules(adapter: Adapter, base: dict[str, TensorSpec]) -> None:
    """Each ``modules_to_save`` entry that names a module of the base must have its trained copy in the adapter.

    peft matches the entries as name suffixes; an entry the base lacks is normal (a task type lists both
    ``classifier`` and ``score``). A missing copy would silently leave the base's untrained tensor.
    """
    for wanted in adapter.config.modules_to_save:
        modules = {n.rsplit(".", 1)[0] for n in base if "." in n and n.rsplit(".", 1)[0].endswith(wanted)}
        missing = sorted(m for m in modules if not any(r.startswith(f"{m}.") for r in adapter.replacements))
        if missing:
            raise CorruptCheckpointError(
                f"{peft.ADAPTER_CONFIG} lists {repr(wanted[:200])} in modules_to_save, but the adapter holds no "
                f"trained copy of {missing[0]} (the merge would keep the base's untrained weights)",
                path=adapter.config.path,
                hint="Convert the checkpoint the adapter was saved with (its copy is stored beside the LoRA factors).")


def merge_lora(source: SourceModel, weights_dir: Path, input_dir: Path, base_model_name: str | None,
               default_base: str | None = DEFAULT_BASE_MODEL) -> SourceModel:
    """A LoRA fine-tune as its merged model (see :func:`~vllm_consolidate.read.lora_find.find_lora`,
    :func:`~vllm_consolidate.read.lora_find.find_base`); any other source as it is.

    Raises:
        UnsupportedCheckpointError: See :func:`find_lora`.
        InputNotFoundError: See :func:`find_base`.
        CorruptCheckpointError: The adapter does not fit the base model.
    """
    adapter = find_lora(source, weights_dir, input_dir)
    if adapter is None:
        return source
    fmt = format_of_source(source)
    if fmt is not None and fmt.lora == LoraLayout.RANK_FILES:  # the base model is in the rank files too
        base, adapter = verl_lora(source, weights_dir)
        merged = merge_plan(base, adapter, weights_dir)
        merged.asset_dirs = source.asset_dirs
        return merged
    base_dir = find_base(adapter, base_model_name, default_base)
    return merge_plan(*read_base(base_dir, adapter), base_dir)


def read_base(base_dir: Path, adapter: Adapter) -> tuple[SourceModel, Adapter]:
    """The base model's tensors, and the adapter with its modules under the base's names.

    peft names the modules it wrapped, i.e. the training names (``model.language_model.layers.0...``), while a
    vision-language base folder holds what ``save_pretrained`` wrote (``model.layers.0...`` for Qwen2-VL, see
    :mod:`vllm_consolidate.plan.vlm`) or any older form: both are matched by their training names, and the
    adapter takes the base's, so the merged model holds the names the base stored (what the summary compares
    the written names with). The config is read only inside the base's trust root, like its weights; without
    one nothing is renamed.
    """
    root = trust_root(base_dir)
    base = hf.read_hf(base_dir, root)
    path = base_dir / "config.json"
    config = read_config(path) if path.is_file() and confined(path, [root]) else {}
    if vlm.family_of(config) is None:
        return base, adapter
    stored = {vlm.training_name(config, t.name): t.name for t in base.tensors}

    def name(tensor: str) -> str:  # a name the base lacks stays as it is: merge_plan names it in its error
        return stored.get(vlm.training_name(config, tensor), tensor)

    def module(mod: str) -> str:  # the rules match tensor names (``language_model.lm_head.`` ends in a dot)
        return name(f"{mod}.weight").removesuffix(".weight")

    modules = {module(m): replace(lora, module=module(m)) for m, lora in adapter.modules.items()}
    replacements = {name(n): replace(t, name=name(n)) for n, t in adapter.replacements.items()}
    return base, replace(adapter, modules=modules, replacements=replacements)


_SAVED_NAMES = [  # live peft names -> the names peft saves (and vLLM loads): without the adapter name
    (re.compile(r"\.(lora_A|lora_B)\.[^.]+\.weight$"), r".\1.weight"),
    (re.compile(r"\.(lora_embedding_A|lora_embedding_B)\.[^.]+$"), r".\1"),
    (re.compile(r"\.modules_to_save\.[^.]+\."), "."),
]


def saved_name(name: str) -> str:
    """The name peft's ``save_pretrained`` gives a live adapter tensor."""
    for pattern, repl in _SAVED_NAMES:
        name = pattern.sub(repl, name)
    return name if name.startswith(peft.PEFT_PREFIX) else peft.PEFT_PREFIX + name


def adapter_export(source: SourceModel, weights_dir: Path, input_dir: Path, base_model_name: str | None,
                   ) -> SourceModel:
    """A LoRA run's adapter as a clean peft folder's tensors (``--lora adapter``), under peft's saved names.

    The base model is checked against the adapter when it can be found (a warning in ``info`` otherwise).

    Raises:
        UsageError: The source is not a LoRA run.
        CorruptCheckpointError: The adapter does not fit the base model.
    """
    adapter = find_lora(source, weights_dir, input_dir)
    if adapter is None:
        raise UsageError("--lora adapter needs a LoRA run (adapter_config.json with LoRA factors)", path=weights_dir,
                         hint="Leave --lora out to convert a full model.")
    info: dict[str, Any] = dict(source.info, type=str(LoraOutcome.ADAPTER), lora_source=adapter.source,
                                adapter_config=str(adapter.config.path), lora_modules=len(adapter.modules))
    try:
        base_dir = find_base(adapter, base_model_name, DEFAULT_BASE_MODEL)
    except (InputNotFoundError, ConfigNotFoundError) as exc:  # the adapter is still what it is: written, with a warning
        info["base_model_error"] = exc.message
    else:
        check_fit(*read_base(base_dir, adapter), base_dir)  # raises if it does not fit; no merged model is needed
        info["base_model"] = str(base_dir)
    found_base = Path(info["base_model"]) if "base_model" in info else None
    unservable = vllm_unsupported(adapter)
    if unservable:
        info["vllm_warning"] = (f"vLLM (0.32, tested) refuses LoRA adapters with {', '.join(unservable)}; merge this "
                                "run instead (leave out --lora adapter) to serve it")
    tensors = [TensorSpec(saved_name(s.name), s.dtype, s.shape, s.segments) for s in source.tensors]
    return SourceModel(kind=str(LoraOutcome.ADAPTER), path=source.path, tensors=tensors, info=info,
                       lora=LoraResult(LoraOutcome.ADAPTER, base_model=found_base,
                                       adapter_config=adapter.config.path))


__all__ = ["adapter_export", "check_fit", "merge_lora", "merge_plan", "read_base", "saved_name"]
