"""``batch`` over object storage (issue 27) against a real S3 endpoint on loopback (moto's server), and the
main case also against Azure's (Azurite, ``az://``; see tests/azurite.py).

The inputs are the ZeRO-3 case the single-conversion S3 tests upload (two copies: two jobs), the outputs
are compared byte for byte with a local ``convert`` of the same checkpoint, and the bucket is read back
through boto3 (an independent client; for Azure, tests/azurite.py's SharedKey client). What is checked:
s3 -> s3 (and az -> az) and s3 -> local give the local conversion's files; the batch state lives in the
store (one manifest object written by the driver, a lock object removed at the end; source ETags, never
storage options or credentials); a rerun skips finished jobs; a job that fails at run time is reported with
its exit code and leaves nothing under its output prefix (nor a staged object or an open multipart upload);
``--dry-run`` plans from the listing and writes nothing; no local state is left behind (the temporary
folders are removed).
"""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path

import pytest
from tests import azurite, s3_server

from vllm_consolidate import cli
from vllm_consolidate.batch import objects
from vllm_consolidate.cli import batch as cli_batch

DS = "qwen2_z3_w2_bf16_tied"  # ZeRO-3, world size 2, tied embeddings, config + tokenizer in the save folder
MARKER = ".vllm-consolidate.json"
FAST = ["--no-validate-vllm"]
RUNS = ("r1", "r2")


@pytest.fixture(scope="module")
def s3():
    with s3_server.start() as server:
        yield server


@pytest.fixture(scope="module")
def az():
    with azurite.start() as server:
        yield server


def _fresh_bucket(server, monkeypatch, tmp_path) -> str:
    """A fresh bucket (container), the environment pointing at the server, and a private TMPDIR (checked empty
    after). ``server`` is an :class:`tests.s3_server.S3Server` or an :class:`tests.azurite.Azurite`."""
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))  # the spawned workers' temporary folders
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # this process's (the driver's mirror)
    name = f"batch-{uuid.uuid4().hex[:12]}"
    server.create_bucket(name)
    return name


@pytest.fixture
def bucket(s3, monkeypatch, tmp_path) -> str:
    return _fresh_bucket(s3, monkeypatch, tmp_path)


@pytest.fixture(params=["s3", "az"])
def store(request, monkeypatch, tmp_path) -> tuple[str, object, str]:
    """``(scheme, server, bucket)``: a fresh bucket in moto's S3, or a fresh container in Azurite."""
    server = request.getfixturevalue(request.param)
    return request.param, server, _fresh_bucket(server, monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def reference(case_dir, tmp_path_factory) -> dict[str, bytes]:
    """The files of a local ``convert`` of the case (the CLI's defaults, as batch applies them)."""
    out = tmp_path_factory.mktemp("ref") / "model"
    assert cli.main(["convert", "--input", str(case_dir(DS) / "ckpt"), "--output", str(out), *FAST]) == 0
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _etags(s3, bucket: str, prefix: str) -> dict[str, str]:
    return s3.etags(bucket, prefix)


def _objects(s3, bucket: str, prefix: str) -> dict[str, bytes]:
    return {k[len(prefix) + 1:]: s3.get(bucket, k) for k in s3.keys(bucket, prefix + "/")}


def _same_as_reference(files: dict[str, bytes], reference: dict[str, bytes]) -> None:
    assert sorted(files) == sorted(reference)
    for rel in reference:
        if rel != MARKER:  # the marker holds the time and the input's location
            assert files[rel] == reference[rel], rel


def _runs(s3, bucket: str, case_dir) -> dict[str, str]:
    for run in RUNS:
        s3.upload_folder(bucket, case_dir(DS) / "ckpt", f"runs/{run}")
    return _etags(s3, bucket, "runs/")


def _report(path: Path) -> dict:
    return json.loads(path.read_text())


def test_s3_to_s3_is_the_local_conversion_and_a_rerun_skips(store, case_dir, reference, tmp_path, monkeypatch):
    """s3:// -> s3:// (and az:// -> az:// on Azurite: the same checks, the lock and manifest as blobs)."""
    scheme, s3, bucket = store
    etags = _runs(s3, bucket, case_dir)
    monkeypatch.chdir(tmp_path)
    top = f"{scheme}://{bucket}"
    args = ["batch", "--input-dir", f"{top}/runs", "--output-dir", f"{top}/models", *FAST,
            "--max-workers", "2", "--report", str(tmp_path / "r.json")]
    assert cli.main(args) == 0
    names = [f"{run}_step_2" for run in RUNS]
    for name in names:
        _same_as_reference(_objects(s3, bucket, f"models/{name}"), reference)
        assert json.loads(s3.get(bucket, f"models/{name}/{MARKER}"))["input"] == f"{top}/runs/{name[:2]}"
    manifest = json.loads(s3.get(bucket, f"models/{objects.MANIFEST_KEY}"))
    assert manifest["format"] == objects.MANIFEST_FORMAT and sorted(manifest["jobs"]) == names
    entry = manifest["jobs"]["r1_step_2"]
    assert entry["source"]["checkpoint"] == f"{top}/runs/r1/global_step2"
    assert all(k.startswith(f"{top}/runs/r1/") for k in entry["source_files"])  # URLs and ETags, not stand-ins
    assert {v[1] for v in entry["source_files"].values()} <= set(etags.values())
    assert sorted(entry["files"]) == sorted(reference)
    secrets = [value for key, value in s3.env.items() if key.endswith("_KEY") or key.endswith("_KEY_ID")]
    assert secrets and "storage_options" not in json.dumps(manifest)
    assert not [secret for secret in secrets if secret in json.dumps(manifest)]
    report = _report(tmp_path / "r.json")
    assert [j["input"] for j in report["jobs"]] == [f"{top}/runs/{run}" for run in RUNS]
    # Only the inputs, the outputs and the manifest: no staging prefix, no lock, no open upload, inputs unchanged.
    assert set(s3.keys(bucket)) == set(etags) | {f"models/{n}/{rel}" for n in names for rel in reference} | {
        f"models/{objects.MANIFEST_KEY}"}
    assert s3.uploads(bucket) == [] and _etags(s3, bucket, "runs/") == etags
    before = _etags(s3, bucket, "models/")
    assert cli.main(args) == 0
    assert _report(tmp_path / "r.json")["counts"] == {"done": 0, "skipped": 2, "failed": 0, "not_run": 0}
    assert _etags(s3, bucket, "models/") == before  # nothing rewritten, not even the manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "tmpdir"]  # the driver's cwd: only the report
    assert list((tmp_path / "tmpdir").iterdir()) == []  # the mirrors were removed: no local state


def test_failed_job_leaves_nothing_under_its_output(store, case_dir, tmp_path, monkeypatch):
    """A rank object vanishes between planning and the run: the job fails in its worker with the exit code
    ``convert`` would give, and its output prefix stays empty (nothing staged left, no open upload). On S3 and
    on Azurite."""
    scheme, s3, bucket = store
    etags = _runs(s3, bucket, case_dir)
    gone = "runs/r2/global_step2/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    real_plan = cli_batch.plan_batch

    def plan_then_delete(opts):
        plan = real_plan(opts)
        s3.delete(bucket, gone)
        return plan

    monkeypatch.setattr(cli_batch, "plan_batch", plan_then_delete)
    top = f"{scheme}://{bucket}"
    code = cli.main(["batch", "--input-dir", f"{top}/runs", "--output-dir", f"{top}/models", *FAST,
                     "--max-workers", "1", "--continue-on-error", "--report", str(tmp_path / "r.json")])
    assert code == 11
    jobs = {j["output"]: j for j in _report(tmp_path / "r.json")["jobs"]}
    bad = jobs[f"{top}/models/r2_step_2"]
    # CorruptCheckpointError, exit 4: what convert says of a local checkpoint missing a rank's file.
    assert bad["status"] == "failed" and bad["error"]["exit_code"] == 4, bad["error"]
    assert bad["error"]["path"] == f"{top}/{gone}" and "rank 1 is missing" in bad["error"]["message"]
    assert jobs[f"{top}/models/r1_step_2"]["status"] == "done"
    assert s3.keys(bucket, "models/r2_step_2") == {}
    assert [k for k in s3.keys(bucket, "models/") if not k.startswith("models/r1_step_2/")] == [
        f"models/{objects.MANIFEST_KEY}"]
    assert list(json.loads(s3.get(bucket, f"models/{objects.MANIFEST_KEY}"))["jobs"]) == ["r1_step_2"]
    assert s3.uploads(bucket) == []
    assert {k: v for k, v in _etags(s3, bucket, "runs/").items()} == {k: v for k, v in etags.items() if k != gone}


def test_s3_input_to_local_output_and_dry_run(s3, bucket, case_dir, reference, tmp_path, monkeypatch, capsys):
    """``--dry-run`` plans from the listing (writes nothing, names URLs); the run writes local folders whose
    manifests name the source by URL and ETag, so a rerun finds them up to date."""
    etags = _runs(s3, bucket, case_dir)
    out = tmp_path / "out"
    args = ["batch", "--input-pattern", f"s3://{bucket}/runs/r{{1,9}}", "--output-dir", str(out), *FAST]
    assert cli.main([*args, "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert f"s3://{bucket}/runs/r1 [global_step2]" in plan and "1 to convert" in plan, plan
    assert not out.exists() and "vllmc-mirror" not in plan
    assert cli.main(args) == 0
    folder = out / "r1_step_2"
    _same_as_reference({p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()},
                       reference)
    manifest = json.loads((folder / MARKER).read_text())
    assert manifest["source"]["checkpoint"] == f"s3://{bucket}/runs/r1/global_step2"
    assert all(k.startswith(f"s3://{bucket}/runs/r1/") for k in manifest["source_files"])
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "0 done, 1 skipped (up to date)" in capsys.readouterr().out
    assert _etags(s3, bucket, "runs/") == etags and set(s3.keys(bucket)) == set(etags)
    assert list((tmp_path / "tmpdir").iterdir()) == []


def test_local_input_to_s3_output_and_one_batch_per_prefix(s3, bucket, case_dir, reference, tmp_path, capsys):
    """A local checkpoint into an s3:// --output-dir; then the lock object, created only if absent: a batch
    finding it (another batch's, or a killed one's) stops before converting anything and leaves it alone."""
    args = ["batch", "--input-dir", str(case_dir(DS) / "ckpt"), "--output-dir", f"s3://{bucket}/models", *FAST]
    assert cli.main([*args, "--report", str(tmp_path / "s3.json")]) == 0
    _same_as_reference(_objects(s3, bucket, "models/ckpt_step_2"), reference)
    _estimate_counts_the_upload(args, case_dir(DS) / "ckpt", tmp_path)
    assert list(json.loads(s3.get(bucket, f"models/{objects.MANIFEST_KEY}"))["jobs"]) == ["ckpt_step_2"]
    s3.client().put_object(Bucket=bucket, Key=f"models/{objects.LOCK_KEY}", Body=b"{}")
    before = _etags(s3, bucket, "models/")
    capsys.readouterr()
    assert cli.main([*args, "--force"]) == 11
    assert "another batch is writing to this output prefix" in capsys.readouterr().err
    assert _etags(s3, bucket, "models/") == before  # nothing replaced, and its lock is not ours to delete


def _estimate_counts_the_upload(args: list[str], ckpt: Path, tmp_path: Path) -> None:
    """The job's RAM estimate (``write.estimates``) is a local output's (a dry run's) plus the upload's buffers
    (the held config and tokenizer among them), and covers the peak RSS its worker reported; with validation (a dry
    run) it also counts the ranges the validation keeps."""
    from vllm_consolidate.conversion import ConvertOptions, plan_conversion
    from vllm_consolidate.convert import validation_ranges
    from vllm_consolidate.write.estimates import upload_buffers

    def dry_run(*argv: str) -> dict:
        assert cli.main([*argv, "--dry-run", "--report", str(tmp_path / "dry.json")]) == 0
        (job,) = json.loads((tmp_path / "dry.json").read_text())["jobs"]
        return job

    (job,) = json.loads((tmp_path / "s3.json").read_text())["jobs"]
    local = dry_run("batch", "--input-dir", str(ckpt), "--output-dir", str(tmp_path / "local"), *FAST)
    conv = plan_conversion(ConvertOptions(input=ckpt, output=tmp_path / "never"))
    held = sum(p.stat().st_size for p in (conv.assets.config, conv.assets.generation_config,
                                          *conv.assets.tokenizer_files) if p is not None)
    assert held > 0 and job["est_peak_ram_bytes"] - local["est_peak_ram_bytes"] == upload_buffers(conv.plan, held)
    assert 0 < job["peak_rss_bytes"] <= job["est_peak_ram_bytes"]
    kept = sum(b - a for f in conv.plan.files for a, b in validation_ranges(conv, f.filename))
    validated = dry_run(*[a for a in args if a not in FAST])
    assert 0 < kept and validated["est_peak_ram_bytes"] - job["est_peak_ram_bytes"] == kept


def test_a_dead_batch_lock_is_taken_over_and_a_live_or_foreign_one_is_not(s3, bucket, case_dir, capsys):
    """A lock whose holder provably died (this machine, boot and PID namespace; no such PID) is taken over; one held
    by a live process, on another boot, or not in our format stops the batch (exit 11) and is left as it was."""
    import subprocess
    import sys

    from vllm_consolidate.storage.staging import machine_identity

    args = ["batch", "--input-dir", str(case_dir(DS) / "ckpt"), "--output-dir", f"s3://{bucket}/models", *FAST]
    key, client = f"models/{objects.LOCK_KEY}", s3.client()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = {"format": objects.LOCK_FORMAT, **machine_identity(), "pid": gone.pid}
    for held in ({**dead, "pid": s3.process.pid}, {**dead, "boot_id": "another boot"}, {**dead, "format": "x"}):
        client.put_object(Bucket=bucket, Key=key, Body=json.dumps(held).encode())
        capsys.readouterr()
        assert cli.main(args) == 11, held
        assert "another batch is writing to this output prefix" in capsys.readouterr().err
        assert json.loads(s3.get(bucket, key)) == held
    assert s3.keys(bucket, "models/ckpt_step_2/") == {}
    client.put_object(Bucket=bucket, Key=key, Body=json.dumps(dead).encode())
    assert cli.main(args) == 0
    assert MARKER in [k.rpartition("/")[2] for k in s3.keys(bucket, "models/ckpt_step_2/")]
    assert key not in s3.keys(bucket, "models/")  # taken over, then released like our own


def test_of_two_batches_racing_for_a_dead_lock_only_one_takes_it(s3, bucket, monkeypatch):
    from vllm_consolidate.storage import staging
    from vllm_consolidate.storage.urls import parse_object_url

    key, client = f"models/{objects.LOCK_KEY}", s3.client()
    client.put_object(Bucket=bucket, Key=key, Body=json.dumps({"format": objects.LOCK_FORMAT, "pid": 1}).encode())
    winner = json.dumps({"format": objects.LOCK_FORMAT, "winner": True}).encode()

    def the_other_batch_wins_first(record):  # it replaces the dead lock between our read and our write
        client.put_object(Bucket=bucket, Key=key, Body=winner)
        return True

    monkeypatch.setattr(staging, "run_is_dead", the_other_batch_wins_first)
    outputs = objects.ObjectOutputs(parse_object_url(f"s3://{bucket}/models"), {})
    assert outputs._take_dead_lock(b"ours") is False  # If-Match: the ETag we read is no longer the lock's
    assert s3.get(bucket, key) == winner
