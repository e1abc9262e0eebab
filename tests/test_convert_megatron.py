"""Megatron-Core consolidation on the real corpus: ``torch_dist`` saves written on CPU by megatron-core 0.16 (and
one by 0.19, which writes no common.pt).

Truth is each model's global state dict gathered from the live Megatron model at save time and mapped
to Hugging Face names by the corpus builder's own map (tests/corpus/megatron_build.py), verified by HF
logits equal to the live model's; never our reader. Each case is converted once per option set
(module-scoped cache) through the CLI's own ``main`` with validation on (vLLM's load only where marked).
A bare ``ckpt/`` has no config: ``--base-model-name`` points at the case's ``hf/`` (config and tokenizer).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tests.corpus import megatron_build
from tests.test_convert_deepspeed import assert_equal, load_out

from vllm_consolidate import cli

# Nothing in these tests may reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
NAMES = list(megatron_build.CASES)
RUN = "mcore_lm_run_llama_tp2"


def _cli(*argv: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


class Corpus(dict):
    """``{name: case_dir}`` of the Megatron corpus, each case built on first use (``make setup-megatron``)."""

    def __missing__(self, name: str) -> Path:
        self[name] = megatron_build.build_all([name])[name]
        return self[name]


class Conversions:
    """``convert`` of each case once per option set, into a module-scoped folder."""

    def __init__(self, tmp: Path):
        self.corpus, self.tmp, self.runs = Corpus(), tmp, {}

    def meta(self, name: str) -> dict[str, Any]:
        self.corpus[name]  # built first
        return megatron_build.load_case(name)

    def convert(self, name: str, *options: str) -> tuple[int, Path, str, str]:
        key = (name, options)
        if key not in self.runs:
            case = self.corpus[name]
            out = self.tmp / f"{name}-{len(self.runs)}"
            code, stdout, stderr = _cli("convert", "--input", case / self.meta(name)["input"], "--output", out,
                                        "--base-model-name", case / "hf", *options)
            self.runs[key] = (code, out, stdout, stderr)
        return self.runs[key]


@pytest.fixture(scope="module")
def conv(tmp_path_factory: pytest.TempPathFactory) -> Conversions:
    return Conversions(tmp_path_factory.mktemp("megatron-convert"))


def _line(stdout: str, label: str) -> str:
    (found,) = [ln for ln in stdout.splitlines() if ln.startswith(label)]
    return found[len(label):].strip()


def _truth(conv: Conversions, name: str, step: int | None = None) -> dict[str, torch.Tensor]:
    meta = conv.meta(name)
    want = meta["expected_step"] if step is None else step
    (entry,) = [c for c in meta["checkpoints"] if c["step"] == want]
    return load_file(conv.corpus[name] / entry["truth"])


def _assert_fp32_of(truth: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    """fp32 output of a save whose truth is fp32 (bit for bit) or bf16: its bf16 matrices exactly widened, and the
    fp32 norm weights Megatron-Core keeps beside bf16 parameters (the bf16 truth has them rounded) compared rounded."""
    if {t.dtype for t in truth.values()} == {torch.float32}:
        assert_equal(truth, got, torch.float32)
        return
    assert sorted(got) == sorted(truth) and {t.dtype for t in got.values()} == {torch.float32}
    for key, want in truth.items():
        assert torch.equal(got[key].to(torch.bfloat16), want), key
        if want.dim() >= 2:
            assert torch.equal(got[key], want.float()), key


@pytest.mark.parametrize("name", NAMES)
def test_default_convert_is_truth_in_fp32(name, conv):
    """The default output is fp32: fp32 saves give their truth bit for bit; bf16 saves their bf16 matrices
    exactly widened (Megatron-Core keeps norm weights in fp32 beside bf16 parameters: the truth, saved by
    transformers in bf16, has those rounded, so they are compared rounded)."""
    code, out, stdout, stderr = conv.convert(name)
    assert code == 0, stderr
    meta = conv.meta(name)
    _assert_fp32_of(_truth(conv, name), load_out(out))
    assert _line(stdout, "detected:").split(",")[0] == "megatron"
    assert _line(stdout, "validation:").startswith("passed")
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
    assert config["vocab_size"] == meta["vocab_size"] < meta["padded_vocab_size"]  # the padding was trimmed
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", [n for n in NAMES if megatron_build.CASES[n].precision == "bf16"])
def test_keep_original_precision_of_bf16_params_is_truth(name, conv):
    """bf16 parameters are the trained precision (the fp32 norms do not make it fp32): bf16 truth, bit for bit."""
    code, out, _, stderr = conv.convert(name, "--keep-original-precision")
    assert code == 0, stderr
    assert_equal(_truth(conv, name), load_out(out), torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("name", [n for n in NAMES if megatron_build.CASES[n].precision == "fp32"])
def test_bfloat16_is_truth_cast(name, conv):
    code, out, _, stderr = conv.convert(name, "--dtype", "bfloat16")
    assert code == 0, stderr
    assert_equal(_truth(conv, name), load_out(out), torch.bfloat16)


@pytest.mark.parametrize("name", [n for n in NAMES if megatron_build.CASES[n].model["tied"]])
def test_tied_embeddings_write_no_head(name, conv):
    code, out, _, stderr = conv.convert(name)
    assert code == 0, stderr
    assert "lm_head.weight" not in load_out(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_run_picks_the_tracker_and_checkpoint_dir_an_older_one(conv):
    meta = conv.meta(RUN)
    code, out, stdout, stderr = conv.convert(RUN)
    assert code == 0, stderr
    assert _line(stdout, "chosen:").startswith(str(conv.corpus[RUN] / "run" / f"iter_{meta['expected_step']:07d}"))
    older = min(c["step"] for c in meta["checkpoints"])
    assert older < meta["expected_step"]
    code, out, _, stderr = conv.convert(RUN, "--checkpoint-dir", str(conv.corpus[RUN] / "run" / f"iter_{older:07d}"))
    assert code == 0, stderr
    old, new = _truth(conv, RUN, older), _truth(conv, RUN)
    assert_equal(old, load_out(out), torch.float32)
    assert any(not torch.equal(old[k], new[k]) for k in new), "the saves do not differ"


RUNS = [n for n, c in megatron_build.CASES.items() if c.kind == "megatron_lm"]
#: config.json fields the config built from Megatron-LM's args must share with the model's own.
SAME_FIELDS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps",
               "tie_word_embeddings", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
               "shared_expert_intermediate_size", "norm_topk_prob", "num_local_experts")


@pytest.mark.parametrize("name", RUNS)
def test_args_alone_give_a_config_transformers_loads_as_truth(name, conv, tmp_path):
    """No config.json anywhere: the one written from Megatron-LM's args (in common.pt, or with megatron-core 0.19+
    in the common_state object inside rank 0's .distcp) builds the model's class in transformers, agrees with the
    model's own config.json, and every weight loads (and is the truth)."""
    from transformers import AutoModelForCausalLM

    case = conv.corpus[name]
    out = tmp_path / "out"
    code, stdout, stderr = _cli("convert", "--input", case / "run", "--output", out, "--base-model-name", "",
                                "--json")
    assert code == 0, stderr
    storage = conv.meta(name)["layout"].get("common_state_storage")
    where = f"common_state/shard_0_1 in {storage['file']}" if storage else "common.pt"
    assert json.loads(stdout)["detected"]["layout_from"] == f"Megatron-LM args in {where}", stdout
    written, own = json.loads((out / "config.json").read_text()), json.loads((case / "hf" / "config.json").read_text())
    assert {k: written.get(k) for k in SAME_FIELDS if k in own} == {k: own[k] for k in SAME_FIELDS if k in own}
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == conv.meta(name)["hf_class"]
    assert not any(info.values()), info  # no missing, unexpected or mismatched weight
    _assert_fp32_of(_truth(conv, name), load_out(out))


BRIDGE_RUNS = [n for n, c in megatron_build.CASES.items() if c.kind == "bridge"]


@pytest.mark.parametrize("name", BRIDGE_RUNS)
def test_bridge_run_config_alone_gives_a_config_and_the_tokenizer(name, conv, tmp_path):
    """A Megatron-Bridge run with no config.json and no base model: the config written from ``run_config.yaml``'s
    model section builds the model's class in transformers, agrees with the model's own config.json, every weight
    loads and is the truth; the tokenizer is the one Bridge saved in ``iter_N/tokenizer/``."""
    from transformers import AutoModelForCausalLM

    case = conv.corpus[name]
    out = tmp_path / "out"
    code, stdout, stderr = _cli("convert", "--input", case / "run", "--output", out, "--base-model-name", "",
                                "--json", "--no-validate-vllm")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["detected"]["layout_from"] == "Megatron-Bridge run_config.yaml"
    assert report["assets"]["tokenizer"] == str(case / "run" / f"iter_{conv.meta(name)['expected_step']:07d}" /
                                                "tokenizer")
    written, own = json.loads((out / "config.json").read_text()), json.loads((case / "hf" / "config.json").read_text())
    assert {k: written.get(k) for k in SAME_FIELDS if k in own} == {k: own[k] for k in SAME_FIELDS if k in own}
    assert (out / "tokenizer.json").read_bytes() == (case / "hf" / "tokenizer.json").read_bytes()
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == conv.meta(name)["hf_class"]
    assert not any(info.values()), info
    _assert_fp32_of(_truth(conv, name), load_out(out))


@pytest.mark.parametrize("name", BRIDGE_RUNS)
def test_bridge_run_config_that_lacks_the_vocabulary_is_refused_with_exit_8(name, conv, tmp_path):
    """Without the true vocabulary size in run_config.yaml (and no other source) the split is not guessed."""
    run = tmp_path / "run"
    shutil.copytree(conv.corpus[name] / "run", run)
    for cfg in run.glob("iter_*/run_config.yaml"):
        cfg.write_text(cfg.read_text().replace("  vocab_size: ", "  padded_vocab_size_unused: "))
    code, _, stderr = _cli("convert", "--input", run, "--output", tmp_path / "out", "--base-model-name", "")
    assert code == 8, stderr
    assert "run_config.yaml" in stderr and "--base-model-name" in stderr, stderr


def test_inspect_and_batch_list_the_runs_saves(conv, tmp_path):
    meta = conv.meta(RUN)
    run = conv.corpus[RUN] / "run"
    code, stdout, stderr = _cli("inspect", run, "--json", "--base-model-name", conv.corpus[RUN] / "hf")
    assert code == 0, stderr
    (report,) = json.loads(stdout)["inputs"]
    assert report["format"] == "megatron"
    # The args in common.pt come before the base model named: convert writes the config built from them.
    chosen = run / f"iter_{meta['expected_step']:07d}"
    assert (report["assets"]["config"], report["assets"]["from"]["config"]) == (str(chosen / "common.pt"), "built")
    listed = [(c["name"], c["chosen"], c["holds"][0]) for c in report["checkpoints"]]
    want = [f"iter_{c['step']:07d}" for c in meta["checkpoints"]]
    assert listed == [(n, n.endswith(f"{meta['expected_step']:07d}"), "megatron") for n in want]
    code, stdout, stderr = _cli("batch", "--input-dir", run, "--output-dir", tmp_path / "b", "--dry-run",
                                "--all-checkpoints")
    assert code == 0, stderr
    assert all(n in stdout for n in want), stdout


def test_validate_against_the_source(conv):
    code, out, _, stderr = conv.convert("mcore_llama_tp2_fp32")
    assert code == 0, stderr
    case = conv.corpus["mcore_llama_tp2_fp32"]
    code, stdout, stderr = _cli("validate", out, "--against", case / "ckpt", "--base-model-name", case / "hf")
    assert code == 0, stdout + stderr


def test_quantize_tp_weights_as_from_the_truth(conv, tmp_path):
    """``--quantize`` of a TP=2 save reads each block of rows gathered (a row-parallel weight's rows alternate
    the two rank files) and writes what quantizing the truth as an HF folder writes (contiguous reads), byte for
    byte: tensors and quantization_config."""
    name = "mcore_llama_tp2_fp32"
    case = conv.corpus[name]
    ref_in = shutil.copytree(case / "hf", tmp_path / "truth-hf")
    shutil.copyfile(case / conv.meta(name)["checkpoints"][-1]["truth"], ref_in / "model.safetensors")
    # Both unvalidated: the bytes are compared here (tests/test_quantize.py loads quantized folders).
    code, _, stderr = _cli("convert", "--input", ref_in, "--output", tmp_path / "ref", "--quantize", "fp8_dynamic",
                           "--no-validate-vllm")
    assert code == 0, stderr
    code, out, _, stderr = conv.convert(name, "--quantize", "fp8_dynamic", "--no-validate-vllm")
    assert code == 0, stderr
    want, got = load_out(tmp_path / "ref"), load_out(out)
    assert sorted(got) == sorted(want) and any(k.endswith("weight_scale") for k in want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key].view(torch.uint8), tensor.view(torch.uint8)), key
    config = [json.loads((folder / "config.json").read_text()) for folder in (tmp_path / "ref", out)]
    assert config[0]["quantization_config"] == config[1]["quantization_config"]


PROMPTS = [[5, 17, 42, 99, 7], [200, 3, 3, 150], [64, 65, 66, 67, 68, 69]]
MAX_TOKENS = 8


@pytest.mark.vllm
@pytest.mark.parametrize("name", ["mcore_llama_tp2_fp32", "mcore_mixtral_ep2"])
def test_vllm_generates_what_transformers_generates(name, conv):
    """Real vLLM loads a converted dense and MoE folder, and its greedy tokens are transformers' (fp32)."""
    from tests.test_e2e_vllm import vllm_python

    from vllm_consolidate.validate.load import run_vllm_probe, transformers_greedy

    python = vllm_python()
    code, out, _, stderr = conv.convert(name)
    assert code == 0, stderr
    probe = run_vllm_probe(out, PROMPTS, max_tokens=MAX_TOKENS, python=python, dtype="float32")
    expected = transformers_greedy(out, PROMPTS, MAX_TOKENS, dtype="float32")
    assert [len(t) for t in expected] == [MAX_TOKENS] * len(PROMPTS)
    assert probe["output_token_ids"] == expected


def test_validate_against_a_run_reads_its_latest_save(conv):
    """``validate --against RUN`` compares with the iteration the tracker names: the latest save's output passes,
    an older save's output (same names and shapes, other values) fails."""
    meta, run = conv.meta(RUN), conv.corpus[RUN] / "run"
    code, latest, _, stderr = conv.convert(RUN)
    assert code == 0, stderr
    code, stdout, stderr = _cli("validate", latest, "--against", run)
    assert code == 0, stdout + stderr
    older = min(c["step"] for c in meta["checkpoints"])
    code, old, _, stderr = conv.convert(RUN, "--checkpoint-dir", str(run / f"iter_{older:07d}"))
    assert code == 0, stderr
    code, stdout, stderr = _cli("validate", old, "--against", run)
    assert code != 0 and "differ" in (stdout + stderr).lower(), stdout + stderr


def test_batch_over_a_folder_of_runs_writes_every_save(conv, tmp_path):
    """``batch --input-dir`` over a folder holding the Megatron-LM runs (dense TP=2 fp32 by megatron-core 0.16 and
    by 0.19, MoE EP=2 bf16), every iteration: each output is its save's truth, with the config built from that
    run's args."""
    runs = tmp_path / "runs"
    for name in RUNS:
        shutil.copytree(conv.corpus[name] / "run", runs / name)
    out = tmp_path / "out"
    code, stdout, stderr = _cli("batch", "--input-dir", runs, "--output-dir", out, "--all-checkpoints",
                                "--max-workers", "1", "--no-validate-vllm", "--base-model-name", "")
    assert code == 0, stdout + stderr
    written = sorted(p.name for p in out.iterdir() if p.is_dir())
    want = sorted(f"{name}_step_{c['step']}" for name in RUNS for c in conv.meta(name)["checkpoints"])
    assert written == want, (written, stdout)
    for name in RUNS:
        own = json.loads((conv.corpus[name] / "hf" / "config.json").read_text())
        for entry in conv.meta(name)["checkpoints"]:
            folder = out / f"{name}_step_{entry['step']}"
            config = json.loads((folder / "config.json").read_text())
            assert config["model_type"] == own["model_type"] and config["vocab_size"] == own["vocab_size"]
            _assert_fp32_of(_truth(conv, name, entry["step"]), load_out(folder))
