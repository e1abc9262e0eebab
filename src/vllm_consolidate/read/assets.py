"""Find and copy the non-weight files an inference folder needs: config, tokenizer, generation config.

Search order: the checkpoint folder and its parents (:func:`search_chain`), nearest first, then the
folders the reader names (a verl role's ``huggingface/``), then ``--base-model-name``, a local folder
or a Hub id resolved through the local Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE`` are honoured
by huggingface_hub; with ``HF_HUB_OFFLINE=1`` nothing is downloaded). The tokenizer files are taken
as a set from the first folder that has a tokenizer, so files of two tokenizers are never mixed.
Training state (optimizer, RNG, trainer state, ``training_args.bin``, ``zero_to_*.py``) is never
copied because only the names below are.

Tokenizer families, all copied as one set with whatever else of the set lies beside them:
``tokenizer.json`` (any model the ``tokenizers`` library trains); SentencePiece ``tokenizer.model``
(Llama, Mistral), ``spiece.model`` (T5), ``sentencepiece.bpe.model`` (XLM-R); byte-level BPE
``vocab.json`` + ``merges.txt`` (GPT-2, Qwen2; the pair counts as a tokenizer on its own, since
the model type's tokenizer class reads it); WordPiece ``vocab.txt``; tiktoken files, which
transformers reads as ``tiktoken.model`` or ``tokenizer.model``, and remote-code tokenizers as
``*.tiktoken`` (e.g. ``qwen.tiktoken``); Mistral's ``tekken.json`` and versioned ``tokenizer.model.v3``/``.v7``...
(mistral-common); and around them ``tokenizer_config.json`` (which may hold the chat template),
``special_tokens_map.json``, ``added_tokens.json``, ``chat_template.jinja`` / ``chat_template.json``
and transformers' named templates ``additional_chat_templates/*.jinja``, and a multimodal processor's
``preprocessor_config.json`` / ``processor_config.json`` / ``video_preprocessor_config.json`` (capped as a config).

The generation config comes from the checkpoint's folders, else from the base model. The base model
lends it only when it describes the same model (same ``model_type`` and ``vocab_size`` as the config
in use, or it is where that config came from): the default base model, if cached, must not give a
different model its end-of-sequence ids and sampling defaults. A missing generation config alone
never triggers a download.

Every asset is checked before it is used: a regular file that, with symlinks resolved, lies inside
the folder it was found in (in the HF cache, inside its ``models--*`` folder, whose snapshots link
into ``blobs/``), so no file outside the folders searched is ever read. One that points elsewhere, or
is larger than its kind can be (:func:`asset_limit`), is skipped with a warning naming it, as if
absent: a ``tokenizer.json`` linked to ``~/.ssh/id_rsa`` never reaches the output. ``config.json`` is
read with a size cap and strict JSON; a broken one is an error naming it.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from vllm_consolidate.errors import ConfigInvalidError, ConfigNotFoundError, ConsolidateError
from vllm_consolidate.read.hub_cache import cached_model, hub_offline
from vllm_consolidate.read.zero_locate import is_zero_checkpoint_folder
from vllm_consolidate.safe_io import (
    MAX_CONFIG_BYTES,
    MAX_TEMPLATE_BYTES,
    MAX_TOKENIZER_BYTES,
    MAX_TOKENIZER_SET_BYTES,
    confined,
    read_json,
    trust_root,
)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
#: transformers' folder of named chat templates (``save_pretrained`` of a dict ``chat_template``).
CHAT_TEMPLATE_DIR = "additional_chat_templates"
#: A multimodal processor's files (image/video preprocessing, the processor's own settings): they come along
#: with the tokenizer files of the folder that holds them (transformers' AutoProcessor reads them from there).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
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
    *PROCESSOR_FILES,
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
    skips: list[tuple[Path, str]] = field(default_factory=list)  # (file or folder, why it was not read)

    @property
    def skipped(self) -> list[str]:  # one warning per file or folder found but not read
        return [f"skipped {path}: {why}" for path, why in self.skips]

    def origin(self) -> dict[str, str | None]:
        return {
            "config": str(self.config) if self.config else None,
            "generation_config": str(self.generation_config) if self.generation_config else None,
            "tokenizer": str(self.tokenizer_dir) if self.tokenizer_dir else None,
        }


#: A checkpoint inside a training run, whose run folder may hold the config and tokenizer: HF Trainer's
#: ``checkpoint-N`` (Accelerate's ``checkpoint_N``), DeepSpeed's ``global_stepN``, verl's ``global_step_N``.
_RUN_CHECKPOINT = re.compile(r"^(?:checkpoint[-_]|global_step_?)[0-9]+$")
#: Parts of such a checkpoint that may be given directly: verl's role folders (``global_step_N/actor``)
#: and Accelerate's DCP model folder (``checkpoint-N/pytorch_model_fsdp_0``).
_CHECKPOINT_PARTS = ("actor", "critic", "pytorch_model_fsdp_0")


def in_run(folder: Path) -> bool:
    """Whether ``folder`` is a checkpoint inside a run or a part of one (see above), or a DeepSpeed tag
    folder of any name (``save_checkpoint(dir, tag="best")``: its ``*_model_states.pt`` are in ``dir/best``)."""
    if _RUN_CHECKPOINT.match(folder.name) or is_zero_checkpoint_folder(folder):
        return True
    return folder.name in _CHECKPOINT_PARTS and bool(_RUN_CHECKPOINT.match(folder.parent.name))


def search_chain(weights_dir: Path, input_dir: Path, levels: int = 2) -> list[Path]:
    """The weights folder and up to ``levels`` parents, nearest first, with symlinks resolved.

    A parent inside the input is always searched. Above the input, a parent is searched only while
    the folder below it is a checkpoint inside a run (:func:`in_run`): ``--input run/checkpoint-5``,
    a ``global_stepN`` or a verl ``actor/`` given directly still look in their ``checkpoint-N`` and
    run folders, where HF Trainer leaves the config and tokenizer. Any other input (a model folder such
    as ``~/dl/model``, a DCP folder, an adapter) is searched alone: the folders around it are not its.
    """
    weights_dir, input_dir = weights_dir.resolve(), input_dir.resolve()
    out = [weights_dir]
    folder = weights_dir
    for _ in range(levels):
        if not (input_dir in folder.parents or in_run(folder)):
            break
        folder = folder.parent
        out.append(folder)
    return out


def resolve_base_model(name: str | None, *, download: bool = True,
                       local_folders: bool = True) -> tuple[Path | None, str | None]:
    """A local folder for ``--base-model-name``: the folder itself, or a snapshot in the HF cache.

    Args:
        name: A local folder or a Hub id.
        download: Fetch the small files from the Hub when the id is not cached (never with
            ``HF_HUB_OFFLINE``).
        local_folders: Accept a local folder (False: the HF cache only, for a name a checkpoint gives).

    Returns:
        ``(folder, None)`` when found, ``(None, reason)`` otherwise.
    """
    if not name:
        return None, None
    local = Path(name).expanduser()
    if local_folders and local.is_dir():
        return local, None
    offline = hub_offline()
    # The cache answers the common cases without importing huggingface_hub (0.2-0.3 s; see read/hub_cache.py).
    cached, snapshot = cached_model(name, (CONFIG_FILE,))
    if cached and snapshot is not None and any(os.path.lexists(snapshot / n) for n in TOKENIZER_FILES):
        return snapshot, None
    if cached is False and (offline or not download):
        why = "HF_HUB_OFFLINE is set" if offline else "not downloaded for this"
        return None, f"'{name}' is not in the local HF cache and {why} (LocalEntryNotFoundError)"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a hard dependency, kept defensive
        return None, "huggingface_hub is not installed"
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


def asset_limit(name: str) -> int | None:
    """The size cap of an asset, by its name relative to its folder (None: ``config.json``, capped when read)."""
    if name == CONFIG_FILE:
        return None  # read_config refuses an oversized one with an error naming it
    if name == GENERATION_CONFIG_FILE or name in PROCESSOR_FILES:
        return MAX_CONFIG_BYTES
    if name.endswith(".jinja") or name == "chat_template.json":
        return MAX_TEMPLATE_BYTES
    return MAX_TOKENIZER_BYTES


def folder_root(folder: Path) -> Path:
    """The tree the files found in ``folder`` may resolve into: the folder itself, resolved, or for a
    snapshot in the HF cache its ``models--*`` folder (see :func:`~vllm_consolidate.safe_io.trust_root`)."""
    try:
        return trust_root(Path(folder).resolve())
    except (OSError, RuntimeError):  # a symlink loop: nothing can resolve inside it
        return Path(folder).absolute()


class _Finder:
    """Looks for each asset in folders, nearest first, accepting only regular files of a plausible size that
    resolve inside the folder they are found in."""

    def __init__(self, assets: Assets):
        self.assets = assets

    def skip(self, path: Path, why: str) -> None:
        self.assets.skips.append((path, why))

    def usable(self, path: Path, root: Path, name: str) -> int | None:
        """The size of ``path`` if it may be read (see the class), else None (with a warning if it exists)."""
        if not os.path.lexists(path):
            return None
        if not confined(path, [root]):
            self.skip(path, f"it resolves to {_real(path)}, outside {root}")
            return None
        try:
            st = os.stat(path)
        except OSError as exc:
            self.skip(path, f"cannot read it ({exc.strerror or exc})")
            return None
        if not stat.S_ISREG(st.st_mode):
            self.skip(path, "not a regular file")
            return None
        limit = asset_limit(name)
        if limit is not None and st.st_size > limit:
            self.skip(path, f"it is {st.st_size:,} bytes, more than the {limit:,} such a file can plausibly be")
            return None
        return st.st_size

    def tokenizer(self, folder: Path, root: Path) -> list[Path] | None:
        """The usable tokenizer files of ``folder`` if they make a tokenizer (at most
        :data:`~vllm_consolidate.safe_io.MAX_TOKENIZER_SET_BYTES` together)."""
        names = tokenizer_names(folder)
        if not has_tokenizer(names):
            return None
        usable, total = [], 0
        for name in names:
            size = self.usable(folder / name, root, name)
            if size is None:
                continue
            if total + size > MAX_TOKENIZER_SET_BYTES:
                self.skip(folder / name, f"the tokenizer files here would be more than {MAX_TOKENIZER_SET_BYTES:,} "
                                         "bytes together")
                continue
            total += size
            usable.append(name)
        return [folder / n for n in usable] if has_tokenizer(usable) else None

    def scan(self, folders: list[Path], *, generation: bool = True) -> None:
        """Fill in what is still missing from ``folders``, nearest first (the generation config only if allowed)."""
        a = self.assets
        for folder in folders:
            root = folder_root(folder)
            if a.config is None and self.usable(folder / CONFIG_FILE, root, CONFIG_FILE) is not None:
                a.config = folder / CONFIG_FILE
            if (generation and a.generation_config is None
                    and self.usable(folder / GENERATION_CONFIG_FILE, root, GENERATION_CONFIG_FILE) is not None):
                a.generation_config = folder / GENERATION_CONFIG_FILE
            if a.tokenizer_dir is None and (files := self.tokenizer(folder, root)) is not None:
                a.tokenizer_dir, a.tokenizer_files = folder, files


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
    ``extra_dirs`` (a reader's own asset folders inside the weights folder), then the base model."""
    chain = search_chain(weights_dir, input_dir)
    extras, skips = [], []
    for folder in extra_dirs:
        if folder_root(folder) in chain:
            continue
        if os.path.lexists(folder) and not confined(folder, [weights_dir]):  # huggingface/ -> elsewhere
            skips.append((folder, f"it resolves to {_real(folder)}, outside {weights_dir}"))
            continue
        extras.append(folder)
    assets = find_assets(chain + extras, base_model_name)
    assets.skips[:0] = skips
    return assets


def missing_config(assets: Assets, where: Path) -> ConfigNotFoundError:
    """The error for a checkpoint whose config.json was found nowhere (with why the base model did not help)."""
    reason = f" ({assets.base_model_error})" if assets.base_model_error else ""
    # The warnings are printed only with a result: the one line must say why a config.json there was not used.
    skipped = next((f"; skipped {p}: {why}" for p, why in assets.skips if p.name == CONFIG_FILE or p.is_dir()), "")
    return ConfigNotFoundError(
        f"no config.json in the checkpoint, its parent folders, or the base model{reason}{skipped}", path=where)


def find_assets(search_dirs: list[Path], base_model_name: str | None) -> Assets:
    """Locate config, generation config and tokenizer files, each confined to the folder it is found in.

    The base model is consulted only for what the checkpoint's own folders lack.

    Args:
        search_dirs: Folders to search, nearest first.
        base_model_name: ``--base-model-name``: a local folder or a Hub id.
    """
    assets = Assets()
    finder = _Finder(assets)
    finder.scan(search_dirs)
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
        same = own_config is None or (confined(base / CONFIG_FILE, [folder_root(base)])
                                      and _same_model(own_config, base / CONFIG_FILE))
        finder.scan([base], generation=same)
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
