"""Prove the corpus ground truth is trustworthy.

For every DeepSpeed checkpoint in the corpus, DeepSpeed's own ``zero_to_fp32.py``
(the copy DeepSpeed placed in the checkpoint folder) must reproduce the truth file
bit for bit.  For the plain HF layouts, the saved weights must equal the truth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tests.corpus import build

DS_CKPTS = [
    pytest.param(spec.name, step, id=f"{spec.name}-{step}")
    for spec in build.CASES.values()
    if spec.kind in ("ds", "trainer")
    for step in spec.save_steps
]
#: MoE save_pretrained folders store per-expert names, their truth the fused in-memory ones: tests/test_moe.py.
HF_CASES = [s.name for s in build.CASES.values() if s.kind == "hf" and s.model["arch"] not in build.MOE_ARCHS]


def _checkpoint_entry(meta: dict[str, Any], step: int) -> dict[str, Any]:
    (entry,) = [c for c in meta["checkpoints"] if c["step"] == step]
    return entry


def _load_torch_output(out: Path) -> dict[str, torch.Tensor]:
    index = out / "pytorch_model.bin.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["pytorch_model.bin"]
    )
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(torch.load(out / f, map_location="cpu", weights_only=True))
    return sd


def _assert_equal_to_truth(got: dict[str, torch.Tensor], truth: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    extra = set(got) - set(truth)
    allowed_extra = set(meta["tied_keys"])
    assert extra <= allowed_extra, f"unexpected extra keys {sorted(extra - allowed_extra)}"
    missing = set(truth) - set(got)
    assert not missing, f"missing keys {sorted(missing)}"
    for alias in extra:
        canonical = meta["tied_keys"][alias]
        assert torch.equal(got[alias], truth[canonical]), f"tied alias {alias} != {canonical}"
    bad = [k for k, t in truth.items() if got[k].dtype != t.dtype or not torch.equal(got[k], t)]
    assert not bad, f"{len(bad)} tensors differ from truth, e.g. {bad[:5]}"


@pytest.mark.parametrize(("name", "step"), DS_CKPTS)
def test_zero_to_fp32_matches_truth(corpus: dict[str, Path], name: str, step: int, tmp_path: Path) -> None:
    """DeepSpeed's bundled zero_to_fp32.py reproduces our live-engine truth exactly."""
    cdir = corpus[name]
    meta = build.load_case(name)
    entry = _checkpoint_entry(meta, step)
    if meta["layout"] == "raw":
        ckpt_root = cdir / meta["input"]  # folder holding `latest` and global_stepN/
        tag_args = ["--tag", entry["tag"]]
    else:  # trainer: run/checkpoint-N holds `latest` (-> global_stepN) itself
        ckpt_root = cdir / entry["path"]
        tag_args = []  # exercise the `latest` file
    script = ckpt_root / "zero_to_fp32.py"
    assert script.is_file(), "DeepSpeed should have copied zero_to_fp32.py next to `latest`"
    assert (ckpt_root / "latest").is_file()
    out = tmp_path / "out"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [sys.executable, str(script), str(ckpt_root), str(out), *tag_args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = _load_torch_output(out)
    truth = load_file(str(cdir / entry["truth"]))
    _assert_equal_to_truth(got, truth, meta)


@pytest.mark.parametrize("name", HF_CASES)
def test_hf_layout_matches_truth(corpus: dict[str, Path], name: str) -> None:
    """The save_pretrained weights equal the truth (tied lm_head is not stored)."""
    cdir = corpus[name]
    meta = build.load_case(name)
    model_dir = cdir / meta["input"]
    got: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        got.update(load_file(str(f)))
    if meta["layout"] == "hf_sharded_safetensors":
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(got)
        assert len(set(index["weight_map"].values())) > 1
    truth = load_file(str(cdir / meta["checkpoints"][0]["truth"]))
    _assert_equal_to_truth(got, truth, meta)


@pytest.mark.parametrize("name", [s.name for s in build.CASES.values() if s.kind != "hf" and not s.big])
def test_truth_moved_from_init(corpus: dict[str, Path], name: str) -> None:
    """Training really happened: the last checkpoint's trainable weights differ from init."""
    from tests.corpus import common

    meta = build.load_case(name)
    spec = build.CASES[name]
    init = dict(common.build_model(spec.model, seed=spec.seed).named_parameters())
    truth = load_file(str(corpus[name] / meta["checkpoints"][-1]["truth"]))
    frozen = set(meta["frozen"])
    for key, value in truth.items():
        if key not in init:
            continue
        same = torch.equal(init[key].detach().float(), value)
        if key in frozen:
            # frozen params are stored in the training dtype, so compare after rounding
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[meta["precision"]]
            assert torch.equal(init[key].detach().to(dtype).float(), value), key
        else:
            assert not same, f"{key} unchanged by training"


def test_case_json_schema(corpus: dict[str, Path]) -> None:
    """Every case.json carries the documented keys and sane relative paths."""
    required = {line.split()[0] for line in build.CASE_SCHEMA_DOC.strip().splitlines()}
    for name, cdir in corpus.items():
        meta = build.load_case(name)
        assert required <= set(meta), (name, sorted(required - set(meta)))
        assert (cdir / meta["input"]).is_dir()
        for c in meta["checkpoints"]:
            assert (cdir / c["path"]).is_dir(), (name, c)
            assert (cdir / c["truth"]).is_file(), (name, c)
            assert not c["truth"].startswith(meta["input"] + "/")
