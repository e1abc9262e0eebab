"""HF model folders as input (issue 4): sharded / single safetensors and .bin, nested pytorch_model.bin/.

Every input is a real layout written by transformers 5, transformers 4 (``.venv-tf4``) or DeepSpeed
(see ``tests/corpus/hf_layouts.py``); broken folders are copies of good ones with one file edited.
End-to-end cases run the installed ``vllm-consolidate`` in a subprocess; error cases call
``cli.main`` in-process (same parser, same exit codes) to keep the suite fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.corpus.hf_layouts import build_layouts

from vllm_consolidate import cli
from vllm_consolidate.errors import CorruptCheckpointError
from vllm_consolidate.read import hf

CLI = Path(sys.executable).with_name("vllm-consolidate")
IDS = torch.tensor([[1, 17, 42, 99, 250, 7, 3, 480]])


@pytest.fixture(scope="session")
def layouts() -> Path:
    """Root of the cached real layouts (built once, reused afterwards)."""
    return build_layouts()


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([str(CLI), "convert", *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def run_inproc(capsys: pytest.CaptureFixture, *args: str | Path) -> tuple[int, str, str]:
    """``cli.main`` in this process: returns (exit code, stdout, stderr)."""
    code = cli.main(["convert", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors or .bin files (or of its nested pytorch_model.bin/)."""
    if (folder / "pytorch_model.bin").is_dir():
        folder = folder / "pytorch_model.bin"
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    for f in sorted(folder.glob("*.bin")):
        out.update(torch.load(f, weights_only=True, map_location="cpu"))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bytes, for bit-exact comparison (NaN-safe, -0.0-safe)."""
    return t.contiguous().view(torch.uint8)


def assert_no_output(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    assert not list(out.parent.glob(f".{out.name}.*")), "a temporary output folder was left behind"


def logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


# -- conversions end to end (installed CLI) -------------------------------------------------------------


def test_sharded_safetensors_bit_exact_and_same_logits(layouts: Path, tmp_path: Path) -> None:
    src, out = layouts / "st_sharded_bf16", tmp_path / "out"
    proc = run_cli("--input", src, "--output", out, "--keep-original-precision", "--no-validate-vllm")
    assert proc.returncode == 0, proc.stderr
    assert "detected:   hf_sharded" in proc.stdout
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    before, after = weights(src), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    for name, t in before.items():
        assert after[name].dtype == torch.bfloat16 and torch.equal(bits(after[name]), bits(t)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file()
    assert torch.equal(logits(src), logits(out))


def test_sharded_bin_to_safetensors_same_logits(layouts: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out = layouts / "bin_sharded_fp32", tmp_path / "out"
    code, stdout, err = run_inproc(capsys, "--input", src, "--output", out, "--type", "hf_sharded",
                                   "--no-validate-vllm", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["detected"]["format"] == "bin" and result["detected"]["files"] == 3
    before, after = weights(src), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(bits(after[n]), bits(t)) for n, t in before.items())
    assert torch.equal(logits(src), logits(out))


def test_cast_is_exactly_tensor_to(layouts: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out = layouts / "st_sharded_fp32", tmp_path / "out"
    code, _, err = run_inproc(capsys, "--input", src, "--output", out, "--dtype", "bfloat16", "--no-validate-vllm")
    assert code == 0, err
    before, after = weights(src), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    for name, t in before.items():
        assert torch.equal(bits(after[name]), bits(t.to(torch.bfloat16))), name


def test_wrapper_prefixes_stripped_and_reported(layouts: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = layouts / "bin_ddp_compiled"
    proc = run_cli("--input", src, "--output", tmp_path / "a", "--no-validate-vllm")
    assert proc.returncode == 0, proc.stderr
    assert "renamed:    21 names lost a wrapper prefix" in proc.stdout
    code, stdout, err = run_inproc(capsys, "--input", src, "--output", tmp_path / "b", "--no-validate-vllm", "--json")
    assert code == 0, err
    renamed = json.loads(stdout)["renamed"]
    assert renamed["module._orig_mod.model.norm.weight"] == "model.norm.weight"
    before = torch.load(src / "pytorch_model.bin", weights_only=True)
    after = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert set(after) == {renamed[k] for k in before}
    assert all(torch.equal(bits(after[renamed[k]]), bits(t)) for k, t in before.items())


def test_nested_pytorch_model_bin_folder(layouts: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out = layouts / "nested_sharded", tmp_path / "out"
    code, stdout, err = run_inproc(capsys, "--input", src, "--output", out, "--no-validate-vllm", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["detected"]["type"] == "hf_sharded" and result["detected"]["nested"]
    assert result["dropped"] == ["lm_head.weight"]  # tied qwen2: zero_to_fp32 stores it as a shared alias
    before, after = weights(src), load_file(str(out / "model.safetensors"))
    assert set(after) == set(before) - {"lm_head.weight"}
    assert all(torch.equal(bits(after[n]), bits(before[n])) for n in after)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_nested_single_and_nested_folder_given_directly(layouts: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    for i, src in enumerate((layouts / "nested_single", layouts / "nested_sharded" / "pytorch_model.bin")):
        out = tmp_path / f"out{i}"
        code, _, err = run_inproc(capsys, "--input", src, "--output", out, "--no-validate-vllm",
                                  "--base-model-name", layouts / "nested_single")
        assert code == 0, err
        before, after = weights(src if src.name != "pytorch_model.bin" else src.parent), weights(out)
        assert all(torch.equal(bits(after[n]), bits(before[n])) for n in after)


def test_single_bin_tied_lm_head_dropped(layouts: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out = layouts / "bin_single_bf16_tied", tmp_path / "out"
    code, stdout, err = run_inproc(capsys, "--input", src, "--output", out, "--keep-original-precision",
                                   "--no-validate-vllm")
    assert code == 0, err
    assert "dropped tied lm_head.weight" in stdout
    before, after = weights(src), load_file(str(out / "model.safetensors"))
    assert set(after) == set(before) - {"lm_head.weight"}
    assert all(torch.equal(bits(after[n]), bits(before[n])) for n in after)


# -- already consolidated -------------------------------------------------------------------------------


def test_single_file_already_consolidated_then_forced(layouts: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    src, out = layouts / "st_single_fp32", tmp_path / "out"
    proc = run_cli("--input", src, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("already consolidated:")
    assert not out.exists()
    code, stdout, err = run_inproc(capsys, "--input", src, "--output", out, "--force", "--no-validate-vllm")
    assert code == 0, err
    assert stdout.startswith("detected:   hf_single")
    before, after = weights(src), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(bits(after[n]), bits(t)) for n, t in before.items())


@pytest.mark.parametrize(("layout", "extra", "consolidated"), [
    ("st_single_bf16", ["--keep-original-precision"], True),
    ("st_single_bf16", [], False),  # default --dtype float32 changes the dtype
    ("bin_single_bf16_tied", ["--keep-original-precision", "--pytorch-bin"], True),
    ("bin_single_bf16_tied", ["--keep-original-precision"], False),  # format change
    ("bin_ddp_compiled", ["--pytorch-bin"], False),  # names change
])
def test_already_consolidated_rules(layouts: Path, tmp_path: Path, capsys: pytest.CaptureFixture, layout: str,
                                    extra: list[str], consolidated: bool) -> None:
    out = tmp_path / "out"
    code, stdout, err = run_inproc(capsys, "--input", layouts / layout, "--output", out, "--no-validate-vllm", *extra)
    assert code == 0, err
    assert stdout.startswith("already consolidated:") is consolidated
    assert out.exists() is not consolidated


# -- broken inputs --------------------------------------------------------------------------------------


def _break(kind: str, layouts: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """Copy a good sharded folder and break it one way; return it and words the error must contain."""
    src = tmp_path / kind
    if kind == "bin_missing_shard":
        shutil.copytree(layouts / "bin_sharded_fp32", src)
        (src / "pytorch_model-00003-of-00003.bin").unlink()
        return src, ["pytorch_model-00003-of-00003.bin", "missing"]
    shutil.copytree(layouts / "st_sharded_fp32", src)
    s1, s2 = src / "model-00001-of-00002.safetensors", src / "model-00002-of-00002.safetensors"
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    if kind == "missing_file":
        s2.unlink()
        return src, [s2.name, "missing"]
    if kind == "wrong_file":
        name = next(n for n, f in sorted(index["weight_map"].items()) if f == s1.name)
        index["weight_map"][name] = s2.name
        index_path.write_text(json.dumps(index))
        return src, [name, s2.name, s1.name]
    if kind == "duplicate":
        shutil.copyfile(s1, s2)  # shard 1 copied over shard 2: its tensors are now stored twice
        return src, ["stored twice", s1.name, s2.name]
    if kind == "stray":
        shutil.copyfile(s1, src / "model-00001-of-00003.safetensors")  # left over from an older save
        return src, ["model-00001-of-00003.safetensors", "does not list"]
    if kind == "index_missing":
        index_path.unlink()
        return src, ["model.safetensors.index.json", "missing"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing_file", "wrong_file", "duplicate", "stray", "index_missing",
                                  "bin_missing_shard"])
def test_bad_index(layouts: Path, tmp_path: Path, capsys: pytest.CaptureFixture, kind: str) -> None:
    src, words = _break(kind, layouts, tmp_path)
    out = tmp_path / "out"
    code, stdout, err = run_inproc(capsys, "--input", src, "--output", out)
    assert code == 4, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert "hint:" in err
    assert_no_output(out)


def test_bad_index_through_installed_cli(layouts: Path, tmp_path: Path) -> None:
    src, words = _break("wrong_file", layouts, tmp_path)
    out = tmp_path / "out"
    proc = run_cli("--input", src, "--output", out)
    assert proc.returncode == 4
    assert all(w in proc.stderr for w in words) and "Traceback" not in proc.stderr
    assert_no_output(out)


def test_zero3_empty_placeholders_refused(layouts: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code, _, err = run_inproc(capsys, "--input", layouts / "z3_placeholder", "--output", out)
    assert code == 4
    assert "ZeRO-3 placeholders" in err and "model.safetensors" in err and "--type deepspeed" in err
    assert_no_output(out)


def test_dcp_folder_named_pytorch_model_bin(layouts: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A DCP save under the weights file's name is read as DCP (with --type hf_sharded: refused, naming --type dcp)."""
    import torch.distributed.checkpoint as dcp

    src = tmp_path / "run"
    shutil.copytree(layouts / "st_single_fp32", src, ignore=shutil.ignore_patterns("*.safetensors"))
    want = load_file(str(layouts / "st_single_fp32" / "model.safetensors"))
    dcp.save(want, checkpoint_id=src / "pytorch_model.bin")
    out = tmp_path / "out"
    code, _, err = run_inproc(capsys, "--input", src, "--output", tmp_path / "hf", "--type", "hf_sharded")
    assert code == 4
    assert "torch.distributed.checkpoint" in err and ".metadata" in err and "--type dcp" in err
    assert_no_output(tmp_path / "hf")
    code, text, err = run_inproc(capsys, "--input", src, "--output", out)
    assert code == 0, err
    assert "pytorch_model.bin" in text
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)


class _NotAllowed:
    """A class a checkpoint never needs; the allowlist must refuse it."""


def test_bin_that_is_not_a_state_dict(layouts: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sd = torch.load(layouts / "bin_ddp_compiled" / "pytorch_model.bin", weights_only=True)
    for name, obj, code_want, words in (
        ("nested", {"model": sd, "epoch": 3}, 4, ["entry 'model' is a dict"]),
        ("unsafe", {**sd, "extra": _NotAllowed()}, 5, ["_NotAllowed", "allowlist"]),
    ):
        src = tmp_path / name
        shutil.copytree(layouts / "bin_ddp_compiled", src)
        torch.save(obj, src / "pytorch_model.bin")
        code, _, err = run_inproc(capsys, "--input", src, "--output", tmp_path / f"out-{name}")
        assert code == code_want, err
        assert all(w in err for w in words), err
        assert_no_output(tmp_path / f"out-{name}")


# -- reader units ---------------------------------------------------------------------------------------


def test_strip_wrapper_prefixes() -> None:
    assert hf.strip_wrapper_prefixes("module._orig_mod.model.x") == "model.x"
    assert hf.strip_wrapper_prefixes("_forward_module.module._orig_mod.module.lm_head.weight") == "lm_head.weight"
    assert hf.strip_wrapper_prefixes("model.module.x") == "model.module.x"  # only the front


def test_prefix_collision_is_an_error(layouts: Path) -> None:
    specs = dict(hf.read_safetensors_header(layouts / "st_single_fp32" / "model.safetensors"))
    spec = specs["model.norm.weight"]
    with pytest.raises(CorruptCheckpointError, match="both become model.norm.weight"):
        hf._rename([("model.norm.weight", spec), ("module.model.norm.weight", spec)], {}, layouts)
