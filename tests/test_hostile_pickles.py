"""Hostile ``torch.save`` files (issue 11, classes 1, 4 and 5 for pickles).

Every hostile file is built as an attacker builds it: raw pickle opcodes written by hand, and zips
written with the standard :mod:`zipfile` module (or byte by byte), around the storages of a genuine
``torch.save`` file. Nothing of our package is used to build them. Each case is then converted with
the CLI as a user runs it (``convert --input DIR --output OUT``, validation on) and must be refused
with the right exit code, one ``error:`` line naming the file, nothing published, no leftovers, the
input unchanged, no byte of a secret file anywhere in the output, and within time and memory bounds
(see ``tests/hostile.py``).

Classes: (1) pickles that rewrite the reader's own objects (a storage's path, the process-wide
dtypes, the rebuild functions, inert classes) to copy a file outside the checkpoint into the
weights; (4) impossible tensors; (5) hangs and memory bombs (shared "billion laughs" structures,
hash flooding, deep nesting, memo and zip bombs) and zip-level ambiguities. In-process tests cover
the allowlist, the stand-ins' immutability, and a poisoned load followed by a clean one in the same
process (a batch worker is reused across jobs).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import pickletools
import shutil
import struct
import threading
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.hostile import SECRET, CliRun, assert_refused, run_cli, snapshot
from tests.hostile import op_global as g
from tests.hostile import op_int as i
from tests.hostile import op_str as s

from vllm_consolidate import dtypes
from vllm_consolidate.errors import ConsolidateError, CorruptCheckpointError, LimitExceededError, UnsafePickleError
from vllm_consolidate.formats import pickle_scan
from vllm_consolidate.formats.torch_zip import StorageRef, TensorRef, load_lazy

# -- raw pickle opcodes (protocol 2, as torch.save writes) -------------------------------------------

PROTO2, STOP, MARK, POP, DUP = b"\x80\x02", b".", b"(", b"0", b"2"
TUPLE, TUPLE1, TUPLE2, EMPTY_TUPLE = b"t", b"\x85", b"\x86", b")"
EMPTY_DICT, EMPTY_LIST, SETITEM, SETITEMS, APPEND, APPENDS, LIST = b"}", b"]", b"s", b"u", b"a", b"e", b"l"
REDUCE, BUILD, BINPERSID, NONE, NEWFALSE, NEWTRUE = b"R", b"b", b"Q", b"N", b"\x89", b"\x88"


def f(x: float) -> bytes:
    """BINFLOAT."""
    return b"G" + struct.pack(">d", x)


def tup(*items: bytes) -> bytes:
    return MARK + b"".join(items) + TUPLE


def long_binput(idx: int) -> bytes:
    return b"r" + struct.pack("<I", idx)


def ints(values: Any) -> list[bytes]:
    """Each value as an opcode: ints become BININT/LONG1, bytes are raw opcodes (a hostile value)."""
    return [v if isinstance(v, bytes) else i(v) for v in values]


def tensor(key: bytes | str, numel: int | bytes, offset: int | bytes, shape: Any, stride: Any,
           storage: bytes | None = None) -> bytes:
    """``torch._utils._rebuild_tensor_v2(<persistent storage>, offset, size, stride, False, OrderedDict())``.

    ``storage`` replaces the persistent storage (its id tuple and BINPERSID) with other opcodes.
    """
    pid = tup(s("storage"), g("torch", "FloatStorage"), key if isinstance(key, bytes) else s(key), s("cpu"),
              *ints([numel]))
    storage = pid + BINPERSID if storage is None else storage
    return (g("torch._utils", "_rebuild_tensor_v2") + MARK + storage + ints([offset])[0]
            + tup(*ints(shape)) + tup(*ints(stride)) + NEWFALSE
            + g("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE + TUPLE + REDUCE)


def contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def state_dict(entries: list[dict], override: dict[str, dict] | None = None, prefix: bytes = b"") -> bytes:
    """A hand-written pickle of ``OrderedDict(name -> tensor)``; ``override`` replaces tensor args."""
    body = b""
    for e in entries:
        args = {"key": e["key"], "numel": e["numel"], "offset": 0, "shape": e["shape"],
                "stride": contiguous(e["shape"]), **(override or {}).get(e["name"], {})}
        after = args.pop("after", b"")  # opcodes applied to the tensor just built
        body += s(e["name"]) + tensor(**args) + after
    return PROTO2 + prefix + g("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE + MARK + body + SETITEMS + STOP


def ops(data: bytes) -> list[tuple[str, Any, int]]:
    return [(op.name, arg, pos) for op, arg, pos in pickletools.genops(data)]


def splice_after(data: bytes, opname: str, payload: bytes) -> bytes:
    """Insert ``payload`` right after the first ``opname`` opcode of a genuine pickle."""
    listed = ops(data)
    k = next(n for n, (name, _, _) in enumerate(listed) if name == opname)
    end = listed[k + 1][2]
    return data[:end] + payload + data[end:]


def insert_item(data: bytes, key: str, value: bytes) -> bytes:
    """Add ``key: value`` to the dict (SETITEMS group) that holds ``key`` in a genuine pickle, after it."""
    listed, level = ops(data), 0
    start = next(n for n, (name, arg, _) in enumerate(listed) if arg == key)
    for name, _, pos in listed[start + 1:]:
        info = pickletools.code2op[data[pos:pos + 1].decode("latin-1")]
        if name == "MARK":
            level += 1
        elif pickletools.markobject in info.stack_before:
            if level == 0:
                return data[:pos] + s(key) + value + data[pos:]
            level -= 1
    raise AssertionError(f"no SETITEMS closes the dict holding {key}")


def dag(leaf: bytes, depth: int) -> bytes:
    """A "billion laughs" tuple: each level holds the level below twice (DUP), 2**depth leaves."""
    return leaf + (DUP + TUPLE2) * depth


# -- zips --------------------------------------------------------------------------------------------

def pkl_name(zip_path: Path) -> str:
    with zipfile.ZipFile(zip_path) as zf:
        return next(n for n in zf.namelist() if n.endswith("/data.pkl"))


def read_pkl(zip_path: Path) -> bytes:
    with zipfile.ZipFile(zip_path) as zf:
        return zf.read(pkl_name(zip_path))


def rewrite(src: Path, dst: Path, pkl: bytes) -> None:
    """Copy a genuine torch zip member by member with the standard zipfile module, data.pkl replaced."""
    with zipfile.ZipFile(src) as zin:
        members = [(info.filename, zin.read(info)) for info in zin.infolist()]
    tmp = dst.with_name(dst.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
        for name, data in members:
            zout.writestr(name, pkl if name.endswith("/data.pkl") else data)
    os.replace(tmp, dst)


def raw_zip(members: list[dict]) -> bytes:
    """A zip written byte by byte. Each member: name, data, and optionally method, size (declared
    uncompressed size), crc, csize (declared compressed size), offset (declared local header offset)."""
    out, central = b"", b""
    for m in members:
        name, data = m["name"].encode(), m["data"]
        crc, size = m.get("crc", zlib.crc32(data)), m.get("size", len(data))
        csize, method, offset = m.get("csize", len(data)), m.get("method", 0), m.get("offset", len(out))
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, csize, size, len(name), 0) + name
        out += data
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc, csize, size,
                               len(name), 0, 0, 0, 0, 0, offset) + name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(out), 0)
    return out + central + end


def members_of(zip_path: Path, pkl: bytes | None = None) -> list[dict]:
    """The members of a genuine zip as :func:`raw_zip` input (data.pkl replaced by ``pkl``)."""
    with zipfile.ZipFile(zip_path) as zf:
        return [{"name": info.filename,
                 "data": pkl if pkl is not None and info.filename.endswith("/data.pkl") else zf.read(info)}
                for info in zf.infolist()]


# -- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def genuine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny real Llama folder: config.json from LlamaConfig.save_pretrained, torch.save'd state dict.

    Returns its folder, the .bin path and the tensors in file order (name, storage key, numel, shape).
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("genuine") / "model"
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                      max_position_embeddings=64, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    config.save_pretrained(folder)
    sd = model.state_dict()
    torch.save(sd, folder / "pytorch_model.bin")
    keys: dict[int, str] = {}
    entries = []
    for name, t in sd.items():
        key = keys.setdefault(t.untyped_storage().data_ptr(), str(len(keys)))
        entries.append({"name": name, "key": key, "numel": t.untyped_storage().nbytes() // 4,
                        "shape": tuple(t.shape)})
    return {"folder": folder, "bin": folder / "pytorch_model.bin", "entries": entries}


@pytest.fixture()
def secret(tmp_path: Path) -> Path:
    """A private key next to the output, outside every input; 64 KiB so any tensor read from it fits."""
    path = tmp_path / "secret_id_ed25519"
    path.write_bytes((SECRET * (2**16 // len(SECRET) + 1))[: 2**16])
    return path


def pickle_file(tmp_path: Path, pkl: bytes) -> Path:
    """A zip holding only ``pkl`` as its ``data.pkl``, for pickles that name no storage."""
    path = tmp_path / "payload.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("payload/data.pkl", pkl)
    return path


def hostile_bin_folder(tmp_path: Path, genuine: dict[str, Any], pkl: bytes | None = None,
                       raw: bytes | None = None) -> Path:
    """A copy of the genuine folder whose pytorch_model.bin has ``pkl`` as data.pkl (or is ``raw``)."""
    folder = tmp_path / "model"
    shutil.copytree(genuine["folder"], folder)
    if raw is not None:
        (folder / "pytorch_model.bin").write_bytes(raw)
    else:
        rewrite(genuine["bin"], folder / "pytorch_model.bin", pkl)
    return folder


def convert(tmp_path: Path, folder: Path) -> tuple[CliRun, Path, dict[str, dict]]:
    out = tmp_path / "out"
    before = {str(folder): snapshot(folder)}
    run = run_cli(["convert", "--input", str(folder), "--output", str(out)])
    return run, out, before


def refused(run: CliRun, code: int, out: Path, folder: Path, before: dict[str, dict], reason: str,
            file: str = "pytorch_model.bin", max_seconds: float = 30.0) -> None:
    """:func:`tests.hostile.assert_refused`, and the error line names the file."""
    assert_refused(run, code, output=out, inputs=[folder], before=before, message=reason, max_seconds=max_seconds)
    error = next(ln for ln in run.stderr.splitlines() if ln.startswith("error:"))
    assert file in error, error


# -- the harness works: a hand-written pickle of the genuine storages converts ---------------------------

def test_hand_written_pickle_converts(genuine: dict[str, Any], tmp_path: Path, secret: Path) -> None:
    """Control: the same hand-written opcodes, without an attack, give a valid file that converts."""
    folder = hostile_bin_folder(tmp_path, genuine, state_dict(genuine["entries"]))
    run, out, _ = convert(tmp_path, folder)
    assert run.code == 0, run.stderr[-2000:]
    assert (out / "model.safetensors").is_file()


# -- class 1: rewriting the reader's own objects ----------------------------------------------------------

def _rewrites(secret: Path) -> dict[str, tuple[str, bytes]]:
    """name -> (where to splice into the genuine pickle, payload). Each leaves the stack as it found it."""
    path = s(str(secret))
    state = MARK + s("path") + path + s("offset") + i(0) + SETITEMS
    return {
        # BUILD a dict onto the StorageRef just made by BINPERSID: its path now names the secret.
        "storage_path_dict": ("BINPERSID", EMPTY_DICT + state + BUILD),
        # The same through slot state: (None, {...}) makes BUILD call setattr.
        "storage_path_slots": ("BINPERSID", NONE + EMPTY_DICT + state + TUPLE2 + BUILD),
        # The process-wide float32: one byte per element from now on, in every later load too.
        "dtype_singleton": ("PROTO", g("torch", "FloatStorage") + EMPTY_DICT + s("itemsize") + i(1) + SETITEM
                            + BUILD + POP),
        "dtype_name": ("PROTO", g("torch", "float32") + NONE + EMPTY_DICT + s("name") + s("uint8") + SETITEM
                       + TUPLE2 + BUILD + POP),
        # Our stand-in for torch._utils._rebuild_tensor_v2: new defaults, new attributes.
        "rebuild_function": ("PROTO", g("torch._utils", "_rebuild_tensor_v2") + NONE + EMPTY_DICT + s("__defaults__")
                             + tup(i(0)) + SETITEM + TUPLE2 + BUILD + POP),
        "rebuild_function_dict": ("PROTO", g("torch._utils", "_rebuild_tensor_v2") + EMPTY_DICT + s("fn") + path
                                  + SETITEM + BUILD + POP),
        # An inert class: rename it, or give every later instance new arguments.
        "inert_class": ("PROTO", g("deepspeed.runtime.zero.config", "ZeroStageEnum") + EMPTY_DICT + s("qualname")
                        + path + SETITEM + BUILD + POP),
        "builtin_type": ("PROTO", g("collections", "OrderedDict") + EMPTY_DICT + s("x") + i(1) + SETITEM + BUILD
                         + POP),
    }


@pytest.mark.parametrize("attack", ["storage_path_dict", "storage_path_slots", "dtype_singleton", "dtype_name",
                                    "rebuild_function", "rebuild_function_dict", "inert_class"])
def test_rewriting_stand_ins_is_refused(attack: str, genuine: dict[str, Any], tmp_path: Path, secret: Path) -> None:
    where, payload = _rewrites(secret)[attack]
    folder = hostile_bin_folder(tmp_path, genuine, splice_after(read_pkl(genuine["bin"]), where, payload))
    run, out, before = convert(tmp_path, folder)
    refused(run, 5, out, folder, before, "rewrite")


def test_storage_path_rewrite_in_deepspeed_rank_file(tmp_path: Path, secret: Path) -> None:
    """The realistic attack: a real ZeRO checkpoint with one rank file's pickle edited."""
    from tests.corpus import build

    folder = tmp_path / "ckpt"
    shutil.copytree(build.build_all(["llama_z1_w1_fp32"])["llama_z1_w1_fp32"] / "ckpt", folder)
    rank = next(folder.glob("global_step*/*optim_states.pt"))
    payload = EMPTY_DICT + MARK + s("path") + s(str(secret)) + s("offset") + i(0) + SETITEMS + BUILD
    rewrite(rank, rank, splice_after(read_pkl(rank), "BINPERSID", payload))
    run, out, before = convert(tmp_path, folder)
    refused(run, 5, out, folder, before, "rewrite", file=rank.name)


def test_deepspeed_partition_count_dag_is_refused(tmp_path: Path) -> None:
    """A "billion laughs" partition_count: the reader walks it to find the world size."""
    from tests.corpus import build

    folder = tmp_path / "ckpt"
    shutil.copytree(build.build_all(["llama_z1_w1_fp32"])["llama_z1_w1_fp32"] / "ckpt", folder)
    rank = next(folder.glob("global_step*/*optim_states.pt"))
    rewrite(rank, rank, insert_item(read_pkl(rank), "partition_count", dag(i(1), 60)))
    run, out, before = convert(tmp_path, folder)
    refused(run, 4, out, folder, before, "billion laughs", file=rank.name)  # a cap: exit 4 (README table)


def test_rewriting_a_tensor_ref_is_refused(genuine: dict[str, Any], tmp_path: Path, secret: Path) -> None:
    """BUILD onto the TensorRef itself: a new storage (the id of another file's) or offset."""
    entries = genuine["entries"]
    state = EMPTY_DICT + MARK + s("storage_offset") + i(0) + s("shape") + tup(i(2**20)) + SETITEMS
    pkl = state_dict(entries, override={entries[-1]["name"]: {"after": NONE + state + TUPLE2 + BUILD}})
    folder = hostile_bin_folder(tmp_path, genuine, pkl)
    run, out, before = convert(tmp_path, folder)
    refused(run, 5, out, folder, before, "rewrite the reader's own tensor reference")


def test_build_on_a_fetched_global_is_refused_before_unpickling(tmp_path: Path) -> None:
    """Memoized, fetched again, then rewritten: the pre-pass refuses it before any object exists."""
    body = g("torch._utils", "_rebuild_tensor_v2") + b"q\x00" + POP + b"h\x00" + EMPTY_DICT + s("x") + i(1) \
        + SETITEM + BUILD
    with pytest.raises(UnsafePickleError, match="after referencing it"):
        load_lazy(pickle_file(tmp_path, PROTO2 + body + STOP))


# -- class 4: impossible tensors ---------------------------------------------------------------------------

IMPOSSIBLE: dict[str, dict[str, Any]] = {
    "negative_dim": {"shape": (-1, 16), "stride": (16, 1)},
    "negative_offset": {"offset": -16},
    "string_dim": {"shape": (s("64"), 16), "stride": (16, 1)},
    "float_dim": {"shape": (f(64.0), 16), "stride": (16, 1)},
    "bool_dim": {"shape": (NEWTRUE, 16), "stride": (16, 1)},
    "past_storage": {"offset": 16},
    "stride_past_storage": {"stride": (17, 1)},
    "huge_dims": {"shape": (2**62, 2**62), "stride": (2**62, 1)},
    "dim_beyond_int64": {"shape": (2**70, 16), "stride": (16, 1)},
    "stride_count": {"stride": (16,)},
    "numel_past_member": {"numel": 10**6},
    "missing_storage": {"key": "../../secret_id_ed25519"},
    "key_not_a_string": {"key": i(0)},
    # The storage id tuple itself, without BINPERSID, where the storage should be.
    "storage_not_persistent": {"storage": tup(s("storage"), g("torch", "FloatStorage"), s("0"), s("cpu"), i(1024))},
    "storage_is_inert": {"storage": g("deepspeed.x", "Storage") + tup(s("/etc/passwd")) + REDUCE},
}


@pytest.mark.parametrize("case", sorted(IMPOSSIBLE))
def test_impossible_tensor_is_corrupt(case: str, genuine: dict[str, Any], tmp_path: Path, secret: Path) -> None:
    entries = genuine["entries"]
    first = entries[0]["name"]  # model.embed_tokens.weight, 64 x 16, storage "0"
    pkl = state_dict(entries, override={first: IMPOSSIBLE[case]})
    folder = hostile_bin_folder(tmp_path, genuine, pkl)
    run, out, before = convert(tmp_path, folder)
    refused(run, 4, out, folder, before, "")


# -- class 5: hangs and memory bombs --------------------------------------------------------------------

def _bombs(entries: list[dict]) -> dict[str, bytes]:
    first = entries[0]["name"]
    flood = EMPTY_DICT + MARK + b"".join(i((2**61 - 1) * j + 5) + NONE for j in range(1, 50_001)) + SETITEMS
    nested = EMPTY_LIST * 5_000 + APPEND * 4_999
    return {
        # Hashing a 2**64-leaf tuple DAG as a dict key: the C unpickler never returns, SIGTERM or not.
        "dag_dict_key": state_dict(entries, prefix=EMPTY_DICT + dag(s("x"), 64) + NONE + SETITEM + POP),
        "dag_set": state_dict(entries, prefix=g("builtins", "frozenset") + MARK + dag(s("x"), 64) + LIST + TUPLE1
                              + REDUCE + POP),
        "dag_storage_key": state_dict(entries, override={first: {"key": dag(s("0"), 64)}}),
        "dag_shape": state_dict(entries, override={first: {"shape": (dag(i(1), 64),)}}),
        # 50,000 int keys that all hash alike (equal modulo 2**61-1): quadratic insertion.
        "hash_flood": state_dict(entries, prefix=flood + POP),
        "deep_nesting": state_dict(entries, prefix=nested + POP),
        # The C unpickler grows its memo array to twice the largest index: 32 GiB.
        "memo_index": state_dict(entries, prefix=NONE + long_binput(0xFFFF_FFF0) + POP),
        "huge_int": state_dict(entries, prefix=i(2**4000) + POP),
    }


#: Bombs that pass a cap (expanded size, depth, integer width) are exit 4, like every cap in the README's
#: table; those that use what torch.save never writes to defeat the reader's bounds are unsafe, exit 5.
BOMB_EXIT = {"dag_dict_key": 4, "dag_set": 4, "dag_storage_key": 4, "dag_shape": 4, "deep_nesting": 4, "huge_int": 4,
             "hash_flood": 5, "memo_index": 5}


@pytest.mark.parametrize("bomb", sorted(BOMB_EXIT))
def test_pickle_bomb_is_refused_fast(bomb: str, genuine: dict[str, Any], tmp_path: Path) -> None:
    folder = hostile_bin_folder(tmp_path, genuine, _bombs(genuine["entries"])[bomb])
    run, out, before = convert(tmp_path, folder)
    refused(run, BOMB_EXIT[bomb], out, folder, before, "refused to load", max_seconds=20)


@pytest.fixture(scope="session")
def zip_bomb_stream() -> bytes:
    """A raw deflate stream of 2 GiB of zeros (about 2 MB), from one repeated fully-flushed block."""
    block, comp = bytes(64 * 2**20), zlib.compressobj(9, zlib.DEFLATED, -15)
    first = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    again = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)  # no history after a full flush: reusable
    return first + again * (2 * 2**30 // len(block) - 1) + comp.flush()


@pytest.mark.parametrize("declared", ["honest", "lying"])
def test_zip_bomb_data_pkl(declared: str, zip_bomb_stream: bytes, genuine: dict[str, Any], tmp_path: Path) -> None:
    """A ~2 MB data.pkl that inflates to 2 GiB: refused on its declared size, or cut at it.

    The CRC is left zero: reading the honest one at all would end in a CRC error, so its refusal must come
    from the declared size (a cap, exit 4: the README's table), named in the error line.
    """
    members = members_of(genuine["bin"])
    for m in members:
        if m["name"].endswith("/data.pkl"):
            size = 2 * 2**30 if declared == "honest" else len(m["data"])
            m.update(data=zip_bomb_stream, method=8, crc=0, size=size)
    folder = hostile_bin_folder(tmp_path, genuine, raw=raw_zip(members))
    run, out, before = convert(tmp_path, folder)
    refused(run, 4, out, folder, before, "more than the" if declared == "honest" else "", max_seconds=20)


def _zip_cases(genuine: dict[str, Any]) -> dict[str, bytes]:
    members = members_of(genuine["bin"])
    names = [m["name"] for m in members]
    store0 = names.index(next(n for n in names if n.endswith("/data/0")))
    out = {}
    # Two members named data/0: zipfile reads the last, torch the first.
    dup = copy.deepcopy(members)
    dup.insert(store0 + 1, {"name": names[store0], "data": bytes(len(members[store0]["data"]))})
    out["duplicate_name"] = raw_zip(dup)
    # data/0 declared long enough to cover the next member (its header and data).
    over = copy.deepcopy(members)
    over[store0]["size"] = over[store0]["csize"] = len(over[store0]["data"]) + 200
    out["overlapping_member"] = raw_zip(over)
    # The last storage declared far larger than the file.
    past = copy.deepcopy(members)
    last = max(n for n, m in enumerate(past) if "/data/" in m["name"])
    past[last]["size"] = past[last]["csize"] = 2**31
    out["member_past_end"] = raw_zip(past)
    # Two data.pkl files under different prefixes.
    two = copy.deepcopy(members) + [{"name": "other/data.pkl", "data": PROTO2 + NONE + STOP}]
    out["two_pickles"] = raw_zip(two)
    return out


@pytest.mark.parametrize("case", ["duplicate_name", "overlapping_member", "member_past_end", "two_pickles"])
def test_ambiguous_zip_is_corrupt(case: str, genuine: dict[str, Any], tmp_path: Path) -> None:
    folder = hostile_bin_folder(tmp_path, genuine, raw=_zip_cases(genuine)[case])
    run, out, before = convert(tmp_path, folder)
    refused(run, 4, out, folder, before, "")


def test_fifo_is_not_opened(tmp_path: Path) -> None:
    """A FIFO named like a torch file: refused at once, never blocking on open."""
    fifo = tmp_path / "pytorch_model.bin"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(CorruptCheckpointError, match="regular file"):
        load_lazy(fifo)
    assert time.monotonic() - started < 5


# -- in process: the batch worker reused after a poisoned job ----------------------------------------------

def _describe(obj: dict) -> list[tuple]:
    return [(name, ref.dtype.name, ref.dtype.itemsize, ref.shape, ref.stride, ref.storage_offset,
             ref.segment().offset, ref.segment().nbytes) for name, ref in obj.items()]


@pytest.mark.parametrize("attack", sorted(_rewrites(Path("/x"))))
def test_poisoned_load_then_clean_load(attack: str, genuine: dict[str, Any], tmp_path: Path, secret: Path) -> None:
    """A refused file changes nothing for the next file loaded in the same process."""
    reference = _describe(load_lazy(genuine["bin"]))
    singletons = {d.name: (d.itemsize, d.safetensors, d.storage, d.is_floating_point) for d in dtypes.ALL}
    where, payload = _rewrites(secret)[attack]
    poisoned = tmp_path / "poisoned.bin"
    rewrite(genuine["bin"], poisoned, splice_after(read_pkl(genuine["bin"]), where, payload))
    with pytest.raises(ConsolidateError) as info:
        load_lazy(poisoned)
    assert info.value.path == str(poisoned)
    assert isinstance(info.value, UnsafePickleError) or attack == "builtin_type"  # a builtin type: TypeError
    assert {d.name: (d.itemsize, d.safetensors, d.storage, d.is_floating_point) for d in dtypes.ALL} == singletons
    assert dtypes.BY_NAME["float32"] is dtypes.float32 and dtypes.float32.itemsize == 4
    assert not hasattr(__import__("collections").OrderedDict, "x")
    assert _describe(load_lazy(genuine["bin"])) == reference


# -- in process: stand-ins are immutable ---------------------------------------------------------------

def test_stand_ins_are_immutable(genuine: dict[str, Any]) -> None:
    ref = load_lazy(genuine["bin"])[genuine["entries"][0]["name"]]
    for obj, attr in ((ref, "storage_offset"), (ref.storage, "path"), (ref.storage, "offset"),
                      (dtypes.float32, "itemsize")):
        with pytest.raises(AttributeError):
            setattr(obj, attr, 0)
        with pytest.raises(UnsafePickleError):
            obj.__setstate__({attr: 0})
        assert not hasattr(obj, "__dict__")
    assert pickle.loads(pickle.dumps(dtypes.bfloat16)) is dtypes.bfloat16  # batch options cross processes
    assert copy.deepcopy(ref).segment() == ref.segment()
    with pytest.raises(CorruptCheckpointError):
        TensorRef(ref.storage, 0, (ref.storage.numel + 1,), (1,))
    with pytest.raises(CorruptCheckpointError):
        StorageRef("x", "0", "float32", 1, 0)  # a dtype name, not the DType singleton


# -- in process: what torch.save writes still loads -----------------------------------------------------

def test_real_torch_save_objects_still_load(tmp_path: Path) -> None:
    """Sets, defaultdicts, shared and strided tensors, Parameters, Namespaces, int keys: all accepted."""
    torch = pytest.importorskip("torch")
    import argparse
    import collections

    base = torch.arange(24, dtype=torch.float32)
    obj = {
        "state": {0: {"exp_avg": base[:6]}, 1: {"step": torch.tensor(3.0)}},
        "param_groups": [{"params": [0, 1], "lr": 1e-3, "betas": (0.9, 0.999), "names": {"a", "b"}}],
        "view": base.view(4, 6)[1:3], "same": base, "param": torch.nn.Parameter(torch.ones(2, 2)),
        "bf16": torch.zeros(3, dtype=torch.bfloat16), "empty": torch.empty(0), "dd": collections.defaultdict(list),
        "args": argparse.Namespace(lr=0.1, seed=2**63 - 1), "dtype": torch.float16, "big": -(2**64),
        "frozen": frozenset({1, 2}),
    }
    torch.save(obj, tmp_path / "obj.pt")
    got = load_lazy(tmp_path / "obj.pt")
    assert got["view"].shape == (2, 6) and got["view"].storage_offset == 6
    assert got["same"].storage is got["state"][0]["exp_avg"].storage
    assert got["param"].dtype is dtypes.float32 and got["bf16"].dtype is dtypes.bfloat16
    assert got["param_groups"][0]["names"] == {"a", "b"} and got["big"] == -(2**64)
    assert got["args"].state["seed"] == 2**63 - 1


def test_scan_caps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The opcode cap, and the memo/self-reference rules, on small pickles."""
    monkeypatch.setattr(pickle_scan, "MAX_OPS", 100)
    with pytest.raises(LimitExceededError, match="opcodes"):
        load_lazy(pickle_file(tmp_path, PROTO2 + (NONE + POP) * 60 + NONE + STOP))
    monkeypatch.undo()
    # A list that contains itself: memoized, fetched, then appended to.
    with pytest.raises(UnsafePickleError, match="self-referencing"):
        load_lazy(pickle_file(tmp_path, PROTO2 + EMPTY_LIST + b"q\x00" + b"h\x00" + APPEND + STOP))


def test_dag_key_refused_in_process_quickly(genuine: dict[str, Any], tmp_path: Path) -> None:
    """The 2**64-leaf DAG key is refused in the pre-pass, in well under a second, in this process."""
    pkl = _bombs(genuine["entries"])["dag_dict_key"]
    path = tmp_path / "dag.bin"
    rewrite(genuine["bin"], path, pkl)
    result: list[BaseException] = []

    def load() -> None:
        try:
            load_lazy(path)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            result.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "the DAG key hangs the unpickler"
    assert isinstance(result[0], LimitExceededError)  # a cap: exit 4


# -- batch: a poisoned job cannot affect a clean job in the same worker process ------------------------------

@pytest.mark.parametrize("attack", ["dtype_singleton", "rebuild_function", "inert_class"])
def test_batch_poisoned_job_then_clean_job_in_one_worker(attack: str, genuine: dict[str, Any], tmp_path: Path,
                                                         secret: Path) -> None:
    """``--max-workers 1`` runs both jobs in one worker, the poisoned one first (inputs sort by name)."""
    from safetensors.numpy import load_file

    where, payload = _rewrites(secret)[attack]
    runs = tmp_path / "runs"
    shutil.copytree(genuine["folder"], runs / "b_clean")
    (runs / "a_poisoned").mkdir(parents=True)
    rewrite(genuine["bin"], runs / "a_poisoned" / "pytorch_model.bin", splice_after(read_pkl(genuine["bin"]), where,
                                                                                    payload))
    shutil.copy(genuine["folder"] / "config.json", runs / "a_poisoned" / "config.json")
    out = tmp_path / "out"
    before = {str(runs): snapshot(runs)}
    report = tmp_path / "report.json"
    run = run_cli(["batch", "--input-dir", str(runs), "--output-dir", str(out), "--max-workers", "1",
                   "--continue-on-error", "--naming-template", "{input_name}", "--report", str(report),
                   "--base-model-name", ""], timeout=180)
    assert run.code == 11, run.stderr[-3000:]
    jobs = {Path(j["output"]).name: j for j in json.loads(report.read_text())["jobs"]}
    assert jobs["a_poisoned"]["status"] == "failed" and jobs["b_clean"]["status"] == "done", jobs
    assert not (out / "a_poisoned").exists()
    # The clean job's output: every tensor equal to the genuine state dict (bit for bit, fp32).
    torch = pytest.importorskip("torch")
    truth = torch.load(genuine["bin"], weights_only=True)
    got = load_file(out / "b_clean" / "model.safetensors")
    tied = {"lm_head.weight"} if "lm_head.weight" not in got else set()
    assert set(got) | tied == set(truth)
    for name, arr in got.items():
        assert np.array_equal(arr, truth[name].numpy()), name
    assert snapshot(runs) == before[str(runs)]
    assert not [p for p in out.rglob("*") if p.is_file() and SECRET[:40] in p.read_bytes()]
