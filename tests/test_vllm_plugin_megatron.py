"""The vLLM load format ``consolidate`` on real Megatron-Core saves (issue 24): served as their converted folders.

One run of real vLLM (``.venv-vllm``, the package imported from this checkout) serves, for each input, the
folder ``vllm-consolidate convert`` wrote and then the input itself with ``load_format="consolidate"``; greedy
tokens, their top logprobs and a digest of every parameter must be identical. The inputs (TP=2, fp32):

* a Megatron-LM run (``latest_checkpointed_iteration.txt`` + ``iter_N/``) whose only config is the args in
  ``common.pt``: the plugin writes the config the reader built into a private temporary folder for vLLM, and
  reads the tokenizer from the run folder;
* a ``torch_dist`` folder with the model's config.json and tokenizer in it (vLLM reads them itself).

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
    return {"lm_run_args_config": run, "torch_dist_config_beside": dist}


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
        assert cli.convert_main(["--input", str(source), "--output", str(folder), "--base-model-name", ""]) == 0
        jobs.append({"id": f"{case_id}:folder", "llm": {**common, "model": str(folder)}})
        jobs.append({"id": f"{case_id}:plugin", "llm": {**common, "model": str(source), "load_format": vp.LOAD_FORMAT}})
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
@pytest.mark.parametrize("case_id", ["lm_run_args_config", "torch_dist_config_beside"])
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
