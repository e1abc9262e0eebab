"""Validation of a peft adapter folder written by ``convert --lora adapter``.

An adapter folder is not a model: it has no ``config.json`` and no model skeleton to compare with.
What can be checked, and is: exactly one weights file whose header reads like ``safe_open`` reads
it, an ``adapter_config.json`` that passes the same checks a merge applies (LoRA, no DoRA...), and,
with a reference, every tensor against the checkpoint it came from (names and sampled values).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_consolidate.errors import ConsolidateError
from vllm_consolidate.read.hf import stored_bin, stored_safetensors
from vllm_consolidate.read.peft import ADAPTER_CONFIG, ADAPTER_FILES, read_lora_config
from vllm_consolidate.validate.report import FAIL, PASS, Check, ValidationReport
from vllm_consolidate.validate.source import compare_with_reference

if TYPE_CHECKING:
    from vllm_consolidate.validate.source import Reference


def validate_adapter_folder(path: str | os.PathLike[str], *, reference: Reference | None = None) -> ValidationReport:
    """Validate a peft adapter folder; see the module docstring.

    Returns:
        The report; ``report.ok`` is False when any check failed.
    """
    folder = Path(path)
    report = ValidationReport(folder)
    found = [folder / name for name in ADAPTER_FILES if (folder / name).is_file()]
    if len(found) != 1:
        report.checks.append(Check("adapter_files", FAIL, f"expected one of {', '.join(ADAPTER_FILES)}, found "
                                   f"{len(found)}"))
        return report
    try:
        listed = stored_safetensors(found[0]) if found[0].suffix == ".safetensors" else stored_bin(found[0])
    except ConsolidateError as exc:
        report.checks.append(Check("adapter_files", FAIL, f"{found[0].name}: {exc.message}"))
        return report
    stored = {t.name: t for t in listed}
    report.checks.append(Check("adapter_files", PASS, f"{found[0].name} holds {len(stored)} tensors"))
    try:
        config = read_lora_config(folder / ADAPTER_CONFIG)
    except ConsolidateError as exc:
        report.checks.append(Check("adapter_config", FAIL, exc.message))
    else:
        report.checks.append(Check("adapter_config", PASS, f"LoRA r={config.r}, lora_alpha={config.alpha:g}"
                                   + (", rsLoRA" if config.use_rslora else "")))
    if reference is not None:
        report.checks.extend(compare_with_reference(stored, reference))
    return report


__all__ = ["validate_adapter_folder"]
