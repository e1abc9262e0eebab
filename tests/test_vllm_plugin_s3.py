"""The load format ``consolidate`` on an object-store model (issue 27): ``--model s3://bucket/prefix``.

Against a real S3 endpoint on loopback (moto's server behind the counting proxy, ``tests/moto_s3.py``), with
the ZeRO-3 corpus checkpoint ``tests/test_vllm_plugin.py`` also serves from its local folder:

* in the main venv (no vLLM): the engine arguments are rewritten to a private folder holding only the
  config, generation config and tokenizer (byte-equal to the checkpoint's), the URL handed to the loader;
  the loader's tensors, streamed from the bucket, are bit-identical to those streamed from the local folder;
  a missing rank object, a missing config, a missing prefix and bad URLs fail in one line naming the URL.
* in real vLLM (ONE run of :data:`tests.test_vllm_plugin.DRIVER`): the same checkpoint served locally, from
  ``s3://`` and from ``az://`` (Azurite, tests/azurite.py; configured by the standard ``AZURE_STORAGE_*``
  environment) gives the same tokens, logprobs and parameter digests; the proxy saw the fp32 masters and
  metadata, never an Adam moment byte; nothing was written while streaming, no weight file reached disk, and
  the private folder of config and tokenizer was gone once vLLM's process had exited.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from tests import azurite
from tests.test_e2e_vllm import vllm_python
from tests.test_s3_input import _zero_layout
from tests.test_vllm_plugin import MAX_TOKENS, run_driver

from vllm_consolidate import cli
from vllm_consolidate.errors import ConfigNotFoundError, ConsolidateError, InputNotFoundError, UsageError
from vllm_consolidate.serve import vllm_plugin as vp
from vllm_consolidate.storage import remote

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the Hub
BUCKET = "plugin-input"
CASE = "qwen2_z3_w2_bf16_tied"
SRC_ROOT = Path(__file__).resolve().parents[1] / "src"
ASSETS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _engine_args(model: str, **kw: Any) -> SimpleNamespace:
    """What the plugin reads of vLLM's ``EngineArgs`` (their defaults), for calls without vLLM."""
    args = {"model": model, "hf_config_path": None, "tokenizer": None, "skip_tokenizer_init": False,
            "generation_config": "auto", "model_loader_extra_config": None, "quantization": None,
            "served_model_name": None}
    return SimpleNamespace(**{**args, **kw})


def _upload(s3: Any, folder: Path, prefix: str, skip: tuple[str, ...] = ()) -> str:
    """Upload ``folder`` (minus the relative paths in ``skip``) under ``prefix``; returns its URL."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in skip:
            s3.client.upload_file(str(path), BUCKET, f"{prefix}/{rel}")
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def served(s3: Any, corpus: dict[str, Path]) -> tuple[Path, str]:
    """The checkpoint's local folder and its URL in the bucket."""
    s3.client.create_bucket(Bucket=BUCKET)
    local = corpus[CASE] / "ckpt"
    return local, _upload(s3, local, f"runs/{uuid.uuid4().hex[:8]}/ckpt")


def _no_mirror_left() -> None:
    assert not remote._registry and not remote._open  # every listing was closed with its stand-ins


def _tensors(model: Path, options: Any, dtype: Any) -> dict[str, bytes]:
    """What the loader hands ``model.load_weights``: ``{name: bytes}`` (the config read from ``model``)."""
    import torch

    checkpoint = vp.open_checkpoint(model, options)
    try:
        tensors = vp.plan_tensors(checkpoint.source, json.loads((model / "config.json").read_text()))
        return {name: t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                for name, t in vp.iter_weights(tensors, dtype)}
    finally:
        checkpoint.close()


def test_an_s3_model_is_served_from_a_local_folder_of_its_config_and_tokenizer(served, s3):
    import torch

    local, url = served
    args = _engine_args(url, model_loader_extra_config={"storage_options": {"region": "us-east-1"}})
    changes = vp.prepare_engine_args(args)
    folder = Path(args.model)
    assert changes["model"] == str(folder) and folder.is_dir() and oct(folder.stat().st_mode)[-3:] == "700"
    assert args.served_model_name == url
    assert args.model_loader_extra_config == {"storage_options": {"region": "us-east-1"}, "input_url": url}
    assert args.hf_config_path is None and args.tokenizer is None  # vLLM finds them in the folder
    # Only what vLLM reads by name, each as the checkpoint holds it; no weight file, no stand-in.
    assert sorted(p.name for p in folder.rglob("*")) == sorted(ASSETS)
    assert json.loads((folder / "config.json").read_text()) == json.loads((local / "config.json").read_text())
    for name in ASSETS[1:]:
        assert (folder / name).read_bytes() == (local / name).read_bytes(), name
    _no_mirror_left()
    # The engine's loader, told the URL by the extra config, streams what it streams from the local folder.
    options = vp.loader_options(args.model_loader_extra_config)
    assert options.input_url == url and dict(options.storage_options) == {"region": "us-east-1"}
    s3.proxy.clear()
    from_s3 = _tensors(folder, options, torch.bfloat16)
    assert s3.proxy.gets()  # really read from the bucket
    _no_mirror_left()
    from_disk = _tensors(local, vp.loader_options(None), torch.bfloat16)
    assert len(from_s3) > 10 and from_s3 == from_disk


def _convert_error(url_or_path: str | Path, tmp_path: Path) -> tuple[int, str]:
    """``vllm-consolidate convert``'s exit code and its ``error:``/``hint:`` lines, as one line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["convert", "--input", str(url_or_path), "--output", str(tmp_path / "never")])
    lines = [ln for ln in err.getvalue().splitlines() if ln.startswith(("error: ", "hint: "))]
    return code, "; ".join(lines)


def _plugin_error(args: SimpleNamespace) -> ConsolidateError:
    with pytest.raises(ConsolidateError) as info:
        vp.prepare_engine_args(args)
    _no_mirror_left()
    return info.value


def test_a_missing_rank_object_is_converts_error_line_naming_the_url(served, s3, tmp_path):
    local, _ = served
    rank = "global_step2/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    url = _upload(s3, local, f"damaged/{uuid.uuid4().hex[:8]}/ckpt", skip=(rank,))
    error = _plugin_error(_engine_args(url))
    code, expected = _convert_error(url, tmp_path)
    assert code in (3, 4) and url in expected and "vllmc-mirror" not in expected  # as for the local folder
    assert vp.one_line(error) == expected
    assert str(vp.clean_error(error)) == expected  # what vLLM raises: CheckpointLoadError, one line


def test_missing_config_missing_prefix_and_bad_urls(served, s3, tmp_path):
    local, _ = served
    url = _upload(s3, local, f"noconfig/{uuid.uuid4().hex[:8]}/ckpt", skip=("config.json",))
    error = _plugin_error(_engine_args(url))
    assert isinstance(error, ConfigNotFoundError) and error.path == url and "--hf-config-path" in error.hint
    # A config named locally is enough; the tokenizer still comes from the bucket.
    args = _engine_args(url, hf_config_path=str(local))
    vp.prepare_engine_args(args)
    assert args.hf_config_path == str(local) and not (Path(args.model) / "config.json").exists()
    assert (Path(args.model) / "tokenizer.json").is_file()
    # The URL named as the tokenizer too (as `vllm serve URL --tokenizer URL` would) is the checkpoint's own.
    args = _engine_args(served[1], tokenizer=served[1])
    vp.prepare_engine_args(args)
    assert args.tokenizer is None and (Path(args.model) / "tokenizer.json").is_file()

    missing = f"s3://{BUCKET}/no/such/prefix"
    error = _plugin_error(_engine_args(missing))
    assert isinstance(error, InputNotFoundError) and error.path == missing
    assert _convert_error(missing, tmp_path) == (3, vp.one_line(error))

    for bad in ("s3://", "s3:///ckpt", f"s3://{BUCKET}/a/../ckpt", f"s3://{BUCKET}/a//ckpt"):
        error = _plugin_error(_engine_args(bad))
        # convert's argparse refuses these with the same message (exit 2)
        assert isinstance(error, UsageError) and repr(bad) in str(error), bad
        assert vp.one_line(error).startswith("error: ") and "\n" not in vp.one_line(error)
    for extra in ({"input_url": "/local/path"}, {"input_url": "s3://"}, {"storage_options": ["x"]},
                  {"input_url": f"s3://{BUCKET}/other"}):
        assert isinstance(_plugin_error(_engine_args(served[1], model_loader_extra_config=extra)), UsageError)


# -- real vLLM: ONE driver run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_s3_run(served: tuple[Path, str], s3: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run of the plugin test's driver: the checkpoint served from its folder, then from its s3:// URL and
    from its az:// URL (the same vLLM process: one more load, not another engine start-up)."""
    python = vllm_python()
    local, url = served
    with azurite.start() as az, pytest.MonkeyPatch.context() as mp:
        az.create_container(BUCKET)
        az_url = f"az://{BUCKET}/runs/ckpt"
        az.upload_folder(BUCKET, local, "runs/ckpt")
        for key, value in az.env.items():  # what the driver's vLLM process inherits
            mp.setenv(key, value)
        return {**_run(python, local, [("s3", url), ("az", az_url)], s3, tmp_path_factory), "az_url": az_url}


def _run(python: str, local: Path, urls: list[tuple[str, str]], s3: Any,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """:func:`run_driver` over the local folder, then each ``(id, url)``; what the tests check of it."""
    common = {"enforce_eager": True, "max_model_len": 128, "max_num_seqs": 4, "max_num_batched_tokens": 256,
              "seed": 0, "distributed_executor_backend": "uni", "dtype": "bfloat16", "load_format": vp.LOAD_FORMAT}
    jobs = [{"kind": "register", "id": "register"},  # after the driver's broken-API checks, as a vLLM process does
            {"kind": "load", "id": "local", "llm": {**common, "model": str(local)}},
            *({"kind": "load", "id": job_id, "llm": {**common, "model": url}} for job_id, url in urls)]
    tmpdir = tmp_path_factory.mktemp("vllm_s3") / "tmpdir"
    tmpdir.mkdir()
    s3.proxy.clear()
    # This checkout's code first (the venv's editable install may be another checkout's); AWS_* as set by `s3`,
    # AZURE_STORAGE_* by the caller.
    results, stderr = run_driver(python, jobs, tmpdir, pythonpath=str(SRC_ROOT), timeout=900)
    return {"by_id": {job["id"]: job for job in results["jobs"]}, "gets": s3.proxy.gets(), "stderr": stderr,
            "tmp_after": sorted(str(p.relative_to(tmpdir)) for p in tmpdir.rglob("*"))}  # folders too


def _served_as_local(run: dict[str, Any], job_id: str, url: str) -> dict[str, Any]:
    """The checks both stores share: job ``job_id`` (serving ``url``) gave what serving the local folder gave, wrote
    nothing while streaming, kept only the config and tokenizer on disk, and left nothing once vLLM exited."""
    by_id = run["by_id"]
    here, there = by_id["local"], by_id[job_id]
    assert here["ok"], here.get("traceback")
    assert there["ok"], there.get("traceback")
    for key in ("dtype", "tokens", "logprobs", "prompt_logprobs", "digest"):
        assert there[key] == here[key], key
    assert all(len(t) == MAX_TOKENS for t in there["tokens"]) and len(there["digest"]) > 10
    assert there["streamed"]["tensors"] == here["streamed"]["tensors"] > 10
    assert there["streamed"]["write_bytes"] == 0  # nothing written while the weights streamed
    # vLLM was given the private folder; our log lines name the URL, never the stand-in folder.
    assert Path(there["tokenizer"]).name.startswith("vllm-consolidate-model-")
    ours = [ln for ln in run["stderr"].splitlines() if "consolidate: " in ln and url in ln]
    assert any(f"from {url}/global_step2 " in ln and "nothing written" in ln for ln in ours), ours
    assert not [ln for ln in ours if "vllmc-mirror" in ln], ours
    # On disk: the config and tokenizer copies only, no stand-in left, no weight file ever...
    new = [Path(f) for f in there["new_tmp_files"]]
    assert new and all(f.parts[0].startswith("vllm-consolidate-model-") and f.name in ASSETS for f in new), new
    # ...and none of it once the process has exited (the folder is removed at exit).
    assert not [f for f in run["tmp_after"] if f.startswith(("vllm-consolidate-model-", "vllmc"))], run["tmp_after"]
    return there


@pytest.mark.vllm
def test_vllm_serves_an_az_checkpoint_as_it_serves_the_local_one(vllm_s3_run):
    there = _served_as_local(vllm_s3_run, "az", vllm_s3_run["az_url"])
    print(f"\naz load {there['seconds']} s, local {vllm_s3_run['by_id']['local']['seconds']} s")


@pytest.mark.vllm
def test_vllm_serves_an_s3_checkpoint_as_it_serves_the_local_one(vllm_s3_run, served):
    local, url = served
    there = _served_as_local(vllm_s3_run, "s3", url)
    here = vllm_s3_run["by_id"]["local"]
    # At the server: the fp32 masters (once) and metadata; never a byte of the Adam moments beside them.
    fp32, other, allowed = _zero_layout(local)
    prefix = "/" + BUCKET + "/" + url.split("/", 3)[3] + "/"
    read_fp32 = 0
    for get in vllm_s3_run["gets"]:
        rel = get.path.split("?")[0].removeprefix(prefix)
        span = get.span() or (0, get.body_bytes)
        for start, end in other.get(rel, []):
            assert span[1] <= start or span[0] >= end, f"{rel}: bytes {span} hold optimizer state, not masters"
        read_fp32 += sum(max(0, min(span[1], e) - max(span[0], s)) for s, e in fp32.get(rel, []))
    masters = sum(e - s for spans in fp32.values() for s, e in spans)
    total = sum(g.body_bytes for g in vllm_s3_run["gets"])
    print(f"\nGETs {len(vllm_s3_run['gets'])}: {total:,} bytes; fp32 masters {read_fp32:,} of {masters:,}; "
          f"allowed once {allowed:,}; s3 load {there['seconds']} s, local {here['seconds']} s")
    # Each master byte once, plus the 4 KiB a zip-record read takes beside them, per rank file and listing (2 x 2).
    assert masters <= read_fp32 <= masters + 2 * len(fp32) * 4096
    assert total <= allowed + (allowed - masters)  # the metadata twice (engine arguments, then the loader)
