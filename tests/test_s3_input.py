"""Object storage as an input, end to end, against a real S3 endpoint (moto's server on loopback, behind a
counting proxy; see ``tests/moto_s3.py``).

* Every corpus family converts from ``s3://`` to exactly the files and bytes the local conversion of the same
  folder writes (the marker differs only in its time and in naming the URL).
* The source objects are unchanged (ETags), a missing or truncated rank object gives the local exit code with
  nothing published, a hostile listing is refused.
* What the server was asked for, for a ZeRO-3 checkpoint, is only the fp32 master ranges and the metadata:
  counted at the proxy, with the rank files' layout read by ``zipfile`` and ``pickletools`` (not our reader).
* ``inspect`` and ``validate`` take URLs too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickletools
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest
from tests import moto_s3

from vllm_consolidate import cli
from vllm_consolidate.storage import remote

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the Hub
BUCKET = "corpus-input"
MARKER = ".vllm-consolidate.json"

#: (builder, case, extra convert options given the case folder): one case of each family.
FAMILIES = {
    "zero1": ("ds", "mistral_z1_w3_bf16", lambda c: []),
    "zero2": ("ds", "llama_z2rr_w3_bf16", lambda c: []),
    "zero3": ("ds", "qwen2_z3_w2_bf16_tied", lambda c: []),
    "zero3_moe": ("ds", "qwen3moe_z3_w2_bf16", lambda c: []),
    "trainer_checkpoint": ("ds", "trainer_qwen2_z2_bf16", lambda c: []),
    "hf_sharded": ("ds", "hf_llama_sharded_bf16", lambda c: []),
    "fsdp_dcp": ("fsdp", "trainer_fsdp_qwen2_tied", lambda c: []),
    "verl": ("fsdp", "verl_qwen2_w2_tied", lambda c: []),
    "lora_merge": ("lora", "lora_qwen2_z3_tied", lambda c: ["--base-model-name", str(c / "base")]),
    "megatron": ("megatron", "mcore_qwen2_tp2_bf16_tied", lambda c: ["--base-model-name", str(c / "hf")]),
}


def _build(builder: str, names: list[str]) -> dict[str, Path]:
    from tests.corpus import build, fsdp_build, lora_build, megatron_build

    module = {"ds": build, "fsdp": fsdp_build, "lora": lora_build, "megatron": megatron_build}[builder]
    return module.build_all(names)


def _input_of(case: Path) -> str:
    return json.loads((case / "case.json").read_text())["input"]


def _cli(*argv: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def uploaded(s3) -> dict[str, tuple[Path, str, list[str], dict[str, str]]]:
    """``{family: (local input folder, its s3:// URL, extra options, {key: ETag} at upload)}``."""
    s3.client.create_bucket(Bucket=BUCKET)
    by_builder: dict[str, list[str]] = {}
    for builder, name, _ in FAMILIES.values():
        by_builder.setdefault(builder, []).append(name)
    cases = {name: path for builder, names in by_builder.items() for name, path in _build(builder, names).items()}
    out = {}
    for family, (_, name, extra) in FAMILIES.items():
        case = cases[name]
        local = case / _input_of(case)
        prefix = f"{family}/{name}/{local.name}"
        etags = moto_s3.upload_folder(s3.client, BUCKET, local, prefix)
        out[family] = (local, f"s3://{BUCKET}/{prefix}", extra(case), etags)
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_output(local: Path, remote_out: Path, url: str) -> None:
    a, b = _files(local), _files(remote_out)
    assert sorted(a) == sorted(b)
    for name in a:
        if name != MARKER:
            assert a[name] == b[name], f"{name} differs"
    ma, mb = json.loads(a[MARKER]), json.loads(b[MARKER])
    assert mb["input"] == url and mb["source"].startswith(url)
    for m in (ma, mb):
        for key in ("created", "input", "source"):
            m.pop(key)
    assert ma == mb


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_converts_from_s3_bit_identical(family, uploaded, s3, tmp_path):
    local, url, extra, etags = uploaded[family]
    code, _, err = _cli("convert", "--input", local, "--output", tmp_path / "local", "--no-validate-vllm", *extra)
    assert code == 0, err
    code, out, err = _cli("convert", "--input", url, "--output", tmp_path / "remote", "--no-validate-vllm", *extra)
    assert code == 0, err
    _same_output(tmp_path / "local", tmp_path / "remote", url)
    assert "vllmc-mirror" not in out + err  # the summary names URLs, not stand-ins
    assert moto_s3.etags_of(s3.client, BUCKET, url.split("/", 3)[3]) == etags  # the input is untouched
    assert not [p for p in remote._registry if url in remote._registry[p].url]  # mirror closed


def _storage_roles(pkl: bytes) -> dict[str, str]:
    """``{storage key: role}`` of a DeepSpeed optimizer-state pickle, from its opcodes (pickletools, not our reader).

    A tensor is pickled as ``'storage', <type>, key, 'cpu', numel`` after the dict key that holds it; the role
    is the last such key seen (``exp_avg``, ``exp_avg_sq``, ``step``, ``fp32_flat_groups``).
    """
    roles: dict[str, str | None] = {}
    role, expect_key, memo, last = None, False, {}, None
    for op, arg, _ in pickletools.genops(pkl):
        if op.name in ("BINPUT", "LONG_BINPUT"):  # a repeated string is pickled once, then fetched from the memo
            memo[arg] = last
            continue
        text = memo.get(arg) if op.name in ("BINGET", "LONG_BINGET") else arg if "UNICODE" in op.name else None
        last = text
        if not isinstance(text, str):
            continue
        if expect_key:
            roles[text], expect_key = role, False
        elif text == "storage":
            expect_key = True
        elif text in ("exp_avg", "exp_avg_sq", "step", "fp32_flat_groups", "param_groups", "ds_config"):
            role = text
    return roles


def _zero_layout(folder: Path) -> tuple[dict[str, list[tuple[int, int]]], dict[str, list[tuple[int, int]]], int]:
    """Per optimizer file: (fp32 master spans, every other tensor's data span: Adam moments, steps) and the bytes
    a consolidator may read: the fp32 masters, every other file whole, and of each optimizer file all but its
    tensor data (zip records, ``data.pkl``)."""
    fp32: dict[str, list[tuple[int, int]]] = {}
    other: dict[str, list[tuple[int, int]]] = {}
    allowed = 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(folder).as_posix()
        if not path.name.endswith("optim_states.pt"):
            allowed += path.stat().st_size
            continue
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            (pkl,) = [i for i in infos if i.filename.endswith("/data.pkl")]
            roles = _storage_roles(zf.read(pkl))
            with open(path, "rb") as fh:
                spans = {}
                for info in infos:
                    fh.seek(info.header_offset + 26)
                    n, m = int.from_bytes(fh.read(2), "little"), int.from_bytes(fh.read(2), "little")
                    spans[info.filename] = (info.header_offset + 30 + n + m, info.compress_size)
        data = {name.rsplit("/", 1)[1]: span for name, span in spans.items() if "/data/" in name}
        fp32[rel] = [(o, o + n) for key, (o, n) in data.items() if roles.get(key) == "fp32_flat_groups"]
        other[rel] = [(o, o + n) for key, (o, n) in data.items() if roles.get(key) != "fp32_flat_groups"]
        moments = [key for key in data if roles.get(key) in ("exp_avg", "exp_avg_sq")]
        assert fp32[rel] and len(moments) == 2 * len(fp32[rel])  # the parse found what Adam under ZeRO writes
        allowed += path.stat().st_size - sum(n for o, n in data.values()) + sum(e - s for s, e in fp32[rel])
    return fp32, other, allowed


def test_zero3_reads_only_fp32_masters_and_metadata_in_a_cli_child(uploaded, s3, tmp_path):
    """A CLI child process (AWS_* inherited); every GET counted at the proxy. Validation is off here: its
    sampled comparison with the source reads some fp32 rows a second time (nearly all of a model this small)."""
    local, url, extra, _ = uploaded["zero3"]
    fp32, other, allowed = _zero_layout(local)
    s3.proxy.clear()
    proc = subprocess.run([sys.executable, "-m", "vllm_consolidate", "convert", "--input", url, "--output",
                           str(tmp_path / "out"), "--no-validate-vllm", *extra], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    prefix = "/" + BUCKET + "/" + url.split("/", 3)[3] + "/"
    gets = s3.proxy.gets()
    total = sum(g.body_bytes for g in gets)
    assert gets and total <= allowed, (total, allowed)
    read_fp32 = 0
    for g in gets:
        rel = g.path.split("?")[0].removeprefix(prefix)
        span = g.span()
        assert span is not None, f"a whole-object GET of {rel}"
        for start, end in other.get(rel, []):  # Adam moments and step counters: never a byte
            assert span[1] <= start or span[0] >= end, f"{rel}: bytes {span} hold optimizer state, not masters"
        read_fp32 += sum(max(0, min(span[1], e) - max(span[0], s)) for s, e in fp32.get(rel, []))
    assert read_fp32 > 0.9 * sum(e - s for spans in fp32.values() for s, e in spans)  # the masters were read


def _damaged_copy(s3, local: Path, tmp_path: Path, how: str) -> tuple[Path, str]:
    """A copy of ``local`` with one rank's optimizer file missing or cut in half, locally and in the bucket."""
    copy = tmp_path / how / local.name
    shutil.copytree(local, copy)
    (victim,) = [p for p in copy.rglob("*rank_1_mp_rank_00_optim_states.pt")]
    if how == "missing":
        victim.unlink()
    else:
        os.truncate(victim, victim.stat().st_size // 2)
    prefix = f"damaged-{uuid.uuid4().hex[:8]}/{how}/{local.name}"
    moto_s3.upload_folder(s3.client, BUCKET, copy, prefix)
    return copy, f"s3://{BUCKET}/{prefix}"


@pytest.mark.parametrize("how", ["missing", "truncated"])
def test_a_damaged_rank_object_gives_the_local_exit_code_and_publishes_nothing(how, uploaded, s3, tmp_path):
    local, _, extra, _ = uploaded["zero3"]
    copy, url = _damaged_copy(s3, local, tmp_path, how)
    outs = tmp_path / "outs"
    outs.mkdir()
    code_local, _, err_local = _cli("convert", "--input", copy, "--output", outs / "local", *extra)
    code, _, err = _cli("convert", "--input", url, "--output", outs / "remote", *extra)
    assert code == code_local and code in (3, 4), (err_local, err)
    assert url in err and "vllmc-mirror" not in err  # the error names the object URL
    assert list(outs.iterdir()) == []  # nothing published, no temporary folder left


def test_hostile_listings_are_refused_by_the_cli(s3, tmp_path, monkeypatch):
    bucket = "hostile-listings"  # its own bucket: the test does not depend on another test's fixture
    s3.client.create_bucket(Bucket=bucket)
    s3.client.put_object(Bucket=bucket, Key="hostile/ckpt/latest", Body=b"global_step1")
    s3.client.put_object(Bucket=bucket, Key="hostile/ckpt/../../elsewhere/x.pt", Body=b"PK")
    code, _, err = _cli("convert", "--input", f"s3://{bucket}/hostile/ckpt", "--output", tmp_path / "o")
    assert code == 5 and "outside the input" in err, err
    s3.client.delete_object(Bucket=bucket, Key="hostile/ckpt/../../elsewhere/x.pt")
    for i in range(4):
        s3.client.put_object(Bucket=bucket, Key=f"hostile/ckpt/global_step1/{i}.pt", Body=b"PK")
    monkeypatch.setattr(remote, "MAX_OBJECTS", 3)
    code, _, err = _cli("convert", "--input", f"s3://{bucket}/hostile/ckpt", "--output", tmp_path / "o")
    assert code == 4 and "more than 3 objects" in err, err
    assert not (tmp_path / "o").exists()


def test_inspect_and_validate_take_urls(uploaded, s3, tmp_path):
    local, url, extra, _ = uploaded["trainer_checkpoint"]
    code, out, err = _cli("inspect", url, "--json", *extra)
    assert code == 0, err
    report = json.loads(out)
    (inp,) = report["inputs"]
    assert inp["chosen"].startswith(url) and "vllmc-mirror" not in out
    code_l, out_l, _ = _cli("inspect", local, "--json", *extra)
    here = json.loads(out_l)["inputs"][0]
    assert here["tensors"] == inp["tensors"]
    # The RAM estimate counts the read-ahead's fetched blocks, held in memory for an object-store input only.
    from vllm_consolidate.write.estimates import read_ahead_buffers
    assert {d: e["peak_ram_bytes"] - here["output"][d]["peak_ram_bytes"] for d, e in inp["output"].items()} == \
        dict.fromkeys(here["output"], read_ahead_buffers())
    code, out, err = _cli("inspect", url, "--checkpoint-dir", f"{url}/checkpoint-2", "--json", *extra)
    assert code == 0 and json.loads(out)["inputs"][0]["chosen"].startswith(f"{url}/checkpoint-2/"), out + err
    # validate an HF folder in the bucket (a conversion uploaded), against the checkpoint it came from, also there
    assert _cli("convert", "--input", local, "--output", tmp_path / "model", "--no-validate-vllm", *extra)[0] == 0
    moto_s3.upload_folder(s3.client, BUCKET, tmp_path / "model", "models/trainer-qwen2")
    code, out, err = _cli("validate", f"s3://{BUCKET}/models/trainer-qwen2", "--against", url, "--json")
    assert code == 0, out + err
    doc = json.loads(out)
    assert doc["status"] == "passed" and doc["path"] == f"s3://{BUCKET}/models/trainer-qwen2"
    assert any(c["name"] == "source_values" and c["status"] == "pass" for c in doc["checks"])
