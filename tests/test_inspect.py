"""``vllm-consolidate inspect`` (issue 13) on every corpus kind and on each broken case.

Inputs are the real corpus (``tests/corpus``); broken ones are copies in ``tmp_path`` with one file
removed, added, copied or rewritten. The human report is compared line for line, with the corpus root
written ``<corpus>`` and ``tmp_path`` written ``<tmp>``; the ``--json`` document's key facts are checked
against each case's ``case.json``. That no tensor data is read, and torch is not imported, is checked
in a fresh interpreter (``/proc/self/io`` ``rchar``).
"""

# ruff: noqa: E501 - the expected reports hold lines as long as the tool prints them
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.corpus import build
from tests.corpus.hf_layouts import build_layouts

from vllm_consolidate import cli
from vllm_consolidate.inspection import inspect_path

REPO = Path(__file__).resolve().parents[1]
BENCH_1_5B = REPO / ".cache/bench/qwen2-v151936-h1536-l28-i8960-a12-kv2-z3-w2-bf16-sg100000000-steps0-ds0.19.8/ckpt"
OPTIM = "bf16_zero_pp_rank_{}_mp_rank_00_optim_states.pt"
PRECISION = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def inspect(capsys: pytest.CaptureFixture, tmp: Path, *args: str | Path) -> tuple[int, str]:
    """``cli.main(["inspect", ...])`` in-process: (exit code, stdout with the corpus and tmp roots named)."""
    code = cli.main(["inspect", *map(str, args)])
    out = capsys.readouterr().out
    return code, out.replace(str(tmp), "<tmp>").replace(str(build.corpus_root()), "<corpus>")


def _lines(text: str) -> list[str]:
    return text.strip("\n").splitlines()


# -- every corpus kind: the exact human report ------------------------------------------------------------

# peak RAM: write.estimates (the writer's buffers follow each tensor's chunks and ranges, so equal sizes can differ)
_OUT_2MB = """\
output:        float32   2.0 MB in 1 file, peak RAM ~473.3 MB
               bfloat16  1.0 MB in 1 file, peak RAM ~473.6 MB
               float16   1.0 MB in 1 file, peak RAM ~473.6 MB"""


def _out_1_5mb(fp32_ram: str) -> str:
    return f"""\
output:        float32   1.5 MB in 1 file, peak RAM ~{fp32_ram} MB
               bfloat16  767.0 kB in 1 file, peak RAM ~473.6 MB
               float16   767.0 kB in 1 file, peak RAM ~473.6 MB"""


_OUT_520KB = """\
output:        float32   519.8 kB in 1 file, peak RAM ~472.4 MB
               bfloat16  259.9 kB in 1 file, peak RAM ~472.4 MB
               float16   259.9 kB in 1 file, peak RAM ~472.4 MB"""

#: inspect's --quantize sizes (exact: tests/test_quantize_moe.py)
_Q_LLAMA = "quantized:     fp8_dynamic 198.5 kB, fp8_block 196.7 kB, w8a8 198.5 kB (--quantize, from names and shapes)"
_Q_QWEN2 = "quantized:     fp8_dynamic 516.4 kB, fp8_block 512.8 kB, w8a8 516.4 kB (--quantize, from names and shapes)"
_Q_LLAMA_BIG = "quantized:     fp8_dynamic 771.7 kB, fp8_block 768.0 kB, w8a8 771.7 kB (--quantize, from names and shapes)"


def _assets(folder: str) -> str:
    return (f"config:        {folder}/config.json\n"
            f"generation:    {folder}/generation_config.json\n"
            f"tokenizer:     {folder}: tokenizer.json, tokenizer_config.json, chat_template.jinja")


GOOD = {
    "zero1": (["llama_z1_w1_fp32/ckpt"], f"""\
input:         <corpus>/llama_z1_w1_fp32/ckpt
format:        deepspeed, ZeRO-1, world size 1, tag global_step2, DeepSpeed 0.19.8
precision:     float32 (DeepSpeed config)
rank files:    optimizer: rank 0; model states: rank 0
checkpoints:   1 found (* = the one convert reads)
               * global_step2  ZeRO rank files
chosen:        <corpus>/llama_z1_w1_fp32/ckpt/global_step2 (tag 'global_step2' from <corpus>/llama_z1_w1_fp32/ckpt/latest)
tensors:       21 tensors, 129,954 parameters
largest:       model.embed_tokens.weight [503, 66] float32, 132.8 kB
{_OUT_520KB}
{_Q_LLAMA}
{_assets("<corpus>/llama_z1_w1_fp32/ckpt")}
architectures: config has architectures: yes (LlamaForCausalLM)
problems:      none
"""),
    # No config or tokenizer in this save: they come from --base-model-name (a local folder).
    "zero2_base_model": (["llama_z2_w2_bf16/ckpt", "--base-model-name", "<tmp>/base"], f"""\
input:         <corpus>/llama_z2_w2_bf16/ckpt
format:        deepspeed, ZeRO-2, world size 2, tag global_step2, DeepSpeed 0.19.8
precision:     bfloat16 (DeepSpeed config)
rank files:    optimizer: ranks 0, 1; model states: rank 0
checkpoints:   2 found (* = the one convert reads)
                 global_step1  ZeRO rank files
               * global_step2  ZeRO rank files
chosen:        <corpus>/llama_z2_w2_bf16/ckpt/global_step2 (tag 'global_step2' from <corpus>/llama_z2_w2_bf16/ckpt/latest)
tensors:       21 tensors, 129,954 parameters
largest:       model.embed_tokens.weight [503, 66] float32, 132.8 kB
{_OUT_520KB}
{_Q_LLAMA}
config:        <tmp>/base/config.json (from --base-model-name)
generation:    none
tokenizer:     <tmp>/base (from --base-model-name): tokenizer.json, tokenizer_config.json
base model:    <tmp>/base
architectures: config has architectures: yes (LlamaForCausalLM)
problems:      none
"""),
    "zero3": (["qwen2_z3_w2_bf16_tied/ckpt"], f"""\
input:         <corpus>/qwen2_z3_w2_bf16_tied/ckpt
format:        deepspeed, ZeRO-3, world size 2, tag global_step2, DeepSpeed 0.19.8
precision:     bfloat16 (DeepSpeed config)
rank files:    optimizer: ranks 0, 1; model states: ranks 0, 1
checkpoints:   1 found (* = the one convert reads)
               * global_step2  ZeRO rank files
chosen:        <corpus>/qwen2_z3_w2_bf16_tied/ckpt/global_step2 (tag 'global_step2' from <corpus>/qwen2_z3_w2_bf16_tied/ckpt/latest)
tensors:       26 tensors, 383,488 parameters; dropped tied lm_head.weight
largest:       model.embed_tokens.weight [1001, 128] float32, 512.5 kB
{_out_1_5mb("473.4")}
{_Q_QWEN2}
{_assets("<corpus>/qwen2_z3_w2_bf16_tied/ckpt")}
architectures: config has architectures: yes (Qwen2ForCausalLM)
problems:      none
"""),
    "trainer_run": (["trainer_qwen2_z2_bf16/run"], f"""\
input:         <corpus>/trainer_qwen2_z2_bf16/run
format:        deepspeed, ZeRO-2, world size 2, tag global_step6, DeepSpeed 0.19.8
precision:     bfloat16 (DeepSpeed config)
rank files:    optimizer: ranks 0, 1; model states: rank 0
checkpoints:   6 found (* = the one convert reads)
                 checkpoint-2               HF weights + 'latest' file
                 checkpoint-2/global_step2  ZeRO rank files
                 checkpoint-4               HF weights + 'latest' file
                 checkpoint-4/global_step4  ZeRO rank files
                 checkpoint-6               HF weights + 'latest' file
               * checkpoint-6/global_step6  ZeRO rank files
chosen:        <corpus>/trainer_qwen2_z2_bf16/run/checkpoint-6/global_step6 (latest checkpoint by step: checkpoint-6; tag 'global_step6' from <corpus>/trainer_qwen2_z2_bf16/run/checkpoint-6/latest)
tensors:       26 tensors, 383,488 parameters; dropped tied lm_head.weight
largest:       model.embed_tokens.weight [1001, 128] float32, 512.5 kB
{_out_1_5mb("473.3")}
{_Q_QWEN2}
{_assets("<corpus>/trainer_qwen2_z2_bf16/run/checkpoint-6")}
architectures: config has architectures: yes (Qwen2ForCausalLM)
problems:      none
"""),
    "trainer_checkpoint": (["trainer_llama_z3_bf16/run/checkpoint-4"], f"""\
input:         <corpus>/trainer_llama_z3_bf16/run/checkpoint-4
format:        deepspeed, ZeRO-3, world size 2, tag global_step4, DeepSpeed 0.19.8
precision:     bfloat16 (DeepSpeed config)
rank files:    optimizer: ranks 0, 1; model states: ranks 0, 1
checkpoints:   2 found (* = the one convert reads)
                 .             'latest' file
               * global_step4  ZeRO rank files
chosen:        <corpus>/trainer_llama_z3_bf16/run/checkpoint-4/global_step4 (tag 'global_step4' from <corpus>/trainer_llama_z3_bf16/run/checkpoint-4/latest)
tensors:       21 tensors, 511,104 parameters
largest:       model.embed_tokens.weight [1001, 128] float32, 512.5 kB
{_OUT_2MB}
{_Q_LLAMA_BIG}
{_assets("<corpus>/trainer_llama_z3_bf16/run/checkpoint-4")}
architectures: config has architectures: yes (LlamaForCausalLM)
problems:      none
"""),
    "hf_sharded": (["hf_llama_sharded_bf16/model"], f"""\
input:         <corpus>/hf_llama_sharded_bf16/model
format:        hf_sharded, 5 safetensors files
precision:     bfloat16 (the stored dtype of most weight bytes)
checkpoints:   none (no checkpoint-N or global_stepN folder in or below the input)
chosen:        <corpus>/hf_llama_sharded_bf16/model (HF weights in the folder given)
tensors:       21 tensors, 511,104 parameters
largest:       model.embed_tokens.weight [1001, 128] bfloat16, 256.3 kB
output:        float32   2.0 MB in 1 file, peak RAM ~473.6 MB
               bfloat16  1.0 MB in 1 file, peak RAM ~472.7 MB
               float16   1.0 MB in 1 file, peak RAM ~473.1 MB
{_Q_LLAMA_BIG}
{_assets("<corpus>/hf_llama_sharded_bf16/model")}
architectures: config has architectures: yes (LlamaForCausalLM)
problems:      none
"""),
    "hf_single": (["hf_qwen2_single_fp32_tied/model"], f"""\
input:         <corpus>/hf_qwen2_single_fp32_tied/model
format:        hf_single, 1 safetensors file
precision:     float32 (the stored dtype of most weight bytes)
checkpoints:   none (no checkpoint-N or global_stepN folder in or below the input)
chosen:        <corpus>/hf_qwen2_single_fp32_tied/model (HF weights in the folder given)
tensors:       26 tensors, 383,488 parameters
largest:       model.embed_tokens.weight [1001, 128] float32, 512.5 kB
{_out_1_5mb("473.2")}
{_Q_QWEN2}
{_assets("<corpus>/hf_qwen2_single_fp32_tied/model")}
architectures: config has architectures: yes (Qwen2ForCausalLM)
problems:      none
"""),
    # batch --input-dir finds the two runs below the folder; each is reported as convert --input <run>.
    "folder_of_runs": (["<tmp>/runs"], f"""\
folder:        <tmp>/runs: 2 inputs, as batch --input-dir finds them

input:         <tmp>/runs/a
format:        deepspeed, ZeRO-3, world size 2, tag global_step6, DeepSpeed 0.19.8
precision:     bfloat16 (DeepSpeed config)
rank files:    optimizer: ranks 0, 1; model states: ranks 0, 1
checkpoints:   6 found (* = the one convert reads)
                 checkpoint-2               HF weights + 'latest' file
                 checkpoint-2/global_step2  ZeRO rank files
                 checkpoint-4               HF weights + 'latest' file
                 checkpoint-4/global_step4  ZeRO rank files
                 checkpoint-6               HF weights + 'latest' file
               * checkpoint-6/global_step6  ZeRO rank files
chosen:        <tmp>/runs/a/checkpoint-6/global_step6 (latest checkpoint by step: checkpoint-6; tag 'global_step6' from <tmp>/runs/a/checkpoint-6/latest)
tensors:       21 tensors, 511,104 parameters
largest:       model.embed_tokens.weight [1001, 128] float32, 512.5 kB
{_OUT_2MB}
{_Q_LLAMA_BIG}
{_assets("<corpus>/trainer_llama_z3g16_bf16/run/checkpoint-6")}
architectures: config has architectures: yes (LlamaForCausalLM)
problems:      none

input:         <tmp>/runs/b
format:        deepspeed, ZeRO-2, world size 2, tag global_step2, DeepSpeed 0.19.8
precision:     float16 (DeepSpeed config)
rank files:    optimizer: ranks 0, 1; model states: rank 0
checkpoints:   1 found (* = the one convert reads)
               * global_step2  ZeRO rank files
chosen:        <tmp>/runs/b/global_step2 (tag 'global_step2' from <tmp>/runs/b/latest)
tensors:       21 tensors, 129,954 parameters
largest:       lm_head.weight [503, 66] float32, 132.8 kB
output:        float32   519.8 kB in 1 file, peak RAM ~472.7 MB
               bfloat16  259.9 kB in 1 file, peak RAM ~472.4 MB
               float16   259.9 kB in 1 file, peak RAM ~472.6 MB
{_Q_LLAMA}
{_assets("<corpus>/mistral_z2_w2_fp16_frozen/ckpt")}
architectures: config has architectures: yes (MistralForCausalLM)
problems:      none
"""),
}


def _setup_good(tmp: Path) -> None:
    """The local base model (config + tokenizer of the same llama) and a folder of two runs (symlinks)."""
    root = build.corpus_root()
    base = tmp / "base"
    base.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "llama_z1_w1_fp32/ckpt" / f, base / f)
    runs = tmp / "runs"
    runs.mkdir()
    (runs / "a").symlink_to(root / "trainer_llama_z3g16_bf16/run")
    (runs / "b").symlink_to(root / "mistral_z2_w2_fp16_frozen/ckpt")
    (runs / "notes").mkdir()  # not an input: batch skips it, and so does inspect


@pytest.mark.parametrize("kind", list(GOOD))
def test_every_corpus_kind_exact_report(kind, corpus, tmp_path, capsys):
    _setup_good(tmp_path)
    args, expected = GOOD[kind]
    args = [a.replace("<tmp>", str(tmp_path)) for a in args]
    if not args[0].startswith(str(tmp_path)):
        args[0] = str(build.corpus_root() / args[0])
    code, out = inspect(capsys, tmp_path, *args)
    assert _lines(out) == _lines(expected)
    assert code == 0
    doc = json.loads(inspect(capsys, tmp_path, *args, "--json")[1])
    assert (doc["ok"], doc["exit_code"], doc["kind"]) == (True, 0, "folder" if kind == "folder_of_runs" else "input")
    assert [i["path"].replace(str(tmp_path), "<tmp>").replace(str(build.corpus_root()), "<corpus>")
            for i in doc["inputs"]] == [line.split()[1] for line in _lines(expected) if line.startswith("input:")]


# -- every corpus case: the JSON document's key facts against case.json ----------------------------------


@pytest.mark.parametrize("name", list(build.CASES))
def test_json_key_facts_every_case(name, corpus):
    meta = build.load_case(name)
    doc = inspect_path(corpus[name] / meta["input"]).to_dict()
    assert doc["kind"] == "input" and len(doc["inputs"]) == 1
    inp = doc["inputs"][0]
    assert inp["parameters"] == meta["num_params"]
    assert inp["training_precision"] == PRECISION[meta["precision"]]
    # save_pretrained already left a tied lm_head out of an HF folder; a ZeRO save holds it, and it is dropped.
    assert inp["dropped"] == (["lm_head.weight"] if meta["tied"] and meta["kind"] != "hf" else [])
    fp32 = inp["output"]["float32"]
    assert fp32["bytes"] == 4 * meta["num_params"] and fp32["files"] == 1 and fp32["peak_ram_bytes"] > 400 * 2**20
    assert inp["output"]["bfloat16"]["bytes"] == inp["output"]["float16"]["bytes"] == 2 * meta["num_params"]
    if meta["kind"] == "hf":
        assert inp["format"] in ("hf_single", "hf_sharded") and inp["rank_files"] is None
        assert inp["chosen"] == str(corpus[name] / "model")
    else:
        last = meta["checkpoints"][-1]  # a trainer case's is checkpoint-N, with global_stepN inside
        assert (inp["format"], inp["zero_stage"], inp["world_size"]) == ("deepspeed", meta["stage"], meta["world_size"])
        step = f"global_step{last['step']}"
        chosen = corpus[name] / last["path"] / (step if meta["kind"] == "trainer" else "")
        assert inp["tag"] == step and inp["chosen"] == str(chosen).rstrip("/")
        assert inp["rank_files"]["optimizer"] == list(range(meta["world_size"]))
        assert [c["path"] for c in inp["checkpoints"] if c["chosen"]] == [inp["chosen"]]
    # A save without config.json (and no base model offline) is a problem, but everything else is still reported.
    types = [p["type"] for p in inp["problems"]]
    assert types == ([] if meta["has_config"] else ["ConfigNotFoundError"])
    assert doc["ok"] is meta["has_config"]


# -- each broken case: the exact human report, the exit code, the JSON problem ----------------------------


def _broken(kind: str, tmp: Path) -> tuple[Path, list[str]]:
    """A copy of a good case with one thing broken, and extra CLI arguments."""
    root = build.corpus_root()
    src = tmp / kind
    if kind == "z3_placeholder":  # HF save_pretrained under ZeRO-3 without gathering: empty tensors
        shutil.copytree(build_layouts() / "z3_placeholder", src)
        return src, []
    if kind == "no_config":
        shutil.copytree(root / "llama_z2_w2_bf16/ckpt", src)
        return src, ["--base-model-name", str(tmp / "no-base")]
    shutil.copytree(root / "qwen2_z3_w2_bf16_tied/ckpt", src)
    gs = src / "global_step2"
    if kind == "missing_rank":
        (gs / OPTIM.format(1)).unlink()
    elif kind == "extra_rank":
        shutil.copy(gs / OPTIM.format(1), gs / OPTIM.format(2))
    elif kind == "latest_missing_tag":
        (src / "latest").write_text("global_step999")
    elif kind == "world_size":  # rank 1 of the same model saved by 3 ranks
        shutil.copy(root / "qwen2_z3_w3_bf16/ckpt/global_step2" / OPTIM.format(1), gs / OPTIM.format(1))
    elif kind == "rank_copied":
        shutil.copy(gs / OPTIM.format(0), gs / OPTIM.format(1))
    return src, []


def _z3_head(kind: str, optim: str) -> str:
    return f"""\
input:         <tmp>/{kind}
format:        deepspeed
rank files:    optimizer: {optim}; model states: ranks 0, 1
checkpoints:   1 found (* = the one convert reads)
               * global_step2  ZeRO rank files
chosen:        <tmp>/{kind}/global_step2 (tag 'global_step2' from <tmp>/{kind}/latest)
{_assets(f"<tmp>/{kind}")}
architectures: config has architectures: yes (Qwen2ForCausalLM)
problems:      1 (convert would stop at the first: exit 4)
"""


_RS = "<tmp>/{}/global_step2/bf16_zero_pp_rank_{}_mp_rank_00_optim_states.pt"
_MIXED = "  hint: The folder mixes files from different runs; re-save the checkpoint."
BROKEN = {
    "missing_rank": (4, "CorruptCheckpointError", _z3_head("missing_rank", "rank 0") + f"""\
  error: the checkpoint was saved by 2 ranks but the optimizer file of rank 1 is missing [{_RS.format("missing_rank", 1)}]
  hint: Copy every rank's *_optim_states.pt file into this folder, or pick another checkpoint.
"""),
    "extra_rank": (4, "CorruptCheckpointError", _z3_head("extra_rank", "ranks 0, 1, 2") + f"""\
  error: world size mismatch: the checkpoint records 2 ranks but 3 optimizer files are present (rank 2 is extra) [{_RS.format("extra_rank", 2)}]
  hint: Remove stray rank files left from another run, or re-save the checkpoint.
"""),
    "latest_missing_tag": (4, "CorruptCheckpointError", """\
input:         <tmp>/latest_missing_tag
checkpoints:   1 found
                 global_step2  ZeRO rank files
problems:      1 (convert would stop at the first: exit 4)
  error: 'latest' names the tag 'global_step999', but <tmp>/latest_missing_tag/global_step999 holds no ZeRO checkpoint [<tmp>/latest_missing_tag/latest]
  hint: Pass the global_stepN folder you want with --checkpoint-dir, or fix the 'latest' file.
"""),
    "world_size": (4, "CorruptCheckpointError", _z3_head("world_size", "ranks 0, 1") + f"""\
  error: world size mismatch: this rank file records 3 ranks, rank 0 records 2 [{_RS.format("world_size", 1)}]
{_MIXED}
"""),
    "rank_copied": (4, "CorruptCheckpointError", _z3_head("rank_copied", "ranks 0, 1") + f"""\
  error: {OPTIM.format(1)} is a copy of {OPTIM.format(0)}: same size, same metadata and the same weights at both ends of every partition, which two ranks never hold [{_RS.format("rank_copied", 1)}]
  hint: The folder mixes or duplicates rank files; copy every rank's own file from where training saved it.
"""),
    "z3_placeholder": (4, "UnsupportedCheckpointError", f"""\
input:         <tmp>/z3_placeholder
format:        hf
checkpoints:   none (no checkpoint-N or global_stepN folder in or below the input)
chosen:        <tmp>/z3_placeholder (HF weights in the folder given)
{_assets("<tmp>/z3_placeholder")}
architectures: config has architectures: yes (Qwen2ForCausalLM)
problems:      1 (convert would stop at the first: exit 4)
  error: 27 of 27 tensors are empty (e.g. lm_head.weight): these are ZeRO-3 placeholders saved without gathering the weights, not a model [<tmp>/z3_placeholder/model.safetensors]
  hint: Convert the DeepSpeed checkpoint instead: pass the checkpoint-N (or its global_stepN) folder with --type deepspeed. To get real HF weights from training, set stage3_gather_16bit_weights_on_model_save: true.
"""),
    "no_config": (8, "ConfigNotFoundError", f"""\
input:         <tmp>/no_config
format:        deepspeed, ZeRO-2, world size 2, tag global_step2, DeepSpeed 0.19.8
precision:     bfloat16 (DeepSpeed config)
rank files:    optimizer: ranks 0, 1; model states: rank 0
checkpoints:   2 found (* = the one convert reads)
                 global_step1  ZeRO rank files
               * global_step2  ZeRO rank files
chosen:        <tmp>/no_config/global_step2 (tag 'global_step2' from <tmp>/no_config/latest)
tensors:       21 tensors, 129,954 parameters
largest:       model.embed_tokens.weight [503, 66] float32, 132.8 kB
{_OUT_520KB}
{_Q_LLAMA}
config:        none
generation:    none
tokenizer:     none
base model:    not found: '<tmp>/no-base' is not in the local HF cache and HF_HUB_OFFLINE is set (HFValidationError)
warning: no tokenizer found in the checkpoint or the base model; the output has none. Pass --base-model-name with the model you fine-tuned to copy its tokenizer.
problems:      1 (convert would stop at the first: exit 8)
  error: no config.json in the checkpoint, its parent folders, or the base model ('<tmp>/no-base' is not in the local HF cache and HF_HUB_OFFLINE is set (HFValidationError)) [<tmp>/no_config/global_step2]
  hint: Pass --base-model-name with the local folder or Hub id of the model you fine-tuned.
"""),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_each_broken_case_exact_report_and_exit_code(kind, corpus, tmp_path, capsys):
    code_expected, error_type, expected = BROKEN[kind]
    src, extra = _broken(kind, tmp_path)
    code, out = inspect(capsys, tmp_path, src, *extra)
    assert _lines(out) == _lines(expected)
    assert code == code_expected
    code, out = inspect(capsys, tmp_path, src, *extra, "--json")
    doc = json.loads(out)
    assert code == doc["exit_code"] == code_expected and doc["ok"] is False
    (problem,) = doc["inputs"][0]["problems"]
    assert (problem["type"], problem["exit_code"]) == (error_type, code_expected)
    assert problem["message"] in expected and problem["hint"] in expected


def test_nothing_to_inspect_exit_3(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for target, message in ((tmp_path / "empty", "no checkpoint found"), (tmp_path / "gone", "input does not exist")):
        code, out = inspect(capsys, tmp_path, target)
        assert code == 3 and f"  error: {message}" in out
        assert _lines(out)[0] == f"input:         <tmp>/{target.name}"


# -- the options convert shares ---------------------------------------------------------------------------


def test_checkpoint_dir_and_type_pick_what_convert_would(corpus):
    run = corpus["trainer_qwen2_z2_bf16"] / "run"
    inp = inspect_path(run, checkpoint_dir=run / "checkpoint-2").to_dict()["inputs"][0]
    assert inp["chosen"] == str(run / "checkpoint-2/global_step2") and inp["tag"] == "global_step2"
    assert inp["how"].startswith("--checkpoint-dir; tag 'global_step2'")
    assert [c["name"] for c in inp["checkpoints"] if c["chosen"]] == ["checkpoint-2/global_step2"]
    # --type hf_sharded reads the 16-bit weights HF Trainer saved next to the ZeRO files instead.
    inp = inspect_path(run / "checkpoint-6", input_type="hf_sharded").to_dict()["inputs"][0]
    assert (inp["format"], inp["training_precision"], inp["precision_from"]) == ("hf_single", "bfloat16", "stored_dtype")
    assert inp["largest_tensor"] == {"name": "model.embed_tokens.weight", "shape": [1001, 128], "dtype": "bfloat16",
                                     "bytes": 256256}


def test_architecture_option_and_inference(corpus, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(corpus["qwen2_z3_w2_bf16_tied"] / "ckpt", src)
    config = json.loads((src / "config.json").read_text())
    del config["architectures"]  # as config.save_pretrained of AutoConfig.for_model writes it
    (src / "config.json").write_text(json.dumps(config))
    arch = inspect_path(src).to_dict()["inputs"][0]["architectures"]
    assert arch == {"present": False, "in_config": None, "model_type": "qwen2", "output": ["Qwen2ForCausalLM"],
                    "source": "inferred"}
    arch = inspect_path(src, architecture="MyForCausalLM").to_dict()["inputs"][0]["architectures"]
    assert (arch["output"], arch["source"]) == (["MyForCausalLM"], "option")


# -- metadata only: no tensor data, no torch, and fast ----------------------------------------------------

_PROBE = """
import contextlib, io, json, sys
from vllm_consolidate import cli
def rchar():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])
def run():
    with contextlib.redirect_stdout(io.StringIO()):
        return cli.main(["inspect", sys.argv[1]])
run()  # the first call imports what it needs; reading modules is not reading the checkpoint
before = rchar()
code = run()
print(json.dumps({"code": code, "rchar": rchar() - before, "torch": "torch" in sys.modules}))
"""


def _probe(path: Path) -> dict:
    """Inspect ``path`` twice in a fresh interpreter: the exit code, the second call's bytes read, torch imported."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_reads_metadata_only_and_never_imports_torch(corpus):
    ckpt = corpus["llama_big_z2_w2_bf16"] / "ckpt"  # 74M parameters, 1 GB of rank files
    found = _probe(ckpt)
    assert found["code"] == 0 and found["torch"] is False
    assert found["rchar"] < 512 * 1024 and found["rchar"] < _size(ckpt) / 1000, found


@pytest.mark.skipif(not BENCH_1_5B.is_dir(), reason="the benchmark's 1.5B ZeRO-3 checkpoint is not cached (bench/run.py)")
def test_7b_sized_metadata_under_two_seconds():
    """28 layers, 338 tensors as in Qwen2.5-7B: the installed command, start to end, in CPU time (robust to a
    busy machine; the README reports the wall time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([str(Path(sys.executable).with_name("vllm-consolidate")), "inspect", str(BENCH_1_5B), "--json"],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["inputs"][0]["tensors"] == 338
    assert cpu < 2.0, f"inspect took {cpu:.2f} s of CPU"
    found = _probe(BENCH_1_5B)
    assert found["torch"] is False and found["rchar"] < _size(BENCH_1_5B) / 10_000, found
