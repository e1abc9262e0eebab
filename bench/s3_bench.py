"""Benchmark object storage in and out (issue 27) against "download, convert, upload".

A real S3 endpoint on loopback, behind a byte-counting TCP relay so every byte either way is counted, holds
the cached 0.5B Qwen2 ZeRO-3 checkpoint (``make_checkpoints.py``, ``qwen0.5b-z3``, world size 2:
every file of the ``global_stepN`` folder plus the run's config/tokenizer, as a training job would upload it).
In one run, N repetitions, the three alternating inside each repetition, medians reported:

* ``ours_s3_to_local``: ``vllm-consolidate convert --input s3://… --output DIR --no-validate-vllm``;
* ``ours_s3_to_s3``: the same with ``--output s3://…``;
* ``chain``: what a user does today: download the prefix with boto3's transfer manager (``download_file`` per
  object, its default concurrency), ``convert`` locally, upload the folder with the transfer manager
  (``upload_file``, multipart); one process each step, walls summed, peak RSS the largest step's.

Per run: wall (including interpreter start-up), peak RSS (``/usr/bin/time -v``), bytes through the relay (both
directions, i.e. what the network would carry, HTTP headers included) and the peak local disk the run used
(blocks under its private TMPDIR and its local output, sampled every 50 ms). Targets: wall <= 0.5x and bytes
<= 0.4x of the chain, 0 bytes of local disk for s3 -> s3, peak RSS bounded as for local runs.

The endpoint is s3rver (file-backed, streams ranges; ``npm install --prefix .cache/s3rver s3rver@3.7.1``) when
it is installed, else moto's server, which reads a whole object into memory for every ranged GET (fine for the
tests, slow at this size: say which one the results came from).

Usage: python bench/s3_bench.py [--reps 3] [--out s3] [--server s3rver|moto] [--dtype float32|bfloat16]
Writes bench/results/<out>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_checkpoints as mk  # noqa: E402
import run as bench  # noqa: E402

BUCKET = "vllmc-bench"
S3RVER = mk.REPO / ".cache" / "s3rver" / "node_modules" / ".bin" / "s3rver"
TARGETS = {"wall_s3_to_local_vs_chain": 0.5, "bytes_s3_to_local_vs_chain": 0.4, "wall_s3_to_s3_vs_chain": 0.5,
           "bytes_s3_to_s3_vs_chain": 0.4}
CHAIN = r'''
import os, sys, subprocess, boto3
from boto3.s3.transfer import TransferConfig
mode, bucket, prefix, local = sys.argv[1:5]
s3 = boto3.client("s3")
cfg = TransferConfig()
if mode == "download":
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    for page in pages:
        for obj in page.get("Contents", []):
            dest = os.path.join(local, obj["Key"][len(prefix) + 1:])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            s3.download_file(bucket, obj["Key"], dest, Config=cfg)
else:
    for root, _, files in os.walk(local):
        for name in files:
            path = os.path.join(root, name)
            s3.upload_file(path, bucket, prefix + "/" + os.path.relpath(path, local), Config=cfg)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Relay:
    """A TCP relay in front of the S3 server that counts the bytes passing each way."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.up = self.down = 0
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.sock.accept()
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, "down"), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        try:
            while data := src.recv(1 << 20):
                with self._lock:
                    setattr(self, way, getattr(self, way) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def take(self) -> int:
        with self._lock:
            total, self.up, self.down = self.up + self.down, 0, 0
        return total


def disk_blocks(paths: list[Path]) -> int:
    """Bytes of disk blocks allocated under ``paths`` (sparse files count what they really hold)."""
    total = 0
    for top in paths:
        for root, _, files in os.walk(top):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_blocks * 512
                except OSError:
                    pass
    return total


def run_step(cmd: list[str], env: dict[str, str], local: list[Path], relay: Relay) -> dict[str, Any]:
    """``bench.measure`` with a disk sampler over ``local`` and the relay's byte count."""
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], disk_blocks(local))

    relay.take()
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        rec = bench.measure(cmd, [], [], env=env)
    finally:
        stop.set()
        t.join()
    rec["disk_peak_bytes"] = max(peak[0], disk_blocks(local))
    rec["bytes_transferred"] = relay.take()
    return rec


def s3(env: dict[str, str]) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def delete_prefix(client: Any, prefix: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=obj["Key"])


def one_rep(ckpt_prefix: str, work: Path, env: dict[str, str], relay: Relay, extra: tuple[str, ...] = (),
            validated: bool = False) -> dict[str, Any]:
    client = s3(env)
    src = f"s3://{BUCKET}/{ckpt_prefix}"
    rec: dict[str, Any] = {}
    tmp = work / "tmp"
    runs = [("ours_s3_to_local", str(work / "out"), [tmp, work / "out"], ()),
            ("ours_s3_to_s3", f"s3://{BUCKET}/out", [tmp], ())]
    if validated:  # the default: the static validation before the commit (the runs above skip it, as the chain's)
        runs.append(("ours_s3_to_s3_validated", f"s3://{BUCKET}/out", [tmp], ("--validate-vllm",)))
    for name, out, local, more in runs:
        shutil.rmtree(work / "out", ignore_errors=True)
        delete_prefix(client, "out")
        tmp.mkdir(parents=True, exist_ok=True)
        rec[name] = run_step(bench.ours(src, out, *extra, *more), dict(env, TMPDIR=str(tmp)),  # type: ignore[arg-type]
                             local, relay)
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    delete_prefix(client, "out")
    # The chain: download everything, convert, upload.
    down, out = work / "down", work / "chain-out"
    for p in (down, out, tmp):
        shutil.rmtree(p, ignore_errors=True)
    tmp.mkdir(parents=True)
    steps = [run_step([sys.executable, "-c", CHAIN, "download", BUCKET, ckpt_prefix, str(down)],
                      dict(env, TMPDIR=str(tmp)), [down, tmp], relay)]
    steps.append(run_step(bench.ours(down, out, *extra), dict(env, TMPDIR=str(tmp)), [down, out, tmp], relay))
    steps.append(run_step([sys.executable, "-c", CHAIN, "upload", BUCKET, "chain-out", str(out)],
                          dict(env, TMPDIR=str(tmp)), [down, out, tmp], relay))
    rec["chain"] = {"steps": steps, "wall_s": round(sum(s["wall_s"] for s in steps), 3),
                    "rss_mib": max(s["rss_mib"] for s in steps), "exit": max(s["exit"] for s in steps),
                    "bytes_transferred": sum(s["bytes_transferred"] for s in steps),
                    "disk_peak_bytes": max(s["disk_peak_bytes"] for s in steps)}
    for p in (down, out, tmp):
        shutil.rmtree(p, ignore_errors=True)
    delete_prefix(client, "chain-out")
    return rec


TOOLS = ("ours_s3_to_local", "ours_s3_to_s3", "chain")
KEYS = ("wall_s", "rss_mib", "bytes_transferred", "disk_peak_bytes")


def summarize(reps: list[dict[str, Any]]) -> dict[str, Any]:
    tools = [t for t in (*TOOLS, "ours_s3_to_s3_validated") if t in reps[0]]
    med = {t: {k: statistics.median(r[t][k] for r in reps) for k in KEYS} for t in tools}
    ratios = {}
    for t, short in (("ours_s3_to_local", "s3_to_local"), ("ours_s3_to_s3", "s3_to_s3"),
                     ("ours_s3_to_s3_validated", "s3_to_s3_validated")):
        if t not in med:
            continue
        ratios[f"wall_{short}_vs_chain"] = round(med[t]["wall_s"] / med["chain"]["wall_s"], 3)
        ratios[f"bytes_{short}_vs_chain"] = round(med[t]["bytes_transferred"] / med["chain"]["bytes_transferred"], 3)
        ratios[f"rss_{short}_vs_chain"] = round(med[t]["rss_mib"] / med["chain"]["rss_mib"], 3)
    return {"median": med, "ratios": ratios, "targets": TARGETS}


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| run | wall s | peak RSS MiB | bytes transferred | peak local disk |", "|---|---:|---:|---:|---:|"]
    for t, m in summary["median"].items():
        lines.append(f"| {t} | {m['wall_s']:.2f} | {m['rss_mib']:.0f} | {m['bytes_transferred'] / 1e9:.3f} GB | "
                     f"{m['disk_peak_bytes'] / 1e9:.3f} GB |")
    lines.append("")
    lines += [f"- {k}: {v}" + (f" (target <= {summary['targets'][k]})" if k in summary["targets"] else "")
              for k, v in summary["ratios"].items()]
    return "\n".join(lines) + "\n"


def upload_checkpoint(ckpt: Path, env: dict[str, str]) -> str:
    """The checkpoint folder under ``ckpt/`` in the bucket, every file, as a training job would upload it."""
    client = s3(env)
    client.create_bucket(Bucket=BUCKET)
    for root, _, files in os.walk(ckpt):
        for name in files:
            path = Path(root) / name
            client.upload_file(str(path), BUCKET, "ckpt/" + path.relative_to(ckpt).as_posix())
    return "ckpt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="s3")
    parser.add_argument("--ckpt", type=Path, default=None,
                        help="another checkpoint folder (e.g. a corpus case, for a quick check of the script)")
    parser.add_argument("--server", choices=("s3rver", "moto"), default="s3rver" if S3RVER.exists() else "moto")
    parser.add_argument("--dtype", default="float32", help="output dtype of every conversion (ours and the chain's)")
    parser.add_argument("--validated", action="store_true", help="also s3 -> s3 with the validation on (the default)")
    args = parser.parse_args()
    if args.ckpt is None:
        spec = next(s for s in mk.small_specs() if s.name == "qwen0.5b-z3")
        if not (spec.folder() / mk.MARKER).is_file():
            mk.generate(spec)
        ckpt = spec.ckpt()
    else:
        ckpt = args.ckpt
    work = bench.WORK / "s3"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    port = free_port()
    if args.server == "s3rver":
        cmd = [str(S3RVER), "-d", str(work / "server"), "-a", "127.0.0.1", "-p", str(port), "-s",
               "--allow-mismatched-signatures", "--no-vhost-buckets"]
    else:
        cmd = [str(bench.BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        relay = Relay(port)
        env = dict(bench.ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{relay.port}", AWS_ACCESS_KEY_ID="S3RVER",
                   AWS_SECRET_ACCESS_KEY="S3RVER", AWS_REGION="us-east-1", AWS_ALLOW_HTTP="true")
        prefix = upload_checkpoint(ckpt, env)
        relay.take()
        reps = [one_rep(prefix, work, env, relay, ("--dtype", args.dtype), args.validated) for _ in range(args.reps)]
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    failed = [(i, t) for i, r in enumerate(reps) for t in r if r[t]["exit"] != 0]
    if failed:
        print(json.dumps(reps, indent=1)[-6000:])
        raise SystemExit(f"failed runs: {failed}")
    summary = summarize(reps)
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    summary["server"], summary["checkpoint"], summary["dtype"] = args.server, str(ckpt), args.dtype
    (bench.RESULTS / f"{args.out}.json").write_text(json.dumps({"summary": summary, "reps": reps}, indent=1) + "\n")
    (bench.RESULTS / f"{args.out}.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
