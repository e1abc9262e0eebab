"""A real S3 endpoint on loopback for the object-storage tests: moto's server, and a counting proxy.

:func:`start_moto` runs ``moto_server -H 127.0.0.1 -p PORT`` on a free port and waits until it answers.
:class:`CountingProxy` sits between obstore and moto (point ``AWS_ENDPOINT_URL`` at it) and records
every request (method, path, ``Range`` header, bytes of body returned): what the server was asked for,
counted outside our own code.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

#: The environment obstore (and boto3) read; set for the test process and inherited by CLI children.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_command() -> list[str]:
    """moto_server from the test interpreter's venv (its console script), else from PATH."""
    local = Path(sys.executable).parent / "moto_server"
    found = str(local) if local.exists() else shutil.which("moto_server")
    if found is None:
        raise RuntimeError("moto_server is not installed (pip install 'moto[server]'; it is in the test extras)")
    return [found]


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    """Start moto's S3 server on a free loopback port; returns the process and its URL."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([*moto_command(), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).read()
            return proc, url
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int

    def span(self) -> tuple[int, int] | None:
        """``(start, end)`` (end exclusive) of a ``bytes=a-b`` range, or None for a whole-object GET."""
        if not self.range or not self.range.startswith("bytes="):
            return None
        a, _, b = self.range[6:].partition("-")
        return int(a), int(b) + 1


class CountingProxy:
    """A plain HTTP forwarder to ``upstream`` that records every request (start/stop; ``requests``)."""

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: with Nagle on, the body waits for the client's delayed ACK
            # (40 ms a request, 10x moto's own time).
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(proxy.upstream, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                with proxy._lock:
                    proxy.requests.append(Request(self.command, self.path, self.headers.get("Range"), resp.status,
                                                  len(data)))
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # A HEAD's Content-Length is the object's size (obstore's head() reads it), not the empty body's.
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def gets(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and "list-type" not in r.path
                    and "delimiter" not in r.path]


def upload_folder(client, bucket: str, folder: Path, prefix: str) -> dict[str, str]:
    """Upload every file under ``folder`` to ``bucket/prefix/...``; returns ``{key: ETag}``."""
    etags = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            client.upload_file(str(path), bucket, key)
            etags[key] = client.head_object(Bucket=bucket, Key=key)["ETag"]
    return etags


def etags_of(client, bucket: str, prefix: str) -> dict[str, str]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = obj["ETag"]
    return out


def environment(endpoint: str) -> dict[str, str]:
    return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}


def set_environment(endpoint: str) -> dict[str, str | None]:
    """Point this process (and its children) at ``endpoint``; returns the old values for :func:`restore`."""
    new = environment(endpoint)
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    return old


def restore(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
