"""Check: ``convert`` reads the real NeMo 2 corpus cases bit for bit, config and tokenizer from ``context/``.

Not a pytest test: the case needs the NeMo venv (scripts/setup_nemo_venv.sh), too slow to set up inside the CI
budget. Run it with ``make check-nemo`` (set-up, build, check), or once the case is built::

    python -m tests.corpus.nemo_check

The input is the bare NeMo folder (``nemo/``: ``weights/`` + ``context/``) with NO ``--base-model-name``: the head
layout and vocabulary must come from ``context/model.yaml`` and the tokenizer from the folder ``model.yaml`` names
in ``context/``; where model.yaml records no vocabulary size (NeMo padded the tokenizer's), from the size of that
tokenizer (read/megatron_nemo.py), and convert with ``--base-model-name`` (the model's HF config) must write the
same weights, byte for byte. The output's tensors must equal the truth (gathered from the live model and verified by
logits when the case was written) bit for bit, its config.json must have the truth's fields, and its tokenizer must
be the one NeMo copied.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from tests.corpus import nemo_build

from vllm_consolidate import cli

#: The cases, and whether model.yaml records no vocab_size (NeMo padded the tokenizer's size): the tokenizer in
#: context/ gives it, and the base model's config.json must give the same weights.
CASES = {"nemo2_qwen2_fp32": False, "nemo2_llama_vocab_from_tokenizer": True}
#: config.json fields that must equal the truth's (those the HF model's shapes and numerics depend on).
FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings")


def _convert(ckpt: Path, out: Path, base: str) -> tuple[int, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["convert", "--input", str(ckpt), "--output", str(out), "--no-validate-vllm",
                         "--base-model-name", base])
    return code, stderr.getvalue().strip()


def check(case_dir: Path, out: Path, vocab_from_tokenizer: bool) -> list[str]:
    """Convert the case into ``out``; return what differs from the truth (empty: all equal)."""
    ckpt = case_dir / "nemo"
    code, stderr = _convert(ckpt, out, "")
    if code != 0:
        return [f"convert exited {code}: {stderr}"]
    problems = []
    if vocab_from_tokenizer:
        with_base = out.with_name(out.name + "-with-base")
        code, stderr = _convert(ckpt, with_base, str(case_dir / "hf"))
        if code != 0 or (with_base / "model.safetensors").read_bytes() != (out / "model.safetensors").read_bytes():
            problems.append(f"with --base-model-name convert exited {code} or wrote other weights: {stderr}")
    got, want = load_file(out / "model.safetensors"), load_file(case_dir / "truth" / "final.safetensors")
    if sorted(got) != sorted(want):
        problems.append(f"tensor names differ: {sorted(set(got) ^ set(want))}")
    problems += [f"{name} differs from the truth" for name in sorted(set(got) & set(want))
                 if not (got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]))]
    config, truth = (json.loads((d / "config.json").read_text()) for d in (out, case_dir / "hf"))
    problems += [f"config.json {k}: {config.get(k)!r} != {truth.get(k)!r}" for k in FIELDS
                 if config.get(k) != truth.get(k)]
    tokenizer = ckpt / "context" / "hf_tokenizer" / "tokenizer.json"
    if not (out / "tokenizer.json").is_file() or (out / "tokenizer.json").read_bytes() != tokenizer.read_bytes():
        problems.append("the output's tokenizer.json is not the one NeMo copied to context/hf_tokenizer")
    return problems


def main() -> int:
    """Build the cases when missing (needs the NeMo venv), check them, print the verdict."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    failed = 0
    for name, case_dir in nemo_build.build_all(list(CASES)).items():
        with tempfile.TemporaryDirectory() as tmp:
            problems = check(case_dir, Path(tmp) / "out", CASES[name])
        for line in problems:
            print(f"FAIL {name}: {line}")
        print(f"{name}: {'ok' if not problems else f'{len(problems)} problems'}")
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
