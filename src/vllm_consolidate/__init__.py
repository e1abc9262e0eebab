"""vllm-consolidate: turn training checkpoints into inference-ready Hugging Face folders that vLLM loads.

The Python API (the CLI is a thin layer over it)::

    from vllm_consolidate import ConvertOptions, convert, validate_folder

    result = convert(ConvertOptions(input="runs/exp1", output="models/exp1", dtype="bfloat16"))
    report = validate_folder(result.output)
    assert report.ok

* :func:`convert` / :class:`ConvertOptions` / :class:`ConvertResult`: one conversion, atomic;
* :func:`validate_folder`: the static checks (and, with ``load=True``, the real-vLLM tier);
* :func:`plan_batch` / :func:`run_batch` / :class:`BatchOptions`: many conversions, resumable;
* :mod:`errors`: every error is a :class:`errors.ConsolidateError` with a ``path`` and a ``hint``.

``import vllm_consolidate`` stays cheap (no torch, no numpy): the conversion entry points are bound
at import, the rest on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from vllm_consolidate._version import __version__

# Bound eagerly: the submodule ``vllm_consolidate.convert`` would otherwise shadow the function of the
# same name as soon as anything imported it.
from vllm_consolidate.convert import ConvertOptions, ConvertResult, convert  # noqa: E402

# name -> module that defines it
_API = {
    "validate_folder": "vllm_consolidate.validate",
    "ValidationReport": "vllm_consolidate.validate",
    "BatchOptions": "vllm_consolidate.batch",
    "plan_batch": "vllm_consolidate.batch",
    "run_batch": "vllm_consolidate.batch",
}

__all__ = ["BatchOptions", "ConvertOptions", "ConvertResult", "ValidationReport", "__version__", "convert", "errors",
           "plan_batch", "run_batch", "validate_folder"]


def __getattr__(name: str) -> Any:
    if name == "errors":
        return importlib.import_module("vllm_consolidate.errors")
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'vllm_consolidate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
