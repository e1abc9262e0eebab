"""``convert`` of LoRA / peft runs (default ``--lora merge``) against peft's own merge (issue 15).

The corpus (``tests/corpus/LORA_README.md``) holds real HF Trainer + peft runs under DeepSpeed ZeRO-2/3 and
plain peft folders, with ground truth = peft's ``merge_and_unload()`` of the fp32 master adapter on the fp32
base. Every comparison here is bit for bit (integer views of the tensors), over every key, with the dtype.

1. Each DeepSpeed LoRA run and the plain peft folder: fp32 output == merged truth of the latest checkpoint;
   ``--dtype bfloat16`` == truth rounded to bf16; ``--pytorch-bin`` == truth; the summary names the LoRA
   source, the module count and where config / tokenizer / generation config came from.
2. ``--checkpoint-dir run/checkpoint-2`` == checkpoint-2's merged truth.
3. A Trainer checkpoint copied without ``global_stepN/``: the 16-bit ``adapter_model.safetensors`` merged ==
   peft's merge of that same folder on the fp32 base, computed here with peft.
4. ``--base-model-name`` overrides the adapter's base.
5. Refusals (exact exit code, ``error:`` and ``hint:`` lines, nothing left behind).
6. ``inspect``, ``validate --against``, ``batch`` on LoRA runs.
7. Real vLLM (``.venv-vllm``) loads a merged folder and generates transformers' greedy tokens.

Conversions run in this process (``cli.main``), except the one whose base is found through the HF cache,
which runs as a fresh ``vllm-consolidate`` process with ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` in its
environment (huggingface_hub reads them at import, so only a fresh process tests the real path).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tests.corpus import lora_build
from tests.test_e2e_vllm import vllm_python

from vllm_consolidate import cli

pytestmark = pytest.mark.filterwarnings(
    "ignore:The PEFT config's `base_model_name_or_path` was renamed:UserWarning",
    "ignore:Model has `tie_word_embeddings=True` and a tied layer:UserWarning",
    "ignore:Setting `save_embedding_layers` to `True`:UserWarning",
    "ignore:Found missing adapter keys:UserWarning",
    "ignore:Model with `tie_word_embeddings=True` and the tied_target_modules:UserWarning",
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
)

REPO = Path(__file__).resolve().parents[1]
LORA = [s.name for s in lora_build.CASES.values() if s.kind == "lora" and s.name not in lora_build.RENAMED_CASES]
PLAIN = "peft_plain_qwen2"
MERGED = [*LORA, PLAIN]
HUB_CASE = "lora_qwen2_z2_tied"  # its adapter names the base by Hub id, resolved through <case>/hf_cache
ASSETS = {".vllm-consolidate.json", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "chat_template.jinja"}
FACTOR = re.compile(r"\.lora_(?:A|B|embedding_A|embedding_B)(?:\.|$)")
FIRST_FACTOR = re.compile(r"\.lora_(?:A|embedding_A)(?:\.|$)")
REPLACED = "tensors (modules_to_save, biases, saved base layers)"


# --------------------------------------------------------------------------- helpers


@functools.cache
def _meta(name: str) -> dict[str, Any]:
    return lora_build.load_case(name)


def _source(cdir: Path) -> Path:
    """What ``--input`` gets: the run folder, or the plain peft folder."""
    return cdir / _meta(cdir.name)["input"]


def _truth(cdir: Path, kind: str = "merged", tag: str | None = None) -> dict[str, torch.Tensor]:
    entries = _meta(cdir.name)["checkpoints"]
    (entry,) = [e for e in entries if e["tag"] == tag] if tag else entries[-1:]
    return load_file(str(cdir / entry[f"{kind}_truth"]))


def _base_dir(cdir: Path) -> Path:
    """The base folder the tool resolves for the case (the HF-cache snapshot for the Hub-id case)."""
    meta = _meta(cdir.name)
    if meta["hf_cache"]:
        repo = "models--" + meta["base_name_or_path"].replace("/", "--")
        return cdir / meta["hf_cache"] / repo / "snapshots" / meta["hf_cache_commit"]
    return cdir / meta["base_dir"]


def base_args(cdir: Path) -> list[str]:
    """``--base-model-name <case>/base`` for a case whose adapter names its base by a local path: a path in
    ``adapter_config.json`` is never followed (issue 22), the user names the base. None for the Hub-id case."""
    return [] if _meta(cdir.name)["hf_cache"] else ["--base-model-name", str(cdir / _meta(cdir.name)["base_dir"])]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 1: torch.uint8, 8: torch.int64}[t.element_size()])


def max_ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two float32 (or bf16) tensors of one shape."""

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = _bits(t).to(torch.int64)
        sign = 1 << (8 * t.element_size() - 1)
        return torch.where(i < 0, -(i & (sign - 1)), i)  # two's complement -> one monotonic integer line

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def assert_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same keys, and per key the same dtype, shape and bits."""
    assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))
    bad = []
    for k, w in want.items():
        g = got[k]
        if g.dtype != w.dtype or g.shape != w.shape:
            bad.append(f"{k}: {g.dtype} {tuple(g.shape)} != {w.dtype} {tuple(w.shape)}")
        elif not torch.equal(_bits(g), _bits(w)):
            n = int((_bits(g) != _bits(w)).sum())
            bad.append(f"{k}: {n} of {w.numel()} elements differ, max {max_ulp(g, w)} ulp")
    assert not bad, "\n".join(bad)


@contextlib.contextmanager
def hub_env(cdir: Path | None, mp: pytest.MonkeyPatch | None = None) -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` = the case's ``hf_cache/`` (or an empty folder), in this process.

    huggingface_hub reads ``HF_HUB_CACHE`` at import; the in-process CLI needs its constant patched too.
    """
    import huggingface_hub.constants

    meta = _meta(cdir.name) if cdir is not None else {"hf_cache": None}
    cache = str(cdir / meta["hf_cache"]) if meta["hf_cache"] else str(REPO / ".cache" / "test-lora-empty-hf-cache")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("HF_HUB_CACHE", cache)
        m.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
        m.setenv("HF_HUB_OFFLINE", "1")
        yield


def run_cli(argv: list[str], cdir: Path | None = None) -> tuple[int, str, str]:
    """``vllm-consolidate <argv>`` in this process, offline, with the case's HF cache: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with hub_env(cdir), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def run_process(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """``vllm-consolidate <argv>`` as a fresh process with ``env`` added to the environment."""
    script = Path(sys.executable).with_name("vllm-consolidate")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "vllm_consolidate"]
    proc = subprocess.run([*cmd, *map(str, argv)], env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=300, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def line(stdout: str, key: str) -> str:
    """The one summary line starting with ``key`` (``"lora:"``)."""
    found = [ln for ln in stdout.splitlines() if ln.startswith(key)]
    assert len(found) == 1, stdout
    return found[0]


def module_count(adapter: dict[str, torch.Tensor]) -> int:
    return sum(1 for k in adapter if FIRST_FACTOR.search(k))


def fresh_parent(tmp_path: Path) -> tuple[Path, Path]:
    """An empty folder and the output path inside it (to check nothing is left behind)."""
    parent = tmp_path / "outputs"
    parent.mkdir()
    return parent, parent / "out"


def copy_checkpoint(cdir: Path, dest: Path, *, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the run's latest checkpoint-N without the names in ``drop``."""
    src = cdir / _meta(cdir.name)["checkpoints"][-1]["path"]
    shutil.copytree(src, dest, ignore=lambda d, names: [n for n in names if Path(d) == src and n in drop])
    return dest


@dataclass
class Conversion:
    out: Path
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def converted(lora_corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Conversion]:
    """Factory: ``converted(name, *options)`` -> the ``convert`` of that case's input (made once per module)."""
    done: dict[tuple[str, ...], Conversion] = {}

    def _get(name: str, *options: str) -> Conversion:
        key = (name, *options)
        if key not in done:
            cdir = lora_corpus[name]
            out = tmp_path_factory.mktemp("lora") / "out"
            named = [] if "--base-model-name" in options else base_args(cdir)
            argv = ["convert", "--input", _source(cdir), "--output", out, *named, *options]
            if name == HUB_CASE and not options:  # the real thing: a fresh process, configured by its environment
                code, stdout, stderr = run_process(
                    argv, {"HF_HUB_CACHE": str(cdir / "hf_cache"), "HF_HUB_OFFLINE": "1"})
            else:
                code, stdout, stderr = run_cli(argv, cdir)
            assert code == 0, stderr
            assert "warning:" not in stderr, stderr
            assert line(stdout, "validation:").startswith("validation: passed ("), stdout
            done[key] = Conversion(out, stdout, stderr)
        return done[key]

    return _get


# --------------------------------------------------------------------------- 1. the merge, every case


@pytest.mark.parametrize("name", MERGED)
def test_fp32_is_peft_merge(lora_corpus, converted, name: str) -> None:
    """Default convert: float32, every tensor of peft's merge_and_unload bit for bit; a tied lm_head is not stored."""
    cdir, meta = lora_corpus[name], _meta(name)
    c = converted(name)
    assert {p.name for p in c.out.iterdir()} == ASSETS | {"model.safetensors"}
    got = load_file(str(c.out / "model.safetensors"))
    assert_bits(got, _truth(cdir))
    config = json.loads((c.out / "config.json").read_text())
    assert config.get("tie_word_embeddings", False) == meta["tied"]
    assert ("lm_head.weight" in got) == (not meta["tied"])


@pytest.mark.parametrize("name", MERGED)
def test_bf16_is_peft_merge_rounded(lora_corpus, converted, name: str) -> None:
    """--dtype bfloat16: the fp32 merge rounded once to bf16 (not a bf16 base plus a bf16 delta)."""
    c = converted(name, "--dtype", "bfloat16")
    got = load_file(str(c.out / "model.safetensors"))
    assert_bits(got, {k: v.to(torch.bfloat16) for k, v in _truth(lora_corpus[name]).items()})


@pytest.mark.parametrize("name", MERGED)
def test_pytorch_bin_is_peft_merge(lora_corpus, converted, name: str) -> None:
    """--pytorch-bin: the same tensors in pytorch_model.bin."""
    c = converted(name, "--pytorch-bin")
    assert {p.name for p in c.out.iterdir()} == ASSETS | {"pytorch_model.bin"}
    got = torch.load(c.out / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert_bits(got, _truth(lora_corpus[name]))


@pytest.mark.parametrize("name", MERGED)
def test_summary_names_the_sources(lora_corpus, converted, name: str) -> None:
    """The lora: line (LoRA source, module count, base), and where config, tokenizer and generation came from."""
    cdir, meta = lora_corpus[name], _meta(name)
    c = converted(name)
    base = _base_dir(cdir)
    adapter = _truth(cdir, "adapter")
    if meta["kind"] == "lora":
        last = meta["checkpoints"][-1]
        source = f"fp32 masters in global_step{last['step']}"
        replaced = sum(1 for k in adapter if not FACTOR.search(k))  # trained biases, modules_to_save copies
        tokenizer = cdir / last["path"]  # the run saved one in checkpoint-N
    else:
        source = "adapter_model.safetensors (float32)"
        replaced = sum(1 for k in load_file(str(_source(cdir) / "adapter_model.safetensors")) if not FACTOR.search(k))
        tokenizer = base  # a peft folder has none
    assert line(c.stdout, "detected:") == "detected:   lora_merge"
    assert line(c.stdout, "lora:") == (f"lora:       merged {module_count(adapter)} LoRA modules from {source} into "
                                       f"{base}" + (f"; replaced {replaced} {REPLACED}" if replaced else ""))
    assert line(c.stdout, "config:") == f"config:     {base / 'config.json'}"
    assert line(c.stdout, "tokenizer:") == f"tokenizer:  {tokenizer}"
    assert line(c.stdout, "generation:") == f"generation: {base / 'generation_config.json'}"
    for asset in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (c.out / asset).read_bytes() == (tokenizer / asset).read_bytes(), asset
    written, based = (json.loads(p.read_text()) for p in (c.out / "config.json", base / "config.json"))
    assert {k: v for k, v in written.items() if k != "torch_dtype"} == {k: v for k, v in based.items()
                                                                        if k != "torch_dtype"}


# --------------------------------------------------------------------------- 2. an earlier checkpoint


@pytest.mark.parametrize("name", LORA)
def test_checkpoint_dir_picks_checkpoint_2(lora_corpus, converted, name: str) -> None:
    """--checkpoint-dir run/checkpoint-2: checkpoint-2's merged truth (which differs from checkpoint-4's)."""
    cdir = lora_corpus[name]
    c = converted(name, "--checkpoint-dir", str(cdir / "run" / "checkpoint-2"))
    want = _truth(cdir, tag="checkpoint-2")
    assert any(not torch.equal(v, _truth(cdir)[k]) for k, v in want.items())
    assert_bits(load_file(str(c.out / "model.safetensors")), want)
    assert " fp32 masters in global_step2 into " in line(c.stdout, "lora:")
    assert line(c.stdout, "tokenizer:") == f"tokenizer:  {cdir / 'run' / 'checkpoint-2'}"


# --------------------------------------------------------------------------- 3. the 16-bit adapter file alone


def peft_merge(base: Path, folder: Path) -> dict[str, torch.Tensor]:
    """peft's own merge: ``PeftModel.from_pretrained(fp32 base, folder).merge_and_unload()``, tied alias dropped."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    state = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    if merged.config.tie_word_embeddings:
        assert torch.equal(state.pop("lm_head.weight"), state["model.embed_tokens.weight"])
    return state


@pytest.mark.parametrize("name", LORA)
def test_adapter_file_without_global_step(lora_corpus, tmp_path, name: str) -> None:
    """checkpoint-N copied without global_stepN/ (and its 'latest'): the bf16 adapter_model.safetensors, merged
    as peft merges that folder into the fp32 base."""
    cdir = lora_corpus[name]
    ckpt = copy_checkpoint(cdir, tmp_path / "checkpoint-4", drop=("global_step4", "latest"))
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["convert", "--input", ckpt, "--output", out, *base_args(cdir)], cdir)
    assert code == 0, stderr
    adapter = _truth(cdir, "adapter")
    lora = line(stdout, "lora:")
    assert lora.startswith(f"lora:       merged {module_count(adapter)} LoRA modules from adapter_model.safetensors "
                           f"(bfloat16) into {_base_dir(cdir)}"), lora
    assert line(stdout, "tokenizer:") == f"tokenizer:  {ckpt}"
    got = load_file(str(out / "model.safetensors"))
    want = peft_merge(cdir / "base", ckpt)
    assert sorted(got) == sorted(want)
    ulps = {k: max_ulp(got[k], w) for k, w in want.items() if not torch.equal(_bits(got[k]), _bits(w))}
    assert not ulps, f"differs from peft's merge of the bf16 adapter (max ulp per tensor): {ulps}"
    assert_bits(got, want)
    # and it is not the fp32-master merge: the 16-bit factors give other bits on some trained module
    assert any(not torch.equal(got[k], v) for k, v in _truth(cdir).items())


def test_adapter_file_with_stale_latest(lora_corpus, tmp_path) -> None:
    """The usual copy that skips only the big global_stepN/ (rsync --exclude 'global_step*'): 'latest' stays."""
    cdir = lora_corpus["lora_qwen2_z3_tied"]
    ckpt = copy_checkpoint(cdir, tmp_path / "checkpoint-4", drop=("global_step4",))
    code, stdout, stderr = run_cli(["convert", "--input", ckpt, "--output", tmp_path / "out", *base_args(cdir)], cdir)
    assert code == 0, stderr
    assert " adapter_model.safetensors (bfloat16) into " in line(stdout, "lora:")
    assert "the adapter file is used" in line(stdout, "chosen:")


# --------------------------------------------------------------------------- 4. --base-model-name


def test_base_model_name_overrides_the_adapters_base(lora_corpus, tmp_path) -> None:
    """--base-model-name <a copy of the base>: used instead of the adapter's Hub id (not resolvable here)."""
    cdir = lora_corpus[HUB_CASE]
    base = shutil.copytree(cdir / "base", tmp_path / "my-base")
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["convert", "--input", _source(cdir), "--output", out, "--base-model-name", base])
    assert code == 0, stderr
    assert line(stdout, "lora:").endswith(f" into {base}")
    assert line(stdout, "config:") == f"config:     {base / 'config.json'}"
    assert_bits(load_file(str(out / "model.safetensors")), _truth(cdir))
    # without the option the adapter's own base (a Hub id) is needed, and this process's HF cache is empty
    code, _, stderr = run_cli(["convert", "--input", _source(cdir), "--output", tmp_path / "out2"])
    assert code == 3 and "local/lora_qwen2_z2_tied-base was not found" in stderr, stderr


# --------------------------------------------------------------------------- 5. refusals


def _refused(argv: list[str], parent: Path, code: int, error: str, hint: str, cdir: Path | None = None) -> None:
    got, stdout, stderr = run_cli(argv, cdir)
    assert (got, stderr.splitlines()) == (code, [f"error: {error}", f"hint: {hint}"]), stdout + stderr
    assert stdout == ""
    assert list(parent.iterdir()) == []


def test_refuses_dora(lora_corpus, tmp_path) -> None:
    src = lora_corpus["peft_dora_qwen2"] / "adapter"
    parent, out = fresh_parent(tmp_path)
    _refused(["convert", "--input", src, "--output", out], parent, 4,
             "this adapter uses DoRA (use_dora), which rescales each merged column by a learned magnitude, which is "
             "not supported: merging it as plain LoRA would be wrong, and vLLM does not serve it as an adapter "
             f"[{src / 'adapter_config.json'}]",
             "Merge it with peft's merge_and_unload on the base model, then convert that.")


def _resized_base(cdir: Path, folder: Path, intermediate: int) -> Path:
    """The case's base with another intermediate_size (random weights), saved by transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(cdir / "base"))
    config.intermediate_size = intermediate
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(cdir / "base" / name, folder / name)
    return folder


def test_refuses_a_base_of_other_shapes(lora_corpus, tmp_path) -> None:
    """An adapter on a base whose up_proj is 256x128 (it was trained on 203x128): exit 4 naming module and shapes.

    (The corpus' llama base has the qwen2 bases' shapes, so a qwen2 adapter merges into it as peft would.)
    """
    cdir = lora_corpus["lora_qwen2_z2_rslora"]  # targets q_proj, v_proj, up_proj
    base = _resized_base(cdir, tmp_path / "wide-base", 256)
    parent, out = fresh_parent(tmp_path)
    config = cdir / "run" / "checkpoint-4" / "adapter_config.json"
    _refused(["convert", "--input", _source(cdir), "--output", out, "--base-model-name", base], parent, 4,
             f"the adapter does not fit the base model {base}: model.layers.0.mlp.up_proj has factors for a weight of "
             f"shape (203, 128), the base's is (256, 128) [{config}]",
             "Pass the model the adapter was trained on with --base-model-name.")


def test_refuses_a_missing_base(lora_corpus, tmp_path) -> None:
    """adapter_config.json's base_model_name_or_path is a Hub id that is not in the HF cache: exit 3 naming it."""
    cdir = lora_corpus["lora_qwen2_z3_tied"]
    ckpt = copy_checkpoint(cdir, tmp_path / "checkpoint-4")
    config = json.loads((ckpt / "adapter_config.json").read_text())
    (ckpt / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path="someone/no-such-base")))
    parent, out = fresh_parent(tmp_path)
    _refused(["convert", "--input", ckpt, "--output", out], parent, 3,
             "the adapter's base model someone/no-such-base was not found ('someone/no-such-base' is not in the local "
             f"HF cache and HF_HUB_OFFLINE is set (LocalEntryNotFoundError)) [{ckpt / 'adapter_config.json'}]",
             "Pass the base model's folder (or its Hub id, if it is in the HF cache) with --base-model-name.")


@pytest.mark.parametrize("name", ["lora_qwen2_z3_tied", PLAIN])
def test_refuses_a_base_named_by_path(lora_corpus, tmp_path, name: str) -> None:
    """The corpus' own adapters name their base by absolute path (as peft writes it after from_pretrained(folder)):
    never followed; exit 8 naming --base-model-name, and nothing read or published."""
    cdir = lora_corpus[name]
    parent, out = fresh_parent(tmp_path)
    config = cdir / _meta(name)["checkpoints"][-1]["path"] / "adapter_config.json"
    _refused(["convert", "--input", _source(cdir), "--output", out], parent, 8,
             f"the adapter names its base model by the local path {str(cdir / 'base')!r}, which is not followed (a "
             f"checkpoint does not choose which local model is read): name it with --base-model-name [{config}]",
             "Pass the folder of the model the adapter was trained on: --base-model-name FOLDER.")


def test_refuses_factors_without_adapter_config(lora_corpus, tmp_path) -> None:
    """LoRA factors in the DeepSpeed masters but no adapter_config.json (scale unknown): exit 4."""
    cdir = lora_corpus["lora_qwen2_z3_tied"]
    ckpt = copy_checkpoint(cdir, tmp_path / "checkpoint-4", drop=("adapter_config.json",))
    parent, out = fresh_parent(tmp_path)
    _refused(["convert", "--input", ckpt, "--output", out], parent, 4,
             "the checkpoint holds LoRA factors but no adapter_config.json was found next to it or above it "
             f"[{ckpt / 'global_step4'}]",
             "Copy the run's adapter_config.json into the checkpoint-N folder.")


@pytest.mark.parametrize("name", ["lora_qwen2_z3_tied", PLAIN])
def test_refuses_another_peft_type(lora_corpus, tmp_path, name: str) -> None:
    """adapter_config.json with peft_type IA3 (a Trainer checkpoint, a plain folder): exit 4."""
    cdir = lora_corpus[name]
    src = (copy_checkpoint(cdir, tmp_path / "checkpoint-4") if name in LORA
           else shutil.copytree(_source(cdir), tmp_path / "adapter"))
    config = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps(dict(config, peft_type="IA3")))
    parent, out = fresh_parent(tmp_path)
    _refused(["convert", "--input", src, "--output", out], parent, 4,
             f"this is an IA3 adapter; only LoRA adapters can be merged [{src / 'adapter_config.json'}]",
             "Merge it with peft's merge_and_unload, then convert that.")


# --------------------------------------------------------------------------- 6. inspect, validate, batch


@pytest.mark.parametrize("name", ["lora_llama_z3_mts", HUB_CASE])
def test_inspect(lora_corpus, name: str) -> None:
    cdir = lora_corpus[name]
    code, stdout, stderr = run_cli(["inspect", _source(cdir), *base_args(cdir)], cdir)
    assert code == 0, stderr
    assert line(stdout, "format:") == "format:        lora_merge, 1 safetensors file"
    assert line(stdout, "base model:") == f"base model:    {_base_dir(cdir)}"
    assert line(stdout, "problems:") == "problems:      none"


def test_validate_against_the_run(lora_corpus, converted) -> None:
    """validate --against the run passes (every element); against checkpoint-2 it fails (exit 9)."""
    name = "lora_llama_z3_mts"
    cdir, c = lora_corpus[name], converted(name)
    code, stdout, stderr = run_cli(["validate", c.out, "--against", _source(cdir), *base_args(cdir)], cdir)
    assert code == 0, stdout + stderr
    assert re.search(r"^  PASS  source_values +29 tensors equal the source \(every element", stdout, re.M), stdout
    code, stdout, stderr = run_cli(["validate", c.out, "--against", cdir / "run" / "checkpoint-2", *base_args(cdir)],
                                   cdir)
    assert code == 9, stdout + stderr
    assert re.search(r"^  FAIL  source_values ", stdout, re.M), stdout
    assert stderr.splitlines()[0] == f"error: 1 check(s) failed: source_values [{c.out}]"


def test_batch_of_two_lora_runs(lora_corpus, tmp_path) -> None:
    """batch --input-dir <two copies of a LoRA run> --base-model-name <its base>: both merged, each == the truth;
    without the option (the adapter names its base by path) each job is refused and names the option."""
    name = "lora_llama_z3_mts"
    cdir = lora_corpus[name]
    runs = tmp_path / "runs"
    for copy in ("a", "b"):
        shutil.copytree(_source(cdir), runs / copy)
    out = tmp_path / "merged"
    code, stdout, stderr = run_cli(["batch", "--input-dir", runs, "--output-dir", out, "--max-workers", "1",
                                    *base_args(cdir)])
    assert code == 0, stdout + stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["a_step_4", "b_step_4"]
    for copy in ("a", "b"):
        assert_bits(load_file(str(out / f"{copy}_step_4" / "model.safetensors")), _truth(cdir))
    code, stdout, stderr = run_cli(["batch", "--input-dir", runs, "--output-dir", tmp_path / "none"])
    assert code != 0 and "--base-model-name" in stdout + stderr, stdout + stderr
    assert not any(p.name.endswith("_step_4") for p in (tmp_path / "none").glob("*")), stdout + stderr


# --------------------------------------------------------------------------- 7. real vLLM


@pytest.mark.vllm
def test_vllm_loads_the_merged_folder(converted) -> None:
    """The merged tied qwen2 (LoRA on the embedding too) loads in vLLM; its greedy tokens are transformers'."""
    c = converted(HUB_CASE)
    code, stdout, stderr = run_cli(["validate", c.out, "--load", "--vllm-python", vllm_python()])
    assert code == 0, stdout + stderr
    assert re.search(r"^  PASS  vllm_load +vLLM \S+ loaded the folder; its greedy tokens equal transformers'", stdout,
                     re.M), stdout
