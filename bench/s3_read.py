"""Object storage as an input: ``convert --input s3://…`` against the same conversion from a local folder, and
against "download the prefix with boto3's transfer manager, then convert locally".

moto's server cannot serve this: it reads a whole object into memory for every ranged GET (3 GB per request
for a 0.5B ZeRO-3 rank file). The S3 endpoint here is s3rver (file-backed, streams ranges), installed with
``npm install --prefix .cache/s3rver s3rver@3.7.1``. Each conversion runs in a child process that reports its
peak RSS (VmHWM) and, for ``s3://``, the bytes it asked the server for (every ranged GET, recorded by
``storage.bytefile``).

    PYTHONPATH=src:. .venv/bin/python bench/s3_read.py --input .cache/bench/<0.5B ZeRO-3>/ckpt --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from vllm_consolidate.storage import bytefile
from vllm_consolidate.cli import main
bytefile.RECORD_REQUESTS = True
import os
if os.environ.get("BENCH_MAX_GET"):
    bytefile.MAX_GET_BYTES = int(os.environ["BENCH_MAX_GET"])
if os.environ.get("BENCH_IN_FLIGHT"):
    bytefile.MAX_IN_FLIGHT = int(os.environ["BENCH_IN_FLIGHT"])
t = time.monotonic()
code = main(sys.argv[2:])
wall = time.monotonic() - t
with open("/proc/self/status") as f:
    hwm = int(next(l for l in f if l.startswith("VmHWM:")).split()[1]) * 1024
with open(sys.argv[1], "w") as out:
    json.dump({"code": code, "wall": wall, "peak_rss": hwm, "gets": len(bytefile.REQUESTS),
               "bytes_requested": sum(e - s for _, s, e in bytefile.REQUESTS)}, out)
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_child(args: list[str], env: dict[str, str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as rec:
        t = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", CHILD, rec.name, *args], env=env, capture_output=True, text=True)
        wall = time.monotonic() - t
        if proc.returncode != 0:
            raise SystemExit(f"failed: {args}\n{proc.stderr[-3000:]}")
        out = json.loads(Path(rec.name).read_text())
    out["process_wall"] = wall
    return out


def _download(client, bucket: str, prefix: str, dest: Path) -> int:
    """boto3's transfer manager, every object under ``prefix`` (what a user does today); bytes downloaded."""
    total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            path = dest / obj["Key"][len(prefix) + 1:]
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(path))
            total += obj["Size"]
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--s3rver", default=".cache/s3rver/node_modules/.bin/s3rver")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--validate", action="store_true", help="keep validation on (default: off)")
    ap.add_argument("--variant", nargs="*", default=[], metavar="VAR=VALUE[,VAR=VALUE]",
                    help="also run s3:// -> local with these environment variables (BENCH_MAX_GET: the largest GET; "
                         "BENCH_IN_FLIGHT: GETs at once; or any other, e.g. MALLOC_ARENA_MAX)")
    ap.add_argument("--only-s3", action="store_true", help="skip the local and download-then-convert runs")
    a = ap.parse_args()
    import boto3
    from boto3.s3.transfer import TransferConfig

    work = Path(tempfile.mkdtemp(prefix="s3bench-", dir=a.work))
    port = _port()
    server = subprocess.Popen([a.s3rver, "-d", str(work / "server"), "-a", "127.0.0.1", "-p", str(port), "-s",
                               "--allow-mismatched-signatures", "--no-vhost-buckets"], start_new_session=True,
                              stdout=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER",
           "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true", "HF_HUB_OFFLINE": "1"}
    results: dict = {"input": str(a.input), "dtype": a.dtype}
    try:
        time.sleep(2)
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="S3RVER",
                              aws_secret_access_key="S3RVER", region_name="us-east-1")
        client.create_bucket(Bucket="bench")
        t = time.monotonic()
        cfg = TransferConfig(multipart_chunksize=64 * 2**20)
        size = 0
        for path in sorted(a.input.rglob("*")):
            if path.is_file():
                client.upload_file(str(path), "bench", f"ck/{path.relative_to(a.input).as_posix()}", Config=cfg)
                size += path.stat().st_size
        results["input_bytes"] = size
        results["upload_seconds"] = time.monotonic() - t
        opts = ["--dtype", a.dtype] + ([] if a.validate else ["--no-validate-vllm"])
        results["s3_to_local"] = _run_child(["convert", "--input", "s3://bench/ck", "--output",
                                             str(work / "out-s3"), *opts], env)
        shutil.rmtree(work / "out-s3")
        for variant in a.variant:
            extra = dict(item.split("=", 1) for item in variant.split(","))
            results[f"s3_to_local {variant}"] = _run_child(["convert", "--input", "s3://bench/ck", "--output",
                                                            str(work / "out-s3"), *opts], {**env, **extra})
            shutil.rmtree(work / "out-s3")
        if a.only_s3:
            print(json.dumps(results, indent=2))
            return
        results["local_to_local"] = _run_child(["convert", "--input", str(a.input), "--output",
                                                str(work / "out-local"), *opts], env)
        shutil.rmtree(work / "out-local")
        t = time.monotonic()
        results["download_bytes"] = _download(client, "bench", "ck", work / "dl")
        results["download_seconds"] = time.monotonic() - t
        results["downloaded_convert"] = _run_child(["convert", "--input", str(work / "dl"), "--output",
                                                    str(work / "out-dl"), *opts], env)
        results["download_then_convert_seconds"] = results["download_seconds"] + \
            results["downloaded_convert"]["process_wall"]
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
