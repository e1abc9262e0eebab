"""A batch worker reports its own peak RSS, not its parent's.

Linux carries ``getrusage().ru_maxrss`` across ``exec``, so a worker spawned (fork + exec) by a large process
reported that process's size: a tiny job started from the test process showed 1.6 GB in a full test run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PARENT = textwrap.dedent("""
    import multiprocessing, resource, sys

    def child(q):
        from vllm_consolidate.batch.worker import peak_rss_bytes, reset_peak_rss
        reset_peak_rss()
        q.put((peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))

    if __name__ == "__main__":
        ballast = bytearray(400 * 2**20)  # touched: resident in the parent
        ballast[:: 4096] = b"x" * len(ballast[:: 4096])
        ctx = multiprocessing.get_context("spawn")  # as batch/run.py starts its workers
        q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,))
        p.start()
        ours, rusage = q.get(timeout=120)
        p.join()
        print(ours, rusage)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the exec carry-over and VmHWM are Linux's")
def test_spawned_worker_reports_its_own_peak_not_its_parents(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    ours, rusage = map(int, proc.stdout.split())
    assert rusage >= 400 * 2**20  # what the worker used to report: the parent's ballast
    assert ours < 200 * 2**20  # a fresh interpreter with the worker module imported
