"""Look a Hub id up in the local Hugging Face cache without importing huggingface_hub.

Why: ``--base-model-name`` defaults to a Hub id, so every conversion of a checkpoint without its own
tokenizer resolves one. ``from huggingface_hub import snapshot_download`` costs 0.2-0.3 s of imports
(its HTTP client and Hub API), as much as planning a 0.5B conversion. Most of the time the answer is
on disk: the model was downloaded before (it is in the cache), or it was never and the machine is
offline. This module answers those two cases from the cache layout alone; everything else (a download,
a snapshot that looks partial, an id it does not recognise) still goes through huggingface_hub.

The layout read here is huggingface_hub's documented cache (``HF_HUB_CACHE``, else
``HUGGINGFACE_HUB_CACHE``, else ``HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
``~/.cache/huggingface/hub``; one ``models--{org}--{name}`` folder per model, ``refs/main`` holding
the commit of the ``main`` branch, ``snapshots/{commit}/`` its files). Nothing found here is trusted
further than a folder to search: the asset finder confines every file to the model's cache folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: A Hub model id as the Hub spells them (``name`` or ``org/name``); ``--`` and ``..`` are refused by the Hub
#: too, so an id that matches maps to exactly one cache folder, inside the cache.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_cache_dir() -> Path:
    """The folder huggingface_hub caches models in, from the same environment variables, in its order."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[var])))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set to a true value, as huggingface_hub reads it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def cached_model(name: str, needed: tuple[str, ...]) -> tuple[bool | None, Path | None]:
    """What the local cache says about the Hub model ``name``, without huggingface_hub.

    Args:
        name: A Hub id.
        needed: File names the snapshot must hold to be returned (e.g. ``config.json``).

    Returns:
        ``(False, None)``: the cache has no folder for this model at all (certainly not cached);
        ``(True, snapshot)``: the snapshot ``refs/main`` names exists and holds every ``needed`` file;
        ``(None, None)``: anything else (an id this module does not recognise, another revision, a snapshot that
        looks partial): ask huggingface_hub.
    """
    if not _REPO_ID.fullmatch(name) or "--" in name or ".." in name:
        return None, None
    repo = hub_cache_dir() / ("models--" + name.replace("/", "--"))
    if not os.path.lexists(repo):
        return False, None
    try:
        with open(repo / "refs" / "main", "rb") as f:
            commit = f.read(64).decode("ascii", "replace").strip()
    except OSError:
        return None, None
    snapshot = repo / "snapshots" / commit
    if not _COMMIT.fullmatch(commit) or not snapshot.is_dir():
        return None, None
    if not all(os.path.lexists(snapshot / n) for n in needed):
        return None, None
    return True, snapshot


__all__ = ["cached_model", "hub_cache_dir", "hub_offline"]
