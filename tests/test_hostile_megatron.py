"""Hostile Megatron-Core inputs: a real ``torch_dist`` save, damaged as an attacker would.

Every case starts from the real corpus save ``mcore_llama_tp2_fp32`` (megatron-core 0.16, TP=2), copied
into the test's own folder as a Megatron-LM run (``run/iter_0000002`` + ``latest_checkpointed_iteration.txt``)
and then damaged: the tracker pointed elsewhere, folders and storage files linked out of the input, a
model key renamed inside the ``.metadata`` pickle (every occurrence, same length, so the file stays
coherent), ``common.pt`` replaced by a pickle that runs a command, files grown past their caps; and, from the
megatron-core 0.19 run ``mcore19_lm_run_llama_tp2`` (no common.pt), its ``common_state`` object replaced.
Each runs the CLI as a user would and must be refused with the documented exit code and one ``error:``
line naming what is wrong, nothing published, the input unchanged, fast and small
(:func:`tests.test_hostile_fsdp.refused`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.corpus import megatron_build
from tests.hostile import SECRET, snapshot, write_secret
from tests.test_convert_deepspeed import assert_equal, load_out
from tests.test_hostile_fsdp import _out, attempt, convert, refused

from vllm_consolidate.read.fsdp_locate import VERL_TRACKER as TRACKER

CASE = "mcore_llama_tp2_fp32"
ITER = "iter_0000002"


@pytest.fixture(scope="module")
def case() -> Path:
    return megatron_build.build_all([CASE])[CASE]


@pytest.fixture
def run(case: Path, tmp_path: Path) -> Path:
    """A Megatron-LM run holding a copy of the real save as ``iter_0000002``, the tracker naming it."""
    root = tmp_path / "in" / "run"
    shutil.copytree(case / "ckpt", root / ITER, symlinks=True)
    (root / TRACKER).write_text("2\n")
    return root


@pytest.fixture
def base(case: Path) -> list[str]:
    return ["--base-model-name", str(case / "hf")]


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    return write_secret(tmp_path)


def test_undamaged_run_converts_to_truth(run: Path, base: list[str], case: Path, tmp_path: Path) -> None:
    """The control: the copy every test below damages converts, bit for bit."""
    out = _out(tmp_path)
    result = convert(run, out, *base)
    assert result.code == 0, result.stderr
    assert_equal(load_file(case / "truth" / "step2.safetensors"), load_out(out), torch.float32)


@pytest.mark.parametrize(("text", "message"), [("7", "names iter_0000007, but it is missing"),
                                               ("2; rm -rf /", "not an iteration"),
                                               ("9" * 40, "not an iteration")])
def test_a_tracker_naming_no_save_is_refused(text: str, message: str, run: Path, base: list[str], tmp_path: Path,
                                             request: pytest.FixtureRequest) -> None:
    (run / TRACKER).write_text(text)
    result, out, before = attempt(run, tmp_path, *base)
    refused(request, result, 4, run, out, before, message, TRACKER)


def test_a_huge_tracker_is_refused_unread(run: Path, base: list[str], tmp_path: Path,
                                         request: pytest.FixtureRequest) -> None:
    with open(run / TRACKER, "wb") as fh:
        fh.truncate(64 << 20)  # sparse: 64 MiB (the cap is 4 KiB) that must never be read
    result, out, before = attempt(run, tmp_path, *base)
    refused(request, result, 4, run, out, before, "", TRACKER)


def test_an_iteration_linking_out_of_the_run_is_refused(run: Path, base: list[str], tmp_path: Path, secret: Path,
                                                        request: pytest.FixtureRequest) -> None:
    outside = secret.parent / "iter_0000009"
    shutil.copytree(run / ITER, outside)
    (run / "iter_0000009").symlink_to(outside)
    (run / TRACKER).write_text("9")
    result, out, before = attempt(run, tmp_path, *base)
    refused(request, result, 5, run, out, before, "outside", "iter_0000009")


def test_a_storage_file_linking_out_is_refused(run: Path, base: list[str], tmp_path: Path, secret: Path,
                                               request: pytest.FixtureRequest) -> None:
    distcp = run / ITER / "__1_0.distcp"
    shutil.move(distcp, secret.parent / distcp.name)
    distcp.symlink_to(secret.parent / distcp.name)
    result, out, before = attempt(run, tmp_path, *base)
    refused(request, result, 5, run, out, before, "outside", "__1_0.distcp")


def test_a_missing_storage_file_is_named(run: Path, base: list[str], tmp_path: Path,
                                         request: pytest.FixtureRequest) -> None:
    (run / ITER / "__0_1.distcp").unlink()
    result, out, before = attempt(run, tmp_path, *base)
    refused(request, result, 4, run, out, before, "missing", "__0_1.distcp")


def _rename_key(folder: Path, old: bytes, new: bytes) -> None:
    """Rename a key everywhere in the .metadata pickle (same length: every opcode's length prefix stays right)."""
    assert len(old) == len(new)
    meta = folder / ".metadata"
    data = meta.read_bytes()
    assert old in data
    meta.write_bytes(data.replace(old, new))


def test_a_model_key_not_understood_is_refused_by_name(run: Path, base: list[str], tmp_path: Path,
                                                       request: pytest.FixtureRequest) -> None:
    """A coherent checkpoint with one unknown model parameter: refused naming it, before any chunk is read."""
    _rename_key(run / ITER, b"decoder.final_layernorm.weight", b"decoder.final_mysterynm.weight")
    for distcp in (run / ITER).glob("*.distcp"):
        os.chmod(distcp, 0)  # the refusal must come from the metadata alone (root ignores it; the name check stays)
    try:
        result, out, before = attempt(run, tmp_path, *base)
    finally:
        for distcp in (run / ITER).glob("*.distcp"):
            os.chmod(distcp, 0o644)
    refused(request, result, 4, run, out, before, "decoder.final_mysterynm.weight", ".metadata")


class _Payload:
    """Unpickling this runs ``touch MARKER``: what a hostile common.pt would do to torch.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_common_pt_that_runs_code_is_refused_unrun(run: Path, tmp_path: Path,
                                                     request: pytest.FixtureRequest) -> None:
    """Without a config.json, the reader turns to Megatron-LM's args in common.pt: its pickle is never run."""
    marker = tmp_path / "ran"
    torch.save({"args": _Payload(marker), "iteration": 2}, run / ITER / "common.pt")
    result, out, before = attempt(run, tmp_path)
    refused(request, result, 5, run, out, before, "not on the allowlist", "common.pt")
    assert not marker.exists()


def test_a_common_pt_with_args_of_another_shape_is_refused(run: Path, tmp_path: Path,
                                                           request: pytest.FixtureRequest) -> None:
    """args naming another head layout: the qkv rows cannot be split so (exit 4, naming the key)."""
    import argparse

    args = argparse.Namespace(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8,
                              group_query_attention=True, num_query_groups=2, kv_channels=32, vocab_size=480,
                              padded_vocab_size=512, seq_length=64, max_position_embeddings=64, norm_epsilon=1e-6,
                              rotary_base=10000, untie_embeddings_and_output_weights=True, swiglu=True,
                              normalization="RMSNorm")
    torch.save({"args": args, "iteration": 2}, run / ITER / "common.pt")
    result, out, before = attempt(run, tmp_path)
    refused(request, result, 4, run, out, before, "query groups", "linear_qkv.weight")


def test_no_config_anywhere_is_exit_8_naming_base_model(run: Path, tmp_path: Path,
                                                       request: pytest.FixtureRequest) -> None:
    result, out, before = attempt(run, tmp_path)
    refused(request, result, 8, run, out, before, "no config.json", ITER)
    assert "--base-model-name" in result.stderr


def test_a_huge_metadata_json_is_not_read(run: Path, base: list[str], tmp_path: Path,
                                         request: pytest.FixtureRequest) -> None:
    """Megatron's metadata.json is read with a small cap: a sparse giant is refused, named, without reading it."""
    with open(run / ITER / "metadata.json", "r+b") as fh:
        fh.truncate(64 << 20)
    result, out, before = attempt(run, tmp_path, *base)
    refused(request, result, 4, run, out, before, "metadata.json", "metadata.json")


def test_secret_never_reaches_an_output(run: Path, base: list[str], tmp_path: Path, secret: Path) -> None:
    """The control for the link tests: the secret exists, and a successful run writes none of it."""
    assert secret.read_bytes() == SECRET
    before = snapshot(run)
    result = convert(run, _out(tmp_path), *base)
    assert result.code == 0 and snapshot(run) == before, result.stderr


#: megatron-core 0.19 writes no common.pt: Megatron-LM's args are in the DCP object common_state, in a .distcp.
NEXT_CASE = "mcore19_lm_run_llama_tp2"
COMMON_STATE = "common_state/shard_0_1"


@pytest.fixture
def next_run(tmp_path: Path) -> Path:
    """A copy of the real megatron-core 0.19 run (its one save ``iter_0000002``, no common.pt)."""
    root = tmp_path / "in" / "run"
    shutil.copytree(megatron_build.build_all([NEXT_CASE])[NEXT_CASE] / "run", root, symlinks=True)
    return root


def _place_common_state(folder: Path, blob: bytes | None, length: int | None = None) -> None:
    """Append ``blob`` to rank 0's ``.distcp`` and point the ``.metadata``'s common_state entry at it (declaring
    ``length`` bytes, default the blob's), re-pickled as torch's DCP writer does."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    md = FileSystemReader(str(folder)).read_metadata()
    (key,) = [k for k in md.storage_data if k.fqn == COMMON_STATE]
    distcp = folder / md.storage_data[key].relative_path
    start = distcp.stat().st_size
    with open(distcp, "ab") as fh:
        fh.write(blob or b"")
    md.storage_data[key] = _StorageInfo(distcp.name, start, len(blob or b"") if length is None else length)
    with open(folder / ".metadata", "wb") as fh:
        pickle.dump(md, fh)


def test_a_common_state_that_runs_code_is_refused_unrun(next_run: Path, tmp_path: Path,
                                                        request: pytest.FixtureRequest) -> None:
    """Without a config.json, the reader turns to the args in the common_state object: its pickle is never run."""
    import io

    marker, blob = tmp_path / "ran", io.BytesIO()
    torch.save([{"args": _Payload(marker), "iteration": 2}], blob)
    _place_common_state(next_run / ITER, blob.getvalue())
    result, out, before = attempt(next_run, tmp_path)
    refused(request, result, 5, next_run, out, before, "not on the allowlist", "__0_0.distcp")
    assert not marker.exists()


def test_a_huge_common_state_is_refused_unread(next_run: Path, tmp_path: Path,
                                               request: pytest.FixtureRequest) -> None:
    """A common_state entry declaring 1 GiB is refused by its cap before anything is read, naming the object."""
    _place_common_state(next_run / ITER, None, length=1 << 30)
    result, out, before = attempt(next_run, tmp_path)
    refused(request, result, 4, next_run, out, before, COMMON_STATE, "__0_0.distcp")


def test_a_common_state_without_args_falls_through_to_the_base_model(next_run: Path, tmp_path: Path) -> None:
    """A megatron-core 0.19 save whose common_state holds no args (a NeMo, Bridge or verl save): the layout comes
    from the next source, here --base-model-name, and the output is the truth."""
    import io

    blob = io.BytesIO()
    torch.save([{"iteration": 2, "checkpoint_version": 3.0}], blob)
    _place_common_state(next_run / ITER, blob.getvalue())
    case = megatron_build.case_dir(NEXT_CASE)
    result = convert(next_run, _out(tmp_path), "--base-model-name", str(case / "hf"), "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["detected"]["layout_from"] == str(case / "hf" / "config.json")
    assert_equal(load_file(case / "truth" / f"{ITER}.safetensors"), load_out(_out(tmp_path)), torch.float32)
