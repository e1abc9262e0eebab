"""Static validation of a model folder: would vLLM load exactly what the config describes?

vLLM is lenient in ways that turn a broken folder into a model that loads with exit code 0 and then
produces garbage: it does not complain about a missing ``q_proj.weight``, a missing untied
``lm_head.weight`` or a missing ``embed_tokens.weight`` (the parameters keep their uninitialised
values), it switches to Mistral's format when it sees ``consolidated*.safetensors``, it reads every
``*.safetensors`` file when there is no index (a later file's tensors overwrite an earlier one's), and
it ignores ``.bin`` files next to safetensors. This module checks for those and the usual suspects,
from file headers and config alone plus one bounded streaming pass over the tensor bytes.

Every check yields a :class:`Check` with status ``pass``, ``warn`` or ``fail``; a check that cannot
run (no transformers, unreadable config) is a ``warn`` whose message starts with ``skipped:``. The
checks, in order:

Files
    ``weight_files``: exactly one weight family at the top level (safetensors or ``.bin``, single or
    sharded), no ``consolidated*.safetensors``, no ``.bin`` weights next to safetensors, no several
    safetensors files without an index, every header readable and consistent with the file size.
    ``index``: the ``*.index.json`` and the shards agree both ways (every file it names exists, every
    tensor is in the file it names, every tensor of a shard is listed, no unlisted shard).
    ``duplicate_tensors``: no tensor name in two files. ``bin_format``: ``.bin`` files are flat
    name -> tensor dicts (read with the allowlisted lazy reader; nothing is unpickled freely).
Config
    ``config`` (parses; ``model_type`` and ``architectures`` present), ``architecture`` (in
    :data:`SUPPORTED_ARCHITECTURES`, or in vLLM's registry when vLLM is importable here),
    ``quantization_config`` (must be absent: consolidated weights are dequantized), ``vocab_size``
    (equals the embedding rows), ``dtype`` (recorded, and equal to the stored floating dtype; warn).
Weights vs architecture
    ``wrapper_prefixes`` (``module.``, ``_orig_mod.``, ``_forward_module.``), ``empty_tensors``,
    ``missing_tensors``, ``unexpected_tensors`` and ``tensor_shapes`` against a skeleton built on the
    meta device from config.json, ``tied_embeddings``, and ``values`` (no NaN or Inf).
Tokenizer
    ``tokenizer`` (loads), ``tokenizer_roundtrip``, ``special_tokens`` (ids < vocab_size),
    ``chat_template`` (warn if absent).
Against the source (only with a reference)
    ``source_tensors`` and ``source_values`` (:mod:`vllm_consolidate.validate.source`).
Load tier (only when asked)
    ``vllm_load``: real vLLM's greedy tokens equal transformers' (:mod:`vllm_consolidate.validate.load`).

Decisions:
    * ``vocab_size`` must equal the embedding rows exactly. Fewer rows fail (ids the config allows have
      no row); more rows fail too, because vLLM's ``VocabParallelEmbedding`` weight loader asserts
      ``rows == vocab_size`` and because the skeleton comparison is exact anyway. A tokenizer longer
      than ``vocab_size`` is a warning; a special-token id >= ``vocab_size`` is a failure.
    * The tokenizer round trip compares text after Unicode NFKC normalisation, whitespace collapsing
      and stripping (SentencePiece adds and removes a leading space, some tokenizers clean up spaces).
      A difference only in letter case is a warning (an uncased tokenizer); anything else fails.
    * The skeleton's names are what ``save_pretrained`` writes: ``model.state_dict()`` of the meta
      model (so non-persistent buffers such as rotary ``inv_freq`` are not expected), minus tied
      parameters (transformers 5's ``all_tied_weights_keys``), through transformers' reverse weight
      conversion (transformers 5 fuses MoE experts in memory but saves them per expert, as vLLM reads
      them). A tied ``lm_head.weight`` may be absent; if it is stored anyway it is ignored by vLLM and
      transformers, which is a warning (``tied_embeddings``). Stored names that the model class lists
      in ``_keys_to_ignore_on_load_unexpected`` (or that end in ``rotary_emb.inv_freq``) are warnings.
    * A square weight stored transposed has the right name, shape and dtype, so no check of the folder
      alone detects it. No cheap statistic (row versus column norms and the like) tells a random or
      trained square matrix from its transpose reliably, so none is used. The load tier does not
      catch it either: vLLM and transformers read the same bytes and agree on the same wrong answer.
      The source checkpoint does tell: with a :class:`~vllm_consolidate.validate.source.Reference`
      (``validate --against SOURCE``, and a sampled one after every conversion), the
      ``source_tensors`` and ``source_values`` checks compare the folder with the source and name a
      transposed tensor as such (:mod:`vllm_consolidate.validate.source`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import traceback
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from vllm_consolidate import dtypes
from vllm_consolidate.dtypes import DType
from vllm_consolidate.errors import CorruptCheckpointError, UnsafePickleError, UnsupportedCheckpointError
from vllm_consolidate.read.ranges import equal_bytes, iter_chunks
from vllm_consolidate.readers.hf import StoredTensor, stored_bin, stored_safetensors

if TYPE_CHECKING:
    from vllm_consolidate.validate.source import Reference

PASS, WARN, FAIL = "pass", "warn", "fail"

#: Common decoder architectures (config.json ``architectures``) that vLLM serves. When vLLM is
#: importable in this interpreter its registry is consulted as well.
SUPPORTED_ARCHITECTURES: frozenset[str] = frozenset({
    "AquilaForCausalLM", "ArcticForCausalLM", "BaiChuanForCausalLM", "BaichuanForCausalLM",
    "BloomForCausalLM", "ChatGLMModel", "ChatGLMForConditionalGeneration", "CohereForCausalLM",
    "Cohere2ForCausalLM", "DbrxForCausalLM", "DeciLMForCausalLM", "DeepseekForCausalLM",
    "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "ExaoneForCausalLM", "FalconForCausalLM",
    "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration",
    "GlmForCausalLM", "Glm4ForCausalLM", "GPT2LMHeadModel", "GPTBigCodeForCausalLM", "GPTJForCausalLM",
    "GPTNeoXForCausalLM", "GraniteForCausalLM", "GraniteMoeForCausalLM", "InternLMForCausalLM",
    "InternLM2ForCausalLM", "InternLM3ForCausalLM", "JambaForCausalLM", "LlamaForCausalLM",
    "MiniCPMForCausalLM", "MiniCPM3ForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
    "MPTForCausalLM", "NemotronForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM", "OlmoeForCausalLM",
    "OPTForCausalLM", "OrionForCausalLM", "PersimmonForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM",
    "PhiMoEForCausalLM", "QWenLMHeadModel", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM", "StableLmForCausalLM", "Starcoder2ForCausalLM", "SolarForCausalLM",
    "XverseForCausalLM", "GptOssForCausalLM", "SmolLM3ForCausalLM",
})

#: Prefixes that training wrappers (DDP/DeepSpeed, torch.compile, Lightning Fabric) add to names.
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "_forward_module.")

#: ``.bin`` files vLLM skips as training state (``filter_files_not_needed_for_inference``).
NON_WEIGHT_BIN_FILES: frozenset[str] = frozenset({"training_args.bin", "optimizer.bin"})

#: File names that make up a tokenizer; if none is present the tokenizer checks only warn.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
    "spiece.model", "sentencepiece.bpe.model", "tekken.json", "special_tokens_map.json",
)

#: Text the tokenizer must encode and decode back (plain ASCII, no space before punctuation).
ROUNDTRIP_SAMPLE = "Hello world! The quick brown fox jumps over the lazy dog: 12345, 67.8 and more."

#: Bytes read per step by the NaN/Inf scan; memory used by the scan is bounded by a small multiple.
SCAN_CHUNK_BYTES = 16 * 2**20

#: Names shown in a message before "and N more".
SHOW = 5

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_CONFIG_DTYPES: dict[str, DType] = {
    "float32": dtypes.float32, "float": dtypes.float32, "fp32": dtypes.float32, "float16": dtypes.float16,
    "half": dtypes.float16, "fp16": dtypes.float16, "bfloat16": dtypes.bfloat16, "bf16": dtypes.bfloat16,
    "float64": dtypes.float64,
}
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


# -- report -------------------------------------------------------------------------------------------

@dataclass
class Check:
    """One check's outcome.

    Attributes:
        name: Stable identifier of the check (e.g. ``missing_tensors``).
        status: ``pass``, ``warn`` or ``fail``.
        message: One line for people.
        details: Machine-readable facts (full name lists, tokens, a traceback if the check crashed).
    """

    name: str
    status: str
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class ValidationReport:
    """All checks run on one folder."""

    path: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed (warnings do not count)."""
        return all(c.status != FAIL for c in self.checks)

    def get(self, name: str) -> Check | None:
        """The check called ``name``, if it ran."""
        return next((c for c in self.checks if c.name == name), None)

    def failure_messages(self) -> list[str]:
        """``name: message`` of every failed check."""
        return [f"{c.name}: {c.message}" for c in self.checks if c.status == FAIL]

    def warning_messages(self) -> list[str]:
        """``name: message`` of every warning."""
        return [f"{c.name}: {c.message}" for c in self.checks if c.status == WARN]

    def counts(self) -> dict[str, int]:
        """How many checks passed, warned and failed."""
        return {s: sum(c.status == s for c in self.checks) for s in (PASS, WARN, FAIL)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: path, ok, counts and every check."""
        return {
            "path": str(self.path),
            "ok": self.ok,
            "counts": self.counts(),
            "checks": [
                {"name": c.name, "status": c.status, "message": c.message, "details": c.details}
                for c in self.checks
            ],
        }


def _few(names: Iterable[str], show: int = SHOW) -> str:
    """``a, b, c and 4 more`` (sorted)."""
    items = sorted(names)
    text = ", ".join(items[:show])
    return f"{text} and {len(items) - show} more" if len(items) > show else text


def _skipped(name: str, reason: str) -> Check:
    return Check(name, WARN, f"skipped: {reason}")


# -- reading what is stored ---------------------------------------------------------------------------

@dataclass
class _Stored:
    """What the files hold, as the file checks found it."""

    family: str | None = None  # "safetensors", "bin" or None
    files: list[Path] = field(default_factory=list)
    index_path: Path | None = None
    by_file: dict[str, list[StoredTensor]] = field(default_factory=dict)
    tensors: dict[str, StoredTensor] = field(default_factory=dict)
    bin_errors: dict[str, str] = field(default_factory=dict)


# -- the validator ------------------------------------------------------------------------------------

def _transformers() -> ModuleType | None:
    """transformers, or None when it is not installed (it is an optional dependency)."""
    if importlib.util.find_spec("transformers") is None:
        return None
    try:
        import transformers
    except ImportError:
        return None
    return transformers


@contextlib.contextmanager
def _quiet(tf: ModuleType) -> Iterator[None]:
    """Silence transformers' logging and Python warnings (the library never prints)."""
    logging = tf.utils.logging
    old = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(old)


def _vllm_registry() -> frozenset[str]:
    """Architectures of vLLM's registry, when vLLM is importable here; else empty."""
    if importlib.util.find_spec("vllm") is None:
        return frozenset()
    try:
        from vllm import ModelRegistry

        return frozenset(ModelRegistry.get_supported_archs())
    except Exception:  # noqa: BLE001 - a broken vLLM install must not break validation
        return frozenset()


@dataclass
class _Skeleton:
    """Names and shapes expected from the config, as save_pretrained would write them."""

    class_name: str
    required: dict[str, tuple[int, ...]]  # what save_pretrained writes
    allowed: dict[str, tuple[int, ...]]  # plus tied parameters, which may be stored too
    tied: dict[str, str]
    ignorable: list[str]
    embedding: str | None
    # transformers 5's in-memory names (fused MoE experts), when they differ from what save_pretrained writes
    memory_required: dict[str, tuple[int, ...]] | None = None
    memory_allowed: dict[str, tuple[int, ...]] | None = None


class _Validator:
    def __init__(self, folder: Path, *, scan_values: bool, chunk_bytes: int, reference: Reference | None = None):
        self.folder = folder
        self.reference = reference
        self.scan_values = scan_values
        self.chunk_bytes = max(64, chunk_bytes - chunk_bytes % 16)
        self.report = ValidationReport(folder)
        self.stored = _Stored()
        self.config: dict[str, Any] | None = None
        self.tf: ModuleType | None = None
        self.skeleton: _Skeleton | None = None
        self.skeleton_error: Check | None = None
        self.tokenizer: Any = None

    def add(self, check: Check) -> None:
        self.report.checks.append(check)

    def run(self, name: str, func: Callable[[], Check | list[Check]]) -> None:
        """Run one check function; a crash becomes a failed check carrying the traceback."""
        try:
            result = func()
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            result = Check(name, FAIL, f"the check crashed: {type(exc).__name__}: {exc}",
                           {"traceback": traceback.format_exc()})
        for check in result if isinstance(result, list) else [result]:
            self.add(check)

    def validate(self) -> ValidationReport:
        if not self.folder.is_dir():
            self.add(Check("folder", FAIL, f"{self.folder} is not a folder"))
            return self.report
        self.run("weight_files", self.check_weight_files)
        self.run("index", self.check_index)
        self.run("duplicate_tensors", self.check_duplicates)
        self.run("bin_format", self.check_bin_format)
        self.run("config", self.check_config)
        self.run("architecture", self.check_architecture)
        self.run("quantization_config", self.check_quantization)
        self.tf = _transformers()
        if self.tf is not None and self.config is not None:
            self.run("skeleton", self.build_skeleton)
        self.run("vocab_size", self.check_vocab)
        self.run("dtype", self.check_dtype)
        self.run("wrapper_prefixes", self.check_prefixes)
        self.run("empty_tensors", self.check_empty)
        self.run("missing_tensors", self.check_against_skeleton)
        self.run("tied_embeddings", self.check_tied)
        self.run("values", self.check_values)
        if self.reference is not None:
            self.run("source_values", self.check_against_reference)
        self.run("tokenizer", self.check_tokenizer)
        return self.report

    # -- files ----------------------------------------------------------------------------------------

    def check_weight_files(self) -> Check:
        top = sorted(p for p in self.folder.iterdir() if p.is_file())
        st_all = [p for p in top if p.name.endswith(".safetensors")]
        consolidated = [p for p in st_all if p.name.startswith("consolidated")]
        st = [p for p in st_all if p not in consolidated]
        bins = [p for p in top if p.name.endswith(".bin") and p.name not in NON_WEIGHT_BIN_FILES]
        problems: list[str] = []
        if consolidated:
            problems.append(
                f"{_few(p.name for p in consolidated)}: Mistral's native format; vLLM switches to it and reads "
                "only that file instead of the HF weights. Delete it"
            )
        if st and bins:
            problems.append(
                f".bin weights next to safetensors ({_few(p.name for p in bins)}): vLLM loads only the "
                "*.safetensors files and ignores them. Keep one format"
            )
        if st:
            self.stored.family, self.stored.files = "safetensors", st
            index = self.folder / SAFETENSORS_INDEX
        elif bins:
            self.stored.family, self.stored.files = "bin", bins
            index = self.folder / BIN_INDEX
        else:
            problems.append("no weight files (*.safetensors or pytorch_model*.bin) at the top level")
            return Check("weight_files", FAIL, "; ".join(problems))
        self.stored.index_path = index if index.is_file() else None
        if self.stored.index_path is None and len(self.stored.files) > 1:
            problems.append(
                f"{len(self.stored.files)} {self.stored.family} files ({_few(p.name for p in self.stored.files)}) "
                f"and no {index.name}: vLLM loads every file, and a later file's tensors overwrite an earlier "
                "one's; transformers reads only one"
            )
        read = stored_safetensors if self.stored.family == "safetensors" else stored_bin
        for p in self.stored.files:
            try:
                tensors = read(p)
            except (CorruptCheckpointError, UnsupportedCheckpointError, UnsafePickleError) as exc:
                problems.append(f"{p.name}: {exc.message}")
                self.stored.bin_errors[p.name] = exc.message
                continue
            self.stored.by_file[p.name] = tensors
            for t in tensors:
                self.stored.tensors.setdefault(t.name, t)
        unknown = sorted({t.dtype_code for ts in self.stored.by_file.values() for t in ts if t.dtype is None})
        if unknown:
            problems.append(f"dtypes this tool cannot read: {', '.join(unknown)}")
        details = {"family": self.stored.family, "files": [p.name for p in self.stored.files],
                   "index": self.stored.index_path.name if self.stored.index_path else None,
                   "tensors": len(self.stored.tensors)}
        if problems:
            return Check("weight_files", FAIL, "; ".join(problems), details)
        layout = "sharded" if self.stored.index_path else "single file"
        msg = f"{self.stored.family}, {layout}: {_few((p.name for p in self.stored.files), 3)}"
        if self.stored.family == "safetensors" and self.stored.index_path is None and st[0].name != "model.safetensors":
            return Check("weight_files", WARN, msg + "; transformers expects the single file to be model.safetensors",
                         details)
        return Check("weight_files", PASS, f"{msg}; {len(self.stored.tensors)} tensors", details)

    def check_index(self) -> Check:
        if self.stored.family is None:
            return _skipped("index", "no weight files")
        path = self.stored.index_path
        if path is None:
            return Check("index", PASS, "no index (single file)")
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return Check("index", FAIL, f"{path.name} is unreadable or has no weight_map ({exc})")
        problems: list[str] = []
        named = set(weight_map.values())
        absent = sorted(f for f in named if not (self.folder / f).is_file())
        if absent:
            problems.append(f"names files that do not exist: {_few(absent)}")
        wrong: list[str] = []
        for tensor, fname in weight_map.items():
            if fname in self.stored.by_file and all(t.name != tensor for t in self.stored.by_file[fname]):
                wrong.append(tensor)
        if wrong:
            problems.append(f"{len(wrong)} tensors are not in the file the index names: {_few(wrong)}")
        unlisted_files = sorted(p.name for p in self.stored.files if p.name not in named)
        if unlisted_files:
            problems.append(
                f"unlisted shard(s) {_few(unlisted_files)}: vLLM skips files the index does not name (and reads "
                "every file if the index is lost); delete them or add them to the index"
            )
        unlisted: list[str] = []
        for fname, tensors in self.stored.by_file.items():
            if fname in named:
                unlisted += [t.name for t in tensors if weight_map.get(t.name) != fname]
        if unlisted:
            problems.append(f"{len(unlisted)} stored tensors are not listed under their file: {_few(unlisted)}")
        details = {"index": path.name, "files": sorted(named), "tensors": len(weight_map)}
        if problems:
            return Check("index", FAIL, f"{path.name}: " + "; ".join(problems), details)
        return Check("index", PASS, f"{path.name} lists {len(weight_map)} tensors in {len(named)} files", details)

    def check_duplicates(self) -> Check:
        seen: dict[str, list[str]] = {}
        for fname, tensors in self.stored.by_file.items():
            for t in tensors:
                seen.setdefault(t.name, []).append(fname)
        dups = {n: files for n, files in seen.items() if len(files) > 1}
        if dups:
            first = sorted(dups)[0]
            return Check(
                "duplicate_tensors", FAIL,
                f"{len(dups)} tensor names are stored in more than one file ({_few(dups)}; e.g. {first} in "
                f"{' and '.join(dups[first])}); vLLM loads both and the later file wins",
                {"duplicates": dups},
            )
        return Check("duplicate_tensors", PASS, "every tensor name is stored once")

    def check_bin_format(self) -> Check:
        if self.stored.family != "bin":
            return Check("bin_format", PASS, "no .bin weights")
        if self.stored.bin_errors:
            return Check("bin_format", FAIL, "; ".join(f"{f}: {e}" for f, e in self.stored.bin_errors.items()))
        return Check("bin_format", PASS, f"{len(self.stored.files)} .bin files are flat name -> tensor dicts")

    # -- config ---------------------------------------------------------------------------------------

    def check_config(self) -> Check:
        path = self.folder / "config.json"
        if not path.is_file():
            return Check("config", FAIL, "no config.json")
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return Check("config", FAIL, f"config.json does not parse: {exc}")
        if not isinstance(config, dict):
            return Check("config", FAIL, "config.json is not a JSON object")
        self.config = config
        missing = [k for k in ("model_type", "architectures") if not config.get(k)]
        if missing:
            return Check("config", FAIL, f"config.json lacks {' and '.join(missing)}; vLLM needs both")
        if not isinstance(config["architectures"], list):
            return Check("config", FAIL, "config.json 'architectures' is not a list")
        return Check("config", PASS, f"model_type {config['model_type']}, architectures {config['architectures']}")

    def _text_config_value(self, key: str) -> Any:
        assert self.config is not None
        if key in self.config:
            return self.config[key]
        return (self.config.get("text_config") or {}).get(key)

    def check_architecture(self) -> Check:
        if self.config is None or not isinstance(self.config.get("architectures"), list):
            return _skipped("architecture", "no usable config.json")
        archs = [str(a) for a in self.config["architectures"]]
        registry = _vllm_registry()
        known = [a for a in archs if a in SUPPORTED_ARCHITECTURES or a in registry]
        source = "vLLM's registry" if registry else "the package's list of vLLM architectures"
        if known:
            return Check("architecture", PASS, f"{known[0]} is supported by vLLM")
        return Check(
            "architecture", FAIL,
            f"architecture {', '.join(archs) or '(none)'} is not one vLLM supports (checked {source}); vLLM would "
            "refuse it or need --trust-remote-code. If your vLLM supports it, prove it with --load",
            {"architectures": archs},
        )

    def check_quantization(self) -> Check:
        if self.config is None:
            return _skipped("quantization_config", "no usable config.json")
        holders = [self.config, self.config.get("text_config") or {}]
        for holder in holders:
            if isinstance(holder, dict) and holder.get("quantization_config"):
                method = (holder["quantization_config"] or {}).get("quant_method", "?")
                return Check(
                    "quantization_config", FAIL,
                    f"config.json keeps a quantization_config (quant_method {method}) but consolidated weights are "
                    "dequantized; vLLM would try to load them as quantized. Remove it",
                )
        return Check("quantization_config", PASS, "no quantization_config")

    # -- skeleton -------------------------------------------------------------------------------------

    def build_skeleton(self) -> list[Check]:
        tf = self.tf
        assert tf is not None and self.config is not None
        with _quiet(tf):
            try:
                config = tf.AutoConfig.from_pretrained(str(self.folder), trust_remote_code=False)
            except Exception as exc:  # noqa: BLE001 - unknown model_type, custom code, ...
                self.skeleton_error = _skipped(
                    "missing_tensors",
                    f"transformers {tf.__version__} cannot read config.json ({type(exc).__name__}: {exc})",
                )
                return []
            model = None
            errors: list[str] = []
            for arch in [str(a) for a in self.config.get("architectures") or []][:1]:
                try:
                    cls = getattr(tf, arch)
                except Exception:  # noqa: BLE001 - not a transformers class
                    continue
                if isinstance(cls, type) and issubclass(cls, tf.PreTrainedModel):
                    try:
                        with torch.device("meta"):
                            model = cls._from_config(config)
                    except Exception as exc:  # noqa: BLE001
                        errors.append(f"{arch}: {type(exc).__name__}: {exc}")
            if model is None:
                try:
                    with torch.device("meta"):
                        model = tf.AutoModelForCausalLM.from_config(config, trust_remote_code=False)
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"AutoModelForCausalLM: {type(exc).__name__}: {exc}")
            if model is None:
                self.skeleton_error = Check(
                    "missing_tensors", FAIL,
                    f"config.json does not build a model with transformers {tf.__version__}: {'; '.join(errors)}",
                )
                return []
            self.skeleton = _skeleton_of(model)
        return []

    def _embedding_name(self) -> str | None:
        if self.skeleton is not None and self.skeleton.embedding in self.stored.tensors:
            return self.skeleton.embedding
        for suffix in ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight"):
            hits = sorted(n for n in self.stored.tensors if n.endswith(suffix))
            if hits:
                return hits[0]
        return None

    def check_vocab(self) -> Check:
        if self.config is None:
            return _skipped("vocab_size", "no usable config.json")
        vocab = self._text_config_value("vocab_size")
        if not isinstance(vocab, int):
            return Check("vocab_size", FAIL, "config.json has no integer vocab_size")
        name = self._embedding_name()
        if name is None:
            return _skipped("vocab_size", "no input embedding tensor is stored to compare vocab_size with")
        rows = self.stored.tensors[name].shape[0] if self.stored.tensors[name].shape else 0
        details = {"vocab_size": vocab, "embedding": name, "rows": rows}
        if rows < vocab:
            return Check("vocab_size", FAIL,
                         f"vocab_size {vocab} but {name} has only {rows} rows: token ids {rows}..{vocab - 1} have no "
                         "embedding", details)
        if rows > vocab:
            return Check("vocab_size", FAIL,
                         f"vocab_size {vocab} but {name} has {rows} rows; vLLM's embedding loader requires them "
                         "equal (set vocab_size to the rows, e.g. after resize_token_embeddings)", details)
        return Check("vocab_size", PASS, f"vocab_size {vocab} equals the rows of {name}", details)

    def check_dtype(self) -> Check:
        if self.config is None:
            return _skipped("dtype", "no usable config.json")
        weight: dict[DType, int] = {}
        for t in self.stored.tensors.values():
            if t.dtype is not None and t.dtype.is_floating_point:
                weight[t.dtype] = weight.get(t.dtype, 0) + t.nbytes
        stored = max(weight, key=weight.__getitem__) if weight else None
        stored_name = str(stored).removeprefix("torch.") if stored else None
        recorded = self._text_config_value("torch_dtype") or self._text_config_value("dtype")
        details = {"config": recorded, "stored": stored_name}
        if not recorded:
            return Check("dtype", WARN,
                         f"config.json records no torch_dtype/dtype; the weights are {stored_name}. vLLM's "
                         "dtype=auto then assumes float32", details)
        if stored is None:
            return Check("dtype", PASS, f"config dtype {recorded}; no floating tensors stored", details)
        if _CONFIG_DTYPES.get(str(recorded)) != stored:
            return Check("dtype", WARN,
                         f"config.json says {recorded} but the weights are stored as {stored_name}; vLLM's "
                         "dtype=auto follows the config", details)
        return Check("dtype", PASS, f"{recorded}, as stored", details)

    # -- weights vs architecture ----------------------------------------------------------------------

    def check_prefixes(self) -> Check:
        hits = sorted(n for n in self.stored.tensors if n.startswith(WRAPPER_PREFIXES))
        if hits:
            prefixes = sorted({p for p in WRAPPER_PREFIXES for n in hits if n.startswith(p)})
            return Check("wrapper_prefixes", FAIL,
                         f"{len(hits)} tensor names start with a training wrapper's prefix "
                         f"({', '.join(repr(p) for p in prefixes)}): {_few(hits, 3)}; strip it", {"names": hits})
        return Check("wrapper_prefixes", PASS, "no module./_orig_mod./_forward_module. prefixes")

    def check_empty(self) -> Check:
        empty = sorted(n for n, t in self.stored.tensors.items() if t.numel == 0)
        if empty:
            return Check("empty_tensors", FAIL,
                         f"{len(empty)} empty tensors (0 elements, e.g. ZeRO-3 placeholders): {_few(empty)}",
                         {"names": empty})
        return Check("empty_tensors", PASS, "no empty tensors")

    def check_against_skeleton(self) -> list[Check]:
        names = ("missing_tensors", "unexpected_tensors", "tensor_shapes")
        if self.tf is None:
            return [_skipped(n, "transformers not installed") for n in names]
        if self.config is None:
            return [_skipped(n, "no usable config.json") for n in names]
        if self.skeleton is None:
            first = self.skeleton_error or _skipped("missing_tensors", "no model skeleton")
            reason = first.message.removeprefix("skipped: ")
            return [first] + [_skipped(n, reason) for n in names[1:]]
        sk = self.skeleton
        stored = self.stored.tensors
        cls = sk.class_name
        layouts = [("save_pretrained", sk.required, sk.allowed)]
        if sk.memory_required is not None and sk.memory_allowed is not None:
            layouts.append(("in-memory", sk.memory_required, sk.memory_allowed))

        def mismatch(layout: tuple[str, dict, dict]) -> int:
            _, required, allowed = layout
            wrong = sum(1 for n in stored if n in allowed and tuple(stored[n].shape) != tuple(allowed[n]))
            return len(set(required) - set(stored)) + len(set(stored) - set(allowed)) + wrong

        layout, required, allowed = min(layouts, key=mismatch)  # the first (save_pretrained) wins ties
        missing = sorted(set(required) - set(stored))
        extra = sorted(set(stored) - set(allowed))
        ignorable = [n for n in extra if n.endswith(_IGNORABLE_SUFFIXES) or any(re.search(p, n) for p in sk.ignorable)]
        unexpected = [n for n in extra if n not in ignorable]
        out = []
        if missing:
            out.append(Check("missing_tensors", FAIL,
                             f"{len(missing)} tensors that {cls} needs are not stored: {_few(missing)}; vLLM would "
                             "leave them uninitialised without an error", {"names": missing}))
        elif layout == "in-memory":
            out.append(Check("missing_tensors", WARN,
                             f"all {len(required)} tensors of {cls} are stored, but in transformers 5's in-memory "
                             "layout (fused MoE experts) rather than the per-expert names save_pretrained writes; "
                             "recent vLLM and transformers 5 read it, older vLLM versions do not",
                             {"layout": layout}))
        else:
            out.append(Check("missing_tensors", PASS, f"all {len(required)} tensors of {cls} are stored",
                             {"layout": layout}))
        if unexpected:
            out.append(Check("unexpected_tensors", FAIL,
                             f"{len(unexpected)} stored tensors are not part of {cls}: {_few(unexpected)}",
                             {"names": unexpected}))
        elif ignorable:
            out.append(Check("unexpected_tensors", WARN,
                             f"{len(ignorable)} stored tensors that loaders ignore: {_few(ignorable)}",
                             {"names": ignorable}))
        else:
            out.append(Check("unexpected_tensors", PASS, f"no tensors outside {cls}"))
        wrong = {n: (list(stored[n].shape), list(allowed[n])) for n in stored
                 if n in allowed and tuple(stored[n].shape) != tuple(allowed[n])}
        if wrong:
            first = sorted(wrong)[:3]
            text = "; ".join(f"{n} is {wrong[n][0]}, expected {wrong[n][1]}" for n in first)
            more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
            out.append(Check("tensor_shapes", FAIL, f"{len(wrong)} shapes differ from the config's: {text}{more}",
                             {"mismatches": {n: {"stored": s, "expected": e} for n, (s, e) in wrong.items()}}))
        else:
            out.append(Check("tensor_shapes", PASS,
                             "every stored shape matches the config (a square weight stored transposed has the "
                             "right shape too: --against SOURCE compares the values)"))
        return out

    def check_tied(self) -> Check:
        if self.skeleton is None:
            return _skipped("tied_embeddings", "no model skeleton" if self.tf else "transformers not installed")
        tied = self.skeleton.tied
        if not tied:
            return Check("tied_embeddings", PASS, "output embedding is not tied; it is stored separately")
        stored = sorted(n for n in tied if n in self.stored.tensors)
        same = [n for n in stored if tied[n] in self.stored.tensors
                and _same_bytes(self.stored.tensors[n], self.stored.tensors[tied[n]], self.chunk_bytes)]
        if stored and len(same) == len(stored):
            return Check("tied_embeddings", PASS,
                         f"tied: {_few(stored)} is stored too, identical to {_few({tied[n] for n in stored})}",
                         {"tied": tied})
        if stored:
            return Check("tied_embeddings", WARN,
                         f"the config ties {_few(stored)} to {_few({tied[n] for n in stored})} but it is stored "
                         "too; vLLM and transformers ignore the stored copy. If it was trained separately, set "
                         "tie_word_embeddings to false", {"tied": tied})
        return Check("tied_embeddings", PASS, f"tied: {_few(tied)} uses {_few(set(tied.values()))}", {"tied": tied})

    def check_values(self) -> Check:
        if not self.scan_values:
            return _skipped("values", "value scan turned off")
        bad: dict[str, dict[str, int]] = {}
        unscanned: list[str] = []
        scanned = 0
        buf = bytearray(self.chunk_bytes)
        for t in self.stored.tensors.values():
            if t.dtype is None or not t.dtype.is_floating_point or t.numel == 0:
                continue
            if t.offset < 0:
                unscanned.append(t.name)
                continue
            try:
                nan, inf = _scan(t, buf)
            except CorruptCheckpointError as exc:
                return Check("values", FAIL, f"{t.file}: {exc.message} (inside {t.name})")
            scanned += t.nbytes
            if nan or inf:
                bad[t.name] = {"nan": nan, "inf": inf}
        if bad:
            first = sorted(bad)[:3]
            text = ", ".join(f"{n} ({bad[n]['nan']} NaN, {bad[n]['inf']} Inf)" for n in first)
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            return Check("values", FAIL, f"{len(bad)} tensors hold NaN or Inf: {text}{more}", {"tensors": bad})
        if unscanned:
            return Check("values", WARN, f"no NaN/Inf in {scanned / 1e6:.1f} MB; not scanned (non-contiguous): "
                         f"{_few(unscanned)}")
        return Check("values", PASS, f"no NaN or Inf in {scanned / 1e6:.1f} MB of floating-point weights")

    def check_against_reference(self) -> list[Check]:
        from vllm_consolidate.validate.source import compare_with_reference

        assert self.reference is not None
        return compare_with_reference(self.stored.tensors, self.reference)

    # -- tokenizer ------------------------------------------------------------------------------------

    def check_tokenizer(self) -> list[Check]:
        names = ("tokenizer", "tokenizer_roundtrip", "special_tokens", "chat_template")
        present = [f for f in TOKENIZER_FILES if (self.folder / f).is_file()]
        if not present:
            return [Check("tokenizer", WARN,
                          "no tokenizer files; vLLM needs a tokenizer unless it runs with skip_tokenizer_init=True "
                          "(or --tokenizer points elsewhere)")]
        if self.tf is None:
            return [_skipped(n, "transformers not installed") for n in names]
        tf = self.tf
        try:
            with _quiet(tf):
                tok = tf.AutoTokenizer.from_pretrained(str(self.folder), trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001
            return [Check("tokenizer", FAIL, f"AutoTokenizer cannot load it ({type(exc).__name__}: {exc})",
                          {"files": present, "traceback": traceback.format_exc()})]
        self.tokenizer = tok
        out = [Check("tokenizer", PASS, f"{type(tok).__name__} with {len(tok)} tokens", {"files": present})]
        out.append(_roundtrip(tok))
        out.append(self._special_tokens(tok))
        template = getattr(tok, "chat_template", None)
        if template:
            out.append(Check("chat_template", PASS, "chat template present"))
        else:
            out.append(Check("chat_template", WARN,
                             "no chat template: vLLM's chat API (/v1/chat/completions, LLM.chat) needs one or an "
                             "explicit --chat-template"))
        return out

    def _special_tokens(self, tok: Any) -> Check:
        vocab = self._text_config_value("vocab_size") if self.config else None
        if not isinstance(vocab, int):
            return _skipped("special_tokens", "no vocab_size in config.json")
        ids: dict[str, int] = {}
        for token, tid in zip(tok.all_special_tokens, tok.all_special_ids):
            if tid is not None:
                ids[f"{token!r}"] = int(tid)
        sources = [("config.json", self.config or {})]
        gen = self.folder / "generation_config.json"
        if gen.is_file():
            with contextlib.suppress(OSError, ValueError):
                sources.append(("generation_config.json", json.loads(gen.read_text())))
        for fname, holder in sources:
            for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
                value = holder.get(key) if isinstance(holder, dict) else None
                for i, v in enumerate(value if isinstance(value, list) else [value]):
                    if isinstance(v, int):
                        ids[f"{fname} {key}" + (f"[{i}]" if isinstance(value, list) else "")] = v
        bad = {k: v for k, v in ids.items() if not 0 <= v < vocab}
        details = {"vocab_size": vocab, "ids": ids, "tokenizer_len": len(tok)}
        if bad:
            return Check("special_tokens", FAIL,
                         f"special token ids outside 0..{vocab - 1}: "
                         + ", ".join(f"{k}={v}" for k, v in sorted(bad.items())[:SHOW]), details)
        if len(tok) > vocab:
            return Check("special_tokens", WARN,
                         f"the tokenizer has {len(tok)} tokens but vocab_size is {vocab}; ids >= {vocab} would "
                         "index past the embedding", details)
        return Check("special_tokens", PASS, f"{len(ids)} special token ids are < vocab_size {vocab}", details)


def _skeleton_of(model: Any) -> _Skeleton:
    """Names and shapes save_pretrained would write for ``model`` (on the meta device)."""
    state = dict(model.state_dict())
    for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
        state.pop(key, None)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    if not tied and getattr(model.config, "tie_word_embeddings", False):
        legacy = getattr(model, "_tied_weights_keys", None) or {}
        tied = dict(legacy) if isinstance(legacy, dict) else {k: "" for k in legacy}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers: names are saved as they are in memory
        def revert_weight_conversion(_model: Any, sd: dict[str, Any]) -> dict[str, Any]:
            return sd
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
        untied = remove_tied_weights_from_state_dict(dict(state), model)
    except ImportError:
        untied = {k: v for k, v in state.items() if k not in tied}
    required = {k: tuple(v.shape) for k, v in revert_weight_conversion(model, untied).items()}
    allowed = {k: tuple(v.shape) for k, v in revert_weight_conversion(model, dict(state)).items()}
    allowed.update(required)
    memory_required = {k: tuple(v.shape) for k, v in untied.items()}
    memory_allowed = {k: tuple(v.shape) for k, v in state.items()}
    same = memory_required == required
    embedding = None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        embedding = next((f"{n}.weight" for n, m in model.named_modules() if m is emb), None)
    ignorable = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    return _Skeleton(type(model).__name__, required, allowed, tied, ignorable, embedding,
                     None if same else memory_required, None if same else memory_allowed)


def _scan(t: StoredTensor, buf: bytearray) -> tuple[int, int]:
    """Count NaN and Inf in one tensor, read in chunks of (at most) ``len(buf)`` bytes."""
    assert t.dtype is not None
    nan = inf = 0
    for chunk in iter_chunks(t.segments, len(buf) - len(buf) % t.dtype.itemsize, buffer=buf):
        values = torch.frombuffer(chunk, dtype=t.dtype.torch)
        if t.dtype.itemsize == 1 or t.dtype.is_complex:
            values = values.to(torch.complex64 if t.dtype.is_complex else torch.float32)
        if not bool(torch.isfinite(values).all()):
            nan += int(torch.isnan(values).sum())
            inf += int(torch.isinf(values).sum())
    return nan, inf


def _same_bytes(a: StoredTensor, b: StoredTensor, chunk: int) -> bool:
    """Whether two stored tensors hold identical bytes (same dtype and shape), compared chunk by chunk."""
    if a.dtype != b.dtype or a.shape != b.shape or a.offset < 0 or b.offset < 0:
        return False
    if a.path == b.path and a.offset == b.offset:
        return True  # one storage saved under two names


    chunks = zip(iter_chunks(a.segments, chunk, buffer=bytearray(chunk)),
                 iter_chunks(b.segments, chunk, buffer=bytearray(chunk)))
    return all(equal_bytes(x, y) for x, y in chunks)


def _normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split())


def _roundtrip(tok: Any) -> Check:
    ids = tok.encode(ROUNDTRIP_SAMPLE, add_special_tokens=False)
    back = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    details = {"sample": ROUNDTRIP_SAMPLE, "ids": list(ids), "decoded": back}
    a, b = _normalise(ROUNDTRIP_SAMPLE), _normalise(back)
    if a == b:
        return Check("tokenizer_roundtrip", PASS, f"a sample encodes to {len(ids)} tokens and decodes back", details)
    if a.casefold() == b.casefold():
        return Check("tokenizer_roundtrip", WARN, "the sample decodes back only up to letter case (uncased tokenizer)",
                     details)
    return Check("tokenizer_roundtrip", FAIL, f"encode->decode changes the text: {ROUNDTRIP_SAMPLE!r} -> {back!r}",
                 details)


def _default_prompts(report: ValidationReport, config_path: Path) -> list[str] | list[list[int]] | None:
    """Text prompts when the tokenizer works; else a few token-id prompts below vocab_size."""
    tok = report.get("tokenizer")
    if tok is not None and tok.status == PASS:
        return None
    try:
        vocab = int(json.loads(config_path.read_text()).get("vocab_size") or 0)
    except (OSError, ValueError, TypeError):
        vocab = 0
    span = max(vocab, 8)
    return [[(i * 7 + j) % span for j in range(5)] for i in range(3)]


def load_check(folder: str | os.PathLike[str], *, python: str | os.PathLike[str] | None = None,
               max_tokens: int = 8, prompts: Any = None) -> Check:
    """The load tier as a check: real vLLM's greedy tokens must equal transformers'.

    Args:
        folder: The model folder.
        python: Interpreter with vLLM (``--vllm-python``); None means the default venv or this one.
        max_tokens: Tokens generated per prompt.
        prompts: Texts or token-id lists; None uses :data:`vllm_load.DEFAULT_PROMPTS`.

    Returns:
        ``vllm_load`` pass or fail; on a mismatch the details carry both token lists.

    Raises:
        VllmUnavailableError: No interpreter with vLLM.
        VllmLoadError: vLLM failed to load or run the folder.
    """
    from vllm_consolidate.validate import load as vllm_load

    kwargs: dict[str, Any] = {"python": python, "max_tokens": max_tokens}
    if prompts is not None:
        kwargs["prompts"] = prompts
    result = vllm_load.compare_load(folder, **kwargs)
    details = {
        "equal": result.equal, "prompt_token_ids": result.prompt_token_ids, "vllm_tokens": result.vllm_tokens,
        "hf_tokens": result.hf_tokens, "dtype": result.dtype, "seconds": result.duration,
        "vllm_version": result.details.get("vllm_version"),
        "first_mismatch": result.details.get("first_mismatch"),
        "hf_min_logit_margin": result.details.get("hf_min_logit_margin"),
    }
    version = result.details.get("vllm_version") or "?"
    n = len(result.prompt_token_ids)
    if result.equal:
        return Check("vllm_load", PASS,
                     f"vLLM {version} loaded the folder; its greedy tokens equal transformers' "
                     f"({n} prompts x {max_tokens} tokens, {result.dtype})", details)
    mm = result.details.get("first_mismatch") or {}
    margin = result.details.get("hf_min_logit_margin")
    return Check("vllm_load", FAIL,
                 f"vLLM {version} and transformers generate different tokens: prompt {mm.get('prompt_index')} from "
                 f"position {mm.get('position')}: vLLM {mm.get('vllm')} vs transformers {mm.get('hf')}"
                 + (f" (smallest transformers logit margin {margin:.3g})" if isinstance(margin, float) else ""),
                 details)


def add_load_check(report: ValidationReport, *, python: str | os.PathLike[str] | None = None,
                   max_tokens: int = 8) -> Check:
    """Append the ``vllm_load`` check to a static report (skipped when a static check failed).

    Args:
        report: The static report of the folder.
        python: Interpreter with vLLM.
        max_tokens: Tokens per prompt.

    Returns:
        The check appended.

    Raises:
        VllmUnavailableError: No interpreter with vLLM.
        VllmLoadError: vLLM failed to load or run the folder.
    """
    if report.ok:
        check = load_check(report.path, python=python, max_tokens=max_tokens,
                           prompts=_default_prompts(report, report.path / "config.json"))
    else:
        check = _skipped("vllm_load", "static checks failed; fix them first")
    report.checks.append(check)
    return check


def validate_folder(
    path: str | os.PathLike[str],
    *,
    scan_values: bool = True,
    load: bool = False,
    vllm_python: str | os.PathLike[str] | None = None,
    max_tokens: int = 8,
    chunk_bytes: int = SCAN_CHUNK_BYTES,
    reference: Reference | None = None,
) -> ValidationReport:
    """Validate a model folder for vLLM; see the module docstring for the checks.

    Args:
        path: The folder.
        scan_values: Read every floating-point tensor once, in bounded chunks, to find NaN and Inf.
        load: Also run the load tier (``vllm_load``), unless a static check already failed.
        vllm_python: Interpreter with vLLM for the load tier.
        max_tokens: Tokens per prompt for the load tier.
        chunk_bytes: Read size of the value scan.
        reference: The source the folder was made from; adds the ``source_tensors`` and
            ``source_values`` checks (:func:`vllm_consolidate.validate.source.reference_for_folder`).

    Returns:
        The report; ``report.ok`` is False when any check failed.

    Raises:
        VllmUnavailableError: ``load`` and no interpreter with vLLM.
        VllmLoadError: ``load`` and vLLM failed to load or run the folder.
    """
    folder = Path(path)
    report = _Validator(folder, scan_values=scan_values, chunk_bytes=chunk_bytes, reference=reference).validate()
    if load:
        add_load_check(report, python=vllm_python, max_tokens=max_tokens)
    return report


__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "WRAPPER_PREFIXES",
    "Check",
    "StoredTensor",
    "ValidationReport",
    "add_load_check",
    "load_check",
    "validate_folder",
]
