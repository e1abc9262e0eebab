"""Validation of a model folder: would vLLM load exactly what the config describes?

vLLM is lenient in ways that turn a broken folder into a model that loads with exit code 0 and then
produces garbage: it does not complain about missing weights (they keep their uninitialised values),
it switches to Mistral's format when it sees ``consolidated*.safetensors``, it reads every
``*.safetensors`` file when there is no index, and it ignores ``.bin`` files next to safetensors. The
checks look for those and the usual suspects, from file headers and config alone plus one bounded
streaming pass over the tensor bytes.

Every check yields a :class:`Check` with status ``pass``, ``warn`` or ``fail``; a check that cannot
run (no transformers, unreadable config) is a ``warn`` whose message starts with ``skipped:``. The
checks run in the order of :data:`CHECKS`, one module per concern (each module's docstring gives its
checks and the decisions behind them):

:mod:`~vllm_consolidate.validate.files`
    ``weight_files``, ``index``, ``duplicate_tensors``, ``bin_format``, ``wrapper_prefixes``.
:mod:`~vllm_consolidate.validate.config`
    ``config``, ``architecture``, ``quantization_config``, ``vocab_size``, ``dtype``.
:mod:`~vllm_consolidate.validate.skeleton`
    ``missing_tensors``, ``unexpected_tensors``, ``tensor_shapes`` against a meta-device model.
:mod:`~vllm_consolidate.validate.values`
    ``empty_tensors``, ``tied_embeddings``, ``values`` (no NaN or Inf).
:mod:`~vllm_consolidate.validate.source` (only with a reference)
    ``source_tensors`` and ``source_values``: the folder against the checkpoint it was made from; the
    only check that catches a square weight stored transposed.
:mod:`~vllm_consolidate.validate.tokenizer`
    ``tokenizer``, ``tokenizer_roundtrip``, ``special_tokens``, ``chat_template``.
:mod:`~vllm_consolidate.validate.load` (only when asked: :func:`add_load_check`)
    ``vllm_load``: real vLLM's greedy tokens equal transformers'
    (:mod:`~vllm_consolidate.validate.greedy`).

Every check is a plain function of a :class:`~vllm_consolidate.validate.context.Context`; earlier
checks leave what they found in it for later ones, so the order of :data:`CHECKS` matters.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_consolidate.errors import ConsolidateError
from vllm_consolidate.read.assets import CONFIG_FILE, read_config
from vllm_consolidate.validate import config, files, quantized, skeleton, source, tokenizer, values
from vllm_consolidate.validate.adapter import validate_adapter_folder  # re-exported: convert uses it
from vllm_consolidate.validate.context import SCAN_CHUNK_BYTES, Context
from vllm_consolidate.validate.report import FAIL, PASS, WARN, Check, ValidationReport, skipped

if TYPE_CHECKING:
    from vllm_consolidate.validate.source import Reference

#: A check: reads and extends the context, returns its finding(s); a step that only prepares returns [].
CheckFunction = Callable[[Context], Check | list[Check]]

#: Every static check, in the order it runs: (the name a crash is reported under, the function).
CHECKS: tuple[tuple[str, CheckFunction], ...] = (
    ("weight_files", files.check_weight_files),  # fills ctx.stored
    ("index", files.check_index),
    ("duplicate_tensors", files.check_duplicates),
    ("bin_format", files.check_bin_format),
    ("config", config.check_config),  # fills ctx.config
    ("architecture", config.check_architecture),
    ("quantization_config", config.check_quantization),
    ("skeleton", skeleton.build_skeleton),  # fills ctx.skeleton, before vocab_size uses its embedding name
    ("vocab_size", config.check_vocab),
    ("dtype", config.check_dtype),
    ("wrapper_prefixes", files.check_prefixes),
    ("empty_tensors", values.check_empty),
    ("quantized_weights", quantized.check_layout),  # fills ctx.quant's weights, before the skeleton checks
    ("missing_tensors", skeleton.check_against_skeleton),
    ("tied_embeddings", values.check_tied),
    ("values", values.check_values),
    ("source_values", source.check_source),
    ("tokenizer", tokenizer.check_tokenizer),
)


def _run(ctx: Context, name: str, func: CheckFunction) -> list[Check]:
    """Run one check function; a crash becomes a failed check carrying the traceback."""
    try:
        result = func(ctx)
    except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
        result = Check(name, FAIL, f"the check crashed: {type(exc).__name__}: {exc}",
                       {"traceback": traceback.format_exc()})
    return result if isinstance(result, list) else [result]


def validate_folder(
    path: str | os.PathLike[str],
    *,
    scan_values: bool = True,
    load: bool = False,
    vllm_python: str | os.PathLike[str] | None = None,
    max_tokens: int = 8,
    chunk_bytes: int = SCAN_CHUNK_BYTES,
    reference: Reference | None = None,
    against: str | os.PathLike[str] | None = None,
) -> ValidationReport:
    """Validate a model folder for vLLM; see the module docstring for the checks.

    Args:
        path: The folder.
        scan_values: Read every floating-point tensor once, in bounded chunks, to find NaN and Inf.
        load: Also run the load tier (``vllm_load``), unless a static check already failed.
        vllm_python: Interpreter with vLLM for the load tier.
        max_tokens: Tokens per prompt for the load tier.
        chunk_bytes: Read size of the value scan.
        reference: The source the folder was made from; adds the ``source_tensors`` and
            ``source_values`` checks (:func:`vllm_consolidate.validate.source.reference_for_folder`).
        against: The source checkpoint (anything ``convert`` accepts as input), compared element for
            element; a shorthand for ``reference=reference_for_folder(path, against)``.

    Returns:
        The report; ``report.ok`` is False when any check failed.

    Raises:
        VllmUnavailableError: ``load`` and no interpreter with vLLM.
        VllmLoadError: ``load`` and vLLM failed to load or run the folder.
    """
    folder = Path(path)
    report = ValidationReport(folder)
    if not folder.is_dir():
        report.checks.append(Check("folder", FAIL, f"{folder} is not a folder"))
        return report
    if against is not None and reference is None:
        from vllm_consolidate.validate.source import reference_for_folder

        reference = reference_for_folder(folder, against)
    ctx = Context(folder, scan_values=scan_values, chunk_bytes=chunk_bytes, reference=reference)
    for name, func in CHECKS:
        report.checks.extend(_run(ctx, name, func))
    if load:
        add_load_check(report, python=vllm_python, max_tokens=max_tokens)
    return report


def _default_prompts(report: ValidationReport, config_path: Path) -> list[list[int]] | None:
    """None (the load tier's text prompts) when the tokenizer works; else a few token-id prompts below vocab_size."""
    tok = report.get("tokenizer")
    if tok is not None and tok.status == PASS:
        return None
    try:
        vocab = int(read_config(config_path).get("vocab_size") or 0)
    except (ConsolidateError, ValueError, TypeError):
        vocab = 0
    span = max(vocab, 8)
    return [[(i * 7 + j) % span for j in range(5)] for i in range(3)]


def load_check(folder: str | os.PathLike[str], *, python: str | os.PathLike[str] | None = None,
               max_tokens: int = 8, prompts: Any = None) -> Check:
    """The load tier as a check: real vLLM's greedy tokens must equal transformers'.

    Args:
        folder: The model folder.
        python: Interpreter with vLLM (``--vllm-python``); None means this one, if it has vLLM.
        max_tokens: Tokens generated per prompt.
        prompts: Texts or token-id lists; None uses :data:`vllm_consolidate.validate.load.DEFAULT_PROMPTS`.

    Returns:
        ``vllm_load`` pass or fail; on a mismatch the details carry both token lists.

    Raises:
        VllmUnavailableError: No interpreter with vLLM.
        VllmLoadError: vLLM failed to load or run the folder.
    """
    from vllm_consolidate.validate import load as vllm_load  # imported late: tests replace compare_load

    kwargs: dict[str, Any] = {"python": python, "max_tokens": max_tokens}
    if prompts is not None:
        kwargs["prompts"] = prompts
    result = vllm_load.compare_load(folder, **kwargs)
    mismatch = result.details.get("first_mismatch")
    margin = result.details.get("hf_min_logit_margin")
    version = result.details.get("vllm_version")
    details = {
        "equal": result.equal, "prompt_token_ids": result.prompt_token_ids, "vllm_tokens": result.vllm_tokens,
        "hf_tokens": result.hf_tokens, "dtype": result.dtype, "seconds": result.duration,
        "vllm_version": version, "first_mismatch": mismatch, "hf_min_logit_margin": margin,
    }
    if result.equal:
        return Check("vllm_load", PASS,
                     f"vLLM {version or '?'} loaded the folder; its greedy tokens equal transformers' "
                     f"({len(result.prompt_token_ids)} prompts x {max_tokens} tokens, {result.dtype})", details)
    mm = mismatch or {}
    return Check("vllm_load", FAIL,
                 f"vLLM {version or '?'} and transformers generate different tokens: prompt {mm.get('prompt_index')} "
                 f"from position {mm.get('position')}: vLLM {mm.get('vllm')} vs transformers {mm.get('hf')}"
                 + (f" (smallest transformers logit margin {margin:.3g})" if isinstance(margin, float) else ""),
                 details)


def add_load_check(report: ValidationReport, *, python: str | os.PathLike[str] | None = None,
                   max_tokens: int = 8) -> Check:
    """Append the ``vllm_load`` check to a static report (skipped when a static check failed).

    Args:
        report: The static report of the folder.
        python: Interpreter with vLLM.
        max_tokens: Tokens per prompt.

    Returns:
        The check appended.

    Raises:
        VllmUnavailableError: No interpreter with vLLM.
        VllmLoadError: vLLM failed to load or run the folder.
    """
    if report.ok:
        check = load_check(report.path, python=python, max_tokens=max_tokens,
                           prompts=_default_prompts(report, report.path / CONFIG_FILE))
    else:
        check = skipped("vllm_load", "static checks failed; fix them first")
    report.checks.append(check)
    return check


__all__ = [
    "CHECKS",
    "FAIL",
    "PASS",
    "WARN",
    "Check",
    "ValidationReport",
    "add_load_check",
    "load_check",
    "validate_adapter_folder",
    "validate_folder",
]
