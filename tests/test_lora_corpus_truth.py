"""Prove the LoRA corpus ground truth is trustworthy (``tests/corpus/lora_build.py``).

The truth files were gathered from the live engine; here they are checked against
what the frameworks wrote and against peft / transformers / DeepSpeed reading
those (trusted) files:

* ``adapter_model.safetensors`` == the fp32 adapter truth pushed through peft's own
  ``get_peft_model_state_dict`` naming, cast to the file dtype (bit-exact);
* DeepSpeed's bundled ``zero_to_fp32.py`` reproduces the adapter truth bit for bit,
  and ``param_shapes`` names are the live peft names;
* the merged truth has the base's parameter names, differs from the base exactly
  where the adapter acts, and behaves like the unmerged adapter (logits);
* checkpoint-2 and checkpoint-4 differ; the zero-initialised factors moved;
* the offline HF cache resolves the base by name; case.json follows the schema.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tests.corpus import common, lora_build

pytestmark = pytest.mark.filterwarnings(
    "ignore:The PEFT config's `base_model_name_or_path` was renamed:UserWarning",
    "ignore:Model has `tie_word_embeddings=True` and a tied layer:UserWarning",
    "ignore:Setting `save_embedding_layers` to `True`:UserWarning",
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
)

LORA = [s.name for s in lora_build.CASES.values() if s.kind == "lora"]
FOLDERS = [s.name for s in lora_build.CASES.values() if s.kind == "peft_folder"]
CKPTS = [
    pytest.param(s.name, tag, id=f"{s.name}-{tag}")
    for s in lora_build.CASES.values()
    for tag in ([f"checkpoint-{n}" for n in s.save_steps] if s.kind == "lora" else ["adapter"])
]
LORA_CKPTS = [p for p in CKPTS if p.values[0] in LORA]


def _entry(meta: dict[str, Any], tag: str) -> dict[str, Any]:
    (entry,) = [c for c in meta["checkpoints"] if c["tag"] == tag]
    return entry


@functools.cache
def _meta(name: str) -> dict[str, Any]:
    return lora_build.load_case(name)


def meta_vocab(name: str) -> int:
    """Vocab size of a case's model."""
    return int(lora_build.CASES[name].model["vocab"])


def _base(cdir: Path) -> Any:
    return lora_build.auto_class(cdir / "base").from_pretrained(str(cdir / "base"), dtype=torch.float32)


def _peft_with_truth(cdir: Path, folder: Path, truth: dict[str, torch.Tensor]) -> Any:
    """fp32 base from base/ + the LoraConfig read from ``folder`` + the adapter truth (exact live names)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig.from_pretrained(str(folder))
    config.inference_mode = False  # saved as True; we want the trainable set to compare with the truth
    model = get_peft_model(_base(cdir), config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(truth), sorted(trainable ^ set(truth))[:10]
    _, unexpected = model.load_state_dict(truth, strict=False)
    assert not unexpected, unexpected
    return model.eval()


def _affected(trainable: list[str]) -> set[str]:
    """Base param names a merge may change: LoRA target weights, trained biases, modules_to_save weights."""
    out = set()
    for n in trainable:
        n = n.removeprefix("base_model.model.")
        for marker in (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector."):
            if marker in n:
                out.add(n.split(marker)[0] + ".weight")
        if n.endswith(".base_layer.bias"):
            out.add(n.replace(".base_layer.bias", ".bias"))
        if ".modules_to_save.default." in n:
            out.add(n.replace(".modules_to_save.default.", "."))
    return out


# --------------------------------------------------------------------------- schema / layout


@pytest.mark.parametrize("name", list(lora_build.CASES))
def test_case_json_schema(lora_corpus: dict[str, Path], name: str) -> None:
    """case.json has every documented key, sane relative paths, and records what is really on disk."""
    cdir = lora_corpus[name]
    meta = _meta(name)
    spec = lora_build.CASES[name]
    required = {line.split()[0] for line in lora_build.CASE_SCHEMA_DOC.strip().splitlines() if not line[0].isspace()}
    optional = {"run_top_level"}  # lora only
    assert required - optional <= set(meta), sorted(required - set(meta))
    assert set(meta) <= required, sorted(set(meta) - required)
    assert meta["spec_hash"] == spec.spec_hash() and meta["kind"] == spec.kind
    assert (cdir / meta["input"]).is_dir() and (cdir / meta["base_dir"] / "model.safetensors").is_file()
    for c in meta["checkpoints"]:
        assert (cdir / c["path"]).is_dir(), c
        for key in ("adapter_truth", "merged_truth"):
            assert (cdir / c[key]).is_file() and c[key].startswith("truth/"), c
        assert lora_build.list_files(cdir / c["path"]) == meta["trainer_wrote"][c["tag"]]
        assert json.loads((cdir / c["path"] / "adapter_config.json").read_text()) == meta["lora_config"]
    assert meta["base_name_or_path"] == meta["lora_config"]["base_model_name_or_path"]
    for key, value in spec.lora.items():
        saved = meta["lora_config"][key]
        if key == "target_modules" and value == "all-linear":
            # peft expands the shorthand into the full module names (lm_head excluded), as an unordered list
            n_layers = spec.model["layers"]
            assert len(saved) == len(set(saved)) == 7 * n_layers and not any("lm_head" in t for t in saved), saved
        elif key == "target_modules":
            assert sorted(saved) == sorted(value)  # stored from a set: order is arbitrary
        else:
            assert saved == value, key
    if spec.kind == "lora":
        assert meta["stage"] == spec.stage and meta["world_size"] == 2 and meta["precision"] == "bf16"
        assert [c["step"] for c in meta["checkpoints"]] == [2, 4]
        assert meta["run_top_level"] == ["checkpoint-2", "checkpoint-4"]
        assert meta["adapter_file_dtype"] == "bf16"
    else:
        assert meta["stage"] is None and meta["adapter_file_dtype"] == "fp32"
    if spec.base_ref == "hf_cache":
        assert meta["hf_cache"] == "hf_cache" and meta["base_name_or_path"] == spec.repo_id
    else:
        assert meta["hf_cache"] is None and meta["base_name_or_path"] == str(cdir / "base")


@pytest.mark.parametrize("name", sorted(set(lora_build.CASES) - lora_build.RENAMED_CASES))
def test_base_is_the_tiny_model(lora_corpus: dict[str, Path], name: str) -> None:
    """base/ holds the deterministic tiny model in fp32 (tied lm_head not stored)."""
    spec = lora_build.CASES[name]
    want = dict(common.build_model(spec.model, seed=spec.seed).named_parameters())
    got = load_file(str(lora_corpus[name] / "base" / "model.safetensors"))
    assert set(got) == set(want)
    assert all(t.dtype == torch.float32 and torch.equal(t, want[k]) for k, t in got.items())
    assert _meta(name)["tied"] == ("lm_head.weight" in _meta(name)["tied_keys"])


def test_hf_cache_resolves_base_by_name(lora_corpus: dict[str, Path]) -> None:
    """The hub-cache case's base name resolves offline, through huggingface_hub and transformers."""
    from huggingface_hub import scan_cache_dir, snapshot_download
    from transformers import AutoConfig

    names = [n for n in lora_corpus if _meta(n)["hf_cache"]]
    assert names, "one case must reference its base through the HF cache"
    for name in names:
        meta, cdir = _meta(name), lora_corpus[name]
        cache = cdir / meta["hf_cache"]
        repo = meta["base_name_or_path"]
        snap = Path(snapshot_download(repo, cache_dir=str(cache), local_files_only=True))
        assert snap.name == meta["hf_cache_commit"]
        assert (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").read_text() == snap.name
        base_files = lora_build.list_files(cdir / "base")
        assert sorted(p.name for p in snap.iterdir()) == base_files
        for f in base_files:
            assert (snap / f).is_symlink() and not Path(str((snap / f).readlink())).is_absolute()
            assert (snap / f).read_bytes() == (cdir / "base" / f).read_bytes()
        (info,) = [r for r in scan_cache_dir(cache).repos if r.repo_id == repo]
        assert "main" in info.refs
        assert AutoConfig.from_pretrained(repo, cache_dir=str(cache), local_files_only=True).model_type == meta["arch"]


# --------------------------------------------------------------------------- adapter truth vs files


@pytest.mark.parametrize(("name", "tag"), CKPTS)
def test_adapter_file_is_truth_in_peft_naming(lora_corpus: dict[str, Path], name: str, tag: str) -> None:
    """adapter_model.safetensors == peft's saved view of the fp32 truth, cast to the file dtype, bit for bit.

    For Trainer runs the file is bf16 (the engine's 16-bit params), and those equal the
    fp32 masters rounded to bf16.  Extra non-trainable keys peft adds (full embedding /
    lm_head base weights) equal the base cast likewise.
    """
    from peft import get_peft_model_state_dict

    cdir, meta = lora_corpus[name], _meta(name)
    entry = _entry(meta, tag)
    truth = load_file(str(cdir / entry["adapter_truth"]))
    assert all(t.dtype == torch.float32 for t in truth.values())
    assert sorted(truth) == sorted(meta["trainable"])
    model = _peft_with_truth(cdir, cdir / entry["path"], truth)
    view = get_peft_model_state_dict(model)
    got = load_file(str(cdir / entry["path"] / "adapter_model.safetensors"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[meta["adapter_file_dtype"]]
    assert set(got) == set(view), sorted(set(got) ^ set(view))
    bad = [k for k in got if got[k].dtype != dtype or not torch.equal(got[k], view[k].to(dtype))]
    assert not bad, bad[:5]
    if dtype == torch.bfloat16:  # the 16-bit file is lossy: the truth really is finer than the file
        assert any(not torch.equal(got[k].float(), view[k]) for k in got)


@pytest.mark.parametrize(("name", "tag"), LORA_CKPTS)
def test_deepspeed_checkpoint_matches_truth(lora_corpus: dict[str, Path], name: str, tag: str) -> None:
    """DeepSpeed's bundled zero_to_fp32 reproduces the adapter truth; it records live peft names, no frozen params."""
    cdir, meta = lora_corpus[name], _meta(name)
    ckpt = cdir / _entry(meta, tag)["path"]
    truth = load_file(str(cdir / _entry(meta, tag)["adapter_truth"]))
    spec = importlib.util.spec_from_file_location(f"z2f_{name}_{tag}".replace("-", "_"), ckpt / "zero_to_fp32.py")
    assert spec is not None and spec.loader is not None
    z2f = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(z2f)
    got = z2f.get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    assert set(got) == set(truth), sorted(set(got) ^ set(truth))[:10]
    bad = [k for k in truth if got[k].dtype != torch.float32 or not torch.equal(got[k], truth[k])]
    assert not bad, bad[:5]
    tagdir = ckpt / (ckpt / "latest").read_text().strip()
    states = sorted(tagdir.glob("*model_states.pt"))
    assert len(states) == (1 if meta["stage"] == 2 else 2)
    for f in states:  # trusted: written by DeepSpeed for this corpus
        sd = torch.load(f, map_location="cpu", weights_only=False)
        names = [n for group in sd["param_shapes"] for n in group]
        assert sorted(names) == sorted(truth)  # live names, ".default." included
        assert sd["frozen_param_shapes"] is None  # Trainer passes exclude_frozen_parameters=True for peft models


# --------------------------------------------------------------------------- merged truth


@pytest.mark.parametrize(("name", "tag"), CKPTS)
def test_merged_truth(lora_corpus: dict[str, Path], name: str, tag: str) -> None:
    """Merged truth: base names, changed exactly where the adapter acts, same logits as the unmerged adapter.

    Exception (asserted): a tied model with LoRA on the embedding.  peft merges the
    embedding delta into the shared weight, so the tied lm_head changes too and the
    merged model is NOT equivalent to the unmerged adapter (peft warns about this).
    """
    cdir, meta = lora_corpus[name], _meta(name)
    entry = _entry(meta, tag)
    merged = load_file(str(cdir / entry["merged_truth"]))
    base = _base(cdir)
    base_params = dict(base.named_parameters())
    assert set(merged) == set(base_params)
    assert common.tied_map(base) == meta["merged_tied_keys"] == meta["tied_keys"]
    affected = _affected(meta["trainable"])
    assert affected and affected <= set(merged), sorted(affected - set(merged))
    for k, v in merged.items():
        assert v.dtype == torch.float32
        if k in affected:
            assert not torch.equal(v, base_params[k].detach()), f"{k}: merge left the base unchanged"
        else:
            assert torch.equal(v, base_params[k].detach()), f"{k}: changed although no adapter acts on it"

    truth = load_file(str(cdir / entry["adapter_truth"]))
    unmerged = _peft_with_truth(cdir, cdir / entry["path"], truth)
    merged_model = _base(cdir)
    _, unexpected = merged_model.load_state_dict(merged, strict=False)
    assert not unexpected
    ids = torch.randint(4, meta_vocab(name), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = unmerged(input_ids=ids).logits
        got = merged_model(input_ids=ids).logits
    tied_embedding_lora = meta["tied"] and any(".lora_embedding_" in n for n in meta["trainable"])
    if tied_embedding_lora:
        assert not torch.allclose(got, want, atol=1e-2), "expected peft's tied-embedding merge to alter lm_head"
    else:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", LORA)
def test_training_moved_the_adapter(lora_corpus: dict[str, Path], name: str) -> None:
    """Zero-initialised factors are non-zero at every checkpoint; checkpoint-2 and checkpoint-4 differ."""
    cdir, meta = lora_corpus[name], _meta(name)
    assert meta["zero_init"]
    adapters = [load_file(str(cdir / c["adapter_truth"])) for c in meta["checkpoints"]]
    merges = [load_file(str(cdir / c["merged_truth"])) for c in meta["checkpoints"]]
    for a in adapters:
        for k in meta["zero_init"]:
            assert a[k].abs().sum() > 0, f"{k} still zero"
    first, last = adapters
    same = [k for k in first if torch.equal(first[k], last[k])]
    assert not same, f"unchanged between checkpoints: {same[:5]}"
    assert any(not torch.equal(merges[0][k], merges[1][k]) for k in merges[0])


@pytest.mark.parametrize("name", FOLDERS)
def test_peft_folder_has_nonzero_adapter(lora_corpus: dict[str, Path], name: str) -> None:
    """Plain peft folders: fp32, non-zero zero-init factors, DoRA flagged and stored as such."""
    cdir, meta = lora_corpus[name], _meta(name)
    got = load_file(str(cdir / "adapter" / "adapter_model.safetensors"))
    truth = load_file(str(cdir / meta["checkpoints"][0]["adapter_truth"]))
    for k in meta["zero_init"]:
        assert truth[k].abs().sum() > 0, k
    dora = lora_build.CASES[name].lora.get("use_dora", False)
    assert meta["lora_config"]["use_dora"] is dora
    assert any(k.endswith(".lora_magnitude_vector") for k in got) is dora


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft 0.21's rank/alpha pattern lookup: each key is a regex matched as a dotted suffix, first match wins."""
    import re

    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@pytest.mark.parametrize(("name", "tag"), [p for p in CKPTS if p.values[0] != "peft_dora_qwen2"])
def test_merged_truth_is_the_lora_formula(lora_corpus: dict[str, Path], name: str, tag: str) -> None:
    """merged = base + scale * B @ A (embedding: (B @ A).T), scale = alpha/r or alpha/sqrt(r) (rsLoRA), per pattern.

    Pins the documented semantics (LORA_README.md) against peft's own merge.
    """
    cdir, meta = lora_corpus[name], _meta(name)
    cfg = meta["lora_config"]
    entry = _entry(meta, tag)
    truth = load_file(str(cdir / entry["adapter_truth"]))
    merged = load_file(str(cdir / entry["merged_truth"]))
    # The live base's names (a vision-language base/ file holds save_pretrained's other prefixes)
    base = {k: v.detach() for k, v in _base(cdir).named_parameters()}
    checked = 0
    for key, a in truth.items():
        for marker, b_marker, transpose in (
            (".lora_A.", ".lora_B.", False),
            (".lora_embedding_A.", ".lora_embedding_B.", True),
        ):
            if marker not in key:
                continue
            module = key.removeprefix("base_model.model.").split(marker)[0]
            b = truth[key.replace(marker, b_marker)]
            r = _pattern(cfg["rank_pattern"], module, cfg["r"])
            alpha = _pattern(cfg["alpha_pattern"], module, cfg["lora_alpha"])
            assert a.shape[0] == r
            scale = alpha / (r**0.5 if cfg["use_rslora"] else r)
            delta = (b @ a).T if transpose else b @ a
            torch.testing.assert_close(merged[module + ".weight"], base[module + ".weight"] + scale * delta)
            checked += 1
    assert checked == len(meta["zero_init"])
