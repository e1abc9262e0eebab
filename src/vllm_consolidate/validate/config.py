"""Config checks: does config.json describe a model vLLM serves, as the stored weights hold it?

Checks: ``config`` (parses; ``model_type`` and ``architectures`` present), ``architecture`` (in
:data:`SUPPORTED_ARCHITECTURES`, or in vLLM's registry when vLLM is importable here),
``quantization_config`` (must be absent: consolidated weights are dequantized), ``vocab_size``
(equals the embedding rows) and ``dtype`` (recorded, and equal to the stored floating dtype; warn).

Decision: ``vocab_size`` must equal the embedding rows exactly. Fewer rows fail (ids the config allows
have no row); more rows fail too, because vLLM's ``VocabParallelEmbedding`` weight loader asserts
``rows == vocab_size`` and because the skeleton comparison is exact anyway.
"""

from __future__ import annotations

import importlib.util
import os

from vllm_consolidate import dtypes
from vllm_consolidate.dtypes import DType
from vllm_consolidate.errors import ConsolidateError
from vllm_consolidate.read.assets import CONFIG_FILE, read_config
from vllm_consolidate.validate.context import Context
from vllm_consolidate.validate.report import FAIL, PASS, WARN, Check, skipped

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
    # vision-language (issue 25: Qwen2-VL and LLaVA were refused before they were listed)
    "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "LlavaForConditionalGeneration",
})

#: Suffixes of the input embedding's name, tried when the skeleton does not name it.
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def config_dtype(name: object) -> DType | None:
    """The dtype a config's ``torch_dtype``/``dtype`` names (``"bfloat16"``, ``"bf16"``...), or None.

    The ``--dtype`` names and aliases first, then every dtype's canonical name (``float64`` is no
    output dtype but a config may record it).
    """
    return dtypes.parse(name)


def check_config(ctx: Context) -> Check:
    """``config``: config.json parses to an object with ``model_type`` and ``architectures``; sets ``ctx.config``.

    It is read exactly as ``convert`` reads it (:func:`~vllm_consolidate.read.assets.read_config`: a
    regular file, size-capped, strict JSON without NaN/Infinity or overflowing numbers), so a config
    one refuses the other never passes.
    """
    path = ctx.folder / CONFIG_FILE
    if not os.path.lexists(path):
        return Check("config", FAIL, "no config.json")
    try:
        config = read_config(path)
    except ConsolidateError as exc:
        return Check("config", FAIL, exc.message)
    ctx.config = config
    missing = [k for k in ("model_type", "architectures") if not config.get(k)]
    if missing:
        return Check("config", FAIL, f"config.json lacks {' and '.join(missing)}; vLLM needs both")
    if not isinstance(config["architectures"], list):
        return Check("config", FAIL, "config.json 'architectures' is not a list")
    return Check("config", PASS, f"model_type {config['model_type']}, architectures {config['architectures']}")


def _vllm_registry() -> frozenset[str]:
    """Architectures of vLLM's registry, when vLLM is importable here; else empty."""
    if importlib.util.find_spec("vllm") is None:
        return frozenset()
    try:
        from vllm import ModelRegistry

        return frozenset(ModelRegistry.get_supported_archs())
    except Exception:  # noqa: BLE001 - a broken vLLM install must not break validation
        return frozenset()


def check_architecture(ctx: Context) -> Check:
    """``architecture``: one of config.json's architectures is one vLLM serves."""
    if ctx.config is None or not isinstance(ctx.config.get("architectures"), list):
        return skipped("architecture", "no usable config.json")
    archs = [str(a) for a in ctx.config["architectures"]]
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


def check_quantization(ctx: Context) -> Check:
    """``quantization_config``: absent, because consolidated weights are dequantized."""
    if ctx.config is None:
        return skipped("quantization_config", "no usable config.json")
    from vllm_consolidate.validate.quantized import check_quantization_config

    ours = check_quantization_config(ctx)  # a --quantize output: its config is one of our schemes'
    if ours is not None:
        return ours
    for holder in (ctx.config, ctx.config.get("text_config") or {}):
        if isinstance(holder, dict) and holder.get("quantization_config"):
            method = (holder["quantization_config"] or {}).get("quant_method", "?")
            return Check(
                "quantization_config", FAIL,
                f"config.json keeps a quantization_config (quant_method {method}) but consolidated weights are "
                "dequantized; vLLM would try to load them as quantized. Remove it",
            )
    return Check("quantization_config", PASS, "no quantization_config")


def _embedding_name(ctx: Context) -> str | None:
    """The stored input embedding: the skeleton's, else the first name with a usual suffix."""
    if ctx.skeleton is not None and ctx.skeleton.embedding in ctx.stored.tensors:
        return ctx.skeleton.embedding
    for suffix in _EMBEDDING_SUFFIXES:
        hits = sorted(n for n in ctx.stored.tensors if n.endswith(suffix))
        if hits:
            return hits[0]
    return None


def check_vocab(ctx: Context) -> Check:
    """``vocab_size``: equals the rows of the stored input embedding (see the module's decision)."""
    if ctx.config is None:
        return skipped("vocab_size", "no usable config.json")
    vocab = ctx.config_value("vocab_size")
    if not isinstance(vocab, int):
        return Check("vocab_size", FAIL, "config.json has no integer vocab_size")
    name = _embedding_name(ctx)
    if name is None:
        return skipped("vocab_size", "no input embedding tensor is stored to compare vocab_size with")
    shape = ctx.stored.tensors[name].shape
    rows = shape[0] if shape else 0
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


def check_dtype(ctx: Context) -> Check:
    """``dtype``: config.json records the dtype the floating weights are mostly stored in (warn otherwise).

    vLLM's ``dtype=auto`` follows the config, so a wrong or missing record changes what it computes in.
    """
    if ctx.config is None:
        return skipped("dtype", "no usable config.json")
    quantized = set(ctx.quant.scales) if ctx.quant is not None else set()  # int8/fp8 weights are not the dtype
    stored = dtypes.dominant((t.dtype, t.nbytes) for t in ctx.stored.tensors.values() if t.name not in quantized)
    stored_name = str(stored).removeprefix("torch.") if stored else None
    recorded = ctx.config_value("torch_dtype") or ctx.config_value("dtype")
    details = {"config": recorded, "stored": stored_name}
    if not recorded:
        return Check("dtype", WARN,
                     f"config.json records no torch_dtype/dtype; the weights are {stored_name}. vLLM's "
                     "dtype=auto then assumes float32", details)
    if stored is None:
        return Check("dtype", PASS, f"config dtype {recorded}; no floating tensors stored", details)
    if config_dtype(recorded) != stored:
        return Check("dtype", WARN,
                     f"config.json says {recorded} but the weights are stored as {stored_name}; vLLM's "
                     "dtype=auto follows the config", details)
    return Check("dtype", PASS, f"{recorded}, as stored", details)


__all__ = ["SUPPORTED_ARCHITECTURES", "check_architecture", "check_config", "check_dtype", "check_quantization",
           "check_vocab", "config_dtype"]
