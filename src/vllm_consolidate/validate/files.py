"""File checks: which weight files vLLM would read, and whether their headers and index agree.

vLLM picks its weight files by rules that turn some folders into silently wrong models: it switches to
Mistral's format when it sees ``consolidated*.safetensors``, reads every ``*.safetensors`` file when
there is no index (a later file's tensors overwrite an earlier one's), and ignores ``.bin`` files next
to safetensors. These checks read file headers only (``.bin`` files through the allowlisted lazy
reader; nothing is unpickled freely) and fill :attr:`Context.stored` for the checks after them.

Checks: ``weight_files``, ``index``, ``duplicate_tensors``, ``bin_format``, ``wrapper_prefixes``.
"""

from __future__ import annotations

from pathlib import Path

from vllm_consolidate.errors import (
    ConsolidateError,
    CorruptCheckpointError,
    UnsafePickleError,
    UnsupportedCheckpointError,
)
from vllm_consolidate.read.hf import (
    BIN_INDEX,
    SAFE_INDEX,
    SAFE_SINGLE,
    WRAPPER_PREFIXES,
    stored_bin,
    stored_safetensors,
)
from vllm_consolidate.safe_io import MAX_INDEX_BYTES, read_json
from vllm_consolidate.units import few
from vllm_consolidate.validate.context import Context, Stored
from vllm_consolidate.validate.report import FAIL, PASS, WARN, Check, skipped

#: ``.bin`` files vLLM skips as training state (``filter_files_not_needed_for_inference``).
NON_WEIGHT_BIN_FILES: frozenset[str] = frozenset({"training_args.bin", "optimizer.bin"})


def check_weight_files(ctx: Context) -> Check:
    """``weight_files``: exactly one weight family at the top level, and every header readable.

    Fails on ``consolidated*.safetensors``, ``.bin`` weights next to safetensors, several files of a
    family without its index, no weight files, an unreadable header or a dtype this tool cannot read.
    Fills ``ctx.stored``.
    """
    stored = ctx.stored
    top = sorted(p for p in ctx.folder.iterdir() if p.is_file())
    problems = _choose_family(ctx.folder, top, stored)
    if stored.family is None:
        return Check("weight_files", FAIL, "; ".join(problems))
    problems += _read_headers(stored)
    details = {"family": stored.family, "files": [p.name for p in stored.files],
               "index": stored.index_path.name if stored.index_path else None, "tensors": len(stored.tensors)}
    if problems:
        return Check("weight_files", FAIL, "; ".join(problems), details)
    layout = "sharded" if stored.index_path else "single file"
    msg = f"{stored.family}, {layout}: {few((p.name for p in stored.files), 3)}"
    if stored.family == "safetensors" and stored.index_path is None and stored.files[0].name != SAFE_SINGLE:
        return Check("weight_files", WARN, msg + f"; transformers expects the single file to be {SAFE_SINGLE}",
                     details)
    return Check("weight_files", PASS, f"{msg}; {len(stored.tensors)} tensors", details)


def _choose_family(folder: Path, top: list[Path], stored: Stored) -> list[str]:
    """Set ``stored.family``, ``files`` and ``index_path`` the way vLLM chooses; return the problems seen."""
    st_all = [p for p in top if p.name.endswith(".safetensors")]
    consolidated = [p for p in st_all if p.name.startswith("consolidated")]
    st = [p for p in st_all if p not in consolidated]
    bins = [p for p in top if p.name.endswith(".bin") and p.name not in NON_WEIGHT_BIN_FILES]
    problems: list[str] = []
    if consolidated:
        problems.append(
            f"{few(p.name for p in consolidated)}: Mistral's native format; vLLM switches to it and reads "
            "only that file instead of the HF weights. Delete it"
        )
    if st and bins:
        problems.append(
            f".bin weights next to safetensors ({few(p.name for p in bins)}): vLLM loads only the "
            "*.safetensors files and ignores them. Keep one format"
        )
    if st:
        stored.family, stored.files, index = "safetensors", st, folder / SAFE_INDEX
    elif bins:
        stored.family, stored.files, index = "bin", bins, folder / BIN_INDEX
    else:
        problems.append("no weight files (*.safetensors or pytorch_model*.bin) at the top level")
        return problems
    stored.index_path = index if index.is_file() else None
    if stored.index_path is None and len(stored.files) > 1:
        problems.append(
            f"{len(stored.files)} {stored.family} files ({few(p.name for p in stored.files)}) "
            f"and no {index.name}: vLLM loads every file, and a later file's tensors overwrite an earlier "
            "one's; transformers reads only one"
        )
    return problems


def _read_headers(stored: Stored) -> list[str]:
    """Read every file's tensor list into ``stored``; return the problems (unreadable files, unknown dtypes)."""
    problems: list[str] = []
    read = stored_safetensors if stored.family == "safetensors" else stored_bin
    for p in stored.files:
        try:
            tensors = read(p)
        except (CorruptCheckpointError, UnsupportedCheckpointError, UnsafePickleError) as exc:
            problems.append(f"{p.name}: {exc.message}")
            stored.bin_errors[p.name] = exc.message
            continue
        stored.by_file[p.name] = tensors
        for t in tensors:
            stored.tensors.setdefault(t.name, t)
    unknown = sorted({t.dtype_code for ts in stored.by_file.values() for t in ts if t.dtype is None})
    if unknown:
        problems.append(f"dtypes this tool cannot read: {', '.join(unknown)}")
    return problems


def check_index(ctx: Context) -> Check:
    """``index``: the ``*.index.json`` and the shards agree both ways.

    Every file it names exists, every tensor is in the file it names, every tensor of a shard is
    listed under that shard, and no shard is left unlisted.
    """
    stored = ctx.stored
    if stored.family is None:
        return skipped("index", "no weight files")
    path = stored.index_path
    if path is None:
        return Check("index", PASS, "no index (single file)")
    try:
        # Strict and bounded, as convert reads an index (no NaN, no key named twice).
        weight_map = read_json(path, MAX_INDEX_BYTES, what="the index", unique_keys=True)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ConsolidateError, KeyError, TypeError) as exc:
        detail = exc.message if isinstance(exc, ConsolidateError) else exc
        return Check("index", FAIL, f"{path.name} is unreadable or has no weight_map ({detail})")
    named = set(weight_map.values())
    problems = _index_problems(ctx.folder, stored, weight_map, named)
    details = {"index": path.name, "files": sorted(named), "tensors": len(weight_map)}
    if problems:
        return Check("index", FAIL, f"{path.name}: " + "; ".join(problems), details)
    return Check("index", PASS, f"{path.name} lists {len(weight_map)} tensors in {len(named)} files", details)


def _index_problems(folder: Path, stored: Stored, weight_map: dict[str, str], named: set[str]) -> list[str]:
    """Disagreements between an index's ``weight_map`` and the shards, one message each."""
    problems: list[str] = []
    absent = sorted(f for f in named if not (folder / f).is_file())
    if absent:
        problems.append(f"names files that do not exist: {few(absent)}")
    wrong = [tensor for tensor, fname in weight_map.items()
             if fname in stored.by_file and all(t.name != tensor for t in stored.by_file[fname])]
    if wrong:
        problems.append(f"{len(wrong)} tensors are not in the file the index names: {few(wrong)}")
    unlisted_files = sorted(p.name for p in stored.files if p.name not in named)
    if unlisted_files:
        problems.append(
            f"unlisted shard(s) {few(unlisted_files)}: vLLM skips files the index does not name (and reads "
            "every file if the index is lost); delete them or add them to the index"
        )
    unlisted = [t.name for fname, tensors in stored.by_file.items() if fname in named
                for t in tensors if weight_map.get(t.name) != fname]
    if unlisted:
        problems.append(f"{len(unlisted)} stored tensors are not listed under their file: {few(unlisted)}")
    return problems


def check_duplicates(ctx: Context) -> Check:
    """``duplicate_tensors``: no tensor name in two files (vLLM loads both and the later file wins)."""
    seen: dict[str, list[str]] = {}
    for fname, tensors in ctx.stored.by_file.items():
        for t in tensors:
            seen.setdefault(t.name, []).append(fname)
    dups = {n: files for n, files in seen.items() if len(files) > 1}
    if dups:
        first = sorted(dups)[0]
        return Check(
            "duplicate_tensors", FAIL,
            f"{len(dups)} tensor names are stored in more than one file ({few(dups)}; e.g. {first} in "
            f"{' and '.join(dups[first])}); vLLM loads both and the later file wins",
            {"duplicates": dups},
        )
    return Check("duplicate_tensors", PASS, "every tensor name is stored once")


def check_bin_format(ctx: Context) -> Check:
    """``bin_format``: ``.bin`` files are flat name -> tensor dicts (as the lazy reader found them)."""
    stored = ctx.stored
    if stored.family != "bin":
        return Check("bin_format", PASS, "no .bin weights")
    if stored.bin_errors:
        return Check("bin_format", FAIL, "; ".join(f"{f}: {e}" for f, e in stored.bin_errors.items()))
    return Check("bin_format", PASS, f"{len(stored.files)} .bin files are flat name -> tensor dicts")


def check_prefixes(ctx: Context) -> Check:
    """``wrapper_prefixes``: no name starts with a training wrapper's prefix (DDP, torch.compile, Fabric)."""
    hits = sorted(n for n in ctx.stored.tensors if n.startswith(WRAPPER_PREFIXES))
    if hits:
        prefixes = sorted({p for p in WRAPPER_PREFIXES for n in hits if n.startswith(p)})
        return Check("wrapper_prefixes", FAIL,
                     f"{len(hits)} tensor names start with a training wrapper's prefix "
                     f"({', '.join(repr(p) for p in prefixes)}): {few(hits, 3)}; strip it", {"names": hits})
    return Check("wrapper_prefixes", PASS, f"no {'/'.join(WRAPPER_PREFIXES)} prefixes")


__all__ = ["NON_WEIGHT_BIN_FILES", "check_bin_format", "check_duplicates", "check_index", "check_prefixes",
           "check_weight_files"]
