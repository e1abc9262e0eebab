"""Harness for hostile-input tests (issue 11): run the CLI as a user would and check every promise.

The hostile files themselves are built in each test from raw bytes (pickle opcodes, zip members,
safetensors headers) with the standard library only; nothing here calls the package to build them.

:func:`run_cli` runs ``python -m vllm_consolidate`` in a subprocess under an address-space cap and a
timeout, and returns its exit code, stderr, wall time and peak RSS. :func:`assert_refused` then checks
what every hostile case must satisfy: the exit code, exactly one ``error:`` line (plus an optional
``hint:`` line) and no traceback, nothing published, no leftovers next to the output, the input
unchanged, and no byte of the secret in any file under the output's parent.
"""

from __future__ import annotations

import hashlib
import os
import resource
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: Address-space cap for the CLI under test. Importing torch + transformers for validation reserves
#: ~3 GiB of address space without touching it, so the cap is on RSS-like growth well above that.
MEM_CAP_BYTES = 6 * 2**30
#: Peak RSS any hostile case may reach (the CLI with validation imports torch: ~450 MiB).
MAX_RSS_BYTES = 900 * 2**20
TIMEOUT_S = 60.0
#: A file outside every input, whose bytes must never appear in an output.
SECRET = b"-----BEGIN OPENSSH PRIVATE KEY-----\nS3CR3T-" + hashlib.sha256(b"vllm-consolidate").hexdigest().encode() + \
    b"\n-----END OPENSSH PRIVATE KEY-----\n"


# -- pickle opcodes, for hostile pickles built by hand -----------------------------------------------------


def op_global(module: str, name: str) -> bytes:
    """GLOBAL module name (the names are in the opcode's argument, visible to any pre-pass)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_str(text: str) -> bytes:
    """BINUNICODE."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def op_int(n: int) -> bytes:
    """BININT for 32-bit values, else LONG1 (LONG4 past 255 bytes)."""
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    if len(raw) < 256:
        return b"\x8a" + bytes([len(raw)]) + raw
    return b"\x8b" + struct.pack("<i", len(raw)) + raw


# -- running the CLI -------------------------------------------------------------------------------------


@dataclass
class CliRun:
    code: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss: int
    #: Wall-clock time (``time.time()``) when the run started: files older than this were not written by it.
    wall_start: float = 0.0


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEM_CAP_BYTES, MEM_CAP_BYTES))


# The CLI, run so that it reports its own peak RSS. ``wait4``'s ru_maxrss would not do: the child is
# forked from pytest, and Linux carries the forked copy's high-water mark (pytest's whole RSS, 400+ MiB
# once torch is loaded) across exec. VmHWM belongs to the exec'd process's own memory map.
_RUN_AND_REPORT_PEAK = """
import sys
from vllm_consolidate.cli import main
code = 70
try:
    code = main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else 2
finally:
    with open("/proc/self/status") as status, open(sys.argv[1], "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM:")).split()[1])
sys.exit(code)
"""


def run_cli(args: list[str], *, timeout: float = TIMEOUT_S, env: dict[str, str] | None = None,
            cwd: str | Path | None = None) -> CliRun:
    """Run the CLI (``vllm_consolidate.cli.main``) with ARGS under a memory cap; a time-out is a test failure."""
    import tempfile

    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    started = time.monotonic()
    wall_start = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r") as peak:
        proc = subprocess.Popen([sys.executable, "-c", _RUN_AND_REPORT_PEAK, peak.name, *args], stdout=out,
                                stderr=err, stdin=subprocess.DEVNULL, text=True, env=full_env, cwd=cwd,
                                preexec_fn=_limit)
        try:
            proc.wait(timeout=max(0.0, timeout - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            err.seek(0)
            raise AssertionError(f"timed out after {timeout} s: {args}\nstderr: {err.read()[-2000:]}") from None
        seconds = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        text = peak.read().strip()
        return CliRun(proc.returncode, out.read(), err.read(), seconds, int(text) * 1024 if text else -1,
                      wall_start)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (symlinks not followed) with its type, size, mtime and content hash."""
    out: dict[str, tuple] = {}
    root = Path(root)
    if root.is_symlink() or not root.exists():
        return {".": ("link" if root.is_symlink() else "missing", os.readlink(root) if root.is_symlink() else "")}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode)
            else:
                out[rel] = ("other", st.st_mode)
    return out


def write_secret(tmp_path: Path) -> Path:
    """:data:`SECRET` in ``tmp_path/outside/secret_id_rsa``, outside every input: no output may hold its bytes."""
    p = tmp_path / "outside" / "secret_id_rsa"
    p.parent.mkdir()
    p.write_bytes(SECRET)
    return p


def files_containing(root: Path, needle: bytes) -> list[Path]:
    """Regular files under ``root`` (not following symlinks) whose bytes contain ``needle``."""
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                hits.append(p)
    return hits


def leftovers(parent: Path, name: str) -> list[str]:
    """Our temporary or backup folders for output ``name`` left in ``parent``."""
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.") or p.name.startswith(f"..{name}."))


def assert_refused(run: CliRun, code: int, *, output: Path, inputs: list[Path] | None = None,
                   before: dict[str, dict] | None = None, message: str | None = None,
                   secret: bytes | None = SECRET, max_seconds: float = 30.0, output_existed: bool = False) -> None:
    """Every promise a refused hostile case must keep (see the module docstring).

    Args:
        run: The CLI run.
        code: The expected exit code.
        output: The ``--output`` given.
        inputs: Input folders that must be unchanged; ``before`` holds their :func:`snapshot` s.
        message: A fragment the ``error:`` line must contain.
        secret: Bytes that must appear in no file next to the output.
        max_seconds: Wall-time bound.
        output_existed: The output existed before (then it must be unchanged, which the caller checks).
    """
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert run.code == code, f"exit {run.code}, wanted {code}; stderr:\n{run.stderr[-3000:]}"
    assert len(errors) == 1, f"wanted one error line, got:\n{run.stderr[-3000:]}"
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    if message is not None:
        assert message.lower() in errors[0].lower(), f"{message!r} not in {errors[0]!r}"
    if not output_existed:
        assert not output.exists() and not output.is_symlink(), f"{output} was published"
    assert leftovers(output.parent, output.name) == [], leftovers(output.parent, output.name)
    if inputs and before:
        for folder in inputs:
            assert snapshot(folder) == before[str(folder)], f"input {folder} changed"
    if secret is not None and output.parent.is_dir():
        # Files older than the run were planted by tests (other tests' secrets too, when ``output.parent`` is
        # pytest's shared base folder): only a file the run wrote, or rewrote, counts as a leak.
        hits = [p for p in files_containing(output.parent, secret)
                if "secret" not in p.name and p.stat().st_mtime >= run.wall_start - 1]
        assert hits == [], f"secret bytes found in {hits}"
    assert run.seconds < max_seconds, f"took {run.seconds:.1f} s"
    assert 0 < run.peak_rss < MAX_RSS_BYTES, f"peak RSS {run.peak_rss / 2**20:.0f} MiB (-1: not reported)"
