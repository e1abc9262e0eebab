"""The file checks on hand-made safetensors folders (headers written directly, no torch)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from vllm_consolidate.read.hf import SAFE_INDEX
from vllm_consolidate.validate import files
from vllm_consolidate.validate.context import Context
from vllm_consolidate.validate.report import FAIL, PASS, WARN, Check

F32_2 = ("F32", [2], [1.0, 2.0])


def _run(folder: Path) -> tuple[Context, dict[str, Check]]:
    """The file checks in table order, on one context."""
    ctx = Context(folder)
    out = [files.check_weight_files(ctx), files.check_index(ctx), files.check_duplicates(ctx),
           files.check_bin_format(ctx), files.check_prefixes(ctx)]
    return ctx, {c.name: c for c in out}


def test_a_single_model_safetensors_passes(model_folder: Callable[..., Path]):
    ctx, checks = _run(model_folder())
    assert {c.status for c in checks.values()} == {PASS}
    assert checks["weight_files"].message == "safetensors, single file: model.safetensors; 2 tensors"
    assert checks["index"].message == "no index (single file)"
    assert ctx.stored.family == "safetensors" and set(ctx.stored.tensors) == {"model.embed_tokens.weight",
                                                                               "model.norm.weight"}


def test_a_single_file_with_another_name_is_a_warning(tmp_path: Path, st_file: Callable[..., Path]):
    st_file(tmp_path / "weights.safetensors", {"a": F32_2})
    _, checks = _run(tmp_path)
    assert checks["weight_files"].status == WARN
    assert "transformers expects the single file to be model.safetensors" in checks["weight_files"].message


def test_several_files_without_index_and_a_name_in_both(tmp_path: Path, st_file: Callable[..., Path]):
    st_file(tmp_path / "a.safetensors", {"x": F32_2, "y": F32_2})
    st_file(tmp_path / "b.safetensors", {"x": F32_2})
    _, checks = _run(tmp_path)
    assert checks["weight_files"].status == FAIL
    assert "2 safetensors files (a.safetensors, b.safetensors) and no model.safetensors.index.json" in \
        checks["weight_files"].message
    assert checks["duplicate_tensors"].status == FAIL
    assert checks["duplicate_tensors"].details == {"duplicates": {"x": ["a.safetensors", "b.safetensors"]}}


def test_consolidated_and_bin_next_to_safetensors_fail(model_folder: Callable[..., Path],
                                                       st_file: Callable[..., Path]):
    folder = model_folder()
    st_file(folder / "consolidated.safetensors", {"x": F32_2})
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    (folder / "training_args.bin").write_bytes(b"training state, not weights")
    _, checks = _run(folder)
    message = checks["weight_files"].message
    assert checks["weight_files"].status == FAIL
    assert "consolidated.safetensors: Mistral's native format" in message
    assert ".bin weights next to safetensors (pytorch_model.bin)" in message
    assert "training_args" not in message


def test_no_weight_files(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    _, checks = _run(tmp_path)
    assert checks["weight_files"].status == FAIL and "no weight files" in checks["weight_files"].message
    assert checks["index"].message == "skipped: no weight files"


def test_a_truncated_file_and_an_unknown_dtype(tmp_path: Path, st_file: Callable[..., Path]):
    path = st_file(tmp_path / "model.safetensors", {"x": F32_2, "odd": ("U16", [2], [1, 2])})
    _, checks = _run(tmp_path)
    assert checks["weight_files"].message == "dtypes this tool cannot read: U16"
    path.write_bytes(path.read_bytes()[:-3])
    _, checks = _run(tmp_path)
    assert checks["weight_files"].status == FAIL and "truncated" in checks["weight_files"].message


def test_the_index_and_the_shards_must_agree_both_ways(tmp_path: Path, st_file: Callable[..., Path]):
    st_file(tmp_path / "model-00001-of-00002.safetensors", {"a": F32_2, "b": F32_2})
    st_file(tmp_path / "model-00002-of-00002.safetensors", {"c": F32_2})
    st_file(tmp_path / "model-extra.safetensors", {"d": F32_2})
    weight_map = {"a": "model-00001-of-00002.safetensors", "c": "model-00001-of-00002.safetensors",
                  "e": "model-00003-of-00003.safetensors"}
    (tmp_path / SAFE_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    _, checks = _run(tmp_path)
    index = checks["index"]
    assert index.status == FAIL
    assert "names files that do not exist: model-00003-of-00003.safetensors" in index.message
    assert "1 tensors are not in the file the index names: c" in index.message
    assert "unlisted shard(s) model-00002-of-00002.safetensors, model-extra.safetensors" in index.message
    assert "1 stored tensors are not listed under their file: b" in index.message


def test_an_index_that_is_not_json(tmp_path: Path, st_file: Callable[..., Path]):
    st_file(tmp_path / "model-00001-of-00001.safetensors", {"a": F32_2})
    (tmp_path / SAFE_INDEX).write_text("{")
    _, checks = _run(tmp_path)
    assert checks["index"].status == FAIL and "is unreadable or has no weight_map" in checks["index"].message


def test_wrapper_prefixes_fail(tmp_path: Path, st_file: Callable[..., Path]):
    st_file(tmp_path / "model.safetensors", {"module.a": F32_2, "_orig_mod.b": F32_2, "c": F32_2})
    _, checks = _run(tmp_path)
    assert checks["wrapper_prefixes"].status == FAIL
    assert "2 tensor names start with a training wrapper's prefix ('_orig_mod.', 'module.')" in \
        checks["wrapper_prefixes"].message
