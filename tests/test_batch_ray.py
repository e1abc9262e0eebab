"""``batch --executor ray`` (issue 17) on a real two-node Ray cluster on this machine.

The cluster: a head and one extra worker node started with ``ray start`` on loopback addresses
(127.0.0.2 and 127.0.0.3: Ray rewrites 127.0.0.1 to the machine's network address), 2 CPUs each, in
their own temp dir and on free ports. Each node's ``memory`` resource holds one job's RAM estimate
but not two, so Ray (admitting the tasks by the estimate they declare) runs one job per node at a
time and both nodes get jobs. Each node runs in its own process session; the fixture ends exactly
those processes (and the Ray workers under their raylets) by id at the end, even on failure. It does
not use ``ray stop``, which kills every Ray process on the machine by name.

Batches run as the real CLI in a subprocess (the driver), against the corpus's HF Trainer runs and
raw ZeRO checkpoints; inputs are never modified.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.corpus import build

from vllm_consolidate import batch as B
from vllm_consolidate.batch import ray_executor
from vllm_consolidate.cli import batch as cli_batch

psutil = pytest.importorskip("psutil")

needs_ray = pytest.mark.skipif(not ray_executor.ray_available(), reason="the 'ray' extra is not installed")

BIN = Path(sys.executable).parent
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
#: Each node's ``memory`` resource: one job's estimate (~0.47 GB for these models) fits, two do not.
NODE_MEMORY = 800 * 1024**2
TRAINER = ["trainer_qwen2_z2_bf16", "trainer_llama_z3_bf16", "trainer_llama_z3g16_bf16"]
ZERO = ["mistral_z2_w2_fp16_frozen", "qwen2_z3_w2_bf16_tied", "qwen2moe_z2_w2_bf16"]  # with config.json
HF = "hf_qwen2_single_fp32_tied"
BIG = "llama_big_z2_w2_bf16"  # ~74M parameters: a job that lasts long enough to kill its node mid-job
FAST = ["--no-validate-vllm"]
#: The manifest's fields that record when and how fast, not what.
TIMING = ("created",)
TIMING_RESULT = ("seconds",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_processes(procs: dict[int, psutil.Process]) -> None:
    """SIGTERM, then SIGKILL, each of ``procs`` (pid -> process), by id; waits up to 3 s after each signal."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs.values():
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        _, alive = psutil.wait_procs(list(procs.values()), timeout=3)
        procs = {p.pid: p for p in alive}
        if not procs:
            return


class Cluster:
    """A head and a worker node, each a ``ray start`` in its own session, under one private temp dir."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.address = f"{HEAD_IP}:{self.port}"
        # Every session (= process group) id ever started: a worker node restarted after its raylet was killed
        # is a new session, and the old one's processes (its log monitor) must be ended too.
        self.sessions: list[int] = []
        self.raylets: dict[str, psutil.Process] = {}
        # Token authentication with a token of its own (not ~/.ray/auth_token); the drivers get it too.
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                        RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                        # a dead node is noticed within ~2 s instead of Ray's default ~30 s
                        RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="500",
                        RAY_health_check_failure_threshold="3", RAY_health_check_initial_delay_ms="0")

    def _node_args(self, name: str, ip: str) -> list[str]:
        p = [free_port() for _ in range(6)]
        return ["--node-ip-address", ip, "--num-cpus", "2", "--memory", str(NODE_MEMORY),
                "--object-store-memory", str(100 * 1024**2), "--temp-dir", str(self.root / name),
                "--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
                "--metrics-export-port", str(p[2]), "--dashboard-agent-listen-port", str(p[3]),
                "--dashboard-agent-grpc-port", str(p[4]), "--runtime-env-agent-port", str(p[5]),
                "--disable-usage-stats", "--log-style", "record"]

    def tmpdir(self, name: str) -> Path:
        """The node's own TMPDIR (its Ray workers' temporary folders): no node sees another's."""
        return self.root / f"{name}-tmp"

    def _start(self, name: str, args: list[str]) -> None:
        self.tmpdir(name).mkdir(exist_ok=True)
        proc = subprocess.Popen([str(BIN / "ray"), "start", *args], env={**self.env, "TMPDIR": str(self.tmpdir(name))},
                                start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.sessions.append(proc.pid)
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, out[-3000:]
        deadline = time.monotonic() + 30
        while name not in self.raylets:
            for p in psutil.process_iter(["name"]):
                with contextlib.suppress(psutil.Error):
                    if p.info["name"] == "raylet" and os.getsid(p.pid) == proc.pid:
                        self.raylets[name] = p
            assert time.monotonic() < deadline, f"no raylet for the {name} node"
            time.sleep(0.1)

    def start_head(self) -> None:
        self._start("head", ["--head", "--port", str(self.port), "--ray-client-server-port", str(free_port()),
                             "--include-dashboard", "false", "--dashboard-port", str(free_port()),
                             *self._node_args("head", HEAD_IP)])

    def start_worker(self) -> None:
        self.raylets.pop("worker", None)
        self._start("worker", ["--address", self.address, *self._node_args("worker", WORKER_IP)])

    def worker_alive(self) -> bool:
        p = self.raylets.get("worker")
        return p is not None and p.is_running() and p.status() != psutil.STATUS_ZOMBIE

    def kill_worker_raylet(self) -> None:
        self.raylets["worker"].kill()

    def stop(self) -> None:
        """End every process of both nodes, by id: each session's members and the raylets' children."""
        procs: dict[int, psutil.Process] = {}
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(p.pid) in self.sessions:
                    procs[p.pid] = p
        for raylet in self.raylets.values():
            with contextlib.suppress(psutil.Error):
                procs.update({c.pid: c for c in raylet.children(recursive=True)})
        end_processes(procs)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="vc-ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    c = Cluster(root)
    try:
        c.start_head()
        c.start_worker()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
    # Nothing of the cluster outlives it (a restarted node's first session once left its log monitor running).
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(root) in arg for arg in p.info["cmdline"] or ()):
                left.append(" ".join(p.info["cmdline"])[:200])
    assert not left, left


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")


def _batch(cluster: Cluster, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """The CLI in a subprocess: the Ray driver (with the cluster's token in its environment)."""
    return subprocess.run([str(BIN / "vllm-consolidate"), "batch", *args], capture_output=True, text=True,
                          timeout=timeout, env=cluster.env)


def _ray(cluster: Cluster) -> list[str]:
    return ["--executor", "ray", "--ray-address", cluster.address]


def _input_list(path: Path, folders: list[Path]) -> Path:
    path.write_text("".join(f"{f}\n" for f in folders))
    return path


def _outputs(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if not p.name.startswith("."))


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != B.LOCK_NAME)


def _without_timing(manifest: dict) -> dict:
    m = {k: v for k, v in manifest.items() if k not in TIMING}
    m["result"] = {k: v for k, v in m["result"].items() if k not in TIMING_RESULT}
    return m


def _assert_same_outputs(a: Path, b: Path) -> None:
    """Every file byte-identical; the manifests identical but for when and how fast."""
    assert _outputs(a) == _outputs(b)
    for name in _outputs(a):
        files_a = sorted(p.relative_to(a / name) for p in (a / name).rglob("*") if p.is_file())
        files_b = sorted(p.relative_to(b / name) for p in (b / name).rglob("*") if p.is_file())
        assert files_a == files_b, name
        for rel in files_a:
            if rel.name != B.MANIFEST_NAME:
                assert (a / name / rel).read_bytes() == (b / name / rel).read_bytes(), f"{name}/{rel}"
        ma, mb = B.read_manifest(a / name), B.read_manifest(b / name)
        assert set(ma) == set(mb) and set(ma) - set(TIMING) >= {"files", "source", "source_files", "options"}
        assert _without_timing(ma) == _without_timing(mb), name


def _report(path: Path) -> dict[str, dict]:
    return {Path(j["output"]).name: j for j in json.loads(path.read_text())["jobs"]}


# -- without Ray ---------------------------------------------------------------------------------------


def test_without_ray_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees when it is not installed
    assert not ray_executor.ray_available()
    code = cli_batch.main(["--input-dir", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "out"),
                           "--executor", "ray"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--executor ray needs Ray" in err and "vllm-consolidate[ray]" in err
    assert err.count("error:") == 1
    assert not (tmp_path / "out").exists()


@needs_ray
def test_unreachable_cluster_is_a_usage_error(corpus: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    code = cli_batch.main(["--input-dir", str(corpus[ZERO[0]] / "ckpt"), "--output-dir", str(tmp_path / "out"),
                           "--executor", "ray", "--ray-address", f"127.0.0.1:{free_port()}", *FAST])
    assert code == 2
    assert "no Ray cluster answers at --ray-address 127.0.0.1:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing is touched before the cluster answers


# -- on the cluster ------------------------------------------------------------------------------------


@needs_ray
@pytest.mark.slow
def test_ray_output_is_byte_identical_to_local(cluster: Cluster, corpus: dict[str, Path], tmp_path: Path) -> None:
    lst = _input_list(tmp_path / "runs.txt", [corpus[c] / "run" for c in TRAINER] + [corpus[c] / "ckpt" for c in ZERO])
    common = ["--input-list", str(lst), "--all-checkpoints", "--naming-template", "{run_name}_{step}",
              "--max-workers", "4", *FAST]
    local, ray = tmp_path / "local", tmp_path / "ray"
    # The plan is the executor's to run, not to make: the dry runs print the same table.
    dry = [_batch(cluster, [*common, "--output-dir", str(ray), "--dry-run", *extra]) for extra in ([], _ray(cluster))]
    assert dry[0].returncode == dry[1].returncode == 0, dry[1].stderr
    assert dry[0].stdout.split("\n\n")[0] == dry[1].stdout.split("\n\n")[0]
    proc = _batch(cluster, [*common, "--output-dir", str(local)])
    assert proc.returncode == 0, proc.stderr
    proc = _batch(cluster, [*common, "--output-dir", str(ray), *_ray(cluster), "--report", str(tmp_path / "r.json")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n = 3 * len(TRAINER) + len(ZERO)
    assert f"{n} done, 0 skipped" in proc.stdout
    assert len(_outputs(ray)) == n
    _assert_same_outputs(local, ray)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["executor"]["name"] == "ray" and report["executor"]["nodes"] == 2
    assert report["counts"] == {"done": n, "skipped": 0, "failed": 0, "not_run": 0}
    jobs = report["jobs"]
    assert all(j["attempts"] == 1 and len(j["nodes"]) == 1 for j in jobs)
    assert {j["nodes"][0] for j in jobs} == {HEAD_IP, WORKER_IP}  # both nodes got jobs
    assert all(j["peak_rss_bytes"] > 0 and j["seconds"] >= 0 for j in jobs)
    assert re.search(rf"start +\[1/{n}\] .* on 127\.0\.0\.[23]", proc.stderr)
    assert _leftovers(ray) == []
    # Resume: a rerun (on Ray, or locally: same manifests) skips everything.
    proc = _batch(cluster, [*common, "--output-dir", str(ray), *_ray(cluster), "--verify-checksums"])
    assert proc.returncode == 0, proc.stderr
    assert f"0 done, {n} skipped (up to date)" in proc.stdout


@needs_ray
@pytest.mark.slow
def test_ray_address_local_starts_its_own_cluster(corpus: dict[str, Path], tmp_path: Path) -> None:
    rt = Path(tempfile.mkdtemp(prefix="vc-rt-", dir="/tmp"))  # Ray's temp root: short socket paths
    env = dict(os.environ, RAY_TMPDIR=str(rt), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    try:
        out = tmp_path / "out"
        proc = subprocess.run([str(BIN / "vllm-consolidate"), "batch", "--input-dir", str(corpus[ZERO[0]] / "ckpt"),
                               "--output-dir", str(out), "--executor", "ray", "--ray-address", "local",
                               "--report", str(tmp_path / "r.json"), *FAST],
                              capture_output=True, text=True, timeout=180, env=env)
        assert proc.returncode == 0, proc.stderr
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["executor"]["name"] == "ray" and report["executor"]["address"] == "local"
        assert report["executor"]["nodes"] == 1
        assert [j["attempts"] for j in report["jobs"]] == [1]
    finally:
        shutil.rmtree(rt, ignore_errors=True)


def _tree(root: Path, runs: dict[str, Path]) -> dict[str, Path]:
    """Hard-linked copies of input folders, ``root/<name>/<folder name>``, to change without touching the corpus."""
    out = {}
    for name, src in runs.items():
        (root / name).mkdir(parents=True)
        out[name] = root / name / src.name
        subprocess.run(["cp", "-al", str(src), str(out[name])], check=True)
    return out


def _poison(model_dir: Path) -> str:
    """Put a NaN into a tensor of ``model_dir/model.safetensors`` (a private copy): planning reads only the
    header, so the job fails at run time, in its task, when the converted folder is validated."""
    path = model_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    path.unlink()  # a hard link into the corpus: write a new file instead
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    start = 8 + n + header[name]["data_offsets"][0]
    data[start:start + 4] = struct.pack("<f", float("nan"))
    path.write_bytes(data)
    return name


@needs_ray
@pytest.mark.slow
def test_failed_job_on_ray(cluster: Cluster, corpus: dict[str, Path], tmp_path: Path) -> None:
    runs = _tree(tmp_path / "in", {"nan": corpus[HF] / "model", "good": corpus[TRAINER[0]] / "run",
                                   "zero": corpus[ZERO[0]] / "ckpt"})
    poisoned = _poison(runs["nan"])
    out = tmp_path / "out"
    # Validation on (it finds the NaN); the failing job first.
    args = ["--input-list", str(_input_list(tmp_path / "runs.txt", list(runs.values()))), "--output-dir", str(out),
            "--naming-template", "{run_name}", *_ray(cluster)]
    proc = _batch(cluster, [*args, "--max-workers", "1"])  # the first failure stops the batch
    assert proc.returncode == 11, proc.stderr
    assert "0 done, 0 skipped (up to date), 1 failed, 2 not run" in proc.stdout
    assert _outputs(out) == [] and _leftovers(out) == []
    proc = _batch(cluster, [*args, "--max-workers", "4", "--continue-on-error", "--report", str(tmp_path / "r.json")])
    assert proc.returncode == 11, proc.stderr
    assert "2 done, 0 skipped (up to date), 1 failed" in proc.stdout
    jobs = _report(tmp_path / "r.json")
    assert jobs["nan"]["status"] == "failed" and jobs["nan"]["error"]["type"] == "ValidationFailedError"
    assert poisoned in jobs["nan"]["error"]["message"]
    assert jobs["nan"]["attempts"] == 1  # a conversion error is not retried
    assert jobs["good"]["status"] == jobs["zero"]["status"] == "done"
    assert _outputs(out) == ["good", "zero"]
    assert _leftovers(out) == []


class _Stderr:
    """A subprocess's stderr lines, read on a thread."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.lines.append(line)

    def find(self, pattern: str) -> re.Match | None:
        return next((m for line in list(self.lines) if (m := re.search(pattern, line))), None)


def _kill_worker_node_mid_job(cluster: Cluster, proc: subprocess.Popen, err: _Stderr, out: Path) -> str:
    """Wait for a big job to start on the worker node and write its staging folder; kill that node's raylet."""
    deadline = time.monotonic() + 120
    while not (m := err.find(rf"start .* -> \S*/(big_\w+) .* on {re.escape(WORKER_IP)}")):
        assert proc.poll() is None, "".join(err.lines)
        assert time.monotonic() < deadline, "".join(err.lines)
        time.sleep(0.05)
    name = m.group(1)
    while not any(n.startswith((f".{name}.batch-", f"..{name}.batch-")) for n in os.listdir(out)):
        assert not (out / name).exists(), "the job finished before its node could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    cluster.kill_worker_raylet()
    return name


@needs_ray
@pytest.mark.slow
def test_node_killed_mid_job_is_retried(cluster: Cluster, corpus: dict[str, Path], tmp_path: Path) -> None:
    if not cluster.worker_alive():
        cluster.start_worker()
    # Two big jobs: one node's memory holds one, so one of them runs on the worker node.
    runs = _tree(tmp_path / "in", {"big_a": corpus[BIG] / "ckpt", "big_b": corpus[BIG] / "ckpt"})
    out = tmp_path / "out"
    lst = _input_list(tmp_path / "runs.txt", list(runs.values()))
    # With validation (no --no-validate-vllm) a big job takes several seconds: time to see it start.
    args = ["--input-list", str(lst), "--output-dir", str(out), "--naming-template", "{run_name}",
            "--max-workers", "4", *_ray(cluster)]
    proc = subprocess.Popen([str(BIN / "vllm-consolidate"), "batch", *args, "--report", str(tmp_path / "r.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env)
    err = _Stderr(proc)
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    try:
        killed = _kill_worker_node_mid_job(cluster, proc, err, out)
        stdout = proc.stdout.read()  # not communicate(): the thread reads stderr
        proc.wait(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err.thread.join(5)
    assert proc.returncode == 0, stdout + "".join(err.lines)
    assert "2 done, 0 skipped (up to date), 0 failed" in stdout
    assert "retried: 2 attempts" in stdout
    assert err.find(rf"retry +{killed} on {re.escape(HEAD_IP)} \(attempt 2")
    jobs = _report(tmp_path / "r.json")
    assert jobs[killed]["status"] == "done"
    assert jobs[killed]["attempts"] == 2 and jobs[killed]["nodes"] == [WORKER_IP, HEAD_IP]
    assert [j["attempts"] for name, j in jobs.items() if name != killed] == [1]
    assert _leftovers(out) == []  # the dead attempt's staging folder was cleared by the retry
    truth = load_file(str(corpus[BIG] / build.load_case(BIG)["checkpoints"][0]["truth"]))
    for name in ("big_a", "big_b"):
        got = load_file(str(out / name / "model.safetensors"))
        assert set(truth) <= set(got)
        assert all(torch.equal(got[k].view(torch.int32), t.float().view(torch.int32)) for k, t in truth.items())
    # Run again, with the worker node gone: everything is up to date.
    proc2 = _batch(cluster, args)
    assert proc2.returncode == 0, proc2.stderr
    assert "0 done, 2 skipped (up to date)" in proc2.stdout


@contextlib.contextmanager
def _object_store(scheme: str) -> Iterator[tuple[object, str, str]]:
    """``(server, --storage-options JSON, its secret)``: moto's S3 server or Azurite, configured by options alone."""
    from tests import azurite, s3_server

    if scheme == "s3":
        with s3_server.start() as s3:
            yield s3, json.dumps({"endpoint": s3.endpoint, "access_key_id": "testing",
                                  "secret_access_key": "testing", "region": "us-east-1"}), "testing"
    else:
        with azurite.start() as az:
            yield az, json.dumps({"account_name": azurite.ACCOUNT, "account_key": azurite.KEY,
                                  "endpoint": az.endpoint}), azurite.KEY


@needs_ray
@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["s3", "az"])
def test_s3_batch_on_ray_needs_no_shared_filesystem(cluster: Cluster, corpus: dict[str, Path], tmp_path: Path,
                                                    scheme: str) -> None:
    """s3:// (and az://, on Azurite) in and out on the two nodes, each with its own TMPDIR: tasks get URLs and
    --storage-options only (the driver and the nodes have no AWS_* or AZURE_* variables), the outputs are only in
    the store and byte-identical to a local conversion, both nodes ran a job, and nothing is left in any node's or
    the driver's temp dir."""
    from vllm_consolidate import cli

    if not cluster.worker_alive():
        cluster.start_worker()
    src = corpus[ZERO[1]] / "ckpt"
    ref = tmp_path / "ref"
    assert cli.main(["convert", "--input", str(src), "--output", str(ref), *FAST]) == 0
    driver = tmp_path / "driver"  # the driver's cwd and TMPDIR; no job is given any local path
    driver.mkdir()
    env = {k: v for k, v in cluster.env.items() if not k.startswith(("AWS_", "AZURE_"))} | {"TMPDIR": str(driver)}
    with _object_store(scheme) as (store, options, secret):
        store.create_bucket("raybatch")
        for run in ("r1", "r2"):
            store.upload_folder("raybatch", src, f"runs/{run}")
        proc = subprocess.run([str(BIN / "vllm-consolidate"), "batch", "--input-dir", f"{scheme}://raybatch/runs",
                               "--output-dir", f"{scheme}://raybatch/models", "--storage-options", options, *FAST,
                               "--max-workers", "2", *_ray(cluster), "--report", str(tmp_path / "r.json")],
                              capture_output=True, text=True, timeout=240, env=env, cwd=driver)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        jobs = _report(tmp_path / "r.json")
        assert sorted(jobs) == ["r1_step_2", "r2_step_2"] and all(j["status"] == "done" for j in jobs.values())
        assert sorted(ip for j in jobs.values() for ip in j["nodes"]) == [HEAD_IP, WORKER_IP]  # one job per node
        ref_files = {p.relative_to(ref).as_posix(): p.read_bytes() for p in ref.rglob("*") if p.is_file()}
        for name in jobs:
            got = {k.split("/", 2)[2]: store.get("raybatch", k) for k in store.keys("raybatch", f"models/{name}/")}
            assert sorted(got) == sorted(ref_files)
            assert all(got[rel] == ref_files[rel] for rel in ref_files if rel != B.MANIFEST_NAME), name
        outputs = {k for k in store.keys("raybatch", "models/")}
        assert outputs == {f"models/{n}/{rel}" for n in jobs for rel in ref_files} | {
            "models/.vllm-consolidate-batch.json"}  # no staging prefix, no lock left
        assert store.uploads("raybatch") == []
        assert secret not in store.get("raybatch", "models/.vllm-consolidate-batch.json").decode()
    assert secret not in (tmp_path / "r.json").read_text()  # credentials are not in the report either
    assert list(driver.iterdir()) == []
    for node in ("head", "worker"):
        assert [p.name for p in cluster.tmpdir(node).iterdir() if p.name.startswith("vllmc")] == [], node
