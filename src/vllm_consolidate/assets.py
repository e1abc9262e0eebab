"""Find and copy the non-weight files an inference folder needs: config, tokenizer, generation config.

Search order: the folders the reader names (the checkpoint folder and its parents, nearest first),
then ``--base-model-name``, a local folder or a Hub id resolved through the local Hugging Face cache
(``HF_HOME`` / ``HF_HUB_CACHE`` are honoured by huggingface_hub; with ``HF_HUB_OFFLINE=1`` nothing is
downloaded). The tokenizer files are taken as a set from the first folder that has any, so files of
two tokenizers are never mixed. Training state (optimizer, RNG, trainer state, ``training_args.bin``,
``zero_to_*.py``) is never copied because only the names below are.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
_HUB_PATTERNS = [CONFIG_FILE, GENERATION_CONFIG_FILE, *TOKENIZER_FILES]


@dataclass
class Assets:
    """Where each asset was found (None when nowhere)."""

    config: Path | None = None
    generation_config: Path | None = None
    tokenizer_dir: Path | None = None
    tokenizer_files: list[Path] = field(default_factory=list)
    base_model_dir: Path | None = None
    base_model_error: str | None = None

    def origin(self) -> dict[str, str | None]:
        return {
            "config": str(self.config) if self.config else None,
            "generation_config": str(self.generation_config) if self.generation_config else None,
            "tokenizer": str(self.tokenizer_dir) if self.tokenizer_dir else None,
        }


def search_chain(weights_dir: Path, input_dir: Path, levels: int = 2) -> list[Path]:
    """The weights folder and up to ``levels`` parents, nearest first, stopping at the input folder.

    A ``global_stepN`` folder given directly still looks in its ``checkpoint-N`` and run folders,
    which is where HF Trainer leaves the config and tokenizer.
    """
    weights_dir, input_dir = weights_dir.resolve(), input_dir.resolve()
    out = [weights_dir]
    folder = weights_dir
    for _ in range(levels):
        if folder == input_dir and input_dir != weights_dir:
            break
        folder = folder.parent
        out.append(folder)
    return out


def resolve_base_model(name: str | None) -> tuple[Path | None, str | None]:
    """A local folder for ``--base-model-name``: the folder itself, or a snapshot in the HF cache.

    Returns:
        ``(folder, None)`` when found, ``(None, reason)`` otherwise.
    """
    if not name:
        return None, None
    local = Path(name).expanduser()
    if local.is_dir():
        return local, None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a hard dependency, kept defensive
        return None, "huggingface_hub is not installed"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS, local_files_only=True)), None
    except Exception as exc:  # not in the cache, or not a valid repo id
        if offline:
            return None, f"'{name}' is not in the local HF cache and HF_HUB_OFFLINE is set ({type(exc).__name__})"
    try:
        return Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS)), None
    except Exception as exc:
        return None, f"'{name}' is neither a local folder nor reachable on the Hub ({type(exc).__name__})"


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file() or (
        folder / "tokenizer.model"
    ).is_file()


def find_assets(search_dirs: list[Path], base_model_name: str | None) -> Assets:
    """Locate config, generation config and tokenizer files.

    The base model is consulted only for what the checkpoint's own folders lack.
    """
    assets = Assets()

    def scan(folders: list[Path]) -> None:
        for folder in folders:
            if assets.config is None and (folder / CONFIG_FILE).is_file():
                assets.config = folder / CONFIG_FILE
            if assets.generation_config is None and (folder / GENERATION_CONFIG_FILE).is_file():
                assets.generation_config = folder / GENERATION_CONFIG_FILE
            if assets.tokenizer_dir is None and _has_tokenizer(folder):
                assets.tokenizer_dir = folder
                assets.tokenizer_files = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]

    scan(search_dirs)
    # A missing generation config alone does not justify a Hub lookup: transformers and vLLM have defaults.
    if assets.config is None or assets.tokenizer_dir is None:
        base, error = resolve_base_model(base_model_name)
        assets.base_model_dir, assets.base_model_error = base, error
        if base is not None:
            scan([base])
    return assets


def read_config(path: Path) -> dict:
    """Parse a config.json."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def copy_assets(assets: Assets, folder: Path, config: dict) -> list[str]:
    """Write ``config`` and copy the generation config and tokenizer files into ``folder``."""
    written = [CONFIG_FILE]
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if assets.generation_config is not None:
        shutil.copyfile(assets.generation_config, folder / GENERATION_CONFIG_FILE)
        written.append(GENERATION_CONFIG_FILE)
    for src in assets.tokenizer_files:
        shutil.copyfile(src, folder / src.name)
        written.append(src.name)
    return written
