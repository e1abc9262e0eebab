"""Standalone probe: load a model folder with real vLLM and greedy-generate tokens.

This file is NOT imported by the package. :mod:`vllm_consolidate.validate.load` runs it as a script
with an interpreter that has vLLM installed (often a separate venv), so it must only use the
standard library plus vLLM itself.

Protocol:
    Input is one JSON object on stdin::

        {"model": "/path/to/folder", "prompt_token_ids": [[1, 2, 3], ...],
         "max_tokens": 8, "dtype": "auto", "max_model_len": 256,
         "kv_cache_gib": 1, "seed": 0}

    ``prompt_token_ids`` may be replaced by ``prompts`` (a list of strings); they are then encoded
    with the folder's tokenizer and the resulting ids are reported.

    Output is exactly one JSON line on stdout::

        {"ok": true, "vllm_version": "...", "dtype": "torch.float32",
         "prompt_token_ids": [[...], ...], "output_token_ids": [[...], ...],
         "load_seconds": 12.3, "generate_seconds": 0.4}

    Everything vLLM prints goes to stderr: file descriptor 1 is pointed at stderr before vLLM is
    imported (so its worker processes inherit that too) and the result is written to a saved
    duplicate of the original stdout. On failure the exit code is non-zero, stderr has the
    traceback, and stdout carries ``{"ok": false, "stage": "...", "error": "...", "error_type": "..."}``
    where ``stage`` is ``request``, ``import`` (vLLM not importable), ``load`` or ``generate``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

#: Environment defaults that make vLLM behave on a small CPU-only machine. Existing values win.
CPU_ENV_DEFAULTS: dict[str, str] = {
    # Size of the KV cache in GiB; the default (4 GiB and more) is wasteful for a probe.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # Do not pin OpenMP threads to cores; with 2 cores the automatic binding is fragile.
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    # Run the engine core in this process instead of a spawned one: each extra process re-imports
    # vLLM (~10 s each on 2 cores); in-process the probe takes ~17 s instead of ~45 s.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # No usage statistics phoning home (there is no network anyway).
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    # Never try to reach the Hub for a local folder.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class _StageError(Exception):
    """Wraps a failure with the stage it happened in: ``import``, ``load`` or ``generate``."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(str(cause))
        self.stage = stage
        self.cause = cause


def _emit(out_fd: int, payload: dict[str, Any]) -> None:
    """Write one JSON line to the saved original stdout."""
    data = (json.dumps(payload) + "\n").encode()
    while data:
        written = os.write(out_fd, data)
        data = data[written:]


def _llm_kwargs(request: dict[str, Any]) -> dict[str, Any]:
    """``vllm.LLM`` arguments for a small, eager, single-process engine (the request's ``llm_kwargs`` win)."""
    max_model_len = int(request.get("max_model_len", 256))
    llm_kwargs: dict[str, Any] = {
        "model": request["model"],
        "dtype": request.get("dtype") or "auto",
        "enforce_eager": True,
        "max_model_len": max_model_len,
        "max_num_seqs": int(request.get("max_num_seqs", 4)),
        "max_num_batched_tokens": max(max_model_len, 256),
        "seed": int(request.get("seed", 0)),
        "trust_remote_code": bool(request.get("trust_remote_code", False)),
        # One worker in this process (no spawned worker process), see VLLM_ENABLE_V1_MULTIPROCESSING.
        "distributed_executor_backend": "uni",
    }
    llm_kwargs.update(request.get("llm_kwargs") or {})
    return llm_kwargs


def _run(request: dict[str, Any]) -> dict[str, Any]:
    """Load the model with vLLM and generate greedily for each prompt.

    Args:
        request: The decoded stdin request (see module docstring).

    Returns:
        The result payload (without the ``ok`` key).
    """
    t_import = time.monotonic()
    try:
        import vllm  # noqa: PLC0415  (must come after the fd redirect and env setup)
        from vllm import LLM, SamplingParams  # noqa: PLC0415
    except ImportError as exc:
        raise _StageError("import", exc) from exc

    import_seconds = time.monotonic() - t_import

    t_load = time.monotonic()
    try:
        llm = LLM(**_llm_kwargs(request))
    except Exception as exc:
        raise _StageError("load", exc) from exc
    load_seconds = time.monotonic() - t_load

    prompt_ids = request.get("prompt_token_ids")
    if prompt_ids is None:
        tokenizer = llm.get_tokenizer()
        prompt_ids = [list(tokenizer.encode(text, add_special_tokens=False)) for text in request["prompts"]]
    prompt_ids = [[int(t) for t in ids] for ids in prompt_ids]

    params = SamplingParams(
        temperature=0.0,
        max_tokens=int(request.get("max_tokens", 8)),
        ignore_eos=True,
        detokenize=False,
    )
    t_gen = time.monotonic()
    try:
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    except Exception as exc:
        raise _StageError("generate", exc) from exc
    generate_seconds = time.monotonic() - t_gen

    model_dtype = str(getattr(llm.llm_engine.model_config, "dtype", ""))
    return {
        "vllm_version": vllm.__version__,
        "dtype": model_dtype,
        "prompt_token_ids": [list(o.prompt_token_ids) for o in outputs],
        "output_token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "import_seconds": round(import_seconds, 3),
        "load_seconds": round(load_seconds, 3),
        "generate_seconds": round(generate_seconds, 3),
    }


def main() -> int:
    """Entry point: read the request on stdin, print one JSON line, return the exit code."""
    out_fd = os.dup(1)
    os.dup2(2, 1)  # vLLM and its worker processes print to (what they think is) stdout
    sys.stdout = sys.stderr
    for key, value in CPU_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        request = json.loads(sys.stdin.read())
        result = _run(request)
    except BaseException as exc:  # noqa: BLE001  (report every failure as JSON, then exit non-zero)
        traceback.print_exc(file=sys.stderr)
        stage = exc.stage if isinstance(exc, _StageError) else "request"
        cause = exc.cause if isinstance(exc, _StageError) else exc
        _emit(out_fd, {"ok": False, "stage": stage, "error_type": type(cause).__name__, "error": str(cause)})
        sys.stderr.flush()
        return 1
    _emit(out_fd, {"ok": True, **result})
    sys.stderr.flush()
    return 0


if __name__ == "__main__":
    code = main()
    # vLLM may leave non-daemon threads or engine processes behind; do not hang on them.
    os._exit(code)
