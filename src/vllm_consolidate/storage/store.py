"""One object-store client per bucket, configured the standard way.

Credentials, region and endpoint come from the environment each cloud's own tools read
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``,
``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``; ``GOOGLE_SERVICE_ACCOUNT``…; ``AZURE_STORAGE_ACCOUNT_NAME``,
``AZURE_STORAGE_ACCOUNT_KEY``…), read by obstore itself, plus ``--storage-options JSON`` for anything
else (keys are obstore's config keys, e.g. ``{"endpoint": "…", "region": "…"}``; they win over the
environment). An ``http://`` endpoint is allowed when it is named explicitly (a local S3 server):
object_store refuses plain HTTP otherwise.

obstore is imported here, on first use, so commands on local paths never load it.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import timedelta
from typing import Any

from vllm_consolidate.errors import InputNotFoundError, StorageError, UsageError
from vllm_consolidate.storage.urls import ObjectURL

#: Retries with exponential backoff on transient errors (5xx, timeouts, connection resets); obstore's
#: own policy, made explicit so a flaky endpoint is retried the same way everywhere.
RETRY = {"max_retries": 6, "retry_timeout": timedelta(seconds=120),  # obstore takes timedeltas here, not "120s"
         "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=10), "base": 2}}
CLIENT = {"timeout": "300s", "connect_timeout": "15s"}
MAX_OPTIONS_BYTES = 64 * 1024

_stores: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()


def parse_storage_options(text: str | None) -> dict[str, str]:
    """``--storage-options JSON`` as a flat dict of strings.

    Raises:
        UsageError: not a JSON object of strings, numbers or booleans.
    """
    if not text:
        return {}
    if len(text) > MAX_OPTIONS_BYTES:
        raise UsageError("--storage-options is longer than 64 KiB")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--storage-options is not valid JSON: {exc}",
                         hint='Pass a JSON object, e.g. \'{"region": "us-east-1"}\'.') from exc
    if not isinstance(value, dict) or not all(isinstance(v, str | int | float | bool) for v in value.values()):
        raise UsageError("--storage-options must be a JSON object of strings, numbers or booleans",
                         hint='e.g. \'{"endpoint": "http://127.0.0.1:9000", "region": "us-east-1"}\'.')
    return {str(k): (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in value.items()}


def _client_options(url: ObjectURL, options: dict[str, str]) -> dict[str, Any]:
    client = dict(CLIENT)
    endpoint = options.get("endpoint") or options.get("aws_endpoint") or (
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") if url.kind == "s3" else None)
    if endpoint and endpoint.lower().startswith("http://"):
        client["allow_http"] = True  # named by the user: a local or private endpoint without TLS
    return client


def open_store(url: ObjectURL, options: dict[str, str] | None = None) -> Any:
    """The obstore client for ``url``'s bucket (cached per bucket and options).

    Raises:
        StorageError: obstore is not installed, or the store cannot be configured.
    """
    options = dict(options or {})
    cache_key = (url.bucket_url, json.dumps(options, sort_keys=True))
    with _lock:
        if cache_key in _stores:
            return _stores[cache_key]
        try:
            from obstore.store import from_url
        except ImportError as exc:  # pragma: no cover - obstore is a dependency
            raise StorageError("object storage needs the obstore package",
                               hint="pip install obstore (a dependency of vllm-consolidate).") from exc
        try:
            store = from_url(url.bucket_url, config=options or None, client_options=_client_options(url, options),
                             retry_config=RETRY)
        except Exception as exc:  # obstore raises its own configuration errors
            raise StorageError(f"cannot configure the store for {url.bucket_url}: {exc}") from exc
        _stores[cache_key] = store
        return store


def storage_error(exc: BaseException, url: ObjectURL | str, *, what: str = "request") -> Exception:
    """Map an obstore exception to ours: a missing object is :class:`InputNotFoundError`, the rest
    :class:`StorageError` (after obstore's retries)."""
    if isinstance(exc, FileNotFoundError):
        return InputNotFoundError(f"no such object ({what})", path=str(url))
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return StorageError(f"object store {what} failed: {first[:300]}", path=str(url))
