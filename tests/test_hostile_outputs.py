"""Careless and hostile outputs, assets and options (issue 11, classes 2, 3, 6 and 7).

Each case runs the CLI as a user would (``python -m vllm_consolidate`` in a subprocess, under a memory
cap and a timeout) on a copy of a real DeepSpeed ZeRO-3 checkpoint from the corpus, and checks every
promise with ``tests.hostile.assert_refused``: the exit code, one ``error:`` line, nothing published,
no leftovers, the input unchanged, no byte of a secret file from outside the input anywhere, time and
memory. File-system conditions are real: a full tmpfs, a read-only tmpfs, an immutable folder (root
only, as CI runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.hostile import SECRET, assert_refused, leftovers, run_cli, snapshot

CASE = "qwen2_z3_w2_bf16_tied"
NO_VALIDATE = "--no-validate-vllm"
IS_ROOT = os.geteuid() == 0


@pytest.fixture
def ckpt(case_dir, tmp_path: Path) -> Path:
    """A private copy of a small real ZeRO-3 checkpoint (latest + global_step + config + tokenizer)."""
    dst = tmp_path / "runs" / "ckpt"
    shutil.copytree(case_dir(CASE) / "ckpt", dst, symlinks=True)
    return dst


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    p = tmp_path / "secret_id_rsa"
    p.write_bytes(SECRET)
    return p


def _convert(inp: Path, out: Path, *extra: str, validate: bool = False):
    return run_cli(["convert", "--input", str(inp), "--output", str(out), *extra] + ([] if validate else [NO_VALIDATE]))


# -- class 2: the output must never be, lie in, or contain the input ----------------------------------


@pytest.mark.parametrize("where", ["parent", "grandparent", "same", "inside", "inside_step", "via_symlink"])
def test_output_colliding_with_input_is_refused_before_anything(ckpt: Path, tmp_path: Path, where: str) -> None:
    step = next(ckpt.glob("global_step*"))
    link = tmp_path / "link"
    link.symlink_to(ckpt)
    out = {"parent": ckpt.parent, "grandparent": tmp_path, "same": ckpt, "inside": ckpt / "consolidated",
           "inside_step": step / "out", "via_symlink": link / "out"}[where]
    before = {str(ckpt): snapshot(ckpt)}
    run = _convert(ckpt, out, "--force")
    assert_refused(run, 2, output=out, inputs=[ckpt], before=before, message="--output",
                   output_existed=out.exists())
    assert ckpt.is_dir() and snapshot(ckpt) == before[str(ckpt)]


def test_output_inside_the_run_folder_of_a_checkpoint_dir(ckpt: Path, tmp_path: Path) -> None:
    """--checkpoint-dir names the weights; --input the run: an output in either is refused."""
    step = next(ckpt.glob("global_step*"))
    out = ckpt / "final"
    before = {str(ckpt): snapshot(ckpt)}
    run = run_cli(["convert", "--input", str(ckpt), "--checkpoint-dir", str(step), "--output", str(out), NO_VALIDATE])
    assert_refused(run, 2, output=out, inputs=[ckpt], before=before, message="--output")


# -- class 7: --force replaces only folders we wrote; stale leftovers are cleaned -----------------------


@pytest.mark.parametrize("kind", ["file", "symlink_to_folder", "foreign_folder", "fifo"])
def test_force_refuses_to_replace_what_we_did_not_write(ckpt: Path, tmp_path: Path, kind: str) -> None:
    out = tmp_path / "out"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    if kind == "file":
        out.write_text("a file")
    elif kind == "symlink_to_folder":
        out.symlink_to(victim)
    elif kind == "foreign_folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        os.mkfifo(out)
    before = snapshot(out) if out.is_dir() and not out.is_symlink() else None
    run = _convert(ckpt, out, "--force")
    assert_refused(run, 6, output=out, message="not", output_existed=True)
    assert (victim / "precious.txt").read_text() == "keep me"
    assert os.path.lexists(out)
    if before is not None:
        assert snapshot(out) == before


def test_force_replaces_our_own_output(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _convert(ckpt, out).code == 0
    assert json.loads((out / ".vllm-consolidate.json").read_text())["format"] == "vllm-consolidate-output"
    first = (out / "model.safetensors").read_bytes()
    run = _convert(ckpt, out, "--force")
    assert run.code == 0, run.stderr
    assert (out / "model.safetensors").read_bytes() == first
    assert leftovers(tmp_path, "out") == []


def test_sigkilled_convert_leaves_a_partial_that_the_next_run_removes(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # Validation imports torch and transformers, so the run is alive long enough to be killed mid-way.
    proc = subprocess.Popen([sys.executable, "-m", "vllm_consolidate", "convert", "--input", str(ckpt), "--output",
                             str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not leftovers(tmp_path, "out") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stale = leftovers(tmp_path, "out")
    assert stale and not out.exists(), "the kill must land while the partial folder exists"
    # A partial of a live run (its lock held) must survive the cleanup; a dead one must not.
    run = _convert(ckpt, out)
    assert run.code == 0, run.stderr
    assert leftovers(tmp_path, "out") == []


def test_live_partial_is_not_removed_by_another_run(ckpt: Path, tmp_path: Path) -> None:
    import fcntl

    out = tmp_path / "out"
    live = tmp_path / ".out.partial-0123abcd"
    live.mkdir()
    fd = os.open(live / ".vllm-consolidate.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert _convert(ckpt, out).code == 0
        assert live.is_dir(), "a partial whose lock is held belongs to a running conversion"
    finally:
        os.close(fd)


def test_old_output_left_aside_by_a_kill_is_restored(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _convert(ckpt, out).code == 0
    aside = tmp_path / ".out.old-deadbeef"
    os.rename(out, aside)  # what a SIGKILL between publish()'s two renames leaves
    run = _convert(ckpt, out, "--force")
    assert run.code == 0, run.stderr
    assert not aside.exists() and (out / "model.safetensors").is_file()


def test_input_named_like_our_temporary_folder_is_never_cleaned(ckpt: Path, tmp_path: Path) -> None:
    """A model folder named like our partial (2 h old, no lock) is the input: it used to be removed as stale."""
    stale = tmp_path / "stale"
    stale.mkdir()
    inp = stale / ".out.partial-abcdef12"
    shutil.copytree(ckpt, inp, symlinks=True)
    then = time.time() - 7200
    os.utime(inp, (then, then))
    before = snapshot(inp)
    run = _convert(inp, stale / "out")
    assert run.code == 0, run.stderr
    assert snapshot(inp) == before and (stale / "out" / "model.safetensors").is_file()


def test_input_named_like_our_old_output_is_never_moved(ckpt: Path, tmp_path: Path) -> None:
    """An earlier output of ours, renamed like a backup, is the input: it used to be "restored" to --output."""
    folder = tmp_path / "stale2"
    earlier = folder / "earlier"
    assert _convert(ckpt, earlier).code == 0
    inp = folder / ".out.old-abcdef12"
    os.rename(earlier, inp)
    before = snapshot(inp)
    run = _convert(inp, folder / "out", "--dtype", "bfloat16")  # a real conversion, not "already consolidated"
    assert run.code == 0, run.stderr
    assert snapshot(inp) == before
    assert json.loads((folder / "out" / ".vllm-consolidate.json").read_text())["output_dtype"] == "bfloat16"


def _pair(inp: Path, out: Path) -> list[subprocess.Popen]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "vllm_consolidate", "convert", "--input", str(inp), "--output", str(out), "--force",
            NO_VALIDATE]
    return [subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]


def test_concurrent_force_conversions_of_one_output_both_succeed(ckpt: Path, tmp_path: Path) -> None:
    """Two ``convert --force`` to one output, again and again for up to 60 s: each exits 0 (the later one
    waits for the folder lock and replaces the earlier one's output), and the output is always complete."""
    out = tmp_path / "out"
    assert _convert(ckpt, out).code == 0
    want = (out / "model.safetensors").read_bytes()
    started, rounds = time.monotonic(), 0
    while time.monotonic() - started < 60 and rounds < 30:
        if rounds % 2:
            shutil.rmtree(out)  # half the rounds start without an output: both may find none
        procs = _pair(ckpt, out)
        results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        for p in procs:
            p.stderr.close()
        rounds += 1
        assert [code for code, _ in results] == [0, 0], f"round {rounds}: {results}"
        assert (out / "model.safetensors").read_bytes() == want and (out / ".vllm-consolidate.json").is_file()
        assert leftovers(tmp_path, "out") == [], f"round {rounds}"
    assert rounds >= 3, f"only {rounds} rounds in {time.monotonic() - started:.0f} s"


def test_failed_run_removes_the_parent_folders_it_created(ckpt: Path, tmp_path: Path) -> None:
    (next(ckpt.glob("global_step*")) / next(p.name for p in next(ckpt.glob("global_step*")).glob("*optim_states.pt"))
     ).write_bytes(b"PK\x03\x04 truncated")
    out = tmp_path / "new" / "deeper" / "out"
    run = _convert(ckpt, out)
    assert run.code == 4, run.stderr
    assert not (tmp_path / "new").exists()


# -- class 6: every failure has a documented exit code and one line naming the file ------------------


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b"\xff\xfe{\x00}", b"[" * 100_000 + b"]" * 100_000,
                                     b'{"model_type": "qwen2", "x": 1e400}', b'{"a": NaN}'])
def test_bad_config_json_is_exit_8_naming_it(ckpt: Path, tmp_path: Path, content: bytes) -> None:
    (ckpt / "config.json").write_bytes(content)
    out = tmp_path / "out"
    before = {str(ckpt): snapshot(ckpt)}
    run = _convert(ckpt, out, "--base-model-name", "")
    assert_refused(run, 8, output=out, inputs=[ckpt], before=before, message="config.json")


def test_huge_config_json_is_not_read(ckpt: Path, tmp_path: Path) -> None:
    cfg = ckpt / "config.json"
    with open(cfg, "r+b") as fh:  # a sparse 1 GB file: reading it would take the time and memory
        fh.truncate(2**30)
    out = tmp_path / "out"
    run = _convert(ckpt, out, "--base-model-name", "")
    assert_refused(run, 8, output=out, message="config.json", max_seconds=15)


def test_output_name_too_long_is_a_usage_error(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / ("m" * 240)  # fits the file system alone, not with the temporary name
    run = _convert(ckpt, out)
    assert_refused(run, 2, output=out, message="name")


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, *options: str):
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


needs_root = pytest.mark.skipif(not IS_ROOT, reason="mounting a tmpfs and chattr need root (CI runs as root)")


@needs_root
def test_disk_preflight_counts_the_assets(ckpt: Path, tmp_path: Path) -> None:
    # The weights (1.5 MB) fit in 70 MiB with the preflight margin; a 100 MB tokenizer.json does not.
    with open(ckpt / "tokenizer.json", "r+b") as fh:
        fh.truncate(100 * 10**6)
    with _tmpfs(tmp_path / "small", "70m") as mnt:
        out = mnt / "out"
        run = _convert(ckpt, out)
        assert_refused(run, 7, output=out, message="disk")


@needs_root
def test_disk_filling_up_while_writing_is_exit_7(ckpt: Path, tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "full", "80m") as mnt:
        # Pass the preflight, then let another process take the space before the writer runs: the
        # kernel's ENOSPC must become exit 7, and nothing may be left.
        filler = mnt / "filler"
        code = (
            "import os, sys, runpy\n"
            "from vllm_consolidate.write import publish\n"
            "real = publish.preflight_disk\n"
            "def fill(output, need):\n"
            "    real(output, need)\n"
            f"    with open({str(filler)!r}, 'wb') as fh:\n"
            "        try:\n"
            "            while True: fh.write(b'x' * 2**20)\n"
            "        except OSError: pass\n"
            "publish.preflight_disk = fill\n"
            "sys.argv = ['vllm-consolidate'] + sys.argv[1:]\n"
            "from vllm_consolidate import cli\n"
            "sys.exit(cli.main())\n"
        )
        out = mnt / "out"
        proc = subprocess.run([sys.executable, "-c", code, "convert", "--input", str(ckpt), "--output", str(out),
                               NO_VALIDATE], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 7, proc.stderr
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "disk filled up" in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
        assert not out.exists() and leftovers(mnt, "out") == []


@needs_root
def test_read_only_output_file_system_is_exit_12(ckpt: Path, tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "ro", "200m", "ro") as mnt:
        out = mnt / "out"
        run = _convert(ckpt, out)
        assert_refused(run, 12, output=out, message="cannot write")


@needs_root
def test_immutable_output_parent_is_exit_12(ckpt: Path, tmp_path: Path) -> None:
    parent = tmp_path / "frozen"
    parent.mkdir()
    subprocess.run(["chattr", "+i", str(parent)], check=True)
    try:
        out = parent / "out"
        run = _convert(ckpt, out)
        assert_refused(run, 12, output=out, message="cannot write")
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=True)


@contextlib.contextmanager
def _bind(source: Path, target: Path):
    """``source`` mounted again at ``target``; skips the test only when the kernel refuses with EPERM."""
    target.mkdir(parents=True)
    proc = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True)
    if proc.returncode != 0:
        if any(eperm in proc.stderr.lower() for eperm in ("permission denied", "not permitted", "superuser", "root")):
            pytest.skip(f"mount --bind refused (EPERM: not root, or a container without CAP_SYS_ADMIN): "
                        f"{proc.stderr.strip()}")
        raise AssertionError(f"mount --bind failed: {proc.stderr}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.mark.parametrize("where", ["inside", "contains"])
def test_output_colliding_with_input_through_a_bind_mount_is_refused(ckpt: Path, tmp_path: Path, where: str) -> None:
    """A second path to the input that no symlink explains: the device and inode of the ancestors tell."""
    if where == "inside":
        with _bind(ckpt, tmp_path / "alias") as alias:
            out = alias / "consolidated"  # the input's own folder, by another path
            before = {str(ckpt): snapshot(ckpt)}
            run = _convert(ckpt, out, "--force")
            assert_refused(run, 2, output=out, inputs=[ckpt], before=before, message="inside it")
            assert not (ckpt / "consolidated").exists()
    else:
        with _bind(ckpt.parent, tmp_path / "alias") as alias:
            out = alias  # a parent of the input, by another path; --force would have removed the input
            before = {str(ckpt): snapshot(ckpt)}
            run = _convert(ckpt, out, "--force")
            assert_refused(run, 2, output=out, inputs=[ckpt], before=before, message="contains the input",
                           output_existed=True)


def _too_long(tmp_path: Path) -> Path:
    return tmp_path.joinpath(*["d" * 200] * 25)  # 5,000+ bytes: over PATH_MAX, never created


def _one_error(run, code: int, message: str) -> None:
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("error:")]
    assert run.code == code, f"exit {run.code}, wanted {code}; stderr:\n{run.stderr[-2000:]}"
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in run.stderr, run.stderr[-2000:]


@pytest.mark.parametrize("command", ["convert", "batch"])
def test_output_path_longer_than_the_file_system_takes_is_exit_12(ckpt: Path, tmp_path: Path, command: str) -> None:
    if command == "convert":
        run = _convert(ckpt, _too_long(tmp_path) / "out")
        _one_error(run, 12, "--output makes an output path of")
    else:
        run = run_cli(["batch", "--input-dir", str(ckpt), "--output-dir", str(_too_long(tmp_path)), NO_VALIDATE])
        _one_error(run, 12, "--output-dir makes an output path of")
    assert sorted(os.listdir(tmp_path)) == ["runs"]


# -- class 3: assets that point outside the checkpoint are skipped, with a warning --------------------


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json",
                                  "chat_template.jinja"])
def test_asset_symlink_out_of_the_checkpoint_is_skipped(ckpt: Path, tmp_path: Path, secret: Path, name: str) -> None:
    (ckpt / name).unlink(missing_ok=True)
    (ckpt / name).symlink_to(secret)
    out = tmp_path / "out"
    before = {str(ckpt): snapshot(ckpt)}
    run = _convert(ckpt, out)
    assert run.code == 0, run.stderr
    warnings = [ln for ln in run.stderr.splitlines() if ln.startswith("warning:") and name in ln]
    assert warnings and "outside" in warnings[0], run.stderr
    assert not (out / name).exists()
    assert all(SECRET not in p.read_bytes() for p in out.iterdir())
    assert snapshot(ckpt) == before[str(ckpt)]


def test_asset_symlink_inside_the_checkpoint_is_followed(ckpt: Path, tmp_path: Path) -> None:
    real = ckpt / "shared_tokenizer.json"
    os.rename(ckpt / "tokenizer.json", real)
    (ckpt / "tokenizer.json").symlink_to("shared_tokenizer.json")
    out = tmp_path / "out"
    run = _convert(ckpt, out)
    assert run.code == 0, run.stderr
    assert (out / "tokenizer.json").read_bytes() == real.read_bytes()


def test_fifo_named_as_an_asset_is_skipped_without_blocking(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "generation_config.json").unlink()
    os.mkfifo(ckpt / "generation_config.json")
    out = tmp_path / "out"
    run = _convert(ckpt, out)
    assert run.code == 0, run.stderr
    assert "not a regular file" in run.stderr and not (out / "generation_config.json").exists()
    assert run.seconds < 30


# -- batch options: bounded expansion, plain template fields, bounded lists ----------------------------


def test_brace_bomb_in_checkpoint_filter_returns_at_once(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "batch"
    run = run_cli(["batch", "--input-dir", str(ckpt.parent), "--output-dir", str(out), "--checkpoint-filter",
                   "checkpoint-{1..20000000}", "--dry-run"])
    # Alone it takes ~1 s (the CLI's imports); the bound is one a loaded 2-core machine meets, far below the
    # minutes an unbounded expansion takes. assert_refused reports the measured time when it fails.
    assert_refused(run, 2, output=out / "x", message="expands to more than", max_seconds=30)


@pytest.mark.parametrize("option", ["--checkpoint-filter", "--input-pattern"])
def test_deeply_nested_braces_are_a_usage_error(ckpt: Path, tmp_path: Path, option: str) -> None:
    """5,000 nested braces made bracex recurse past Python's limit: exit 70 with a RecursionError."""
    out = tmp_path / "batch"
    bomb = "{" * 5000 + "checkpoint-1" + "}" * 5000
    where = ["--input-dir", str(ckpt.parent)] if option == "--checkpoint-filter" else []
    pattern = bomb if option == "--checkpoint-filter" else str(ckpt.parent / bomb)
    run = run_cli(["batch", *where, option, pattern, "--output-dir", str(out), "--dry-run"])
    assert_refused(run, 2, output=out / "x", message="nests braces 5,000 deep", max_seconds=30)
    assert len(run.stderr) < 1000, "the message quotes a hostile pattern cut short"


@pytest.mark.parametrize("template", ["{step:x}", "{run_name!r}", "{step[0]}", "{step.real}"])
def test_template_with_format_spec_is_a_usage_error(ckpt: Path, tmp_path: Path, template: str) -> None:
    out = tmp_path / "batch"
    run = run_cli(["batch", "--input-dir", str(ckpt.parent), "--output-dir", str(out), "--naming-template", template])
    assert_refused(run, 2, output=out / "x", message="template")
    assert not out.exists() or not any(out.iterdir())


def test_huge_input_list_is_not_read(tmp_path: Path) -> None:
    lst = tmp_path / "runs.txt"
    with open(lst, "wb") as fh:
        fh.truncate(2**30)
    out = tmp_path / "batch"
    run = run_cli(["batch", "--input-list", str(lst), "--output-dir", str(out)])
    assert_refused(run, 2, output=out / "x", message="input-list", max_seconds=10)
