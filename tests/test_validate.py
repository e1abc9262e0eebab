"""``vllm-consolidate validate``: a good folder passes; each silent vLLM failure is caught by name.

One tiny Qwen2 model (untied lm_head, square q_proj) is saved with real transformers, with a tokenizer
trained locally with ``tokenizers`` and a chat template. Every broken folder is a copy of it with one
defect. The installed console script is run once as a subprocess (the good folder); the other cases
call ``cli.main`` in-process, which is the same argument parsing, command and exit-code mapping
(``__main__`` and the console script only ``sys.exit`` its return value) without paying the
interpreter and transformers start-up each time.

A square weight stored transposed has the right shape, and the load tier compares vLLM with
transformers on the same bytes, so both agree on the same wrong output (checked by hand with vLLM 0.32
CPU: a transposed ``q_proj`` passes ``validate --load``). It is caught against the source folder
(``--against``); tests/test_compare.py covers that on real DeepSpeed checkpoints.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_consolidate import cli
from vllm_consolidate import validate as V
from vllm_consolidate.errors import VllmLoadError, VllmUnavailableError
from vllm_consolidate.read.hf import SAFE_INDEX
from vllm_consolidate.validate import context as validate_context

CLI = Path(sys.executable).with_name("vllm-consolidate")
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
VOCAB = 512

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([f"the quick brown fox jumps over the lazy dog {i}" for i in range(200)], trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _config(**overrides):
    from transformers import Qwen2Config

    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  architectures=["Qwen2ForCausalLM"])
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


@pytest.fixture(scope="session")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``good`` (single file), ``sharded``, ``bin`` and ``tied`` variants of one tiny model."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("validate")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config())
    tok = _tokenizer()
    out = {}
    for name, kwargs in (("good", {}), ("sharded", {"max_shard_size": "50KB"})):
        out[name] = root / name
        model.save_pretrained(out[name], **kwargs)
        tok.save_pretrained(out[name])
    out["bin"] = root / "bin"
    shutil.copytree(out["good"], out["bin"])
    (out["bin"] / "model.safetensors").unlink()
    torch.save(load_file(out["good"] / "model.safetensors"), out["bin"] / "pytorch_model.bin")
    tied = AutoModelForCausalLM.from_config(_config(tie_word_embeddings=True))
    out["tied"] = root / "tied"
    tied.save_pretrained(out["tied"])
    tok.save_pretrained(out["tied"])
    return out


@pytest.fixture
def broken(folders: dict[str, Path], tmp_path: Path) -> Callable[[str], Path]:
    """Factory: a fresh copy of one of the session folders, to break."""

    def _copy(name: str = "good") -> Path:
        dst = tmp_path / name
        shutil.copytree(folders[name], dst)
        return dst

    return _copy


def _edit_weights(folder: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                  filename: str = "model.safetensors") -> None:
    path = folder / filename
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})


def _edit_config(folder: Path, edit: Callable[[dict], None]) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _validate(folder: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = cli.main(["validate", str(folder), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


def _status(text: str, check: str) -> str:
    line = next(line for line in text.splitlines() if line.split()[1:2] == [check])
    return line.split()[0]


# -- the real console script --------------------------------------------------------------------------

def test_console_script_passes_good_folder(folders: dict[str, Path]) -> None:
    proc = subprocess.run([str(CLI), "validate", str(folders["good"])], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "result: passed (0 failed, 0 warnings" in proc.stdout
    for check in ("weight_files", "missing_tensors", "tensor_shapes", "values", "tokenizer_roundtrip",
                  "chat_template", "special_tokens", "architecture", "vocab_size"):
        assert _status(proc.stdout, check) == "PASS", check


def test_json_of_broken_folder(broken, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken()
    _edit_weights(folder, _drop(Q_PROJ))
    code = cli.main(["validate", "--json", str(folder)])
    out = capsys.readouterr()
    assert code == 9
    doc = json.loads(out.out)
    assert doc["status"] == "failed" and doc["ok"] is False and doc["exit_code"] == 9
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["missing_tensors"]["status"] == "fail"
    assert checks["missing_tensors"]["details"]["names"] == [Q_PROJ]
    assert Q_PROJ in checks["missing_tensors"]["message"]
    assert doc["counts"] == {"pass": 19, "warn": 0, "fail": 1}
    assert "error: 1 check(s) failed: missing_tensors" in out.err


# -- good folders -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["good", "sharded", "bin"])
def test_good_layouts_pass(folders: dict[str, Path], capsys: pytest.CaptureFixture[str], name: str) -> None:
    code, text = _validate(folders[name], capsys)
    assert code == 0, text
    assert "result: passed" in text
    if name == "sharded":
        assert _status(text, "index") == "PASS"
        assert len(list(folders[name].glob("*.safetensors"))) > 1
    if name == "bin":
        assert _status(text, "bin_format") == "PASS"


def test_json_of_good_folder(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _validate(folders["good"], capsys, "--json")
    assert code == 0
    doc = json.loads(text)
    assert doc["status"] == "passed" and doc["ok"] is True and doc["exit_code"] == 0
    assert doc["counts"]["fail"] == 0
    names = [c["name"] for c in doc["checks"]]
    assert {"weight_files", "index", "missing_tensors", "unexpected_tensors", "tensor_shapes", "values",
            "tokenizer", "chat_template"} <= set(names)
    assert all(c["status"] == "pass" for c in doc["checks"])


def test_tied_model_without_lm_head_passes(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert "lm_head.weight" not in load_file(folders["tied"] / "model.safetensors")
    code, text = _validate(folders["tied"], capsys)
    assert code == 0, text
    assert _status(text, "tied_embeddings") == "PASS"


def test_tied_model_with_stored_lm_head(broken, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken("tied")
    _edit_weights(folder, lambda sd: {**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()})
    code, text = _validate(folder, capsys)
    assert code == 0, text
    assert _status(text, "tied_embeddings") == "PASS"
    assert "identical to model.embed_tokens.weight" in text

    _edit_weights(folder, lambda sd: {**sd, "lm_head.weight": torch.randn(VOCAB, 32)})
    code, text = _validate(folder, capsys)
    assert code == 0, text
    assert _status(text, "tied_embeddings") == "WARN"
    assert "ignore the stored copy" in text


def test_moe_per_expert_passes_and_fused_layout_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    config = Qwen2MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                            shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                            architectures=["Qwen2MoeForCausalLM"])
    model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path / "moe"
    model.save_pretrained(folder)  # per-expert names, as vLLM has always read them
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in load_file(folder / "model.safetensors")
    report = V.validate_folder(folder)
    assert report.ok and report.get("missing_tensors").status == "pass", report.failure_messages()

    fused = {k: v.contiguous() for k, v in model.state_dict().items()}  # transformers 5's in-memory layout
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused
    save_file(fused, folder / "model.safetensors", metadata={"format": "pt"})
    code, text = _validate(folder, capsys)
    assert code == 0, text
    assert _status(text, "missing_tensors") == "WARN"
    assert "in-memory layout (fused MoE experts)" in text

    _edit_weights(folder, _drop("model.layers.0.mlp.experts.down_proj"))
    code, text = _validate(folder, capsys)
    assert code == 9
    assert "model.layers.0.mlp.experts.down_proj" in text


# -- each silent vLLM failure -------------------------------------------------------------------------

def _drop(name: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda sd: {k: v for k, v in sd.items() if k != name}


@pytest.mark.parametrize("tensor", [Q_PROJ, "lm_head.weight", "model.embed_tokens.weight"])
def test_missing_tensor_fails(broken, capsys: pytest.CaptureFixture[str], tensor: str) -> None:
    folder = broken()
    _edit_weights(folder, _drop(tensor))
    code, text = _validate(folder, capsys)
    assert code == 9
    assert _status(text, "missing_tensors") == "FAIL"
    assert f"1 tensors that Qwen2ForCausalLM needs are not stored: {tensor}" in text


def test_transposed_square_weight_fails_against_the_source(broken, folders: dict[str, Path],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken()
    _edit_weights(folder, lambda sd: {**sd, Q_PROJ: sd[Q_PROJ].T.contiguous()})
    code, text = _validate(folder, capsys)
    assert code == 0, text  # the folder alone cannot tell
    code, text = _validate(folder, capsys, "--against", str(folders["good"]))
    assert code == 9
    assert _status(text, "source_values") == "FAIL"
    assert f"{Q_PROJ} is stored transposed (it equals the source tensor's transpose)" in text
    assert _status(text, "source_tensors") == "PASS"


def test_stray_consolidated_file_fails(broken, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken()
    shutil.copy(folder / "model.safetensors", folder / "consolidated.safetensors")
    code, text = _validate(folder, capsys)
    assert code == 9
    assert _status(text, "weight_files") == "FAIL"
    assert "consolidated.safetensors: Mistral's native format" in text


def test_stray_unlisted_shard_fails(broken, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken("sharded")
    save_file({Q_PROJ: torch.zeros(32, 32)}, folder / "model-00009-of-00009.safetensors", metadata={"format": "pt"})
    code, text = _validate(folder, capsys)
    assert code == 9
    assert _status(text, "index") == "FAIL"
    assert "unlisted shard(s) model-00009-of-00009.safetensors" in text
    assert _status(text, "duplicate_tensors") == "FAIL"
    assert Q_PROJ in text


def test_several_safetensors_without_index_fail(broken, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken("sharded")
    (folder / SAFE_INDEX).unlink()
    code, text = _validate(folder, capsys)
    assert code == 9
    assert "and no model.safetensors.index.json: vLLM loads every file" in text


def test_index_naming_a_tensor_its_file_lacks_fails(broken, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken("sharded")
    index = json.loads((folder / SAFE_INDEX).read_text())
    shard = index["weight_map"][Q_PROJ]
    index["weight_map"]["model.layers.0.self_attn.ghost.weight"] = shard
    (folder / SAFE_INDEX).write_text(json.dumps(index))
    code, text = _validate(folder, capsys)
    assert code == 9
    assert "1 tensors are not in the file the index names: model.layers.0.self_attn.ghost.weight" in text


def test_bin_next_to_safetensors_fails(broken, folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken()
    shutil.copy(folders["bin"] / "pytorch_model.bin", folder / "pytorch_model.bin")
    code, text = _validate(folder, capsys)
    assert code == 9
    assert ".bin weights next to safetensors (pytorch_model.bin): vLLM loads only the *.safetensors" in text


def test_nested_bin_fails(broken, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken("bin")
    torch.save({"module": load_file(broken("good") / "model.safetensors")}, folder / "pytorch_model.bin")
    code, text = _validate(folder, capsys)
    assert code == 9
    assert _status(text, "bin_format") == "FAIL"
    assert "not a flat name -> tensor dict" in text


def test_leftover_quantization_config_fails(broken, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken()
    _edit_config(folder, lambda c: c.update(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}))
    code, text = _validate(folder, capsys)
    assert code == 9
    assert _status(text, "quantization_config") == "FAIL"
    assert "quant_method bitsandbytes" in text


@pytest.mark.parametrize("vocab", [VOCAB + 64, VOCAB - 64])
def test_vocab_mismatch_fails(broken, capsys: pytest.CaptureFixture[str], vocab: int) -> None:
    folder = broken()
    _edit_config(folder, lambda c: c.update(vocab_size=vocab))
    code, text = _validate(folder, capsys)
    assert code == 9
    assert _status(text, "vocab_size") == "FAIL"
    assert f"vocab_size {vocab} but model.embed_tokens.weight has" in text
    assert _status(text, "tensor_shapes") == "FAIL"


def test_nan_and_inf_fail(broken, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken()

    def poison(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sd[Q_PROJ][3, 4] = float("nan")
        sd["lm_head.weight"][-1, -1] = float("inf")
        return sd

    _edit_weights(folder, poison)
    report = V.validate_folder(folder, chunk_bytes=1000)  # several chunks per tensor
    assert report.get("values").details["tensors"] == {"lm_head.weight": {"nan": 0, "inf": 1},
                                                        Q_PROJ: {"nan": 1, "inf": 0}}
    code, text = _validate(folder, capsys)
    assert code == 9
    assert f"2 tensors hold NaN or Inf: lm_head.weight (0 NaN, 1 Inf), {Q_PROJ} (1 NaN, 0 Inf)" in text


def test_bf16_nan_is_found(broken, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken()

    def to_bf16(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
        sd["model.norm.weight"][0] = float("nan")
        return sd

    _edit_weights(folder, to_bf16)
    code, text = _validate(folder, capsys)
    assert code == 9
    assert "model.norm.weight (1 NaN, 0 Inf)" in text
    assert _status(text, "dtype") == "WARN"  # config says float32, stored bfloat16


def test_module_prefix_fails(broken, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken()
    _edit_weights(folder, lambda sd: {f"module.{k}": v for k, v in sd.items()})
    code, text = _validate(folder, capsys)
    assert code == 9
    assert _status(text, "wrapper_prefixes") == "FAIL"
    assert "prefix ('module.')" in text


def test_empty_tensor_fails(broken, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken()
    _edit_weights(folder, lambda sd: {**sd, Q_PROJ: torch.empty(0)})
    code, text = _validate(folder, capsys)
    assert code == 9
    assert _status(text, "empty_tensors") == "FAIL"
    assert f"1 empty tensors (0 elements, e.g. ZeRO-3 placeholders): {Q_PROJ}" in text
    assert f"{Q_PROJ} is [0], expected [32, 32]" in text


def test_wrong_shape_fails(broken, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken()
    _edit_weights(folder, lambda sd: {**sd, "model.layers.1.mlp.up_proj.weight": torch.zeros(32, 64)})
    code, text = _validate(folder, capsys)
    assert code == 9
    assert "model.layers.1.mlp.up_proj.weight is [32, 64], expected [64, 32]" in text


def test_unexpected_tensor_fails(broken, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken()
    _edit_weights(folder, lambda sd: {**sd, "model.layers.0.adapter.weight": torch.zeros(4)})
    code, text = _validate(folder, capsys)
    assert code == 9
    assert "1 stored tensors are not part of Qwen2ForCausalLM: model.layers.0.adapter.weight" in text


def test_unsupported_architecture_fails(broken, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken()
    _edit_config(folder, lambda c: c.update(architectures=["FancyNewForCausalLM"]))
    code, text = _validate(folder, capsys)
    assert code == 9
    assert _status(text, "architecture") == "FAIL"
    assert "architecture FancyNewForCausalLM is not one vLLM supports" in text


def test_config_without_architectures_fails(broken, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken()
    _edit_config(folder, lambda c: c.pop("architectures"))
    code, text = _validate(folder, capsys)
    assert code == 9
    assert "config.json lacks architectures" in text


def test_special_token_out_of_vocab_fails(broken, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken()
    _edit_config(folder, lambda c: c.update(eos_token_id=[2, VOCAB + 5]))
    code, text = _validate(folder, capsys)
    assert code == 9
    assert f"config.json eos_token_id[1]={VOCAB + 5}" in text


def test_no_tokenizer_and_no_chat_template_warn(broken, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken()
    (folder / "chat_template.jinja").unlink()
    code, text = _validate(folder, capsys)
    assert code == 0, text
    assert _status(text, "chat_template") == "WARN"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).unlink()
    code, text = _validate(folder, capsys)
    assert code == 0, text
    assert _status(text, "tokenizer") == "WARN"
    assert "skip_tokenizer_init" in text


def test_without_transformers_skeleton_and_tokenizer_checks_are_skipped(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(validate_context, "transformers_module", lambda: None)
    report = V.validate_folder(folders["good"])
    assert report.ok
    for name in ("missing_tensors", "unexpected_tensors", "tensor_shapes", "tokenizer", "chat_template"):
        check = report.get(name)
        assert check.status == "warn" and check.message == "skipped: transformers not installed", name
    assert report.get("values").status == "pass"


def test_missing_folder_is_input_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _validate(tmp_path / "nope", capsys)
    assert code == 3
    assert "not a folder" in text


# -- --load wiring (the real load tier is tested in test_vllm_load.py) --------------------------------

def _fake_compare(equal: bool):
    from vllm_consolidate.validate.load import LoadReport

    def compare_load(model_dir, python=None, prompts=(), max_tokens=8, **_):
        hf = [[5] * max_tokens]
        vllm = hf if equal else [[5, 6] + [7] * (max_tokens - 2)]
        mismatch = None if equal else {"prompt_index": 0, "position": 1, "vllm": vllm[0], "hf": hf[0]}
        return LoadReport(str(model_dir), [[1, 2, 3]], vllm, hf, equal, 0.1, "float32",
                          {"vllm_version": "0.0-test", "first_mismatch": mismatch, "hf_min_logit_margin": 2.5,
                           "vllm_python": python})

    return compare_load


@pytest.mark.parametrize("equal", [True, False])
def test_load_flag_adds_vllm_load_check(folders: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch, equal: bool) -> None:
    from vllm_consolidate.validate import load as vllm_load

    monkeypatch.setattr(vllm_load, "compare_load", _fake_compare(equal))
    code, text = _validate(folders["good"], capsys, "--load", "--vllm-python", "/x/python", "--max-tokens", "4",
                           "--json")
    doc = json.loads(text[: text.rindex("}") + 1])
    check = {c["name"]: c for c in doc["checks"]}["vllm_load"]
    if equal:
        assert code == 0 and check["status"] == "pass"
        assert "greedy tokens equal transformers' (1 prompts x 4 tokens" in check["message"]
    else:
        assert code == 9 and check["status"] == "fail"
        assert "vLLM [5, 6, 7, 7] vs transformers [5, 5, 5, 5]" in check["message"]
        assert check["details"]["vllm_tokens"] == [[5, 6, 7, 7]]


def test_load_skipped_when_static_checks_fail(broken, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_consolidate.validate import load as vllm_load

    monkeypatch.setattr(vllm_load, "compare_load", lambda *a, **k: pytest.fail("must not load a broken folder"))
    folder = broken()
    _edit_weights(folder, _drop(Q_PROJ))
    code, text = _validate(folder, capsys, "--load")
    assert code == 9
    assert _status(text, "vllm_load") == "WARN"


@pytest.mark.parametrize(("exc", "code"), [(VllmUnavailableError("vLLM is not installed"), 10),
                                           (VllmLoadError("vLLM could not load or run the model: boom"), 10)])
def test_load_errors_are_clear(folders: dict[str, Path], capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch, exc: Exception, code: int) -> None:
    from vllm_consolidate.validate import load as vllm_load

    def raise_(*_a, **_k):
        raise exc

    monkeypatch.setattr(vllm_load, "compare_load", raise_)
    got, text = _validate(folders["good"], capsys, "--load")
    assert got == code
    assert f"error: {exc.message}" in text
    assert "PASS  missing_tensors" in text  # the static report is shown before the error


def test_unavailable_interpreter_through_real_resolver(folders: dict[str, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _validate(folders["good"], capsys, "--load", "--vllm-python", "/nonexistent/python")
    assert code == 10
    assert "the --vllm-python interpreter does not exist" in text


def test_stream_scan_counts_nan_and_inf_as_the_read_back_scan(tmp_path: Path) -> None:
    """The value scan an object-store output makes of its bytes as they are uploaded (StreamScan) finds the same
    NaN/Inf per tensor as the read-back scan, however the bytes are cut (header split, elements split)."""
    import random

    from vllm_consolidate.validate.values import StreamScan

    g = torch.Generator().manual_seed(0)
    tensors = {"a.f32": torch.randn(300, generator=g), "b.bf16": torch.randn(257, generator=g).bfloat16(),
               "c.f16": torch.randn(5, 7, generator=g).half(), "d.i64": torch.arange(9),
               "e.f8": torch.randn(33, generator=g).to(torch.float8_e4m3fn), "f.clean": torch.ones(4)}
    tensors["a.f32"][[3, 299]] = float("nan")
    tensors["a.f32"][100] = float("-inf")
    tensors["b.bf16"][256] = float("inf")
    tensors["c.f16"][4, 6] = float("nan")
    tensors["e.f8"][0] = float("nan")
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    data = path.read_bytes()
    want = {"a.f32": {"nan": 2, "inf": 1}, "b.bf16": {"nan": 0, "inf": 1}, "c.f16": {"nan": 1, "inf": 0},
            "e.f8": {"nan": 1, "inf": 0}}
    rng = random.Random(1)
    for cuts in ([len(data)], [1] * 9 + [3] * 40 + [len(data)], [rng.randint(1, 97) for _ in range(len(data))]):
        scan, pos = StreamScan("model.safetensors"), 0
        for n in cuts:
            scan.feed(data[pos:pos + n])
            pos += n
            if pos >= len(data):
                break
        assert scan.complete and scan.error is None
        assert scan.bad == want
        assert scan.scanned == sum(t.nbytes for n, t in tensors.items() if t.is_floating_point())
        check = StreamScan.check([scan])
        assert check.status == "fail" and check.details["tensors"] == want
    # The read-back scan of the same file agrees.
    report = V.validate_folder(tmp_path)
    assert report.get("values").details["tensors"] == want
    # A stream cut short is not complete (validation then reads the file back).
    short = StreamScan("model.safetensors")
    short.feed(data[:-1])
    assert not short.complete
