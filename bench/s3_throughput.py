"""Reading one 256 MiB object in 16 MiB ranges from a local S3 server: obstore (what ``storage`` uses, through
our ``RemoteFile`` read-ahead and through obstore's own ``get_ranges``) against s3fs (fsspec's S3).

Each reader runs in its own child process; it reports wall time and peak RSS (VmHWM). The server is s3rver
(``npm install --prefix .cache/s3rver s3rver@3.7.1``; moto reads a whole object per ranged GET). s3fs is not a
dependency: pass ``--s3fs-python`` (a venv with ``s3fs`` installed) to include it.

    PYTHONPATH=src .venv/bin/python bench/s3_throughput.py --s3fs-python /tmp/s3fs-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZE = 256 * 2**20
RANGE = 16 * 2**20

READERS = {
    "obstore_remotefile": r"""
from vllm_consolidate.storage.bytefile import RemoteFile, RemoteObject
from vllm_consolidate.storage.store import open_store
from vllm_consolidate.storage.urls import parse_object_url
import obstore
url = parse_object_url("s3://tput/blob")
store = open_store(url, {})
meta = obstore.head(store, "blob")
f = RemoteFile(RemoteObject(store, "blob", meta["size"], meta["e_tag"], str(url)), str(url))
buf = memoryview(bytearray(RANGE))
for off in range(0, SIZE, 4 * RANGE):  # the writer's pattern: hint a 64 MiB window, then read it
    for o in range(off, min(SIZE, off + 4 * RANGE), RANGE):
        f.advise(o, RANGE)
    for o in range(off, min(SIZE, off + 4 * RANGE), RANGE):
        assert f.preadv_into(buf, o) == RANGE
""",
    "obstore_get_ranges": r"""
import obstore
from obstore.store import from_url
store = from_url("s3://tput", client_options={"allow_http": True})
starts = list(range(0, SIZE, RANGE))
for i in range(0, len(starts), 4):
    parts = obstore.get_ranges(store, "blob", starts=starts[i:i + 4], ends=[s + RANGE for s in starts[i:i + 4]])
    assert sum(len(p) for p in parts) == 4 * RANGE
""",
    "s3fs_cat_ranges": r"""
import os, s3fs
fs = s3fs.S3FileSystem(key=os.environ["AWS_ACCESS_KEY_ID"], secret=os.environ["AWS_SECRET_ACCESS_KEY"],
                       client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"], "region_name": "us-east-1"})
starts = list(range(0, SIZE, RANGE))
for i in range(0, len(starts), 4):
    parts = fs.cat_ranges(["tput/blob"] * 4, starts[i:i + 4], [s + RANGE for s in starts[i:i + 4]])
    assert sum(len(p) for p in parts) == 4 * RANGE
""",
    "s3fs_open_read": r"""
import os, s3fs
fs = s3fs.S3FileSystem(key=os.environ["AWS_ACCESS_KEY_ID"], secret=os.environ["AWS_SECRET_ACCESS_KEY"],
                       client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"], "region_name": "us-east-1"})
with fs.open("tput/blob", "rb", block_size=RANGE) as fh:
    while fh.read(RANGE):
        pass
""",
}

WRAP = r"""
import json, sys, time
SIZE, RANGE = {size}, {rng}
t = time.monotonic()
{body}
wall = time.monotonic() - t
with open("/proc/self/status") as f:
    hwm = int(next(l for l in f if l.startswith("VmHWM:")).split()[1]) * 1024
print(json.dumps({{"wall": wall, "MB_s": SIZE / wall / 1e6, "peak_rss": hwm}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--s3rver", default=".cache/s3rver/node_modules/.bin/s3rver")
    ap.add_argument("--s3fs-python", default=None)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix="s3tput-"))
    server = subprocess.Popen([a.s3rver, "-d", str(work), "-a", "127.0.0.1", "-p", str(port), "-s",
                               "--allow-mismatched-signatures", "--no-vhost-buckets"], start_new_session=True,
                              stdout=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER",
           "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
    results: dict = {}
    try:
        time.sleep(2)
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="S3RVER",
                              aws_secret_access_key="S3RVER", region_name="us-east-1")
        client.create_bucket(Bucket="tput")
        client.put_object(Bucket="tput", Key="blob", Body=os.urandom(SIZE))
        for _ in range(a.reps):
            for name, body in READERS.items():
                python = a.s3fs_python if name.startswith("s3fs") else sys.executable
                if python is None:
                    continue
                code = WRAP.format(size=SIZE, rng=RANGE, body=body)
                proc = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
                results.setdefault(name, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
    finally:
        server.terminate()
        server.wait()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
