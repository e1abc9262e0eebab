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

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from vllm_consolidate import __version__
from vllm_consolidate.convert import ConvertOptions
from vllm_consolidate.plan.shards import dtype_name
from vllm_consolidate.units import MIB, few
from vllm_consolidate.write.publish import MARKER_FORMAT, MARKER_NAME

MANIFEST_NAME = MARKER_NAME  # the batch's manifest extends the marker every output holds
MANIFEST_FORMAT = MARKER_FORMAT
MANIFEST_VERSION = 1
#: What a job's result contributes to its manifest.
_RESULT_KEYS = ("status", "tensors", "parameters", "output_dtype", "bytes_written", "seconds")


def content_options(model: ConvertOptions) -> dict[str, Any]:
    """The options that change an output's bytes; recorded in and compared with the manifest.

    The dtype is recorded by its canonical name, so ``bf16`` and ``bfloat16`` make the same output.
    """
    options = {
        "input_type": model.input_type,
        "base_model_name": model.base_model_name,
        "dtype": None if model.keep_original_precision else dtype_name(model.dtype),
        "keep_original_precision": model.keep_original_precision,
        "format": model.fmt,
        "max_shard_size": model.max_shard_size,
    }
    if model.architecture:  # recorded only when given, so manifests written before the flag stay current
        options["architecture"] = model.architecture
    return options


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def source_fingerprint(weights_dir: Path, extra_files: list[Path]) -> dict[str, list[int]]:
    """``{absolute path: [size, mtime_ns]}`` of every file in the weights folder and of ``extra_files``."""
    out: dict[str, list[int]] = {}
    for p in sorted(Path(weights_dir).iterdir()):
        if p.is_file():
            out[str(p.absolute())] = _stat(p)
    for p in extra_files:
        if p.is_file():
            out[str(Path(p).absolute())] = _stat(Path(p))
    return out


def sha256_file(path: Path, bufsize: int = 8 * MIB) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def manifest_base(*, input: Path, checkpoint: Path, checkpoint_name: str, step: int | None,
                  detected: dict[str, Any], sources: dict[str, list[int]], options: dict[str, Any]) -> dict[str, Any]:
    """What the plan knows for a job's manifest; :func:`write_manifest` adds the files and the result."""
    return {
        "source": {"input": str(input), "checkpoint": str(checkpoint.absolute()), "checkpoint_name": checkpoint_name,
                   "step": step, **detected},
        "source_files": sources,
        "options": options,
    }


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


def output_state(output: Path, checkpoint: Path, sources: dict[str, list[int]], options: dict[str, Any],
                 verify_checksums: bool = False) -> tuple[str, str]:
    """Classify an existing output folder for a job.

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
    if (m.get("source") or {}).get("checkpoint") != str(checkpoint.absolute()):
        return "foreign", f"made from another checkpoint ({(m.get('source') or {}).get('checkpoint')})"
    if m.get("options") != options:
        return "stale", "options changed"
    if m.get("source_files") != sources:
        old, new = m.get("source_files") or {}, sources
        changed = sorted(set(old) ^ set(new) | {k for k in set(old) & set(new) if old[k] != new[k]})
        return "stale", f"source changed ({few([Path(c).name for c in changed], sort=False)})"
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


__all__ = ["MANIFEST_FORMAT", "MANIFEST_NAME", "MANIFEST_VERSION", "content_options", "manifest_base",
           "output_state", "read_manifest", "sha256_file", "source_fingerprint", "write_manifest"]
