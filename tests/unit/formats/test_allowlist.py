"""The unpickler's allowlist (pure logic, in process): every refused global raises before it runs.

The pickles are written opcode by opcode with the builders of ``tests/test_hostile_pickles.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.test_hostile_pickles import (
    BUILD,
    EMPTY_DICT,
    MARK,
    NONE,
    PROTO2,
    REDUCE,
    SETITEM,
    SETITEMS,
    STOP,
    g,
    i,
    pickle_file,
    s,
    tup,
)

from vllm_consolidate.errors import UnsafePickleError
from vllm_consolidate.formats.torch_zip import Inert, load_lazy

REFUSED_GLOBALS = [
    ("os", "system"), ("posix", "system"), ("nt", "system"), ("builtins", "eval"), ("builtins", "exec"),
    ("builtins", "getattr"), ("builtins", "__import__"), ("builtins", "open"), ("builtins", "compile"),
    ("__builtin__", "eval"), ("subprocess", "Popen"), ("subprocess", "check_output"), ("torch", "load"),
    ("torch.serialization", "load"), ("torch.storage", "_load_from_bytes"), ("torch._utils", "_rebuild_qtensor"),
    ("pickle", "loads"), ("_pickle", "loads"), ("shutil", "rmtree"), ("io", "open"), ("runpy", "run_path"),
    ("functools", "partial"), ("operator", "attrgetter"), ("copyreg", "_reconstructor"), ("numpy", "load"),
    ("torch", "Tensor.__reduce_ex__"), ("builtins", "type"), ("builtins", "object"), ("torch", "nn"),
]


@pytest.mark.parametrize(("module", "name"), REFUSED_GLOBALS, ids=[f"{m}.{n}" for m, n in REFUSED_GLOBALS])
@pytest.mark.parametrize("opcode", ["GLOBAL", "STACK_GLOBAL", "INST"])
def test_refused_global_never_runs(module: str, name: str, opcode: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    command = s(f"touch {marker}")
    if opcode == "GLOBAL":
        body = g(module, name) + tup(command) + REDUCE
    elif opcode == "STACK_GLOBAL":  # protocol 4: the names come from the stack
        body = s(module) + s(name) + b"\x93" + tup(command) + REDUCE
    else:  # INST: protocol 0 call of a class
        body = MARK + command + b"i" + module.encode() + b"\n" + name.encode() + b"\n"
    with pytest.raises(UnsafePickleError, match="allowlist") as info:
        load_lazy(pickle_file(tmp_path, PROTO2 + EMPTY_DICT + s("k") + body + SETITEM + STOP))
    assert f"{module}.{name}" in str(info.value)
    assert not marker.exists()


def test_deepspeed_globals_are_inert(tmp_path: Path) -> None:
    """Any deepspeed.* global becomes a stand-in that records its arguments; nothing runs."""
    marker = tmp_path / "ran"
    body = g("deepspeed.launcher.runner", "main") + tup(s(f"touch {marker}")) + REDUCE
    enum = g("deepspeed.runtime.zero.config", "ZeroStageEnum") + tup(i(2)) + REDUCE
    state = EMPTY_DICT + s("args") + tup(i(99)) + SETITEM
    obj = load_lazy(pickle_file(tmp_path, PROTO2 + EMPTY_DICT + MARK + s("run") + body + s("stage") + enum + state
                                 + BUILD + SETITEMS + STOP))
    assert not marker.exists()
    assert isinstance(obj["run"], Inert) and obj["run"].args == (f"touch {marker}",)
    stage = obj["stage"]
    assert stage.args == (2,) and stage.state == {"args": (99,)}  # BUILD touched only the state slot
    assert type(stage).qualname == "deepspeed.runtime.zero.config.ZeroStageEnum"
    again = load_lazy(pickle_file(tmp_path, PROTO2 + enum + STOP))
    assert type(again) is not type(stage)  # classes are per load, never shared


def test_out_of_band_and_extension_opcodes_refused(tmp_path: Path) -> None:
    for body in (b"\x82\x01", b"\x97", NONE + b"\x98"):  # EXT1, NEXT_BUFFER, READONLY_BUFFER
        with pytest.raises(UnsafePickleError):
            load_lazy(pickle_file(tmp_path, PROTO2 + body + STOP))


