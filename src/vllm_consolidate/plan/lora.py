"""Merging a LoRA adapter into its base model, one block of rows at a time.

:func:`merge_plan` describes the merged model before anything is read: every base tensor, with
``modules_to_save`` copies and trained biases in place of the base's, and a
:class:`~vllm_consolidate.source.Delta` on each target weight. The writer then calls
:func:`merged_rows` for each block of rows it writes: the base rows in float32 plus
``(B @ A) * scale`` for those rows (transposed for embeddings and ``fan_in_fan_out`` layers). Only
one block of one tensor, a few tiles of the update (below) and the adapter's small factors are ever in
memory.

Arithmetic. The same torch operations as peft's ``merge_and_unload`` on a float32 model
(``get_delta_weight``: ``transpose(B @ A, fan_in_fan_out) * scaling``, then ``weight += delta``), on
the float32 masters. The product's bits depend on the shape of the matrix product that computes them:
BLAS picks its kernel by size, and rows computed in a small product differ from the same rows of a
large one (MKL 2024 on AVX2: a product of 1, 2, 3, 5, 6 or 7 rows differs from a 1001-row one, in
the last bit of about one element in ten; a product of 16 rows or more agrees). So the update is
computed in fixed tiles, never in the rows a caller asks for: the tiles of a tensor are rows
``[k*T, k*T + T)`` (the last one moved back to end at the last row), each computed in one product of
``T`` rows (:func:`tile_rows`; the whole tensor when it fits in :data:`TILE_BYTES`, which is then
exactly peft's product). The writer's blocks and the validator's sampled rows are cut from the same
tiles, so they always agree, and ``tests/test_lora.py`` checks the result against peft. Tiles are
cached (a few, by :data:`TILE_CACHE`), so consecutive blocks of one tile cost one product.
With a 16-bit base the base rows are widened to float32 first and the sum is rounded once to the
output dtype; peft instead rounds the delta to the base dtype and adds in 16 bits, which loses more.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.casts import cast_into
from vllm_consolidate.errors import (
    ConfigNotFoundError,
    CorruptCheckpointError,
    InputNotFoundError,
    UnsupportedCheckpointError,
    UsageError,
)
from vllm_consolidate.read import hf, peft, verl
from vllm_consolidate.read.assets import DEFAULT_BASE_MODEL, resolve_base_model, search_chain
from vllm_consolidate.read.peft import Adapter
from vllm_consolidate.read.ranges import iter_chunks
from vllm_consolidate.read.registry import LoraLayout, format_of_source
from vllm_consolidate.safe_io import trust_root
from vllm_consolidate.source import Delta, SourceModel, TensorSpec

_FACTORS: dict[int, tuple[Delta, Any, Any]] = {}
_TILES: dict[tuple[int, int], tuple[Delta, Any]] = {}
_LOCK = threading.Lock()
#: Factor pairs kept in memory at once (each is a few MB even for a 70B model's widest layer).
_CACHE = 8
#: Largest tile of a merged weight's float32 update computed in one product (see the module docstring).
TILE_BYTES = 8 * 2**20
#: Tiles kept in memory at once: one per writer thread, and one more.
TILE_CACHE = 3


def _read_fp32(spec: TensorSpec) -> Any:
    import torch

    raw = bytearray(spec.nbytes)
    data = next(iter_chunks(spec.segments, max(len(raw), 1), buffer=raw), memoryview(raw))
    if spec.dtype != dtypes.float32:
        out = bytearray(spec.numel * 4)
        cast_into(data, spec.dtype, dtypes.float32, memoryview(out))
        raw = out
    return torch.frombuffer(raw, dtype=torch.float32).reshape(spec.shape)


def _factors(delta: Delta) -> tuple[Any, Any]:
    # Keyed by identity, and the entry holds the Delta itself, so its id cannot be reused while cached.
    key = id(delta)
    with _LOCK:
        entry = _FACTORS.get(key)
        if entry is not None and entry[0] is delta:
            return entry[1], entry[2]
    a, b = _read_fp32(delta.a), _read_fp32(delta.b)
    with _LOCK:
        if len(_FACTORS) >= _CACHE:
            _FACTORS.pop(next(iter(_FACTORS)))
        _FACTORS[key] = (delta, a, b)
    return a, b


def row_length(spec: TensorSpec) -> int:
    """Elements per row of a merged weight (blocks of whole rows are merged)."""
    return spec.numel // spec.shape[0] if spec.shape and spec.shape[0] else 1


def tile_rows(spec: TensorSpec) -> int:
    """Rows per tile of a merged weight's update: all of them when it fits in :data:`TILE_BYTES`, else a
    multiple of 64 (never fewer than 64: small products take other BLAS kernels, see the module docstring)."""
    total = spec.shape[0] if spec.shape else 1
    fit = TILE_BYTES // (4 * row_length(spec))
    return total if fit >= total else min(total, max(64, fit // 64 * 64))


def _tile(delta: Delta, start: int, rows: int) -> Any:
    """``(B @ A) * scale`` for weight rows ``[start, start + rows)``, in one product (cached)."""
    key = (id(delta), start)
    with _LOCK:
        entry = _TILES.get(key)
        if entry is not None and entry[0] is delta:
            return entry[1]
    a, b = _factors(delta)
    if delta.transpose:  # rows of the weight are columns of A (embeddings, Conv1D)
        update = (b @ a[:, start:start + rows]).T * delta.scale
    else:
        update = (b[start:start + rows] @ a) * delta.scale
    with _LOCK:
        while len(_TILES) >= TILE_CACHE:
            _TILES.pop(next(iter(_TILES)))
        _TILES[key] = (delta, update)
    return update


def merged_rows(spec: TensorSpec, first_row: int, rows: int, base: memoryview) -> memoryview:
    """Rows ``[first_row, first_row + rows)`` of the merged weight, as float32 bytes.

    Any block of rows gives the same bits for a row: they are cut from the fixed tiles of
    :func:`tile_rows`, whatever the block.

    Args:
        spec: A tensor with a :class:`~vllm_consolidate.source.Delta`.
        first_row: The first row.
        rows: How many rows.
        base: Those rows of the base weight, in ``spec.dtype``.
    """
    import torch

    delta = spec.delta
    assert delta is not None
    cols, total, size = row_length(spec), spec.shape[0], tile_rows(spec)
    # A copy even from float32: the tiles are added in place, and ``base`` is the caller's buffer.
    weight = torch.frombuffer(base, dtype=spec.dtype.torch, count=rows * cols).reshape(rows, cols)
    weight = weight.to(torch.float32, copy=True)
    row = first_row
    while row < first_row + rows:
        start = min(row // size * size, total - size)  # the last tile ends at the last row
        end = min(start + size, first_row + rows)
        weight[row - first_row:end - first_row] += _tile(delta, start, size)[row - start:end - start]
        row = end
    return memoryview(weight.contiguous().numpy()).cast("B")


def merge_plan(base: SourceModel, adapter: Adapter, base_dir: Path) -> SourceModel:
    """The merged model: the base's tensors with the adapter's updates and replacements.

    Raises:
        CorruptCheckpointError: The adapter names a module the base does not have, or with another
            shape (an adapter for another model).
    """
    by_name = {t.name: t for t in base.tensors}
    hint = "Pass the model the adapter was trained on with --base-model-name."

    def mismatch(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"the adapter does not fit the base model {base_dir}: {what}",
                                      path=adapter.config.path, hint=hint)

    _check_saved_modules(adapter, by_name)
    tensors = dict(by_name)
    for name, spec in adapter.replacements.items():
        if name not in by_name:
            raise mismatch(f"it replaces {name}, which the base does not have")
        if spec.shape != by_name[name].shape:
            raise mismatch(f"{name} is {spec.shape} in the adapter, {by_name[name].shape} in the base")
        tensors[name] = TensorSpec(name, spec.dtype, spec.shape, spec.segments)
    for module, lora in adapter.modules.items():
        name = f"{module}.weight"
        if name not in by_name:
            raise mismatch(f"it targets {module}, which the base does not have")
        weight = tensors[name]
        transpose = lora.embedding or adapter.config.fan_in_fan_out
        b_rows, a_cols = lora.b.shape[0], lora.a.shape[1]
        want = (a_cols, b_rows) if transpose else (b_rows, a_cols)
        if len(weight.shape) != 2 or weight.shape != want:
            raise mismatch(f"{module} has factors for a weight of shape {want}, the base's is {weight.shape}")
        tensors[name] = TensorSpec(name, weight.dtype, weight.shape, weight.segments,
                                   Delta(lora.a, lora.b, lora.scale, transpose))
    info = dict(base.info, type="lora_merge", lora_source=adapter.source, lora_modules=len(adapter.modules),
                lora_replaced=sorted(adapter.replacements), base_model=str(base_dir))
    return SourceModel(kind="lora_merge", path=base.path, tensors=[tensors[t.name] for t in base.tensors],
                       asset_dirs=[], trained_dtype=base.trained_dtype, info=info, aliases=base.aliases,
                       renamed=base.renamed)


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


def find_lora(source: SourceModel, weights_dir: Path, input_dir: Path) -> peft.Adapter | None:
    """The LoRA adapter a source holds, else None (a full model).

    LoRA is recognised by an ``adapter_config.json`` in the checkpoint folder or its parents, together
    with LoRA factors among the tensors (a DeepSpeed checkpoint's fp32 masters, or a peft folder's
    adapter file).

    Raises:
        UnsupportedCheckpointError: LoRA factors without an ``adapter_config.json``, or a peft feature
            that cannot be merged.
    """
    fmt = format_of_source(source)
    layout = fmt.lora if fmt is not None else LoraLayout.FACTORS
    if layout != LoraLayout.ADAPTER and not any(peft.is_lora_name(t.name) for t in source.tensors):
        return None
    if layout == LoraLayout.RANK_FILES:
        return _verl_lora(source, weights_dir)[1]
    config_path = peft.find_adapter_config(search_chain(weights_dir, input_dir))
    if config_path is None:
        raise UnsupportedCheckpointError(
            "the checkpoint holds LoRA factors but no adapter_config.json was found next to it or above it",
            path=weights_dir, hint="Copy the run's adapter_config.json into the checkpoint-N folder.")
    config = peft.read_lora_config(config_path)
    what = fmt.lora_what(source, weights_dir) if fmt is not None else str(source.path)
    return peft.read_adapter(config, source.tensors, what, source.path)


def _verl_lora(source: SourceModel, weights_dir: Path) -> tuple[SourceModel, peft.Adapter]:
    """A verl LoRA run's base model and adapter, both inside its rank files.

    The settings come from ``lora_adapter/adapter_config.json`` when verl wrote one, else from
    ``lora_train_meta.json`` (``r`` and ``lora_alpha`` only).

    Raises:
        UnsupportedCheckpointError: Neither file is there.
    """
    full = weights_dir / verl.LORA_FOLDER / peft.ADAPTER_CONFIG
    if os.path.lexists(full):  # read (and refused by name) whatever it is
        config = peft.read_lora_config(full)
    elif (weights_dir / verl.LORA_META).is_file():
        config = peft.read_verl_lora_meta(weights_dir / verl.LORA_META)
    else:
        raise UnsupportedCheckpointError(
            f"this verl checkpoint holds LoRA factors but no {verl.LORA_META} or {verl.LORA_FOLDER}/ records their "
            "r and lora_alpha", path=weights_dir, hint="Merge it with verl's model_merger, then convert the result.")
    factors = [t for t in source.tensors if peft.is_lora_name(t.name)]
    adapter = peft.read_adapter(config, factors, f"the rank files of {weights_dir.parent.name}/{weights_dir.name}",
                                source.path)

    def base_name(name: str) -> str:
        name = name[len(peft.PEFT_PREFIX):] if name.startswith(peft.PEFT_PREFIX) else name
        return name.replace(".base_layer.", ".")

    base = [TensorSpec(base_name(t.name), t.dtype, t.shape, t.segments) for t in source.tensors
            if not peft.is_lora_name(t.name)]
    aliases = {base_name(a): base_name(b) for a, b in source.aliases.items()}
    return SourceModel(kind="verl", path=source.path, tensors=base, asset_dirs=source.asset_dirs,
                       trained_dtype=source.trained_dtype, info=source.info, aliases=aliases), adapter


def find_base(adapter: peft.Adapter, base_model_name: str | None, default_base: str | None) -> Path:
    """The base model's folder: ``base_model_name`` unless it is ``default_base`` (the option's default), a local
    folder or a Hub id in the HF cache; else the adapter config's ``base_model_name_or_path``, which must be a Hub id
    found in the HF cache.

    A path in ``adapter_config.json`` is never followed: the checkpoint would choose which local model is read and
    published (``/home/me/other-model``, ``../../secret-model``). The user names a local base with the option.

    Raises:
        ConfigNotFoundError: The adapter names its base by a local path, and the option does not name one.
        InputNotFoundError: Not found (not a local folder or not in the HF cache).
    """
    explicit = base_model_name if base_model_name != default_base else None
    hint = "Pass the base model's folder (or its Hub id, if it is in the HF cache) with --base-model-name."
    name = explicit or adapter.config.base_model or default_base
    if not explicit and adapter.config.base_model and not _is_hub_id(adapter.config.base_model):
        raise ConfigNotFoundError(
            f"the adapter names its base model by the local path {repr(adapter.config.base_model[:200])}, which is not "
            "followed (a checkpoint does not choose which local model is read): name it with --base-model-name",
            path=adapter.config.path, hint="Pass the folder of the model the adapter was trained on: "
            "--base-model-name FOLDER.")
    base_dir, error = resolve_base_model(name, download=bool(explicit), local_folders=bool(explicit))
    if base_dir is None:
        raise InputNotFoundError(f"the adapter's base model {name} was not found ({error})",
                                 path=adapter.config.path, hint=hint)
    return base_dir


def _is_hub_id(name: str) -> bool:
    """``org/name`` or ``name`` as the Hub spells repo ids (no path: no ``/`` start, ``..``, ``~`` or backslash)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith(("/", "~", ".")) or "\\" in name or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def merge_lora(source: SourceModel, weights_dir: Path, input_dir: Path, base_model_name: str | None,
               default_base: str | None = DEFAULT_BASE_MODEL) -> SourceModel:
    """A LoRA fine-tune as its merged model (see :func:`find_lora`, :func:`find_base`); any other source as it is.

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
        base, adapter = _verl_lora(source, weights_dir)
        merged = merge_plan(base, adapter, weights_dir)
        merged.asset_dirs = source.asset_dirs
        return merged
    base_dir = find_base(adapter, base_model_name, default_base)
    return merge_plan(hf.read_hf(base_dir, trust_root(base_dir)), adapter, base_dir)


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
    info: dict[str, Any] = dict(source.info, type="lora_adapter", lora_source=adapter.source,
                                adapter_config=str(adapter.config.path), lora_modules=len(adapter.modules))
    try:
        base_dir = find_base(adapter, base_model_name, DEFAULT_BASE_MODEL)
    except (InputNotFoundError, ConfigNotFoundError) as exc:  # the adapter is still what it is: written, with a warning
        info["base_model_error"] = exc.message
    else:
        merge_plan(hf.read_hf(base_dir, trust_root(base_dir)), adapter, base_dir)  # raises if it does not fit
        info["base_model"] = str(base_dir)
    unservable = vllm_unsupported(adapter)
    if unservable:
        info["vllm_warning"] = (f"vLLM (0.32, tested) refuses LoRA adapters with {', '.join(unservable)}; merge this "
                                "run instead (leave out --lora adapter) to serve it")
    tensors = [TensorSpec(saved_name(s.name), s.dtype, s.shape, s.segments) for s in source.tensors]
    return SourceModel(kind="lora_adapter", path=source.path, tensors=tensors, info=info)


def vllm_unsupported(adapter: peft.Adapter) -> list[str]:
    """What in an adapter vLLM's LoRA support refuses (observed with vLLM 0.32: it raises on each)."""
    found = []
    embeddings = sorted(m for m, lora in adapter.modules.items() if lora.embedding)
    if embeddings:
        found.append(f"LoRA on embeddings ({', '.join(embeddings)})")
    if any(m == "lm_head" or m.endswith(".lm_head") for m in adapter.modules):
        found.append("LoRA on lm_head")
    saved = [m for m in adapter.config.modules_to_save if m not in ("classifier", "score")]
    if saved:
        found.append(f"modules_to_save {saved}")
    if adapter.config.bias != "none":
        found.append(f"trained biases (bias={adapter.config.bias})")
    return found


__all__ = ["adapter_export", "find_base", "find_lora", "merge_lora", "merge_plan", "merged_rows", "row_length",
           "saved_name", "vllm_unsupported"]
