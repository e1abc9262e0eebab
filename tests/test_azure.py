"""``az://`` in and out, end to end, against a real Azure Blob endpoint on loopback (Azurite 3.35.0, Microsoft's
emulator, in memory; see tests/azurite.py and scripts/setup_azurite.sh).

What the test sees of the container goes through a minimal SharedKey client of the Blob REST API
(:class:`tests.azurite.Azurite`), not through obstore (the code under test):

* A ZeRO-3 corpus case uploaded to ``az://`` converts to exactly the files and bytes of the local conversion; the
  source blobs are unchanged (ETags, MD5s). The store is configured as a user does for an emulator, in
  ``--storage-options`` (account, key, ``http://`` endpoint).
* ``--output az://…`` (configured by the standard environment alone: ``AZURE_STORAGE_ACCOUNT_NAME``,
  ``…_ACCOUNT_KEY``, ``…_ENDPOINT``) commits blobs byte-identical to the local conversion, validated before the
  commit; the weights are uncommitted blocks of the output's own blobs until then (all their bytes at the server,
  nothing listed, GET 404); the commit (Put Block List and PUTs, no copy) ends with config.json and our marker;
  no staging blob is left.
* A truncated rank file and a failure after everything was written leave nothing under the output prefix and
  no staging blob. ``az://`` -> ``az://`` works, ``--force`` replaces our output, ``inspect`` and ``validate
  --against`` take ``az://`` URLs.
* The batch lock's conditional PUTs (create-if-absent, replace-if-ETag-matches) behave on Azure as on S3.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import time

import pytest
from tests import azurite
from tests.test_s3_input import _cli, _same_output

from vllm_consolidate.convert import ConvertOptions, convert
from vllm_consolidate.errors import ValidationFailedError

DS = "qwen2_z3_w2_bf16_tied"  # ZeRO-3, world size 2, tied embeddings, tokenizer + chat template + generation config
CONTAINER = "vllmc"
MARKER = ".vllm-consolidate.json"
SRC = f"in/{DS}/ckpt"


@pytest.fixture(scope="module")
def az():
    with azurite.start() as server:
        server.create_container(CONTAINER)
        yield server


@pytest.fixture(scope="module")
def uploaded(az):
    """The DS case's input folder, uploaded under :data:`SRC`, and its blobs (``{name: (size, ETag, MD5)}``)."""
    from tests.corpus import build

    local = build.build_all([DS])[DS] / "ckpt"
    return local, az.upload_folder(CONTAINER, local, SRC)


@pytest.fixture(scope="module")
def local_out(uploaded, tmp_path_factory):
    """The local conversion of the DS case (what every az:// run must reproduce)."""
    out = tmp_path_factory.mktemp("azure") / "local"
    code, _, err = _cli("convert", "--input", uploaded[0], "--output", out, "--no-validate-vllm")
    assert code == 0, err
    return out


@pytest.fixture
def az_env(az, monkeypatch):
    """The standard Azure environment pointing at Azurite (no ``--storage-options``)."""
    for key, value in az.env.items():
        monkeypatch.setenv(key, value)
    return az


def _files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_objects(az, prefix: str, local_out, url_in: str) -> None:
    """The blobs under ``prefix/`` are the local conversion's files (the marker: but for its time and input)."""
    local = _files(local_out)
    remote = {k[len(prefix) + 1:]: az.get(CONTAINER, k) for k in az.blobs(CONTAINER, prefix + "/")}
    assert sorted(remote) == sorted(local)
    for rel in local:
        if rel != MARKER:
            assert remote[rel] == local[rel], rel
    marker, mine = json.loads(remote[MARKER]), json.loads(local[MARKER])
    assert marker["input"] == url_in and marker["files"] == mine["files"] and marker["format"] == mine["format"]


def test_zero3_converts_from_az_bit_identical(az, uploaded, local_out, tmp_path):
    local, before = uploaded
    assert len(before) == sum(1 for p in local.rglob("*") if p.is_file())
    url = f"az://{CONTAINER}/{SRC}"
    options = json.dumps({"account_name": azurite.ACCOUNT, "account_key": azurite.KEY, "endpoint": az.endpoint})
    code, out, err = _cli("convert", "--input", url, "--output", tmp_path / "remote", "--no-validate-vllm",
                          "--storage-options", options)
    assert code == 0, err
    _same_output(local_out, tmp_path / "remote", url)
    assert "vllmc-mirror" not in out + err
    code, out, err = _cli("inspect", url, "--storage-options", options)
    assert code == 0 and "ZeRO-3, world size 2" in out and f"{url}/global_step2" in out, err
    assert az.blobs(CONTAINER, f"{SRC}/") == before  # the input is untouched (ETags, MD5s)


def test_output_is_the_local_conversion_committed_marker_last(az_env, uploaded, local_out, monkeypatch):
    """Local input, ``--output az://…``, validation on (before the commit, from what the run holds); every step of
    the commit (a Put Block List, or a PUT of a held file; never a server-side copy) is recorded with what the
    output held at that moment."""
    from tests.test_s3_output import record_commit

    order, _, copies = record_commit(lambda: sorted(az_env.blobs(CONTAINER, "models/m/")), monkeypatch)
    result = convert(ConvertOptions(input=uploaded[0], output=f"az://{CONTAINER}/models/m", validate=True))
    assert result.validation is not None and result.validation["ok"], result.validation
    _same_objects(az_env, "models/m", local_out, str(uploaded[0].resolve()))
    names = [to for to, _ in order]
    assert sorted(names) == sorted(f"models/m/{rel}" for rel in _files(local_out))
    assert names[-2:] == ["models/m/config.json", f"models/m/{MARKER}"]
    assert order[0][1] == []  # nothing under the output before the commit's first step
    assert all(f"models/m/{MARKER}" not in seen for _, seen in order)  # the marker appears last...
    assert sorted([*order[-1][1], f"models/m/{MARKER}"]) == sorted(names) and len(set(names)) == len(names)  # ...last
    assert set(az_env.blobs(CONTAINER, "models/")) == set(names)  # no staging blob left beside the output
    assert copies == []


def test_az_input_to_az_output_and_force(az_env, uploaded, local_out):
    """az:// -> az://, validated; then ``--force`` replaces our output (server-side copies over existing blobs)."""
    url = f"az://{CONTAINER}/{SRC}"
    result = convert(ConvertOptions(input=url, output=f"az://{CONTAINER}/models/from-az"))
    assert result.validation is not None and result.validation["ok"]
    _same_objects(az_env, "models/from-az", local_out, url)
    before = az_env.blobs(CONTAINER, "models/from-az/")
    args = ["convert", "--input", url, "--output", f"az://{CONTAINER}/models/from-az", "--no-validate-vllm"]
    assert _cli(*args)[0] == 6  # exists, no --force
    code, _, err = _cli(*args, "--force")
    assert code == 0, err
    _same_objects(az_env, "models/from-az", local_out, url)
    after = az_env.blobs(CONTAINER, "models/from-az/")
    assert after.keys() == before.keys() and all(after[k][1] != before[k][1] for k in after)  # every blob rewritten
    code, out, err = _cli("validate", f"az://{CONTAINER}/models/from-az", "--against", url)
    assert code == 0 and "source_values" in out and "0 failed" in out, out + err
    assert not [k for k in az_env.blobs(CONTAINER, "models/") if k.startswith("models/.from-az.")]
    assert az_env.blobs(CONTAINER, f"{SRC}/") == uploaded[1]


def _under(az, top: str) -> list[str]:
    """Every blob under ``top/``: the output prefix, and any staging prefix beside it."""
    return sorted(az.blobs(CONTAINER, f"{top}/"))


def test_truncated_rank_file_leaves_nothing(az_env, uploaded, tmp_path):
    """The local exit code, and no blob under the output prefix or a staging prefix beside it."""
    copy = tmp_path / "ckpt"
    shutil.copytree(uploaded[0], copy)
    (victim,) = copy.rglob("*rank_1_mp_rank_00_optim_states.pt")
    os.truncate(victim, victim.stat().st_size // 2)
    code_local, _, err_local = _cli("convert", "--input", copy, "--output", tmp_path / "local", "--no-validate-vllm")
    code, _, err = _cli("convert", "--input", copy, "--output", f"az://{CONTAINER}/broken/m", "--no-validate-vllm")
    assert code == code_local and code in (3, 4), (err_local, err)
    assert _under(az_env, "broken") == []


def _uncommitted(az, key: str) -> int:
    """Bytes in the uncommitted blocks of blob ``key`` (Get Block List), asked of Azurite."""
    status, _, body = az.request("GET", f"/{CONTAINER}/{key}", query={"comp": "blocklist",
                                                                     "blocklisttype": "uncommitted"})
    if status == 404:
        return 0
    assert status == 200, (status, body)
    return sum(int(n) for n in re.findall(r"<Size>(\d+)</Size>", body.decode()))


def test_failure_after_writing_leaves_nothing(az_env, uploaded, local_out, monkeypatch):
    """Everything is written: the weights are uncommitted blocks of the output's blob (all their bytes at the
    server), yet no blob is listed under the output and a GET of it is 404; validation then fails: nothing is left."""
    seen: dict = {"size": (local_out / "model.safetensors").stat().st_size}  # < 5 MiB: one block, all at the server

    def fail_validation(*args, **kwargs):
        seen["all"] = _under(az_env, "failed")
        seen["get"] = az_env.request("GET", f"/{CONTAINER}/failed/m/model.safetensors")[0]
        deadline = time.monotonic() + 20  # the file's last block may still be in flight after its last write
        while (blocks := _uncommitted(az_env, "failed/m/model.safetensors")) != seen["size"] and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        seen["blocks"] = blocks
        raise ValidationFailedError("injected", path="failed/m")

    monkeypatch.setattr(importlib.import_module("vllm_consolidate.convert"), "validate_staged", fail_validation)
    with pytest.raises(ValidationFailedError):
        convert(ConvertOptions(input=uploaded[0], output=f"az://{CONTAINER}/failed/m", validate=True))
    assert len(seen["all"]) == 1 and seen["all"][0].startswith("failed/.m.vllmc-staging-")  # the run record alone
    assert seen["get"] == 404 and seen["blocks"] == seen["size"] > 0
    assert _under(az_env, "failed") == []


def test_batch_lock_conditional_puts(az_env, monkeypatch):
    """The batch lock's two conditional PUTs, as Azure answers them: create-if-absent (``If-None-Match: *``, 409 when
    the blob exists) and replace-if-unchanged (``If-Match`` with the ETag read, 412 once another batch replaced it)."""
    from vllm_consolidate.batch import objects
    from vllm_consolidate.errors import BatchError
    from vllm_consolidate.storage import staging
    from vllm_consolidate.storage.urls import parse_object_url

    key = f"batch/{objects.LOCK_KEY}"
    outputs = objects.ObjectOutputs(parse_object_url(f"az://{CONTAINER}/batch"), {})
    with outputs.lock():
        assert json.loads(az_env.get(CONTAINER, key))["pid"] == os.getpid()
        with pytest.raises(BatchError, match="another batch is writing"):
            objects.ObjectOutputs(parse_object_url(f"az://{CONTAINER}/batch"), {})._put(objects.LOCK_KEY, b"x",
                                                                                       mode="create")
    assert key not in az_env.blobs(CONTAINER, "batch/")  # released
    dead = json.dumps({"format": objects.LOCK_FORMAT, "pid": 1}).encode()
    winner = json.dumps({"format": objects.LOCK_FORMAT, "winner": True}).encode()
    az_env.put(CONTAINER, key, dead)

    def the_other_batch_wins_first(record):  # it replaces the dead lock between our read and our write
        az_env.put(CONTAINER, key, winner)
        return True

    monkeypatch.setattr(staging, "run_is_dead", the_other_batch_wins_first)
    assert outputs._take_dead_lock(b"ours") is False  # If-Match: the ETag we read is no longer the lock's
    assert az_env.get(CONTAINER, key) == winner
    monkeypatch.setattr(staging, "run_is_dead", lambda record: True)
    assert outputs._take_dead_lock(b"ours") is True  # the ETag still matches: replaced
    assert az_env.get(CONTAINER, key) == b"ours"
