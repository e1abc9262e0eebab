"""``convert --quantize`` picks the modules llm-compressor picks, from names and shapes (issue 26).

``plan.quantize`` decides which weights to quantize without building the model (no transformers, no torch in the
pass): a 2-D ``*.weight`` not of an embedding, a router or ``lm_head``; routers and ``lm_head`` are listed in
``quantization_config.ignore``. Here llm-compressor itself (its venv, ``tests/tools/llmc_quantize.py --choice``)
quantizes a model built from each corpus architecture's config.json (dense, MoE with and without shared experts,
DeepSeek-V2's dense first layer, tied heads, and the vision-language families, whose vision towers it quantizes
too), and the weights it stores quantized and its ``ignore`` list must be ours. Names are compared in
transformers' in-memory form (llm-compressor saves a model built from a config under those), ours mapped there
by :mod:`vllm_consolidate.plan.vlm` and the MoE block rename.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tests.test_quantize import TOOL, _llmc_python

from vllm_consolidate.convert import ConvertOptions, plan_conversion
from vllm_consolidate.plan import vlm
from vllm_consolidate.plan.moe import family_of

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: One corpus case per architecture (fixture, case).
CASES = [("corpus", n) for n in ("deepseekv2_z3_w2_bf16", "hf_llama_sharded_bf16", "mistral_z1_w3_bf16",
                                  "qwen3moe_z3_w2_bf16", "qwen2moe_z2_w2_bf16", "hf_mixtral_single_fp32",
                                  "hf_qwen2_single_fp32_tied", "qwen2vl_z3_w2_fp32", "llava_z3_w2_bf16",
                                  "gemma3_z3_w2_bf16")] + [("fsdp_corpus", "dcp_llama_w2_flat_bf16")]


def in_memory(name: str, config: dict[str, Any]) -> str:
    """A written name in transformers 5's in-memory form (VLM prefixes, Mixtral's ``block_sparse_moe``)."""
    family = vlm.family_of(config)
    if family is not None:
        name = vlm._apply(family.to_training, name)
    moe = family_of(config)
    if moe is not None and moe.block != "mlp":
        name = re.sub(rf"(\.layers\.\d+)\.{moe.block}\.", r"\1.mlp.", name)
    return name


@pytest.fixture(scope="module")
def choices(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``{case: (ours, theirs)}``, each ``{"quantized": sorted weights, "ignore": list}`` in in-memory names."""
    base = tmp_path_factory.mktemp("choice")
    ours: dict[str, dict[str, Any]] = {}
    configs: dict[str, str] = {}
    for fixture, name in CASES:
        cdir = request.getfixturevalue(fixture)[name]
        case = json.loads((cdir / "case.json").read_text())
        conv = plan_conversion(ConvertOptions(input=str(cdir / case.get("input", "ckpt")), output=str(base / name),
                                              quantize="fp8_dynamic", dtype="bfloat16"))
        config = conv.config
        ours[name] = {"quantized": sorted(in_memory(t.spec.name, config) for t in conv.plan.tensors if t.quant),
                      "ignore": [in_memory(m, config) for m in config["quantization_config"]["ignore"]]}
        (base / name).mkdir()
        (base / name / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                             if k != "quantization_config"}))
        configs[name] = str(base / name)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
    proc = subprocess.run([_llmc_python(), str(TOOL), "--choice", str(base / "llmc"), *configs.values()],
                          capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.splitlines()[-1])
    theirs = {}
    for name, path in configs.items():
        config = json.loads((Path(path) / "config.json").read_text())
        theirs[name] = {"quantized": sorted(in_memory(n, config) for n in found[path]["quantized"]),
                        "ignore": [in_memory(m, config) for m in found[path]["ignore"]]}
    return {name: (ours[name], theirs[name]) for name in ours}


@pytest.mark.slow
@pytest.mark.parametrize("name", [c[1] for c in CASES])
def test_choice_is_llm_compressors(choices: dict[str, Any], name: str) -> None:
    ours, theirs = choices[name]
    assert ours["quantized"], name
    assert ours == theirs


@pytest.mark.parametrize("name", ["qwen2vl_z3_w2_fp32", "llava_z3_w2_bf16", "gemma3_z3_w2_bf16"])
def test_vlm_quantized_output_validates(corpus: dict[str, Path], name: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    """A vision-language model's --quantize output (vision tower quantized too, written under this tool's VLM
    names) passes the default validation and ``validate --against`` its source: the quantized-layout check maps
    the model's module names to the written ones."""
    from vllm_consolidate.cli import main

    cdir = corpus[name]
    assert main(["convert", "--input", str(cdir / "ckpt"), "--output", str(tmp_path / "q"), "--quantize",
                 "fp8_block"]) == 0
    capsys.readouterr()
    code = main(["validate", str(tmp_path / "q"), "--json", "--against", str(cdir / "ckpt")])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    failed = {n: c["message"] for n, c in checks.items() if c["status"] == "fail"}
    assert code == 0 and not failed, failed
    assert checks["quantized_weights"]["status"] == checks["source_quantized"]["status"] == "pass"
    assert int(checks["quantized_weights"]["message"].split()[0]) > 14  # the language model's 14 and the vision's
