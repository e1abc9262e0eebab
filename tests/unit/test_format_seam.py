"""The format seam holds: outside ``read/``, no module branches on which format an input is.

What a format does differently (its claim, its reader, where it keeps assets, LoRA and rank files) is
declared on its :class:`~vllm_consolidate.read.registry.Format` record; callers ask the record. A new
``kind == "<format>"`` anywhere else is the per-format knowledge the registry exists to remove, so a
new format would have to touch that file too.
"""

from __future__ import annotations

import re
from pathlib import Path

from vllm_consolidate.read.hf import SHARDED, SINGLE
from vllm_consolidate.read.registry import FORMATS
from vllm_consolidate.source import LoraOutcome

SRC = Path(__file__).resolve().parents[2] / "src" / "vllm_consolidate"
#: Every word a reader gives as ``DetectedInput.kind`` or ``SourceModel.kind``.
FORMAT_WORDS = sorted({k for f in FORMATS for k in (*f.kinds, str(f.kind))} | {SINGLE, SHARDED}
                      | {str(w) for w in LoraOutcome})
_WORD = "|".join(map(re.escape, FORMAT_WORDS))
#: ``kind == "dcp"``, ``kind != 'verl'``, ``kind in ("deepspeed", ...)``, ``kind == InputKind.PEFT``,
#: ``kind in TRAINING_KINDS``, ``kind.startswith("hf_")``.
BRANCH = re.compile(
    rf"""kind\s*(?:==|!=)\s*(?:["'](?:{_WORD})["']|InputKind\.)"""
    rf"""|kind\s+(?:not\s+)?in\s*(?:\([^)]*["'](?:{_WORD})["']|[\w.]*TRAINING_KINDS|[\w.]*InputKind)"""
    r"""|kind\.startswith\(\s*["']hf"""
)


def branches(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if BRANCH.search(line)]


def test_no_format_branch_outside_read() -> None:
    found = {str(p.relative_to(SRC)): hits for p in sorted(SRC.rglob("*.py"))
             if p.relative_to(SRC).parts[0] != "read" and (hits := branches(p.read_text()))}
    assert not found, f"branch on a format outside read/ (ask its read.registry.Format instead): {found}"


def test_the_rule_sees_branches() -> None:
    """The pattern catches the shapes a format branch takes (else the test above could not fail)."""
    for line in ['if detected.kind == "deepspeed":', "x = source.kind != 'verl'", 'if kind in ("dcp", "verl"):',
                 "if source.kind in detection.TRAINING_KINDS:", "if d.kind == InputKind.PEFT:",
                 'if conv.source.kind == "hf_single" and y:', 'adapter = conv.source.kind == "lora_adapter"']:
        assert branches(line), line
    for line in ['if ev.kind == EventKind.DONE:', 'if report.kind == "folder":', 'if inp.kind == "checkpoint":']:
        assert not branches(line), line


#: The calls that turn "which input" into a model: only ``plan/inputs.py`` makes them (convert, inspect,
#: validate --against and the vLLM load format all go through it), so the steps cannot drift apart again.
PIPELINE = re.compile(r"\b(?:detection\.detect|detection\.read|merge_lora|adapter_export)\(")


def test_one_input_pipeline() -> None:
    found = {str(p.relative_to(SRC)): [ln.strip() for ln in p.read_text().splitlines()
                                       if PIPELINE.search(ln) and not ln.lstrip().startswith("def ")]
             for p in sorted(SRC.rglob("*.py")) if p.relative_to(SRC).as_posix() != "plan/inputs.py"}
    assert not {k: v for k, v in found.items() if v}, "detect/read/LoRA outside plan.inputs (use open_input)"
    assert PIPELINE.search("    source = detection.read(detected, opts.model_key)")
