"""The folder against its source checkpoint: ``validate --against`` and the sampled check inside ``convert``.

Inputs are real DeepSpeed checkpoints from the corpus, converted by the CLI. Broken folders are made
from a good converted folder by rewriting one tensor with safetensors, as a faulty converter would.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.corpus import build

from vllm_consolidate import cli
from vllm_consolidate.validate.source import SAMPLE_WHOLE_ELEMENTS, sample_ranges
from vllm_consolidate.write import safetensors as writer

os.environ["HF_HUB_OFFLINE"] = "1"

CASE = "qwen2_z3_w2_bf16_tied"  # hidden 128: q_proj and o_proj are square
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
UP_PROJ = "model.layers.1.mlp.up_proj.weight"


def _source(corpus) -> Path:
    return corpus[CASE] / build.load_case(CASE)["input"]


@pytest.fixture(scope="module")
def converted(corpus, tmp_path_factory) -> dict[str, Path]:
    """The case converted to float32 and to bfloat16 (validation off: it is what is tested here)."""
    root = tmp_path_factory.mktemp("against")
    out = {}
    for dtype in ("float32", "bfloat16"):
        out[dtype] = root / dtype
        assert cli.convert_main(["--input", str(_source(corpus)), "--output", str(out[dtype]), "--dtype", dtype,
                                 "--no-validate-vllm"]) == 0
    return out


def _copy(folder: Path, dst: Path) -> Path:
    return Path(shutil.copytree(folder, dst))


def _rewrite(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _validate(folder: Path, capsys, *extra: str) -> tuple[int, str, dict]:
    code = cli.main(["validate", str(folder), "--json", *extra])
    out = capsys.readouterr()
    doc = json.loads(out.out)
    return code, out.err, {c["name"]: c for c in doc["checks"]}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_converted_folder_equals_its_source_element_for_element(converted, corpus, capsys, dtype):
    code, err, checks = _validate(converted[dtype], capsys, "--against", str(_source(corpus)))
    assert code == 0, err
    assert checks["source_tensors"]["status"] == "pass"
    values = checks["source_values"]
    assert values["status"] == "pass", values["message"]
    assert "every element" in values["message"]
    numel = sum(t.numel() for t in load_file(converted[dtype] / "model.safetensors").values())
    assert values["details"]["elements_compared"] == numel


def test_transposed_square_weight_is_found_and_named(converted, corpus, capsys, tmp_path):
    folder = _copy(converted["bfloat16"], tmp_path / "transposed")
    _rewrite(folder, lambda sd: sd.update({Q_PROJ: sd[Q_PROJ].T.contiguous()}))
    # The folder alone passes: name, shape and dtype are right (the documented limit).
    code, _, checks = _validate(folder, capsys)
    assert code == 0 and "source_values" not in checks
    code, err, checks = _validate(folder, capsys, "--against", str(_source(corpus)))
    assert code == 9
    assert checks["source_values"]["status"] == "fail"
    assert f"{Q_PROJ} is stored transposed (it equals the source tensor's transpose)" in checks["source_values"][
        "message"]
    assert checks["source_values"]["details"]["transposed"] == [Q_PROJ]
    assert "source_values" in err


def test_changed_element_missing_and_extra_tensors(converted, corpus, capsys, tmp_path):
    folder = _copy(converted["float32"], tmp_path / "edited")

    def edit(sd):
        sd[UP_PROJ] = sd[UP_PROJ].clone()
        sd[UP_PROJ].view(-1)[1234] += 1.0
        del sd["model.norm.weight"]
        sd["model.extra.weight"] = torch.zeros(3)

    _rewrite(folder, edit)
    code, _, checks = _validate(folder, capsys, "--against", str(_source(corpus)))
    assert code == 9
    names = checks["source_tensors"]
    assert names["status"] == "fail"
    assert names["details"]["missing"] == ["model.norm.weight"]
    assert names["details"]["extra"] == ["model.extra.weight"]
    numel = load_file(folder / "model.safetensors")[UP_PROJ].numel()
    assert f"{UP_PROJ} differs from the source in 1 of {numel} compared elements (first at element 1234)" in \
        checks["source_values"]["message"]


def test_unreadable_source_is_a_clear_error(converted, capsys, tmp_path):
    code = cli.main(["validate", str(converted["float32"]), "--against", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code != 0 and code != 9
    assert err.startswith("error:") and "nowhere" in err and "Traceback" not in err


def test_sample_ranges_are_first_middle_and_last_rows():
    assert sample_ranges((10, 4), "sample") == [(0, 40)]  # small: whole
    rows, cols = 1000, 128
    assert rows * cols > SAMPLE_WHOLE_ELEMENTS
    assert sample_ranges((rows, cols), "sample") == [(0, cols), (500 * cols, cols), (999 * cols, cols)]
    assert sample_ranges((rows, cols), "full") == [(0, rows * cols)]


def test_conversion_compares_a_sample_with_the_source(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.convert_main(["--input", str(_source(corpus)), "--output", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    checks = {c["name"]: c for c in result["validation"]["checks"]}
    assert checks["source_tensors"]["status"] == "pass"
    assert checks["source_values"]["status"] == "pass"
    assert "first, middle and last rows" in checks["source_values"]["message"]


def test_conversion_refuses_a_tensor_written_transposed(corpus, tmp_path, capsys, monkeypatch):
    """A writer bug that transposes a square weight: the sampled check fails and nothing is published."""
    original = writer.write_safetensors_file

    def faulty(pfile, path, progress=None):
        original(pfile, path, progress)
        tensors = load_file(path)
        tensors[Q_PROJ] = tensors[Q_PROJ].T.contiguous()
        save_file(tensors, path, metadata={"format": "pt"})

    monkeypatch.setattr(writer, "write_safetensors_file", faulty)
    out = tmp_path / "out"
    code = cli.convert_main(["--input", str(_source(corpus)), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 9, err
    assert f"{Q_PROJ} is stored transposed" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
