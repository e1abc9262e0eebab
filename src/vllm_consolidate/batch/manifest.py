"""The manifest every batch output holds, and what it says about an existing output (resume).

Every finished output holds ``.vllm-consolidate.json`` (:data:`MANIFEST_NAME`), written into the
staged folder before the atomic rename, so an output either has a complete manifest or does not
exist. It records the source (input, checkpoint, weights folder), the size and mtime of every file
in the weights folder and of the config/tokenizer files used, the content-affecting options, the tool
version, and the size and sha256 of every output file. On a rerun a job is *skipped (up to date)*
when its output's manifest names the same checkpoint, the same source sizes/mtimes and options, and
every listed file is present with its recorded size (``verify_checksums`` also rehashes them; the
tool version is recorded but does not invalidate). A stale output (sources or options changed,
files missing or resized) that the manifest shows is ours, from the same checkpoint, is redone and
replaced once the new one is complete. An existing output without our manifest, or made from another
checkpoint, is replaced only with ``force``; otherwise the job is blocked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from vllm_consolidate import __version__
from vllm_consolidate.convert import ConvertOptions
from vllm_consolidate.plan.shards import dtype_name
from vllm_consolidate.storage import remote
from vllm_consolidate.units import MIB, few
from vllm_consolidate.write.publish import MARKER_FORMAT, MARKER_NAME

MANIFEST_NAME = MARKER_NAME  # the batch's manifest extends the marker every output holds
MANIFEST_FORMAT = MARKER_FORMAT
MANIFEST_VERSION = 1
#: What a job's result contributes to its manifest.
_RESULT_KEYS = ("status", "tensors", "parameters", "output_dtype", "bytes_written", "seconds")


#: Every field of :class:`~vllm_consolidate.convert.ConvertOptions`, classified once: the ones that change
#: an output's bytes, by the key the manifest records them under (compared on a rerun), and the others,
#: with why not. A new field must be added to one of the two (a unit test and :func:`content_options` check it).
OUTPUT_OPTIONS: dict[str, str] = {
    "input_type": "input_type", "base_model_name": "base_model_name", "dtype": "dtype",
    "keep_original_precision": "keep_original_precision", "fmt": "format", "max_shard_size": "max_shard_size",
    "architecture": "architecture", "model_key": "model_key", "lora": "lora",
    "moe_layout": "moe_layout",
    "quantize": "quantize", "quantize_ignore": "quantize_ignore",
}
NON_OUTPUT_OPTIONS: dict[str, str] = {
    "input": "the job's own; the manifest's source records it",
    "output": "the job's own; where the output goes, not what it holds",
    "checkpoint_dir": "the job's own; the manifest's source records it as the checkpoint",
    "force": "whether an existing output may be replaced, not what the new one holds",
    "validate": "validation checks the output; it writes nothing into it",
    "storage_options": "how to reach an object store (and may hold credentials: never recorded)",
}
#: Recorded only when not their default, so that manifests written before these options existed stay current.
_RECORDED_WHEN_SET = ("architecture", "model_key", "lora", "moe_layout", "quantize", "quantize_ignore")


def content_options(model: ConvertOptions) -> dict[str, Any]:
    """The options that change an output's bytes (:data:`OUTPUT_OPTIONS`); recorded in and compared with the manifest.

    The dtype is recorded by its canonical name, so ``bf16`` and ``bfloat16`` make the same output.

    Raises:
        TypeError: ``ConvertOptions`` has a field classified in neither table (a developer's omission).
    """
    options: dict[str, Any] = {}
    for f in dataclasses.fields(model):
        if f.name in NON_OUTPUT_OPTIONS:
            continue
        if f.name not in OUTPUT_OPTIONS:
            raise TypeError(f"ConvertOptions.{f.name} is not classified in batch.manifest.OUTPUT_OPTIONS or "
                            "NON_OUTPUT_OPTIONS")
        value = getattr(model, f.name)
        if f.name in _RECORDED_WHEN_SET and value == f.default:
            continue
        if f.name == "dtype":
            value = None if model.keep_original_precision else dtype_name(value)
        if isinstance(value, tuple):  # as JSON records it, so that a rerun compares equal
            value = list(value)
        options[OUTPUT_OPTIONS[f.name]] = value
    return options


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _fingerprint(path: Path) -> tuple[str, list]:
    """A source file's key and fingerprint: ``(absolute path, [size, mtime_ns])``, or for a stand-in of an
    object-store input ``(its URL, [size, ETag])`` (a stand-in's mtime is when the mirror was made)."""
    obj = remote.lookup(path)
    if obj is not None:
        return obj.url, [obj.size, obj.etag or ""]
    return str(path.absolute()), _stat(path)


def source_fingerprint(weights_dir: Path, extra_files: list[Path]) -> dict[str, list]:
    """``{absolute path: [size, mtime_ns]}`` of every file in the weights folder and of ``extra_files``
    (``{URL: [size, ETag]}`` for an object-store input)."""
    files = [p for p in sorted(Path(weights_dir).iterdir()) if p.is_file()]
    return dict(_fingerprint(Path(p)) for p in [*files, *extra_files] if Path(p).is_file())


def sha256_file(path: Path, bufsize: int = 8 * MIB) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def manifest_base(*, input: Path, checkpoint: Path, checkpoint_name: str, step: int | None,
                  detected: dict[str, Any], sources: dict[str, list[int]], options: dict[str, Any]) -> dict[str, Any]:
    """What the plan knows for a job's manifest; :func:`write_manifest` adds the files and the result.

    Paths in an object-store input's mirror are recorded as their URLs.
    """
    return remote.public_value({
        "source": {"input": str(input), "checkpoint": str(checkpoint.absolute()), "checkpoint_name": checkpoint_name,
                   "step": step, **detected},
        "source_files": sources,
        "options": options,
    })


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of an output folder, or None when absent or not ours."""
    try:
        data = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return None
    return data


def write_manifest(folder: Path, base: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in ``folder`` and write the manifest there (atomically); return it."""
    files = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            files[str(p.relative_to(folder))] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {
        "format": MANIFEST_FORMAT,
        "manifest_version": MANIFEST_VERSION,
        "tool": "vllm-consolidate",
        "tool_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **base,
        "files": files,
        "result": {k: result.get(k) for k in _RESULT_KEYS},
    }
    tmp = Path(folder) / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, Path(folder) / MANIFEST_NAME)
    return manifest


def output_state(output: Path, checkpoint: Path | str, sources: dict[str, list[int]], options: dict[str, Any],
                 verify_checksums: bool = False) -> tuple[str, str]:
    """Classify an existing output folder for a job.

    ``checkpoint`` is compared with the manifest's as a string: a path is made absolute, a URL (or a
    path already made public) is taken as it is.

    Returns:
        ``(state, reason)`` with state ``"missing"``, ``"current"``, ``"stale"`` (ours, same checkpoint,
        out of date) or ``"foreign"`` (no manifest of ours, or made from another checkpoint).
    """
    if not output.exists():
        return "missing", ""
    m = read_manifest(output)
    if m is None:
        return "foreign", "exists without a vllm-consolidate manifest"
    if m.get("manifest_version") != MANIFEST_VERSION:
        return "stale", f"manifest version {m.get('manifest_version')}"
    if (m.get("source") or {}).get("checkpoint") != (checkpoint if isinstance(checkpoint, str)
                                                     else str(checkpoint.absolute())):
        return "foreign", f"made from another checkpoint ({(m.get('source') or {}).get('checkpoint')})"
    if m.get("options") != options:
        return "stale", "options changed"
    if m.get("source_files") != sources:
        old, new = m.get("source_files") or {}, sources
        changed = sorted(set(old) ^ set(new) | {k for k in set(old) & set(new) if old[k] != new[k]})
        return "stale", f"source changed ({few([c.rpartition('/')[2] for c in changed], sort=False)})"
    return _files_state(output, m.get("files") or {}, verify_checksums)


def _files_state(output: Path, files: dict[str, Any], verify_checksums: bool) -> tuple[str, str]:
    """``current`` when every file the manifest lists is there with its size (and hash, if asked)."""
    for rel, info in files.items():
        p = output / rel
        if not p.is_file() or p.stat().st_size != info.get("size"):
            return "stale", f"{rel} missing or resized"
        if verify_checksums and sha256_file(p) != info.get("sha256"):
            return "stale", f"{rel} checksum differs"
    if not files:
        return "stale", "manifest lists no files"
    return "current", ""


__all__ = ["MANIFEST_FORMAT", "MANIFEST_NAME", "MANIFEST_VERSION", "NON_OUTPUT_OPTIONS", "OUTPUT_OPTIONS",
           "content_options", "manifest_base", "output_state", "read_manifest", "sha256_file", "source_fingerprint",
           "write_manifest"]
