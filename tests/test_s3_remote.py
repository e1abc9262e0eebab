"""The read side of object storage, unit by unit, against a real S3 endpoint (moto's server on loopback):
the listing mirrored as stand-ins (bounded, confined), byte reads through ``safe_io.open_source`` (ranged
GETs, read-ahead coalesced, never widened, pinned to the listed ETag)."""

from __future__ import annotations

import os
import uuid

import pytest

from vllm_consolidate import safe_io
from vllm_consolidate.errors import (
    CorruptCheckpointError,
    InputNotFoundError,
    LimitExceededError,
    StorageError,
    UnsafeInputError,
)
from vllm_consolidate.storage import remote
from vllm_consolidate.storage.urls import parse_object_url

MIB = 2**20


@pytest.fixture()
def bucket(s3) -> str:
    name = f"unit-{uuid.uuid4().hex[:12]}"
    s3.client.create_bucket(Bucket=name)
    return name


def _blob(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n)) if n < 4096 else os.urandom(n)


def test_mirror_stand_ins_have_sizes_and_no_blocks(s3, bucket):
    data = {"run/ck/a.bin": _blob(3 * MIB), "run/ck/sub/b.json": b'{"x": 1}', "run/ck/empty": b"",
            "run/config.json": b"{}", "run/other/deep.bin": b"zz"}
    for key, body in data.items():
        s3.client.put_object(Bucket=bucket, Key=key, Body=body)
    url = parse_object_url(f"s3://{bucket}/run/ck")
    with remote.mirror(url) as m:
        assert m.path.name == "ck" and m.path.is_dir()
        a = m.path / "a.bin"
        assert a.stat().st_size == 3 * MIB and a.stat().st_blocks == 0
        assert (m.path / "sub" / "b.json").stat().st_size == 8
        assert (m.path / "empty").stat().st_size == 0
        # the parent prefix's own objects, not its other folders (the asset search looks one or two levels up)
        assert (m.path.parent / "config.json").is_file()
        assert not (m.path.parent / "other").exists()
        assert remote.is_standin(a) and not remote.is_standin(m.path / "nope")
        assert m.objects == 4
        src = safe_io.open_source(a)
        try:
            assert src.size == 3 * MIB
            assert src.pread(100, MIB) == data["run/ck/a.bin"][MIB:MIB + 100]
            assert src.pread(100, 3 * MIB - 10) == data["run/ck/a.bin"][-10:]
        finally:
            src.close()
        assert safe_io.read_json(m.path / "sub" / "b.json") == {"x": 1}
        assert safe_io.read_bounded(m.path.parent / "config.json", 10) == b"{}"
        root = m.root
    assert not root.exists() and not remote.is_standin(a)


def test_open_regular_refuses_a_stand_in(s3, bucket):
    s3.client.put_object(Bucket=bucket, Key="m/x.pt", Body=b"PK\x03\x04")
    with remote.mirror(parse_object_url(f"s3://{bucket}/m")) as m:
        with pytest.raises(RuntimeError, match="object-store"):
            safe_io.open_regular(m.path / "x.pt")


def test_read_ahead_coalesces_adjacent_hints_and_never_widens(s3, bucket):
    body = _blob(40 * MIB)
    s3.client.put_object(Bucket=bucket, Key="c/flat.bin", Body=body)
    with remote.mirror(parse_object_url(f"s3://{bucket}/c")) as m:
        src = safe_io.open_source(m.path / "flat.bin")
        s3.proxy.clear()
        # the writer's pattern: 4 MiB chunks of one range, hinted ahead, then read; a gap the reader skips
        for off in range(0, 8 * MIB, 4 * MIB):
            src.advise(off, 4 * MIB)
        src.advise(20 * MIB, MIB)
        buf = bytearray(4 * MIB)
        for off in range(0, 8 * MIB, 4 * MIB):
            assert src.preadv_into(memoryview(buf), off) == 4 * MIB
            assert buf == body[off:off + 4 * MIB]
        assert src.pread(MIB, 20 * MIB) == body[20 * MIB:21 * MIB]
        assert not src._blocks  # each fetched block is freed once read: memory stays at the read-ahead window
        src.close()
        spans = sorted(r.span() for r in s3.proxy.gets())
    assert spans == [(0, 8 * MIB), (20 * MIB, 21 * MIB)]  # one GET for the two adjacent chunks; no byte between


def test_a_small_object_is_fetched_once_however_it_is_read(s3, bucket):
    body = _blob(100 * 1024)
    s3.client.put_object(Bucket=bucket, Key="s/model_states.pt", Body=body)
    with remote.mirror(parse_object_url(f"s3://{bucket}/s")) as m:
        src = safe_io.open_source(m.path / "model_states.pt")
        s3.proxy.clear()
        got = b"".join(src.pread(30, off) for off in range(0, len(body), 30))
        src.close()
        assert got == body and len(s3.proxy.gets()) == 1


def test_an_object_changed_after_listing_fails_clearly(s3, bucket):
    s3.client.put_object(Bucket=bucket, Key="e/w.bin", Body=b"a" * 1000)
    with remote.mirror(parse_object_url(f"s3://{bucket}/e")) as m:
        s3.client.put_object(Bucket=bucket, Key="e/w.bin", Body=b"b" * 1000)
        src = safe_io.open_source(m.path / "w.bin")
        with pytest.raises(StorageError, match="changed while it was being read") as err:
            src.pread(10, 0)
        assert err.value.path == f"s3://{bucket}/e/w.bin"


def test_hostile_listings_are_refused(s3, bucket, monkeypatch):
    s3.client.put_object(Bucket=bucket, Key="h/ok.bin", Body=b"1")
    s3.client.put_object(Bucket=bucket, Key="h/../escape.bin", Body=b"1")
    with pytest.raises(UnsafeInputError, match="outside the input"):
        remote.mirror(parse_object_url(f"s3://{bucket}/h"))
    s3.client.delete_object(Bucket=bucket, Key="h/../escape.bin")
    for i in range(5):
        s3.client.put_object(Bucket=bucket, Key=f"h/many/{i}", Body=b"1")
    monkeypatch.setattr(remote, "MAX_OBJECTS", 5)
    with pytest.raises(LimitExceededError, match="more than 5 objects"):
        remote.mirror(parse_object_url(f"s3://{bucket}/h"))
    monkeypatch.setattr(remote, "MAX_OBJECTS", 100)
    s3.client.put_object(Bucket=bucket, Key="h/many", Body=b"not a folder marker")
    with pytest.raises(CorruptCheckpointError, match="both an object and a folder"):
        remote.mirror(parse_object_url(f"s3://{bucket}/h"))
    s3.client.put_object(Bucket=bucket, Key="h/many", Body=b"")  # a console's zero-byte folder marker: skipped
    with remote.mirror(parse_object_url(f"s3://{bucket}/h")) as m:
        assert (m.path / "many").is_dir() and len(list((m.path / "many").iterdir())) == 5
    with pytest.raises(InputNotFoundError):
        remote.mirror(parse_object_url(f"s3://{bucket}/nothing-here"))
    assert not [p for p in remote._registry if "nothing-here" in p]


def test_public_names_urls_not_stand_ins(s3, bucket):
    s3.client.put_object(Bucket=bucket, Key="p/q/r/s/x.json", Body=b"[]")
    url = parse_object_url(f"s3://{bucket}/p/q/r/s")
    with remote.mirror(url) as m:
        err = CorruptCheckpointError(f"bad file {m.path / 'x.json'}", path=m.path / "x.json")
        remote.public_error(err)
        assert err.path == f"s3://{bucket}/p/q/r/s/x.json"
        assert str(err) == f"bad file s3://{bucket}/p/q/r/s/x.json [s3://{bucket}/p/q/r/s/x.json]"
        assert remote.public_value({"a": [str(m.path)]}) == {"a": [str(url)]}
