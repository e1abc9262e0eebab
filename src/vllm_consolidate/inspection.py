"""What a checkpoint holds and what ``convert`` would do with it, from metadata only.

:func:`inspect_path` takes anything ``convert --input`` or ``batch --input-dir`` accepts and runs the
same detection, readers, asset search and planning as :func:`~vllm_consolidate.convert.plan_conversion`,
but instead of stopping at the first :class:`~vllm_consolidate.errors.ConsolidateError` it records it as
a :class:`Problem` and reports everything it could still find. No tensor data is read (the readers
unpickle metadata; the rank mix-up check samples 1 KiB at each end of each partition), torch is never
imported, and nothing is written.

A path that ``convert`` rejects as holding no checkpoint, but where ``batch --input-dir`` finds runs,
checkpoints or models below it (a folder of runs), is reported input by input, each as
``convert --input <that input>`` would see it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vllm_consolidate import dtypes
from vllm_consolidate.convert import DEFAULT_BASE_MODEL, DEFAULT_MAX_SHARD_SIZE
from vllm_consolidate.errors import ConsolidateError, InputNotFoundError
from vllm_consolidate.plan.architecture import decide_architectures
from vllm_consolidate.plan.inputs import InputSpec, detect_input, read_input
from vllm_consolidate.plan.names import plan_names
from vllm_consolidate.plan.quantize import SCHEMES, quantized_output
from vllm_consolidate.plan.shards import dtype_name, plan_output
from vllm_consolidate.read import detect as detection
from vllm_consolidate.read.assets import (
    NO_TOKENIZER_WARNING,
    Assets,
    find_checkpoint_assets,
    missing_config,
    read_config,
)
from vllm_consolidate.read.registry import HOLDS, format_of, format_of_source
from vllm_consolidate.read.runs import checkpoint_folders, inputs_in
from vllm_consolidate.read.steps import numbered_step
from vllm_consolidate.source import SourceModel, TensorSpec
from vllm_consolidate.write.estimates import estimate_peak_ram

#: The output dtypes whose size and RAM are estimated, in the order shown.
OUTPUT_DTYPES = (dtypes.float32, dtypes.bfloat16, dtypes.float16)

@dataclass
class Problem:
    """A :class:`ConsolidateError` a conversion of this input would stop at (``error`` is kept for its exit code)."""

    message: str
    path: str | None
    hint: str | None
    type: str
    error: ConsolidateError = field(repr=False, compare=False)

    @classmethod
    def of(cls, exc: ConsolidateError) -> Problem:
        return cls(exc.message, exc.path, exc.hint, type(exc).__name__, exc)

    def to_dict(self) -> dict[str, Any]:
        return {"message": self.message, "path": self.path, "hint": self.hint, "type": self.type}


@dataclass
class CheckpointEntry:
    """A ``checkpoint-N`` or ``global_stepN`` folder under the input (``name`` relative to it, ``.`` for itself)."""

    name: str
    path: str
    step: int | None
    holds: list[str]  # "zero" (rank files), "hf" (HF weights), "latest" (DeepSpeed's tag file)
    chosen: bool


@dataclass
class TensorInfo:
    """One source tensor as stored: the largest one, for RAM and ``.bin`` sizing."""

    name: str
    shape: list[int]
    dtype: str
    bytes: int


@dataclass
class OutputEstimate:
    """The output for one ``--dtype``: weight bytes, files at the default shard size, a worker's peak RSS."""

    bytes: int
    files: int
    peak_ram_bytes: int


@dataclass
class InputReport:
    """Everything found about one input; None where it could not be found (see ``problems``)."""

    path: str
    format: str | None = None
    zero_stage: int | None = None
    world_size: int | None = None
    tag: str | None = None
    deepspeed_version: str | None = None
    training_precision: str | None = None
    precision_from: str | None = None
    rank_files: dict[str, list[int]] | None = None
    weight_format: str | None = None
    weight_files: int | None = None
    checkpoints: list[CheckpointEntry] = field(default_factory=list)
    chosen: str | None = None
    how: str | None = None
    tensors: int | None = None
    parameters: int | None = None
    dropped: list[str] = field(default_factory=list)
    renamed: int = 0
    largest_tensor: TensorInfo | None = None
    output: dict[str, OutputEstimate] = field(default_factory=dict)
    assets: dict[str, Any] = field(default_factory=dict)
    architectures: dict[str, Any] = field(default_factory=dict)
    #: ``--quantize`` scheme -> output bytes (bf16 working dtype), from names and shapes (an estimate; exact for
    #: every corpus architecture, see plan.quantize.weights_to_quantize_by_name)
    quantized: dict[str, int] = field(default_factory=dict)
    moe: dict[str, Any] | None = None  # plan.moe.MoeSummary of what convert writes by default (--moe-layout auto)
    vlm: dict[str, Any] | None = None  # plan.vlm.VlmSummary: a vision-language model's parts and their sizes
    warnings: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "problems"}
        out["checkpoints"] = [asdict(c) for c in self.checkpoints]
        out["largest_tensor"] = asdict(self.largest_tensor) if self.largest_tensor else None
        out["output"] = {k: asdict(v) for k, v in self.output.items()}
        out["problems"] = [p.to_dict() for p in self.problems]
        return out


@dataclass
class InspectReport:
    """The answer of :func:`inspect_path`: one input, or each input of a folder of inputs."""

    path: str
    kind: str  # "input": the path is one input; "folder": the inputs batch --input-dir finds below it
    inputs: list[InputReport]

    @property
    def problems(self) -> list[Problem]:
        """Every problem, input by input, in the order a conversion would meet them."""
        return [p for inp in self.inputs for p in inp.problems]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "ok": self.ok, "inputs": [i.to_dict() for i in self.inputs]}


def inspect_path(path: Path | str, input_type: str = "auto", checkpoint_dir: Path | str | None = None,
                 base_model_name: str | None = DEFAULT_BASE_MODEL, architecture: str | None = None, *,
                 model_key: str | None = None) -> InspectReport:
    """Describe what ``convert --input path`` (or ``batch --input-dir path``) would read and write.

    Args:
        path: A run, ``checkpoint-N``, folder with ``latest``, ``global_stepN``, HF model, or folder of those.
        input_type: One of ``read.detect.INPUT_TYPES``, as ``convert --type``.
        checkpoint_dir: As ``convert --checkpoint-dir`` (overrides detection).
        base_model_name: As ``convert --base-model-name``: where missing config/tokenizer would come from.
        architecture: As ``convert --architecture``: the class the output's config.json would get.
        model_key: As ``convert --model-key`` (DCP checkpoints holding more than one model).

    Returns:
        The report. Problems are in it, never raised; only a bug raises.
    """
    # Absolute (symlinks kept, as the user named them) so every path in the report reads the same way.
    path = Path(path).absolute()
    ckpt = Path(checkpoint_dir).absolute() if checkpoint_dir is not None else None
    spec = InputSpec(path, input_type, ckpt, model_key, base_model_name)
    try:
        detected = detect_input(spec)
    except ConsolidateError as exc:
        below = _inputs_below(path) if isinstance(exc, InputNotFoundError) and ckpt is None else []
        if below:
            return InspectReport(str(path), "folder", [_inspect_one(replace(spec, path=p), architecture)
                                                       for p in below])
        report = InputReport(str(path), problems=[Problem.of(exc)])
        report.checkpoints = _checkpoints(path, None)
        return InspectReport(str(path), "input", [report])
    return InspectReport(str(path), "input", [_inspect_detected(spec, detected, architecture)])


def _inputs_below(path: Path) -> list[Path]:
    """The inputs ``batch --input-dir path`` finds below ``path`` (not ``path`` itself), else none."""
    try:
        found = inputs_in(path)
    except ConsolidateError:
        return []
    return [f.path for f in found if f.kind is not None and f.path != path]


def _inspect_one(spec: InputSpec, architecture: str | None) -> InputReport:
    try:
        detected = detect_input(spec)
    except ConsolidateError as exc:
        return InputReport(str(spec.path), checkpoints=_checkpoints(spec.path, None), problems=[Problem.of(exc)])
    return _inspect_detected(spec, detected, architecture)


def _inspect_detected(spec: InputSpec, detected: detection.DetectedInput, architecture: str | None) -> InputReport:
    """The steps of ``plan_conversion`` after detection, each failure recorded instead of raised."""
    report = InputReport(str(detected.input), format=detected.kind, chosen=str(detected.weights_dir),
                         how=detected.how, checkpoints=_checkpoints(Path(detected.input), detected.weights_dir))
    rank_files = format_of(detected.kind).rank_files
    if rank_files is not None:
        report.rank_files = rank_files(detected.weights_dir)
    source = None
    try:
        source = read_input(spec, detected)
    except ConsolidateError as exc:
        report.problems.append(Problem.of(exc))
    else:
        _describe_source(report, source)
    merged = source is not None and source.lora is not None and not source.lora.is_adapter
    base = str(source.lora.base_model) if merged else spec.base_model_name  # type: ignore[union-attr]
    config = _find_config(report, detected, source, base)
    _describe_precision(report, source, config)
    _describe_architectures(report, config, source, architecture)
    if source is not None:
        try:
            _describe_tensors(report, source, config or {})
        except ConsolidateError as exc:
            report.problems.append(Problem.of(exc))
    return report


def _describe_source(report: InputReport, source: SourceModel) -> None:
    info = source.info
    report.format = source.kind
    report.zero_stage = info.get("stage")
    report.world_size = info.get("world_size")
    report.tag = info.get("tag")
    report.deepspeed_version = info.get("ds_version")
    report.weight_format = info.get("format")
    report.weight_files = info.get("files")
    report.renamed = len(source.renamed)
    report.warnings.extend(info.get("warnings") or ())  # a reader's advisory disagreements (DeepSpeed rank files)


def _find_config(report: InputReport, detected: detection.DetectedInput, source: SourceModel | None,
                 base_model_name: str | None) -> dict | None:
    """Search config, tokenizer and generation config exactly as ``plan_conversion`` does; the config read."""
    # Without a source (its reader refused it), a verl checkpoint's assets are still in huggingface/.
    extra = source.asset_dirs if source else format_of(detected.kind).asset_dirs(detected.weights_dir)
    assets = find_checkpoint_assets(detected.weights_dir, Path(detected.input), extra, base_model_name)
    report.assets = _assets_dict(assets)
    report.warnings.extend(assets.skipped)
    if assets.tokenizer_dir is None:
        report.warnings.append(NO_TOKENIZER_WARNING)
    if source is not None and source.config is not None:  # built by the reader (Megatron-LM args), as convert writes
        _built_config_origin(report.assets, source)
        return dict(source.config)
    if assets.config is None:
        report.problems.append(Problem.of(missing_config(assets, detected.weights_dir)))
        return None
    try:
        return read_config(assets.config)
    except ConsolidateError as exc:
        report.problems.append(Problem.of(exc))
        return None


def _assets_dict(assets: Assets) -> dict[str, Any]:
    def origin(found: Path | None) -> str | None:
        if found is None:
            return None
        base = assets.base_model_dir
        return "base_model" if base is not None and found.is_relative_to(base) else "checkpoint"

    return {
        **assets.origin(),
        "tokenizer_files": [p.name for p in assets.tokenizer_files],
        "from": {"config": origin(assets.config), "generation_config": origin(assets.generation_config),
                 "tokenizer": origin(assets.tokenizer_dir)},
        "base_model": str(assets.base_model_dir) if assets.base_model_dir else None,
        "base_model_error": assets.base_model_error,
        "config_built_from": None,
    }


def _built_config_origin(assets: dict[str, Any], source: SourceModel) -> None:
    """Name the file the reader built config.json from (Megatron's args, Bridge's or NeMo's YAML): convert writes
    that config, not one found beside the checkpoint or in a base model."""
    assets["config"] = source.info.get("config_file")
    assets["from"]["config"] = "built"
    assets["config_built_from"] = source.info.get("layout_from")


def _describe_precision(report: InputReport, source: SourceModel | None, config: dict | None) -> None:
    """The training precision, and where it is recorded (the order ``--keep-original-precision`` uses)."""
    if source is None:
        return
    fmt = format_of_source(source)
    if fmt is None or not fmt.training:
        found, where = source.trained_dtype, "stored_dtype"
    elif source.trained_dtype is not None:
        found, where = source.trained_dtype, fmt.precision_from
    else:  # as convert's target_dtype: config.json's torch_dtype, else float32
        name = (config or {}).get("torch_dtype") or (config or {}).get("dtype")
        named = dtypes.ALIASES.get(str(name))
        found, where = (named, "config_torch_dtype") if named else (dtypes.float32, "default")
    report.training_precision = dtype_name(found) if found is not None else None
    report.precision_from = where


def _describe_architectures(report: InputReport, config: dict | None, source: SourceModel | None,
                            override: str | None) -> None:
    """What config.json says, and what convert would write (kept, inferred from model_type, or given)."""
    if config is None:
        return
    found = config.get("architectures")
    present = isinstance(found, list) and bool(found)
    report.architectures = {"present": present, "in_config": found if present else None,
                            "model_type": config.get("model_type"), "output": None, "source": None}
    if source is None:  # inferring needs the tensors (an lm_head or tied embeddings confirm the class)
        return
    try:
        decision = decide_architectures(config, source, override)
    except ConsolidateError as exc:
        report.problems.append(Problem.of(exc))
    else:
        report.architectures.update(output=list(decision.architectures), source=decision.source)


def _describe_tensors(report: InputReport, source: SourceModel, config: dict) -> None:
    """Counts, the largest tensor, and per output dtype the planned size and the batch's RAM estimate."""
    tensors, dropped, moe, parts = plan_names(source, config)
    report.moe = moe.to_dict() if moe else None
    report.vlm = parts.to_dict() if parts else None
    report.tensors = len(tensors)
    report.parameters = sum(t.numel for t in tensors)
    report.dropped = dropped
    largest = _largest(tensors)
    if largest is not None:
        report.largest_tensor = TensorInfo(largest.name, list(largest.shape), dtype_name(largest.dtype),
                                           largest.nbytes)
    for dtype in OUTPUT_DTYPES:
        plan = plan_output(tensors, target_dtype=dtype, max_shard_size=DEFAULT_MAX_SHARD_SIZE, fmt="safetensors")
        report.output[dtype_name(dtype)] = OutputEstimate(plan.total_size, len(plan.files), estimate_peak_ram(plan))
    for name, scheme in SCHEMES.items():
        specs, out_dtypes = quantized_output(tensors, scheme, dtypes.bfloat16)
        plan = plan_output(specs, target_dtype=dtypes.bfloat16, max_shard_size=DEFAULT_MAX_SHARD_SIZE,
                           fmt="safetensors", out_dtypes=out_dtypes)
        report.quantized[name] = plan.total_size


def _largest(tensors: list[TensorSpec]) -> TensorSpec | None:
    best = None
    for t in tensors:  # the first of equals, so the answer does not depend on max()'s tie rule
        if best is None or t.nbytes > best.nbytes:
            best = t
    return best


def _checkpoints(root: Path, chosen: Path | None) -> list[CheckpointEntry]:
    """Every ``checkpoint-N``/``global_stepN`` folder: the input itself, its children, their children."""
    out = []
    for folder in checkpoint_folders(root):
        found = [h for h in HOLDS if h.test(folder)]
        holds = [h.word for h in found] + (["latest"] if (folder / "latest").is_file() else [])
        name = "." if folder == root else str(folder.relative_to(root))
        inner = any(h.nested for h in found)  # the weights are in a sub-folder of the checkpoint
        picked = chosen is not None and (folder == chosen or folder == chosen.parent and inner)
        out.append(CheckpointEntry(name, str(folder), numbered_step(folder.name), holds, picked))
    return out


__all__ = ["OUTPUT_DTYPES", "CheckpointEntry", "InputReport", "InspectReport", "OutputEstimate", "Problem",
           "TensorInfo", "inspect_path"]
