"""Tokenizer checks: the folder's tokenizer loads, round-trips text and fits the embedding.

Checks: ``tokenizer`` (AutoTokenizer loads it), ``tokenizer_roundtrip``, ``special_tokens`` (every
special-token id < ``vocab_size``) and ``chat_template`` (warn if absent).

Decisions:
    * The round trip compares text after Unicode NFKC normalisation, whitespace collapsing and
      stripping (SentencePiece adds and removes a leading space, some tokenizers clean up spaces). A
      difference only in letter case (an uncased tokenizer) or in spacing (WordPiece decodes
      ``dog :`` and ``67. 8``) is a warning; anything else fails.
    * A tokenizer that cannot load because this interpreter lacks a library it needs (protobuf,
      sentencepiece, tiktoken, mistral-common) is a warning, not a failure: the files may be fine, and
      the environment that serves the model has its own libraries.
    * A tokenizer longer than ``vocab_size`` is a warning; a special-token id >= ``vocab_size`` is a
      failure (it indexes past the embedding).
    * ``generation_config.json`` is read as strictly as ``config.json`` (bounded, no NaN/Infinity);
      one that does not read fails ``special_tokens``, since its ids could not be checked.
"""

from __future__ import annotations

import os
import traceback
import unicodedata
from typing import Any

from vllm_consolidate.errors import ConfigInvalidError, ConsolidateError
from vllm_consolidate.read.assets import GENERATION_CONFIG_FILE, TOKENIZER_FILES
from vllm_consolidate.safe_io import MAX_CONFIG_BYTES, read_json
from vllm_consolidate.units import few
from vllm_consolidate.validate.context import Context, quiet
from vllm_consolidate.validate.report import FAIL, PASS, WARN, Check, skipped

#: Text the tokenizer must encode and decode back (plain ASCII, no space before punctuation).
ROUNDTRIP_SAMPLE = "Hello world! The quick brown fox jumps over the lazy dog: 12345, 67.8 and more."

#: Config keys that hold special-token ids (an int or a list of ints).
_SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def check_tokenizer(ctx: Context) -> list[Check]:
    """``tokenizer``, ``tokenizer_roundtrip``, ``special_tokens`` and ``chat_template``.

    Without tokenizer files only ``tokenizer`` is reported (a warning: vLLM can run without one).
    """
    names = ("tokenizer", "tokenizer_roundtrip", "special_tokens", "chat_template")
    present = [f for f in TOKENIZER_FILES if (ctx.folder / f).is_file()]
    if not present:
        return [Check("tokenizer", WARN,
                      "no tokenizer files; vLLM needs a tokenizer unless it runs with skip_tokenizer_init=True "
                      "(or --tokenizer points elsewhere)")]
    tf = ctx.tf
    if tf is None:
        return [skipped(n, "transformers not installed") for n in names]
    try:
        with quiet(tf):
            tok = tf.AutoTokenizer.from_pretrained(str(ctx.folder), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
        details = {"files": present, "traceback": traceback.format_exc()}
        missing = _missing_library(exc)
        if missing:  # this interpreter lacks a library the tokenizer needs; that says nothing of the files
            return [Check("tokenizer", WARN, f"cannot load it here: it needs {missing}, which is not installed in "
                          "this environment (the one that serves the model must have it)", details)]
        return [Check("tokenizer", FAIL, f"AutoTokenizer cannot load it ({type(exc).__name__}: {exc})", details)]
    return [
        Check("tokenizer", PASS, f"{type(tok).__name__} with {len(tok)} tokens", {"files": present}),
        _roundtrip(tok),
        _special_tokens(ctx, tok),
        _chat_template(tok),
    ]


#: Optional libraries a tokenizer may need; a load that fails for want of one is not a broken folder.
_TOKENIZER_LIBRARIES = ("protobuf", "sentencepiece", "tiktoken", "mistral_common", "mistral-common", "blobfile")


def _missing_library(exc: Exception) -> str | None:
    text = f"{type(exc).__name__}: {exc}".lower()
    found = next((lib for lib in _TOKENIZER_LIBRARIES if lib in text), None)
    if found and (isinstance(exc, ImportError) or "install" in text or "requires" in text):
        return found
    return None


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
    if "".join(a.casefold().split()) == "".join(b.casefold().split()):  # WordPiece: "dog :" and "67. 8"
        return Check("tokenizer_roundtrip", WARN, f"the sample decodes back only up to spacing: {back!r}", details)
    return Check("tokenizer_roundtrip", FAIL, f"encode->decode changes the text: {ROUNDTRIP_SAMPLE!r} -> {back!r}",
                 details)


def _special_ids(ctx: Context, tok: Any, generation: dict) -> dict[str, int]:
    """Every special-token id: the tokenizer's, config.json's and generation_config.json's, by where it is."""
    ids: dict[str, int] = {}
    for token, tid in zip(tok.all_special_tokens, tok.all_special_ids):
        if tid is not None:
            ids[f"{token!r}"] = int(tid)
    sources = [("config.json", ctx.config or {}), (GENERATION_CONFIG_FILE, generation)]
    for fname, holder in sources:
        for key in _SPECIAL_ID_KEYS:
            value = holder.get(key) if isinstance(holder, dict) else None
            for i, v in enumerate(value if isinstance(value, list) else [value]):
                if isinstance(v, int):
                    ids[f"{fname} {key}" + (f"[{i}]" if isinstance(value, list) else "")] = v
    return ids


def _special_tokens(ctx: Context, tok: Any) -> Check:
    vocab = ctx.config_value("vocab_size") if ctx.config else None
    if not isinstance(vocab, int):
        return skipped("special_tokens", "no vocab_size in config.json")
    generation: dict = {}
    if os.path.lexists(ctx.folder / GENERATION_CONFIG_FILE):
        try:
            generation = read_json(ctx.folder / GENERATION_CONFIG_FILE, MAX_CONFIG_BYTES, error=ConfigInvalidError)
        except ConsolidateError as exc:
            return Check("special_tokens", FAIL, f"{exc.message}; vLLM reads end-of-sequence ids from it")
    ids = _special_ids(ctx, tok, generation)
    bad = {k: v for k, v in ids.items() if not 0 <= v < vocab}
    details = {"vocab_size": vocab, "ids": ids, "tokenizer_len": len(tok)}
    if bad:
        return Check("special_tokens", FAIL,
                     f"special token ids outside 0..{vocab - 1}: "
                     + few((f"{k}={v}" for k, v in sorted(bad.items())), sort=False), details)
    if len(tok) > vocab:
        return Check("special_tokens", WARN,
                     f"the tokenizer has {len(tok)} tokens but vocab_size is {vocab}; ids >= {vocab} would "
                     "index past the embedding", details)
    return Check("special_tokens", PASS, f"{len(ids)} special token ids are < vocab_size {vocab}", details)


def _chat_template(tok: Any) -> Check:
    if getattr(tok, "chat_template", None):
        return Check("chat_template", PASS, "chat template present")
    return Check("chat_template", WARN,
                 "no chat template: vLLM's chat API (/v1/chat/completions, LLM.chat) needs one or an "
                 "explicit --chat-template")


__all__ = ["ROUNDTRIP_SAMPLE", "check_tokenizer"]
