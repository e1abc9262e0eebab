"""Helpers shared by the corpus generator and the scripts it launches.

This module must stay importable without DeepSpeed (``build.py`` imports it in
the parent process) and must not import torch/transformers at module import
time, so that a warm ``build_all()`` stays cheap.
"""

from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: Special tokens of the locally trained tokenizer; their ids are 0..3.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

#: Target vocabulary size of the locally trained BPE tokenizer (<= every model vocab).
TOKENIZER_VOCAB = 480

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_WORDS = (
    "the a one two three zero stage shard tensor weight bias layer model check point "
    "deep speed fast slow small large token head embed norm gate up down proj expert "
    "router train step loss grad adam decay learn rate batch seed cpu rank world "
    "save load merge fold flat group pad slice fragment partition optimizer state"
).split()


def corpus_text(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English lines used to train the tokenizer."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 16))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 9999)))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]))
    return lines


def build_tokenizer() -> PreTrainedTokenizerBase:
    """Train a tiny byte-level BPE tokenizer locally and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def model_config(model: dict[str, Any]) -> Any:
    """Build a transformers config from a case's ``model`` spec dict."""
    from transformers import AutoConfig

    kw: dict[str, Any] = dict(
        hidden_size=model["hidden"],
        intermediate_size=model["intermediate"],
        num_hidden_layers=model["layers"],
        num_attention_heads=model["heads"],
        num_key_value_heads=model["kv_heads"],
        vocab_size=model["vocab"],
        tie_word_embeddings=model["tied"],
        max_position_embeddings=256,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    if model.get("head_dim"):
        kw["head_dim"] = model["head_dim"]
    kw.update(model.get("extra", {}))
    if model.get("vision"):  # a vision-language model: the text part is its text_config (tests/corpus/build.py)
        vlm = copy.deepcopy(model["vision"])  # transformers edits nested dicts (rope_scaling) in place
        text = dict(kw, model_type=vlm["text_type"], **vlm.get("text_extra", {}))
        text.pop("tie_word_embeddings")
        return AutoConfig.for_model(model["arch"], text_config=text, vision_config=vlm["config"],
                                    tie_word_embeddings=model["tied"], **vlm.get("top", {}))
    return AutoConfig.for_model(model["arch"], **kw)


def build_model(model: dict[str, Any], seed: int) -> PreTrainedModel:
    """Instantiate a tiny randomly initialised causal LM or vision-language model (fp32, no downloads).

    ``frozen`` names parameters, or (ending in ``.``) whole modules, to freeze (e.g. a vision tower).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if model.get("vision") else AutoModelForCausalLM
    m = auto.from_config(model_config(model))
    m.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False, max_new_tokens=16
    )
    for name in model.get("frozen", []):
        if name.endswith("."):
            for full, p in m.named_parameters():
                if full.startswith(name):
                    p.requires_grad_(False)
        else:
            m.get_parameter(name).requires_grad_(False)
    return m


def head_dim_of(model: dict[str, Any]) -> int:
    """Attention head dim of a model spec."""
    return int(model.get("head_dim") or model["hidden"] // model["heads"])


def param_groups(module: torch.nn.Module, weight_decay: float = 0.1) -> list[dict[str, Any]]:
    """HF-Trainer-style decay / no-decay split over trainable parameters."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def persistent_buffer_names(module: torch.nn.Module) -> list[str]:
    """Names of buffers that appear in ``state_dict()`` (i.e. persistent ones)."""
    keys = set(module.state_dict().keys())
    return [n for n, _ in module.named_buffers() if n in keys]


def tied_map(module: torch.nn.Module) -> dict[str, str]:
    """Map of state_dict alias -> canonical ``named_parameters`` name for tied weights."""
    canonical: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        canonical.setdefault(id(p), name)
    out = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if canonical[id(p)] != name:
            out[name] = canonical[id(p)]
    return out


def read_plan(argv: list[str] | None = None) -> Any:
    """The JSON plan of a launched script: ``SCRIPT --plan PLAN.json`` (``--local_rank``, added by the
    ``deepspeed`` launcher, is accepted and ignored)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args(argv)
    return json.loads(Path(args.plan).read_text())


def save_truth(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a ground-truth safetensors file (``metadata={"format": "pt"}``), creating its folder."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})


def list_files(folder: Path) -> list[str]:
    """Sorted relative paths of every file under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a temp file + ``os.replace`` (atomic on POSIX)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def save_hf_extras(
    folder: Path, module: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, precision: str
) -> None:
    """Write ``config.json``, ``generation_config.json`` and tokenizer files into ``folder``.

    ``config.architectures`` and ``config.dtype`` are set the way
    ``model.save_pretrained`` would set them (``config.save_pretrained`` alone doesn't).
    """
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    module.config.architectures = [type(module).__name__]
    module.config.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    module.config.save_pretrained(folder)
    module.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def train_batch(model: dict[str, Any], gen: torch.Generator, low: int = 0) -> dict[str, torch.Tensor]:
    """One training batch (2 x 16 tokens) for a case's model: random token ids, and for a vision-language
    model one random image per sample too, so that the vision tower and projector get gradients.

    Text ids are drawn from ``[low, vocab)`` (below the image token ids, 990+, for a VLM). The image
    inputs are what each family's processor would produce for a 28x28 image (no processor is needed).
    """
    import torch

    vision = model.get("vision")
    hi = 990 if vision else model["vocab"]
    ids = torch.randint(low, hi, (2, 16), generator=gen)
    if not vision:
        return {"input_ids": ids, "labels": ids}
    top = vision["top"]
    if model["arch"] in ("qwen2_vl", "qwen2_5_vl"):  # a 1x2x2 patch grid, merged 2x2 into one image token
        ids[:, 1:4] = torch.tensor([top["vision_start_token_id"], top["image_token_id"], top["vision_end_token_id"]])
        patch = 3 * vision["config"]["temporal_patch_size"] * vision["config"]["patch_size"] ** 2
        extra = {"pixel_values": torch.randn(2 * 4, patch, generator=gen),
                 "image_grid_thw": torch.tensor([[1, 2, 2], [1, 2, 2]]),
                 "mm_token_type_ids": (ids == top["image_token_id"]).int()}
    else:  # LLaVA: 2x2 patches (CLS dropped) -> 4 tokens; Gemma 3: pooled to mm_tokens_per_image (1)
        n = 4 if model["arch"] == "llava" else top["mm_tokens_per_image"]
        ids[:, 1:1 + n] = top["image_token_index"]
        size = vision["config"]["image_size"]
        extra = {"pixel_values": torch.randn(2, 3, size, size, generator=gen)}
        if model["arch"] == "gemma3":
            extra["token_type_ids"] = (ids == top["image_token_index"]).long()
    return {"input_ids": ids, "labels": ids, **extra}
