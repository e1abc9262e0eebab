"""Checks on a ``torch.save`` zip archive, made before its pickle is read (see :mod:`.torch_zip`).

A hostile zip can make two readers see different files (duplicate names, a central directory entry
pointing into another member's data, a local header naming another member), point a tensor past the
end of the file, or make ``zipfile`` itself build millions of entries from a huge central directory.
:func:`read_archive` refuses all of these, finds the one ``data.pkl`` and reads it with a size cap
checked on the declared size before anything is read or inflated.
"""

from __future__ import annotations

import struct
import zipfile
from typing import Any

from vllm_consolidate.errors import CorruptCheckpointError, LimitExceededError, UnsupportedCheckpointError

#: Largest ``data.pkl`` accepted. Real ones are tiny: 11 KB at most in the DeepSpeed corpus, 12 MB
#: for a state dict of 100,000 tensors (more than any model has); 64 MiB bounds memory and the pre-pass.
MAX_PICKLE_BYTES = 64 * 2**20
#: Largest zip central directory (6 MB for 100,000 members); bounds what ``zipfile`` builds from it.
MAX_DIRECTORY_BYTES = 32 * 2**20


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _directory_size(fh: Any) -> int | None:
    """The central directory's declared size, read before ``zipfile`` parses it (None if unreadable)."""
    # zipfile reads and parses the whole directory up front; its private EOCD reader is the only way to
    # look first. It has existed unchanged since Python 2.6; without it the check is skipped.
    end_record = getattr(zipfile, "_EndRecData", None)
    if end_record is None:
        return None
    record = end_record(fh)
    return None if record is None else record[zipfile._ECD_SIZE]


def _member_span(fh: Any, info: zipfile.ZipInfo) -> tuple[int, int]:
    """(local header offset, end of data) of a member, checking its local header like ``ZipFile.open``."""
    fh.seek(info.header_offset)
    header = fh.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {_clip(info.filename)}")
    flags = struct.unpack("<H", header[6:8])[0]
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    raw = fh.read(name_len)
    if raw.decode("utf-8" if flags & 0x800 else "cp437") != info.orig_filename:
        raise zipfile.BadZipFile(f"member {_clip(info.filename)} has another name in its local header")
    data_start = info.header_offset + 30 + name_len + extra_len
    return data_start, data_start + info.compress_size


def _check_members(fh: Any, zf: zipfile.ZipFile, size: int, path: str) -> dict[str, tuple[int, int]]:
    """Check every member's bounds and overlaps; return ``{name: (data offset, data length)}``."""
    infos = zf.infolist()
    seen: set[str] = set()
    for info in infos:  # zipfile keeps the last of two same-named members; torch's reader, the first
        if info.filename in seen:
            raise CorruptCheckpointError(f"the archive holds two members named {_clip(info.filename)}", path=path)
        seen.add(info.filename)
    end_of_data = min(size, getattr(zf, "start_dir", size))  # member data lies before the central directory
    spans, out = [], {}
    for info in infos:
        data_start, data_end = _member_span(fh, info)
        if data_end > end_of_data:
            raise CorruptCheckpointError(f"member {_clip(info.filename)} runs past the end of the file", path=path)
        spans.append((info.header_offset, data_end, info.filename))
        out[info.filename] = (data_start, info.compress_size)
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise CorruptCheckpointError(f"members {_clip(name)} and {_clip(other)} overlap", path=path)
    return out


def _read_small(zf: zipfile.ZipFile, name: str) -> bytes:
    with zf.open(name) as member:  # never zf.read: a compressed member may inflate to gigabytes
        return member.read(16)


def read_archive(fh: Any, size: int, path: str) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The ``data.pkl`` bytes and ``{storage key: (offset, nbytes)}`` of a checked torch zip."""
    directory = _directory_size(fh)
    if directory is not None and directory > MAX_DIRECTORY_BYTES:
        raise LimitExceededError(f"refused to load: the zip directory is {directory:,} bytes, more than the "
                                 f"{MAX_DIRECTORY_BYTES:,} a torch file can plausibly have", path=path)
    fh.seek(0)
    with zipfile.ZipFile(fh) as zf:
        spans = _check_members(fh, zf, size, path)
        pickles = [i for i in zf.infolist() if i.filename.count("/") == 1 and i.filename.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CorruptCheckpointError(f"{'no' if not pickles else 'more than one'} data.pkl inside the archive",
                                         path=path)
        info, prefix = pickles[0], pickles[0].filename[: -len("data.pkl")]
        storages: dict[str, tuple[int, int]] = {}
        for member in zf.infolist():
            name = member.filename
            if name.startswith(prefix + "data/") and name.count("/") == 2:
                if member.compress_type != zipfile.ZIP_STORED or member.compress_size != member.file_size:
                    raise UnsupportedCheckpointError("compressed tensor data", path=path)
                storages[name[len(prefix) + 5:]] = spans[name]
        if prefix + "byteorder" in spans and _read_small(zf, prefix + "byteorder") not in (b"little", b""):
            raise UnsupportedCheckpointError("big-endian tensor data", path=path,
                                             hint="Re-save the checkpoint on a little-endian machine.")
        if info.file_size > MAX_PICKLE_BYTES:  # the declared size: checked before reading or inflating
            raise LimitExceededError(f"refused to load: data.pkl is {info.file_size:,} bytes, more than the "
                                     f"{MAX_PICKLE_BYTES:,} a checkpoint's pickle can plausibly be", path=path)
        with zf.open(info) as member_file:
            data = member_file.read(MAX_PICKLE_BYTES + 1)
        if len(data) > MAX_PICKLE_BYTES:
            raise CorruptCheckpointError("refused to load: data.pkl inflates past its declared size", path=path)
    return data, storages


__all__ = ["MAX_DIRECTORY_BYTES", "MAX_PICKLE_BYTES", "read_archive"]
