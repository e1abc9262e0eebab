"""A verl LoRA run (rank files holding the whole peft model) is merged like any LoRA run.

Truth: the live peft model's full state dict, gathered by the corpus builder at save time. The reference
merge is peft's own ``merge_and_unload`` on a model built from verl's saved config with the r and
lora_alpha verl recorded, loaded with that truth; the output must equal it bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vllm_consolidate.cli import main

CASE = "verl_qwen2_w2_lora"


@pytest.fixture(scope="module")
def merged(fsdp_corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    case = fsdp_corpus[CASE]
    out = tmp_path_factory.mktemp("verl-lora") / "merged"
    assert main(["convert", "--input", str(case / "ckpt"), "--output", str(out)]) == 0
    return case, out


def _peft_merge(case: Path) -> dict[str, torch.Tensor]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    meta = json.loads((case / "case.json").read_text())
    actor = case / meta["checkpoints"][-1]["path"]
    lora = json.loads((actor / "lora_train_meta.json").read_text())
    config = AutoConfig.from_pretrained(actor / "huggingface")
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["lora_alpha"], target_modules="all-linear"))
    truth = load_file(str(case / meta["checkpoints"][-1]["truth"]))
    missing, unexpected = model.load_state_dict(truth, strict=False)
    assert not unexpected and not [k for k in missing if "lm_head" not in k], (missing, unexpected)
    merged = model.merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def test_verl_lora_merge_equals_peft(merged):
    case, out = merged
    got = load_file(str(out / "model.safetensors"))
    want = _peft_merge(case)
    assert set(got) == set(want) - {"lm_head.weight"}  # tied: written once, as save_pretrained does
    diff = [k for k in got if not torch.equal(got[k], want[k])]
    assert not diff, diff
    truth = load_file(str(case / json.loads((case / "case.json").read_text())["checkpoints"][-1]["truth"]))
    changed = [k for k in got if k.endswith("proj.weight") and not torch.equal(
        got[k], truth["base_model.model." + k.replace(".weight", ".base_layer.weight")])]
    assert len(changed) == 14, changed  # every targeted linear layer moved: the factors were applied

