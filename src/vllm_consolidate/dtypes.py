"""Element types, known without importing torch.

Reading metadata, planning and copying bytes need only a dtype's name, size and safetensors code.
Importing torch costs about two seconds, more than the whole fp32 copy of a 0.5B model, so the
metadata layer uses these and torch is imported only where tensors are made (casts, ``.bin``
output, validation). A :class:`DType` compares equal to the torch dtype of the same name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vllm_consolidate.errors import UnsafePickleError


class DType:
    """A tensor element type; one shared, immutable instance per type (``dtypes.float32``...).

    The instances are process-wide singletons that every reader trusts, so they are immutable by
    construction: ``__slots__`` (no ``__dict__`` for a pickle's BUILD to fill), assignment refused,
    and ``__setstate__`` refusing outright. A copy or a pickle of one resolves back to the singleton by name.

    Attributes:
        name: torch's name (``"bfloat16"``).
        itemsize: Bytes per element.
        is_floating_point: True for real floating types.
        safetensors: The safetensors header code (``"BF16"``).
        storage: torch's legacy typed-storage class name, used in ``torch.save`` pickles.
    """

    __slots__ = ("name", "itemsize", "is_floating_point", "safetensors", "storage")
    name: str
    itemsize: int
    is_floating_point: bool
    safetensors: str
    storage: str | None

    def __init__(self, name: str, itemsize: int, is_floating_point: bool, safetensors: str,
                 storage: str | None = None) -> None:
        for attr, value in zip(self.__slots__, (name, itemsize, is_floating_point, safetensors, storage)):
            object.__setattr__(self, attr, value)

    def __setattr__(self, attr: str, value: Any) -> None:
        raise AttributeError(f"DType is immutable (cannot set {attr})")

    def __delattr__(self, attr: str) -> None:
        raise AttributeError(f"DType is immutable (cannot delete {attr})")

    def __setstate__(self, state: Any) -> None:
        # Reached only when a pickle BUILDs onto a DType; no legitimate pickle does (see __reduce__).
        raise UnsafePickleError("refused to load: the pickle tries to rewrite a dtype")

    def __reduce__(self) -> tuple:
        return (of, (self.name,))

    def __copy__(self) -> DType:
        return self

    def __deepcopy__(self, memo: dict) -> DType:
        return self

    @property
    def is_complex(self) -> bool:
        return self.name.startswith("complex")

    @property
    def torch(self) -> Any:
        """The torch dtype (imports torch)."""
        import torch

        return getattr(torch, self.name)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DType):
            return self.name == other.name
        return str(other) == f"torch.{self.name}"  # a torch.dtype

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return f"torch.{self.name}"

    __repr__ = __str__


float64 = DType("float64", 8, True, "F64", "DoubleStorage")
float32 = DType("float32", 4, True, "F32", "FloatStorage")
float16 = DType("float16", 2, True, "F16", "HalfStorage")
bfloat16 = DType("bfloat16", 2, True, "BF16", "BFloat16Storage")
float8_e4m3fn = DType("float8_e4m3fn", 1, True, "F8_E4M3", "Float8_e4m3fnStorage")
float8_e5m2 = DType("float8_e5m2", 1, True, "F8_E5M2", "Float8_e5m2Storage")
int64 = DType("int64", 8, False, "I64", "LongStorage")
int32 = DType("int32", 4, False, "I32", "IntStorage")
int16 = DType("int16", 2, False, "I16", "ShortStorage")
int8 = DType("int8", 1, False, "I8", "CharStorage")
uint8 = DType("uint8", 1, False, "U8", "ByteStorage")
bool_ = DType("bool", 1, False, "BOOL", "BoolStorage")
complex64 = DType("complex64", 8, False, "C64", "ComplexFloatStorage")

ALL: tuple[DType, ...] = (float64, float32, float16, bfloat16, float8_e4m3fn, float8_e5m2, int64, int32, int16,
                          int8, uint8, bool_, complex64)
BY_NAME: dict[str, DType] = {d.name: d for d in ALL}
BY_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in ALL}
BY_STORAGE: dict[str, DType] = {d.storage: d for d in ALL if d.storage}


#: Names people write for the output dtypes (``--dtype``, a config's ``torch_dtype``), with their aliases.
ALIASES: dict[str, DType] = {
    "float32": float32, "fp32": float32, "float": float32,
    "float16": float16, "fp16": float16, "half": float16,
    "bfloat16": bfloat16, "bf16": bfloat16,
}


def parse(name: object) -> DType | None:
    """The dtype a name stands for (``"bf16"``, ``"torch.bfloat16"``, ``"float64"``), or None."""
    text = str(name).removeprefix("torch.")
    return ALIASES.get(text) or BY_NAME.get(text)


def dominant(sized: Iterable[tuple[DType | None, int]]) -> DType | None:
    """The floating dtype holding the most bytes among ``(dtype, nbytes)`` pairs: the model's dtype."""
    weight: dict[DType, int] = {}
    for dtype, nbytes in sized:
        if dtype is not None and dtype.is_floating_point:
            weight[dtype] = weight.get(dtype, 0) + nbytes
    return max(weight, key=weight.__getitem__) if weight else None


def of(dtype: Any) -> DType:
    """A :class:`DType` for a DType, a torch dtype or a name."""
    if isinstance(dtype, DType):
        return dtype
    return BY_NAME[str(dtype).removeprefix("torch.")]
