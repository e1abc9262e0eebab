"""NeMo 2's ``context/``: the tokenizer folder ``model.yaml`` names, and the vocabulary size it gives.

:func:`nemo_tokenizer_dir` is where NeMo's ``io_dump`` copied the tokenizer. :func:`nemo_tokenizer_vocab` gives the
true vocabulary size of a save whose ``context/model.yaml`` records none, from that tokenizer's files.

NeMo's Llama presets leave ``vocab_size`` null. NeMo then builds the model with the tokenizer's size padded up to
a multiple of ``make_vocab_size_divisible_by`` times ``tensor_model_parallel_size`` (``GPTConfig.configure_model``
and ``nemo.lightning.get_vocab_size``, nemo_toolkit 2.7.3), and its own HF exporter writes that tokenizer size as
config.json's ``vocab_size`` and drops the padding rows. The tokenizer size is ``len()`` of the Hugging Face
tokenizer NeMo's ``AutoTokenizer`` wraps, after it added the special tokens ``model.yaml``'s ``tokenizer:`` names.

:func:`nemo_vocab_size` counts it from the copy of the tokenizer in ``context/`` without running anything: the
distinct tokens of ``tokenizer.json`` (its model's vocabulary and its added tokens), which must have the ids
``0..n-1``. It gives up (and says why) rather than guess whenever Hugging Face or NeMo would add a token the file
lacks (a special token named in ``model.yaml``, ``tokenizer_config.json``, ``special_tokens_map.json`` or
``added_tokens.json``), when there is no ``tokenizer.json`` (a slow tokenizer's size depends on its class), or when
the count, padded as NeMo pads it, is not the embedding's row count in the checkpoint: that row count is what NeMo
built, so it confirms the count.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from vllm_consolidate.errors import ConsolidateError
from vllm_consolidate.formats import dcp
from vllm_consolidate.formats.megatron_common import NEMO_MODEL_YAML, read_nemo_tokenizer, read_nemo_tokenizer_name
from vllm_consolidate.limits import brief
from vllm_consolidate.read.megatron_names import model_name
from vllm_consolidate.read.zero_locate import confine_chosen
from vllm_consolidate.safe_io import MAX_TOKENIZER_BYTES, confined, read_json

#: NeMo's Hugging Face tokenizer wrapper (``_target_`` in model.yaml's ``tokenizer:``).
HF_AUTO_TOKENIZER = "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer"
#: The special-token arguments of NeMo's ``AutoTokenizer`` (each added when the vocabulary lacks it).
TOKEN_FIELDS = ("mask_token", "bos_token", "eos_token", "pad_token", "sep_token", "cls_token", "unk_token")
#: Files beside ``tokenizer.json`` that make transformers add tokens when they name one it lacks.
_EXTRA_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


class NoVocab(Exception):
    """Why the tokenizer's files do not give the vocabulary size (the reader then needs a base model)."""


def _positive(value: Any, default: int) -> int | None:
    if value is None:
        return default
    return value if type(value) is int and value > 0 else None


def _token_map(tokenizer_json: dict) -> dict[str, int]:
    """``{token: id}`` of a ``tokenizer.json``: its model's vocabulary and its added tokens."""
    model = tokenizer_json.get("model")
    vocab = model.get("vocab") if type(model) is dict else None
    if type(vocab) is dict:  # BPE, WordPiece, WordLevel
        pairs = list(vocab.items())
    elif type(vocab) is list:  # Unigram: [piece, score] by id
        pairs = [(entry[0] if type(entry) is list and entry else None, i) for i, entry in enumerate(vocab)]
    else:
        raise NoVocab("tokenizer.json has no model vocabulary")
    added = tokenizer_json.get("added_tokens") or []
    if type(added) is not list:
        raise NoVocab("tokenizer.json's added_tokens is not a list")
    pairs += [(t.get("content"), t.get("id")) if type(t) is dict else (None, None) for t in added]
    tokens: dict[str, int] = {}
    for token, index in pairs:
        if type(token) is not str or type(index) is not int or tokens.setdefault(token, index) != index:
            raise NoVocab(f"tokenizer.json gives the token {brief(token)} the id {brief(index)}, or two ids")
    if set(tokens.values()) != set(range(len(tokens))):
        raise NoVocab(f"the ids of tokenizer.json's {len(tokens)} tokens are not 0..{len(tokens) - 1}")
    return tokens


def _named(value: Any) -> list[Any]:
    """The tokens a special-token field names (a string, an AddedToken dict, a list of them, None)."""
    items = value if type(value) is list else [] if value is None else [value]
    return [v.get("content") if type(v) is dict else v for v in items]


def _tokens_named(folder: Path, nemo_tokenizer: dict, tokens: dict[str, int]) -> list[Any]:
    """Every token transformers or NeMo would make sure the tokenizer (``tokens``, from tokenizer.json) has."""
    named = [t for f in (*TOKEN_FIELDS, "additional_special_tokens") for t in _named(nemo_tokenizer.get(f))]
    for name in _EXTRA_FILES:
        path = folder / name
        if not path.exists():
            continue
        if not confined(path, [folder]):
            raise NoVocab(f"{name} leads outside {folder.name}/")
        data = read_json(path, MAX_TOKENIZER_BYTES)
        if name == "added_tokens.json":
            named += list(data)
            continue
        decoder = data.get("added_tokens_decoder")
        for index, token in (decoder.items() if type(decoder) is dict else ()):
            named += _named(token)
            if str(tokens.get(_named(token)[0], index)) != index:  # transformers would move it: not this count
                raise NoVocab(f"{name} gives {brief(_named(token)[0])} the id {brief(index)}, tokenizer.json another")
        for field in (*TOKEN_FIELDS, "additional_special_tokens", "extra_special_tokens"):
            value = data.get(field)
            named += [t for v in (value.values() if type(value) is dict else [value]) for t in _named(v)]
    return named


def _count(folder: Path, nemo_tokenizer: dict) -> int:
    target = nemo_tokenizer.get("_target_")
    if target != HF_AUTO_TOKENIZER:
        raise NoVocab(f"model.yaml's tokenizer is {brief(target)}, not NeMo's Hugging Face AutoTokenizer")
    if nemo_tokenizer.get("vocab_file") is not None or nemo_tokenizer.get("merges_file") is not None:
        raise NoVocab("model.yaml's tokenizer names its own vocab_file or merges_file")
    if nemo_tokenizer.get("use_fast") is False:
        raise NoVocab("model.yaml's tokenizer is a slow one (use_fast: false)")
    path = folder / "tokenizer.json"
    if not path.exists():
        raise NoVocab(f"{folder.name}/ has no tokenizer.json")
    if not confined(path, [folder]):
        raise NoVocab(f"tokenizer.json leads outside {folder.name}/")
    tokens = _token_map(read_json(path, MAX_TOKENIZER_BYTES))
    missing = [t for t in _tokens_named(folder, nemo_tokenizer, tokens) if type(t) is not str or t not in tokens]
    if missing:
        raise NoVocab(f"the tokenizer would add {brief(missing[0])}, which tokenizer.json lacks")
    return len(tokens)


def nemo_vocab_size(folder: Path | None, model: dict[str, Any], nemo_tokenizer: dict[str, Any] | None,
                    rows: int | None) -> int:
    """The vocabulary NeMo trained with: its tokenizer's size in ``folder`` (``context/<name>``, as model.yaml's
    ``tokenizer:`` names it), checked against the embedding's ``rows`` padded as NeMo pads (``model``: model.yaml's
    ``config:`` fields).

    Raises:
        NoVocab: The files do not give it (the message says why).
    """
    if folder is None or nemo_tokenizer is None:
        raise NoVocab("model.yaml names no tokenizer folder in context/")
    divisor = _positive(model.get("make_vocab_size_divisible_by"), 128)
    tp = _positive(model.get("tensor_model_parallel_size"), 1)
    if divisor is None or tp is None or rows is None:
        raise NoVocab("model.yaml's make_vocab_size_divisible_by or tensor_model_parallel_size is not a positive "
                      "integer, or the save has no embedding")
    try:
        size = _count(folder, nemo_tokenizer)
    except ConsolidateError as exc:  # unreadable, too large, not JSON: the base model may still give the size
        raise NoVocab(exc.message) from None
    multiple = divisor * tp
    padded = math.ceil(size / multiple) * multiple
    if padded != rows:
        raise NoVocab(f"its {size} tokens pad to {padded} rows (make_vocab_size_divisible_by {divisor} x "
                      f"tensor_model_parallel_size {tp}), not the embedding's {rows}")
    return size

def nemo_tokenizer_dir(folder: Path) -> Path | None:
    """``context/<name>``, the copy of the tokenizer NeMo 2's ``io_dump`` made, as ``context/model.yaml`` names it
    (``nemo_tokenizer`` only after NeMo's HF import); None when it names none that is a folder there.

    Raises:
        UnsafeInputError: That folder is a symlink out of ``context/``.
        CorruptCheckpointError: ``model.yaml`` is too large or not YAML.
    """
    context = folder / NEMO_MODEL_YAML.parent
    name = read_nemo_tokenizer_name(folder) if context.is_dir() else None
    if name is None or not (context / name).is_dir():
        return None
    return confine_chosen(context / name, context)

def nemo_tokenizer_vocab(outer: Path, model: dict[str, Any], what: str, meta: dcp.DcpMetadata,
                          ) -> tuple[dict[str, Any], str, str | None]:
    """NeMo's model.yaml fields with the vocab_size its tokenizer gives (:func:`nemo_vocab_size`), and ``what`` naming
    the tokenizer too; or unchanged, with why not."""
    rows = next((t.shape[0] for k, t in meta.tensors.items()
                 if model_name(k) == "embedding.word_embeddings.weight" and t.shape), None)
    folder = nemo_tokenizer_dir(outer)
    try:
        vocab = nemo_vocab_size(folder, model, read_nemo_tokenizer(outer), rows)
    except NoVocab as exc:
        return model, what, str(exc)
    return {**model, "vocab_size": vocab}, f"{what} and the size of {folder.relative_to(outer)}/tokenizer.json", None


__all__ = ["HF_AUTO_TOKENIZER", "NoVocab", "nemo_tokenizer_dir", "nemo_tokenizer_vocab", "nemo_vocab_size"]
