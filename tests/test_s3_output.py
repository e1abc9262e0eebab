"""``--output s3://…`` against a real S3 endpoint on loopback (moto's server; see tests/s3_server.py).

What a local output promises, checked through boto3 (an independent client, not the code under test):
the objects are byte-identical to the local conversion's files; nothing appears under the output prefix
before the commit; a failure, SIGTERM or SIGKILL leaves nothing under it, and a failure or SIGTERM
leaves no staged object and no open multipart upload either; ``--force`` replaces only an output
carrying our marker, and deletes only the objects that output consisted of.

Validation of a staged output reads it where it is, through the object-store reader's mirror (headers
and sampled ranges only): the byte-identity cases run it (and it must pass); the signal and failure tests
skip it (``--no-validate-vllm``) to reach the writer sooner.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from tests import s3_server

from vllm_consolidate import cli
from vllm_consolidate.convert import ConvertOptions, convert
from vllm_consolidate.errors import CorruptCheckpointError, UsageError, ValidationFailedError
from vllm_consolidate.storage import bytefile, streamed
from vllm_consolidate.storage.urls import parse_object_url
from vllm_consolidate.validate import values as values_mod

DS = "qwen2_z3_w2_bf16_tied"  # ZeRO-3, world size 2, tied embeddings, tokenizer + chat template + generation config
BIG = "llama_big_z2_w2_bf16"  # 74M parameters: 297 MB of fp32 output, many 16 MiB chunks and parts
MARKER = ".vllm-consolidate.json"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3():
    with s3_server.start() as server:
        yield server


@pytest.fixture
def bucket(s3, monkeypatch) -> str:
    """A fresh bucket (so no obstore client cached for another server's bucket is reused), env pointing at s3."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    name = f"out-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _objects(s3, bucket: str, prefix: str) -> dict[str, bytes]:
    return {k[len(prefix) + 1:]: s3.get(bucket, k) for k in s3.keys(bucket, prefix + "/")}


def _no_leftovers(s3, bucket: str) -> None:
    assert s3.keys(bucket) == {}, "objects left in the bucket"
    assert s3.uploads(bucket) == [], "multipart uploads left open"


CASES = {
    "fp32-copy": (DS, {"dtype": "float32"}),
    "bf16-cast-sharded": (DS, {"dtype": "bfloat16", "max_shard_size": 400_000}),
    "pytorch-bin": (DS, {"dtype": "float32", "fmt": "bin"}),
    "fp8-quantized": (DS, {"dtype": "bfloat16", "quantize": "fp8_dynamic"}),
    "hf-sharded-keep": ("hf_llama_sharded_bf16", {"keep_original_precision": True, "max_shard_size": 300_000}),
    # More kept for the validation than streamed.MEMORY_BYTES (a large MoE): the samples go to a temporary file.
    "kept-spilled": (DS, {"dtype": "bfloat16", "max_shard_size": 400_000}),
}


@pytest.mark.parametrize("label", list(CASES))
def test_objects_are_the_local_conversions_files(label, s3, bucket, case_dir, case_meta, tmp_path, monkeypatch):
    name, options = CASES[label]
    src = case_dir(name) / case_meta(name)["input"]
    convert(ConvertOptions(input=src, output=tmp_path / "local", validate=False, **options))
    read_back = []  # the read-back NaN/Inf scan, one entry per tensor it reads from the staged objects
    monkeypatch.setattr(values_mod, "_scan", lambda t, buf, scan=values_mod._scan: read_back.append(t) or scan(t, buf))
    gets: list = []  # every ranged GET our reader makes (the input is local: any GET reads the output back)
    monkeypatch.setattr(bytefile, "RECORD_REQUESTS", True)
    monkeypatch.setattr(bytefile, "REQUESTS", gets)
    spills: list = []
    if label == "kept-spilled":
        monkeypatch.setattr(streamed, "MEMORY_BYTES", 0)
        monkeypatch.setattr(streamed.Spill, "close", lambda self, close=streamed.Spill.close: spills.append(
            (self.spilled, self._fd)) or close(self))
    result = convert(ConvertOptions(input=src, output=f"s3://{bucket}/models/m", validate=True, **options))
    assert result.validation is not None and result.validation["ok"], result.validation
    # Validated before the commit with no download: only a --pytorch-bin archive (staged whole) is read back.
    read = {url.rpartition("/")[2] for url, _, _ in gets}
    assert read == ({"pytorch_model.bin"} if label == "pytorch-bin" else set()), read
    if label == "kept-spilled":  # every kept sample was read from the temporary file, closed after the commit
        assert any(n > 0 and fd is not None for n, fd in spills), spills
    # The NaN/Inf scan ran on the bytes as they were uploaded (StreamScan): validation did not read the staged
    # safetensors files back for it (a .bin output still is).
    values = next(c for c in result.validation["checks"] if c["name"] == "values")
    assert values["status"] == "pass"
    if label == "pytorch-bin":
        assert read_back and not values["message"].endswith("(scanned as uploaded)")
    else:
        assert not read_back and values["message"].endswith("(scanned as uploaded)"), values
    local = _files(tmp_path / "local")
    remote = _objects(s3, bucket, "models/m")
    assert sorted(remote) == sorted(local)
    for rel in local:
        if rel.endswith(".bin"):  # torch names the archive's folder after the file, or "archive" for a stream
            _same_state_dict(remote[rel], local[rel])
        elif rel != MARKER:  # the marker holds the time and the output's own location
            assert remote[rel] == local[rel], rel
    marker = json.loads(remote[MARKER])
    assert marker["format"] == "vllm-consolidate-output" and sorted(marker["files"]) == sorted(set(local) - {MARKER})
    assert str(result.output) == f"s3://{bucket}/models/m" and result.status == "converted"
    assert result.bytes_written == sum(len(remote[f]) for f in result.files)
    assert set(s3.keys(bucket)) == {f"models/m/{rel}" for rel in local}, "staging objects left behind"
    assert s3.uploads(bucket) == []


def test_s3_input_to_s3_output_is_the_local_conversion(s3, bucket, case_dir, tmp_path):
    """s3:// -> s3://, validation on: the checkpoint is read from one prefix and the model committed under another,
    byte-identical to the local conversion, nothing staged left, the source objects unchanged (ETags)."""
    src = case_dir(DS) / "ckpt"
    client = s3.client()
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, "runs/r1/" + path.relative_to(src).as_posix())
    etags = {k: client.head_object(Bucket=bucket, Key=k)["ETag"] for k in s3.keys(bucket, "runs/")}
    convert(ConvertOptions(input=src, output=tmp_path / "local", validate=False))
    result = convert(ConvertOptions(input=f"s3://{bucket}/runs/r1", output=f"s3://{bucket}/models/m"))
    assert result.validation is not None and result.validation["ok"]
    local, remote = _files(tmp_path / "local"), _objects(s3, bucket, "models/m")
    assert sorted(remote) == sorted(local)
    assert all(remote[rel] == local[rel] for rel in local if rel != MARKER)
    assert json.loads(remote[MARKER])["input"] == f"s3://{bucket}/runs/r1"
    assert set(s3.keys(bucket)) == set(etags) | {f"models/m/{rel}" for rel in local}
    assert {k: client.head_object(Bucket=bucket, Key=k)["ETag"] for k in etags} == etags
    assert s3.uploads(bucket) == []


def _same_state_dict(a: bytes, b: bytes) -> None:
    import io

    import torch

    sa, sb = (torch.load(io.BytesIO(x), weights_only=True) for x in (a, b))
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and sa[name].shape == sb[name].shape, name
        assert torch.equal(sa[name].view(torch.uint8), sb[name].view(torch.uint8)), name


def _parts(s3, bucket: str) -> dict[str, int]:
    """Bytes the server holds in the parts of each open multipart upload (``{key: bytes}``), asked of moto."""
    client = s3.client()
    return {u["Key"]: sum(p["Size"] for p in client.list_parts(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
                          .get("Parts", []))
            for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}


def _settled_parts(s3, bucket: str, want: dict[str, int], timeout: float = 20) -> dict[str, int]:
    """:func:`_parts` once it equals ``want`` (a file's last parts may still be in flight after its last write:
    obstore's writer does not wait for them), or as it is after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (got := _parts(s3, bucket)) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def _head_404(s3, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        s3.client().head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        return exc.response["Error"]["Code"] in ("404", "NoSuchKey")
    return False


def test_nothing_under_output_before_commit(s3, bucket, case_dir, tmp_path, monkeypatch):
    """Everything is written and validation is running: every shard's bytes are at the server, in the parts of an
    upload to its final key, yet nothing is listed but the run record and every output key is 404; the run then
    fails: no upload stays open and nothing is left."""
    from vllm_consolidate.storage.staging import RECORD_NAME

    options = {"input": case_dir(DS) / "ckpt", "max_shard_size": 400_000}
    convert(ConvertOptions(output=tmp_path / "local", validate=False, **options))
    local = {rel: len(data) for rel, data in _files(tmp_path / "local").items() if rel != MARKER}
    shards = {f"m/{rel}": size for rel, size in local.items() if rel.endswith(".safetensors")}
    assert len(shards) == 4 and max(shards.values()) < 5 * 2**20  # one part each: the server holds all of it
    seen: dict = {}

    def fail_validation(*args, **kwargs):
        seen["listed"] = sorted(s3.keys(bucket))
        seen["head_404"] = {rel: _head_404(s3, bucket, f"m/{rel}") for rel in [*local, MARKER]}
        seen["parts"] = _settled_parts(s3, bucket, shards)
        raise ValidationFailedError("injected", path="m")

    monkeypatch.setattr(importlib.import_module("vllm_consolidate.convert"), "validate_staged", fail_validation)
    with pytest.raises(ValidationFailedError):
        convert(ConvertOptions(output=f"s3://{bucket}/m", validate=True, **options))
    assert len(seen["listed"]) == 1 and seen["listed"][0].startswith(".m.vllmc-staging-")  # the run record alone
    assert seen["listed"][0].endswith("/" + RECORD_NAME)
    assert all(seen["head_404"].values()), seen["head_404"]
    assert seen["parts"] == shards
    _no_leftovers(s3, bucket)


def test_validation_sees_the_uploaded_bytes(s3, bucket, case_dir, monkeypatch):
    """One byte of the first tensor is changed on its way into the upload (as a writer bug would): the validation,
    made from the bytes kept from that same stream, fails on it by name, and nothing is committed or left open."""
    from vllm_consolidate.storage import upload

    real, header = upload.ObjectSink.pwrite, {}

    def pwrite(self, data, offset):
        if offset == 0:
            header[self.url.prefix] = len(data)  # the safetensors header is written first, in one piece
        elif offset == header.get(self.url.prefix):  # the first byte of the data section: the first tensor's
            data = bytes([data[0] ^ 0x40]) + bytes(data[1:])
        return real(self, data, offset)

    monkeypatch.setattr(upload.ObjectSink, "pwrite", pwrite)
    with pytest.raises(ValidationFailedError, match="differs from the source in 1 of"):
        convert(ConvertOptions(input=case_dir(DS) / "ckpt", output=f"s3://{bucket}/m", validate=True))
    assert header, "no upload was written"
    _no_leftovers(s3, bucket)


def test_failure_mid_write_aborts_the_upload(s3, bucket, case_dir, monkeypatch):
    """A reader error in a writer thread after a few chunks: the open multipart upload is aborted, nothing stays."""
    from vllm_consolidate.write import safetensors as st

    real, calls, open_uploads = st._run_job, [], []

    def flaky(files, out, job):
        calls.append(1)
        if len(calls) == 6:
            open_uploads.extend(s3.uploads(bucket))  # the upload really was in progress when it failed
            raise CorruptCheckpointError("injected: file ended early", path="rank file")
        return real(files, out, job)

    monkeypatch.setattr(st, "_run_job", flaky)
    with pytest.raises(CorruptCheckpointError):
        convert(ConvertOptions(input=case_dir(BIG) / "ckpt", output=f"s3://{bucket}/out/m", validate=False))
    assert open_uploads, "no multipart upload was open at the failure: the test would prove nothing"
    _no_leftovers(s3, bucket)


def _cli(s3, *args: str) -> subprocess.Popen:
    env = {**os.environ, **s3.env, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    return subprocess.Popen([sys.executable, "-m", "vllm_consolidate", "convert", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_upload(s3, bucket: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not s3.uploads(bucket):
        assert proc.poll() is None, f"the run ended before uploading: {proc.communicate()}"
        assert time.monotonic() < deadline, "no multipart upload started"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_deletes_staged_objects_and_aborts(s3, bucket, case_dir, sig):
    proc = _cli(s3, "--input", str(case_dir(BIG) / "ckpt"), "--output", f"s3://{bucket}/out/m", "--no-validate-vllm")
    _wait_for_upload(s3, bucket, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    _no_leftovers(s3, bucket)


def test_sigkill_leaves_nothing_under_the_output(s3, bucket, case_dir):
    proc = _cli(s3, "--input", str(case_dir(BIG) / "ckpt"), "--output", f"s3://{bucket}/out/m", "--no-validate-vllm")
    _wait_for_upload(s3, bucket, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert s3.keys(bucket, "out/m/") == {}
    # What a SIGKILL cannot clean: listed, only the run record under the staging prefix (it names the run's output);
    # the open uploads of the output's keys are invisible (HEAD 404, not listed), for a lifecycle rule to abort.
    listed = list(s3.keys(bucket))
    assert listed and all(k.startswith("out/.m.vllmc-staging-") for k in listed), listed
    uploads = s3.uploads(bucket)
    assert uploads and all(k.startswith("out/m/") and _head_404(s3, bucket, k) for k in uploads), uploads
    staged = s3.keys(bucket)
    assert staged, "the killed run had staged nothing (its run record at least): the cleanup below proves nothing"
    # The next run for the same output removes the dead run's staged objects (its record: this machine, PID gone),
    # and never a staging prefix of a live run or of another output.
    from vllm_consolidate.storage.staging import RECORD_FORMAT, RECORD_NAME, machine_identity

    client = s3.client()
    dead = {**machine_identity(), "pid": proc.pid, "format": RECORD_FORMAT, "output": f"s3://{bucket}/out/m"}
    foreign = {  # each differs from a removable leftover in one respect
        f"out/.m.vllmc-staging-{'1' * 16}/{RECORD_NAME}": json.dumps({**dead, "format": "x"}).encode(),
        f"out/.m.vllmc-staging-{'2' * 16}/{RECORD_NAME}": json.dumps({**dead, "output": f"s3://{bucket}/o/m"}).encode(),
        f"out/.m.vllmc-staging-{'3' * 16}/{RECORD_NAME}": json.dumps({**dead, "pid": s3.process.pid}).encode(),  # alive
        f"out/.m.vllmc-staging-{'4' * 16}/{RECORD_NAME}": json.dumps({**dead, "boot_id": "another"}).encode(),
        f"out/.m.vllmc-staging-{'5' * 15}/{RECORD_NAME}": json.dumps(dead).encode(),  # not our name
        f"out/.n.vllmc-staging-{'6' * 16}/{RECORD_NAME}": json.dumps(dead).encode(),
    }
    for key, body in foreign.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    assert cli.convert_main(["--input", str(case_dir(DS) / "ckpt"), "--output", f"s3://{bucket}/out/m",
                             "--no-validate-vllm"]) == 0
    left = set(s3.keys(bucket)) - set(s3.keys(bucket, "out/m/"))
    assert left == set(foreign), left


def _etags(s3, bucket: str, prefix: str) -> dict[str, str]:
    client = s3.client()
    return {k: client.head_object(Bucket=bucket, Key=k)["ETag"] for k in s3.keys(bucket, prefix)}


def test_force_refuses_a_prefix_without_our_marker(s3, bucket, case_dir):
    client = s3.client()
    for key in ("m/model.safetensors", "m/config.json", "m/notes.txt"):
        client.put_object(Bucket=bucket, Key=key, Body=b"someone else's " + key.encode())
    before = _etags(s3, bucket, "m/")
    args = ["--input", str(case_dir(DS) / "ckpt"), "--output", f"s3://{bucket}/m", "--no-validate-vllm"]
    assert cli.convert_main(args) == 6
    assert cli.convert_main([*args, "--force"]) == 6
    assert _etags(s3, bucket, "m/") == before
    assert s3.keys(bucket).keys() == before.keys() and s3.uploads(bucket) == []


def test_force_replaces_our_output_and_only_its_objects(s3, bucket, case_dir, tmp_path):
    ckpt = str(case_dir(DS) / "ckpt")
    base = ["--input", ckpt, "--output", f"s3://{bucket}/m", "--no-validate-vllm"]
    assert cli.convert_main([*base, "--max-shard-size", "400KB"]) == 0
    old = s3.keys(bucket, "m/")
    assert "m/model.safetensors.index.json" in old and "m/model-00002-of-00004.safetensors" in old
    s3.client().put_object(Bucket=bucket, Key="m/README.md", Body=b"a user's note")
    assert cli.convert_main(base) == 6  # exists, no --force
    assert s3.keys(bucket, "m/") == {**old, "m/README.md": 13}
    assert cli.convert_main([*base, "--force"]) == 0
    assert cli.convert_main(["--input", ckpt, "--output", str(tmp_path / "local"), "--no-validate-vllm"]) == 0
    local = _files(tmp_path / "local")
    remote = _objects(s3, bucket, "m")
    assert sorted(remote) == sorted([*local, "README.md"])  # the old shards and index are gone, the note stays
    assert all(remote[rel] == local[rel] for rel in local if rel != MARKER)
    assert remote["README.md"] == b"a user's note"
    assert s3.uploads(bucket) == []


@pytest.mark.parametrize(("output", "inputs", "refused"), [
    ("s3://b/in/out", ["s3://b/in"], "is the input prefix or inside it"),
    ("s3://b/in", ["s3://b/in"], "is the input prefix or inside it"),
    ("s3://b/x", ["s3://b/x/run/ckpt"], "contains the input"),
    ("s3a://b/in/o", ["s3://b/in"], "is the input prefix or inside it"),  # an alias of the same store
    ("s3://b/in2", ["s3://b/in"], None),  # whole segments: in2 is not inside in
    ("s3://other/in/out", ["s3://b/in"], None),
    ("gs://b/in/out", ["s3://b/in"], None),
    ("s3://b/out", [Path("/data/in")], None),
    ("s3://b", [], "names a bucket, not a prefix"),
])
def test_output_prefix_is_never_the_input(output, inputs, refused):
    from vllm_consolidate.write.remote import check_output_url

    if refused is None:
        check_output_url(parse_object_url(output), inputs)
        return
    with pytest.raises(UsageError, match=refused):
        check_output_url(parse_object_url(output), inputs)


def test_sink_reorders_chunks_within_its_window(s3, bucket, monkeypatch):
    """Two threads write 1 MiB chunks in a shuffled order; the object is exact and the window stays bounded."""
    import obstore

    from vllm_consolidate.storage import upload
    from vllm_consolidate.storage.store import open_store

    monkeypatch.setattr(upload, "PART_BYTES", upload.MIN_PART_BYTES)  # several parts from a small object
    url = parse_object_url(f"s3://{bucket}/sink/obj")
    size, chunk, window = 23 * 2**20 + 12345, 2**20, 3 * 2**20
    data = random.Random(0).randbytes(size)
    offsets = list(range(0, size, chunk))
    order = [offsets[i] for i in _bounded_shuffle(len(offsets), 3)]  # as the writer submits: near order
    sink = upload.ObjectSink(open_store(url), url, size, window=window)
    peak, lock = [0], threading.Lock()
    real = sink._upload_ready

    def watch() -> None:
        with lock:
            peak[0] = max(peak[0], sink._buffered)
        real()

    sink._upload_ready = watch
    todo = iter(order)

    def worker() -> None:
        for off in todo:  # the two threads share one iterator: jobs are taken in submission order
            sink.pwrite(memoryview(data)[off:off + chunk], off)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s3.uploads(bucket), "the object should be a multipart upload in progress"
    sink.close()
    assert bytes(obstore.get(open_store(url), url.prefix).bytes()) == data
    assert peak[0] <= window + chunk
    assert s3.uploads(bucket) == []


def _bounded_shuffle(n: int, reach: int) -> list[int]:
    """0..n-1 with each element moved at most ``reach`` places (the writer's few jobs in flight)."""
    rng = random.Random(1)
    keys = [i + rng.uniform(0, reach) for i in range(n)]
    return sorted(range(n), key=keys.__getitem__)


def test_sink_abort_leaves_no_upload(s3, bucket, monkeypatch):
    from vllm_consolidate.storage import upload
    from vllm_consolidate.storage.store import open_store

    monkeypatch.setattr(upload, "PART_BYTES", upload.MIN_PART_BYTES)
    url = parse_object_url(f"s3://{bucket}/sink/aborted")
    sink = upload.ObjectSink(open_store(url), url, 20 * 2**20)
    sink.pwrite(b"x" * (12 * 2**20), 0)
    assert s3.uploads(bucket) == ["sink/aborted"]
    sink.abort()
    with pytest.raises(Exception, match="abandoned"):
        sink.pwrite(b"y", 12 * 2**20)
    _no_leftovers(s3, bucket)


def record_commit(listing, monkeypatch, fail_at: int = 0) -> tuple[list, list, list]:
    """Record every commit step (completing an upload, or PUTting a held file) with ``listing()`` (what the output
    holds) at that moment, the most steps in flight at once, and any server-side copy; the ``fail_at``-th
    completion of a safetensors file raises."""
    import obstore

    from vllm_consolidate.errors import StorageError
    from vllm_consolidate.storage import staging, upload

    order, running, copies, lock = [], [0, 0], [], threading.Lock()
    complete, put = getattr(upload.ObjectSink, "complete", None), staging.StagedOutput._put

    def step(name: str, call):
        with lock:
            order.append((name, listing()))
            running[0] += 1
            running[1] = max(running)
            n = len([1 for nm, _ in order if nm.endswith(".safetensors")])
        try:
            time.sleep(0.05)
            if fail_at and n == fail_at and name.endswith(".safetensors"):
                raise StorageError("injected: completion refused", path=name)
            return call()
        finally:
            with lock:
                running[0] -= 1

    def complete_(self):
        return step(self.url.prefix, lambda: complete(self))

    def put_(self, *args):
        if len(args) != 3 or args[0] != self.output:  # the run record, under the staging prefix
            return put(self, *args)
        prefix, rel, _ = args
        return step(prefix.key(rel), lambda: put(self, *args))

    monkeypatch.setattr(upload.ObjectSink, "complete", complete_, raising=False)
    monkeypatch.setattr(staging.StagedOutput, "_put", put_)
    monkeypatch.setattr(obstore, "copy", lambda *a, **kw: copies.append(a))
    return order, running, copies


def test_commit_completes_the_uploads_then_config_and_the_marker_last(s3, bucket, case_dir, monkeypatch):
    """The commit completes the open uploads (several at once) and PUTs the held files, with no server-side copy; a
    reader that waits for the marker (or config.json, or the index) finds every other object already there."""
    order, running, copies = record_commit(lambda: sorted(s3.keys(bucket, "m/")), monkeypatch)
    assert cli.convert_main(["--input", str(case_dir(DS) / "ckpt"), "--output", f"s3://{bucket}/m",
                             "--max-shard-size", "400KB", "--no-validate-vllm"]) == 0
    names = [to for to, _ in order]
    assert sorted(names) == sorted(s3.keys(bucket, "m/")) and len(set(names)) == len(names)
    assert names[-2:] == ["m/config.json", f"m/{MARKER}"]
    assert names.index("m/model.safetensors.index.json") > max(i for i, n in enumerate(names) if "-of-" in n)
    assert order[0][1] == []  # nothing under the output before the commit's first step
    _, present_before_marker = order[-1]
    assert sorted([*present_before_marker, f"m/{MARKER}"]) == sorted(s3.keys(bucket, "m/"))
    assert running[1] > 1, "the shards were completed one at a time"
    assert copies == [], "a server-side copy was made"
    assert s3.uploads(bucket) == [] and set(s3.keys(bucket)) == set(names)  # nothing staged is left


def test_failure_during_commit_leaves_nothing(s3, bucket, case_dir, monkeypatch):
    """The third shard's completion fails: the shards already completed (they replaced nothing) are deleted, every
    other upload is aborted, nothing is left in the bucket (exit 13)."""
    order, _, _ = record_commit(lambda: sorted(s3.keys(bucket, "m/")), monkeypatch, fail_at=3)
    assert cli.convert_main(["--input", str(case_dir(DS) / "ckpt"), "--output", f"s3://{bucket}/m",
                             "--max-shard-size", "400KB", "--no-validate-vllm"]) == 13
    assert len([n for n, _ in order if n.endswith(".safetensors")]) >= 3, order
    _no_leftovers(s3, bucket)


def test_open_upload_holds_less_than_a_part_until_completed(s3, bucket, monkeypatch):
    """A known-size object whose every byte was written and not yet completed: the server holds all of it but
    the remainder (< n bytes for n parts), nothing is visible, and completing it makes exactly the object."""
    import obstore

    from vllm_consolidate.storage import upload
    from vllm_consolidate.storage.store import open_store

    monkeypatch.setattr(upload, "PART_BYTES", upload.MIN_PART_BYTES)  # several parts from a small object
    url = parse_object_url(f"s3://{bucket}/o/obj")
    size = 23 * 2**20 + 12347  # 4 parts of size // 4, and a remainder of 3 bytes
    data = random.Random(2).randbytes(size)
    sink = upload.ObjectSink(open_store(url), url, size)
    for off in range(0, size, 3 * 2**20 + 1):
        sink.pwrite(memoryview(data)[off:off + 3 * 2**20 + 1], off)
    assert _settled_parts(s3, bucket, {"o/obj": size - 3}) == {"o/obj": size - 3}
    assert s3.keys(bucket) == {} and _head_404(s3, bucket, "o/obj")
    sink.finish()
    assert sink.part == size // 4 >= upload.MIN_PART_BYTES and sink.held == size % 4 == 3
    for n in (1, 5 * 2**20 - 1, 5 * 2**20, 17 * 2**20 + 1, 10**12, 5 * 10**12):  # the bound, whatever the size
        part = upload.exact_part_size(n)
        assert n % part < upload.MAX_PARTS and -(-n // part) <= upload.MAX_PARTS
        assert part >= upload.MIN_PART_BYTES or part == n
    sink.complete()
    assert bytes(obstore.get(open_store(url), url.prefix).bytes()) == data
    assert s3.uploads(bucket) == []


def test_force_deletes_nothing_a_hostile_marker_names_outside_the_prefix(s3, bucket, case_dir):
    """Our marker format, but its file list names objects beside and above the output: they stay."""
    client = s3.client()
    marker = {"format": "vllm-consolidate-output", "files": ["../other/x", "/abs", "a//b", "old.safetensors"]}
    objects = {"m/.vllm-consolidate.json": json.dumps(marker).encode(), "m/old.safetensors": b"old",
               "other/x": b"not ours", "m/a/b": b"a user's"}
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    assert cli.convert_main(["--input", str(case_dir(DS) / "ckpt"), "--output", f"s3://{bucket}/m",
                             "--no-validate-vllm", "--force"]) == 0
    keys = s3.keys(bucket)
    assert "other/x" in keys and "m/a/b" in keys  # named by the marker, but outside the prefix or not a clean key
    assert "m/old.safetensors" not in keys  # listed by our old marker, inside the prefix: replaced
    assert "m/model.safetensors" in keys


def test_force_refuses_an_oversized_marker(s3, bucket, case_dir):
    """A marker is read only up to 1 MiB: a larger object is not ours, whatever it holds."""
    big = json.dumps({"format": "vllm-consolidate-output", "pad": "x" * (1 << 20)}).encode()
    s3.client().put_object(Bucket=bucket, Key="m/.vllm-consolidate.json", Body=big)
    assert cli.convert_main(["--input", str(case_dir(DS) / "ckpt"), "--output", f"s3://{bucket}/m",
                             "--no-validate-vllm", "--force"]) == 6
    assert list(s3.keys(bucket)) == ["m/.vllm-consolidate.json"]
