"""Sizes and counts as people write and read them: ``40GB``, ``1.5GiB``, ``a, b, c and 4 more``.

The one home for size parsing and for shortening lists in messages.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from vllm_consolidate.errors import UsageError

KIB = 2**10
MIB = 2**20
GIB = 2**30

#: Names shown in a message before "and N more".
SHOW = 5

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int) -> int:
    """Parse ``"40GB"``, ``"500MB"``, ``"1.5GiB"`` or a byte count. GB means 10**9, as in huggingface_hub."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m or (m.group(2) or "").upper() not in _UNITS:
        raise UsageError(f"cannot read the size '{text}'", hint="Write it like 40GB, 500MB, 2GiB or a byte count.")
    size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if size <= 0:
        raise UsageError(f"the size '{text}' must be positive")
    return size


def few(names: Iterable[str], show: int = SHOW, *, sort: bool = True, sep: str = ", ") -> str:
    """``a, b, c and 4 more``: a list shortened for a one-line message (sorted unless ``sort`` is off).

    ``sep="; "`` suits items that contain commas themselves (shapes, element counts).
    """
    items = sorted(names) if sort else list(names)
    text = sep.join(items[:show])
    return f"{text} and {len(items) - show} more" if len(items) > show else text


__all__ = ["GIB", "KIB", "MIB", "SHOW", "few", "parse_size"]
