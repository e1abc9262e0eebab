"""A real Azure Blob endpoint on loopback for tests/test_azure.py: Azurite (Microsoft's emulator) in a subprocess.

A plain helper module (no fixtures). Azurite is installed by ``scripts/setup_azurite.sh`` (``make test`` runs it)
into ``.cache/azurite``. The test's own view of the container (uploads, listings, ETags, bodies) goes through
:class:`Azurite`, a few lines of the Blob REST API signed with the emulator's published SharedKey, not through
obstore, the code under test.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import hashlib
import hmac
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BINARY = Path(os.environ.get("AZURITE_DIR", REPO / ".cache" / "azurite")) / "node_modules" / ".bin" / "azurite-blob"
#: The emulator's well-known development account (published in Azurite's README).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_SIGNED = ("Content-Encoding", "Content-Language", "Content-Length", "Content-MD5", "Content-Type", "Date",
           "If-Modified-Since", "If-Match", "If-None-Match", "If-Unmodified-Since", "Range")


@dataclass
class Azurite:
    """A running Azurite blob service: its account URL and a minimal SharedKey client."""

    host: str  # http://127.0.0.1:PORT
    process: subprocess.Popen

    @property
    def endpoint(self) -> str:
        """The account's URL (path style, as the emulator serves it)."""
        return f"{self.host}/{ACCOUNT}"

    @property
    def env(self) -> dict[str, str]:
        """The standard Azure environment pointing at this emulator (what a user of a private endpoint sets)."""
        return {"AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT, "AZURE_STORAGE_ACCOUNT_KEY": KEY,
                "AZURE_STORAGE_ENDPOINT": self.endpoint}

    def request(self, method: str, path: str, body: bytes = b"", query: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One Blob REST request signed with SharedKey; ``path`` is ``/container[/blob]``."""
        query = query or {}
        headers = {"Content-Type": "application/octet-stream", **(headers or {}),
                   "x-ms-date": email.utils.formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
        lower = {k.lower(): v for k, v in headers.items()}
        if body:
            lower["content-length"] = str(len(body))
        canonical = "".join(f"{k}:{v}\n" for k, v in sorted(lower.items()) if k.startswith("x-ms-"))
        # Path-style (emulator) URLs: the account appears twice in the canonicalized resource.
        resource = f"/{ACCOUNT}/{ACCOUNT}{path}" + "".join(f"\n{k.lower()}:{v}" for k, v in sorted(query.items()))
        text = "\n".join([method, *(lower.get(h.lower(), "") for h in _SIGNED)]) + "\n" + canonical + resource
        digest = hmac.new(base64.b64decode(KEY), text.encode(), hashlib.sha256).digest()
        headers["Authorization"] = f"SharedKey {ACCOUNT}:{base64.b64encode(digest).decode()}"
        url = self.endpoint + urllib.parse.quote(path) + (f"?{urllib.parse.urlencode(query)}" if query else "")
        req = urllib.request.Request(url, data=body if method == "PUT" else None, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def create_container(self, name: str) -> None:
        status, _, body = self.request("PUT", f"/{name}", query={"restype": "container"})
        assert status == 201, (status, body)

    def put(self, container: str, key: str, data: bytes) -> None:
        status, _, body = self.request("PUT", f"/{container}/{key}", data, headers={"x-ms-blob-type": "BlockBlob"})
        assert status == 201, (status, body)

    def get(self, container: str, key: str) -> bytes:
        status, _, body = self.request("GET", f"/{container}/{key}")
        assert status == 200, (status, key)
        return body

    def delete(self, container: str, key: str) -> None:
        status, _, body = self.request("DELETE", f"/{container}/{key}")
        assert status == 202, (status, body)

    def blobs(self, container: str, prefix: str = "") -> dict[str, tuple[int, str, str]]:
        """``{name: (size, ETag, Content-MD5)}`` of every blob under ``prefix`` (a plain string prefix)."""
        out: dict[str, tuple[int, str, str]] = {}
        marker = ""
        while True:
            query = {"restype": "container", "comp": "list", **({"prefix": prefix} if prefix else {}),
                     **({"marker": marker} if marker else {})}
            status, _, body = self.request("GET", f"/{container}", query=query)
            assert status == 200, (status, body)
            text = body.decode()
            for blob in re.findall(r"<Blob>(.*?)</Blob>", text, re.S):
                field = {k: re.search(f"<{k}>(.*?)</{k}>", blob, re.S) for k in ("Name", "Content-Length", "Etag",
                                                                                 "Content-MD5")}
                out[field["Name"].group(1)] = (int(field["Content-Length"].group(1)), field["Etag"].group(1),
                                               field["Content-MD5"].group(1) if field["Content-MD5"] else "")
            marker = (re.search(r"<NextMarker>(.*?)</NextMarker>", text, re.S) or [None, ""])[1]
            if not marker:
                return out

    def keys(self, container: str, prefix: str = "") -> dict[str, int]:
        """Every blob under ``prefix`` and its size (as :meth:`tests.s3_server.S3Server.keys`)."""
        return {name: size for name, (size, _, _) in self.blobs(container, prefix).items()}

    def etags(self, container: str, prefix: str = "") -> dict[str, str]:
        """Every blob under ``prefix`` and its ETag."""
        return {name: etag for name, (_, etag, _) in self.blobs(container, prefix).items()}

    def uploads(self, container: str) -> list[str]:
        """The names holding only uncommitted blocks: a block upload never committed (Azure's open multipart
        upload; it has no abort, and a listing shows such a name only with ``include=uncommittedblobs``)."""
        status, _, body = self.request("GET", f"/{container}", query={"restype": "container", "comp": "list",
                                                                      "include": "uncommittedblobs"})
        assert status == 200 and "<NextMarker/>" in body.decode(), (status, body[-300:])
        names = re.findall(r"<Blob><Name>(.*?)</Name>", body.decode())
        return sorted(set(names) - set(self.blobs(container)))

    def create_bucket(self, container: str) -> None:
        """:meth:`create_container` under the name the object-store tests share with :mod:`tests.s3_server`."""
        self.create_container(container)

    def upload_folder(self, container: str, folder: Path, prefix: str) -> dict[str, tuple[int, str, str]]:
        """Upload every file of ``folder`` under ``prefix/``; returns :meth:`blobs` of the prefix."""
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.put(container, f"{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes())
        return self.blobs(container, f"{prefix}/")


@contextlib.contextmanager
def start() -> Iterator[Azurite]:
    """Run ``azurite-blob`` in memory on a free loopback port until the block ends (no telemetry, no disk)."""
    assert BINARY.exists(), f"{BINARY} is missing: run scripts/setup_azurite.sh (make setup-azurite)"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([str(BINARY), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                             "--extentMemoryLimit", "1024", "--silent", "--loose", "--skipApiVersionCheck",
                             "--disableTelemetry"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server = Azurite(f"http://127.0.0.1:{port}", proc)
    try:
        deadline = time.monotonic() + 60  # node loads Azurite in ~5 s on a busy 2-core machine
        while True:
            assert proc.poll() is None, f"azurite exited: {proc.stderr.read().decode()[-2000:]}"  # type: ignore[union-attr]
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline, "azurite did not start within 60 s"
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
