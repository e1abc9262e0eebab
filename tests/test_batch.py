"""Batch consolidation (issue 6) on real HF Trainer + DeepSpeed checkpoints from the corpus.

The trainer cases (checkpoint-2/4/6, ZeRO-2 and ZeRO-3, world size 2) are hard-linked into the
guide's Example 2 layout ``experiments/ft_runs_*/qwen2.5-7b``; inputs are never modified (a test that
corrupts a file first replaces the link with a private copy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.corpus import build

from vllm_consolidate import ConvertOptions
from vllm_consolidate import batch as B
from vllm_consolidate.cli import batch as cli_batch
from vllm_consolidate.errors import BatchError, UsageError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUNS = {"a": "trainer_qwen2_z2_bf16", "b": "trainer_llama_z3_bf16", "c": "trainer_llama_z3g16_bf16"}
MODEL = "qwen2.5-7b"
FAST = ["--no-validate-vllm"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def _make_tree(root: Path, corpus: dict[str, Path], runs: dict[str, str] = RUNS) -> Path:
    exp = root / "experiments"
    for key, case in runs.items():
        (exp / f"ft_runs_{key}").mkdir(parents=True)
        subprocess.run(["cp", "-al", str(corpus[case] / "run"), str(exp / f"ft_runs_{key}" / MODEL)], check=True)
    return exp


@pytest.fixture(scope="module")
def tree(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``experiments/ft_runs_{a,b,c}/qwen2.5-7b/checkpoint-{2,4,6}``, shared read-only by the tests."""
    return _make_tree(tmp_path_factory.mktemp("batch"), corpus)


def _truth(corpus: dict[str, Path], run: str, step: int) -> dict[str, torch.Tensor]:
    case = RUNS[run]
    meta = build.load_case(case)
    ck = next(c for c in meta["checkpoints"] if c["step"] == step)
    return load_file(str(corpus[case] / ck["truth"]))


def _assert_bit_exact(out_dir: Path, truth: dict[str, torch.Tensor]) -> None:
    out = load_file(str(out_dir / "model.safetensors"))
    assert set(truth) <= set(out), set(truth) - set(out)
    for name, t in truth.items():
        assert out[name].dtype == torch.float32
        assert torch.equal(out[name].view(torch.int32), t.float().view(torch.int32)), name


def _run(argv: list[str]) -> int:
    return cli_batch.main(argv)


def _leftovers(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.iterdir() if p.name.startswith(".") and p.name != B.LOCK_NAME)


def _finished(out_dir: Path) -> list[str]:
    """Published outputs (with a manifest); safe while a batch renames folders under it."""
    names = os.listdir(out_dir) if out_dir.is_dir() else []
    return sorted(n for n in names if not n.startswith(".") and (out_dir / n / B.MANIFEST_NAME).is_file())


def _model_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != B.MANIFEST_NAME}


# -- pure helpers --------------------------------------------------------------------------------------


def test_brace_expansion() -> None:
    assert B.expand_braces("checkpoint-{100,200,300}") == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]
    assert B.expand_braces("a{b,c{d,e}}f") == ["abf", "acdf", "acef"]
    assert B.expand_braces("{x,y}-{1,2}") == ["x-1", "x-2", "y-1", "y-2"]
    assert B.expand_braces("s{1..3}") == ["s1", "s2", "s3"]
    assert B.expand_braces("s{08..10}") == ["s08", "s09", "s10"]
    assert B.expand_braces("{only}") == ["{only}"]
    assert B.expand_braces("{a,b") == ["{a,b"]
    assert B.expand_braces(r"\{a,b\}") == ["{a,b}"]
    assert B.expand_braces("{,pre}x") == ["x", "prex"]
    assert B.match_any("checkpoint-200", ["checkpoint-{100,2*}"])
    assert not B.match_any("checkpoint-20", ["checkpoint-{100,200}"])


# -- planning: inputs, selection, naming ---------------------------------------------------------------


def _plan(tree: Path, out: Path, **kw) -> B.BatchPlan:
    return B.plan_batch(B.BatchOptions(output_dir=out, **kw))


def test_naming_and_selection(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # Example 2: a pattern over runs, {run_name}_final -> the latest checkpoint of each run.
    plan = _plan(tree, out, input_pattern=str(tree / "ft_runs_*" / MODEL), naming_template="{run_name}_final")
    assert [j.output.name for j in plan.jobs] == ["ft_runs_a_final", "ft_runs_b_final", "ft_runs_c_final"]
    assert {j.checkpoint_name for j in plan.jobs} == {"checkpoint-6"}
    assert all(j.action == "convert" and j.est_output_bytes > 1e6 for j in plan.jobs)
    assert plan.jobs[0].detected["stage"] == 2 and plan.jobs[1].detected["stage"] == 3
    # Braces in the pattern too.
    plan = _plan(tree, out, input_pattern=str(tree / "ft_runs_{a,c}" / MODEL), naming_template="{run_name}_final")
    assert [j.output.name for j in plan.jobs] == ["ft_runs_a_final", "ft_runs_c_final"]
    # Example 3: one run, a brace filter, {step}.
    plan = _plan(tree, out, input_dir=tree / "ft_runs_b" / MODEL, checkpoint_filter=["checkpoint-{2,6,100}"],
                 naming_template="qwen25_step_{step}")
    assert [j.output.name for j in plan.jobs] == ["qwen25_step_2", "qwen25_step_6"]
    assert plan.notes == ["--checkpoint-filter: no input has checkpoint-100"]
    # Every checkpoint; the default template; {checkpoint_name}; a checkpoint folder as input.
    plan = _plan(tree, out, input_dir=tree / "ft_runs_a" / MODEL, all_checkpoints=True)
    assert [j.output.name for j in plan.jobs] == [f"{MODEL}_step_{s}" for s in (2, 4, 6)]
    plan = _plan(tree, out, input_dir=tree / "ft_runs_a" / MODEL / "checkpoint-4",
                 naming_template="{run_name}-{input_name}-{checkpoint_name}")
    assert [j.output.name for j in plan.jobs] == [f"ft_runs_a-{MODEL}-checkpoint-4"]
    # --input-dir over the experiments folder: the runs two levels down.
    plan = _plan(tree, out, input_dir=tree, naming_template="{run_name}_{step}")
    assert [j.output.name for j in plan.jobs] == ["ft_runs_a_6", "ft_runs_b_6", "ft_runs_c_6"]
    # --input-list with comments and blank lines.
    lst = tmp_path / "runs.txt"
    lst.write_text(f"# runs to compare\n\n{tree / 'ft_runs_c' / MODEL}\n  # not this one\n"
                   f"{tree / 'ft_runs_a' / MODEL}\n")
    plan = _plan(tree, out, input_list=lst, naming_template="{run_name}")
    assert [j.output.name for j in plan.jobs] == ["ft_runs_c", "ft_runs_a"]
    assert not out.exists()


def test_planning_errors(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # The guide's default template names every run's latest checkpoint qwen2.5-7b_step_6: a clash.
    with pytest.raises(BatchError, match="more than one job"):
        _plan(tree, out, input_pattern=str(tree / "ft_runs_*" / MODEL))
    with pytest.raises(UsageError, match="unknown field"):
        _plan(tree, out, input_pattern=str(tree / "ft_runs_*" / MODEL), naming_template="{model}")
    with pytest.raises(UsageError, match="exactly one"):
        _plan(tree, out)
    plan = _plan(tree, out, input_dir=tree / "ft_runs_a" / MODEL, checkpoint_filter=["checkpoint-9*"])
    assert plan.jobs[0].action == "error"
    assert "checkpoint-2, checkpoint-4, checkpoint-6" in plan.jobs[0].error["message"]
    assert _run(["--input-pattern", str(tree / "ft_runs_*" / MODEL), "--output-dir", str(out)]) == 11
    assert not out.exists()


def test_dry_run_writes_nothing_in_all_three_forms(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    args = ["--input-pattern", str(tree / "ft_runs_*" / MODEL), "--output-dir", str(out),
            "--naming-template", "{run_name}_final", "--dry-run"]
    assert _run(args + ["--report", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    for col in ("input", "type", "stage", "step", "output", "est. size", "est. peak RAM"):
        assert col in table
    assert "ft_runs_b_final" in table and "deepspeed x2" in table
    assert not out.exists()
    assert json.loads((tmp_path / "r.json").read_text())["dry_run"] is True
    # The guide's script, the console script and the subcommand all take the same flags.
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, str(REPO / "train" / "batch_consolidate_for_vllm.py"), *args],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n\n")[0] == table.split("\n\n")[0]  # free RAM/disk lines may differ
    for cmd in ([str(BIN / "batch-consolidate-for-vllm")], [str(BIN / "vllm-consolidate"), "batch"]):
        proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        for flag in ("--input-dir", "--input-pattern", "--input-list", "--all-checkpoints", "--checkpoint-filter",
                     "--max-workers", "--naming-template", "--dry-run", "--continue-on-error", "--force",
                     "--report", "--json", "--dtype", "--keep-original-precision", "--pytorch-bin"):
            assert flag in proc.stdout
    assert not out.exists()


# -- running -------------------------------------------------------------------------------------------


def test_example2_bit_exact_then_skipped_then_stale(tree: Path, corpus: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "consolidated_experiments"
    args = ["--input-pattern", str(tree / "ft_runs_*" / MODEL), "--output-dir", str(out),
            "--naming-template", "{run_name}_final", "--max-workers", "2", "--report", str(tmp_path / "r.json")]
    assert _run(args + FAST) == 0
    captured = capsys.readouterr()
    assert "3 done, 0 skipped" in captured.out and captured.err.count("start ") == 3
    for run in RUNS:
        _assert_bit_exact(out / f"ft_runs_{run}_final", _truth(corpus, run, 6))
        m = B.read_manifest(out / f"ft_runs_{run}_final")
        assert m["source"]["checkpoint"] == str(tree / f"ft_runs_{run}" / MODEL / "checkpoint-6")
        assert m["files"]["model.safetensors"]["sha256"] == B.sha256_file(out / f"ft_runs_{run}_final" /
                                                                         "model.safetensors")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["counts"] == {"done": 3, "skipped": 0, "failed": 0, "not_run": 0}
    assert all(j["peak_rss_bytes"] > 0 for j in report["jobs"])
    # Rerun: everything is up to date.
    assert _run(args + FAST + ["--verify-checksums"]) == 0
    assert "0 done, 3 skipped (up to date)" in capsys.readouterr().out
    # A source file changes: that output is stale and is redone (replacing the old one).
    rank = next((tree / "ft_runs_b" / MODEL / "checkpoint-6").glob("global_step*/*optim_states.pt"))
    st = rank.stat()
    os.utime(rank, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert _run(args + FAST + ["--max-workers", "1"]) == 0
        text = capsys.readouterr().out
        assert "1 done, 2 skipped" in text and "source changed" in text
        _assert_bit_exact(out / "ft_runs_b_final", _truth(corpus, "b", 6))
    finally:
        os.utime(rank, ns=(st.st_atime_ns, st.st_mtime_ns))
    # Now ft_runs_b_final records the touched mtime, so it is stale again; --force redoes all three.
    assert _run(args + ["--force", "--dry-run", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["jobs"]
    assert [j["action"] for j in planned] == ["replace"] * 3
    assert "source changed" in planned[1]["reason"] and "--force" in planned[0]["reason"]
    assert _leftovers(out) == []


def test_parallel_equals_serial_and_truth(tree: Path, corpus: dict[str, Path], tmp_path: Path) -> None:
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert _run(["--input-dir", str(tree / "ft_runs_b" / MODEL), "--output-dir", str(serial), "--all-checkpoints",
                 "--max-workers", "1", *FAST]) == 0
    lst = tmp_path / "list.txt"
    lst.write_text(f"# one run\n{tree / 'ft_runs_b' / MODEL}\n")
    assert _run(["--input-list", str(lst), "--output-dir", str(parallel), "--checkpoint-filter",
                 "checkpoint-{2,4,6}", "--naming-template", "qwen25_step_{step}", "--max-workers", "2", *FAST]) == 0
    for step in (2, 4, 6):
        a, b = serial / f"{MODEL}_step_{step}", parallel / f"qwen25_step_{step}"
        assert _model_files(a) == _model_files(b)
        _assert_bit_exact(b, _truth(corpus, "b", step))


def _private_copy(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)


def test_continue_on_error(corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    exp = _make_tree(tmp_path, corpus, {"good": RUNS["a"], "trunc": RUNS["a"], "noconf": RUNS["b"]})
    rank = next((exp / "ft_runs_trunc" / MODEL / "checkpoint-6").glob("global_step*/*rank_1_*optim_states.pt"))
    _private_copy(rank)
    with open(rank, "r+b") as fh:
        fh.truncate(rank.stat().st_size // 2)
    for p in (exp / "ft_runs_noconf" / MODEL / "checkpoint-6").glob("config.json"):
        p.unlink()  # found at run time only: the conversion fails in its worker
    out = tmp_path / "out"
    args = ["--input-pattern", str(exp / "ft_runs_*" / MODEL), "--output-dir", str(out),
            "--naming-template", "{run_name}", "--base-model-name", str(tmp_path / "no-such-model"),
            "--max-workers", "1", *FAST]
    assert _run(args) == 11  # the truncated file is found while planning: nothing runs
    assert "nothing was converted" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
    assert _run(args + ["--continue-on-error", "--report", str(tmp_path / "r.json")]) == 11
    text = capsys.readouterr().out
    assert "1 done, 0 skipped (up to date), 2 failed" in text
    jobs = {Path(j["output"]).name: j for j in json.loads((tmp_path / "r.json").read_text())["jobs"]}
    assert jobs["ft_runs_good"]["status"] == "done"
    status = {name: (j["status"], (j["error"] or {}).get("type")) for name, j in jobs.items()}
    assert status["ft_runs_trunc"] == ("failed", "CorruptCheckpointError")
    assert status["ft_runs_noconf"] == ("failed", "ConfigNotFoundError")
    assert "ft_runs_trunc" in text and "ft_runs_noconf" in text
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["ft_runs_good"]
    assert _leftovers(out) == []


def test_resume_after_kill(tree: Path, corpus: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    args = ["--input-pattern", str(tree / "ft_runs_{a,b}" / MODEL), "--output-dir", str(out), "--all-checkpoints",
            "--naming-template", "{run_name}_{step}", "--max-workers", "1", *FAST]
    env = dict(os.environ, **{B.TEST_DELAY_ENV: "3"})
    proc = subprocess.Popen([str(BIN / "batch-consolidate-for-vllm"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not _finished(out):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # The second job is being converted or waits to be published: kill the batch now.
        while not any(".ft_runs_a_4.batch-" in name for name in os.listdir(out)):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.kill()  # SIGKILL: no chance to clean up; its worker gets SIGTERM from the kernel
        proc.wait()
        proc.stderr.close()
    assert _finished(out) == ["ft_runs_a_2"]
    assert _run(args + ["--report", str(tmp_path / "r.json")]) == 0
    assert "5 done, 1 skipped (up to date), 0 failed" in capsys.readouterr().out
    jobs = json.loads((tmp_path / "r.json").read_text())["jobs"]
    assert [Path(j["output"]).name for j in jobs if j["status"] == "skipped"] == ["ft_runs_a_2"]
    assert _leftovers(out) == []
    for run in ("a", "b"):
        for step in (2, 4, 6):
            _assert_bit_exact(out / f"ft_runs_{run}_{step}", _truth(corpus, run, step))


def test_existing_foreign_output_is_blocked(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    (out / "ft_runs_a_final").mkdir(parents=True)
    (out / "ft_runs_a_final" / "mine.txt").write_text("not made by the batch")
    plan = _plan(tree, out, input_pattern=str(tree / "ft_runs_a" / MODEL), naming_template="{run_name}_final")
    assert plan.jobs[0].action == "blocked"
    plan = _plan(tree, out, input_pattern=str(tree / "ft_runs_a" / MODEL), naming_template="{run_name}_final",
                 model=ConvertOptions(base_model_name=None, force=True))
    # --force replaces only folders vllm-consolidate wrote (issue 11): this one stays blocked.
    assert plan.jobs[0].action == "blocked"
    assert "--force replaces only" in plan.jobs[0].error["hint"]
    assert (out / "ft_runs_a_final" / "mine.txt").exists()


def test_stale_leftovers_are_cleaned(tmp_path: Path) -> None:
    """Only what carries our marker (or our free lock) goes; a user's folders named like ours stay (issue 22, 4)."""
    from vllm_consolidate.write.publish import LOCK_NAME, write_marker

    out = tmp_path / "out"
    for name in (".x_1.batch-1234abcd", ".x_1.old-00000000"):  # a killed job's staging folder, a kill's backup
        (out / name).mkdir(parents=True)
        write_marker(out / name, {})
    dead = out / "..x_1.batch-1234abcd.partial-deadbeef"  # its convert's temporary folder, lock free
    dead.mkdir()
    (dead / LOCK_NAME).write_text(json.dumps({"format": "vllm-consolidate-staging", "output": ".x_1.batch-1234abcd"}))
    users = [".x_1.old-backup01", ".x_1.old-abcdef12", ".x_1.batch-abcdef12", ".x_10.batch-1"]  # no marker, no lock
    for name in users:
        (out / name).mkdir()
        (out / name / "weights.bin").write_text("a user's backup")
    assert len(B.clean_stale(out / "x_1")) == 2  # and the backup put back: its output is missing
    assert sorted(p.name for p in out.iterdir()) == sorted(users + ["x_1"])
    assert all((out / name / "weights.bin").is_file() for name in users)


def test_cleanup_never_touches_an_input(tmp_path: Path) -> None:
    from vllm_consolidate.write.publish import write_marker

    out = tmp_path / "out"
    inp = out / ".x_1.batch-1234abcd"
    inp.mkdir(parents=True)
    write_marker(inp, {})
    assert B.clean_stale(out / "x_1", protect=[inp / "checkpoint-2"]) == [] and inp.is_dir()


def test_rerun_with_another_model_key_reconverts(tmp_path: Path) -> None:
    """``--model-key`` picks which weights an output holds (``model`` or ``ema`` of one DCP save, the same
    files): a rerun with another key must redo the output, not skip it as up to date (issue 23's manifest bug)."""
    import dataclasses

    from tests.corpus import fsdp_build

    name = "dcp_qwen2_w2_ambiguous"
    case = fsdp_build.build_all([name])[name]
    truth = load_file(str(case / fsdp_build.load_case(name)["checkpoints"][-1]["truth"]))
    model = ConvertOptions(base_model_name=None, validate=False, model_key="model")
    opts = B.BatchOptions(output_dir=tmp_path / "out", input_dir=case / "ckpt", model=model)
    assert B.run_batch(B.plan_batch(opts)).ok
    [job] = B.plan_batch(opts).jobs
    assert job.action == "skip", "the same options again: up to date"
    got = load_file(str(job.output / "model.safetensors"))
    assert all(torch.equal(got[k], truth[k]) for k in truth)
    ema = dataclasses.replace(opts, model=dataclasses.replace(model, model_key="ema"))
    [job] = B.plan_batch(ema).jobs
    assert (job.action, job.reason) == ("replace", "stale: options changed")
    assert B.run_batch(B.plan_batch(ema)).ok
    got = load_file(str(job.output / "model.safetensors"))
    assert set(got) == set(truth) and not all(torch.equal(got[k], truth[k]) for k in truth), "still the model's"
    assert [j.action for j in B.plan_batch(ema).jobs] == ["skip"]


def test_scheduler_admits_by_estimates() -> None:
    opts = B.BatchOptions(output_dir=Path("/nonexistent"), max_workers=3)
    jobs = [B.Job(i, Path("/in"), None, "c", 1, Path(f"/o{i}"), est_peak_ram=B.GIB // 2, est_disk_bytes=10 * B.GIB)
            for i in range(4)]
    plan = B.BatchPlan(opts, jobs, ram_available=B.GIB * 5 // 2, ram_margin=B.GIB, disk_free=25 * B.GIB)
    s = plan.scheduler()  # RAM budget 1.5 GiB, disk budget 24 GiB
    assert s.check(jobs[0], 0) == "go"
    s.take(jobs[0])
    assert s.check(jobs[1], 1) == "go"
    s.take(jobs[1])
    assert s.check(jobs[2], 2) == "wait"  # disk: 30 GiB > 24 GiB while jobs run
    s.release(jobs[0], ok=True)  # its output stays on disk
    s.release(jobs[1], ok=False)  # a failed job's output does not
    assert s.disk_used == 10 * B.GIB and s.ram_used == 0
    assert s.check(jobs[2], 0) == "go"
    s.take(jobs[2])
    assert s.check(jobs[3], 1) == "wait"
    s.release(jobs[2], ok=True)
    assert s.check(jobs[3], 0) == "never"  # 30 GiB of outputs can never fit in 24 GiB
    big = B.Job(9, Path("/in"), None, "c", 1, Path("/o9"), est_peak_ram=B.GIB, est_disk_bytes=0)
    s2 = B.BatchPlan(opts, [big], ram_available=B.GIB * 5 // 2, ram_margin=B.GIB, disk_free=None).scheduler()
    s2.take(big)
    assert s2.check(big, 1) == "wait"  # RAM: 2 GiB > 1.5 GiB
    assert s2.check(big, 3) == "wait"  # --max-workers


def test_worker_killed_mid_convert_leaves_nothing(corpus: dict[str, Path], tmp_path: Path) -> None:
    """A worker SIGKILLed while convert() writes (out of memory) can clean nothing: the batch removes its
    staging folder and convert()'s ``..<staging>.partial-*`` beside it, and reports the job failed."""
    import signal
    import threading

    from vllm_consolidate.batch.run import LocalExecutor

    out = tmp_path / "out"
    plan = B.plan_batch(B.BatchOptions(output_dir=out, input_dir=corpus["llama_big_z2_w2_bf16"] / "ckpt",
                                       naming_template="big", max_workers=1,
                                       model=ConvertOptions(base_model_name=None)))
    assert [j.action for j in plan.jobs] == ["convert"]
    executor = LocalExecutor()
    seen: list[str] = []

    def kill_when_writing() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            names = os.listdir(out) if out.is_dir() else []
            partial = [n for n in names if ".partial-" in n]
            workers = getattr(executor, "workers", [])
            if partial and workers:
                seen.extend(partial)
                os.kill(workers[0].proc.pid, signal.SIGKILL)
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_when_writing, daemon=True)
    killer.start()
    result = B.run_batch(plan, executor=executor)
    killer.join(5)
    assert seen, "the convert finished before its partial folder was seen"
    job = plan.jobs[0]
    assert job.status == "failed"
    assert "exited with -9 (killed: out of memory?)" in job.error["message"]
    assert not result.ok
    assert _leftovers(out) == [] and not (out / "big").exists()
