"""The reference side of the load tier: greedy tokens from transformers, in this process.

:mod:`vllm_consolidate.validate.load` compares vLLM's greedy tokens with these. A plain argmax loop
over full forward passes (no KV cache, no EOS stop, no generation config), so exactly ``max_tokens``
tokens come back, as from vLLM with ``ignore_eos=True``; it also reports the smallest top-1/top-2
logit margin, so a mismatch can be told apart from a tie.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_consolidate.validate.config import config_dtype

if TYPE_CHECKING:
    import torch

#: The dtype both vLLM and transformers compute in unless told otherwise (see :mod:`.load`'s docstring).
DEFAULT_COMPARE_DTYPE = "float32"


def _torch_dtype(dtype: str, model_dir: Path) -> torch.dtype:
    """Map a dtype name (or ``"auto"``: the folder's config dtype) to a torch dtype."""
    name = dtype
    if dtype == "auto":
        config = json.loads((model_dir / "config.json").read_text())
        name = config.get("dtype") or config.get("torch_dtype") or "float32"
    found = config_dtype(name)
    if found is None:
        raise ValueError(f"unknown dtype {dtype!r}")
    return found.torch


def transformers_greedy_with_margins(
    model_dir: str | os.PathLike[str],
    prompt_token_ids: Sequence[Sequence[int]],
    max_tokens: int,
    dtype: str,
) -> tuple[list[list[int]], float]:
    """Greedy-decode with transformers; also return the smallest top-1/top-2 logit margin."""
    # Imported here: torch and transformers cost seconds, and only the load tier needs them.
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    path = Path(model_dir)
    torch_dtype = _torch_dtype(dtype, path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map="cpu")
    model.eval()
    results: list[list[int]] = []
    min_margin = float("inf")
    with torch.inference_mode():
        for ids in prompt_token_ids:
            seq = torch.tensor([list(ids)], dtype=torch.long)
            generated: list[int] = []
            for _ in range(max_tokens):
                logits = model(input_ids=seq, use_cache=False).logits[0, -1].float()
                top = torch.topk(logits, 2)
                min_margin = min(min_margin, float(top.values[0] - top.values[1]))
                token = int(top.indices[0])
                generated.append(token)
                seq = torch.cat([seq, torch.tensor([[token]], dtype=torch.long)], dim=1)
            results.append(generated)
    return results, min_margin


def transformers_greedy(
    model_dir: str | os.PathLike[str],
    prompt_token_ids: Sequence[Sequence[int]],
    max_tokens: int = 8,
    dtype: str = DEFAULT_COMPARE_DTYPE,
) -> list[list[int]]:
    """Greedy-decode each prompt with transformers on CPU.

    A plain argmax loop over full forward passes (no KV cache, no EOS stop, no generation config),
    so exactly ``max_tokens`` tokens come back, as from vLLM with ``ignore_eos=True``.

    Args:
        model_dir: The HF model folder.
        prompt_token_ids: Prompts as token ids.
        max_tokens: Tokens to generate per prompt.
        dtype: Compute dtype (``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"`` for the
            folder's config dtype). Note vLLM's ``"auto"`` is not the folder's dtype on CPU (it
            runs fp32 folders in bf16); :func:`compare_load` therefore passes vLLM's actual dtype.

    Returns:
        The generated token ids, one list per prompt.
    """
    tokens, _ = transformers_greedy_with_margins(model_dir, prompt_token_ids, max_tokens, dtype)
    return tokens


def encode_prompts(model_dir: Path, prompts: Sequence[str]) -> list[list[int]]:
    """Encode text prompts once, with the folder's tokenizer, so both sides get the same token ids.

    Raises:
        ValueError: A prompt encodes to no tokens.
    """
    from transformers import AutoTokenizer  # noqa: PLC0415

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = [list(tokenizer.encode(text, add_special_tokens=False)) for text in prompts]
    if any(not ids for ids in encoded):
        raise ValueError("a prompt encodes to no tokens")
    return encoded


__all__ = ["DEFAULT_COMPARE_DTYPE", "encode_prompts", "transformers_greedy", "transformers_greedy_with_margins"]
