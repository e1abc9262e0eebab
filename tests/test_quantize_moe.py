"""``convert --quantize`` of mixture-of-experts models: byte for byte what llm-compressor writes (issue 26).

llm-compressor 0.14 linearizes transformers 5's fused experts (one ``up_proj``/``gate_proj``/``down_proj`` Linear
per expert), quantizes them like any Linear, leaves the routers (``mlp.gate``, not Linear) in bf16 but lists them
in ``quantization_config.ignore``, and saves the experts per expert under ``gate/up/down_proj`` names (Mixtral
too, in ``block_sparse_moe``). The anchor is its own output (the same tool and venv as ``tests/test_quantize.py``)
from the corpus truth cast to bf16 and laid out per expert by transformers' ``save_pretrained``, for a ZeRO-3
Mixtral (w8a8), a ZeRO-3 Qwen3-MoE (fp8_block), an FSDP2/DCP Qwen2-MoE with a shared expert (fp8_dynamic), and
the Mixtral run with an ignore pattern that leaves one expert alone (which fixes the order of ``ignore``).

Not here: serving. vLLM 0.32 on this CPU serves no compressed-tensors MoE (w8a8: "No Int8 MoE backend supports
the deployment configuration", even with every expert ignored; FP8 is not served on CPU at all), and
transformers 5 + compressed-tensors load llm-compressor's MoE folders with the experts left uninitialised, so
neither can compare ours with llm-compressor's beyond the bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.test_quantize import bf16_folder, convert, differences, run_llmc

from vllm_consolidate.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# (case id, corpus fixture, case name, truth, scheme, --quantize-ignore patterns)
CASES = [
    ("mixtral-w8a8", "corpus", "mixtral_z3_w2_bf16", "truth/global_step2.safetensors", "w8a8", []),
    ("qwen3moe-fp8_block", "corpus", "qwen3moe_z3_w2_bf16", "truth/global_step2.safetensors", "fp8_block", []),
    ("dcp-qwen2moe-fp8_dynamic", "fsdp_corpus", "dcp_qwen2moe_w2", "truth/step-2.safetensors", "fp8_dynamic", []),
    ("mixtral-ign", "corpus", "mixtral_z3_w2_bf16", "truth/global_step2.safetensors", "fp8_dynamic",
     [r"re:.*experts\.1\."]),
]


def resaved(folder: Path, out: Path) -> Path:
    """``folder`` (fused experts, transformers 5's in-memory names) as transformers' ``save_pretrained`` writes
    a model holding those weights: the per-expert folder a user quantizes with llm-compressor.

    llm-compressor names its output as the folder it loaded (it reverts only the renames transformers applied
    on load; a folder of in-memory names loads and saves unchanged), so the anchor starts from save_pretrained's
    layout, which is also what ``convert`` writes without ``--quantize``.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    model.to(torch.bfloat16).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def anchors(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Every case converted by us (validation on, vLLM off) and by llm-compressor (one subprocess for all)."""
    base = tmp_path_factory.mktemp("quantize_moe")
    out: dict[str, dict[str, Path]] = {}
    jobs: list[list[str]] = []
    for case_id, fixture, name, truth, scheme, ignore in CASES:
        cdir = request.getfixturevalue(fixture)[name]
        ours = base / case_id / "ours"
        convert(["--input", cdir / "ckpt", "--output", ours, "--quantize", scheme, "--no-validate-vllm",
                 *[a for i in ignore for a in ("--quantize-ignore", i)]])
        config = json.loads((ours / "config.json").read_text())
        src = resaved(bf16_folder(cdir / truth, config, base / case_id / "bf16"), base / case_id / "bf16-saved")
        jobs.append([str(src), str(base / case_id / "llmc"), scheme, *ignore])
        out[case_id] = {"case": cdir, "ours": ours, "llmc": base / case_id / "llmc"}
    run_llmc(jobs)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_moe_same_bytes_as_llm_compressor(anchors: dict[str, dict[str, Path]], case_id: str) -> None:
    assert differences(anchors[case_id]["ours"], anchors[case_id]["llmc"]) == []


@pytest.mark.slow
def test_moe_names_routers_and_ignore_order(anchors: dict[str, dict[str, Path]]) -> None:
    """What llm-compressor does, spelled out: Mixtral experts under gate/up/down_proj, routers ignored (bf16),
    and an ignored expert listed in the linearized module order (up, gate, down)."""
    from tests.test_quantize import tensors_of

    tensors = tensors_of(anchors["mixtral-w8a8"]["ours"])
    prefix = "model.layers.0.block_sparse_moe"
    assert str(tensors[f"{prefix}.experts.3.gate_proj.weight"].dtype) == "torch.int8"
    assert str(tensors[f"{prefix}.gate.weight"].dtype) == "torch.bfloat16"
    assert not any(".w1." in n or ".mlp." in n for n in tensors)
    config = json.loads((anchors["mixtral-ign"]["ours"] / "config.json").read_text())
    layer = [f"model.layers.{i}.block_sparse_moe" for i in range(2)]
    assert config["quantization_config"]["ignore"] == [
        name for p in layer for name in (f"{p}.gate", f"{p}.experts.1.up_proj", f"{p}.experts.1.gate_proj",
                                         f"{p}.experts.1.down_proj")] + ["lm_head"]
    qwen2 = tensors_of(anchors["dcp-qwen2moe-fp8_dynamic"]["ours"])  # the shared expert's gate is a Linear
    assert str(qwen2["model.layers.0.mlp.shared_expert_gate.weight"].dtype) == "torch.float8_e4m3fn"


@pytest.mark.slow
def test_moe_validate_against_source(anchors: dict[str, dict[str, Path]], capsys: pytest.CaptureFixture) -> None:
    """Our validate passes llm-compressor's Mixtral folder and ours against the training checkpoint (names
    mapped back to save_pretrained's for the skeleton, the source's experts named as llm-compressor does)."""
    case = anchors["mixtral-w8a8"]
    for folder in (case["ours"], case["llmc"]):
        capsys.readouterr()
        code = main(["validate", str(folder), "--json", "--against", str(case["case"] / "ckpt")])
        checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
        failed = {n: c["message"] for n, c in checks.items() if c["status"] == "fail"}
        assert code == 0 and not failed, failed
        assert checks["source_quantized"]["status"] == "pass"


def test_moe_fused_layout_is_refused(corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """llm-compressor writes experts per expert; ``--moe-layout fused`` with ``--quantize``: exit 2, nothing
    written."""
    capsys.readouterr()
    code = main(["convert", "--input", str(corpus["qwen2moe_z2_w2_bf16"] / "ckpt"), "--output", str(tmp_path / "o"),
                 "--quantize", "w8a8", "--moe-layout", "fused"])
    err = capsys.readouterr().err
    assert code == 2 and "--moe-layout fused" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_batch_quantize_ram_estimate(corpus: dict[str, Path], tmp_path: Path) -> None:
    """A batch ``--quantize`` job's RAM estimate counts what quantizing adds (write.estimates.QUANTIZE_RSS) and
    covers the peak RSS its worker reports (measured: 347 MiB for this tiny Mixtral; 389 MiB for a 0.5B Qwen2
    ZeRO-3 through convert --quantize w8a8)."""
    from vllm_consolidate.cli import batch as cli_batch
    from vllm_consolidate.write.estimates import JOB_BASE_RSS, QUANTIZE_RSS

    report = tmp_path / "r.json"
    code = cli_batch.main(["--input-pattern", str(corpus["mixtral_z3_w2_bf16"] / "ckpt"), "--output-dir",
                           str(tmp_path / "out"), "--quantize", "w8a8", "--no-validate-vllm", "--report", str(report)])
    assert code == 0
    (job,) = json.loads(report.read_text())["jobs"]
    assert job["status"] == "done"
    assert job["est_peak_ram_bytes"] >= JOB_BASE_RSS + QUANTIZE_RSS
    assert 0 < job["peak_rss_bytes"] <= job["est_peak_ram_bytes"]


def _data_bytes(folder: Path) -> int:
    """The tensor data bytes of a folder's safetensors files (what ``total_size`` counts)."""
    import struct

    total = 0
    for f in folder.glob("*.safetensors"):
        with f.open("rb") as h:
            header = json.loads(h.read(struct.unpack("<Q", h.read(8))[0]))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total


@pytest.mark.slow
def test_inspect_quantized_size_is_exact(anchors: dict[str, dict[str, Path]]) -> None:
    """inspect's size of each --quantize output (from names and shapes, no transformers) is the bytes written."""
    from vllm_consolidate.inspection import inspect_path

    for case_id, _, _, _, scheme, ignore in CASES:
        if ignore:
            continue  # inspect counts no --quantize-ignore
        (report,) = inspect_path(anchors[case_id]["case"] / "ckpt").inputs
        assert report.quantized[scheme] == _data_bytes(anchors[case_id]["ours"]), case_id


#: One corpus case of each architecture the builders here make that has its own config.json (the cached VLM and
#: Gemma 3 cases of another branch also matched when checked by hand).
RULE_CASES = ["deepseekv2_z3_w2_bf16", "hf_llama_sharded_bf16", "mistral_z1_w3_bf16", "dcp_llama_w2_flat_bf16",
              "qwen3moe_z3_w2_bf16", "qwen2moe_z2_w2_bf16", "hf_mixtral_single_fp32", "hf_qwen2_single_fp32_tied"]


@pytest.mark.parametrize("name", RULE_CASES)
def test_name_rule_is_linear_modules(request: pytest.FixtureRequest, name: str, tmp_path: Path) -> None:
    """inspect's name-and-shape rule picks exactly the weights of the Linear modules transformers builds
    (plan.quantize.linear_modules, which the byte tests tie to llm-compressor), for every corpus architecture."""
    from vllm_consolidate.convert import ConvertOptions, plan_conversion
    from vllm_consolidate.plan.quantize import linear_modules, weights_to_quantize_by_name

    cdir = request.getfixturevalue("fsdp_corpus" if name.startswith("dcp_") else "corpus")[name]
    case = json.loads((cdir / "case.json").read_text())
    conv = plan_conversion(ConvertOptions(input=str(cdir / case.get("input", "ckpt")),
                                          output=str(tmp_path / "out")))
    tensors = [t.spec for t in conv.plan.tensors]
    names = {t.name for t in tensors}
    quantized, _ = linear_modules(conv.config, ())
    want = {f"{m}.weight" for m in quantized} & names  # Mixtral's experts: same shapes under w1/w3/w2 names
    got = {t.name for t in weights_to_quantize_by_name(tensors)}
    if conv.moe is not None and conv.moe.family == "mixtral":
        got = {n.replace(".w1.", ".gate_proj.").replace(".w3.", ".up_proj.").replace(".w2.", ".down_proj.")
               for n in got}
        want = {f"{m}.weight" for m in quantized}
    assert got and got == want
