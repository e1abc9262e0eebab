"""The vLLM load format ``consolidate`` (issue 16): serve a ZeRO checkpoint with no consolidated copy.

The ``vllm``-marked tests share ONE run of real vLLM (``.venv-vllm``, found like the other load tests),
driven by the script :data:`DRIVER`, so vLLM is imported once for all of them. In that process,
in order:

1. the broken-API checks: with ``register_model_loader`` removed, vLLM's own plugin loading
   (``load_general_plugins``, through our installed entry point) and a second ``register()`` give one
   warning and no ``consolidate`` format; then with ``BaseModelLoader.load_weights`` taking other
   parameters, the same. A plain folder still loads afterwards (the plugin never breaks vLLM), and
   vLLM's plugin loading then registers the format through the entry point;
2. for each real DeepSpeed checkpoint (ZeRO-2 and ZeRO-3, tied and untied, an HF Trainer
   ``checkpoint-N`` and a run folder), vLLM on the folder ``vllm-consolidate convert`` wrote, then
   vLLM with ``load_format="consolidate"`` on the checkpoint itself; greedy tokens, their top
   logprobs, every prompt position's top logprobs and a digest of every parameter and buffer must be
   identical;
3. the errors: a checkpoint with a rank file missing (through ``LLM()`` and through the loader itself),
   and a raw engine save without config.json.

The parent snapshots every checkpoint tree before and after, and the driver snapshots its TMPDIR
around each load and reads ``/proc/self/io`` while the plugin streams: nothing may be written. The driver
exits as a server does (no ``os._exit``: atexit handlers run); no folder of ours is left in TMPDIR after it.

The remaining tests need no vLLM and run in the main venv.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from tests.corpus import build
from tests.test_e2e_vllm import vllm_python

from vllm_consolidate import cli
from vllm_consolidate.errors import (
    ConfigNotFoundError,
    ConsolidateError,
    CorruptCheckpointError,
    UnsupportedCheckpointError,
    UsageError,
)
from vllm_consolidate.serve import vllm_plugin as vp

PROMPTS = [[5, 17, 42, 99, 7], [200, 3, 3, 150], [64, 65, 66, 67, 68, 69]]
MAX_TOKENS = 8

#: (id, corpus case, path inside the case served with the plugin (and converted), dtype, what it covers).
#: Cases named ``trainer_fsdp_*`` / ``verl_*`` come from the FSDP corpus, the others from the DeepSpeed one.
CASES = [
    ("z3_tied_raw", "qwen2_z3_w2_bf16_tied", "ckpt", "bfloat16", "ZeRO-3 tied, raw engine save with config"),
    ("z2_tied_trainer_ckptN", "trainer_qwen2_z2_bf16", "run/checkpoint-6", "bfloat16",
     "ZeRO-2 tied, HF Trainer checkpoint-N"),
    ("z3_untied_trainer_run", "trainer_llama_z3_bf16", "run", "float32",
     "ZeRO-3 untied, HF Trainer run folder (latest checkpoint-N; config found in it), fp32 copy path"),
    ("z2_untied_raw_no_tokenizer", "llama_big_z2_w2_bf16", "ckpt", "bfloat16",
     "ZeRO-2 untied 74M llama, no tokenizer (skip_tokenizer_init)"),
    ("dcp_fsdp_trainer_run", "trainer_fsdp_qwen2_tied", "run", "bfloat16",
     "HF Trainer FSDP2 run folder: DCP shards, tied"),
    ("verl_tied", "verl_qwen2_w2_tied", "ckpt", "bfloat16",
     "verl FSDP2 run: config and tokenizer only in global_step_N/actor/huggingface"),
]
NO_TOKENIZER = {"z2_untied_raw_no_tokenizer"}

DRIVER = r'''
import gc, hashlib, json, logging, os, sys, time, traceback
T0 = time.monotonic()
from types import SimpleNamespace

out_fd = os.dup(1)
os.dup2(2, 1)
sys.stdout = sys.stderr
for key, value in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                   "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                   "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)
request = json.loads(sys.stdin.read())
import tempfile
TMP = tempfile.gettempdir()

import vllm
from vllm import LLM, SamplingParams
import vllm.model_executor.model_loader as ml
import vllm.plugins
from vllm_consolidate.serve import vllm_plugin as vp

# Warnings of register() (checked before any engine starts: vLLM's logging set-up in create_engine_config
# drops the handlers of its child loggers, ours included; errors are checked in stderr instead).
records = []
class Capture(logging.Handler):
    def emit(self, record):
        records.append((record.levelname, record.getMessage()))
logging.getLogger("vllm.consolidate").addHandler(Capture())


def registered():
    return "consolidate" in ml._LOAD_FORMAT_TO_MODEL_LOADER


def broken_api():
    result = {}
    saved = ml.register_model_loader
    del ml.register_model_loader
    try:
        vllm.plugins.load_general_plugins()  # vLLM's own path: our entry point's register()
        vp.register()
    finally:
        ml.register_model_loader = saved
    result["missing_register"] = {"registered": registered(), "warnings": [m for lvl, m in records if lvl == "WARNING"]}
    records.clear()
    vp._state.update(registered=False, warned=False)
    saved_base = ml.BaseModelLoader

    class OtherBase(saved_base):
        def load_weights(self, model):  # another signature than the one the plugin implements
            pass

    ml.BaseModelLoader = OtherBase
    try:
        vp.register()
        vp.register()
    finally:
        ml.BaseModelLoader = saved_base
    result["other_signature"] = {"registered": registered(), "warnings": [m for lvl, m in records if lvl == "WARNING"]}
    records.clear()
    vp._state.update(registered=False, warned=False)
    return result


def tmp_files():
    found = set()
    for root, dirs, files in os.walk(TMP):
        found.update(os.path.relpath(os.path.join(root, f), TMP) for f in files)
    return found


def write_bytes():
    for line in open("/proc/self/io"):
        if line.startswith("write_bytes:"):
            return int(line.split()[1])


streamed = {}
original_iter = vp.iter_weights
def watched_iter(*args, **kwargs):
    before = write_bytes()
    n = 0
    for item in original_iter(*args, **kwargs):
        n += 1
        yield item
    streamed.update(tensors=n, write_bytes=write_bytes() - before)
vp.iter_weights = watched_iter


def digest(model):
    import torch
    out = {}
    items = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in items:
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out[name] = [str(t.dtype), list(t.shape), hashlib.sha256(data).hexdigest()]
    return out


def top(logprobs):
    return None if logprobs is None else [
        None if pos is None else sorted([int(t), float(lp.logprob)] for t, lp in pos.items()) for pos in logprobs]


def chained(exc):
    return exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__)


def load(job):
    streamed.clear()
    before = tmp_files()
    result = {"id": job["id"]}
    t = time.monotonic()
    try:
        llm = LLM(**job["llm"])
    except Exception as exc:
        result.update(ok=False, error_type=type(exc).__name__, error=str(exc),
                      traceback="".join(traceback.format_exception(exc)),
                      chained=chained(exc), seconds=round(time.monotonic() - t, 2))
        gc.collect()
        result["new_tmp_files"] = sorted(tmp_files() - before)
        return result
    result["load_seconds"] = round(time.monotonic() - t, 2)
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True, detokenize=False,
                            logprobs=5, prompt_logprobs=5)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]], params, use_tqdm=False)
    mc = llm.llm_engine.model_config
    result.update(
        ok=True, dtype=str(mc.dtype), hf_config_path=mc.hf_config_path, tokenizer=mc.tokenizer,
        tokens=[list(o.outputs[0].token_ids) for o in outs],
        logprobs=[top(o.outputs[0].logprobs) for o in outs],
        prompt_logprobs=[top(o.prompt_logprobs) for o in outs],
        digest=llm.apply_model(digest)[0],
        streamed=dict(streamed),
    )
    del llm, outs
    gc.collect()
    result["seconds"] = round(time.monotonic() - t, 2)
    result["new_tmp_files"] = sorted(tmp_files() - before)
    return result


def loader_error(job):
    from vllm.config.load import LoadConfig
    loader = ml.get_model_loader(LoadConfig(load_format="consolidate"))
    try:
        loader.download_model(SimpleNamespace(model=job["model"]))
    except Exception as exc:
        return {"id": job["id"], "ok": False, "error_type": type(exc).__name__, "error": str(exc),
                "traceback": "".join(traceback.format_exception(exc)),
                "chained": chained(exc)}
    return {"id": job["id"], "ok": True}


results = {"vllm_version": vllm.__version__, "import_seconds": round(time.monotonic() - T0, 2),
           "broken_api": broken_api(), "jobs": []}
for job in request["jobs"]:
    if job["kind"] == "register":
        vllm.plugins.plugins_loaded = False  # as in a fresh vLLM process: through the installed entry point
        vllm.plugins.load_general_plugins()
        results["jobs"].append({"id": job["id"], "registered": registered()})
    elif job["kind"] == "load":
        results["jobs"].append(load(job))
    else:
        results["jobs"].append(loader_error(job))
data = (json.dumps(results) + "\n").encode()
while data:
    data = data[os.write(out_fd, data):]
sys.stderr.flush()
# Ends as a served process does: an ordinary interpreter exit, so atexit handlers run (the plugin's private
# folders are removed by one) and the parent can check nothing of ours is left in TMPDIR.
'''


def _snapshot(root: Path) -> dict[str, Any]:
    """Every entry under ``root``: kind, size, mtime and (for files up to 16 MiB) a content hash."""
    out: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        entry: list[Any] = [oct(st.st_mode), st.st_size, st.st_mtime_ns]
        if path.is_file() and not path.is_symlink() and st.st_size <= 16 * 2**20:
            entry.append(hashlib.sha256(path.read_bytes()).hexdigest())
        out[str(path.relative_to(root))] = entry
    return out


def _cli_error_line(input_path: Path, output: Path) -> str:
    """What ``vllm-consolidate convert`` prints for this input (``error:``/``hint:`` lines), as one line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.convert_main(["--input", str(input_path), "--output", str(output)])
    assert code != 0
    lines = [ln for ln in err.getvalue().splitlines() if ln.startswith(("error: ", "hint: "))]
    assert lines and lines[0].startswith("error: "), err.getvalue()
    return "; ".join(lines)


def run_driver(python: str, jobs: list[dict[str, Any]], tmpdir: Path, *, pythonpath: str | None = None,
               timeout: float = 1800) -> tuple[dict[str, Any], str]:
    """Run :data:`DRIVER` once over ``jobs`` in the vLLM interpreter ``python``; its results and its stderr.

    The child's TMPDIR is ``tmpdir`` (the tests look there for files left behind). ``PYTHONPATH``,
    ``PYTHONHOME`` and ``VIRTUAL_ENV`` of this process are not inherited (they name the main venv);
    ``pythonpath`` puts a checkout's ``src`` first. Fails the test, with vLLM's stderr, if the driver fails.
    The driver exits normally (its ``atexit`` handlers run, as when a server shuts down).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["TMPDIR"] = str(tmpdir)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    payload = json.dumps({"jobs": jobs, "prompts": PROMPTS, "max_tokens": MAX_TOKENS})
    proc = subprocess.run([python, "-c", DRIVER], input=payload, capture_output=True, text=True, env=env,
                          timeout=timeout)
    if proc.returncode != 0 or not proc.stdout.strip():
        pytest.fail(f"the vLLM driver failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}", pytrace=False)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture(scope="module")
def plugin_run(corpus: dict[str, Path], fsdp_corpus: dict[str, Path],
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Convert the cases, break a copy of one, and run :data:`DRIVER` once over all of them."""
    python = vllm_python()
    cases = {**fsdp_corpus, **corpus}
    work = tmp_path_factory.mktemp("vllm_plugin")
    jobs: list[dict[str, Any]] = []
    common = {"enforce_eager": True, "max_model_len": 128, "max_num_seqs": 4, "max_num_batched_tokens": 256,
              "seed": 0, "distributed_executor_backend": "uni"}
    served: dict[str, Path] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # the default base model must not be looked up online
        for case_id, name, rel, dtype, _ in CASES:
            source = cases[name] / rel
            folder = work / f"{case_id}_converted"
            assert cli.convert_main(["--input", str(source), "--output", str(folder), "--dtype", dtype]) == 0
            extra = {"skip_tokenizer_init": True} if case_id in NO_TOKENIZER else {}
            if case_id == "z3_tied_raw":
                # First load after the broken-API checks: vLLM still serves a folder.
                jobs.append({"kind": "load", "id": f"{case_id}:folder",
                             "llm": {**common, **extra, "model": str(folder), "dtype": dtype}})
                jobs.append({"kind": "register", "id": "register"})
            else:
                jobs.append({"kind": "load", "id": f"{case_id}:folder",
                             "llm": {**common, **extra, "model": str(folder), "dtype": dtype}})
            jobs.append({"kind": "load", "id": f"{case_id}:plugin",
                         "llm": {**common, **extra, "model": str(source), "dtype": dtype,
                                 "load_format": vp.LOAD_FORMAT}})
            served[case_id] = source

        broken = work / "missing_rank" / "ckpt"
        shutil.copytree(corpus["qwen2_z3_w2_bf16_tied"] / "ckpt", broken)
        (broken / "global_step2" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
        expected_missing_rank = _cli_error_line(broken, work / "never_written")
        no_config = corpus["llama_z2_w2_bf16"] / "ckpt"
    plugin = {**common, "load_format": vp.LOAD_FORMAT}
    jobs += [
        {"kind": "load", "id": "missing_rank:llm", "llm": {**plugin, "model": str(broken)}},
        {"kind": "loader_error", "id": "missing_rank:loader", "model": str(broken)},
        {"kind": "load", "id": "no_config:llm", "llm": {**plugin, "model": str(no_config)}},
    ]

    trees = [cases[name] for _, name, *_ in CASES] + [broken.parent, corpus["llama_z2_w2_bf16"]]
    before = {str(t): _snapshot(t) for t in trees}
    tmpdir = work / "tmpdir"
    tmpdir.mkdir()
    results, stderr = run_driver(python, jobs, tmpdir, timeout=1800)
    results["by_id"] = {job["id"]: job for job in results["jobs"]}
    results["trees_before"] = before
    results["trees_after"] = {str(t): _snapshot(t) for t in trees}
    results["tmp_files_after"] = sorted(str(p.relative_to(tmpdir)) for p in tmpdir.rglob("*") if p.is_file())
    results["tmp_after"] = sorted(str(p.relative_to(tmpdir)) for p in tmpdir.rglob("*"))  # folders too
    results["expected_missing_rank"] = expected_missing_rank
    results["served"] = {k: str(v) for k, v in served.items()}
    results["stderr"] = stderr
    return results


@pytest.mark.vllm
@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_plugin_serves_what_the_consolidated_folder_serves(plugin_run: dict[str, Any], case_id: str) -> None:
    by_id = plugin_run["by_id"]
    folder, plugin = by_id[f"{case_id}:folder"], by_id[f"{case_id}:plugin"]
    assert folder["ok"], folder.get("traceback")
    assert plugin["ok"], plugin.get("traceback")
    dtype = next(c[3] for c in CASES if c[0] == case_id)
    assert plugin["dtype"] == folder["dtype"] == f"torch.{dtype}"
    assert plugin["tokens"] == folder["tokens"]
    assert all(len(t) == MAX_TOKENS for t in plugin["tokens"])
    assert plugin["logprobs"] == folder["logprobs"]
    assert plugin["prompt_logprobs"] == folder["prompt_logprobs"]
    assert plugin["digest"] == folder["digest"]
    assert len(plugin["digest"]) > 10
    # It really streamed (not vLLM's default loader), and wrote nothing while doing so.
    assert plugin["streamed"]["tensors"] > 10
    assert plugin["streamed"]["write_bytes"] == 0
    assert plugin["new_tmp_files"] == []


@pytest.mark.vllm
def test_run_folder_gets_config_and_tokenizer_from_its_latest_checkpoint(plugin_run: dict[str, Any]) -> None:
    plugin = plugin_run["by_id"]["z3_untied_trainer_run:plugin"]
    latest = Path(plugin_run["served"]["z3_untied_trainer_run"]) / "checkpoint-6"
    assert plugin["hf_config_path"] == str(latest)
    assert plugin["tokenizer"] == str(latest)
    # A checkpoint-N that has them is served as it is.
    direct = plugin_run["by_id"]["z2_tied_trainer_ckptN:plugin"]
    assert direct["hf_config_path"] is None
    assert direct["tokenizer"] == plugin_run["served"]["z2_tied_trainer_ckptN"]


def _assert_clean(error: dict[str, Any], expected: str) -> None:
    assert not error["ok"]
    assert error["error_type"] == "CheckpointLoadError"
    assert error["error"] == expected
    assert "\n" not in error["error"]
    assert not error["chained"]
    # No reader frames and no "During handling of the above exception" in what the user sees.
    assert "vllm_consolidate/read/" not in error["traceback"]
    assert "During handling" not in error["traceback"]
    assert "direct cause" not in error["traceback"]
    assert error["traceback"].rstrip().endswith(expected)


@pytest.mark.vllm
def test_missing_rank_is_our_one_line_message(plugin_run: dict[str, Any]) -> None:
    expected = plugin_run["expected_missing_rank"]
    assert "rank" in expected and expected.startswith("error: ") and "; hint: " in expected
    llm = plugin_run["by_id"]["missing_rank:llm"]
    _assert_clean(llm, expected)
    # Also logged as one line, in vLLM's format ("... ERROR <date> [vllm_plugin.py:N] error: ...").
    logged = [ln for ln in plugin_run["stderr"].splitlines() if ln.endswith(expected) and " ERROR " in ln]
    assert logged and "vllm_plugin.py" in logged[0]
    # The same error from inside the engine (the loader itself), e.g. when the engine runs elsewhere.
    _assert_clean(plugin_run["by_id"]["missing_rank:loader"], expected)


@pytest.mark.vllm
def test_raw_save_without_config_names_the_flags(plugin_run: dict[str, Any]) -> None:
    error = plugin_run["by_id"]["no_config:llm"]
    assert error["error"].startswith("error: no config.json in the checkpoint or its parent folders [")
    for flag in ("--hf-config-path", "--tokenizer", "vllm-consolidate convert"):
        assert flag in error["error"]
    _assert_clean(error, error["error"])


@pytest.mark.vllm
def test_plugin_leaves_no_file_behind(plugin_run: dict[str, Any]) -> None:
    assert plugin_run["trees_after"] == plugin_run["trees_before"]
    plugin_jobs = [job for job in plugin_run["jobs"] if job["id"].endswith((":plugin", ":llm", ":loader"))]
    for job in plugin_jobs:
        assert job.get("new_tmp_files", []) == [], job["id"]
    # What is left in TMPDIR is torch's own (inductor's precompiled headers), made by a plain folder load too.
    by_folder_loads = {f for job in plugin_run["jobs"] if job["id"].endswith(":folder") for f in job["new_tmp_files"]}
    assert set(plugin_run["tmp_files_after"]) <= by_folder_loads
    assert all(f.startswith("torchinductor_") for f in plugin_run["tmp_files_after"])
    # Nor a folder of ours (a private config folder, a mirror), after vLLM's process exited.
    assert not [f for f in plugin_run["tmp_after"] if f.startswith(("vllm-consolidate-", "vllmc"))], \
        plugin_run["tmp_after"]


@pytest.mark.vllm
def test_timings(plugin_run: dict[str, Any]) -> None:
    """Not a check: prints what each load took (``pytest -s``), for the record."""
    print(f"\nvLLM {plugin_run['vllm_version']}: import {plugin_run['import_seconds']} s")
    for job in plugin_run["jobs"]:
        print(f"  {job['id']:40} {job.get('seconds', '-')} s (LLM() {job.get('load_seconds', '-')} s)")


@pytest.mark.vllm
def test_broken_api_warns_once_and_does_not_register(plugin_run: dict[str, Any]) -> None:
    broken = plugin_run["broken_api"]
    for variant in ("missing_register", "other_signature"):
        assert broken[variant]["registered"] is False, variant
        assert len(broken[variant]["warnings"]) == 1, broken[variant]
        assert "not registered" in broken[variant]["warnings"][0]
    assert "register_model_loader" in broken["missing_register"]["warnings"][0]
    assert "load_weights" in broken["other_signature"]["warnings"][0]
    # vLLM went on serving a plain folder with the plugin unregistered, and registering later works.
    assert plugin_run["by_id"]["z3_tied_raw:folder"]["ok"]
    assert plugin_run["by_id"]["register"]["registered"] is True


# -- without vLLM --------------------------------------------------------------------------------------


def test_register_without_vllm_warns_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Where vLLM is missing (or fails to import), register() logs one warning and never raises."""
    import builtins

    real_import = builtins.__import__

    def no_vllm(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    monkeypatch.setattr(vp, "_state", {"registered": False, "warned": False})
    with caplog.at_level(logging.WARNING, logger="vllm.consolidate"):
        vp.register()
        vp.register()
    warnings = [r for r in caplog.records if r.name == "vllm.consolidate"]
    assert len(warnings) == 1
    assert "not registered" in warnings[0].getMessage()
    assert vp._state["registered"] is False


def test_api_problem_names_what_differs() -> None:
    class Base:
        def __init__(self, load_config): ...
        def download_model(self, model_config): ...
        def load_weights(self, model, model_config): ...
        def load_model(self, vllm_config, model_config, prefix=""): ...

    def register_model_loader(load_format): ...

    assert vp.api_problem(register_model_loader, Base) is None
    assert "register_model_loader" in vp.api_problem(None, Base)
    assert "BaseModelLoader" in vp.api_problem(register_model_loader, None)

    class Other(Base):
        def load_model(self, config): ...

    assert "load_model" in vp.api_problem(register_model_loader, Other)
    assert "load_format" in vp.api_problem(lambda fmt, extra: None, Base)


def test_loader_options() -> None:
    assert vp.loader_options(None) == vp.LoaderOptions()
    assert vp.loader_options({}) == vp.LoaderOptions()
    opts = vp.loader_options({"model_key": "ema", "checkpoint_dir": "/x", "type": "dcp"})
    assert opts == vp.LoaderOptions("dcp", Path("/x"), "ema")
    with pytest.raises(UsageError, match="unknown"):
        vp.loader_options({"num_threads": 4})
    with pytest.raises(UsageError):
        vp.loader_options("model_key=ema")


def test_one_line_is_the_cli_message() -> None:
    exc = CorruptCheckpointError("file ended\nearly", path="/ckpt/x.pt")
    assert vp.one_line(exc) == f"error: file ended early [/ckpt/x.pt]; hint: {exc.hint}"
    assert vp.one_line(ConsolidateError("plain")) == "error: plain"
    error = vp.CheckpointLoadError(exc)
    assert str(error) == vp.one_line(exc) and error.error is exc


def test_streamed_tensors_are_the_truth_cast_like_convert(corpus: dict[str, Path]) -> None:
    """Without vLLM: the generator yields every output tensor, fp32 bit-exact and bf16 cast as torch casts."""
    import torch
    from safetensors.torch import load_file

    name = "qwen2_z3_w2_bf16_tied"
    meta = build.load_case(name)
    truth = load_file(corpus[name] / meta["checkpoints"][-1]["truth"])
    checkpoint = vp.open_checkpoint(corpus[name] / meta["input"])
    config = json.loads((corpus[name] / meta["input"] / "config.json").read_text())
    tensors = vp.plan_tensors(checkpoint.source, config)
    assert "lm_head.weight" not in {t.name for t in tensors}  # tied: vLLM ties it itself
    for dtype in (torch.float32, torch.bfloat16):
        stats: dict[str, Any] = {}
        got = dict(vp.iter_weights(tensors, dtype, stats))
        assert set(got) == set(truth) - {"lm_head.weight"}
        for key, tensor in got.items():
            assert tensor.dtype == dtype and tensor.shape == truth[key].shape, key
            assert torch.equal(tensor, truth[key].to(dtype)), key
        assert stats["tensors"] == len(tensors)


def test_prepare_engine_args_fills_only_what_is_missing(corpus: dict[str, Path]) -> None:
    from types import SimpleNamespace

    run = corpus["trainer_llama_z3_bf16"] / "run"
    args = SimpleNamespace(model=str(run), hf_config_path=None, tokenizer=None, generation_config="auto",
                           skip_tokenizer_init=False, model_loader_extra_config={})
    changes = vp.prepare_engine_args(args)
    latest = str(run / "checkpoint-6")
    assert changes == {"hf_config_path": latest, "tokenizer": latest, "generation_config": latest}
    assert args.hf_config_path == latest
    # What the user passed wins; a folder that has everything is left alone.
    args = SimpleNamespace(model=str(run / "checkpoint-6"), hf_config_path=None, tokenizer="my/tok",
                           generation_config="auto", skip_tokenizer_init=False, model_loader_extra_config={})
    assert vp.prepare_engine_args(args) == {}
    # No tokenizer anywhere: the error says what to pass, unless vLLM will not need one.
    big = corpus["llama_big_z2_w2_bf16"] / "ckpt"
    args = SimpleNamespace(model=str(big), hf_config_path=None, tokenizer=None, generation_config="auto",
                           skip_tokenizer_init=False, model_loader_extra_config={})
    with pytest.raises(ConsolidateError, match="no tokenizer") as info:
        vp.prepare_engine_args(args)
    assert "--tokenizer" in info.value.hint
    args.skip_tokenizer_init = True
    assert vp.prepare_engine_args(args) == {}
    args = SimpleNamespace(model=str(corpus["llama_z2_w2_bf16"] / "ckpt"), hf_config_path=None, tokenizer=None,
                           generation_config="auto", skip_tokenizer_init=False, model_loader_extra_config={})
    with pytest.raises(ConfigNotFoundError) as info:
        vp.prepare_engine_args(args)
    assert "--hf-config-path" in info.value.hint


def test_lora_runs_are_refused_with_what_to_do(lora_corpus: dict[str, Path]) -> None:
    """A LoRA run needs a merge (computed tensors), not a stream: refused, naming convert and --enable-lora."""
    with pytest.raises(UnsupportedCheckpointError, match="LoRA") as info:
        vp.open_checkpoint(lora_corpus["lora_qwen2_z2_tied"] / "run")
    assert "vllm-consolidate convert" in info.value.hint and "--enable-lora" in info.value.hint


def test_serve_package_imports_without_vllm() -> None:
    code = ("import sys; import vllm_consolidate.serve.vllm_plugin; "
            "assert 'vllm' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the served path: vLLM's OpenAI server, its engine in another process ------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post_json(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return json.loads(response.read())


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, deadline_s: float) -> None:
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the vLLM server exited ({proc.returncode}) before it was ready:\n"
                        f"{log.read_text()[-6000:]}", pytrace=False)
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"the vLLM server was not ready after {deadline_s:.0f} s:\n{log.read_text()[-6000:]}", pytrace=False)


@pytest.mark.vllm
def test_openai_server_serves_a_run_folder(plugin_run: dict[str, Any], tmp_path: Path) -> None:
    """``python -m vllm.entrypoints.openai.api_server RUN --load-format consolidate``: as a user serves it.

    The API server process finds config and tokenizer through the plugin (the run folder has neither), the
    engine runs in its own process (vLLM's default), which loads the plugin through the entry point again.
    The greedy tokens equal those of ``LLM()`` on the folder ``convert`` wrote.
    """
    import signal

    run = Path(plugin_run["served"]["z3_untied_trainer_run"])
    expected = plugin_run["by_id"]["z3_untied_trainer_run:folder"]
    assert expected["ok"], expected.get("traceback")
    before = _snapshot(run)
    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    # The engine process talks to the API server over ZMQ sockets in TMPDIR, whose paths may not exceed 107 bytes
    # (sockaddr_un): pytest-xdist's tmp_path (.../popen-gw0/test_openai_server_serves_a_ru0/) is too long for them.
    tmpdir = Path(tempfile.mkdtemp(prefix="vc-srv-", dir="/tmp" if os.path.isdir("/tmp") else None))
    env.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TMPDIR": str(tmpdir)})
    cmd = [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(run),
           "--load-format", vp.LOAD_FORMAT, "--dtype", "float32", "--enforce-eager", "--max-model-len", "128",
           "--max-num-seqs", "4", "--seed", "0", "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "run"]
    log = tmp_path / "server.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}/health", log, deadline_s=600)
        tokens = []
        for prompt in PROMPTS:
            body = {"model": "run", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
                    "ignore_eos": True, "return_token_ids": True}
            reply = _post_json(f"http://127.0.0.1:{port}/v1/completions", body, timeout=120)
            tokens.append(reply["choices"][0]["token_ids"])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(tmpdir, ignore_errors=True)
    text = log.read_text()
    assert tokens == expected["tokens"]
    # It was our loader, in the engine process, and the checkpoint was only read.
    assert "consolidate: streamed" in text and "nothing written" in text
    assert _snapshot(run) == before


def test_quantization_is_refused_with_what_to_do(corpus: dict[str, Path]) -> None:
    """``--quantization`` with the load format fails before anything is read, naming convert --quantize."""
    from types import SimpleNamespace

    from vllm_consolidate.errors import UsageError
    from vllm_consolidate.serve import vllm_plugin as vp

    run = corpus["qwen2_z3_w2_bf16_tied"] / "ckpt"
    for method in ("fp8", "compressed-tensors"):
        args = SimpleNamespace(model=str(run), hf_config_path=None, tokenizer=None, generation_config="auto",
                               skip_tokenizer_init=False, model_loader_extra_config=None, quantization=method)
        with pytest.raises(UsageError) as err:
            vp.prepare_engine_args(args)
        line = vp.one_line(err.value)
        assert f"--quantization {method}" in line and "convert" in line and "--quantize" in line, line
    args.quantization = None
    assert vp.prepare_engine_args(args) == {}
