"""Hostile FSDP inputs (issue 11): torch.distributed.checkpoint folders and verl rank files.

Every case starts from a real corpus checkpoint (``tests/corpus/fsdp_build.py``), copied into the
test's own folder, and damages it as an attacker would: files deleted, truncated, replaced by FIFOs,
symlinks or sparse giants; pickles edited opcode by opcode (``pickletools`` to find them, raw bytes to
replace them); ``torch.save`` archives inside a ``.distcp`` patched in place with their zip CRCs
fixed. Nothing of the package is used to build an input.

Each case runs the CLI as a user would (:func:`tests.hostile.run_cli`: a subprocess under a 6 GiB
address-space cap) and checks with :func:`tests.hostile.assert_refused`: the documented exit code
(4 corrupt or unsupported, 5 unsafe), exactly one ``error:`` line that names the file, nothing
published, no leftovers, the input unchanged, no byte of a secret file anywhere next to the output.
Each refusal must also be fast and small (:data:`MAX_SECONDS`, :data:`MAX_RSS`); the wall time and
peak RSS of every run are printed at the end of the module.

"""

from __future__ import annotations

import io
import json
import os
import pickletools
import shutil
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.hostile import SECRET, CliRun, assert_refused, run_cli, snapshot, write_secret
from tests.hostile import op_global as glob
from tests.hostile import op_int as i
from tests.hostile import op_str as s

NO_VALIDATE = "--no-validate-vllm"
DCP = "dcp_qwen2_w2_nested_tied"  # ckpt/step-2, ckpt/step-4: .metadata + __0_0.distcp + __1_0.distcp
TRAINER = "trainer_fsdp_qwen2_tied"  # run/checkpoint-{2,4}/pytorch_model_fsdp_0 (+ optimizer_0), HF Trainer
VERL = "verl_qwen2_w2_tied"  # ckpt/global_step_{1,2}/actor, latest_checkpointed_iteration.txt -> 2
VERL_LLAMA = "verl_llama_w2_critic"  # other key set (no attention biases)
VERL_HSDP = "verl_qwen2_w2_hsdp"  # other placements: (Replicate(), Shard(0)) on a 2x1 mesh
TRACKER = "latest_checkpointed_iteration.txt"
#: Bounds on every refusal below (the CLI without validation: ~1 s and ~100 MiB when idle).
MAX_SECONDS = 15.0
#: A FIFO must be refused, never waited on: what such a test checks is that the CLI returns at all. The
#: bound is one a loaded, shared 2-core machine meets (an idle one takes ~1 s); a run that blocks is
#: killed at run_cli's time-out (60 s) and fails with the time it took.
HANG_SECONDS = 30.0
MAX_RSS = 300 * 2**20
#: (test, exit code, seconds, peak RSS, error line) of every refused run, printed when the module ends.
RUNS: list[tuple[str, int, float, int, str]] = []


# -- pickle opcodes ------------------------------------------------------------------------------------

MARK, STOP, POP, DUP, TUPLE1, TUPLE2, REDUCE, BUILD = b"(", b".", b"0", b"2", b"\x85", b"\x86", b"R", b"b"
EMPTY_DICT, EMPTY_LIST, SETITEM, SETITEMS, APPENDS, NONE, STACK_GLOBAL = b"}", b"]", b"s", b"u", b"e", b"N", b"\x93"
PROTO2, TUPLE, EMPTY_TUPLE, NEWOBJ, LONG_BINPUT, LONG_BINGET = b"\x80\x02", b"t", b")", b"\x81", b"r", b"j"


def stack_glob(module: str, name: str) -> bytes:
    """STACK_GLOBAL (protocol 4: the names are strings on the stack, not in the opcode)."""
    return s(module) + s(name) + STACK_GLOBAL


def ops(data: bytes) -> list[tuple[str, object, int, int]]:
    """(opcode name, argument, start, end) of every opcode up to STOP."""
    listed = [(op.name, arg, pos) for op, arg, pos in pickletools.genops(data)]
    ends = [pos for _, _, pos in listed[1:]] + [listed[-1][2] + 1]
    return [(name, arg, pos, end) for (name, arg, pos), end in zip(listed, ends)]


def unframe(data: bytes) -> bytes:
    """A protocol-4 pickle without its FRAME opcodes (they are optional), so opcodes can be spliced freely."""
    out, last = [], 0
    for name, _, pos, end in ops(data):
        if name == "FRAME":
            out.append(data[last:pos])
            last = end
    return b"".join(out) + data[last:]


def splice(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """Replace ``data[start:end]`` by ``new`` for each (start, end, new); ranges must not overlap."""
    for start, end, new in sorted(edits, reverse=True):
        data = data[:start] + new + data[end:]
    return data


def find(data: bytes, name: str, arg: object = None) -> tuple[int, int]:
    """(start, end) of the first opcode ``name`` (with argument ``arg`` when given)."""
    return next((pos, end) for n, a, pos, end in ops(data) if n == name and (arg is None or a == arg))


def after_proto(data: bytes, payload: bytes) -> bytes:
    """``payload`` (which must leave the stack as it found it) right after the PROTO opcode."""
    _, end = find(data, "PROTO")
    return data[:end] + payload + data[end:]


def int_tuples(data: bytes, values: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Every ``(a, b)`` pushed as two int opcodes and TUPLE2: (start/end of the first int, of the second)."""
    listed = ops(data)
    hits = []
    for k in range(len(listed) - 2):
        (n1, a1, p1, e1), (n2, a2, p2, e2), (n3, *_rest) = listed[k:k + 3]
        if n1.startswith("BININT") and n2.startswith("BININT") and n3 == "TUPLE2" and (a1, a2) == values:
            hits.append((p1, e1, p2, e2))
    return hits


def binint(n: int) -> bytes:
    """The shortest BININT opcode for a non-negative ``n`` (as pickle writes it)."""
    if n < 256:
        return b"K" + bytes([n])
    if n < 65536:
        return b"M" + struct.pack("<H", n)
    return b"J" + struct.pack("<i", n)


def strings(listed: list[tuple[str, object, int, int]]) -> list[str | None]:
    """The string each opcode pushes, memo fetches resolved (None for anything else).

    A protocol-4 pickle names a string once and fetches it from the memo afterwards; MEMOIZE stores
    the object just pushed, so tracking strings through it is enough for the records DCP writes.
    """
    memo: list[str | None] = []
    out: list[str | None] = []
    for name, arg, _, _ in listed:
        value = None
        if name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            value = arg
        elif name in ("BINGET", "LONG_BINGET"):
            value = memo[arg] if arg < len(memo) else None
        elif name == "MEMOIZE":
            memo.append(out[-1] if out else None)
        elif name in ("BINPUT", "LONG_BINPUT"):
            memo.extend([None] * (arg + 1 - len(memo)))
            memo[arg] = out[-1] if out else None
        out.append(value)
    return out


def storage_entries(data: bytes) -> list[dict]:
    """Every entry of a ``.metadata``'s ``storage_data``, in file order: the chunk's tensor (``fqn``), its
    file (and the (start, end) of the opcode that names it, often a memo fetch), and the opcodes
    (start, end, value) of its byte ``offset`` and ``length`` in that file.

    Each entry is ``MetadataIndex(fqn=..., offset=..., index=...)`` (built with BUILD) followed by
    ``_StorageInfo`` whose dict state is ``{relative_path, offset, length}``: its two ints, in order.
    """
    text = strings(ops(data))
    # Without the memo stores, each key is followed by its value.
    listed = [(o, v) for o, v in zip(ops(data), text) if o[0] not in ("MEMOIZE", "BINPUT", "LONG_BINPUT")]
    start = next(k for k, (_, v) in enumerate(listed) if v == "storage_data")
    out = []
    for k in range(start, len(listed)):
        if listed[k - 1][1] == "fqn" and listed[k][1] is not None:
            build = next(j for j in range(k, len(listed)) if listed[j][0][0] == "BUILD")
            mark = next(j for j in range(build, len(listed)) if listed[j][0][0] == "MARK")
            close = next(j for j in range(mark, len(listed)) if listed[j][0][0] == "SETITEMS")
            ints = [(pos, end, arg) for (name, arg, pos, end), _ in listed[mark:close]
                    if name.startswith("BININT") or name == "LONG1"]
            path = next(j + 1 for j in range(mark, close) if listed[j][1] == "relative_path")
            assert len(ints) == 2, listed[mark:close]
            out.append({"fqn": listed[k][1], "file": listed[path][1], "file_op": listed[path][0][2:4],
                        "offset": ints[0], "length": ints[1]})
    return out


#: A chunk as ``build_metadata`` takes it: (offsets, sizes, storage file, byte offset, byte length).
Chunk = tuple[tuple[int, ...], tuple[int, ...], str, int, int]


def build_metadata(tensors: dict[str, tuple[tuple[int, ...], list[Chunk]]]) -> bytes:
    """A whole ``.metadata``, opcode by opcode: float32 tensors ``{fqn: (shape, chunks)}``, no planner data.

    The records are those ``dcp.save`` writes (``Metadata``, ``TensorStorageMetadata``, ``TensorProperties``,
    ``ChunkStorageMetadata``, ``MetadataIndex``, ``_StorageInfo``), each built as ``cls()`` then BUILD with
    its fields; classes and repeated strings are named once, up front, and fetched from the memo after.
    """
    memo: dict[object, int] = {}
    prologue: list[bytes] = []  # each class or string pushed, memoized (indices in order) and popped

    def once(key: object, first: bytes) -> bytes:
        if key not in memo:
            memo[key] = len(memo)
            prologue.append(first + LONG_BINPUT + struct.pack("<I", memo[key]) + POP)
        return LONG_BINGET + struct.pack("<I", memo[key])

    def text(value: str) -> bytes:
        return once(("str", value), s(value))

    def cls(module: str, name: str) -> bytes:
        return once((module, name), glob(module, name))

    def record(name: str, fields: list[tuple[str, bytes]], module: str = "torch.distributed.checkpoint.metadata",
               ) -> bytes:
        state = b"".join(text(k) + v for k, v in fields)
        return cls(module, name) + EMPTY_TUPLE + NEWOBJ + EMPTY_DICT + MARK + state + SETITEMS + BUILD

    def size(dims: tuple[int, ...]) -> bytes:
        return cls("torch", "Size") + MARK + b"".join(binint(d) for d in dims) + TUPLE + TUPLE1 + REDUCE

    entries, index = [], []
    for fqn, (shape, chunks) in tensors.items():
        props = cls("torch.distributed.checkpoint.metadata", "TensorProperties") + EMPTY_TUPLE + NEWOBJ \
            + cls("torch", "float32") + TUPLE1 + BUILD
        boxes = [record("ChunkStorageMetadata", [("offsets", size(o)), ("sizes", size(z))]) for o, z, *_ in chunks]
        entries.append(text(fqn) + record("TensorStorageMetadata", [
            ("properties", props), ("size", size(shape)), ("chunks", EMPTY_LIST + MARK + b"".join(boxes) + APPENDS)]))
        for offsets, _, file, start, length in chunks:
            index.append(record("MetadataIndex", [("fqn", text(fqn)), ("offset", size(offsets)), ("index", NONE)])
                         + record("_StorageInfo", [("relative_path", text(file)), ("offset", binint(start)),
                                                   ("length", binint(length))],
                                  module="torch.distributed.checkpoint.filesystem"))
    body = record("Metadata", [("state_dict_metadata", EMPTY_DICT + MARK + b"".join(entries) + SETITEMS),
                               ("storage_data", EMPTY_DICT + MARK + b"".join(index) + SETITEMS)])
    return PROTO2 + b"".join(prologue) + body + STOP


# -- zips ----------------------------------------------------------------------------------------------

def rewrite_pkl(path: Path, change: Callable[[bytes], bytes]) -> None:
    """Rewrite a torch zip member by member with the standard zipfile module, its data.pkl changed."""
    with zipfile.ZipFile(path) as zf:
        members = [(info.filename, zf.read(info)) for info in zf.infolist()]
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
        for name, data in members:
            zout.writestr(name, change(data) if name.endswith("/data.pkl") else data)
    os.replace(tmp, path)


def first_archive(raw: bytes) -> int:
    """Length of the torch.save archive at the start of a ``.distcp`` (up to its end-of-directory record)."""
    end = raw.index(b"PK\x05\x06")
    return end + 22 + struct.unpack("<H", raw[end + 20:end + 22])[0]


def patch_chunk_pickle(distcp: Path, old: bytes, new: bytes) -> None:
    """In the first archive of a ``.distcp``, replace ``old`` by ``new`` (same length) in data.pkl, in place.

    The member's CRC-32 is fixed everywhere the zip records it (central directory, local header, data
    descriptor), so the archive stays valid for any zip reader, and every byte offset stays the same.
    """
    assert len(old) == len(new)
    raw = bytearray(distcp.read_bytes())
    length = first_archive(bytes(raw))
    archive = bytes(raw[:length])
    zf = zipfile.ZipFile(io.BytesIO(archive))
    info = next(m for m in zf.infolist() if m.filename.endswith("/data.pkl"))
    assert info.compress_type == zipfile.ZIP_STORED
    data = zf.read(info)
    assert data.count(old) == 1, f"{old!r} occurs {data.count(old)} times"
    patched = data.replace(old, new)
    crc = struct.pack("<I", zlib.crc32(patched))
    local = info.header_offset
    name_len, extra_len = struct.unpack("<HH", archive[local + 26:local + 30])
    start = local + 30 + name_len + extra_len
    raw[start:start + len(data)] = patched
    if archive[local + 14:local + 18] != b"\0\0\0\0":
        raw[local + 14:local + 18] = crc
    if archive[start + len(data):start + len(data) + 4] == b"PK\x07\x08":
        raw[start + len(data) + 4:start + len(data) + 8] = crc
    pos = zf.start_dir
    while archive[pos:pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack("<HHH", archive[pos + 28:pos + 34])
        if archive[pos + 46:pos + 46 + n].decode() == info.filename:
            raw[pos + 16:pos + 20] = crc
            break
        pos += 46 + n + m + k
    else:
        raise AssertionError("no central directory entry for data.pkl")
    distcp.write_bytes(bytes(raw))
    with zipfile.ZipFile(io.BytesIO(bytes(raw[:length]))) as check:
        assert check.read(info.filename) == patched  # the CRC now matches


# -- running -------------------------------------------------------------------------------------------

def _out(tmp_path: Path) -> Path:
    """The output, in a folder of its own: the secret checks scan the output's parent, not the input."""
    (tmp_path / "o").mkdir(exist_ok=True)
    return tmp_path / "o" / "out"


def convert(inp: Path, out: Path, *extra: str) -> CliRun:
    return run_cli(["convert", "--input", str(inp), "--output", str(out), NO_VALIDATE, *extra])


def attempt(inp: Path, tmp_path: Path, *extra: str) -> tuple[CliRun, Path, dict]:
    """Convert ``inp`` (snapshotted first) into a fresh output."""
    before, out = snapshot(inp), _out(tmp_path)
    return convert(inp, out, *extra), out, before


def refused(request: pytest.FixtureRequest, run: CliRun, code: int, inp: Path, out: Path, before: dict,
            message: str, names: str | list[str], max_seconds: float = MAX_SECONDS) -> None:
    """:func:`assert_refused`; the error line names every file in ``names``; time and memory are small."""
    error = next((ln for ln in run.stderr.splitlines() if ln.startswith("error:")), "")
    RUNS.append((request.node.name, run.code, run.seconds, run.peak_rss, error))
    assert_refused(run, code, output=out, inputs=[inp], before={str(inp): before}, message=message,
                   max_seconds=max_seconds)
    for name in [names] if isinstance(names, str) else names:
        assert name in error, f"{name!r} not named in {error!r}"
    assert 0 < run.peak_rss < MAX_RSS, f"peak RSS {run.peak_rss / 2**20:.0f} MiB"


@pytest.fixture(scope="module", autouse=True)
def _report_runs(request: pytest.FixtureRequest):
    """Print the wall time and peak RSS of every refusal when the module ends."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not RUNS:
        return
    with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
        reporter.write_line("")
        reporter.write_line(f"hostile FSDP refusals: {len(RUNS)} runs, max {max(r[2] for r in RUNS):.2f} s, "
                            f"max {max(r[3] for r in RUNS) / 2**20:.0f} MiB peak RSS")
        for name, code, seconds, rss, error in sorted(RUNS, key=lambda r: -r[2]):
            reporter.write_line(f"  {seconds:6.2f} s {rss / 2**20:6.0f} MiB  exit {code:3d}  {name}")
            if request.config.getoption("verbose") > 0:
                reporter.write_line(f"      {error[:300]}")


# -- fixtures ------------------------------------------------------------------------------------------

@pytest.fixture
def secret(tmp_path: Path) -> Path:
    return write_secret(tmp_path)


@pytest.fixture
def marker(tmp_path: Path):
    """A path a payload would create if it ran; checked absent after the test."""
    path = tmp_path / "PAYLOAD_RAN"
    yield path
    assert not path.exists(), "the pickle's payload ran"


def _copy(fsdp_corpus: dict[str, Path], case: str, dst: Path, sub: str = "ckpt") -> Path:
    shutil.copytree(fsdp_corpus[case] / sub, dst, symlinks=True)
    return dst


@pytest.fixture
def dcp(fsdp_corpus: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of a DCP run folder; the newest save (the one converted) is ``step-4``."""
    return _copy(fsdp_corpus, DCP, tmp_path / "in" / "dcp")


@pytest.fixture
def trainer(fsdp_corpus: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of an HF Trainer FSDP run; the newest checkpoint is ``checkpoint-4``."""
    return _copy(fsdp_corpus, TRAINER, tmp_path / "in" / "run", sub="run")


@pytest.fixture
def verl(fsdp_corpus: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of a verl run folder; the tracker names ``global_step_2``."""
    return _copy(fsdp_corpus, VERL, tmp_path / "in" / "verl")


def step4(dcp: Path) -> Path:
    return dcp / "step-4"


def actor(verl: Path) -> Path:
    return verl / "global_step_2" / "actor"


def rank(verl: Path, r: int, world: int = 2) -> Path:
    return actor(verl) / f"model_world_size_{world}_rank_{r}.pt"


def edit_metadata(dcp: Path, change: Callable[[bytes], bytes]) -> Path:
    """Rewrite step-4's ``.metadata`` (unframed first, so it may change length)."""
    meta = step4(dcp) / ".metadata"
    meta.write_bytes(change(unframe(meta.read_bytes())))
    return meta


# -- controls: the copies and the editing tools keep a checkpoint valid -----------------------------------

def test_undamaged_copies_convert(dcp: Path, verl: Path, trainer: Path, tmp_path: Path) -> None:
    for inp in (dcp, verl, trainer):
        run = convert(inp, tmp_path / "o" / inp.name)
        assert run.code == 0, run.stderr[-2000:]


def test_editing_tools_keep_checkpoints_valid(dcp: Path, verl: Path, tmp_path: Path) -> None:
    """Unframed metadata, a re-zipped rank file and a CRC-patched chunk (identical bytes) still convert."""
    edit_metadata(dcp, lambda data: data)
    patch_chunk_pickle(step4(dcp) / "__0_0.distcp", b"FloatStorage", b"FloatStorage")
    rewrite_pkl(rank(verl, 1), lambda data: data)
    for inp in (dcp, verl):
        run = convert(inp, tmp_path / "o" / inp.name)
        assert run.code == 0, run.stderr[-2000:]


# -- DCP 1-2: missing and truncated storage files -----------------------------------------------------------

def test_missing_distcp_is_named(dcp: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    (step4(dcp) / "__1_0.distcp").unlink()
    run, out, before = attempt(dcp, tmp_path)
    refused(request, run, 4, dcp, out, before, "missing: __1_0.distcp", ".metadata")


def test_truncated_distcp_is_named(dcp: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Cut in the middle of the first chunk (the embedding's archive)."""
    distcp = step4(dcp) / "__1_0.distcp"
    length = first_archive(distcp.read_bytes())
    with open(distcp, "r+b") as fh:
        fh.truncate(length // 2)
    run, out, before = attempt(dcp, tmp_path)
    refused(request, run, 4, dcp, out, before, "truncated", "__1_0.distcp")


def test_distcp_fifo_does_not_block(dcp: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    distcp = step4(dcp) / "__0_0.distcp"
    distcp.unlink()
    os.mkfifo(distcp)
    run, out, before = attempt(dcp, tmp_path)
    refused(request, run, 4, dcp, out, before, "not a regular file", "__0_0.distcp", max_seconds=HANG_SECONDS)


# -- DCP 3: storage files outside the folder -----------------------------------------------------------

@pytest.mark.parametrize("name", ["../secret.distcp", "ABSOLUTE", "..", "sub/__0_0.distcp", "..\\__0_0.distcp",
                                  "__0_0.distcp\0"])
def test_metadata_naming_a_path_is_refused(name: str, dcp: Path, tmp_path: Path, secret: Path,
                                           request: pytest.FixtureRequest) -> None:
    """The first chunk's ``relative_path`` (memoized: every chunk of that file follows it) names a path."""
    (tmp_path / "in" / "secret.distcp").write_bytes(SECRET)
    (step4(dcp) / "sub").mkdir()
    shutil.copyfile(step4(dcp) / "__0_0.distcp", step4(dcp) / "sub" / "__0_0.distcp")
    name = str(secret) if name == "ABSOLUTE" else name
    edit_metadata(dcp, lambda data: splice(data, [(*find(data, "SHORT_BINUNICODE", "__0_0.distcp"), s(name))]))
    run, out, before = attempt(dcp, tmp_path)
    refused(request, run, 4, dcp, out, before, "not a file name in the folder", ".metadata")
    assert SECRET[:40].decode() not in run.stderr + run.stdout


def test_distcp_symlink_out_of_the_input_is_refused(dcp: Path, tmp_path: Path, secret: Path,
                                                    request: pytest.FixtureRequest) -> None:
    distcp = step4(dcp) / "__1_0.distcp"
    # "secret" in its name: the secret scans of every later test sharing pytest's base folder skip it.
    outside = secret.parent / f"secret_{distcp.name}"
    outside.write_bytes(distcp.read_bytes() + SECRET)
    distcp.unlink()
    distcp.symlink_to(outside)
    run, out, before = attempt(dcp, tmp_path)
    refused(request, run, 5, dcp, out, before, "outside the model folder", "__1_0.distcp")


def test_distcp_symlink_inside_the_input_is_followed(dcp: Path, tmp_path: Path) -> None:
    distcp = step4(dcp) / "__1_0.distcp"
    (dcp / "blobs").mkdir()
    os.rename(distcp, dcp / "blobs" / "abc123")
    distcp.symlink_to(Path("..") / "blobs" / "abc123")
    run = convert(dcp, _out(tmp_path))
    assert run.code == 0, run.stderr[-2000:]


def test_newest_save_linking_out_is_refused(dcp: Path, tmp_path: Path, secret: Path,
                                            request: pytest.FixtureRequest) -> None:
    outside = secret.parent / "step-9"
    shutil.copytree(step4(dcp), outside)
    (dcp / "step-9").symlink_to(outside)
    run, out, before = attempt(dcp, tmp_path)
    refused(request, run, 5, dcp, out, before, "outside", "step-9")


def test_trainer_model_folder_linking_out_is_refused(trainer: Path, tmp_path: Path, secret: Path,
                                                     request: pytest.FixtureRequest) -> None:
    model = trainer / "checkpoint-4" / "pytorch_model_fsdp_0"
    outside = secret.parent / model.name
    shutil.move(model, outside)
    model.symlink_to(outside)
    run, out, before = attempt(trainer, tmp_path)
    refused(request, run, 5, trainer, out, before, "outside", "pytorch_model_fsdp_0")


def test_trainer_metadata_payload_is_refused(trainer: Path, tmp_path: Path, marker: Path,
                                             request: pytest.FixtureRequest) -> None:
    meta = trainer / "checkpoint-4" / "pytorch_model_fsdp_0" / ".metadata"
    payload = glob("os", "system") + s(f"touch {marker}") + TUPLE1 + REDUCE + POP
    meta.write_bytes(after_proto(unframe(meta.read_bytes()), payload))
    run, out, before = attempt(trainer, tmp_path)
    refused(request, run, 5, trainer, out, before, "not on the allowlist", "pytorch_model_fsdp_0/.metadata")


def test_metadata_symlink_out_of_the_input_is_refused(dcp: Path, tmp_path: Path, secret: Path,
                                                      request: pytest.FixtureRequest) -> None:
    meta = step4(dcp) / ".metadata"
    outside = secret.parent / ".metadata"
    os.rename(meta, outside)
    meta.symlink_to(outside)
    run, out, before = attempt(dcp, tmp_path)
    refused(request, run, 5, dcp, out, before, "outside", ".metadata")


# -- DCP 4: what the .metadata pickle may name --------------------------------------------------------------

def _payloads(marker: Path) -> dict[str, bytes]:
    """Each leaves the stack as it found it; spliced in right after PROTO."""
    cmd = s(f"touch {marker}")
    tuples = b"".join(binint(k % 256) + binint(k // 256) + TUPLE2 for k in range(50_000))
    tuple_keys = b"".join(binint(k % 256) + binint(k // 256) + TUPLE2 + NONE for k in range(50_000))
    colliding = b"".join(i((2**61 - 1) * k + 5) + NONE for k in range(1, 50_001))
    pairs = b"".join(binint(k % 256) + binint(k // 256) + TUPLE2 + NONE + TUPLE2 for k in range(50_000))
    rewrite = EMPTY_DICT + s("qualname") + s("x") + SETITEM + BUILD + POP
    return {
        "os_system_global": glob("os", "system") + cmd + TUPLE1 + REDUCE + POP,
        "os_system_stack_global": stack_glob("os", "system") + cmd + TUPLE1 + REDUCE + POP,
        "posix_system_stack_global": stack_glob("posix", "system") + cmd + TUPLE1 + REDUCE + POP,
        "builtins_exec_stack_global": stack_glob("builtins", "exec") + s(f"open({str(marker)!r}, 'w')") + TUPLE1
        + REDUCE + POP,
        "tensor_rebuild_stack_global": stack_glob("torch._utils", "_rebuild_tensor_v2") + POP,
        # The identity-only allowlist: a set or dict built from tuples would hash them (hash flooding).
        "builtins_set_stack_global": stack_glob("builtins", "set") + EMPTY_LIST + MARK + tuples + APPENDS + TUPLE1
        + REDUCE + POP,
        "builtins_dict_stack_global": stack_glob("builtins", "dict") + EMPTY_LIST + MARK + pairs + APPENDS + TUPLE1
        + REDUCE + POP,
        "hash_flood_tuple_keys": EMPTY_DICT + MARK + tuple_keys + SETITEMS + POP,
        "hash_flood_colliding_ints": EMPTY_DICT + MARK + colliding + SETITEMS + POP,
        "billion_laughs": s("x") + (DUP + TUPLE2) * 64 + POP,
        # BUILD onto the reader's stand-ins: an inert class, a torch.Size, a dtype.
        "build_on_inert_class": stack_glob("torch.distributed.checkpoint.metadata", "Metadata") + rewrite,
        "build_on_size": stack_glob("torch", "Size") + binint(1) + TUPLE1 + TUPLE1 + REDUCE + EMPTY_DICT
        + s("values") + binint(7) + TUPLE1 + SETITEM + BUILD + POP,
        "build_on_dtype": stack_glob("torch", "float32") + NONE + EMPTY_DICT + s("name") + s("uint8") + SETITEM
        + TUPLE2 + BUILD + POP,
    }


METADATA_ATTACKS = {
    "os_system_global": "not on the allowlist",
    "os_system_stack_global": "not on the allowlist",
    "posix_system_stack_global": "not on the allowlist",
    "builtins_exec_stack_global": "not on the allowlist",
    "tensor_rebuild_stack_global": "not on the allowlist",
    "builtins_set_stack_global": "not on the allowlist",
    "builtins_dict_stack_global": "not on the allowlist",
    "hash_flood_tuple_keys": "dict key",
    "hash_flood_colliding_ints": "dict key",
    "billion_laughs": "billion laughs",
    "build_on_inert_class": "rewrite the reader's own inert class",
    "build_on_size": "rewrite the reader's own size",
    "build_on_dtype": "rewrite the reader's own dtype",
}


@pytest.mark.parametrize("attack", sorted(METADATA_ATTACKS))
def test_hostile_metadata_pickle_is_refused(attack: str, dcp: Path, tmp_path: Path, marker: Path,
                                            request: pytest.FixtureRequest) -> None:
    payload = _payloads(marker)[attack]
    edit_metadata(dcp, lambda data: after_proto(data, payload))
    run, out, before = attempt(dcp, tmp_path)
    code = 4 if attack == "billion_laughs" else 5  # a cap (the expanded size) is exit 4, as in the README's table
    refused(request, run, code, dcp, out, before, METADATA_ATTACKS[attack], ".metadata")
    assert "refused to load" in run.stderr


# -- DCP 5: chunks that do not tile their tensor, or disagree with their archives ------------------------------

def _second_embedding_chunk_at(row: int) -> Callable[[bytes], bytes]:
    """Every (501, 0) offset (the embedding's second chunk, in its chunk list and storage key, and its
    optimizer state's) moved to (row, 0)."""
    def change(data: bytes) -> bytes:
        hits = int_tuples(data, (501, 0))
        assert len(hits) >= 2, hits  # the chunk and its MetadataIndex key, at least
        return splice(data, [(p1, e1, binint(row)) for p1, e1, _, _ in hits])
    return change


def _second_embedding_chunk_rows(rows: int) -> Callable[[bytes], bytes]:
    """The embedding's second chunk (and its optimizer state's) declared ``rows`` rows long, not 500."""
    def change(data: bytes) -> bytes:
        hits = int_tuples(data, (500, 128))
        assert hits, "no (500, 128) chunk sizes"
        return splice(data, [(p1, e1, binint(rows)) for p1, e1, _, _ in hits])
    return change


def test_overlapping_chunks_are_refused(dcp: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Rows 0..501 and 500..1000 of a 1001-row embedding: the sizes still add up, row 500 is stored twice."""
    edit_metadata(dcp, _second_embedding_chunk_at(500))
    run, out, before = attempt(dcp, tmp_path)
    refused(request, run, 4, dcp, out, before, "overlap", "model.embed_tokens.weight")
    assert ".metadata]" in run.stderr  # the error line names the file


def test_chunks_leaving_a_gap_are_refused(dcp: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The second chunk declared 499 rows: row 1000 is in no chunk."""
    edit_metadata(dcp, _second_embedding_chunk_rows(499))
    run, out, before = attempt(dcp, tmp_path)
    refused(request, run, 4, dcp, out, before, "do not add up", ".metadata")


def test_chunk_past_the_tensor_is_refused(dcp: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    edit_metadata(dcp, _second_embedding_chunk_rows(501))
    run, out, before = attempt(dcp, tmp_path)
    refused(request, run, 4, dcp, out, before, "does not fit its shape", ".metadata")


def test_chunk_archive_of_another_dtype_is_refused(dcp: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The embedding's first chunk re-typed int16 (same byte length, CRC fixed): the .metadata says float32."""
    patch_chunk_pickle(step4(dcp) / "__0_0.distcp", b"torch\nFloatStorage\n", b"torch\nShortStorage\n")
    run, out, before = attempt(dcp, tmp_path)
    refused(request, run, 4, dcp, out, before, "holds torch.int16, the .metadata says torch.float32", "__0_0.distcp")


def test_chunk_archive_of_another_shape_is_refused(dcp: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The embedding's first chunk re-shaped (501, 128) -> (500, 128) in its archive; the .metadata says 501 rows."""
    patch_chunk_pickle(step4(dcp) / "__0_0.distcp", b"M\xf5\x01K\x80\x86", b"M\xf4\x01K\x80\x86")
    run, out, before = attempt(dcp, tmp_path)
    refused(request, run, 4, dcp, out, before, "holds a tensor of shape (500, 128)", "__0_0.distcp")


def test_chunk_offset_into_another_archive_is_refused(dcp: Path, tmp_path: Path,
                                                      request: pytest.FixtureRequest) -> None:
    """The first chunk's storage offset moved 1 byte on: no archive starts there."""
    def change(data: bytes) -> bytes:
        first = storage_entries(data)[0]
        assert (first["fqn"], first["file"], first["offset"][2]) == ("model.model.embed_tokens.weight",
                                                                     "__0_0.distcp", 0), first
        return splice(data, [(*first["offset"][:2], binint(1))])
    edit_metadata(dcp, change)
    run, out, before = attempt(dcp, tmp_path)
    refused(request, run, 4, dcp, out, before, "", "__0_0.distcp")


def test_storage_entry_length_past_the_file(dcp: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The first chunk's length declared 1 TiB."""
    def change(data: bytes) -> bytes:
        first = storage_entries(data)[0]
        return splice(data, [(*first["length"][:2], i(2**40))])
    edit_metadata(dcp, change)
    run, out, before = attempt(dcp, tmp_path)
    refused(request, run, 4, dcp, out, before, "truncated", "__0_0.distcp")


def test_chunks_shared_by_tensors_of_other_shapes(dcp: Path, tmp_path: Path,
                                                  request: pytest.FixtureRequest) -> None:
    """model.norm.weight (128,) pointed at the embedding's two archives (1001, 128): not a tied weight."""
    def change(data: bytes) -> bytes:
        entries = storage_entries(data)
        embed = {e["file"]: e for e in entries if e["fqn"] == "model.model.embed_tokens.weight"}
        norm = [e for e in entries if e["fqn"] == "model.model.norm.weight"]
        assert len(norm) == 2 and {e["file"] for e in norm} == set(embed), (norm, embed)
        return splice(data, [(*e["offset"][:2], binint(embed[e["file"]]["offset"][2])) for e in norm])
    edit_metadata(dcp, change)
    run, out, before = attempt(dcp, tmp_path)
    refused(request, run, 4, dcp, out, before, "model.model.norm.weight", ".distcp")


def _point_chunk_at(data: bytes, fqn: str, k: int, file: str, offset: int) -> bytes:
    """The storage entry of ``fqn``'s ``k``-th chunk (file order) moved to ``offset`` in ``file``."""
    entry = [e for e in storage_entries(data) if e["fqn"] == fqn][k]
    return splice(data, [(*entry["file_op"], s(file)), (*entry["offset"][:2], binint(offset))])


K_PROJ, V_PROJ = "model.model.layers.0.self_attn.k_proj.weight", "model.model.layers.0.self_attn.v_proj.weight"


@pytest.mark.parametrize("target", ["sibling", "other_tensor", "inside_other_archive"])
def test_chunks_sharing_bytes_are_refused(target: str, dcp: Path, tmp_path: Path,
                                          request: pytest.FixtureRequest) -> None:
    """k_proj (64, 128) is stored as rows 0..31 in __0_0.distcp and rows 32..63 in __1_0.distcp.

    ``sibling``: its second chunk's entry points at its first chunk's archive: the same shape, so every
    archive check passes, and without the check the output's rows 32..63 were rows 0..31 (exit 0).
    ``other_tensor``: v_proj's first chunk points at k_proj's (same shape): v_proj silently became
    k_proj's rows. ``inside_other_archive``: that same entry starts 512 bytes into k_proj's archive.
    """
    def change(data: bytes) -> bytes:
        first = next(e for e in storage_entries(data) if e["fqn"] == K_PROJ)
        assert (first["file"], first["length"][2]) == ("__0_0.distcp", 17961), first
        fqn, k, shift = {"sibling": (K_PROJ, 1, 0), "other_tensor": (V_PROJ, 0, 0),
                         "inside_other_archive": (V_PROJ, 0, 512)}[target]
        return _point_chunk_at(data, fqn, k, "__0_0.distcp", first["offset"][2] + shift)
    edit_metadata(dcp, change)
    run, out, before = attempt(dcp, tmp_path)
    names = [K_PROJ, "__0_0.distcp"] + ([V_PROJ] if target != "sibling" else [])
    refused(request, run, 4, dcp, out, before, "share bytes", names)


def test_tied_entries_sharing_every_chunk_still_convert(dcp: Path, tmp_path: Path) -> None:
    """Control: v_proj pointed at all of k_proj's archives (same dtype, shape, chunks) is a tied pair, not a
    forgery: it converts, and v_proj equals k_proj's stored rows."""
    def change(data: bytes) -> bytes:
        k_chunks = [e for e in storage_entries(data) if e["fqn"] == K_PROJ]
        for n, chunk in enumerate(k_chunks):
            data = _point_chunk_at(data, V_PROJ, n, chunk["file"], chunk["offset"][2])
        return data
    edit_metadata(dcp, change)
    out = _out(tmp_path)
    run = convert(dcp, out)
    assert run.code == 0, run.stderr[-2000:]
    from safetensors.numpy import load_file
    got = load_file(out / "model.safetensors")
    k, v = (n.removeprefix("model.") for n in (K_PROJ, V_PROJ))
    assert got[v].tobytes() == got[k].tobytes()


def test_sixty_thousand_chunks_in_one_archive_are_refused_fast(dcp: Path, tmp_path: Path,
                                                               request: pytest.FixtureRequest) -> None:
    """A hand-built .metadata: one 60,000-element tensor in 60,000 one-element chunks whose storage entries
    all name the same real archive (the embedding's first chunk).

    Before the layout was checked from the metadata, each chunk's archive was opened and parsed, the same
    one 60,000 times (over 60 s, then exit 4 on its shape). Now it is refused before any is opened: what
    is left is reading the 7 MiB .metadata itself (~5.5 s of CPU: the pickle pre-pass 3.9 s, the
    unpickler 1.3 s), so the bound is HANG_SECONDS, one a loaded 2-core machine meets.
    """
    n = 60_000
    first = storage_entries(unframe((step4(dcp) / ".metadata").read_bytes()))[0]
    chunks = [((k,), (1,), first["file"], first["offset"][2], first["length"][2]) for k in range(n)]
    meta = build_metadata({"model.norm.weight": ((n,), chunks)})
    (step4(dcp) / ".metadata").write_bytes(meta)
    run, out, before = attempt(dcp, tmp_path)
    print(f"\n{n:,} chunks, .metadata {len(meta) / 2**20:.1f} MiB: exit {run.code} in {run.seconds:.1f} s")
    refused(request, run, 4, dcp, out, before, "share bytes", ["model.norm.weight", first["file"]],
            max_seconds=HANG_SECONDS)


def test_huge_metadata_is_not_read(dcp: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from vllm_consolidate.formats.dcp import MAX_METADATA_BYTES

    with open(step4(dcp) / ".metadata", "r+b") as fh:
        fh.truncate(MAX_METADATA_BYTES + 1)  # sparse
    run, out, before = attempt(dcp, tmp_path)
    refused(request, run, 4, dcp, out, before, "refusing to read it", ".metadata", max_seconds=10)
    assert run.peak_rss < 200 * 2**20, f"{run.peak_rss / 2**20:.0f} MiB"


# -- DCP 6: a .metadata that is not a regular file -----------------------------------------------------------

_FIFO_BUG = ("src bug: formats/dcp.py is_dcp_folder() uses Path.is_file(), so a save whose .metadata is a FIFO is "
             "not a DCP save and is skipped: a run folder silently converts the older step-2 / checkpoint-2 "
             "(exit 0); the step given directly is 'no checkpoint found' (exit 3)")


@pytest.mark.parametrize("given", ["run", "step", "trainer_run"])
def test_metadata_fifo_is_refused_at_once(given: str, dcp: Path, trainer: Path, tmp_path: Path,
                                          request: pytest.FixtureRequest) -> None:
    folder = trainer / "checkpoint-4" / "pytorch_model_fsdp_0" if given == "trainer_run" else step4(dcp)
    meta = folder / ".metadata"
    meta.unlink()
    os.mkfifo(meta)
    inp = {"run": dcp, "step": folder, "trainer_run": trainer}[given]
    run, out, before = attempt(inp, tmp_path)
    refused(request, run, 4, inp, out, before, "not a regular file", ".metadata", max_seconds=HANG_SECONDS)


def test_metadata_fifo_does_not_block(dcp: Path, tmp_path: Path) -> None:
    """Whatever the verdict, the FIFO is never opened for reading (which would block forever)."""
    meta = step4(dcp) / ".metadata"
    meta.unlink()
    os.mkfifo(meta)
    run = convert(step4(dcp), _out(tmp_path))
    assert run.code in (3, 4), (run.code, run.stderr[-2000:])
    assert run.seconds < HANG_SECONDS, f"took {run.seconds:.1f} s (bound {HANG_SECONDS} s)"


# -- verl 7: rank files that do not form one save -----------------------------------------------------------

def test_missing_rank_file(verl: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    rank(verl, 1).unlink()
    run, out, before = attempt(verl, tmp_path)
    refused(request, run, 4, verl, out, before, "missing: 1", "actor")


def test_fsdp_config_world_size_disagrees(verl: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    config = actor(verl) / "fsdp_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "world_size": 4}))
    run, out, before = attempt(verl, tmp_path)
    refused(request, run, 4, verl, out, before, "says world_size 4, but the rank files are for world size 2",
            "fsdp_config.json")


@pytest.mark.parametrize("content", [b'{"world_size": 2, "world_size": 4}', b'{"world_size": NaN}', b"[2]",
                                     b'{"world_size": "2"}', b"\xff\xfe"])
def test_fsdp_config_that_is_not_strict_json(content: bytes, verl: Path, tmp_path: Path,
                                             request: pytest.FixtureRequest) -> None:
    (actor(verl) / "fsdp_config.json").write_bytes(content)
    run, out, before = attempt(verl, tmp_path)
    refused(request, run, 4, verl, out, before, "", "fsdp_config.json")


def test_fsdp_config_fifo_does_not_block(verl: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    config = actor(verl) / "fsdp_config.json"
    config.unlink()
    os.mkfifo(config)
    run, out, before = attempt(verl, tmp_path)
    refused(request, run, 4, verl, out, before, "not a regular file", "fsdp_config.json",
            max_seconds=HANG_SECONDS)


def test_rank_files_of_two_world_sizes(verl: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    for r in range(4):
        shutil.copyfile(rank(verl, r % 2), rank(verl, r, world=4))
    run, out, before = attempt(verl, tmp_path)
    refused(request, run, 4, verl, out, before, "more than one world size are mixed here: 2, 4", "actor")


def test_rank_beyond_the_world_size(verl: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    shutil.copyfile(rank(verl, 1), rank(verl, 2))
    run, out, before = attempt(verl, tmp_path)
    refused(request, run, 4, verl, out, before, "unexpected ranks [2]", "actor")


def test_two_files_for_one_rank(verl: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    older = verl / "global_step_1" / "actor" / "model_world_size_2_rank_1.pt"
    shutil.copyfile(older, actor(verl) / "model_world_size_2_rank_01.pt")
    run, out, before = attempt(verl, tmp_path)
    refused(request, run, 4, verl, out, before, "two files may stand for one rank", "model_world_size_2_rank_01.pt")


def test_rank_file_from_another_model(verl: Path, fsdp_corpus: dict[str, Path], tmp_path: Path,
                                      request: pytest.FixtureRequest) -> None:
    """Rank 1 of a Llama run (no attention biases) swapped in: another key set."""
    other = fsdp_corpus[VERL_LLAMA] / "ckpt" / "global_step_1" / "actor" / "model_world_size_2_rank_1.pt"
    shutil.copyfile(other, rank(verl, 1))
    run, out, before = attempt(verl, tmp_path)
    refused(request, run, 4, verl, out, before, "rank 1 holds other tensors than rank 0", rank(verl, 1).name)


def test_rank_file_from_an_hsdp_run(verl: Path, fsdp_corpus: dict[str, Path], tmp_path: Path,
                                    request: pytest.FixtureRequest) -> None:
    """Rank 1 of the same model trained with HSDP (another mesh and placements) swapped in."""
    other = fsdp_corpus[VERL_HSDP] / "ckpt" / "global_step_1" / "actor" / "model_world_size_2_rank_1.pt"
    shutil.copyfile(other, rank(verl, 1))
    run, out, before = attempt(verl, tmp_path)
    refused(request, run, 4, verl, out, before, "disagrees with rank 0 on the shape or placement",
            "model_world_size_2_rank_")


def test_rank_file_with_another_global_shape(verl: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Rank 1's embedding declared 1002 rows (one BININT2 rewritten)."""
    rewrite_pkl(rank(verl, 1), lambda data: splice(data, [(*find(data, "BININT2", 1001), binint(1002))]))
    run, out, before = attempt(verl, tmp_path)
    refused(request, run, 4, verl, out, before,
            "rank 1 disagrees with rank 0 on the shape or placement of model.embed_tokens.weight",
            "model_world_size_2_rank_1.pt")


def test_rank_0_copied_over_rank_1(verl: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    shutil.copyfile(rank(verl, 0), rank(verl, 1))
    run, out, before = attempt(verl, tmp_path)
    refused(request, run, 4, verl, out, before, "do not form one mesh of 2 ranks", "model_world_size_2_rank_")


def test_rank_file_symlink_out_of_the_input_is_refused(verl: Path, tmp_path: Path, secret: Path,
                                                       request: pytest.FixtureRequest) -> None:
    target = rank(verl, 1)
    outside = secret.parent / target.name
    shutil.copyfile(target, outside)
    target.unlink()
    target.symlink_to(outside)
    run, out, before = attempt(verl, tmp_path)
    refused(request, run, 5, verl, out, before, "outside the model folder", target.name)


def test_rank_file_fifo_does_not_block(verl: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    target = rank(verl, 1)
    target.unlink()
    os.mkfifo(target)
    run, out, before = attempt(verl, tmp_path)
    refused(request, run, 4, verl, out, before, "not a regular file", target.name, max_seconds=HANG_SECONDS)


# -- verl 8: what a rank file's pickle may say ------------------------------------------------------------

def _first_local_storage_key(data: bytes) -> tuple[int, int]:
    """The storage key in the first persistent id (the embedding's local tensor)."""
    listed = ops(data)
    k = next(n for n, (name, arg, _, _) in enumerate(listed) if arg == "storage")
    name, arg, pos, end = next(o for o in listed[k + 1:] if o[0] == "BINUNICODE")
    assert arg == "0", arg
    return pos, end


def _after_first_persid(data: bytes) -> tuple[int, int]:
    """The storage offset argument right after the first BINPERSID."""
    listed = ops(data)
    k = next(n for n, o in enumerate(listed) if o[0] == "BINPERSID")
    name, arg, pos, end = listed[k + 1]
    assert name.startswith("BININT") and arg == 0, listed[k + 1]
    return pos, end


RANK_PICKLES: dict[str, tuple[Callable[[bytes, Path], bytes], int, str]] = {
    "os_system_global": (lambda d, m: after_proto(d, glob("os", "system") + s(f"touch {m}") + TUPLE1 + REDUCE + POP),
                         5, "not on the allowlist"),
    "os_system_stack_global": (lambda d, m: after_proto(d, stack_glob("os", "system") + s(f"touch {m}") + TUPLE1
                                                        + REDUCE + POP), 5, "not on the allowlist"),
    "subprocess_in_spec": (lambda d, m: splice(d, [(*find(d, "GLOBAL", "torch.distributed.device_mesh DeviceMesh"),
                                                    glob("subprocess", "Popen"))]), 5, "not on the allowlist"),
    "build_on_dtensor_class": (lambda d, m: after_proto(d, glob("torch.distributed.tensor", "DTensor") + EMPTY_DICT
                                                        + s("qualname") + s("x") + SETITEM + BUILD + POP),
                               5, "rewrite the reader's own inert class"),
    "build_on_wrapper_rebuild": (lambda d, m: after_proto(d, glob("torch._utils", "_rebuild_wrapper_subclass") + NONE
                                                          + EMPTY_DICT + s("fn") + s("x") + SETITEM + TUPLE2 + BUILD
                                                          + POP), 5, "rewrite the reader's own function"),
    "local_tensor_in_missing_storage": (lambda d, m: splice(d, [(*_first_local_storage_key(d), s("99"))]),
                                        4, "storage 99 is missing from the archive"),
    "local_tensor_in_another_storage": (lambda d, m: splice(d, [(*_first_local_storage_key(d), s("1"))]),
                                        4, "storage 1 holds"),
    "local_tensor_past_its_storage": (lambda d, m: splice(d, [(*_after_first_persid(d), binint(256))]),
                                      4, "reaches past the end of its storage"),
    "storage_numel_forged": (lambda d, m: splice(d, [(*find(d, "BININT2", 64128), i(10**12))]),
                             4, "less than 1000000000000"),
    "local_tensor_not_a_tensor": (lambda d, m: splice(d, [(*find(d, "BINUNICODE", "_local_tensor"),
                                                           s("_not_local"))]), 4, "its local tensor is None"),
    "wrapper_of_a_plain_tensor": (lambda d, m: splice(d, [(*find(d, "GLOBAL", "torch.distributed.tensor DTensor"),
                                                           glob("torch", "Tensor"))]), 4, "not a DTensor"),
    "local_dtype_differs": (lambda d, m: splice(d, [(*find(d, "GLOBAL", "torch float32"), glob("torch", "bfloat16"))]),
                            4, "the DTensor says"),
}


@pytest.mark.parametrize("attack", sorted(RANK_PICKLES))
def test_hostile_rank_file_pickle(attack: str, verl: Path, tmp_path: Path, marker: Path,
                                  request: pytest.FixtureRequest) -> None:
    change, code, message = RANK_PICKLES[attack]
    target = rank(verl, 1)
    rewrite_pkl(target, lambda data: change(data, marker))
    run, out, before = attempt(verl, tmp_path)
    refused(request, run, code, verl, out, before, message, target.name)


# -- verl 9: latest_checkpointed_iteration.txt -------------------------------------------------------------

def test_huge_tracker_is_not_read(verl: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with open(verl / TRACKER, "r+b") as fh:
        fh.truncate(2**30)  # sparse
    run, out, before = attempt(verl, tmp_path)
    refused(request, run, 4, verl, out, before, "refusing to read it", TRACKER, max_seconds=10)
    assert run.peak_rss < 200 * 2**20, f"{run.peak_rss / 2**20:.0f} MiB"


#: tracker content -> the error line's fragment: not a step number (a unicode digit too), not UTF-8, a missing step.
TRACKER_CONTENTS = {
    **{content: "not a step number" for content in [b"", b"latest", b"global_step_2", b"-1", b"+2", b"0x2", b"2.0",
                                                    b"1e3", b"2\n3", b"1" * 19, b"../global_step_2", b"2\0",
                                                    "²".encode()]},
    b"2\xff": "UTF-8",
    b"7": "names step 7, but global_step_7 is missing",
}


@pytest.mark.parametrize("content", list(TRACKER_CONTENTS))
def test_tracker_content_is_refused(content: bytes, verl: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    (verl / TRACKER).write_bytes(content)
    run, out, before = attempt(verl, tmp_path)
    refused(request, run, 4, verl, out, before, TRACKER_CONTENTS[content], TRACKER)


def test_tracker_fifo_does_not_block(verl: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    (verl / TRACKER).unlink()
    os.mkfifo(verl / TRACKER)
    run, out, before = attempt(verl, tmp_path)
    refused(request, run, 4, verl, out, before, "not a regular file", TRACKER, max_seconds=HANG_SECONDS)


def test_tracked_step_linking_out_is_refused(verl: Path, tmp_path: Path, secret: Path,
                                             request: pytest.FixtureRequest) -> None:
    outside = secret.parent / "global_step_9"
    shutil.copytree(verl / "global_step_2", outside)
    (verl / "global_step_9").symlink_to(outside)
    (verl / TRACKER).write_text("9")
    run, out, before = attempt(verl, tmp_path)
    refused(request, run, 5, verl, out, before, "outside", "global_step_9")
