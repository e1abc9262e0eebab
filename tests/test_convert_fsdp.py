"""FSDP-family consolidation on the real corpus: torch DCP folders, HF Trainer FSDP, verl.

Truth is the full state dict gathered from the live model at save time (tests/corpus/fsdp_build.py),
never our own reader. Each case is converted once per option set (module-scoped cache) through the
CLI's own ``main``, as ``vllm-consolidate convert --input X --output Y`` with its validation on; the
exit code of a refusal is also checked through the installed console script.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tests.corpus import build, common, fsdp_build
from tests.test_convert_deepspeed import assert_equal, load_out
from tests.test_e2e_vllm import vllm_python

from vllm_consolidate import cli

BIN = Path(sys.executable).parent
AMBIGUOUS = "dcp_qwen2_w2_ambiguous"
LORA = "verl_qwen2_w2_lora"
#: MoE cases hold fused experts that convert writes per expert by default: tests/test_moe.py covers them
#: (truth through save_pretrained, and torch's own converter against --moe-layout fused).
#: Vision-language cases likewise (save_pretrained's prefixes, not the training names): tests/test_vlm.py.
MOE = [n for n, s in fsdp_build.CASES.items() if s.model["arch"] in (*build.MOE_ARCHS, *build.VLM_ARCHS)]
#: Every case a default ``convert`` must turn into its latest truth.
CONVERTIBLE = [n for n in fsdp_build.CASES if n not in (AMBIGUOUS, LORA, *MOE)]
#: Cases stored as torch.distributed.checkpoint folders (torch's own converter reads them).
DCP_CASES = [n for n, s in fsdp_build.CASES.items() if s.kind in ("dcp", "trainer_fsdp") and n not in MOE]
#: Top-level containers of a DCP save that are not the model.
NOT_MODEL = ("optim", "optimizer", "train_state")

# Nothing in these tests may reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"


# -- helpers ----------------------------------------------------------------------------------------

@dataclass
class Run:
    code: int
    out: Path
    stdout: str
    stderr: str

    def line(self, label: str) -> str:
        """The text after ``label`` (e.g. ``"chosen:"``) on the one summary line that starts with it."""
        (found,) = [ln for ln in self.stdout.splitlines() if ln.startswith(label)]
        return found[len(label):].strip()


def _cli(*argv: str | Path) -> tuple[int, str, str]:
    """``vllm-consolidate ARGV`` in-process (the console script minus interpreter start-up)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _meta(name: str) -> dict[str, Any]:
    return fsdp_build.load_case(name)


def _latest(meta: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint a default conversion must pick: the highest step (verl: its actor)."""
    return [c for c in meta["checkpoints"] if c.get("role") in (None, "actor")][-1]


def _entry(meta: dict[str, Any], tag: str, role: str | None = None) -> dict[str, Any]:
    (entry,) = [c for c in meta["checkpoints"] if c["tag"] == tag and c.get("role") == role]
    return entry


def _base_model(root: Path, name: str) -> Path:
    """A local 'base model' (the case's tiny config + the corpus tokenizer) for cases saved without one."""
    folder = root / f"base-{name}"
    if not folder.exists():
        common.model_config(fsdp_build.CASES[name].model).save_pretrained(folder)
        common.build_tokenizer().save_pretrained(folder)
    return folder


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys, the way DCP names its entries."""
    if not isinstance(obj, dict):
        return {prefix[:-1]: obj}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


class Conversions:
    """Each (case, options) converted once per module, in a folder of its own."""

    def __init__(self, corpus: dict[str, Path], root: Path):
        self.corpus = corpus
        self.root = root
        self.runs: dict[tuple[str, tuple[str, ...]], Run] = {}

    def input(self, name: str) -> Path:
        return self.corpus[name] / _meta(name)["input"]

    def convert(self, name: str, *extra: str) -> Run:
        key = (name, extra)
        if key not in self.runs:
            out = self.root / f"{name}-{len(self.runs)}" / "out"
            out.parent.mkdir(parents=True)
            args = ["convert", "--input", str(self.input(name)), "--output", str(out), *extra]
            if not _meta(name)["has_config"]:
                args += ["--base-model-name", str(_base_model(self.root, name))]
            code, stdout, stderr = _cli(*args)
            self.runs[key] = Run(code, out, stdout, stderr)
        return self.runs[key]


@pytest.fixture(scope="module")
def conv(fsdp_corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Conversions:
    return Conversions(fsdp_corpus, tmp_path_factory.mktemp("fsdp-convert"))


# -- 1. default conversion: the latest checkpoint, bit for bit -------------------------------------

@pytest.mark.parametrize("name", CONVERTIBLE)
def test_default_convert_is_latest_truth_fp32(name, conv):
    case = conv.corpus[name]
    meta = _meta(name)
    latest = _latest(meta)
    run = conv.convert(name)
    assert run.code == 0, run.stderr
    truth = load_file(case / latest["truth"])
    assert_equal(truth, load_out(run.out), torch.float32)
    # The tool chose the latest checkpoint; an older one would have been caught above (they differ).
    for older in meta["checkpoints"]:
        if older["step"] < latest["step"] and older.get("role") == latest.get("role"):
            old = load_file(case / older["truth"])
            assert any(not torch.equal(old[k], truth[k]) for k in truth), "checkpoints do not differ"
    assert run.line("chosen:").startswith(f"{case / latest['path']} ("), run.stdout
    assert run.line("detected:").split(",")[0] == ("verl" if meta["kind"] == "verl" else "dcp")
    assert run.line("validation:").startswith("passed")
    config = json.loads((run.out / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
    assert (run.out / "tokenizer.json").is_file()
    assert not list(run.out.parent.glob(".out.*")), "temporary folders left behind"


@pytest.mark.parametrize("name", [n for n in CONVERTIBLE if fsdp_build.CASES[n].model["tied"]])
def test_tied_alias_written_once(name, conv):
    meta = _meta(name)
    run = conv.convert(name)
    assert run.code == 0, run.stderr
    assert meta["tied_keys"] == {"lm_head.weight": "model.embed_tokens.weight"}
    out = load_out(run.out)
    assert "lm_head.weight" not in out and "model.embed_tokens.weight" in out
    assert json.loads((run.out / "config.json").read_text())["tie_word_embeddings"] is True
    assert run.line("tensors:").endswith("; dropped tied lm_head.weight")


@pytest.mark.parametrize("name", [n for n in CONVERTIBLE if not fsdp_build.CASES[n].model["tied"]])
def test_untied_head_is_kept(name, conv):
    out = load_out(conv.convert(name).out)
    assert not torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    assert "dropped tied" not in conv.convert(name).line("tensors:")


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_bfloat16_is_truth_rounded(name, conv):
    run = conv.convert(name, "--dtype", "bfloat16")
    assert run.code == 0, run.stderr
    truth = load_file(conv.corpus[name] / _latest(_meta(name))["truth"])
    assert_equal(truth, load_out(run.out), torch.bfloat16)
    assert json.loads((run.out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_keep_original_precision_is_stored_dtype(conv):
    """A model cast to bf16 before fully_shard stores bf16; fp32 masters under bf16 MP store fp32."""
    bf16 = load_out(conv.convert("dcp_llama_w2_flat_bf16", "--keep-original-precision").out)
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16}
    assert_equal(load_file(conv.corpus["dcp_llama_w2_flat_bf16"] / "truth/step-3.safetensors"), bf16, torch.bfloat16)
    mp = load_out(conv.convert("trainer_fsdp_llama_bf16mp", "--keep-original-precision").out)
    assert {t.dtype for t in mp.values()} == {torch.float32}


# -- 2. torch's own converter agrees -----------------------------------------------------------------

@pytest.mark.parametrize("name", DCP_CASES)
def test_equals_torch_dcp_to_torch_save(name, conv, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    meta = _meta(name)
    latest = _latest(meta)
    extra = ("--model-key", "model") if name == AMBIGUOUS else ()
    run = conv.convert(name, *extra)
    assert run.code == 0, run.stderr
    ours = load_out(run.out)
    saved = tmp_path / "torch.pt"
    dcp_to_torch_save(conv.corpus[name] / latest["path"], saved)
    flat = _flatten(torch.load(saved, weights_only=False))  # torch's own output of a corpus we wrote
    prefix = meta["key_prefix"]
    theirs = {k[len(prefix):]: v for k, v in flat.items()
              if k.startswith(prefix) and k.split(".")[0] not in NOT_MODEL and isinstance(v, torch.Tensor)}
    # torch keeps the tied alias as its own entry; we write it once.
    assert set(theirs) == set(ours) | set(meta.get("dcp_aliases", [])), sorted(set(theirs) ^ set(ours))
    for alias in meta.get("dcp_aliases", []):
        assert torch.equal(theirs[alias], ours[meta["tied_keys"][alias]])
    for key, got in ours.items():
        want = theirs[key]
        assert want.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[meta["precision"]], key
        assert got.dtype == torch.float32 and torch.equal(got, want.float()), key


# -- 3. --checkpoint-dir picks an older checkpoint ---------------------------------------------------

@pytest.mark.parametrize(("name", "folder", "tag"), [
    ("dcp_qwen2_w2_nested_tied", "ckpt/step-2", "step-2"),
    ("trainer_fsdp_qwen2_tied", "run/checkpoint-2", "checkpoint-2"),
    ("trainer_fsdp_llama_bf16mp", "run/checkpoint-2", "checkpoint-2"),
    ("verl_qwen2_w2_tied", "ckpt/global_step_1", "global_step_1"),
])
def test_checkpoint_dir_picks_older(name, folder, tag, conv):
    case = conv.corpus[name]
    entry = _entry(_meta(name), tag, "actor" if name.startswith("verl") else None)
    run = conv.convert(name, "--checkpoint-dir", str(case / folder))
    assert run.code == 0, run.stderr
    assert_equal(load_file(case / entry["truth"]), load_out(run.out), torch.float32)
    chosen = run.line("chosen:")
    assert chosen.startswith(f"{case / entry['path']} (") and "--checkpoint-dir" in chosen
    assert (run.out / "config.json").is_file() and (run.out / "tokenizer.json").is_file()


# -- 4. two models in one DCP save -------------------------------------------------------------------

def test_ambiguous_is_refused_naming_both(fsdp_corpus, tmp_path):
    ckpt = fsdp_corpus[AMBIGUOUS] / "ckpt"
    parent = tmp_path / "parent"
    parent.mkdir()
    proc = subprocess.run([str(BIN / "vllm-consolidate"), "convert", "--input", str(ckpt),
                           "--output", str(parent / "out")], capture_output=True, text=True, timeout=300)
    from vllm_consolidate.errors import UnsupportedCheckpointError

    assert proc.returncode == cli.exit_code(UnsupportedCheckpointError("x")) == 4, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: this checkpoint holds more than one model: 'ema', 'model' "
                      f"[{ckpt / 'step-2' / '.metadata'}]"], proc.stderr
    hints = [ln for ln in proc.stderr.splitlines() if ln.startswith("hint:")]
    assert len(hints) == 1 and "--model-key NAME" in hints[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(parent.iterdir()) == [], "a refused conversion left something behind"


def test_model_key_picks_the_model(conv):
    case = conv.corpus[AMBIGUOUS]
    truth = load_file(case / _latest(_meta(AMBIGUOUS))["truth"])
    run = conv.convert(AMBIGUOUS, "--model-key", "model")
    assert run.code == 0, run.stderr
    assert_equal(truth, load_out(run.out), torch.float32)
    # The other container is a different model (an EMA copy): --model-key really selects.
    ema = conv.convert(AMBIGUOUS, "--model-key", "ema")
    assert ema.code == 0, ema.stderr
    ema_out = load_out(ema.out)
    assert sorted(ema_out) == sorted(truth)
    assert all(not torch.equal(ema_out[k], truth[k]) for k in truth if k.endswith("proj.weight"))


def test_model_key_naming_nothing_is_usage_error(conv):
    run = conv.convert(AMBIGUOUS, "--model-key", "nope")
    assert run.code == 2, run.stderr
    assert [ln for ln in run.stderr.splitlines() if ln.startswith("error:")] == [
        f"error: --model-key 'nope' names no tensors in this checkpoint "
        f"[{conv.corpus[AMBIGUOUS] / 'ckpt' / 'step-2' / '.metadata'}]"]
    assert not run.out.exists() and list(run.out.parent.iterdir()) == []


# -- 5. verl -----------------------------------------------------------------------------------------

def test_verl_actor_assets_from_huggingface_folder(conv):
    name = "verl_llama_w2_critic"
    case = conv.corpus[name]
    actor = case / "ckpt/global_step_1/actor"
    run = conv.convert(name)
    assert run.code == 0, run.stderr
    assert run.line("chosen:").startswith(f"{actor} (") and "critic also saved" in run.line("chosen:")
    assert run.line("config:") == str(actor / "huggingface" / "config.json")
    assert run.line("tokenizer:") == str(actor / "huggingface")
    config = json.loads((run.out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (run.out / "tokenizer.json").read_bytes() == (actor / "huggingface" / "tokenizer.json").read_bytes()


def test_verl_critic_via_checkpoint_dir(conv):
    """The critic (AutoModelForTokenClassification, num_labels=1) converts to its own truth.

    verl writes the critic's huggingface/config.json from the base model's config, so it names
    LlamaForCausalLM; validation then refuses the folder (no lm_head, a score head): exit 9, nothing
    published. --no-validate-vllm keeps it, and the weights are the critic's, bit for bit.
    """
    name = "verl_llama_w2_critic"
    case = conv.corpus[name]
    critic = case / "ckpt/global_step_1/critic"
    entry = _entry(_meta(name), "global_step_1", "critic")
    refused = conv.convert(name, "--checkpoint-dir", str(critic))
    assert refused.code == 9, refused.stderr
    assert not refused.out.exists() and list(refused.out.parent.iterdir()) == []
    run = conv.convert(name, "--checkpoint-dir", str(critic), "--no-validate-vllm")
    assert run.code == 0, run.stderr
    assert run.line("chosen:").startswith(f"{critic} (")
    out = load_out(run.out)
    assert_equal(load_file(case / entry["truth"]), out, torch.float32)
    assert "score.weight" in out and "lm_head.weight" not in out and out["score.weight"].shape[0] == 1
    assert run.line("config:") == str(critic / "huggingface" / "config.json")


def test_verl_lora_is_merged(conv):
    """The values are checked against peft's own merge in tests/test_verl_lora.py; here, the summary."""
    run = conv.convert(LORA)
    assert run.code == 0, run.stderr
    assert run.line("detected:") == "lora_merge"
    assert run.line("lora:").startswith("merged 14 LoRA modules from the rank files of global_step_1/actor into ")


# -- 6. validate --against, inspect ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dcp_qwen2_w2_nested_tied", "verl_qwen2_w2_tied"])
def test_validate_against_source(name, conv):
    run = conv.convert(name)
    assert run.code == 0, run.stderr
    code, stdout, stderr = _cli("validate", run.out, "--against", conv.input(name))
    assert code == 0, stdout + stderr
    lines = [ln.split(None, 2) for ln in stdout.splitlines() if ln.startswith("  ")]
    checks = {parts[1]: (parts[0], parts[2]) for parts in lines if len(parts) == 3}
    n = len(load_out(run.out))
    assert checks["source_values"][0] == "PASS"
    assert checks["source_values"][1].startswith(f"{n} tensors equal the source (every element")
    assert checks["source_tensors"][1].endswith(str(conv.corpus[name] / _latest(_meta(name))["path"]))
    assert stdout.splitlines()[-1].startswith("result: passed (0 failed")


@pytest.mark.parametrize(("name", "older"), [("dcp_qwen2_w2_nested_tied", "ckpt/step-2"),
                                             ("verl_qwen2_w2_tied", "ckpt/global_step_1")])
def test_validate_against_older_checkpoint_fails(name, older, conv):
    """The comparison can fail: the latest output is not the older checkpoint."""
    code, stdout, _ = _cli("validate", conv.convert(name).out, "--against", conv.corpus[name] / older)
    assert code == 9
    assert any(ln.split()[:2] == ["FAIL", "source_values"] for ln in stdout.splitlines()), stdout


@pytest.mark.parametrize(("name", "fmt"), [("dcp_qwen2_w2_nested_tied", "dcp"), ("trainer_fsdp_qwen2_tied", "dcp"),
                                           ("verl_qwen2_w2_tied", "verl")])
def test_inspect_names_format(name, fmt, conv):
    case = conv.corpus[name]
    code, stdout, stderr = _cli("inspect", conv.input(name))
    assert code == 0, stdout + stderr
    lines = stdout.splitlines()
    assert f"format:        {fmt}" in lines
    (chosen,) = [ln for ln in lines if ln.startswith("chosen:")]
    assert chosen.startswith(f"chosen:        {case / _latest(_meta(name))['path']} (")
    assert "tensors:       26 tensors, 383,488 parameters; dropped tied lm_head.weight" in lines
    assert "problems:      none" in lines


def test_inspect_ambiguous_reports_exit_4(conv):
    code, stdout, _ = _cli("inspect", conv.input(AMBIGUOUS))
    assert code == 4
    assert "problems:      1 (convert would stop at the first: exit 4)" in stdout.splitlines()
    assert "  error: this checkpoint holds more than one model: 'ema', 'model'" in stdout


def test_inspect_verl_lora(conv):
    code, stdout, _ = _cli("inspect", conv.input(LORA))
    assert code == 0, stdout
    lines = stdout.splitlines()
    hf = conv.corpus[LORA] / "ckpt/global_step_1/actor/huggingface"
    assert "format:        lora_merge" in lines
    assert f"config:        {hf / 'config.json'}" in lines
    assert "problems:      none" in lines


@pytest.mark.parametrize("name", ["dcp_qwen2_w2_nested_tied", "verl_qwen2_w2_tied"])
def test_inspect_lists_numbered_saves(name, conv):
    code, stdout, _ = _cli("inspect", conv.input(name))
    assert code == 0
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("checkpoints:")]
    assert line.startswith("checkpoints:   2 found"), line


# -- 7. real vLLM ------------------------------------------------------------------------------------

PROMPTS = [[5, 17, 42, 99, 7], [200, 3, 3, 150], [64, 65, 66, 67, 68, 69]]
MAX_TOKENS = 8


@pytest.mark.vllm
@pytest.mark.parametrize("name", ["trainer_fsdp_qwen2_tied", "verl_qwen2_w2_tied"])
def test_vllm_generates_what_transformers_generates(name, conv):
    from vllm_consolidate.validate.load import run_vllm_probe, transformers_greedy

    python = vllm_python()
    run = conv.convert(name)
    assert run.code == 0, run.stderr
    probe = run_vllm_probe(run.out, PROMPTS, max_tokens=MAX_TOKENS, python=python, dtype="float32")
    expected = transformers_greedy(run.out, PROMPTS, MAX_TOKENS, dtype="float32")
    assert [len(t) for t in expected] == [MAX_TOKENS] * len(PROMPTS)
    assert probe["output_token_ids"] == expected
