"""``batch`` over the new training formats: FSDP (HF Trainer, plain DCP), verl and LoRA runs in one folder.

Real corpus checkpoints are linked into one experiments folder, as a user's sweep would hold them; the
batch must find each, pick its latest save, and write outputs equal to the live-model truth bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.corpus import fsdp_build, lora_build

FSDP_CASES = ("trainer_fsdp_qwen2_tied", "dcp_qwen2_w2_nested_tied", "verl_qwen2_w2_tied")
LORA_CASE = "lora_qwen2_z2_tied"  # its adapter names the base by Hub id, found in the case's hf_cache/


def _latest_truth(case_dir: Path, key: str = "truth") -> dict[str, torch.Tensor]:
    meta = json.loads((case_dir / "case.json").read_text())
    entries = [c for c in meta["checkpoints"] if c.get("role", "actor") == "actor"]
    return load_file(str(case_dir / entries[-1][key]))


@pytest.fixture(scope="module")
def sweep(fsdp_corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    lora = lora_build.build_all([LORA_CASE])[LORA_CASE]
    root = tmp_path_factory.mktemp("sweep")
    experiments = root / "experiments"
    experiments.mkdir()
    for name in FSDP_CASES:
        meta = fsdp_build.load_case(name)
        (experiments / name).symlink_to(fsdp_corpus[name] / meta["input"], target_is_directory=True)
    (experiments / LORA_CASE).symlink_to(lora / "run", target_is_directory=True)
    out = root / "out"
    proc = subprocess.run([sys.executable, "-m", "vllm_consolidate", "batch", "--input-dir", str(experiments),
                           "--output-dir", str(out), "--max-workers", "2", "--report", str(root / "report.json")],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(lora / "hf_cache")})
    return out, root / "report.json", {"code": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr,
                                       "lora": lora}


def test_batch_finds_every_format_and_exits_0(sweep):
    out, report, run = sweep
    assert run["code"] == 0, run["stdout"][-3000:] + run["stderr"][-3000:]
    jobs = json.loads(report.read_text())["jobs"]
    assert len(jobs) == len(FSDP_CASES) + 1, jobs
    assert {j["status"] for j in jobs} == {"done"}, jobs


@pytest.mark.parametrize("name", FSDP_CASES)
def test_batch_outputs_equal_the_live_model(sweep, fsdp_corpus: dict[str, Path], name: str):
    out, _, run = sweep
    assert run["code"] == 0, run["stderr"][-3000:]
    [folder] = [p for p in out.iterdir() if p.name.startswith(name)]
    got = load_file(str(folder / "model.safetensors"))
    want = _latest_truth(fsdp_corpus[name])
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)


def test_batch_merges_the_lora_run(sweep):
    out, _, run = sweep
    assert run["code"] == 0, run["stderr"][-3000:]
    [folder] = [p for p in out.iterdir() if p.name.startswith(LORA_CASE)]
    got = load_file(str(folder / "model.safetensors"))
    want = _latest_truth(run["lora"], "merged_truth")
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
