"""``--storage-options`` reaches obstore the way obstore takes it (no server, or a bare one on loopback).

* obstore's HTTP client keys (``allow_http``, ``timeout``…) are client options: passed as store config, obstore
  0.12 panics (a ``BaseException``), which was exit 70 for a user's setting.
* A ``gs://`` store pointed at a plain-HTTP ``base_url`` (an emulator, a private gateway) is allowed to use HTTP,
  as an ``http://`` S3 endpoint is: the request reaches the server (it was refused in the client before).
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vllm_consolidate import cli
from vllm_consolidate.storage.store import open_store
from vllm_consolidate.storage.urls import parse_object_url


def _cli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, err.getvalue()


@pytest.mark.parametrize("url, extra", [("s3://b", {"region": "us-east-1"}), ("gs://b", {}),
                                        ("az://b", {"account_name": "acct"})])
def test_client_keys_go_to_the_client_not_the_store_config(url, extra):
    options = {**extra, "allow_http": "true", "timeout": "7s", "user_agent": "t"}
    assert open_store(parse_object_url(url), options) is not None  # obstore panicked here before
    code, err = _cli("inspect", f"{url}/p", "--storage-options", json.dumps({**options, "no_such_key": "x"}))
    assert code == 13 and "no_such_key" in err and "internal error" not in err, err


class _Refuse(BaseHTTPRequestHandler):
    """Answers every request 403 (not retried by obstore) and records its request line."""

    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.seen.append(self.requestline)
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_an_http_gcs_base_url_is_reached(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        code, err = _cli("inspect", "gs://bkt/run", "--storage-options",
                         json.dumps({"base_url": base, "skip_signature": True}))
        assert code == 13 and "403" in err, err
        monkeypatch.setenv("GOOGLE_BASE_URL", base)  # named in the environment instead: allowed HTTP as well
        code, err = _cli("inspect", "gs://bkt2/run", "--storage-options", '{"skip_signature": true}')
        assert code == 13 and "403" in err, err
    finally:
        server.shutdown()
        server.server_close()
    assert [line.split("?")[0] for line in _Refuse.seen] == ["GET /bkt", "GET /bkt2"], _Refuse.seen
