"""Asset copying: the found config, generation config, tokenizer files and chat templates into the output.

Finding and confining assets is reading (:mod:`vllm_consolidate.read.assets`); creating files in the
staging folder is writing, so it lives here, next to the tensor writers.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vllm_consolidate.errors import CorruptCheckpointError
from vllm_consolidate.read.assets import CONFIG_FILE, GENERATION_CONFIG_FILE, Assets, asset_limit
from vllm_consolidate.safe_io import MAX_CONFIG_BYTES, open_source, read_json
from vllm_consolidate.storage.staging import StagedOutput

#: Where assets go: a local (temporary) output folder, or the staging prefix of an object-store output.
Dest = Path | StagedOutput


@contextlib.contextmanager
def _created(folder: Dest, rel: str) -> Iterator[Any]:
    """A new file ``rel`` in ``folder`` to write into: a local file (``xb``) or an upload (completed at the end)."""
    if isinstance(folder, StagedOutput):
        with folder.sink(rel, None) as sink:
            yield sink
    else:
        (folder / rel).parent.mkdir(exist_ok=True)
        with open(folder / rel, "xb") as out:
            yield out


def _write_text(folder: Dest, rel: str, text: str) -> None:
    if isinstance(folder, StagedOutput):
        folder.put(rel, text.encode())
    else:
        (folder / rel).write_text(text)


def copy_regular(src: Path, dst: Path, *, into: StagedOutput | None = None) -> None:
    """Copy one asset, at most its :func:`asset_limit` bytes (it may have grown since it was found).

    A read failure or a file grown past its cap names the source (exit 4); a write failure raises the
    plain OSError. With ``into``, ``dst`` is a relative key under that staging prefix.
    """
    limit = asset_limit(src.name) or MAX_CONFIG_BYTES
    source = open_source(src)  # a local regular file, or the object behind a stand-in
    try:
        with _created(dst.parent if into is None else into, dst.name if into is None else dst.as_posix()) as out:
            copied = 0
            while True:
                try:
                    chunk = source.pread(1 << 20, copied)
                except OSError as exc:
                    raise CorruptCheckpointError(f"cannot read {src.name}: {exc.strerror or exc}", path=src) from exc
                if not chunk:
                    break
                copied += len(chunk)
                if copied > limit:
                    raise CorruptCheckpointError(f"{src.name} is more than {limit:,} bytes; refusing to copy it",
                                                 path=src)
                out.write(chunk)
    finally:
        source.close()


def copy_assets(assets: Assets, folder: Dest, config: dict) -> list[str]:
    """Write ``config`` and copy the generation config and tokenizer files into ``folder``."""
    written = [CONFIG_FILE]
    _write_text(folder, CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    if assets.generation_config is not None:
        _copy(assets.generation_config, folder, GENERATION_CONFIG_FILE)
        written.append(GENERATION_CONFIG_FILE)
    return written + _copy_tokenizer(assets, folder)


def copy_adapter_assets(assets: Assets, adapter_config: Path, folder: Dest) -> list[str]:
    """A peft adapter folder's files besides its weights: ``adapter_config.json`` (re-written from the
    checked original, ``inference_mode`` on) and the tokenizer files."""
    config = read_json(adapter_config, MAX_CONFIG_BYTES, what="adapter_config.json")
    config["inference_mode"] = True
    _write_text(folder, "adapter_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    return ["adapter_config.json"] + _copy_tokenizer(assets, folder)


def _copy(src: Path, folder: Dest, rel: str) -> None:
    if isinstance(folder, StagedOutput):
        copy_regular(src, Path(rel), into=folder)
    else:
        copy_regular(src, folder / rel)


def _copy_tokenizer(assets: Assets, folder: Dest) -> list[str]:
    written = []
    for src in assets.tokenizer_files:
        # Relative to the tokenizer's folder, so additional_chat_templates/NAME.jinja keeps its folder.
        rel = src.relative_to(assets.tokenizer_dir) if assets.tokenizer_dir else Path(src.name)
        _copy(src, folder, rel.as_posix())
        written.append(rel.as_posix())
    return written
