"""Reading untrusted input safely: regular files only, bounded sizes, paths confined to the input.

Every checkpoint is treated as hostile. A file named like a rank file may be a FIFO (opening it
would block forever) or a device; a ``config.json`` may be a gigabyte; a ``tokenizer.json`` or a
``latest`` tag may point outside the checkpoint. The helpers here are the one place those cases are
handled, so every reader and the asset finder behave the same:

* :func:`open_source` opens an input file for reading as a
  :class:`~vllm_consolidate.storage.bytefile.ByteFile`: a local regular file (through :func:`open_regular`)
  or, for a stand-in of an object-store input (:mod:`vllm_consolidate.storage.remote`), the object itself;
* :func:`open_regular` opens without blocking, refuses anything but a regular file, then returns a
  normal blocking descriptor. It refuses a stand-in with a RuntimeError (a bug, exit 70): its zeros
  must never be read as data, so code that needs a descriptor can never see an object-store input;
* :func:`read_bounded`, :func:`read_text` and :func:`read_json` read a whole small file with a size
  cap, strict UTF-8 and a JSON parse that turns nesting bombs and non-finite numbers into errors;
* :func:`confined` resolves a path (symlinks included) and says whether it stays inside one of the
  given roots.

The caps are far above any real file of each kind (a 70B model's ``config.json`` is a few KB, its
index a few hundred KB) and far below what would hurt a shared machine.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from vllm_consolidate.errors import ConsolidateError, CorruptCheckpointError
from vllm_consolidate.storage import remote
from vllm_consolidate.storage.bytefile import ByteFile, ByteFileReader, LocalFile

KIB = 2**10
MIB = 2**20

#: Size caps for whole-file reads, by what the file is.
MAX_CONFIG_BYTES = 16 * MIB  # config.json, generation_config.json, adapter_config.json
#: A tokenizer file (``tokenizer.json``, ``tekken.json``, SentencePiece/tiktoken models, vocab and merges,
#: ``tokenizer_config.json``...). The largest real ones are ~35 MB (Gemma 3's ``tokenizer.json``: 33 MB;
#: Llama 4 and gpt-oss: 28 MB; Mistral's ``tekken.json``: 15-19 MB); the cap is ~4x that.
MAX_TOKENIZER_BYTES = 128 * MIB
#: A chat template (``*.jinja``, ``chat_template.json``): real ones are a few KB, the largest ~100 KB.
MAX_TEMPLATE_BYTES = 4 * MIB
#: All the tokenizer files of one folder together (a few of the largest files above).
MAX_TOKENIZER_SET_BYTES = 256 * MIB
MAX_INDEX_BYTES = 64 * MIB  # *.index.json
MAX_TAG_BYTES = 4 * KIB  # DeepSpeed's ``latest``
MAX_LIST_BYTES = 16 * MIB  # batch --input-list


def _error_cls(error: type[ConsolidateError] | None) -> type[ConsolidateError]:
    return error or CorruptCheckpointError


def open_regular(path: str | os.PathLike, *, error: type[ConsolidateError] | None = None) -> int:
    """Open ``path`` read-only, refusing anything that is not a regular file (FIFO, device, socket, folder).

    The open itself does not block (``O_NONBLOCK``), so a FIFO cannot hang us; the flag is cleared
    once the descriptor is known to be a regular file.

    Args:
        path: The file.
        error: The error class to raise (default :class:`CorruptCheckpointError`).

    Returns:
        A blocking, read-only file descriptor; the caller closes it.
    """
    cls = _error_cls(error)
    if remote.is_standin(path):
        raise RuntimeError(f"{path} stands for an object-store object; read it through safe_io.open_source")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise cls(f"cannot open file: {exc.strerror or exc}", path=path) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise cls("not a regular file (a FIFO, device, socket or folder); refusing to read it", path=path,
                      hint="Replace it with the real file; only regular files are read from a checkpoint.")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_source(path: str | os.PathLike, *, error: type[ConsolidateError] | None = None) -> ByteFile:
    """An input file to read by byte ranges: the object behind a stand-in, else a local regular file.

    Raises:
        ConsolidateError: (``error``, default corrupt checkpoint) not a regular file, or unreadable.
    """
    found = remote.open_remote(path)
    if found is not None:
        return found
    return LocalFile(open_regular(path, error=error), os.fspath(path))


def open_file(path: str | os.PathLike, *, error: type[ConsolidateError] | None = None) -> ByteFileReader:
    """A seekable binary file object (``with open_file(p) as fh``) over :func:`open_source`: a local regular
    file or the object behind a stand-in, read the same way (positional reads, ``fh.size``)."""
    return ByteFileReader(open_source(path, error=error))


def is_regular_file(path: str | os.PathLike) -> bool:
    """True for a regular file (after following symlinks), without opening it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def read_bounded(path: str | os.PathLike, limit: int, *, what: str = "file",
                 error: type[ConsolidateError] | None = None) -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes.

    Raises:
        ConsolidateError: (``error``, default corrupt checkpoint) not a regular file, unreadable, or too large.
    """
    cls = _error_cls(error)
    src = open_source(path, error=error)
    try:
        if src.size > limit:
            raise cls(f"{what} is {src.size:,} bytes, more than the {limit:,} such a file can plausibly be; "
                      "refusing to read it", path=src.name)
        chunks, total = [], 0
        while True:  # read to the end, in case the file grew after it was measured
            data = src.pread(min(limit + 1 - total, 4 * MIB), total)
            if not data:
                break
            chunks.append(data)
            total += len(data)
            if total > limit:
                raise cls(f"{what} is more than {limit:,} bytes; refusing to read it", path=src.name)
        return b"".join(chunks)
    except OSError as exc:
        raise cls(f"cannot read {what}: {exc.strerror or exc}", path=path) from exc
    finally:
        src.close()


def read_text(path: str | os.PathLike, limit: int, *, what: str = "file",
              error: type[ConsolidateError] | None = None) -> str:
    """A small text file, strictly UTF-8."""
    raw = read_bounded(path, limit, what=what, error=error)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _error_cls(error)(f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})", path=path) from exc


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} does not fit a float")
    return value


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice (``json.loads`` would silently keep the last)."""


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(f"the key {key[:200]!r} appears twice in one object")
            seen.add(key)
    return out


def parse_json(text: str | bytes, *, path: str | os.PathLike | None = None, what: str = "JSON",
               error: type[ConsolidateError] | None = None, unique_keys: bool = False) -> Any:
    """Parse JSON strictly: no NaN/Infinity, no number that overflows a float, no nesting bomb.

    Args:
        text: The JSON, as text or UTF-8 bytes.
        path: The file it came from, for errors.
        what: How to name it in errors.
        error: The error class to raise (default :class:`CorruptCheckpointError`).
        unique_keys: Refuse an object that names a key twice. Readers that check one file against
            another (a safetensors header, an index) need this: with a duplicate, which entry counts
            depends on the parser, so two tools could read two different models from one file.

    Raises:
        ConsolidateError: (``error``, default corrupt checkpoint) naming ``what`` and ``path``.
    """
    cls = _error_cls(error)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise cls(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})", path=path) from exc
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float,
                          object_pairs_hook=_unique_object if unique_keys else None)
    except RecursionError:
        raise cls(f"{what} is nested too deeply to be real", path=path) from None
    except DuplicateKeyError as exc:
        raise cls(f"{what} is ambiguous: {exc}", path=path) from None
    except (ValueError, OverflowError) as exc:  # JSONDecodeError is a ValueError
        raise cls(f"{what} is not valid JSON ({exc})", path=path) from exc


def read_json(path: str | os.PathLike, limit: int = MAX_CONFIG_BYTES, *, what: str | None = None,
              expect: type | None = dict, error: type[ConsolidateError] | None = None,
              unique_keys: bool = False) -> Any:
    """Read and parse a small JSON file, bounded and strict (see :func:`parse_json`).

    Args:
        path: The file.
        limit: Largest size accepted, in bytes.
        what: How to name the file in errors (default: its name).
        expect: The type the top-level value must have (``dict`` by default; None for any).
        error: The error class to raise (default :class:`CorruptCheckpointError`).
        unique_keys: Refuse an object that names a key twice (see :func:`parse_json`).
    """
    what = what or Path(path).name
    value = parse_json(read_bounded(path, limit, what=what, error=error), path=path, what=what, error=error,
                       unique_keys=unique_keys)
    if expect is not None and not isinstance(value, expect):
        raise _error_cls(error)(f"{what} holds a JSON {type(value).__name__}, not an object", path=path)
    return value


def confined(path: str | os.PathLike, roots: list[Path] | tuple[Path, ...]) -> bool:
    """Whether ``path``, with every symlink resolved, lies inside one of ``roots`` (also resolved)."""
    try:
        real = Path(path).resolve(strict=False)
    except (OSError, RuntimeError):  # a symlink loop
        return False
    for root in roots:
        try:
            real.relative_to(Path(root).resolve(strict=False))
            return True
        except (ValueError, OSError, RuntimeError):
            continue
    return False


def trust_root(folder: str | os.PathLike) -> Path:
    """The tree a model folder's files may link into.

    For a snapshot in the Hugging Face cache (``models--*/snapshots/<rev>/``) every file is a symlink
    into the repo's ``blobs/``, so the tree is the ``models--*`` folder; for any other folder, itself.
    """
    folder = Path(folder).absolute()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith(("models--", "datasets--")):
        return folder.parent.parent
    return folder


def contains(parent: str | os.PathLike, child: str | os.PathLike) -> bool:
    """Whether ``child`` is ``parent`` or inside it, both with symlinks resolved."""
    return confined(child, [Path(parent)])


__all__ = [
    "MAX_CONFIG_BYTES", "MAX_INDEX_BYTES", "MAX_LIST_BYTES", "MAX_TAG_BYTES", "MAX_TEMPLATE_BYTES",
    "MAX_TOKENIZER_BYTES", "MAX_TOKENIZER_SET_BYTES", "confined", "contains",
    "DuplicateKeyError", "is_regular_file", "open_file", "open_regular", "open_source", "parse_json", "read_bounded",
    "read_json", "read_text", "trust_root",
]
