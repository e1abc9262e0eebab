"""The vLLM load format ``consolidate`` on real Megatron-Core saves (issue 24): served as their converted folders.

One run of real vLLM (``.venv-vllm``, the package imported from this checkout) serves, for each input, the
folder ``vllm-consolidate convert`` wrote and then the input itself with ``load_format="consolidate"``; greedy
tokens, their top logprobs and a digest of every parameter must be identical. The inputs (TP=2, fp32):

* a Megatron-LM run (``latest_checkpointed_iteration.txt`` + ``iter_N/``) whose only config is the args in
  ``common.pt``: the plugin writes the config the reader built into a private temporary folder for vLLM, and
  reads the tokenizer from the run folder;
* a ``torch_dist`` folder with the model's config.json and tokenizer in it (vLLM reads them itself);
* a bare ``torch_dist`` folder (no config anywhere near it) served with vLLM's own ``hf_config_path`` and
  ``tokenizer`` naming a folder elsewhere: the reader takes the layout from that config, as ``convert
  --base-model-name`` does.

The checkpoints are copies; each tree is snapshotted before and after (nothing may change), and the private
config folder must be gone when the vLLM process has exited.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tests.corpus import megatron_build
from tests.test_vllm_plugin import _snapshot

import vllm_consolidate
from vllm_consolidate import cli
from vllm_consolidate.serve import vllm_plugin as vp

PROMPTS = [[5, 17, 42, 99, 7], [200, 3, 3, 150], [64, 65, 66, 67, 68, 69]]
MAX_TOKENS = 8
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

DRIVER = r'''
import hashlib, json, os, sys
out_fd = os.dup(1)
os.dup2(2, 1)
sys.stdout = sys.stderr
for key, value in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                   "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                   "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)
request = json.loads(sys.stdin.read())
import gc
from vllm import LLM, SamplingParams


def digest(model):
    import torch
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out[name] = [str(t.dtype), list(t.shape), hashlib.sha256(data).hexdigest()]
    return out


def top(logprobs):
    return [sorted([int(t), float(lp.logprob)] for t, lp in pos.items()) for pos in logprobs]


results = []
for job in request["jobs"]:
    llm = LLM(**job["llm"])
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]], params, use_tqdm=False)
    mc = llm.llm_engine.model_config
    hf_config_path = mc.hf_config_path
    results.append({"id": job["id"], "tokens": [list(o.outputs[0].token_ids) for o in outs],
                    "logprobs": [top(o.outputs[0].logprobs) for o in outs], "digest": llm.apply_model(digest)[0],
                    "hf_config_path": hf_config_path, "tokenizer": mc.tokenizer, "dtype": str(mc.dtype),
                    "config_present": bool(hf_config_path) and os.path.isdir(hf_config_path)})
    del llm, outs
    gc.collect()
data = (json.dumps(results) + "\n").encode()
while data:
    data = data[os.write(out_fd, data):]
sys.stderr.flush()
'''  # ends normally (no os._exit): the plugin's exit handler must remove its private config folder


def _inputs(work: Path) -> dict[str, Path]:
    """Copies of two TP=2 cases laid out as users keep them: ``{id: path served}``."""
    run_case = megatron_build.build_all(["mcore_lm_run_llama_tp2"])["mcore_lm_run_llama_tp2"]
    dist_case = megatron_build.build_all(["mcore_llama_tp2_fp32"])["mcore_llama_tp2_fp32"]
    run = work / "lm" / "run"
    shutil.copytree(run_case / "run", run)
    for name in TOKENIZER_FILES:  # a tokenizer in the run folder, and no config.json anywhere
        shutil.copy(run_case / "hf" / name, run / name)
    dist = work / "dist" / "ckpt"
    shutil.copytree(dist_case / "ckpt", dist)
    for path in (dist_case / "hf").iterdir():  # config.json, tokenizer, generation config beside the shards
        shutil.copy(path, dist / path.name)
    bare = work / "bare" / "ckpt"
    shutil.copytree(dist_case / "ckpt", bare)
    shutil.copytree(dist_case / "hf", work / "elsewhere" / "hf")
    return {"lm_run_args_config": run, "torch_dist_config_beside": dist, "torch_dist_bare": bare}


#: Engine arguments of an input beyond the common ones: its config and tokenizer named with vLLM's own options.
def _engine_extra(case_id: str, work: Path) -> dict[str, str]:
    hf = str(work / "in" / "elsewhere" / "hf")
    return {"hf_config_path": hf, "tokenizer": hf} if case_id == "torch_dist_bare" else {}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tests.test_e2e_vllm import vllm_python

    python = vllm_python()
    work = tmp_path_factory.mktemp("vllm_megatron")
    inputs = _inputs(work / "in")
    common = {"enforce_eager": True, "max_model_len": 128, "max_num_seqs": 4, "max_num_batched_tokens": 256,
              "seed": 0, "distributed_executor_backend": "uni", "dtype": "float32"}
    jobs = []
    for case_id, source in inputs.items():
        folder = work / f"{case_id}_converted"
        extra = _engine_extra(case_id, work)
        base = extra.get("hf_config_path", "")
        assert cli.convert_main(["--input", str(source), "--output", str(folder), "--base-model-name", base]) == 0
        jobs.append({"id": f"{case_id}:folder", "llm": {**common, "model": str(folder)}})
        jobs.append({"id": f"{case_id}:plugin", "llm": {**common, **extra, "model": str(source),
                                                        "load_format": vp.LOAD_FORMAT}})
    before = _snapshot(work / "in")
    tmpdir = work / "tmpdir"
    tmpdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV")}
    env.update(TMPDIR=str(tmpdir), PYTHONPATH=str(Path(vllm_consolidate.__file__).parents[1]))  # this checkout
    proc = subprocess.run([python, "-c", DRIVER], capture_output=True, text=True, env=env, timeout=1800,
                          input=json.dumps({"jobs": jobs, "prompts": PROMPTS, "max_tokens": MAX_TOKENS}))
    if proc.returncode != 0 or not proc.stdout.strip():
        pytest.fail(f"the vLLM driver failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}", pytrace=False)
    results = {r["id"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    return {"results": results, "inputs": inputs, "tmpdir": tmpdir, "before": before,
            "after": _snapshot(work / "in"), "tmp_left": sorted(str(p) for p in tmpdir.rglob("*"))}


@pytest.mark.vllm
@pytest.mark.parametrize("case_id", ["lm_run_args_config", "torch_dist_config_beside", "torch_dist_bare"])
def test_megatron_input_serves_what_its_converted_folder_serves(served: dict[str, Any], case_id: str) -> None:
    folder, plugin = served["results"][f"{case_id}:folder"], served["results"][f"{case_id}:plugin"]
    assert [len(t) for t in plugin["tokens"]] == [MAX_TOKENS] * len(PROMPTS)
    assert plugin["tokens"] == folder["tokens"]
    assert plugin["logprobs"] == folder["logprobs"]
    assert plugin["digest"] == folder["digest"]
    assert plugin["dtype"] == folder["dtype"] == "torch.float32"


@pytest.mark.vllm
def test_args_config_is_written_to_a_private_folder_removed_at_exit(served: dict[str, Any]) -> None:
    run = served["results"]["lm_run_args_config:plugin"]
    inputs, tmpdir = served["inputs"], served["tmpdir"]
    assert Path(run["hf_config_path"]).parent == tmpdir and run["config_present"]
    assert run["tokenizer"] == str(inputs["lm_run_args_config"])  # vLLM's default: the run folder holds one
    dist = served["results"]["torch_dist_config_beside:plugin"]
    assert dist["hf_config_path"] in (None, str(inputs["torch_dist_config_beside"]))  # vLLM's own default
    ours = Path(run["hf_config_path"]).name
    assert ours.startswith("vllm-consolidate-config-")
    assert not [p for p in served["tmp_left"] if ours in p]  # removed when vLLM's process exited (torch leaves its own)
    assert served["after"] == served["before"]  # the inputs were only read


def test_prepare_engine_args_writes_the_args_config_for_vllm(tmp_path: Path) -> None:
    """Without vLLM: the engine arguments of a Megatron-LM run point at a private config.json that transformers
    builds the model's class from (the args' config, in the stored precision); the tokenizer is vLLM's default."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    inputs = _inputs(tmp_path)
    run = inputs["lm_run_args_config"]
    args = SimpleNamespace(model=str(run), hf_config_path=None, tokenizer=None, skip_tokenizer_init=False,
                           generation_config="auto", model_loader_extra_config=None, quantization=None)
    changes = vp.prepare_engine_args(args)
    assert set(changes) == {"hf_config_path"} and args.tokenizer is None  # vLLM's default: the run, which has one
    folder = Path(args.hf_config_path)
    assert folder.name.startswith("vllm-consolidate-config-") and not folder.is_relative_to(tmp_path)
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    written = json.loads((folder / "config.json").read_text())
    case = megatron_build.build_all(["mcore_lm_run_llama_tp2"])["mcore_lm_run_llama_tp2"]
    own = json.loads((case / "hf" / "config.json").read_text())
    config = AutoConfig.from_pretrained(folder)
    assert type(config).__name__ == "LlamaConfig" and written["dtype"] == "float32"
    fields = ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
              "tie_word_embeddings")
    assert {k: getattr(config, k) for k in fields} == {k: own[k] for k in fields}


def test_bare_torch_dist_takes_its_layout_from_hf_config_path(tmp_path: Path) -> None:
    """Without vLLM: a bare ``torch_dist`` save has no config to read its names with; vLLM's ``--hf-config-path``
    (or the extra config's ``base_model_name``) gives it, and nothing else is changed. Without either: exit 8."""
    from types import SimpleNamespace

    from vllm_consolidate.cli.common import exit_code
    from vllm_consolidate.errors import ConsolidateError

    bare = _inputs(tmp_path)["torch_dist_bare"]
    hf = str(tmp_path / "elsewhere" / "hf")

    def args(**kw: Any) -> SimpleNamespace:
        base = dict(model=str(bare), hf_config_path=None, tokenizer=hf, skip_tokenizer_init=False,
                    generation_config="auto", model_loader_extra_config=None, quantization=None)
        return SimpleNamespace(**{**base, **kw})

    with pytest.raises(ConsolidateError) as info:
        vp.prepare_engine_args(args())
    assert exit_code(info.value) == 8
    given = args(hf_config_path=hf)
    # vLLM's config option is left as given; the generation config comes from that folder, as convert copies it
    assert vp.prepare_engine_args(given) == {"generation_config": hf} and given.hf_config_path == hf
    options = vp.with_config_base(vp.loader_options(None), hf)
    from vllm_consolidate.serve import weights

    assert weights._key(bare, options) in weights._prepared  # the engine's loader finds what was read, by its options
    named = args(model_loader_extra_config={"base_model_name": hf})
    # vLLM builds the model from that config too
    assert vp.prepare_engine_args(named) == {"hf_config_path": hf, "generation_config": hf}


def test_streamed_tp_tensors_are_the_truth() -> None:
    """Without vLLM: the generator yields a TP=2 run's tensors equal to the truth (fp32 bit-exact, bf16 cast as
    torch casts), its row-parallel weights (rows alternating the two rank files: many small ranges, one run per
    file) read gathered as ``convert`` reads them."""
    import torch
    from safetensors.torch import load_file

    from vllm_consolidate.read.gather import plan_gather

    name = "mcore_lm_run_llama_tp2"
    case = megatron_build.build_all([name])[name]
    truth = load_file(case / megatron_build.load_case(name)["checkpoints"][-1]["truth"])
    checkpoint = vp.open_checkpoint(case / "run")
    tensors = vp.plan_tensors(checkpoint.source, json.loads((case / "hf" / "config.json").read_text()))
    gathered = {t.name.split(".")[-2] for t in tensors if plan_gather(t.segments).worth_it}
    assert gathered == {"o_proj", "down_proj"}, gathered
    for dtype in (torch.float32, torch.bfloat16):
        got = dict(vp.iter_weights(tensors, dtype))
        assert set(got) == set(truth)
        for key, tensor in got.items():
            assert tensor.dtype == dtype and torch.equal(tensor, truth[key].to(dtype)), key
