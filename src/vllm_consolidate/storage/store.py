"""One object-store client per bucket, configured the standard way.

Credentials, region and endpoint come from the environment each cloud's own tools read
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``,
``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``; ``GOOGLE_SERVICE_ACCOUNT``…; ``AZURE_STORAGE_ACCOUNT_NAME``,
``AZURE_STORAGE_ACCOUNT_KEY``…), read by obstore itself, plus ``--storage-options JSON`` for anything
else (keys are obstore's config keys, e.g. ``{"endpoint": "…", "region": "…"}``, or its HTTP client keys such
as ``allow_http`` and ``proxy_url``; they win over the environment). An ``http://`` endpoint is allowed when it
is named explicitly (``endpoint`` or ``AWS_ENDPOINT_URL`` for S3, ``base_url`` or ``GOOGLE_BASE_URL`` for GCS,
``endpoint`` or ``AZURE_STORAGE_ENDPOINT`` for Azure: a local server); object_store refuses plain HTTP otherwise.

obstore is imported here, on first use, so commands on local paths never load it.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from vllm_consolidate.errors import InputNotFoundError, StorageError, UsageError
from vllm_consolidate.storage.urls import ObjectURL

CLIENT = {"timeout": "300s", "connect_timeout": "15s"}
MAX_OPTIONS_BYTES = 64 * 1024
#: obstore's HTTP client keys (its ``ClientConfig``, less the non-string ``default_headers``). They must go to
#: ``client_options``: in ``config``, obstore 0.12 accepts them and then panics ("Expected config prefix to start
#: with aws_"), a ``BaseException`` that escaped ``except Exception`` as exit 70.
CLIENT_KEYS = frozenset({
    "allow_http", "allow_invalid_certificates", "connect_timeout", "default_content_type", "http1_only",
    "http2_keep_alive_interval", "http2_keep_alive_timeout", "http2_keep_alive_while_idle", "http2_only",
    "pool_idle_timeout", "pool_max_idle_per_host", "proxy_url", "proxy_ca_certificate", "proxy_excludes",
    "root_certificate", "randomize_addresses", "read_timeout", "timeout", "user_agent"})

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


def _endpoint(url: ObjectURL, options: dict[str, str]) -> str | None:
    """The endpoint the user named for ``url``'s store, if any (options first, then the environment)."""
    if url.kind == "s3":
        return options.get("endpoint") or options.get("aws_endpoint") or (
            os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    if url.kind == "gcs":
        return options.get("base_url") or options.get("google_base_url") or os.environ.get("GOOGLE_BASE_URL")
    # obstore reads every AZURE_* variable, and takes these three names for the endpoint (an Azurite emulator or
    # a private gateway); the environment's alone used to fail ("builder error") on a plain http:// endpoint.
    return options.get("endpoint") or options.get("azure_storage_endpoint") or options.get("azure_endpoint") or (
        os.environ.get("AZURE_STORAGE_ENDPOINT") or os.environ.get("AZURE_ENDPOINT"))


def _split_options(url: ObjectURL, options: dict[str, str]) -> tuple[dict[str, str], dict[str, Any]]:
    """``--storage-options`` as obstore's (store config, client options): its client keys go to the client."""
    config = {k: v for k, v in options.items() if k.lower() not in CLIENT_KEYS}
    client: dict[str, Any] = dict(CLIENT)
    endpoint = _endpoint(url, options)
    if endpoint and endpoint.lower().startswith("http://"):
        client["allow_http"] = True  # named by the user: a local or private endpoint without TLS
    client.update({k.lower(): v for k, v in options.items() if k.lower() in CLIENT_KEYS})
    return config, client


def retry_config() -> dict[str, Any]:
    """Retries with exponential backoff on transient errors (5xx, timeouts, connection resets); obstore's
    own policy, made explicit so a flaky endpoint is retried the same way everywhere.

    Built when a store is opened: obstore takes timedeltas here (not "120s"), and datetime is not worth
    importing at every local conversion's start.
    """
    from datetime import timedelta

    return {"max_retries": 6, "retry_timeout": timedelta(seconds=120),
            "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=10), "base": 2}}


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
        config, client = _split_options(url, options)
        try:
            store = from_url(url.bucket_url, config=config or None, client_options=client, retry_config=retry_config())
        except Exception as exc:  # obstore raises its own configuration errors
            raise StorageError(f"cannot configure the store for {url.bucket_url}: {_first_line(exc)}",
                               hint="Check the keys of --storage-options against obstore's settings.") from exc
        except BaseException as exc:  # a Rust panic (pyo3's PanicException) on a setting obstore cannot map
            if type(exc).__name__ != "PanicException":
                raise
            raise StorageError(f"cannot configure the store for {url.bucket_url}: {_first_line(exc)}",
                               hint="Check the keys of --storage-options against obstore's settings.") from exc
        _stores[cache_key] = store
        return store


def storage_error(exc: BaseException, url: ObjectURL | str, *, what: str = "request") -> Exception:
    """Map an obstore exception to ours: a missing object is :class:`InputNotFoundError`, the rest
    :class:`StorageError` (after obstore's retries)."""
    if isinstance(exc, FileNotFoundError):
        return InputNotFoundError(f"no such object ({what})", path=str(url))
    return StorageError(f"object store {what} failed: {_first_line(exc)}", path=str(url))


def _first_line(exc: BaseException) -> str:
    """The first line of an obstore error (the rest is a multi-line Rust debug dump), bounded."""
    text = str(exc)
    return (text.splitlines()[0] if text.strip() else type(exc).__name__)[:300]
