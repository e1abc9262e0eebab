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

``import vllm_consolidate`` stays cheap (no torch, no numpy, none of the readers): every name above
is bound on first use (PEP 562), so ``vllm-consolidate --help`` imports none of the library.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from vllm_consolidate._version import __version__

# name -> module that defines it
_API = {
    "ConvertOptions": "vllm_consolidate.convert",
    "ConvertResult": "vllm_consolidate.convert",
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


class _Package(types.ModuleType):
    """This package's module type, for one name: ``vllm_consolidate.convert`` is the function, bound on first use.

    The submodule of the same name cannot shadow it: importing a submodule binds it on its package
    (``setattr(package, "convert", module)``), and a property on the module's type takes precedence
    over that binding, where a module ``__getattr__`` would not be consulted any more.
    """

    @property
    def convert(self) -> Any:
        if "_convert" not in self.__dict__:
            self.__dict__["_convert"] = importlib.import_module("vllm_consolidate.convert").convert
        return self.__dict__["_convert"]

    @convert.setter
    def convert(self, value: Any) -> None:
        if isinstance(value, types.ModuleType) and value.__name__ == "vllm_consolidate.convert":
            return  # the import system binding the submodule: the package's ``convert`` stays the function
        self.__dict__["_convert"] = value  # a caller's own binding (a test's monkeypatch) is honoured


sys.modules[__name__].__class__ = _Package
