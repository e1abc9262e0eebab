"""Find and copy the non-weight files an inference folder needs: config, tokenizer, generation config.

Search order: the folders the reader names (the checkpoint folder and its parents, nearest first),
then ``--base-model-name``, a local folder or a Hub id resolved through the local Hugging Face cache
(``HF_HOME`` / ``HF_HUB_CACHE`` are honoured by huggingface_hub; with ``HF_HUB_OFFLINE=1`` nothing is
downloaded). The tokenizer files are taken as a set from the first folder that has a tokenizer, so
files of two tokenizers are never mixed. Training state (optimizer, RNG, trainer state,
``training_args.bin``, ``zero_to_*.py``) is never copied because only the names below are.

Tokenizer families, all copied as one set with whatever else of the set lies beside them:
``tokenizer.json`` (any model the ``tokenizers`` library trains); SentencePiece ``tokenizer.model``
(Llama, Mistral), ``spiece.model`` (T5), ``sentencepiece.bpe.model`` (XLM-R); byte-level BPE
``vocab.json`` + ``merges.txt`` (GPT-2, Qwen2; the pair counts as a tokenizer on its own, since
the model type's tokenizer class reads it); WordPiece ``vocab.txt``; tiktoken files, which
transformers reads as ``tiktoken.model`` or ``tokenizer.model``, and remote-code tokenizers as
``*.tiktoken`` (e.g. ``qwen.tiktoken``); Mistral's ``tekken.json`` and versioned ``tokenizer.model.v3``/``.v7``...
(mistral-common); and around them ``tokenizer_config.json`` (which may hold the chat template),
``special_tokens_map.json``, ``added_tokens.json``, ``chat_template.jinja`` / ``chat_template.json``
and transformers' named templates ``additional_chat_templates/*.jinja``.

The generation config comes from the checkpoint's folders, else from the base model. The base model
lends it only when it describes the same model (same ``model_type`` and ``vocab_size`` as the config
in use, or it is where that config came from): the default base model, if cached, must not give a
different model its end-of-sequence ids and sampling defaults. A missing generation config alone
never triggers a download.

Every asset is checked before it is used: it must be a regular file and, with symlinks resolved,
lie inside the tree it was found in (the checkpoint's search folders, or the base model's folder;
for a model in the HF cache, its ``models--*`` folder, whose snapshots link into ``blobs/``). One
that points elsewhere is skipped with a warning naming it, exactly as if it were absent, so a
``tokenizer.json`` linked to ``~/.ssh/id_rsa`` never reaches the output. ``config.json`` is read
with a size cap and strict JSON; a broken one is an error naming it.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vllm_consolidate.errors import ConfigInvalidError, ConfigNotFoundError, ConsolidateError, CorruptCheckpointError
from vllm_consolidate.safe_io import MAX_CONFIG_BYTES, confined, is_regular_file, open_regular, read_json, trust_root

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
#: transformers' folder of named chat templates (``save_pretrained`` of a dict ``chat_template``).
CHAT_TEMPLATE_DIR = "additional_chat_templates"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tiktoken.model",
    "tekken.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
#: Tokenizer files known by pattern (relative to the tokenizer's folder): tiktoken vocabularies and Mistral's
#: versioned SentencePiece models (each a tokenizer by itself), and named chat templates.
_MODEL_PATTERNS = ("*.tiktoken", "tokenizer.model.v*")
TOKENIZER_PATTERNS = (*_MODEL_PATTERNS, f"{CHAT_TEMPLATE_DIR}/*.jinja")
_HUB_PATTERNS = [CONFIG_FILE, GENERATION_CONFIG_FILE, *TOKENIZER_FILES, *TOKENIZER_PATTERNS]


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


def resolve_base_model(name: str | None, *, download: bool = True) -> tuple[Path | None, str | None]:
    """A local folder for ``--base-model-name``: the folder itself, or a snapshot in the HF cache.

    Args:
        name: A local folder or a Hub id.
        download: Fetch the small files from the Hub when the id is not cached (never with
            ``HF_HUB_OFFLINE``).

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
        if offline or not download:
            why = "HF_HUB_OFFLINE is set" if offline else "not downloaded for this"
            return None, f"'{name}' is not in the local HF cache and {why} ({type(exc).__name__})"
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

    def scan(self, folders: list[Path], roots: list[Path], *, generation: bool = True) -> None:
        """Fill in what is still missing from ``folders``, nearest first (the generation config only if allowed)."""
        a = self.assets
        for folder in folders:
            if a.config is None and self.usable(folder / CONFIG_FILE, roots):
                a.config = folder / CONFIG_FILE
            if generation and a.generation_config is None and self.usable(folder / GENERATION_CONFIG_FILE, roots):
                a.generation_config = folder / GENERATION_CONFIG_FILE
            if a.tokenizer_dir is None:
                names = tokenizer_names(folder)
                if has_tokenizer(names):
                    usable = [n for n in names if self.usable(folder / n, roots)]
                    if has_tokenizer(usable):
                        a.tokenizer_dir, a.tokenizer_files = folder, [folder / n for n in usable]


def _real(path: Path) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):
        return "a symlink loop"


# A folder holds a tokenizer when it has one of these, a file of TOKENIZER_PATTERNS other than a chat
# template, or the BPE pair; the rest of its tokenizer files come along with it. vocab.txt alone is not
# enough: a run folder may hold some unrelated vocabulary file, and would then hide the real tokenizer.
_TOKENIZER_MARKERS = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "spiece.model",
                      "sentencepiece.bpe.model", "tiktoken.model", "tekken.json")
_BPE_PAIR = ("vocab.json", "merges.txt")

#: Most entries a folder may have for the pattern search (a checkpoint folder has a few dozen).
MAX_LISTED = 10_000


def _listing(folder: Path) -> list[str]:
    """The first :data:`MAX_LISTED` names in ``folder``, sorted; none if it is not a readable folder."""
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for _, e in zip(range(MAX_LISTED), it))
    except OSError:  # not a folder, or unreadable: nothing of this kind here
        return []


def tokenizer_names(folder: Path) -> list[str]:
    """The tokenizer files present in ``folder`` (symlinks included, unchecked), relative to it."""
    names = [n for n in TOKENIZER_FILES if os.path.lexists(folder / n)]
    listings: dict[str, list[str]] = {}
    for pattern in TOKENIZER_PATTERNS:
        sub, _, glob = pattern.rpartition("/")
        if sub not in listings:
            listings[sub] = _listing(folder / sub if sub else folder)
        found = (f"{sub}/{n}" if sub else n for n in listings[sub] if fnmatch.fnmatchcase(n, glob))
        names += [n for n in found if n not in names]
    return names


def has_tokenizer(names: list[str]) -> bool:
    """Whether these files (as :func:`tokenizer_names` gives them) make a tokenizer, not just its extras."""
    present = set(names)
    by_pattern = any(fnmatch.fnmatchcase(n, pattern) for n in names for pattern in _MODEL_PATTERNS)
    return bool(present & set(_TOKENIZER_MARKERS)) or by_pattern or present >= set(_BPE_PAIR)


#: The warning a conversion (and ``inspect``) gives when no tokenizer is found anywhere.
#: ``--base-model-name``'s default (the guide's model). For a LoRA run, an option still at this default
#: gives way to the adapter's own ``base_model_name_or_path``.
DEFAULT_BASE_MODEL = "Qwen/Qwen2.5-7B-Instruct"

NO_TOKENIZER_WARNING = ("no tokenizer found in the checkpoint or the base model; the output has none. "
                        "Pass --base-model-name with the model you fine-tuned to copy its tokenizer.")


def find_checkpoint_assets(weights_dir: Path, input_dir: Path, extra_dirs: list[Path],
                           base_model_name: str | None) -> Assets:
    """The assets of a checkpoint: its weights folder and parents (see :func:`search_chain`), then
    ``extra_dirs`` (a reader's own asset folders), then the base model; confined to those trees."""
    chain = search_chain(weights_dir, input_dir)
    return find_assets(chain + [d for d in extra_dirs if d not in chain], base_model_name,
                       roots=[chain[-1], Path(input_dir).absolute()])


def missing_config(assets: Assets, where: Path) -> ConfigNotFoundError:
    """The error for a checkpoint whose config.json was found nowhere (with why the base model did not help)."""
    reason = f" ({assets.base_model_error})" if assets.base_model_error else ""
    return ConfigNotFoundError(f"no config.json in the checkpoint, its parent folders, or the base model{reason}",
                               path=where)


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
    own_config = assets.config
    if assets.config is None or assets.tokenizer_dir is None:
        base, error = resolve_base_model(base_model_name)
        assets.base_model_error = error
    elif assets.generation_config is None:
        # A missing generation config alone does not justify a Hub download: transformers and vLLM have defaults.
        base, _ = resolve_base_model(base_model_name, download=False)
    else:
        base = None
    if base is not None:
        assets.base_model_dir = base
        same = own_config is None or _same_model(own_config, base / CONFIG_FILE)
        finder.scan([base], [trust_root(base)], generation=same)
    return assets


def _same_model(config: Path, other: Path) -> bool:
    """Whether two config.json files describe the same model: equal ``model_type`` and ``vocab_size``."""
    try:
        a, b = read_config(config), read_config(other)
    except ConsolidateError:  # unreadable here means "not shown to be the same"; the config is read again later
        return False
    keys = ("model_type", "vocab_size")

    def facts(c: dict) -> tuple:
        text = c.get("text_config") if isinstance(c.get("text_config"), dict) else {}
        return tuple(c.get(k, text.get(k)) for k in keys)

    return facts(a) == facts(b) and facts(a)[0] is not None


def read_config(path: Path) -> dict:
    """Parse a config.json: a bounded, strict read of a JSON object.

    Raises:
        ConfigInvalidError: Not a regular file, too large, not UTF-8, not JSON, or not an object.
    """
    return read_json(path, MAX_CONFIG_BYTES, error=ConfigInvalidError)


def asset_bytes(assets: Assets) -> int:
    """Bytes the copied assets take (for the disk preflight; the config is counted at a 1 MiB allowance)."""
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
