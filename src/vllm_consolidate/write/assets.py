"""Asset copying: the found config, generation config, tokenizer files and chat templates into the output.

Finding and confining assets is reading (:mod:`vllm_consolidate.read.assets`); creating files in the
staging folder is writing, so it lives here, next to the tensor writers.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_consolidate.errors import CorruptCheckpointError
from vllm_consolidate.read.assets import CONFIG_FILE, GENERATION_CONFIG_FILE, Assets, asset_limit
from vllm_consolidate.safe_io import MAX_CONFIG_BYTES, open_source, read_json


def copy_regular(src: Path, dst: Path) -> None:
    """Copy one asset, at most its :func:`asset_limit` bytes (it may have grown since it was found).

    A read failure or a file grown past its cap names the source (exit 4); a write failure raises the
    plain OSError.
    """
    limit = asset_limit(src.name) or MAX_CONFIG_BYTES
    source = open_source(src)  # a local regular file, or the object behind a stand-in
    try:
        with open(dst, "xb") as out:
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


def copy_assets(assets: Assets, folder: Path, config: dict) -> list[str]:
    """Write ``config`` and copy the generation config and tokenizer files into ``folder``."""
    written = [CONFIG_FILE]
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if assets.generation_config is not None:
        copy_regular(assets.generation_config, folder / GENERATION_CONFIG_FILE)
        written.append(GENERATION_CONFIG_FILE)
    return written + _copy_tokenizer(assets, folder)


def copy_adapter_assets(assets: Assets, adapter_config: Path, folder: Path) -> list[str]:
    """A peft adapter folder's files besides its weights: ``adapter_config.json`` (re-written from the
    checked original, ``inference_mode`` on) and the tokenizer files."""
    config = read_json(adapter_config, MAX_CONFIG_BYTES, what="adapter_config.json")
    config["inference_mode"] = True
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return ["adapter_config.json"] + _copy_tokenizer(assets, folder)


def _copy_tokenizer(assets: Assets, folder: Path) -> list[str]:
    written = []
    for src in assets.tokenizer_files:
        # Relative to the tokenizer's folder, so additional_chat_templates/NAME.jinja keeps its folder.
        rel = src.relative_to(assets.tokenizer_dir) if assets.tokenizer_dir else Path(src.name)
        (folder / rel).parent.mkdir(exist_ok=True)
        copy_regular(src, folder / rel)
        written.append(rel.as_posix())
    return written
