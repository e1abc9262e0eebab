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

The machine itself (node words and flags, what each opcode does to the stack and memo, the caps on
one object) is :mod:`.pickle_opcodes`; this module runs it over the bytes, counts the opcodes and
reports a refusal. The public names of both are imported from here.
"""

from __future__ import annotations

from vllm_consolidate.errors import CorruptCheckpointError, LimitExceededError, UnsafePickleError
from vllm_consolidate.formats.pickle_opcodes import (
    HASHES_ARGS,
    HSAFE,
    MAX_DEPTH,
    MAX_EXPANDED,
    MAX_INT_BYTES,
    OPS,
    RESULT_HSAFE,
    SCALAR,
    SHARED,
    Classify,
    StackMachine,
)

# The caps on one object (MAX_EXPANDED, MAX_DEPTH, MAX_INT_BYTES) are checked in pickle_opcodes as each
# node is built, and only re-exported here. The cap on opcodes is the loop's, and lives here.
#: Opcodes in one pickle. ``torch.save`` writes about 20 per tensor.
MAX_OPS = 2**23

_HINT = ("The file is built to make the reader hang or exhaust memory. Only convert checkpoints you trust; "
         "re-save this one with torch.save if it is yours.")


class _Scanner(StackMachine):
    """The pre-pass over one pickle: the opcode loop over :class:`StackMachine`, and its errors."""

    def __init__(self, data: bytes, classify: Classify, path: str, stack_flags: int):
        super().__init__(data, classify, stack_flags)
        self.path = path

    def corrupt(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"malformed pickle: {what} (at byte {self.pos})", path=self.path)

    def unsafe(self, what: str) -> UnsafePickleError:
        return UnsafePickleError(f"refused to load: the pickle {what}; a torch.save file never does", path=self.path,
                                 hint=_HINT)

    def over_cap(self, what: str) -> LimitExceededError:
        return LimitExceededError(f"refused to load: the pickle {what}; a torch.save file never does", path=self.path,
                                  hint=_HINT)

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
                    raise self.over_cap(f"has more than {MAX_OPS:,} opcodes")
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
                        nodes[node] |= SHARED
                        stack.append(node)
                        pos += 1 + width
                elif kind == 3:  # fixed-size scalars
                    pos += _SCALAR_SKIP[op]
                    stack.append(SCALAR)
                elif kind == 4:  # counted strings
                    width = _COUNTED_SKIP[op]
                    pos += 1 + width + int.from_bytes(data[pos + 1:pos + 1 + width], "little")
                    stack.append(SCALAR)
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


# Inline fast path of _Scanner.run: opcode -> bytes to skip (fixed-size scalars), or width of the length.
_SCALAR_SKIP = {OPS[n]: 1 + k for n, k in (("NONE", 0), ("NEWTRUE", 0), ("NEWFALSE", 0), ("EMPTY_TUPLE", 0),
                                           ("BININT1", 1), ("BININT2", 2), ("BININT", 4), ("BINFLOAT", 8))}
_COUNTED_SKIP = {OPS[n]: k for n, k in (("SHORT_BINUNICODE", 1), ("SHORT_BINBYTES", 1), ("SHORT_BINSTRING", 1),
                                        ("BINUNICODE", 4), ("BINBYTES", 4), ("BINUNICODE8", 8), ("BINBYTES8", 8))}
_BINPUT, _BINGET = OPS["BINPUT"], OPS["BINGET"]
#: opcode -> inline case of _Scanner.run (0: through the handlers).
_FAST = [0] * 256
for _code, _case in ((_BINPUT, 1), (OPS["LONG_BINPUT"], 1), (_BINGET, 2), (OPS["LONG_BINGET"], 2),
                     *((op, 3) for op in _SCALAR_SKIP), *((op, 4) for op in _COUNTED_SKIP), (OPS["MARK"], 5)):
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
        LimitExceededError: A cap in the module docstring is passed (opcodes, expanded size, depth, int width).
        UnsafePickleError: A rule in the module docstring is broken (hash flooding, memo order, self-reference).
        CorruptCheckpointError: The pickle is malformed (truncated, unknown opcode, stack underflow).
    """
    return _Scanner(data, classify, path, stack_flags).run()


__all__ = ["HASHES_ARGS", "HSAFE", "MAX_DEPTH", "MAX_EXPANDED", "MAX_INT_BYTES", "MAX_OPS", "RESULT_HSAFE",
           "scan_pickle"]
