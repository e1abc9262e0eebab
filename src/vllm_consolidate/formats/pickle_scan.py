"""A bounded pre-pass over a pickle's opcodes, run before the C unpickler ever sees the bytes.

The allowlist in :mod:`.torch_zip` stops a pickle from running code, but not from making the
unpickler (or whoever walks the result) work forever or allocate without bound. Once the C
unpickler is inside one ``dict`` insertion it neither returns nor lets a SIGTERM handler run, so
those pickles must be refused before it starts. :func:`scan_pickle` simulates the unpickler's stack
and memo symbolically, without building any object, and refuses:

* more than :data:`MAX_OPS` opcodes, or a memo index that is not the next one (the C unpickler
  sizes its memo array by the largest index it is given, so ``LONG_BINPUT 0xffffffff`` is 32 GiB);
* any object whose *expanded* size (nodes counted as a tree, every memo reference re-counted) passes
  :data:`MAX_EXPANDED`, or that is nested deeper than :data:`MAX_DEPTH`: a "billion laughs" DAG of
  tuples is a few hundred bytes, but hashing it, printing it or walking it takes forever;
* a container changed after it was referenced (only a self-referencing structure needs that, and it
  would let the sizes above be undercounted);
* a dict key or set element whose hash is not cheap and collision-free: tuples, frozensets and big
  ints have hashes an attacker can make collide, which turns each insertion into a scan of all
  earlier keys (hash flooding). Real ``torch.save`` keys are strings and small ints;
* integers wider than 128 bits, extension-registry opcodes and out-of-band buffers, none of which
  ``torch.save`` writes.

What ``torch.save`` writes passes untouched: protocol 2, memo indices in order, every object
complete before it is referenced, and sizes near the opcode count. The caps are far above real
pickles and far below what would hurt. The largest pickle in the DeepSpeed corpus is 11 KB, 2,212
opcodes, scanned in about 2 ms; a state dict of 100,000 tensors (more than any model has) is 12 MB
and 3 million opcodes (its root: expanded size 1.2 million, depth 4), scanned in 3.5 s (the C
unpickler takes 1.5 s) on a busy 2-core machine. The pre-pass holds at most 24 bytes per opcode (node, stack, memo).
"""

from __future__ import annotations

import pickle
from array import array
from collections.abc import Callable

from vllm_consolidate.errors import CorruptCheckpointError, UnsafePickleError

#: Opcodes in one pickle. ``torch.save`` writes about 20 per tensor.
MAX_OPS = 2**23
#: Tree size of any one object, memo references expanded. A legitimate pickle stays below its opcode
#: count plus a little; this also bounds what printing or walking one object costs (``str()`` of it
#: is at most ~100 MB).
MAX_EXPANDED = 2**24
#: Nesting depth of any one object (real checkpoints: about 10).
MAX_DEPTH = 100
#: Widest integer accepted, in bytes (two's complement, as LONG1/LONG4 store it).
MAX_INT_BYTES = 16

# Node flags (low 8 bits of a node word; depth in the next 8; expanded size above).
HSAFE = 1  # hashing it is O(1) and collision-free, or fails at once (unhashable)
_ELEMS = 2  # iterating it yields only HSAFE values (or it is not a container)
_ARGS_OK = 4  # a tuple whose elements all have _ELEMS: safe to pass to set(), dict()...
_SHARED = 8  # referenced from elsewhere (memo fetch, DUP, or a container): must not change
HASHES_ARGS = 16  # a global whose call hashes its arguments' contents (set, dict...)
RESULT_HSAFE = 32  # a global whose call returns an HSAFE object
_LEAF = HSAFE | _ELEMS | _ARGS_OK
_FLAGS = 0xFF
_DEPTH = 0xFF00

_HINT = ("The file is built to make the reader hang or exhaust memory. Only convert checkpoints you trust; "
         "re-save this one with torch.save if it is yours.")

#: ``classify(module, name)`` for a GLOBAL: ``HASHES_ARGS`` and/or ``RESULT_HSAFE``.
Classify = Callable[[str, str], int]

_SCALAR, _WIDE_INT = 0, 1  # the constant nodes: a hash-safe scalar, an int wider than 55 bits
_SCALAR_WORD = (1 << 16) | _LEAF | _SHARED
_WIDE_INT_WORD = (1 << 16) | _ELEMS | _SHARED

_OPS = {name: getattr(pickle, name)[0] for name in dir(pickle)
        if name.isupper() and isinstance(getattr(pickle, name), bytes) and len(getattr(pickle, name)) == 1}


class _Scanner:
    """The symbolic stack machine; see the module docstring. One instance per pickle."""

    def __init__(self, data: bytes, classify: Classify, path: str, stack_flags: int):
        self.data, self.classify, self.path, self.stack_flags = data, classify, path, stack_flags
        self.pos = 0
        # node id -> word: size << 16 | depth << 8 | flags. Scalars share two constant nodes.
        self.nodes = array("q", [_SCALAR_WORD, _WIDE_INT_WORD])
        self.stack = array("q")  # node ids
        self.memo = array("q")  # memo index -> node id
        self.marks: list[int] = []
        self.fence = 0  # the C unpickler's name: items below the last MARK are out of reach
        self.handlers: list[tuple[Callable[[object], bool | None], object] | None] = [None] * 256
        for name, (method, param) in _DISPATCH.items():
            self.handlers[_OPS[name]] = (getattr(self, method), param)

    # -- errors and arguments ------------------------------------------------------------------

    def corrupt(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"malformed pickle: {what} (at byte {self.pos})", path=self.path)

    def unsafe(self, what: str) -> UnsafePickleError:
        return UnsafePickleError(f"refused to load: the pickle {what}; a torch.save file never does", path=self.path,
                                 hint=_HINT)

    def take(self, n: int) -> bytes:
        start, end = self.pos, self.pos + n
        if n < 0 or end > len(self.data):
            raise self.corrupt("truncated (an argument runs past the end)")
        self.pos = end
        return self.data[start:end]

    def uint(self, n: int, signed: bool = False) -> int:
        return int.from_bytes(self.take(n), "little", signed=signed)

    def line(self) -> bytes:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            raise self.corrupt("truncated (a line argument has no end)")
        return self.take(end - self.pos + 1)[:-1]

    # -- nodes ------------------------------------------------------------------------------------

    def word(self, size: int, depth: int, flags: int) -> int:
        if size > MAX_EXPANDED:
            raise self.unsafe(f"builds an object of more than {MAX_EXPANDED:,} parts once shared parts are "
                              "counted each time they are used (an exponential \"billion laughs\" structure)")
        if depth > MAX_DEPTH:
            raise self.unsafe(f"nests objects more than {MAX_DEPTH} deep")
        return (size << 16) | (depth << 8) | flags

    def push(self, size: int, depth: int, flags: int) -> None:
        self.nodes.append(self.word(size, depth, flags))
        self.stack.append(len(self.nodes) - 1)

    def pop(self, k: int) -> list[int]:
        if len(self.stack) - self.fence < k:
            raise self.corrupt("stack underflow")
        cut = len(self.stack) - k
        items = self.stack[cut:].tolist()
        del self.stack[cut:]
        return items

    def pop_mark(self) -> list[int]:
        if not self.marks:
            raise self.corrupt("no MARK on the stack")
        mark = self.marks.pop()
        self.fence = self.marks[-1] if self.marks else 0
        items = self.stack[mark:].tolist()
        del self.stack[mark:]
        return items

    def consume(self, items: list[int]) -> tuple[int, int, int]:
        """Mark ``items`` as referenced; return (total size, max depth, AND of their flags)."""
        nodes, size, depth, flags = self.nodes, 0, 0, _FLAGS
        for i in items:
            word = nodes[i]
            if i > _WIDE_INT:  # the constant scalar nodes stay as they are
                nodes[i] = word | _SHARED
            size += word >> 16
            if word & _DEPTH > depth:
                depth = word & _DEPTH
            flags &= word
        return size, depth >> 8, flags

    def collapse(self, k: int) -> tuple[int, int, int]:
        """Pop ``k`` items, mark them referenced; (total size, max depth, AND of flags)."""
        stack = self.stack
        if len(stack) - self.fence < k:
            raise self.corrupt("stack underflow")
        items = stack[len(stack) - k:]
        del stack[len(stack) - k:]
        return self.consume(items)

    def require_hsafe(self, keys: list[int]) -> None:
        for i in keys:
            if not self.nodes[i] & HSAFE:
                raise self.unsafe("uses a tuple, frozenset or very large number as a dict key or set element "
                                  "(hashes an attacker can make collide)")

    def mutate(self, items: list[int]) -> None:
        """Add ``items`` to the object below them on the stack (APPEND, SETITEM, BUILD...)."""
        if len(self.stack) <= self.fence:
            raise self.corrupt("stack underflow")
        if not items:
            return
        target = self.stack[-1]
        word = self.nodes[target]
        if target in (_SCALAR, _WIDE_INT):
            raise self.unsafe("tries to change a number, string or empty tuple")
        if word & _SHARED:  # its size is already counted in what references it
            raise self.unsafe("changes an object after referencing it (a self-referencing structure)")
        size, depth, flags = self.consume(items)
        keep = word & _FLAGS if flags & HSAFE else word & _FLAGS & ~(_ELEMS | _ARGS_OK)
        self.nodes[target] = self.word((word >> 16) + size, max((word & _DEPTH) >> 8, depth + 1), keep)

    # -- handlers, by opcode (see _DISPATCH) --------------------------------------------------------

    def h_scalar(self, arg: object) -> None:
        if isinstance(arg, int):
            self.take(arg)
        elif arg == "line":
            self.line()
        elif isinstance(arg, tuple):  # a counted string: (bytes of the count, signed)
            self.take(self.uint(*arg))
        self.stack.append(_SCALAR)

    def h_int(self, arg: object) -> None:
        if arg == "line":  # INT or LONG as decimal text
            digits = len(self.line().rstrip(b"L").lstrip(b"+-"))
            wide, small = digits > 2.4 * MAX_INT_BYTES, digits <= 16
        else:
            nbytes = len(self.take(self.uint(*arg)))
            wide, small = nbytes > MAX_INT_BYTES, nbytes <= 7
        if wide:
            raise self.unsafe(f"holds an integer wider than {MAX_INT_BYTES * 8} bits")
        # Ints below 2**55 hash to themselves: no collisions. Wider ones collide modulo 2**61-1.
        self.stack.append(_SCALAR if small else _WIDE_INT)

    def h_empty(self, arg: object) -> None:
        if arg == "tuple":  # () is immutable and hashes to a constant: a scalar
            self.stack.append(_SCALAR)
            return
        if arg == "bytearray":
            self.take(self.uint(8))
        self.push(1, 0, _LEAF)  # a fresh node: it may be filled

    def h_small_tuple(self, k: object) -> None:
        size, depth, flags = self.collapse(k)
        # A tuple is hashable, and its hash collides at will: never HSAFE itself.
        self.push(1 + size, depth + 1, (_ELEMS if flags & HSAFE else 0) | (_ARGS_OK if flags & _ELEMS else 0))

    def h_container(self, kind: object) -> None:
        items = self.pop_mark()
        if kind in ("dict", "frozenset"):
            if kind == "dict" and len(items) % 2:
                raise self.corrupt("odd number of items for DICT")
            self.require_hsafe(items[::2] if kind == "dict" else items)
        size, depth, flags = self.consume(items)
        elems = _ELEMS if flags & HSAFE else 0
        if kind == "list":
            out = HSAFE | elems  # unhashable: hashing fails at once
        elif kind in ("dict", "frozenset"):
            out = _ELEMS | (HSAFE if kind == "dict" else 0)
        else:  # a tuple
            out = elems | (_ARGS_OK if flags & _ELEMS else 0)
        self.push(1 + size, depth + 1, out)

    def h_mutate(self, kind: object) -> None:
        if kind == "append":
            self.mutate(self.pop(1))
        elif kind == "appends":
            self.mutate(self.pop_mark())
        elif kind == "build":
            if len(self.stack) - self.fence < 2:
                raise self.corrupt("stack underflow")
            self.mutate(self.pop(1))
        else:
            items = self.pop(2) if kind == "setitem" else self.pop_mark()
            if kind != "additems" and len(items) % 2:
                raise self.corrupt("odd number of items for SETITEMS")
            self.require_hsafe(items if kind == "additems" else items[::2])
            self.mutate(items)

    def h_global(self, kind: object) -> None:
        if kind == "stack":
            self.consume(self.pop(2))
            flags = self.stack_flags  # the names are not known here: the caller's worst case
        else:
            try:
                module, name = self.line().decode("utf-8"), self.line().decode("utf-8")
            except UnicodeDecodeError:
                raise self.corrupt("a global's name is not UTF-8") from None
            flags = self.classify(module, name) & (HASHES_ARGS | RESULT_HSAFE)
            if kind == "inst":
                self.call(flags, self.pop_mark(), packed=False)
                return
        self.push(1, 0, flags | _LEAF)  # classes and functions hash by identity

    def h_call(self, count: object) -> None:
        if count == 2:  # REDUCE, NEWOBJ: callable and one args tuple, the commonest call
            args_word = self.nodes[self.stack[-1]] if len(self.stack) > self.fence else 0
            callee_word = self.nodes[self.stack[-2]] if len(self.stack) - self.fence > 1 else 0
            size, depth, _ = self.collapse(2)
            size -= callee_word >> 16
            self.check_call(callee_word, args_word & _ARGS_OK)
            self.push(1 + size, depth + 1, HSAFE if callee_word & RESULT_HSAFE else 0)
            return
        if count == "obj":
            items = self.pop_mark()
            if not items:
                raise self.corrupt("stack underflow")
        else:
            items = self.pop(count)
        self.consume(items[:1])
        # NEWOBJ_EX passes one args tuple and a kwargs dict; OBJ passes the items.
        self.call(self.nodes[items[0]], items[1:], packed=count != "obj")

    def check_call(self, callee: int, args_ok: int) -> None:
        # set(x), dict(x)... hash what iterating x yields.
        if callee & HASHES_ARGS and not args_ok:
            raise self.unsafe("builds a set or dict from tuples or other values whose hashes can be made "
                              "to collide")

    def call(self, callee: int, args: list[int], packed: bool) -> None:
        """Push the result of calling a global whose flags are ``callee``."""
        checked, need = (args[:1], _ARGS_OK) if packed else (args, _ELEMS)
        self.check_call(callee, all(self.nodes[i] & need for i in checked))
        size, depth, _ = self.consume(args)
        self.push(1 + size, depth + 1, HSAFE if callee & RESULT_HSAFE else 0)

    def h_persid(self, kind: object) -> None:
        if kind == "line":
            self.line()
        else:
            self.consume(self.pop(1))
        self.push(1, 0, _LEAF)  # our storage stand-ins hash by identity

    def h_get(self, arg: object) -> None:
        idx = self.memo_index(arg)
        if idx >= len(self.memo):
            raise self.corrupt(f"memo index {idx} was never stored")
        node = self.memo[idx]
        self.nodes[node] |= _SHARED
        self.stack.append(node)

    def h_put(self, arg: object) -> None:
        idx = len(self.memo) if arg == "memoize" else self.memo_index(arg)
        if len(self.stack) <= self.fence:
            raise self.corrupt("stack underflow")
        if idx < len(self.memo):
            self.memo[idx] = self.stack[-1]
        elif idx == len(self.memo):
            self.memo.append(self.stack[-1])
        else:  # the C unpickler would allocate (and zero) an array of 2*idx pointers
            raise self.unsafe(f"stores memo index {idx} out of order")

    def memo_index(self, arg: object) -> int:
        if arg != "line":
            return self.uint(arg)
        text = self.line()
        if not text.isdigit() or len(text) > 12:
            raise self.corrupt("bad memo index")
        return int(text)

    def h_stack(self, kind: object) -> bool | None:
        if kind == "mark":
            self.marks.append(len(self.stack))
            self.fence = len(self.stack)
        elif kind == "pop":
            if self.marks and self.marks[-1] == len(self.stack):  # as the C unpickler: POP drops a MARK
                self.pop_mark()
            else:
                self.pop(1)
        elif kind == "pop_mark":
            self.pop_mark()
        elif kind == "dup":
            node = self.pop(1)[0]
            self.nodes[node] |= _SHARED
            self.stack.extend([node, node])
        elif kind == "proto":
            if self.uint(1) > pickle.HIGHEST_PROTOCOL:
                raise self.corrupt("unsupported pickle protocol")
        elif kind == "frame":
            self.uint(8)
        else:  # STOP
            self.pop(1)
            return True
        return None

    def h_refused(self, name: object) -> None:
        raise self.unsafe(f"uses the {name} opcode (extension registry or out-of-band buffers)")

    def run(self) -> int:
        """Scan to STOP; return the opcode count.

        The opcodes ``torch.save`` writes most (memo puts and gets, short strings and ints, MARK) are
        handled inline, without a method call: they are two thirds of a state dict's opcodes.
        """
        data, stack, memo, nodes, marks = self.data, self.stack, self.memo, self.nodes, self.marks
        handlers, fast, count, pos = self.handlers, _FAST, 0, 0
        try:
            while True:
                op = data[pos]  # IndexError past the end: truncated
                count += 1
                if count > MAX_OPS:
                    raise self.unsafe(f"has more than {MAX_OPS:,} opcodes")
                kind = fast[op]
                if kind == 1:  # BINPUT, LONG_BINPUT: in order and with something to store, else see h_put
                    width = 1 if op == _BINPUT else 4
                    if int.from_bytes(data[pos + 1:pos + 1 + width], "little") != len(memo) \
                            or len(stack) <= self.fence or len(data) <= pos + width:
                        kind = 0
                    else:
                        memo.append(stack[-1])
                        pos += 1 + width
                elif kind == 2:  # BINGET, LONG_BINGET of a stored index, else see h_get
                    width = 1 if op == _BINGET else 4
                    idx = int.from_bytes(data[pos + 1:pos + 1 + width], "little")
                    if idx >= len(memo) or len(data) <= pos + width:
                        kind = 0
                    else:
                        node = memo[idx]
                        nodes[node] |= _SHARED
                        stack.append(node)
                        pos += 1 + width
                elif kind == 3:  # fixed-size scalars
                    pos += _SCALAR_SKIP[op]
                    stack.append(_SCALAR)
                elif kind == 4:  # counted strings
                    width = _COUNTED_SKIP[op]
                    pos += 1 + width + int.from_bytes(data[pos + 1:pos + 1 + width], "little")
                    stack.append(_SCALAR)
                elif kind == 5:  # MARK
                    marks.append(len(stack))
                    self.fence = len(stack)
                    pos += 1
                if kind == 0:
                    entry = handlers[op]
                    if entry is None:
                        raise self.corrupt(f"unknown opcode {data[pos:pos + 1]!r}")
                    self.pos = pos + 1
                    if entry[0](entry[1]):
                        return count
                    pos = self.pos
        except IndexError:
            self.pos = len(data)
            raise self.corrupt("truncated (no STOP opcode)") from None


#: opcode name -> (handler method, its parameter).
_DISPATCH: dict[str, tuple[str, object]] = {
    **{n: ("h_scalar", 0) for n in ("NONE", "NEWTRUE", "NEWFALSE")},
    **{n: ("h_scalar", k) for n, k in (("BININT", 4), ("BININT1", 1), ("BININT2", 2), ("BINFLOAT", 8))},
    **{n: ("h_scalar", "line") for n in ("FLOAT", "STRING", "UNICODE")},
    **{n: ("h_scalar", (1, False)) for n in ("SHORT_BINSTRING", "SHORT_BINBYTES", "SHORT_BINUNICODE")},
    **{n: ("h_scalar", (4, False)) for n in ("BINUNICODE", "BINBYTES")},
    **{n: ("h_scalar", (8, False)) for n in ("BINUNICODE8", "BINBYTES8")},
    "BINSTRING": ("h_scalar", (4, True)),
    "INT": ("h_int", "line"), "LONG": ("h_int", "line"), "LONG1": ("h_int", (1, False)), "LONG4": ("h_int", (4, True)),
    **{n: ("h_empty", None) for n in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET")},
    "EMPTY_TUPLE": ("h_empty", "tuple"),
    "BYTEARRAY8": ("h_empty", "bytearray"),
    "LIST": ("h_container", "list"), "TUPLE": ("h_container", "tuple"), "DICT": ("h_container", "dict"),
    "FROZENSET": ("h_container", "frozenset"),
    "TUPLE1": ("h_small_tuple", 1), "TUPLE2": ("h_small_tuple", 2), "TUPLE3": ("h_small_tuple", 3),
    **{n: ("h_mutate", n.lower()) for n in ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD")},
    "GLOBAL": ("h_global", "global"), "STACK_GLOBAL": ("h_global", "stack"), "INST": ("h_global", "inst"),
    "REDUCE": ("h_call", 2), "NEWOBJ": ("h_call", 2), "NEWOBJ_EX": ("h_call", 3), "OBJ": ("h_call", "obj"),
    "PERSID": ("h_persid", "line"), "BINPERSID": ("h_persid", "bin"),
    "GET": ("h_get", "line"), "BINGET": ("h_get", 1), "LONG_BINGET": ("h_get", 4),
    "PUT": ("h_put", "line"), "BINPUT": ("h_put", 1), "LONG_BINPUT": ("h_put", 4), "MEMOIZE": ("h_put", "memoize"),
    **{n: ("h_stack", n.lower()) for n in ("MARK", "POP", "POP_MARK", "DUP", "PROTO", "FRAME", "STOP")},
    **{n: ("h_refused", n) for n in ("EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER")},
}


# Inline fast path of _Scanner.run: opcode -> bytes to skip (fixed-size scalars), or width of the length.
_SCALAR_SKIP = {_OPS[n]: 1 + k for n, k in (("NONE", 0), ("NEWTRUE", 0), ("NEWFALSE", 0), ("EMPTY_TUPLE", 0),
                                            ("BININT1", 1), ("BININT2", 2), ("BININT", 4), ("BINFLOAT", 8))}
_COUNTED_SKIP = {_OPS[n]: k for n, k in (("SHORT_BINUNICODE", 1), ("SHORT_BINBYTES", 1), ("SHORT_BINSTRING", 1),
                                         ("BINUNICODE", 4), ("BINBYTES", 4), ("BINUNICODE8", 8), ("BINBYTES8", 8))}
_BINPUT, _BINGET = _OPS["BINPUT"], _OPS["BINGET"]
#: opcode -> inline case of _Scanner.run (0: through the handlers).
_FAST = [0] * 256
for _code, _case in ((_BINPUT, 1), (_OPS["LONG_BINPUT"], 1), (_BINGET, 2), (_OPS["LONG_BINGET"], 2),
                     *((op, 3) for op in _SCALAR_SKIP), *((op, 4) for op in _COUNTED_SKIP), (_OPS["MARK"], 5)):
    _FAST[_code] = _case


def scan_pickle(data: bytes, classify: Classify, *, path: str, stack_flags: int = HASHES_ARGS) -> int:
    """Refuse a pickle that would make the unpickler, or a walk of its result, run unbounded.

    Args:
        data: The whole pickle.
        classify: Flags (``HASHES_ARGS``, ``RESULT_HSAFE``) for the global ``module.name``.
        path: The file, for error messages.
        stack_flags: Flags for a STACK_GLOBAL, whose names the pre-pass does not know: the worst
            case over every global the caller's unpickler admits.

    Returns:
        The number of opcodes up to and including STOP.

    Raises:
        UnsafePickleError: A cap or rule in the module docstring is broken.
        CorruptCheckpointError: The pickle is malformed (truncated, unknown opcode, stack underflow).
    """
    return _Scanner(data, classify, path, stack_flags).run()


__all__ = ["HASHES_ARGS", "HSAFE", "MAX_DEPTH", "MAX_EXPANDED", "MAX_INT_BYTES", "MAX_OPS", "RESULT_HSAFE",
           "scan_pickle"]
