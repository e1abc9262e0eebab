"""Find and copy the non-weight files an inference folder needs: config, tokenizer, generation config.

Search order: the folders the reader names (the checkpoint folder and its parents, nearest first),
then ``--base-model-name``, a local folder or a Hub id resolved through the local Hugging Face cache
(``HF_HOME`` / ``HF_HUB_CACHE`` are honoured by huggingface_hub; with ``HF_HUB_OFFLINE=1`` nothing is
downloaded). The tokenizer files are taken as a set from the first folder that has any, so files of
two tokenizers are never mixed. Training state (optimizer, RNG, trainer state, ``training_args.bin``,
``zero_to_*.py``) is never copied because only the names below are.

Every asset is checked before it is used: it must be a regular file and, with symlinks resolved,
lie inside the tree it was found in (the checkpoint's search folders, or the base model's folder;
for a model in the HF cache, its ``models--*`` folder, whose snapshots link into ``blobs/``). One
that points elsewhere is skipped with a warning naming it, exactly as if it were absent, so a
``tokenizer.json`` linked to ``~/.ssh/id_rsa`` never reaches the output. ``config.json`` is read
with a size cap and strict JSON; a broken one is an error naming it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vllm_consolidate.errors import ConfigInvalidError, CorruptCheckpointError
from vllm_consolidate.safe_io import MAX_CONFIG_BYTES, confined, is_regular_file, open_regular, read_json, trust_root

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tekken.json",
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
    skipped: list[str] = field(default_factory=list)

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


class _Finder:
    """Looks for each asset in folders, nearest first, accepting only confined regular files."""

    def __init__(self, assets: Assets):
        self.assets = assets

    def usable(self, path: Path, roots: list[Path]) -> bool:
        if not os.path.lexists(path):
            return False
        if not confined(path, roots):
            self.assets.skipped.append(
                f"skipped {path}: it resolves to {_real(path)}, outside {', '.join(str(r) for r in roots)}")
            return False
        if not is_regular_file(path):
            self.assets.skipped.append(f"skipped {path}: not a regular file")
            return False
        return True

    def scan(self, folders: list[Path], roots: list[Path]) -> None:
        a = self.assets
        for folder in folders:
            if a.config is None and self.usable(folder / CONFIG_FILE, roots):
                a.config = folder / CONFIG_FILE
            if a.generation_config is None and self.usable(folder / GENERATION_CONFIG_FILE, roots):
                a.generation_config = folder / GENERATION_CONFIG_FILE
            if a.tokenizer_dir is None and any(os.path.lexists(folder / n) for n in _TOKENIZER_MARKERS):
                files = [folder / n for n in TOKENIZER_FILES if self.usable(folder / n, roots)]
                if any(f.name in _TOKENIZER_MARKERS for f in files):
                    a.tokenizer_dir, a.tokenizer_files = folder, files


def _real(path: Path) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):
        return "a symlink loop"


# A folder holds a tokenizer when it has one of these; the rest of TOKENIZER_FILES come along with it.
_TOKENIZER_MARKERS = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "spiece.model",
                      "sentencepiece.bpe.model", "tekken.json")


def find_assets(search_dirs: list[Path], base_model_name: str | None, roots: list[Path] | None = None) -> Assets:
    """Locate config, generation config and tokenizer files.

    The base model is consulted only for what the checkpoint's own folders lack.

    Args:
        search_dirs: Folders to search, nearest first.
        base_model_name: ``--base-model-name``: a local folder or a Hub id.
        roots: The trees assets found in ``search_dirs`` must resolve into (default: the last, highest
            search folder).
    """
    assets = Assets()
    finder = _Finder(assets)
    finder.scan(search_dirs, roots or search_dirs[-1:])
    # A missing generation config alone does not justify a Hub lookup: transformers and vLLM have defaults.
    if assets.config is None or assets.tokenizer_dir is None:
        base, error = resolve_base_model(base_model_name)
        assets.base_model_dir, assets.base_model_error = base, error
        if base is not None:
            finder.scan([base], [trust_root(base)])
    return assets


def read_config(path: Path) -> dict:
    """Parse a config.json: a bounded, strict read of a JSON object.

    Raises:
        ConfigInvalidError: Not a regular file, too large, not UTF-8, not JSON, or not an object.
    """
    return read_json(path, MAX_CONFIG_BYTES, error=ConfigInvalidError)


def asset_bytes(assets: Assets) -> int:
    """Bytes the copied assets take (for the disk preflight)."""
    files = [p for p in [assets.generation_config, *assets.tokenizer_files] if p is not None]
    return sum(os.stat(p).st_size for p in files) + MAX_CONFIG_BYTES // 16


def copy_regular(src: Path, dst: Path) -> None:
    """Copy one asset; a read failure names the source (exit 4), a write failure raises the plain OSError."""
    fd = open_regular(src)
    try:
        with open(dst, "xb") as out:
            while True:
                try:
                    chunk = os.read(fd, 1 << 20)
                except OSError as exc:
                    raise CorruptCheckpointError(f"cannot read {src.name}: {exc.strerror or exc}", path=src) from exc
                if not chunk:
                    break
                out.write(chunk)
    finally:
        os.close(fd)


def copy_assets(assets: Assets, folder: Path, config: dict) -> list[str]:
    """Write ``config`` and copy the generation config and tokenizer files into ``folder``."""
    written = [CONFIG_FILE]
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if assets.generation_config is not None:
        copy_regular(assets.generation_config, folder / GENERATION_CONFIG_FILE)
        written.append(GENERATION_CONFIG_FILE)
    for src in assets.tokenizer_files:
        copy_regular(src, folder / src.name)
        written.append(src.name)
    return written
