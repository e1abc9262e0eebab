"""``convert --quantize``: byte for byte what llm-compressor writes for the same bf16 weights (issue 26).

The anchor: llm-compressor 0.14 (compressed-tensors 0.19) in its own venv (``scripts/setup_llmc_venv.sh``,
``make setup-llmc``) quantizes the corpus truth (gathered from the live model at save time) cast to bf16, by
subprocess (``tests/tools/llmc_quantize.py``). Our one-pass output from the training checkpoint must hold the
same tensors (names, dtypes, shapes, bytes) and the same ``quantization_config``, for a ZeRO-3 run (all three
schemes), FSDP/DCP, verl, a LoRA merge and an HF folder. ``test_wrong_rounding_is_caught`` shows the comparison
sees a plausible mistake (INT8 scale = absmax / 127 instead of / 127.5; FP8 division replaced by multiplication
with the reciprocal). The validate tests break a quantized folder and expect the check that must see it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vllm_consolidate.cli import main

REPO = Path(__file__).resolve().parents[1]
LLMC_PYTHON = Path(os.environ.get("LLMC_PYTHON", str(REPO / ".venv-llmc" / "bin" / "python")))
TOOL = REPO / "tests" / "tools" / "llmc_quantize.py"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _llmc_python() -> str:
    if not LLMC_PYTHON.exists():
        pytest.fail(f"no llm-compressor venv at {LLMC_PYTHON}: run `make setup-llmc` (scripts/setup_llmc_venv.sh) "
                    "or set LLMC_PYTHON")
    return str(LLMC_PYTHON)


def run_llmc(jobs: list[list[str]]) -> None:
    """llm-compressor's oneshot + save_pretrained(save_compressed=True) of each ``[bf16 folder, output, scheme,
    ignore...]``, all in one process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
    proc = subprocess.run([_llmc_python(), str(TOOL), "--jobs", json.dumps([list(map(str, j)) for j in jobs])],
                          capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def bf16_folder(truth: Path, config: dict[str, Any], folder: Path) -> Path:
    """The truth cast to bf16 (torch's ``Tensor.to``) with the output's config, as llm-compressor's input."""
    folder.mkdir(parents=True)
    tensors = {k: v.to(torch.bfloat16).contiguous() if v.is_floating_point() else v
               for k, v in load_file(str(truth)).items()}
    save_file(tensors, str(folder / "model.safetensors"))
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def differences(ours: Path, theirs: Path) -> list[str]:
    """Every way ``ours`` differs from llm-compressor's folder: tensor names, dtypes, shapes, bytes, config."""
    a, b = tensors_of(ours), tensors_of(theirs)
    found = [f"only ours: {n}" for n in sorted(set(a) - set(b))]
    found += [f"only theirs: {n}" for n in sorted(set(b) - set(a))]
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if (x.dtype, x.shape) != (y.dtype, y.shape):
            found.append(f"{name}: {x.dtype} {list(x.shape)} vs {y.dtype} {list(y.shape)}")
        elif not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            n = int((x.reshape(-1).view(torch.uint8) != y.reshape(-1).view(torch.uint8)).sum())
            found.append(f"{name}: {n} bytes differ")
    qa = json.loads((ours / "config.json").read_text())["quantization_config"]
    qb = json.loads((theirs / "config.json").read_text())["quantization_config"]
    found += [f"quantization_config.{k}: {qa.get(k)!r} vs {qb.get(k)!r}" for k in sorted(set(qa) | set(qb))
              if qa.get(k) != qb.get(k)]
    dtypes = [json.loads((f / "config.json").read_text()).get("dtype") for f in (ours, theirs)]
    if dtypes[0] != dtypes[1]:
        found.append(f"config dtype {dtypes[0]} vs {dtypes[1]}")
    return found


def convert(argv: list[str]) -> None:
    code = main(["convert", *map(str, argv)])
    assert code == 0


# (case id, corpus fixture, case name, convert input relative to the case, truth, extra arguments, scheme)
CASES = [
    ("zero3-fp8_dynamic", "ds", "qwen2_z3_w2_bf16_tied", "ckpt", "truth/global_step2.safetensors", [], "fp8_dynamic"),
    ("zero3-fp8_block", "ds", "qwen2_z3_w2_bf16_tied", "ckpt", "truth/global_step2.safetensors", [], "fp8_block"),
    ("zero3-w8a8", "ds", "qwen2_z3_w2_bf16_tied", "ckpt", "truth/global_step2.safetensors", [], "w8a8"),
    ("dcp-fp8_block", "fsdp", "dcp_llama_w2_flat_bf16", "ckpt", "truth/step-3.safetensors", [], "fp8_block"),
    ("verl-w8a8", "fsdp", "verl_qwen2_w2_tied", "ckpt", "truth/global_step_2.safetensors", [], "w8a8"),
    ("lora-fp8_dynamic", "lora", "lora_llama_z3_mts", "run/checkpoint-4", "truth/checkpoint-4.merged.safetensors",
     ["--base-model-name", "{case}/base"], "fp8_dynamic"),
    ("hf-w8a8", "ds", "hf_llama_sharded_bf16", "model", "truth/model.safetensors", [], "w8a8"),
]


ZERO3_IGNORE = ["re:.*down_proj$", "model.layers.1.self_attn.q_proj"]


@pytest.fixture(scope="module")
def anchors(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Every case of :data:`CASES` converted by us (in this process, validation on) and by llm-compressor from
    its truth cast to bf16 (one subprocess for all), ``{case id: {"case", "ours", "llmc"}}``; plus ``zero3-ign``
    (fp8_dynamic with :data:`ZERO3_IGNORE`)."""
    base = tmp_path_factory.mktemp("quantize")
    out: dict[str, dict[str, Path]] = {}
    jobs: list[list[str]] = []
    all_cases = [*CASES, ("zero3-ign", *CASES[0][1:6], "fp8_dynamic")]
    for case_id, family, name, rel, truth, extra, scheme in all_cases:
        fixture = {"ds": "corpus", "fsdp": "fsdp_corpus", "lora": "lora_corpus"}[family]
        cdir = request.getfixturevalue(fixture)[name]
        ours = base / case_id / "ours"
        ignore = ZERO3_IGNORE if case_id == "zero3-ign" else []
        convert(["--input", cdir / rel, "--output", ours, "--quantize", scheme, *[e.format(case=cdir) for e in extra],
                 *[a for i in ignore for a in ("--quantize-ignore", i)]])
        config = json.loads((ours / "config.json").read_text())
        src = bf16_folder(cdir / truth, config, base / case_id / "bf16")
        jobs.append([str(src), str(base / case_id / "llmc"), scheme, *ignore])
        out[case_id] = {"case": cdir, "ours": ours, "llmc": base / case_id / "llmc"}
    run_llmc(jobs)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_same_bytes_as_llm_compressor(anchors: dict[str, dict[str, Path]], case_id: str) -> None:
    ours = anchors[case_id]["ours"]
    assert differences(ours, anchors[case_id]["llmc"]) == []
    scheme = next(c[-1] for c in CASES if c[0] == case_id)
    assert json.loads((ours / ".vllm-consolidate.json").read_text())["quantize"] == scheme


@pytest.fixture(scope="module")
def zero3(anchors: dict[str, dict[str, Path]]) -> dict[str, Path]:
    """The ZeRO-3 case: ours and llm-compressor's w8a8, and fp8_dynamic with :data:`ZERO3_IGNORE`."""
    return {"case": anchors["zero3-w8a8"]["case"], "ours": anchors["zero3-w8a8"]["ours"],
            "llmc": anchors["zero3-w8a8"]["llmc"], "ours_ign": anchors["zero3-ign"]["ours"],
            "llmc_ign": anchors["zero3-ign"]["llmc"]}


@pytest.mark.slow
def test_ignore_patterns_as_llm_compressor(zero3: dict[str, Path]) -> None:
    assert differences(zero3["ours_ign"], zero3["llmc_ign"]) == []
    qc = json.loads((zero3["ours_ign"] / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
                            "model.layers.1.mlp.down_proj", "lm_head"]


def _divide_by_127(w: Any, scheme: Any, work: Any) -> Any:
    """INT8 with scale = absmax / 127 (qmax) instead of compressed-tensors' absmax / 127.5 ((qmax - qmin) / 2)."""
    import numpy as np

    from vllm_consolidate.write.quantize import to_work

    scale = to_work(np.abs(w).max(axis=1, keepdims=True) / 127, work)
    scale[scale == 0] = 2.0**-7
    return np.rint(np.clip(to_work(w / scale, work), -128, 127)).astype(np.int8), scale


@pytest.mark.slow
def test_wrong_rounding_is_caught(zero3: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The byte comparison fails for a quantizer that is close but not llm-compressor's."""
    import vllm_consolidate.write.quantize as wq

    original = wq.quantize_rows
    monkeypatch.setattr(wq, "quantize_rows", _divide_by_127)
    convert(["--input", zero3["case"] / "ckpt", "--output", tmp_path / "bad", "--quantize", "w8a8",
             "--no-validate-vllm"])
    found = differences(tmp_path / "bad", zero3["llmc"])
    assert any(f.endswith("_scale: " + f.split(": ")[-1]) for f in found), found  # the scales differ
    assert any(".weight: " in f for f in found), found  # and so do the values

    def reciprocal(w: Any, scheme: Any, work: Any) -> Any:  # FP8: x * (1 / scale) instead of x / scale
        import numpy as np

        q, scale = original(w, scheme, work)
        return wq.float8_e4m3fn_bits(np.clip(wq.to_work(w * wq.to_work(1 / scale, work), work), -448, 448)), scale

    monkeypatch.setattr(wq, "quantize_rows", reciprocal)
    convert(["--input", zero3["case"] / "ckpt", "--output", tmp_path / "bad8", "--quantize", "fp8_dynamic",
             "--quantize-ignore", "re:.*down_proj$", "--quantize-ignore", "model.layers.1.self_attn.q_proj",
             "--no-validate-vllm"])
    found = differences(tmp_path / "bad8", zero3["llmc_ign"])
    assert found and all(".weight:" in f for f in found), found


def _validate(folder: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = main(["validate", str(folder), "--json", *extra])
    report = json.loads(capsys.readouterr().out)
    return code, {c["name"]: c for c in report["checks"]}


@pytest.mark.slow
def test_validate_quantized_folder(zero3: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """llm-compressor's own folder passes our validate; a wrong scale, a missing scale and an edited
    quantization_config each fail the check that must see them."""
    source = str(zero3["case"] / "ckpt")
    code, checks = _validate(zero3["llmc"], capsys, "--against", source)
    assert code == 0 and checks["source_quantized"]["status"] == "pass", checks["source_quantized"]
    assert checks["quantized_weights"]["status"] == "pass"

    bad = tmp_path / "scale"
    shutil.copytree(zero3["ours"], bad)
    t = load_file(str(bad / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.weight_scale"] = t["model.layers.1.mlp.up_proj.weight_scale"] * 2
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    code, checks = _validate(bad, capsys, "--against", source)
    assert code != 0 and checks["source_quantized"]["status"] == "fail", checks["source_quantized"]
    assert "model.layers.1.mlp.up_proj.weight" in checks["source_quantized"]["message"]

    del t["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    code, checks = _validate(bad, capsys)
    assert code != 0 and checks["quantized_weights"]["status"] == "fail", checks["quantized_weights"]

    edited = tmp_path / "config"
    shutil.copytree(zero3["ours"], edited)
    config = json.loads((edited / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "tensor"
    (edited / "config.json").write_text(json.dumps(config))
    code, checks = _validate(edited, capsys)
    assert code != 0 and checks["quantization_config"]["status"] == "fail"


def test_quantize_option_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Refused before anything is read, with exit code 2 and one line naming the option."""
    for extra in (["--quantize-ignore", "lm_head"], ["--quantize", "w8a8", "--pytorch-bin"],
                  ["--quantize", "w8a8", "--lora", "adapter"], ["--quantize", "w8a8", "--quantize-ignore", "re:("]):
        capsys.readouterr()
        code = main(["convert", "--input", str(tmp_path), "--output", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert code == 2, (extra, err)
        assert "quantize" in err and "Traceback" not in err


@pytest.mark.slow
def test_fp8_dequantized_weights_and_logits(zero3: dict[str, Path]) -> None:
    """FP8 (not served by vLLM on CPU): transformers + compressed-tensors (in the llm-compressor venv) load our
    folder and llm-compressor's into the same dequantized weights and the same logits, bit for bit; the check
    tells apart two schemes of the same weights."""
    def compare(*folders: Path) -> dict[str, Any]:
        proc = subprocess.run([_llmc_python(), str(TOOL), "--logits", *map(str, folders)], capture_output=True,
                              text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=""))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.splitlines()[-1])

    same = compare(zero3["llmc_ign"], zero3["ours_ign"])
    assert same["same_dequantized"] and same["same_logits"], same
    other = compare(zero3["llmc_ign"], zero3["ours"])  # the same weights as w8a8
    assert not other["same_dequantized"] and not other["same_logits"], other


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serves_w8a8_as_llm_compressor(zero3: dict[str, Path], tmp_path: Path) -> None:
    """Real vLLM on this CPU serves our w8a8 folder with the greedy tokens it gives llm-compressor's."""
    from tests.test_e2e_vllm import MAX_TOKENS, PROMPTS, vllm_python

    from vllm_consolidate.validate.load import run_vllm_probe

    python = vllm_python()
    theirs = tmp_path / "llmc"
    shutil.copytree(zero3["llmc"], theirs)
    for f in zero3["ours"].glob("tokenizer*"):  # llm-compressor saved no tokenizer; vLLM wants one
        shutil.copy(f, theirs / f.name)
    ours = run_vllm_probe(zero3["ours"], PROMPTS, max_tokens=MAX_TOKENS, python=python, dtype="bfloat16")
    ref = run_vllm_probe(theirs, PROMPTS, max_tokens=MAX_TOKENS, python=python, dtype="bfloat16")
    assert ours["ok"] and ref["ok"], (ours.get("stderr_tail"), ref.get("stderr_tail"))
    assert ours["output_token_ids"] == ref["output_token_ids"]
    assert all(len(t) == MAX_TOKENS for t in ours["output_token_ids"])
