"""An object-store prefix as a local folder of stand-ins, so every reader runs unchanged on it.

:func:`mirror` lists ``s3://bucket/prefix`` once and creates a private temporary folder holding, for
each object, an empty *stand-in* file of the object's size (``os.truncate``: no disk blocks, ``st_size``
right), under the same relative path. Detection, the registry and every reader's listing logic
(``iterdir``, ``is_file``, sizes) then work on a local path; their bytes come from the object store:
``safe_io.open_source`` looks each stand-in up in the registry here and returns a
:class:`~vllm_consolidate.storage.bytefile.RemoteFile`, while ``safe_io.open_regular`` refuses a stand-in
outright (its zeros must never be read as data).

The listing is bounded and confined like a local folder: at most :data:`MAX_OBJECTS` objects, every key
under the prefix with no ``..``, ``.`` or empty segment (:func:`~vllm_consolidate.storage.urls.relative_key`),
names that fit a local file name, sizes below :data:`MAX_OBJECT_BYTES`, and no key that is both an object
and a folder (a zero-byte "folder marker" ``a/`` beside ``a/x`` is skipped, as consoles create them).
An input named inside a run (``s3://b/run/checkpoint-5``) also gets the objects directly in its two
parent prefixes, as a local run's folders above a checkpoint hold its config and tokenizer.

Errors and summaries name the object URL, never the stand-in path: :func:`public` maps any text.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vllm_consolidate.errors import (
    ConsolidateError,
    CorruptCheckpointError,
    InputNotFoundError,
    LimitExceededError,
    UnsafeInputError,
    UsageError,
)
from vllm_consolidate.storage.bytefile import RemoteFile, RemoteObject
from vllm_consolidate.storage.store import open_store, storage_error
from vllm_consolidate.storage.urls import ObjectURL, is_object_url, parse_object_url, relative_key

#: Most objects one input may list (a 64-rank ZeRO run with 100 saved steps is ~13k objects).
MAX_OBJECTS = 100_000
#: Largest object accepted (16 TiB, the most an ext4 file can be).
MAX_OBJECT_BYTES = 2**44
NAME_MAX = 255
#: Parent prefixes whose own objects are mirrored too (the asset search looks at most two levels up).
PARENT_LEVELS = 2
#: :meth:`Mirror.materialize`'s bounds (a tokenizer file may be ~35 MB, the set of them a few such files).
MAX_MATERIALIZED_FILE = 128 * 2**20
MAX_MATERIALIZED = 512 * 2**20
#: Names of weight files, which :meth:`Mirror.materialize` never copies by default.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp", ".gguf", ".ckpt", ".h5", ".msgpack", ".npz")

_lock = threading.Lock()
_registry: dict[str, RemoteObject] = {}  # stand-in path -> object
_names: dict[str, str] = {}  # mirror root -> the URL it stands for; kept after close, so late errors name the URL
_open: dict[str, Mirror] = {}  # input folder -> its open mirror


def _list(store: Any, url: ObjectURL, prefix: str, *, recursive: bool, limit: int) -> list[dict]:
    import obstore

    try:
        if not recursive:
            return list(obstore.list_with_delimiter(store, prefix or None)["objects"])
        out: list[dict] = []
        for chunk in obstore.list(store, prefix or None, chunk_size=1000):
            out.extend(chunk)
            if len(out) > limit:
                raise LimitExceededError(f"the prefix holds more than {limit:,} objects, more than any checkpoint",
                                         path=str(url), hint="Name the checkpoint's own prefix, not a whole bucket.")
        return out
    except ConsolidateError:
        raise
    except Exception as exc:  # noqa: BLE001 - obstore's errors
        if type(exc).__name__ == "InvalidPathError":  # object_store refuses '..', '.' and '//' in keys
            raise UnsafeInputError(f"the listing holds a key that could name an object outside the input "
                                   f"({str(exc).splitlines()[0][:300]})", path=str(url)) from exc
        raise storage_error(exc, url, what="listing") from exc


def _check_name(rel: str, url: ObjectURL) -> None:
    for part in rel.split("/"):
        if len(part.encode("utf-8", "surrogatepass")) > NAME_MAX:
            raise LimitExceededError(f"a key has a path segment longer than {NAME_MAX} bytes ({part[:80]}...)",
                                     path=str(url))


def _plan(objects: list[dict], url: ObjectURL) -> dict[str, dict]:
    """``{relative path: object meta}``, confined, bounded, without folder markers or file/folder clashes."""
    files: dict[str, dict] = {}
    for meta in objects:
        rel = relative_key(str(meta["path"]), url.prefix)
        _check_name(rel, url)
        size = int(meta["size"])
        if size < 0 or size > MAX_OBJECT_BYTES:
            raise LimitExceededError(f"object {rel} declares {size:,} bytes", path=str(url.child(rel)))
        files[rel] = meta
    folders = {rel.rsplit("/", i)[0] for rel in files for i in range(1, rel.count("/") + 1)}
    for rel in sorted(folders & files.keys()):
        if int(files[rel]["size"]) != 0:
            raise CorruptCheckpointError(f"{rel} is both an object and a folder of objects", path=str(url.child(rel)),
                                         hint="Remove one of them; a local folder cannot hold both either.")
        del files[rel]  # a zero-byte folder marker
    return files


class Mirror:
    """A mirrored prefix: ``path`` is the input folder of stand-ins; :meth:`close` removes everything."""

    def __init__(self, url: ObjectURL, options: dict[str, str] | None = None):
        self.url = url
        self.store = open_store(url, options)
        self.objects = 0
        self.bytes = 0
        self._paths: list[str] = []
        segments = url.prefix.split("/") if url.prefix else []
        kept = segments[len(segments) - min(len(segments), PARENT_LEVELS + 1):]
        # The root stands for the prefix above the kept segments, so paths map back to URLs by prefix.
        base = ObjectURL(url.scheme, url.bucket, "/".join(segments[: len(segments) - len(kept)]))
        self.root = Path(tempfile.mkdtemp(prefix="vllmc-mirror-")).resolve()
        try:
            with _lock:
                _names[str(self.root)] = str(base)
            self.path = self.root.joinpath(*kept)
            self.path.mkdir(parents=True, exist_ok=True)
            found = _plan(_list(self.store, url, url.prefix, recursive=True, limit=MAX_OBJECTS), url)
            if not found:
                raise InputNotFoundError("no objects under this prefix", path=str(url),
                                         hint="Check the bucket and prefix (and the endpoint and credentials).")
            self._add(self.path, url, found)
            self._add_parents(len(kept) - 1)
            with _lock:
                _open[str(self.path)] = self
        except BaseException:
            self.close()
            raise

    def _add(self, folder: Path, url: ObjectURL, files: dict[str, dict]) -> None:
        entries = {}
        for rel, meta in files.items():
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "xb") as fh:  # noqa: PTH123 - created here, in our own private folder
                os.truncate(fh.fileno(), int(meta["size"]))
            entries[str(path)] = RemoteObject(self.store, str(meta["path"]), int(meta["size"]), meta.get("e_tag"),
                                              str(url.child(rel)))
            self.objects += 1
            self.bytes += int(meta["size"])
        with _lock:
            _registry.update(entries)
            self._paths.extend(entries)

    def _add_parents(self, levels: int) -> None:
        """The objects directly inside the input's parent prefixes (not their sub-folders)."""
        folder, prefix = self.path, self.url.prefix
        for _ in range(levels):
            folder, prefix = folder.parent, prefix.rpartition("/")[0]
            parent = ObjectURL(self.url.scheme, self.url.bucket, prefix)
            listed = _list(self.store, parent, prefix, recursive=False, limit=MAX_OBJECTS)
            files = _plan(listed[:MAX_OBJECTS], parent)
            self._add(folder, parent, {rel: m for rel, m in files.items() if not (folder / rel).exists()})

    def materialize(self, keep: Callable[[Path, int], bool] | None = None, *, max_file: int = MAX_MATERIALIZED_FILE,
                    max_total: int = MAX_MATERIALIZED) -> list[Path]:
        """Replace the stand-ins ``keep(path, size)`` selects with real local copies of their objects.

        For what third-party code opens by name (transformers' ``AutoConfig``/``AutoTokenizer`` in
        ``validate``): configs and tokenizer files, never weights (by default every file but those named
        like weights). Each copy is bounded, and a file too large to copy is left a stand-in.

        Returns:
            The files now local.
        """
        keep = keep or (lambda path, size: not path.name.endswith(WEIGHT_SUFFIXES))
        with _lock:
            mine = set(self._paths)
            chosen = [(Path(p), o) for p, o in _registry.items() if p in mine]
        done, total = [], 0
        for path, obj in sorted(chosen, key=lambda item: str(item[0])):
            if obj.size > max_file or total + obj.size > max_total or not keep(path, obj.size):
                continue
            src = RemoteFile(obj, obj.url)
            data = src.pread(obj.size, 0) if obj.size else b""
            if len(data) != obj.size:
                raise CorruptCheckpointError(f"object is {len(data):,} bytes, not the {obj.size:,} listed",
                                             path=obj.url)
            with _lock:
                _registry.pop(str(path), None)
            tmp = path.with_name(path.name + ".vllmc-part")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            total += obj.size
            done.append(path)
        return done

    def local(self, target: str | os.PathLike | None) -> Path | None:
        """The stand-in path of ``target``: a URL under the mirrored prefix, or a path relative to it.

        Raises:
            UsageError: ``target`` is a URL outside the mirrored prefix, or an absolute local path.
        """
        if target is None:
            return None
        text = os.fspath(target)
        if is_object_url(text):
            other = parse_object_url(text)
            if (other.scheme, other.bucket) == (self.url.scheme, self.url.bucket) and (
                    other.prefix == self.url.prefix or other.prefix.startswith(f"{self.url.prefix}/")
                    or not self.url.prefix):
                return self.path.joinpath(*[p for p in other.prefix[len(self.url.prefix):].split("/") if p])
        elif not os.path.isabs(text):
            return self.path / text
        raise UsageError(f"{text} is not inside the input {self.url}",
                         hint="Name a checkpoint under the input prefix (its URL, or its path relative to the input).")

    def close(self) -> None:
        with _lock:
            for path in self._paths:
                _registry.pop(path, None)
            self._paths.clear()
            if _open.get(str(getattr(self, "path", ""))) is self:
                del _open[str(self.path)]
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Mirror:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mirror(url: ObjectURL, options: dict[str, str] | None = None) -> Mirror:
    """List ``url`` and return its :class:`Mirror` (a context manager; ``.path`` is the input folder).

    Raises:
        InputNotFoundError: Nothing is under the prefix (exit 3).
        UnsafeInputError: A key could name an object outside it (exit 5).
        LimitExceededError: Too many objects, a name too long, an impossible size (exit 4).
        StorageError: The listing failed (exit 13).
    """
    return Mirror(url, options)


@contextlib.contextmanager
def local_input(target: str | os.PathLike, options: dict[str, str] | None = None) -> Iterator[Path]:
    """``target`` as a local folder: itself for a local path, a :class:`Mirror`'s input folder for a URL.

    Errors raised inside the block name URLs, not stand-in paths (:func:`public_error`).
    """
    if not is_object_url(os.fspath(target)):
        yield Path(target)
        return
    with mirror(parse_object_url(os.fspath(target)), options) as m:
        try:
            yield m.path
        except ConsolidateError as exc:
            public_error(exc)
            raise


def mirror_of(folder: str | os.PathLike) -> Mirror | None:
    """The open mirror whose input folder is ``folder``, if any."""
    with _lock:
        return _open.get(os.fspath(folder))


def lookup(path: str | os.PathLike) -> RemoteObject | None:
    """The object a stand-in stands for, or None for any other path (cheap when nothing is mirrored)."""
    if not _registry:
        return None
    text = os.path.realpath(path)
    with _lock:
        return _registry.get(text)


def is_standin(path: str | os.PathLike) -> bool:
    return lookup(path) is not None


def open_remote(path: str | os.PathLike) -> Any:
    """A :class:`RemoteFile` for a stand-in (or the file of what :func:`register` put there), None for a path."""
    obj = lookup(path)
    if obj is None:
        return None
    return obj.open() if hasattr(obj, "open") else RemoteFile(obj, obj.url)


def register(entries: dict[str, Any], folder: Path, url: str) -> None:
    """Stand-ins made elsewhere (``{path: object with open()}``), and the URL ``folder`` stands for in messages."""
    with _lock:
        _registry.update(entries)
        _names[str(folder)] = url


def unregister(entries: dict[str, Any]) -> None:
    with _lock:
        for path in entries:
            _registry.pop(path, None)


def public(text: str) -> str:
    """``text`` with every mirrored input folder's path replaced by its URL (for messages and summaries)."""
    if not _names or not isinstance(text, str):
        return text
    with _lock:
        pairs = sorted(_names.items(), key=lambda kv: -len(kv[0]))
    for folder, url in pairs:
        if folder in text:
            text = text.replace(folder, url)
    return text


def public_error(exc: BaseException) -> BaseException:
    """Rewrite a :class:`ConsolidateError`'s path and message to name URLs (in place; returned for chaining)."""
    if isinstance(exc, ConsolidateError) and _names:
        exc.message = public(exc.message)
        exc.args = (exc.message, *exc.args[1:])
        if exc.path:
            exc.path = public(exc.path)
        if exc.hint:
            exc.hint = public(exc.hint)
    return exc


def public_value(value: Any) -> Any:
    """:func:`public` over every string in a JSON-like value."""
    if isinstance(value, str):
        return public(value)
    if isinstance(value, dict):
        return {public_value(k): public_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(public_value(v) for v in value)
    return value


__all__ = ["MAX_OBJECTS", "Mirror", "is_standin", "local_input", "lookup", "mirror", "mirror_of", "open_remote",
           "public", "register", "unregister", "public_error", "public_value"]
