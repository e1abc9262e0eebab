"""What each pickle opcode does to the symbolic stack and memo of the pre-pass in :mod:`.pickle_scan`.

The pre-pass builds no object. Each stack slot and memo entry holds a *node* id, and a node is one
int, its *word*: ``size << 16 | depth << 8 | flags``, where size is the object's expanded (tree) size,
depth its nesting, and the flags say whether hashing or iterating it is cheap and collision-free.
:class:`StackMachine` holds the stack, the memo and the nodes, and has one handler per opcode
(:data:`_DISPATCH`). It enforces the caps on any one object (:data:`MAX_EXPANDED`, :data:`MAX_DEPTH`,
:data:`MAX_INT_BYTES`) as each node is built. The opcode loop, the cap on opcodes and how a refusal is
reported belong to :mod:`.pickle_scan`, which subclasses the machine and re-exports the public names:
import them from there.
"""

from __future__ import annotations

import pickle
from array import array
from collections.abc import Callable

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
SHARED = 8  # referenced from elsewhere (memo fetch, DUP, or a container): must not change
HASHES_ARGS = 16  # a global whose call hashes its arguments' contents (set, dict...)
RESULT_HSAFE = 32  # a global whose call returns an HSAFE object
_LEAF = HSAFE | _ELEMS | _ARGS_OK
_FLAGS = 0xFF
_DEPTH = 0xFF00

#: ``classify(module, name)`` for a GLOBAL: ``HASHES_ARGS`` and/or ``RESULT_HSAFE``.
Classify = Callable[[str, str], int]

# SCALAR, SHARED and OPS are public: the inline fast path of pickle_scan's loop uses them too.
SCALAR, _WIDE_INT = 0, 1  # the constant nodes: a hash-safe scalar, an int wider than 55 bits
_SCALAR_WORD = (1 << 16) | _LEAF | SHARED
_WIDE_INT_WORD = (1 << 16) | _ELEMS | SHARED

#: opcode name -> its byte, for every opcode the ``pickle`` module names.
OPS = {name: getattr(pickle, name)[0] for name in dir(pickle)
       if name.isupper() and isinstance(getattr(pickle, name), bytes) and len(getattr(pickle, name)) == 1}


class StackMachine:
    """The symbolic stack machine; see the module docstring. One instance per pickle.

    A subclass supplies the errors (:meth:`corrupt`, :meth:`unsafe`) and the loop that reads each
    opcode and calls its handler from :attr:`handlers`.

    Args:
        data: The whole pickle.
        classify: Flags (``HASHES_ARGS``, ``RESULT_HSAFE``) for the global ``module.name``.
        stack_flags: Flags for every STACK_GLOBAL, whose names are not known here.
    """

    def __init__(self, data: bytes, classify: Classify, stack_flags: int):
        self.data, self.classify, self.stack_flags = data, classify, stack_flags
        self.pos = 0
        # node id -> word: size << 16 | depth << 8 | flags. Scalars share two constant nodes.
        self.nodes = array("q", [_SCALAR_WORD, _WIDE_INT_WORD])
        self.stack = array("q")  # node ids
        self.memo = array("q")  # memo index -> node id
        self.marks: list[int] = []
        self.fence = 0  # the C unpickler's name: items below the last MARK are out of reach
        self.handlers: list[tuple[Callable[[object], bool | None], object] | None] = [None] * 256
        for name, (method, param) in _DISPATCH.items():
            self.handlers[OPS[name]] = (getattr(self, method), param)

    # -- errors and arguments ------------------------------------------------------------------

    # Each builds the error and returns it; the caller raises it (``raise self.corrupt(...)``), so that
    # every refusal reads as a raise where it happens.
    def corrupt(self, what: str) -> Exception:
        """The error for a malformed pickle: ``what`` is wrong at :attr:`pos`."""
        raise NotImplementedError

    def unsafe(self, what: str) -> Exception:
        """The error for a pickle built to hang or exhaust the reader, in the way ``what`` says."""
        raise NotImplementedError

    def over_cap(self, what: str) -> Exception:
        """The error for a pickle whose size or work passes a cap, as ``what`` says (default: :meth:`unsafe`)."""
        return self.unsafe(what)

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
            raise self.over_cap(f"builds an object of more than {MAX_EXPANDED:,} parts once shared parts are "
                              "counted each time they are used (an exponential \"billion laughs\" structure)")
        if depth > MAX_DEPTH:
            raise self.over_cap(f"nests objects more than {MAX_DEPTH} deep")
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
                nodes[i] = word | SHARED
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
        if target in (SCALAR, _WIDE_INT):
            raise self.unsafe("tries to change a number, string or empty tuple")
        if word & SHARED:  # its size is already counted in what references it
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
        self.stack.append(SCALAR)

    def h_int(self, arg: object) -> None:
        if arg == "line":  # INT or LONG as decimal text
            digits = len(self.line().rstrip(b"L").lstrip(b"+-"))
            wide, small = digits > 2.4 * MAX_INT_BYTES, digits <= 16
        else:
            nbytes = len(self.take(self.uint(*arg)))
            wide, small = nbytes > MAX_INT_BYTES, nbytes <= 7
        if wide:
            raise self.over_cap(f"holds an integer wider than {MAX_INT_BYTES * 8} bits")
        # Ints below 2**55 hash to themselves: no collisions. Wider ones collide modulo 2**61-1.
        self.stack.append(SCALAR if small else _WIDE_INT)

    def h_empty(self, arg: object) -> None:
        if arg == "tuple":  # () is immutable and hashes to a constant: a scalar
            self.stack.append(SCALAR)
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
        self.nodes[node] |= SHARED
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
            self.nodes[node] |= SHARED
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
