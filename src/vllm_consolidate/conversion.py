"""What one conversion is, before and after it runs: its options, its plan, its result, and the steps both
output kinds share (planning, writing the files, the marker, validation).

:mod:`vllm_consolidate.convert` runs a conversion into a local folder or an object store; this module holds
what it decides from the options and the input (:func:`plan_conversion`) and the steps it takes the same way
for both (:func:`write_files`, :func:`marker_info`, :func:`validate_output`), so that module stays the flow.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.dtypes import DType
from vllm_consolidate.errors import UsageError, ValidationFailedError
from vllm_consolidate.plan.architecture import FROM_CONFIG, ArchitectureDecision, decide_architectures
from vllm_consolidate.plan.inputs import LORA_MODES, InputSpec, LoraMode, detect_input, read_input
from vllm_consolidate.plan.moe import MOE_LAYOUTS, MoeSummary
from vllm_consolidate.plan.names import plan_names
from vllm_consolidate.plan.shards import DTYPES_BY_NAME, OutputPlan, dtype_name, plan_output
from vllm_consolidate.plan.vlm import VlmSummary
from vllm_consolidate.read import detect as detection
from vllm_consolidate.read.assets import (  # DEFAULT_BASE_MODEL re-exported by convert: the CLI imports it there
    DEFAULT_BASE_MODEL,
    NO_TOKENIZER_WARNING,
    Assets,
    find_checkpoint_assets,
    missing_config,
    read_config,
)
from vllm_consolidate.read.registry import is_training_source
from vllm_consolidate.source import SourceModel
from vllm_consolidate.storage import remote
from vllm_consolidate.storage.store import parse_storage_options
from vllm_consolidate.storage.urls import is_object_url
from vllm_consolidate.write import publish as pub
from vllm_consolidate.write import remote as rpub
from vllm_consolidate.write import write_plan
from vllm_consolidate.write.assets import copy_adapter_assets, copy_assets

DEFAULT_MAX_SHARD_SIZE = 40 * 10**9


@dataclass(frozen=True)
class ConvertOptions:
    """Options of one conversion; the CLI flags map one to one.

    Frozen and free of callbacks so that one record can be pickled to a batch worker and shared: a
    batch keeps the model options in one of these (without paths) and gives each job a copy with
    ``input``/``output``/``checkpoint_dir`` set by :func:`dataclasses.replace`. Progress callbacks are
    arguments of :func:`convert`, not options.

    Attributes:
        input: What the user passed as ``--input``; required by :func:`convert` (None only in a batch's
            template record).
        output: The output folder, or an object-store prefix (``s3://bucket/prefix``, kept as the string);
            required like ``input``.
        input_type: ``auto``, ``deepspeed``, ``dcp``, ``verl`` or ``hf_sharded``.
        checkpoint_dir: Overrides detection when given.
        base_model_name: Local folder or Hub id for config/tokenizer the checkpoint lacks.
        dtype: Output dtype for floating tensors, a :class:`~vllm_consolidate.dtypes.DType` or a name
            (``bfloat16``, ``bf16``...), stored as the DType; ignored with ``keep_original_precision``.
        keep_original_precision: DeepSpeed: the precision it was trained in (bf16/fp16 enabled in
            its DeepSpeed config, else fp32). HF: each tensor's stored dtype.
        fmt: ``safetensors`` or ``bin``.
        max_shard_size: Bytes per file before splitting.
        force: Replace an existing output (only after the new one is complete).
        validate: Run the static validation before publishing the output.
        architecture: ``--architecture``: the model class written into the output's config.json
            ``architectures``, for a config.json that lacks it and whose class cannot be inferred from
            ``model_type`` (see :mod:`vllm_consolidate.plan.architecture`). Replaces config.json's own.
        model_key: ``--model-key``: for a DCP checkpoint holding more than one model-like entry
            (``model`` and ``ema``), the one to convert (``""`` for the top level).
        lora: ``--lora``: for a LoRA run, ``merge`` (a full model: the adapter merged into its base)
            or ``adapter`` (a clean peft adapter folder that vLLM serves with ``--enable-lora``).
        moe_layout: ``--moe-layout``: MoE experts ``per-expert`` (save_pretrained's names, what vLLM loads),
            ``fused`` (transformers 5's in-memory 3-D tensors), or ``auto`` (= save_pretrained's); see
            :mod:`vllm_consolidate.plan.moe`.
        quantize: ``--quantize``: ``fp8_dynamic``, ``fp8_block`` or ``w8a8`` (compressed-tensors, as
            llm-compressor writes it; see :mod:`vllm_consolidate.plan.quantize`), or None. The weights are cast
            to ``dtype`` first (the CLI's default dtype is bfloat16 with ``--quantize``).
        quantize_ignore: ``--quantize-ignore``: more modules to leave unquantized (a name, ``re:REGEX`` or a class).
        storage_options: ``--storage-options``: obstore settings for object-store URLs (a dict, or its JSON
            text), beyond the standard environment; kept as sorted pairs so the record stays hashable.

    ``input`` and ``checkpoint_dir`` may be object-store URLs (``s3://bucket/prefix``, ``gs://``, ``az://``):
    they are kept as strings (a ``Path`` would fold ``//``), and :func:`convert` reads the prefix through a
    mirror of stand-ins (:mod:`vllm_consolidate.storage.remote`).

    Raises:
        UsageError: ``dtype`` names no known dtype.
    """

    input: Path | None = None
    output: Path | str | None = None
    input_type: str = "auto"
    checkpoint_dir: Path | None = None
    base_model_name: str | None = DEFAULT_BASE_MODEL
    dtype: DType | str = dtypes.float32
    keep_original_precision: bool = False
    fmt: str = "safetensors"
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    force: bool = False
    validate: bool = True
    architecture: str | None = None
    model_key: str | None = None
    lora: str = "merge"
    moe_layout: str = "auto"
    quantize: str | None = None
    quantize_ignore: tuple[str, ...] = ()
    storage_options: tuple[tuple[str, str], ...] | dict[str, str] | str | None = ()

    def __post_init__(self) -> None:
        # Normalised once here so every reader of the record sees Paths and a DType (frozen: set via object).
        for name in ("input", "output", "checkpoint_dir"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, str(value) if is_object_url(str(value)) else Path(value))
        options = self.storage_options
        if isinstance(options, str):
            options = parse_storage_options(options)
        object.__setattr__(self, "storage_options", tuple(sorted(dict(options or {}).items())))
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        object.__setattr__(self, "quantize_ignore", tuple(self.quantize_ignore))
        if self.quantize_ignore and self.quantize is None:
            raise UsageError("--quantize-ignore needs --quantize")
        if self.quantize is not None:  # the quantization planner is imported only for --quantize
            from vllm_consolidate.plan.quantize import check_quantize_options

            check_quantize_options(self.quantize, self.quantize_ignore, self.fmt, self.lora)

    @property
    def input_spec(self) -> InputSpec:
        """Which input these options name (what every command that reads one shares)."""
        return InputSpec(Path(self.input), self.input_type, self.checkpoint_dir, self.model_key, self.base_model_name)

    def require_paths(self) -> None:
        """Refuse a record without ``input`` or ``output`` (a batch's template), before anything is read.

        Raises:
            UsageError: ``input`` or ``output`` is missing.
        """
        missing = [name for name in ("input", "output") if getattr(self, name) is None]
        if missing:
            raise UsageError(f"ConvertOptions needs {' and '.join(missing)}")


def as_dtype(value: DType | str) -> DType:
    """A DType for a DType, a torch dtype, a torch name (``bfloat16``) or a CLI alias (``bf16``)."""
    found = DTYPES_BY_NAME.get(value) if isinstance(value, str) else None
    if found is not None:
        return found
    try:
        return dtypes.of(value)
    except KeyError:
        raise UsageError(f"unknown dtype {value!r}", hint="Use float32, float16 or bfloat16.") from None


@dataclass
class ConvertResult:
    """What a conversion did, for the summary and ``--json``."""

    output: Path
    status: str  # "converted" or "already_consolidated"
    detected: dict[str, Any]
    files: list[str]
    tensors: int
    parameters: int
    bytes_read: int
    bytes_written: int
    output_dtype: str
    seconds: float
    assets: dict[str, str | None] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    validation: dict[str, Any] | None = None
    architectures: dict[str, Any] | None = None
    moe: dict[str, Any] | None = None
    vlm: dict[str, Any] | None = None  # plan.vlm.VlmSummary: a vision-language model's parts and their sizes
    quantize: str | None = None  # --quantize's scheme

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["output"] = str(self.output)
        out["throughput_mb_s"] = round(self.bytes_written / 1e6 / self.seconds, 1) if self.seconds else None
        return out


def target_dtype(opts: ConvertOptions, source: SourceModel, config: dict) -> DType | None:
    """The dtype for floating tensors, or None to keep each tensor's own (see ``ConvertOptions``)."""
    if not opts.keep_original_precision:
        return opts.dtype
    if is_training_source(source):
        if source.trained_dtype is not None:
            return source.trained_dtype
        name = config.get("torch_dtype") or config.get("dtype")
        return DTYPES_BY_NAME.get(str(name), dtypes.float32)
    return None  # HF: each tensor keeps its stored dtype


def config_dtype(plan: OutputPlan) -> str:
    # The floating dtype holding the most bytes is the model's dtype.
    weight: dict[DType, int] = {}
    for t in plan.tensors:
        if t.out_dtype.is_floating_point and t.quant is None:  # a quantized model's dtype is its other tensors'
            weight[t.out_dtype] = weight.get(t.out_dtype, 0) + t.nbytes
    return dtype_name(max(weight, key=weight.__getitem__)) if weight else "float32"


@dataclass
class Conversion:
    """Everything decided about one conversion before any tensor byte is read."""

    detected: detection.DetectedInput
    source: SourceModel
    assets: Assets
    config: dict
    plan: OutputPlan
    dropped: list[str]
    warnings: list[str]
    architecture: ArchitectureDecision
    moe: MoeSummary | None = None
    vlm: VlmSummary | None = None  # plan_names' record of a vision-language model's parts


def input_paths(opts: ConvertOptions, weights_dir: Path | None = None) -> list[Path]:
    """Every folder of the input that the output must not be, lie in or contain (and cleanup never touches)."""
    named = [opts.input, weights_dir, opts.checkpoint_dir]
    return [p if is_object_url(p) else Path(p) for p in named if p is not None]


def check_location(opts: ConvertOptions, inputs: list) -> None:
    """The output is not an input, inside one, or holding one (a folder, or an object-store prefix)."""
    url = rpub.output_url(opts.output)
    if url is not None:
        rpub.check_output_url(url, [opts.input, opts.checkpoint_dir, *inputs])
    else:
        pub.check_output_location(Path(opts.output), [p for p in inputs if not is_object_url(p)])


def max_shard_size(opts: ConvertOptions) -> int:
    url = rpub.output_url(opts.output)
    # A --pytorch-bin archive (size unknown before it is written) is staged and committed by one server-side copy
    # (S3's CopyObject: at most 5 GiB); a safetensors shard is one multipart upload to its key (up to 5 TB).
    if url is not None and url.kind == "s3" and opts.fmt == "bin":
        return min(opts.max_shard_size, rpub.S3_MAX_SHARD_BYTES)
    return opts.max_shard_size


def plan_conversion(opts: ConvertOptions) -> Conversion:
    """Detect the input, read its metadata, find its config and tokenizer, and plan the output.

    Reads no tensor data and writes nothing; the batch uses it for its estimates.

    Raises:
        ConsolidateError: The input cannot be read, or no config.json can be found.
    """
    opts.require_paths()
    if opts.fmt not in ("safetensors", "bin"):
        raise UsageError(f"unknown format {opts.fmt}")
    if opts.lora not in LORA_MODES:
        raise UsageError(f"unknown --lora {opts.lora}", hint=f"Use one of {', '.join(LORA_MODES)}.")
    if opts.moe_layout not in MOE_LAYOUTS:
        raise UsageError(f"unknown --moe-layout {opts.moe_layout}", hint=f"Use one of {', '.join(MOE_LAYOUTS)}.")
    spec = opts.input_spec
    detected = detect_input(spec)
    check_location(opts, input_paths(opts, detected.weights_dir))
    source = read_input(spec, detected, LoraMode(opts.lora))
    adapter = source.lora is not None and source.lora.is_adapter
    found_base = source.lora.base_model if source.lora is not None else None
    assets = find_checkpoint_assets(detected.weights_dir, Path(opts.input), source.asset_dirs,
                                    str(found_base) if found_base is not None else opts.base_model_name)
    warnings: list[str] = list(assets.skipped)
    warnings.extend(source.info.get("warnings") or ())  # a reader's advisory disagreements (DeepSpeed rank files)
    if source.info.get("vllm_warning"):
        warnings.append(source.info["vllm_warning"])
    if source.info.get("base_model_error"):
        warnings.append(f"the adapter was not checked against its base model: {source.info['base_model_error']}")
    if assets.config is None and source.config is None and not adapter:  # an adapter folder has no config.json
        raise missing_config(assets, detected.weights_dir)
    if assets.tokenizer_dir is None:
        warnings.append(NO_TOKENIZER_WARNING)
    # A config the reader built from the checkpoint's own record wins over a base model's.
    config = dict(source.config) if source.config is not None else read_config(assets.config) if assets.config else {}
    if adapter:
        architecture = ArchitectureDecision(tuple(config.get("architectures") or ()), FROM_CONFIG)
        tensors, dropped, moe, parts = list(source.tensors), [], None, None
    else:
        architecture = decide_architectures(config, source, opts.architecture)
        if architecture.changed:  # only the dict written to the output; the input's file is never touched
            config["architectures"] = list(architecture.architectures)
        tensors, dropped, moe, parts = plan_names(source, config, opts.moe_layout)
    quant = None
    if opts.quantize is not None:  # each chosen weight gets a scale after it, and config.json its quantization_config
        from vllm_consolidate.plan.quantize import plan_quantization, scheme_of

        quant = plan_quantization(tensors, config, scheme_of(opts.quantize), opts.quantize_ignore,
                                  target_dtype(opts, source, config))
        tensors = quant.tensors
        config["quantization_config"] = quant.config
    plan = plan_output(tensors, target_dtype=target_dtype(opts, source, config),
                       max_shard_size=2**62 if adapter else max_shard_size(opts), fmt=opts.fmt,
                       stem="adapter_model" if adapter else None, out_dtypes=quant and quant.out_dtypes,
                       quant=quant and quant.targets)
    return Conversion(detected, source, assets, config, plan, dropped, warnings, architecture, moe, parts)


def summary_fields(conv: Conversion, opts: ConvertOptions) -> dict[str, Any]:
    """The fields of a :class:`ConvertResult` known once the conversion is planned."""
    plan = conv.plan
    info = dict(conv.source.info, how=conv.detected.how, weights_dir=str(conv.detected.weights_dir))
    return dict(tensors=len(plan.tensors), parameters=sum(t.spec.numel for t in plan.tensors),
                output_dtype=config_dtype(plan), assets=conv.assets.origin(), warnings=conv.warnings, detected=info,
                architectures=conv.architecture.to_dict(), moe=conv.moe.to_dict() if conv.moe else None,
                vlm=conv.vlm.to_dict() if conv.vlm else None, quantize=opts.quantize)


def write_files(conv: Conversion, dest: Any, progress: Callable[[int, int], None] | None) -> list[str]:
    """Write the weights and the assets into ``dest`` (a temporary folder or a staging prefix); their names."""
    plan, config = conv.plan, conv.config
    out_dtype = config_dtype(plan)
    config["torch_dtype"] = out_dtype
    config["dtype"] = out_dtype
    total, done, lock = plan.total_size, 0, threading.Lock()

    def on_bytes(n: int) -> None:
        nonlocal done
        with lock:
            done += n
            if progress:
                progress(done, total)

    adapter_config = adapter_config_of(conv)
    written = [p.name for p in write_plan(plan, dest, on_bytes)]
    if adapter_config is not None:
        written += copy_adapter_assets(conv.assets, adapter_config, dest)
    else:
        written += copy_assets(conv.assets, dest, config)
    return written


def adapter_config_of(conv: Conversion) -> Path | None:
    """The checked ``adapter_config.json`` of a LoRA adapter written as an adapter folder (``--lora adapter``)."""
    lora = conv.source.lora
    return lora.adapter_config if lora is not None and lora.is_adapter else None


def marker_info(opts: ConvertOptions, conv: Conversion, written: list[str]) -> dict[str, Any]:
    # An object-store input is read through a local mirror: the marker names its URLs, not the mirror's paths.
    source = opts.input if is_object_url(opts.input) else remote.public(str(Path(opts.input).absolute()))
    return {"source": remote.public(str(conv.detected.weights_dir)), "input": source,
            "output_dtype": config_dtype(conv.plan), "files": written,
            **({"moe": conv.moe.to_dict()} if conv.moe else {}),
            **({"quantize": opts.quantize} if opts.quantize else {})}


def validate_output(conv: Conversion, tmp: Path, output: Path, on_stage: Callable[[str], None] | None,
              adapter: bool = False, values: Any = None) -> Any:
    """The static validation of a written output (raises when it fails).

    ``values``: the ``values`` check already computed on the bytes as they were written (an object-store
    output, :class:`~vllm_consolidate.validate.values.StreamScan`); the folder's values are then not read back.
    """
    from vllm_consolidate.validate import validate_adapter_folder, validate_folder
    from vllm_consolidate.validate.source import Reference

    if on_stage:
        on_stage("validating the output (--no-validate-vllm skips this)")
    # The sampled comparison with the source proves each tensor landed where the plan put it.
    sample = Reference(str(conv.detected.weights_dir), {t.name: t.spec for t in conv.plan.tensors}, conv.dropped,
                       depth="sample")
    if adapter:
        report = validate_adapter_folder(tmp, reference=sample)
    else:
        report = validate_folder(tmp, reference=sample, scan_values=values is None)
        if values is not None:
            report.checks = [values if c.name == "values" else c for c in report.checks]
    if not report.ok:
        raise ValidationFailedError(
            "the converted folder failed validation: " + "; ".join(report.failure_messages()),
            path=output,
            hint="Rerun with --no-validate-vllm to keep the output anyway and inspect it.",
            report=report,
        )
    return report


def unchanged_single(source: SourceModel, plan: OutputPlan) -> bool:
    """A single-file HF model whose format and dtypes would not change needs no conversion."""
    src_file = source.source_files[0] if source.source_files else ""
    same_format = src_file.endswith(".safetensors") == (plan.format == "safetensors")
    same_dtypes = all(t.out_dtype == t.spec.dtype for t in plan.tensors)
    one_file = len(plan.files) == 1
    same_names = {t.spec.name for t in plan.tensors} <= {t.name for t in source.tensors}  # no MoE re-layout
    return (len(source.source_files) == 1 and one_file and same_format and same_dtypes and not source.renamed
            and same_names)
