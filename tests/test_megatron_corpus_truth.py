"""Prove the Megatron corpus's ground truth is trustworthy (its own invariants; the reader is tested elsewhere).

* The files hold the live weights: a fresh model filled by megatron-core's own ``dist_checkpointing.load``
  gave the live model's logits at build time (recorded: bit-identical for every dense model).
* The truth was verified when it was written: the HF model loaded with it gave the live Megatron model's fp32
  logits (within ``tol``), and each of three wrong mappings moved them by more than ``wrong_min``.
* ``case.json`` follows ``megatron_build.CASE_SCHEMA_DOC``; the files a reader needs are there (metadata.json
  naming ``torch_dist``, ``.metadata``, ``.distcp`` files, ``common.pt``; the Megatron-LM tracker and iteration
  folders; ``hf/`` with a config whose vocab_size is the true one).
* Independent of the builder's mapping: torch's own ``dcp_to_torch_save`` reads every checkpoint, its tensors
  have the recorded global shapes, and the tensors that need no layout transform (final norm, the embedding's
  first ``vocab_size`` rows) equal the truth bit for bit; the padding rows exist beyond ``vocab_size``.
* Training happened: RMSNorm weights moved from their init (1.0), and a run's two iterations differ.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tests.corpus import megatron_build

SPECS = list(megatron_build.CASES.values())
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WRONG = {"swapped_gate_up", "swapped_k_v", "permuted_q_heads_0_1"}


@pytest.fixture(scope="module")
def megatron_corpus() -> dict[str, Path]:
    """Every Megatron case, ``{name: case_dir}``; built on first use (needs ``make setup-megatron``)."""
    return megatron_build.build_all()


def _checkpoints() -> list[Any]:
    return [pytest.param(s.name, step, id=f"{s.name}-{step}") for s in SPECS for step in s.save_steps]


def _entry(meta: dict[str, Any], step: int) -> dict[str, Any]:
    (entry,) = [c for c in meta["checkpoints"] if c["step"] == step]
    return entry


def schema_keys() -> list[str]:
    """The top-level keys ``CASE_SCHEMA_DOC`` documents (comma-separated names on one line count each)."""
    keys = []
    for line in megatron_build.CASE_SCHEMA_DOC.strip().splitlines():
        head = re.split(r"\s{2,}", line.strip())[0]
        if not line.startswith(" ") and head:
            keys += [k.strip() for k in head.split(",")]
    return keys


@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_case_json_schema(megatron_corpus: dict[str, Path], name: str) -> None:
    meta = megatron_build.load_case(name)
    spec = megatron_build.CASES[name]
    optional = {"tracker", "run_files"} if spec.kind == "torch_dist" else set()
    missing = [k for k in schema_keys() if k not in meta and k not in optional]
    assert not missing, f"{name}: case.json lacks {missing}"
    assert meta["spec_hash"] == spec.spec_hash()
    assert meta["megatron_core_version"] == spec.options.get("mcore", megatron_build.MCORE_VERSION)
    assert meta["parallel"] == spec.parallel
    assert meta["padded_vocab_size"] % (megatron_build.VOCAB_DIVISIBLE_BY * spec.tp) == 0
    assert meta["padded_vocab_size"] > meta["vocab_size"], "no padding rows: the trim would not be exercised"
    assert [c["step"] for c in meta["checkpoints"]] == list(spec.save_steps)
    assert meta["expected_step"] == max(spec.save_steps)


@pytest.mark.parametrize(("name", "step"), _checkpoints())
def test_logits_check_recorded(megatron_corpus: dict[str, Path], name: str, step: int) -> None:
    check = _entry(megatron_build.load_case(name), step)["logits_check"]
    assert check["equal"] is True
    assert check["tol"] <= 1e-5 and 0 <= check["max_abs_diff"] <= check["tol"], check
    assert set(check["wrong_mappings"]) == WRONG, check
    caught = {k: v for k, v in check["wrong_mappings"].items() if v > check["wrong_min"]}
    assert set(caught) == WRONG, f"a wrong mapping was not caught by the logits: {check}"
    assert check["prompt_tokens"] >= 8


@pytest.mark.parametrize(("name", "step"), _checkpoints())
def test_megatron_own_load_recorded(megatron_corpus: dict[str, Path], name: str, step: int) -> None:
    """megatron-core's dist_checkpointing.load of the written folder gave the live model's logits (bit for bit but
    for a last-bit MoE rounding under TP x EP)."""
    check = _entry(megatron_build.load_case(name), step)["reload_check"]
    assert check["loader"] == "megatron.core.dist_checkpointing.load" and check["tol"] <= 1e-6, check
    assert 0.0 <= check["max_abs_diff"] <= check["tol"], check
    if megatron_build.CASES[name].ep == 1:
        assert check["max_abs_diff"] == 0.0, check


@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_files_present(megatron_corpus: dict[str, Path], name: str) -> None:
    folder, meta = megatron_corpus[name], megatron_build.load_case(name)
    assert (folder / meta["input"]).is_dir()
    # megatron-core 0.19+ writes no common.pt: its common state is a DCP object in rank 0's .distcp.
    common = "common_state" if megatron_build.CASES[name].options.get("mcore") else "common_pt"
    for entry in meta["checkpoints"]:
        ckpt = folder / entry["path"]
        files = {p.name for p in ckpt.iterdir()}
        assert {".metadata", "metadata.json"} <= files, files
        assert ("common.pt" in files) == (common == "common_pt"), files
        assert any(f.endswith(".distcp") for f in files), files
        assert (folder / entry["truth"]).is_file()
    assert meta["layout"]["metadata_json"]["sharded_backend"] == "torch_dist"
    import json

    config = json.loads((folder / meta["hf_dir"] / "config.json").read_text())
    assert config["vocab_size"] == meta["vocab_size"] and config["model_type"] == meta["arch"]
    assert config["architectures"] == [meta["hf_class"]]
    assert (folder / meta["hf_dir"] / "tokenizer.json").is_file()
    if meta["kind"] == "megatron_lm":
        assert (folder / "run" / "latest_checkpointed_iteration.txt").read_text() == str(meta["expected_step"])
        assert sorted(p.name for p in (folder / "run").glob("iter_*")) == [
            f"iter_{s:07d}" for s in megatron_build.CASES[name].save_steps]
        assert {"args", "iteration", "checkpoint_version", "optimizer"} <= set(meta["layout"][f"{common}_keys"])
        args = meta["layout"][f"{common}_args"]
        assert args["padded_vocab_size"] == meta["padded_vocab_size"] and args["vocab_size"] == meta["vocab_size"]
        assert any(k.startswith("optimizer.") for k in meta["layout"]["dcp_tensors"]), "no optimizer state saved"
    if common == "common_state":
        assert "common_state/shard_0_1" in meta["layout"]["dcp_objects"]
        assert meta["layout"]["common_state_storage"]["file"] == "__0_0.distcp"  # rank 0 writes it


def _dcp(folder: Path, keys: list[str]) -> dict[str, Any]:
    """The tensors ``keys`` as torch's own DCP loader reads them (``dcp.load`` into empty tensors of the metadata's
    shapes: only these keys, as the byte entries, e.g. megatron-core 0.19's common_state, unpickle megatron classes
    this venv lacks)."""
    import torch.distributed.checkpoint as dcp

    entries = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    sd = {k: torch.empty(entries[k].size, dtype=entries[k].properties.dtype) for k in keys}
    dcp.load(sd, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
    return sd


@pytest.mark.parametrize(("name", "step"), _checkpoints())
def test_truth_against_torch_dcp(megatron_corpus: dict[str, Path], name: str, step: int) -> None:
    folder, meta = megatron_corpus[name], megatron_build.load_case(name)
    entry = _entry(meta, step)
    sd = _dcp(folder / entry["path"], list(entry["gathered_keys"]))
    truth = load_file(folder / entry["truth"])
    for key, (shape, _dtype) in entry["gathered_keys"].items():
        assert list(sd[key].shape) == shape, key
    vocab = meta["vocab_size"]
    emb = sd["embedding.word_embeddings.weight"]
    assert emb.shape[0] == meta["padded_vocab_size"]
    assert torch.equal(truth["model.embed_tokens.weight"], emb[:vocab])
    # megatron keeps RMSNorm weights in fp32 beside bf16 params; the truth (the HF model in bf16) casts them.
    norm = truth["model.norm.weight"]
    assert torch.equal(norm, sd["decoder.final_layernorm.weight"].to(norm.dtype))
    assert ("lm_head.weight" in truth) == (not meta["tied"])
    if not meta["tied"]:
        assert torch.equal(truth["lm_head.weight"], sd["output_layer.weight"][:vocab])
    matrices = [t for t in truth.values() if t.ndim == 2]
    assert {t.dtype for t in matrices} == {DTYPES[meta["precision"]]}
    if meta["num_experts"]:
        names = [k for k in truth if ".experts." in k]
        assert len(names) == meta["num_layers"] * meta["num_experts"] * 3, names[:6]


@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_training_happened(megatron_corpus: dict[str, Path], name: str) -> None:
    folder, meta = megatron_corpus[name], megatron_build.load_case(name)
    truths = [load_file(folder / c["truth"]) for c in meta["checkpoints"]]
    norm = truths[-1]["model.norm.weight"].float()
    assert not torch.equal(norm, torch.ones_like(norm)), "RMSNorm weights still at init: no optimizer step"
    if len(truths) > 1:
        assert not torch.equal(truths[0]["model.embed_tokens.weight"], truths[-1]["model.embed_tokens.weight"])


@pytest.mark.parametrize("name", [s.name for s in SPECS if "vpp" in s.parallel])
def test_vpp_layers_interleaved(megatron_corpus: dict[str, Path], name: str) -> None:
    """A VPP save really is interleaved (read with torch's own DCP reader): the files' keys carry no ``model0.``
    prefix (that nesting is in the saved dict only), the stacked layer axis is the global one, and pipeline rank
    ``r`` (file ``__r_*``) holds layers ``r, r + pp, ...``: one chunk per virtual stage, not adjacent."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = megatron_build.load_case(name)
    pp, vpp, layers = meta["parallel"]["pp"], meta["parallel"]["vpp"], meta["num_layers"]
    assert layers == pp * vpp and not any(k.startswith("model") for k in meta["layout"]["dcp_tensors"])
    md = FileSystemReader(str(megatron_corpus[name] / meta["checkpoints"][-1]["path"])).read_metadata()
    key = "decoder.layers.self_attention.linear_qkv.weight"
    assert md.state_dict_metadata[key].size[0] == layers
    held: dict[int, set[int]] = {}
    for index, info in md.storage_data.items():
        if index.fqn == key:
            held.setdefault(int(info.relative_path.split("_")[2]), set()).add(index.offset[0])
    assert held == {r: set(range(r, layers, pp)) for r in range(pp)}, held
