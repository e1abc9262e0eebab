"""Hostile inputs to the readers (issue 11): safetensors headers, indexes, DeepSpeed ``latest``, rank files.

Every hostile file is built as an attacker would build it: safetensors files byte by byte (8-byte
little-endian header length, JSON, data) with ``struct``; indexes and ``latest`` as raw text;
symlinks and FIFOs with ``os``; DeepSpeed damage by copying, renaming or symlinking a real corpus
rank file, by rewriting one integer's opcodes in its ``data.pkl`` (found with ``pickletools``,
rewritten with ``zipfile``), or by loading it with torch and saving it back with one field changed.
Nothing here uses the package to build an input.

Each case runs the CLI as a user would (:func:`tests.hostile.run_cli`, a subprocess under a memory
cap and a timeout) and checks every promise with :func:`tests.hostile.assert_refused`: the exit code,
one ``error:`` line naming the file, nothing published, no leftovers, the input unchanged, no byte of
the secret in the output's parent, time and memory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
from tests.hostile import SECRET, assert_refused, run_cli, snapshot, write_secret

NO_VALIDATE = "--no-validate-vllm"
HF_SINGLE = "hf_qwen2_single_fp32_tied"  # model.safetensors + config + tokenizer
HF_SHARDED = "hf_llama_sharded_bf16"  # 5 shards + model.safetensors.index.json + config
Z2 = "mistral_z2_w2_fp16_frozen"  # ZeRO-2, 2 ranks, frozen params, config
Z3 = "llama_z3_w2_bf16_frozen"  # ZeRO-3, 2 ranks, frozen params (per-rank model states), config
Z3_PLAIN = "qwen2_z3_w2_bf16_tied"  # ZeRO-3, 2 ranks, no frozen params, config
# ZeRO-2 round_robin_gradients, 3 ranks, config; ranks 0 and 1 hold equal shares of both groups, and DeepSpeed
# writes param_slice_mappings in the module's order (issue 22). Its sibling without offload has the same shapes.
Z2RR = "llama_z2rr_w3_bf16_offload"
Z2RR_SIBLING = "llama_z2rr_w3_bf16"


# -- building blocks ---------------------------------------------------------------------------------


def st_file(header: bytes | dict, data: bytes = b"") -> bytes:
    """A safetensors file: 8-byte little-endian header length, the header, the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def f32(n: int, offset: int = 0) -> dict:
    """A header entry for an F32 tensor of ``n`` elements at ``offset``."""
    return {"dtype": "F32", "shape": [n], "data_offsets": [offset, offset + 4 * n]}


def _out(tmp_path: Path) -> Path:
    """The output, in a folder of its own: the secret checks scan the output's parent, not the input."""
    (tmp_path / "o").mkdir(exist_ok=True)
    return tmp_path / "o" / "out"


def convert(inp: Path, out: Path, *extra: str):
    return run_cli(["convert", "--input", str(inp), "--output", str(out), NO_VALIDATE, *extra])


def convert_refused(inp: Path, tmp_path: Path, code: int, message: str, **kw):
    """Convert the damaged ``inp`` (snapshotted first) and check every promise of :func:`assert_refused`.

    Returns the run, for the checks a test adds.
    """
    before, out = snapshot(inp), _out(tmp_path)
    run = convert(inp, out)
    assert_refused(run, code, output=out, inputs=[inp], before={str(inp): before}, message=message, **kw)
    return run


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    return write_secret(tmp_path)


def _copy(case_dir, case: str, sub: str, dst: Path) -> Path:
    shutil.copytree(case_dir(case) / sub, dst, symlinks=True)
    return dst


def _copy_fixture(name: str, case: str, sub: str):
    """The fixture ``name``: a copy of the corpus case's ``sub`` folder at ``tmp_path/in/sub``, free to damage."""

    @pytest.fixture(name=name)
    def copy(case_dir, tmp_path: Path) -> Path:
        return _copy(case_dir, case, sub, tmp_path / "in" / sub)

    return copy


hf_single = _copy_fixture("hf_single", HF_SINGLE, "model")
hf_sharded = _copy_fixture("hf_sharded", HF_SHARDED, "model")
z2 = _copy_fixture("z2", Z2, "ckpt")
z3 = _copy_fixture("z3", Z3, "ckpt")
z2rr = _copy_fixture("z2rr", Z2RR, "ckpt")


def _step(ckpt: Path) -> Path:
    return ckpt / (ckpt / "latest").read_text().strip()


def _ranks(ckpt: Path) -> list[Path]:
    return sorted(_step(ckpt).glob("*_optim_states.pt"), key=lambda p: int(re.search(r"rank_(\d+)_mp", p.name)[1]))


def rewrite_pickle(path: Path, pattern: bytes, new: bytes) -> None:
    """In a torch zip's ``data.pkl``, replace what lies between ``pattern``'s two groups with ``new``.

    ``pattern`` must match exactly once; its groups (the opcodes around the value) are kept.
    """
    with zipfile.ZipFile(path) as zf:
        members = [(info, zf.read(info)) for info in zf.infolist()]
    out = []
    for info, data in members:
        if info.filename.endswith("/data.pkl"):
            data, count = re.subn(pattern, lambda m: m.group(1) + new + m.group(2), data, flags=re.DOTALL)
            assert count == 1, f"{pattern!r} matched {count} times"
        out.append((info.filename, data))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in out:
            zf.writestr(name, data)


def long1(n: int) -> bytes:
    """Pickle opcode LONG1 for ``n`` (little-endian two's complement)."""
    body = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(body)]) + body


# -- control: the copies convert, so each refusal below is caused by the damage -------------------------


@pytest.mark.parametrize("fixture", ["hf_single", "hf_sharded", "z2", "z3", "z2rr"])
def test_undamaged_copies_convert(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    inp = request.getfixturevalue(fixture)
    run = convert(inp, _out(tmp_path))
    assert run.code == 0, run.stderr


def test_hand_built_safetensors_converts(hf_single: Path, tmp_path: Path) -> None:
    """The byte layout the hostile headers below start from is a valid file."""
    header = {"__metadata__": {"format": "pt"}, "model.norm.weight": f32(2), "lm_head.bias": f32(1, 8)}
    (hf_single / "model.safetensors").write_bytes(st_file(header, struct.pack("<3f", 1, 2, 3)))
    run = convert(hf_single, _out(tmp_path))
    assert run.code == 0, run.stderr


# -- safetensors headers -----------------------------------------------------------------------------

GOOD = b'"dtype":"F32","data_offsets":[0,8]'
#: name -> (header bytes, data bytes, error fragment, whether safetensors.safe_open refuses it too)
HEADERS = {
    "negative_dim": (b'{"w":{"shape":[-2],' + GOOD + b"}}", b"\0" * 8, "-2", True),
    "negative_dims_positive_product": (b'{"w":{"shape":[-1,-2],' + GOOD + b"}}", b"\0" * 8, "-1", True),
    "float_dim": (b'{"w":{"shape":[2.0],' + GOOD + b"}}", b"\0" * 8, "2.0", True),
    "float_dim_exponent": (b'{"w":{"shape":[2e0],' + GOOD + b"}}", b"\0" * 8, "not an integer", True),
    "bool_dim": (b'{"w":{"shape":[true,2],' + GOOD + b"}}", b"\0" * 8, "bool", True),
    "string_dim": (b'{"w":{"shape":["2"],' + GOOD + b"}}", b"\0" * 8, "not an integer", True),
    "float_offset": (b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}}', b"\0" * 8, "offset", True),
    "three_offsets": (b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}', b"\0" * 8, "pair", True),
    "duplicate_tensor": (b'{"w":{"shape":[1],"dtype":"F32","data_offsets":[0,4]},"w":{"shape":[2],' + GOOD + b"}}",
                         b"\0" * 8, "appears twice", False),
    "duplicate_field": (b'{"w":{"shape":[1],"shape":[2],' + GOOD + b"}}", b"\0" * 8, "appears twice", True),
    "overlap": (json.dumps({"a": f32(2), "b": f32(2, 4)}).encode(), b"\0" * 12, "overlaps", True),
    "gap": (json.dumps({"a": f32(1), "b": f32(1, 8)}).encode(), b"\0" * 12, "gap", True),
    "not_from_zero": (json.dumps({"a": f32(1, 4)}).encode(), b"\0" * 8, "gap", True),
    "trailing_bytes": (json.dumps({"a": f32(1)}).encode(), b"\0" * 4 + SECRET, "follow the last tensor", True),
    "size_mismatch": (b'{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', b"\0" * 8, "needs 12", True),
    "huge_number": (b'{"w":{"shape":[1e400],' + GOOD + b"}}", b"\0" * 8, "not valid JSON", True),
    "nan": (b'{"w":{"shape":[2],' + GOOD + b'},"x":NaN}', b"\0" * 8, "not valid JSON", True),
    "metadata_not_str": (b'{"__metadata__":{"format":1},"w":{"shape":[2],' + GOOD + b"}}", b"\0" * 8,
                         "__metadata__", True),
    "metadata_list": (b'{"__metadata__":[],"w":{"shape":[2],' + GOOD + b"}}", b"\0" * 8, "__metadata__", True),
    "metadata_nested": (b'{"__metadata__":{"a":{"b":"c"}},"w":{"shape":[2],' + GOOD + b"}}", b"\0" * 8,
                        "__metadata__", True),
    "not_utf8": (b'{"w\xff":{"shape":[2],' + GOOD + b"}}", b"\0" * 8, "UTF-8", True),
    "lone_surrogate": (b'{"w\\ud800":{"shape":[2],' + GOOD + b"}}", b"\0" * 8, "surrogate", True),
    "not_an_object": (b"[1,2]", b"", "not a JSON object", True),
    "entry_not_object": (b'{"w":[1,2]}', b"", "not an object", True),
    "moe_empty_huge_dim": (json.dumps({"model.layers.0.mlp.experts.gate_up_proj": {
        "dtype": "F32", "shape": [10**12, 0, 128], "data_offsets": [0, 0]}, "w": f32(1)}).encode(),
        b"\0" * 4, "1000000000000", False),
    "dim_overflows_u64": (json.dumps({"w": {"dtype": "F32", "shape": [2**62, 8], "data_offsets": [0, 0]}}).encode(),
                          b"", "outside", True),
}


@pytest.mark.parametrize("kind", sorted(HEADERS))
def test_hostile_safetensors_header(kind: str, hf_single: Path, tmp_path: Path) -> None:
    header, data, message, library_refuses = HEADERS[kind]
    target = hf_single / "model.safetensors"
    target.write_bytes(st_file(header, data))
    from safetensors import safe_open

    try:
        with safe_open(str(target), "np") as fh:
            list(fh.keys())
        library = False
    except Exception:  # noqa: BLE001 - any refusal counts
        library = True
    assert library == library_refuses, "the table's note on the safetensors library is wrong"
    run = convert_refused(hf_single, tmp_path, 4, message)
    assert "model.safetensors" in run.stderr


def test_header_longer_than_the_cap_is_not_parsed(hf_single: Path, tmp_path: Path) -> None:
    """85 MB of real JSON (the library would parse it, using ~2 GB): refused from its length alone."""
    pad = b'{"pad":"' + b"x" * (85 * 2**20) + b'","w":' + json.dumps(f32(1)).encode() + b"}"
    (hf_single / "model.safetensors").write_bytes(st_file(pad, b"\0" * 4))
    run = convert_refused(hf_single, tmp_path, 4, "header length", max_seconds=10)
    assert 0 < run.peak_rss < 200 * 2**20, f"{run.peak_rss / 2**20:.0f} MiB"


def test_hostile_header_just_under_the_cap_is_bounded(hf_single: Path, tmp_path: Path) -> None:
    """The costliest JSON per byte found (one list per 4 bytes) filling the cap parses within bounds."""
    from vllm_consolidate.formats.safetensors import MAX_HEADER_BYTES

    head = b'{"w":' + json.dumps(f32(1)).encode() + b',"pad":['
    count = (MAX_HEADER_BYTES - len(head) - 2) // 4
    header = head + b",".join([b"[0]"] * count) + b"]}"
    assert len(header) <= MAX_HEADER_BYTES
    (hf_single / "model.safetensors").write_bytes(st_file(header, b"\0" * 4))
    convert_refused(hf_single, tmp_path, 4, "not an object", max_seconds=20)


def test_forged_name_of_a_million_prefixes_is_linear(hf_single: Path, tmp_path: Path) -> None:
    """``module.`` stripping on a 7 MB name: quadratic slicing would take minutes."""
    name = "module." * 1_000_000 + "model.norm.weight"
    header = {"__metadata__": {"format": "pt"}, name: f32(2), "lm_head.bias": f32(1, 8)}
    (hf_single / "model.safetensors").write_bytes(st_file(header, struct.pack("<3f", 1, 2, 3)))
    run = convert(hf_single, _out(tmp_path))
    assert run.code == 0, run.stderr[-2000:]
    assert run.seconds < 20


# -- HF folders: regular files only, nothing outside the model -----------------------------------------


def test_fifo_as_model_safetensors_does_not_block(hf_single: Path, tmp_path: Path) -> None:
    (hf_single / "model.safetensors").unlink()
    os.mkfifo(hf_single / "model.safetensors")
    run = convert_refused(hf_single, tmp_path, 4, "not a regular file", max_seconds=10)
    assert "model.safetensors" in run.stderr


def test_fifo_as_pytorch_model_bin_does_not_block(hf_single: Path, tmp_path: Path) -> None:
    (hf_single / "model.safetensors").unlink()
    os.mkfifo(hf_single / "pytorch_model.bin")
    convert_refused(hf_single, tmp_path, 4, "not a regular file", max_seconds=10)


def test_fifo_as_a_shard_does_not_block(hf_sharded: Path, tmp_path: Path) -> None:
    shard = sorted(hf_sharded.glob("model-*.safetensors"))[2]
    shard.unlink()
    os.mkfifo(shard)
    run = convert_refused(hf_sharded, tmp_path, 4, "not a regular file", max_seconds=10)
    assert shard.name in run.stderr


def _outside_copy(src: Path, secret: Path) -> Path:
    """A valid weight file outside the input, holding the secret's bytes in a tensor."""
    dst = secret.parent / src.name
    shutil.copyfile(src, dst)
    return dst


def test_shard_symlink_out_of_the_model_is_refused(hf_sharded: Path, tmp_path: Path, secret: Path) -> None:
    shard = sorted(hf_sharded.glob("model-*.safetensors"))[1]
    outside = _outside_copy(shard, secret)
    shard.unlink()
    shard.symlink_to(outside)
    run = convert_refused(hf_sharded, tmp_path, 5, "outside the model folder")
    assert shard.name in run.stderr


def test_single_file_symlink_to_a_secret_is_refused(hf_single: Path, tmp_path: Path, secret: Path) -> None:
    """A forged safetensors outside the input whose one tensor is the secret."""
    forged = secret.parent / "forged.safetensors"
    data = SECRET + b"\0" * (-len(SECRET) % 4)
    forged.write_bytes(st_file({"model.embed_tokens.weight": f32(len(data) // 4)}, data))
    (hf_single / "model.safetensors").unlink()
    (hf_single / "model.safetensors").symlink_to(forged)
    convert_refused(hf_single, tmp_path, 5, "outside the model folder")


def test_shard_symlink_inside_the_model_is_followed(hf_sharded: Path, tmp_path: Path) -> None:
    shard = sorted(hf_sharded.glob("model-*.safetensors"))[0]
    (hf_sharded / "blobs").mkdir()
    os.rename(shard, hf_sharded / "blobs" / "abc123")
    shard.symlink_to(Path("blobs") / "abc123")
    run = convert(hf_sharded, _out(tmp_path))
    assert run.code == 0, run.stderr


def test_hf_cache_snapshot_links_into_blobs(hf_sharded: Path, tmp_path: Path) -> None:
    """In the HF cache every file of a snapshot links to ``../../blobs``: that is inside the model."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(hf_sharded.iterdir())):
        shutil.copyfile(f, blobs / f"sha{i}")
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f"sha{i}")
    run = convert(snap, _out(tmp_path))
    assert run.code == 0, run.stderr


INDEXES = {
    "parent_path": (lambda m: {**m, next(iter(m)): "../outside/x.safetensors"}, 5, "not a plain file name"),
    "absolute_path": (lambda m: {**m, next(iter(m)): "/etc/passwd"}, 5, "not a plain file name"),
    "dot_dot": (lambda m: {**m, next(iter(m)): ".."}, 5, "not a plain file name"),
    "nul": (lambda m: {**m, next(iter(m)): "model-00001-of-00005.safetensors\0x"}, 5, "not a plain file name"),
    "not_a_string": (lambda m: {**m, next(iter(m)): 7}, 4, "not a file name"),
}


@pytest.mark.parametrize("kind", sorted(INDEXES))
def test_index_naming_a_path_is_refused(kind: str, hf_sharded: Path, tmp_path: Path) -> None:
    index = hf_sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    change, code, message = INDEXES[kind]
    data["weight_map"] = change(data["weight_map"])
    index.write_text(json.dumps(data))
    run = convert_refused(hf_sharded, tmp_path, code, message)
    assert index.name in run.stderr


@pytest.mark.parametrize("content", [
    b'{"weight_map":{"a":"model-00001-of-00005.safetensors","a":"model-00002-of-00005.safetensors"}}',
    b'{"metadata":{"total_size":NaN},"weight_map":{}}',
    b'{"metadata":{"total_size":1e400},"weight_map":{}}',
    b'{"weight_map":' * 100_000,
    b"\xff\xfe{}",
])
def test_index_that_is_not_strict_json_is_refused(content: bytes, hf_sharded: Path, tmp_path: Path) -> None:
    (hf_sharded / "model.safetensors.index.json").write_bytes(content)
    convert_refused(hf_sharded, tmp_path, 4, "model.safetensors.index.json")


def test_huge_index_is_not_read(hf_sharded: Path, tmp_path: Path) -> None:
    with open(hf_sharded / "model.safetensors.index.json", "r+b") as fh:
        fh.truncate(2**30)  # sparse: 1 GiB of NUL bytes
    convert_refused(hf_sharded, tmp_path, 4, "refusing to read it", max_seconds=10)


def test_index_symlink_out_of_the_model_is_refused(hf_sharded: Path, tmp_path: Path, secret: Path) -> None:
    index = hf_sharded / "model.safetensors.index.json"
    outside = _outside_copy(index, secret)
    index.unlink()
    index.symlink_to(outside)
    convert_refused(hf_sharded, tmp_path, 5, "outside the model folder")


# -- DeepSpeed: latest ---------------------------------------------------------------------------------


def test_gigabyte_latest_is_not_read(z2: Path, tmp_path: Path) -> None:
    with open(z2 / "latest", "r+b") as fh:
        fh.truncate(2**30)  # sparse
    convert_refused(z2, tmp_path, 4, "'latest'", max_seconds=10)


@pytest.mark.parametrize("tag", ["../../outside", "/etc", "global_step2/../..", "..", ".", "global_step2\0"])
def test_latest_naming_a_path_is_refused(tag: str, z2: Path, tmp_path: Path) -> None:
    (z2 / "latest").write_bytes(tag.encode())
    convert_refused(z2, tmp_path, 5, "latest")


def test_latest_that_is_not_utf8_is_refused(z2: Path, tmp_path: Path) -> None:
    (z2 / "latest").write_bytes(b"global_step\xff")
    convert_refused(z2, tmp_path, 4, "UTF-8")


def test_latest_as_a_fifo_does_not_block(z2: Path, tmp_path: Path) -> None:
    (z2 / "latest").unlink()
    os.mkfifo(z2 / "latest")
    convert_refused(z2, tmp_path, 4, "not a regular file", max_seconds=10)


def test_latest_tag_folder_linking_out_is_refused(z2: Path, tmp_path: Path, secret: Path) -> None:
    step = _step(z2)
    outside = secret.parent / step.name
    shutil.copytree(step, outside)
    (z2 / "latest").write_text("global_step77")
    (z2 / "global_step77").symlink_to(outside)
    convert_refused(z2, tmp_path, 5, "latest")


def test_highest_global_step_linking_out_is_refused(z2: Path, tmp_path: Path, secret: Path) -> None:
    (z2 / "latest").unlink()
    outside = secret.parent / "elsewhere"
    shutil.copytree(_step_of_latestless(z2), outside)
    (z2 / "global_step99").symlink_to(outside)
    convert_refused(z2, tmp_path, 5, "global_step99")


def _step_of_latestless(ckpt: Path) -> Path:
    return max(ckpt.glob("global_step*"), key=lambda p: int(p.name.removeprefix("global_step")))


def test_latest_checkpoint_n_linking_out_is_refused(z2: Path, tmp_path: Path, secret: Path) -> None:
    run_dir = tmp_path / "in" / "run"
    run_dir.mkdir()
    os.rename(z2, run_dir / "checkpoint-2")
    outside = secret.parent / "checkpoint-9"
    shutil.copytree(run_dir / "checkpoint-2", outside)
    (run_dir / "checkpoint-9").symlink_to(outside)
    convert_refused(run_dir, tmp_path, 5, "checkpoint-9")


def test_symlinked_folder_given_directly_is_followed(z2: Path, tmp_path: Path) -> None:
    """The user may name a symlink; only folders we pick inside it are confined."""
    link = tmp_path / "link"
    link.symlink_to(z2)
    run = convert(link, _out(tmp_path))
    assert run.code == 0, run.stderr


# -- DeepSpeed: rank files -------------------------------------------------------------------------------


def test_rank_file_symlink_out_of_the_checkpoint_is_refused(z2: Path, tmp_path: Path, secret: Path) -> None:
    rank = _ranks(z2)[1]
    outside = _outside_copy(rank, secret)
    rank.unlink()
    rank.symlink_to(outside)
    run = convert_refused(z2, tmp_path, 5, "outside the checkpoint")
    assert rank.name in run.stderr


def test_rank_file_as_a_fifo_does_not_block(z3: Path, tmp_path: Path) -> None:
    rank = _ranks(z3)[1]
    rank.unlink()
    os.mkfifo(rank)
    convert_refused(z3, tmp_path, 4, "not a regular file", max_seconds=10)


def test_model_states_fifo_does_not_block(z3: Path, tmp_path: Path) -> None:
    model = sorted(_step(z3).glob("*_model_states.pt"))[1]
    model.unlink()
    os.mkfifo(model)
    convert_refused(z3, tmp_path, 4, "not a regular file", max_seconds=10)


@pytest.mark.parametrize("fixture", ["z2", "z3"])
def test_rank_0_copied_over_rank_1(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    ckpt = request.getfixturevalue(fixture)
    r0, r1 = _ranks(ckpt)
    shutil.copyfile(r0, r1)
    run = convert_refused(ckpt, tmp_path, 4, r1.name)
    assert r0.name in run.stderr and r1.name in run.stderr


def test_zero3_rank_copy_without_frozen_params(case_dir, tmp_path: Path) -> None:
    """ZeRO-3 files record nothing per rank: the sampled content is what tells a copy."""
    ckpt = _copy(case_dir, Z3_PLAIN, "ckpt", tmp_path / "in" / "ckpt")
    r0, r1 = _ranks(ckpt)
    shutil.copyfile(r0, r1)
    run = convert_refused(ckpt, tmp_path, 4, "copy of")
    assert r0.name in run.stderr and r1.name in run.stderr


def _swap(a: Path, b: Path) -> None:
    os.rename(a, a.with_suffix(".tmp"))
    os.rename(b, a)
    os.rename(a.with_suffix(".tmp"), b)


def test_zero2_rank_files_swapped(z2: Path, tmp_path: Path) -> None:
    _swap(*_ranks(z2))
    convert_refused(z2, tmp_path, 4, "rank 1's slice")


def test_zero2_round_robin_swap_of_equal_shares(z2rr: Path, tmp_path: Path) -> None:
    """Ranks 0 and 1 hold as many elements: the saved weights tell which slice each file holds."""
    r0, r1, _ = _ranks(z2rr)
    _swap(r0, r1)
    run = convert_refused(z2rr, tmp_path, 4, "rank 1's slice")
    assert r0.name in run.stderr and r1.name in run.stderr


def _torch_load(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def _torch_rewrite(path: Path, edit) -> None:
    """Load a real checkpoint file with torch, apply ``edit`` to it, save it back with torch."""
    import torch

    state = _torch_load(path)
    edit(state)
    torch.save(state, path)


def test_zero2_swap_without_slice_mappings(z2rr: Path, tmp_path: Path) -> None:
    """DeepSpeed < 0.7 wrote no param_slice_mappings: a swap of equal shares is still proved by the bytes."""
    for rank in _ranks(z2rr):
        _torch_rewrite(rank, lambda state: state["optimizer_state_dict"].pop("param_slice_mappings"))
    _swap(*_ranks(z2rr)[:2])
    convert_refused(z2rr, tmp_path, 4, "rank 1's slice")


def _without_module_weights(ckpt: Path) -> None:
    """Drop the saved module weights (keep its buffers), so that the bytes cannot tell the ranks apart."""
    model = _step(ckpt) / "mp_rank_00_model_states.pt"
    _torch_rewrite(model, lambda s: s.update(module={k: v for k, v in s["module"].items() if k in s["buffer_names"]}))


def test_param_slice_mappings_disagreeing_is_only_a_warning(z2rr: Path, tmp_path: Path) -> None:
    """DeepSpeed does not use param_slice_mappings to consolidate: when it alone disagrees, convert warns.

    With the module's weights gone only the names are left to compare. DeepSpeed's own round-robin
    names (module order) convert silently; rank 2's names written into rank 1's file give a warning
    naming the file, and the same weights.
    """
    _without_module_weights(z2rr)
    clean = convert(z2rr, tmp_path / "clean")
    assert clean.code == 0 and "param_slice_mappings" not in clean.stderr, clean.stderr
    r1, r2 = _ranks(z2rr)[1:]
    names = _torch_load(r2)["optimizer_state_dict"]["param_slice_mappings"]
    _torch_rewrite(r1, lambda state: state["optimizer_state_dict"].update(param_slice_mappings=names))
    run = convert(z2rr, tmp_path / "out")
    warned = [ln for ln in run.stderr.splitlines() if "param_slice_mappings" in ln]
    assert run.code == 0 and warned and all(r1.name in ln for ln in warned), run.stderr
    weights = [(tmp_path / out / "model.safetensors").read_bytes() for out in ("clean", "out")]
    assert weights[0] == weights[1]
    inspected = run_cli(["inspect", str(z2rr)])
    assert inspected.code == 0 and "param_slice_mappings" in inspected.stdout, inspected.stdout


def test_rank_file_from_another_run_is_a_warning(z2rr: Path, case_dir, tmp_path: Path) -> None:
    """Same shapes, other weights: sizes and names agree, the bytes match no rank's saved weights.

    Not a proof of a swap (DeepSpeed does not compare masters with the saved weights), so a warning.
    """
    r1 = _ranks(z2rr)[1]
    shutil.copyfile(_ranks(case_dir(Z2RR_SIBLING) / "ckpt")[1], r1)
    run = convert(z2rr, _out(tmp_path))
    assert run.code == 0, run.stderr
    assert any(r1.name in ln and "not the saved weights" in ln for ln in run.stderr.splitlines()), run.stderr


def test_zero3_model_states_copied(z3: Path, tmp_path: Path) -> None:
    """The frozen parameters live per rank in the ZeRO-3 model-states files."""
    m0, m1 = sorted(_step(z3).glob("zero_pp_rank_*_model_states.pt"))
    shutil.copyfile(m0, m1)
    run = convert_refused(z3, tmp_path, 4, "copy of")
    assert m0.name in run.stderr and m1.name in run.stderr


def test_two_optimizer_files_for_one_rank(z2: Path, tmp_path: Path) -> None:
    r1 = _ranks(z2)[1]
    shutil.copyfile(r1, r1.with_name("bf16_" + r1.name))
    convert_refused(z2, tmp_path, 4, "two optimizer files for rank 1")


# -- DeepSpeed: numbers in the pickle -------------------------------------------------------------------

_MEMO = rb"(?:q.|r....)"  # BINPUT / LONG_BINPUT after a value


def test_forged_partition_count_is_not_looped_over(z3: Path, tmp_path: Path) -> None:
    """``partition_count = 10**12`` in rank 0's file (ZeRO-3 stores a plain int)."""
    rewrite_pickle(_ranks(z3)[0], rb"(partition_count" + _MEMO + rb")K\x02()", long1(10**12))
    run = convert_refused(z3, tmp_path, 4, "1000000000000 ranks", max_seconds=10)
    assert 0 < run.peak_rss < 300 * 2**20


def test_forged_partition_count_list(z2: Path, tmp_path: Path) -> None:
    """ZeRO-2 stores one count per group: ``[2, 10**12]``."""
    rewrite_pickle(_ranks(z2)[0], rb"(partition_count" + _MEMO + rb"\]" + _MEMO + rb"\(K\x02)K\x02(e)", long1(10**12))
    convert_refused(z2, tmp_path, 4, "different numbers of ranks", max_seconds=10)


@pytest.mark.parametrize("value", [b"\x88", long1(-3), long1(10**12), b"G@P\x00\x00\x00\x00\x00\x00",
                                   b"X\x01\x00\x00\x006"], ids=["bool", "negative", "1e12", "float", "str"])
def test_forged_param_shape(value: bytes, z2: Path, tmp_path: Path) -> None:
    """A trained parameter's shape in param_shapes, ``torch.Size((66, 101))``, with its first dim replaced.

    A non-int or negative size is refused by the unpickler's ``torch.Size``; a huge int is a valid
    ``torch.Size`` and is refused by the reader's shape bounds, naming the parameter.
    """
    model = _step(z2) / "mp_rank_00_model_states.pt"
    # name, memo, BINGET torch.Size, BININT1 66, BININT1 101, TUPLE2 (only param_shapes has this sequence)
    rewrite_pickle(model, rb"(model\.layers\.1\.mlp\.down_proj\.weight" + _MEMO + rb"h.)KB(Ke\x86)", value)
    run = convert_refused(z2, tmp_path, 4, model.name, max_seconds=10)
    assert "torch.Size" in run.stderr or "model.layers.1.mlp.down_proj.weight: shape" in run.stderr, run.stderr
