"""A config.json without ``architectures`` (issue 13): inferred, confirmed, written to the output only.

The checkpoints are real DeepSpeed saves from the corpus. Their config.json is rewritten the way a
custom training loop writes it: ``AutoConfig.for_model(model_type, **fields).save_pretrained(...)``,
which records ``model_type`` but no ``architectures``. The default command (validation on) must then
publish a folder vLLM loads, name the inferred class, and leave the input's config.json alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.corpus import build
from tests.corpus.common import model_config

from vllm_consolidate import cli

BIN = Path(sys.executable).parent
VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
TIED = "qwen2_z3_w2_bf16_tied"  # head_dim 64: vLLM loads it (see tests/test_e2e_vllm.py)
UNTIED_NO_CONFIG = "llama_z2_w2_bf16"  # untied lm_head.weight; saved without config.json

os.environ["HF_HUB_OFFLINE"] = "1"


def _for_model_config(folder: Path) -> None:
    """Rewrite folder/config.json as ``AutoConfig.for_model(...).save_pretrained`` writes it: no architectures."""
    from transformers import AutoConfig

    fields = json.loads((folder / "config.json").read_text())
    fields.pop("architectures")
    fields.pop("transformers_version", None)
    AutoConfig.for_model(fields.pop("model_type"), **fields).save_pretrained(folder)
    assert "architectures" not in json.loads((folder / "config.json").read_text())


@pytest.fixture
def raw_save(corpus, tmp_path) -> Path:
    """The tied qwen2 ZeRO-3 engine save, with a for_model config.json."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(corpus[TIED] / "ckpt", ckpt)
    _for_model_config(ckpt)
    return ckpt


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "vllm-consolidate"), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _architectures(folder: Path) -> object:
    return json.loads((folder / "config.json").read_text()).get("architectures")


def test_default_command_infers_writes_and_reports_it(raw_save, tmp_path):
    before = (raw_save / "config.json").read_bytes()
    out = tmp_path / "out"
    proc = _run("convert", "--input", str(raw_save), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "architectures: inferred Qwen2ForCausalLM from model_type qwen2\n" in proc.stdout
    assert "validation: passed" in proc.stdout
    assert _architectures(out) == ["Qwen2ForCausalLM"]
    assert (raw_save / "config.json").read_bytes() == before  # the input's config is never changed
    # Only what a conversion always records changed besides: the output dtype.
    written, source = json.loads((out / "config.json").read_text()), json.loads(before)
    assert {k: v for k, v in written.items() if k not in ("architectures", "dtype", "torch_dtype")} == \
        {k: v for k, v in source.items() if k != "dtype"}


def test_json_records_the_inference(raw_save, tmp_path, capsys):
    assert cli.convert_main(["--input", str(raw_save), "--output", str(tmp_path / "out"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)["architectures"]
    assert record == {"architectures": ["Qwen2ForCausalLM"], "source": "inferred", "model_type": "qwen2",
                      "replaced": [], "message": "inferred Qwen2ForCausalLM from model_type qwen2"}


def test_an_untied_checkpoint_with_a_base_model_config(corpus, tmp_path, capsys):
    """The lm_head.weight confirms the class; the config (from --base-model-name) is a for_model one too."""
    base = tmp_path / "base"
    model_config(build.CASES[UNTIED_NO_CONFIG].model).save_pretrained(base)
    assert "architectures" not in json.loads((base / "config.json").read_text())
    out = tmp_path / "out"
    assert cli.convert_main(["--input", str(corpus[UNTIED_NO_CONFIG] / "ckpt"), "--output", str(out),
                             "--base-model-name", str(base)]) == 0
    assert "architectures: inferred LlamaForCausalLM from model_type llama" in capsys.readouterr().out
    assert _architectures(out) == ["LlamaForCausalLM"]
    assert "architectures" not in json.loads((base / "config.json").read_text())


def test_config_with_architectures_is_kept_and_not_reported(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.convert_main(["--input", str(corpus[TIED] / "ckpt"), "--output", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)["architectures"]
    assert record["source"] == "config" and record["message"] is None
    assert _architectures(out) == ["Qwen2ForCausalLM"]


def test_unknown_model_type_is_one_error_line_naming_the_flag(raw_save, tmp_path):
    _edit_config(raw_save, model_type="acme_lm")
    out = tmp_path / "out"
    proc = _run("convert", "--input", str(raw_save), "--output", str(out))
    assert proc.returncode == 8, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'acme_lm'" in errors[0] and "--architecture" in errors[0], proc.stderr
    assert "hint: Pass --architecture NAME" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_architecture_flag_is_used_as_given(raw_save, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.convert_main(["--input", str(raw_save), "--output", str(out), "--architecture", "Qwen2ForCausalLM"]) == 0
    assert "architectures: Qwen2ForCausalLM from --architecture\n" in capsys.readouterr().out
    assert _architectures(out) == ["Qwen2ForCausalLM"]
    # As given, even over an unknown model_type and over config.json's own value (no inference, no check).
    _edit_config(raw_save, model_type="acme_lm", architectures=["OldForCausalLM"])
    out = tmp_path / "out2"
    assert cli.convert_main(["--input", str(raw_save), "--output", str(out), "--architecture", "AcmeForCausalLM",
                             "--no-validate-vllm"]) == 0
    assert "architectures: AcmeForCausalLM from --architecture (config.json had OldForCausalLM)" in \
        capsys.readouterr().out
    assert _architectures(out) == ["AcmeForCausalLM"]
    assert _architectures(raw_save) == ["OldForCausalLM"]


def test_architecture_flag_must_be_a_class_name(raw_save, tmp_path):
    assert cli.convert_main(["--input", str(raw_save), "--output", str(tmp_path / "out"),
                             "--architecture", "../Qwen2 ForCausalLM"]) == 2


def test_weights_that_contradict_the_inferred_class_are_refused(tmp_path):
    """A base model's save (Qwen2Model: no lm_head, untied) whose config lost its architectures."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=300,
                                  tie_word_embeddings=False)
    folder = tmp_path / "base_model"
    AutoModel.from_config(config).save_pretrained(folder)
    assert _architectures(folder) == ["Qwen2Model"]
    _edit_config(folder, architectures=None)
    before = (folder / "config.json").read_bytes()
    out = tmp_path / "out"
    proc = _run("convert", "--input", str(folder), "--output", str(out))
    assert proc.returncode == 8, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "contradict Qwen2ForCausalLM" in errors[0] and "no lm_head.weight" in errors[0]
    assert "not tied" in errors[0] and "--architecture" in errors[0]
    assert not out.exists() and (folder / "config.json").read_bytes() == before


def test_a_single_file_model_without_architectures_is_not_already_consolidated(corpus, tmp_path, capsys):
    """An HF folder that needs nothing else still needs its config repaired: it is converted, not skipped."""
    model = tmp_path / "model"
    shutil.copytree(corpus["hf_qwen2_single_fp32_tied"] / "model", model)
    _edit_config(model, architectures=None)
    out = tmp_path / "out"
    assert cli.convert_main(["--input", str(model), "--output", str(out)]) == 0
    assert "already consolidated" not in capsys.readouterr().out
    assert _architectures(out) == ["Qwen2ForCausalLM"] and _architectures(model) is None


def test_the_mapping_read_without_torch_is_transformers_own():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from vllm_consolidate.plan.architecture import causal_lm_classes

    assert dict(causal_lm_classes()) == dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@pytest.mark.vllm
def test_inferred_output_loads_in_vllm_with_transformers_greedy_tokens(raw_save, tmp_path):
    if not os.access(VLLM_PYTHON, os.X_OK):
        pytest.fail(f"no vLLM interpreter at {VLLM_PYTHON}: run scripts/setup_vllm_venv.sh", pytrace=False)
    out = tmp_path / "out"
    proc = _run("convert", "--input", str(raw_save), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    proc = _run("validate", str(out), "--load", "--vllm-python", str(VLLM_PYTHON))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    load = [line.split() for line in proc.stdout.splitlines() if "vllm_load" in line]
    assert load and load[0][:2] == ["PASS", "vllm_load"], proc.stdout
    assert "greedy tokens equal transformers'" in proc.stdout
