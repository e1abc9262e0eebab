"""Prove the FSDP2 / DCP / verl corpus ground truth is trustworthy.

* DCP cases: torch's own converter ``dcp_to_torch_save`` reproduces every truth tensor
  (under the case's ``key_prefix``) bit for bit, in the same dtype.
* verl cases: the per-rank ``model_world_size_W_rank_R.pt`` files (``torch.load``,
  trusted: this corpus wrote them) reassembled from their DTensor local shards equal the
  truth bit for bit.
* Training happened (weights moved from init, checkpoints differ between steps), and
  ``case.json`` follows ``fsdp_build.CASE_SCHEMA_DOC``.

Only the kinds this corpus generates itself (``dcp``, ``verl``) are checked here.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tests.corpus import common, fsdp_build

OWN_KINDS = ("dcp", "verl")
OWN = [s for s in fsdp_build.CASES.values() if s.kind in OWN_KINDS]
DCP = [s for s in OWN if s.kind == "dcp"]
VERL = [s for s in OWN if s.kind == "verl"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def fsdp_corpus() -> dict[str, Path]:
    """The dcp + verl cases, ``{name: case_dir}``; built on first use, then served from the cache."""
    return fsdp_build.build_all([s.name for s in OWN])


def _ckpt_params(kinds: tuple[str, ...]) -> list[Any]:
    out = []
    for spec in OWN:
        if spec.kind not in kinds:
            continue
        roles = spec.options.get("roles", [None])
        for step in spec.save_steps:
            for role in roles:
                suffix = f"-{role}" if role else ""
                out.append(pytest.param(spec.name, step, role, id=f"{spec.name}-{step}{suffix}"))
    return out


def _entry(meta: dict[str, Any], step: int, role: str | None) -> dict[str, Any]:
    (entry,) = [c for c in meta["checkpoints"] if c["step"] == step and c.get("role") == role]
    return entry


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys (the way DCP names its entries)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = obj
    return out


def assert_bit_identical(got: dict[str, torch.Tensor], truth: dict[str, torch.Tensor], what: str) -> None:
    """Every truth key is present in ``got`` with the same dtype, shape and bits."""
    missing = sorted(set(truth) - set(got))
    assert not missing, f"{what}: missing keys {missing[:5]}"
    bad = [k for k, t in truth.items() if got[k].dtype != t.dtype or not torch.equal(got[k], t)]
    assert not bad, f"{what}: {len(bad)} tensors differ from truth, e.g. {bad[:5]}"


# --------------------------------------------------------------------------- DCP


def _dcp_as_flat_dict(folder: Path, tmp_path: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "converted.pt"
    dcp_to_torch_save(str(folder), str(out))
    return _flatten(torch.load(out, map_location="cpu", weights_only=False))


@pytest.mark.parametrize(("name", "step", "role"), _ckpt_params(("dcp",)))
def test_dcp_to_torch_save_matches_truth(
    fsdp_corpus: dict[str, Path], name: str, step: int, role: None, tmp_path: Path
) -> None:
    """torch's dcp_to_torch_save gives, under key_prefix, exactly the live-model truth."""
    cdir = fsdp_corpus[name]
    meta = fsdp_build.load_case(name)
    entry = _entry(meta, step, role)
    folder = cdir / entry["path"]
    assert (folder / ".metadata").is_file()
    flat = _dcp_as_flat_dict(folder, tmp_path)
    prefix = meta["key_prefix"]
    truth = load_file(str(cdir / entry["truth"]))
    got = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}
    assert_bit_identical(got, truth, f"{name}/{entry['tag']}")
    assert {t.dtype for t in truth.values()} == {DTYPES[meta["precision"]]}
    for alias in meta["dcp_aliases"]:  # tied alias stored as its own entry: same values as canonical
        assert torch.equal(got[alias], truth[meta["tied_keys"][alias]]), alias
    if meta["dcp_style"] == "ambiguous":
        ema = {k[4:]: v for k, v in flat.items() if k.startswith("ema.")}
        assert set(truth) <= set(ema), "ema subtree must hold every model key"
        differ = [k for k in truth if not torch.equal(ema[k], truth[k])]
        assert len(differ) > len(truth) // 2, "ema copy should carry different values (a real ambiguity)"
    if meta["dcp_style"] == "flat":
        assert isinstance(flat["train_state.log_steps"], io.BytesIO)
        assert flat["train_state.ntokens_seen"] == step * 64
        assert flat["train_state.step"].dtype == torch.int32 and int(flat["train_state.step"]) == step


# --------------------------------------------------------------------------- verl


def _mesh_coord(mesh: Any, rank: int) -> tuple[int, ...]:
    hits = (mesh.mesh == rank).nonzero()
    assert len(hits) == 1, (rank, mesh)
    return tuple(int(i) for i in hits[0])


def full_from_rank_files(states: list[dict[str, Any]], key: str) -> torch.Tensor:
    """Reassemble one DTensor from every rank's pickled local shard (test-side, independent of src/)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    pieces = [sd[key] for sd in states]
    assert all(isinstance(p, DTensor) for p in pieces), key
    placements = pieces[0].placements
    assert all(p.placements == placements for p in pieces), key
    shard_dims = [(i, pl.dim) for i, pl in enumerate(placements) if isinstance(pl, Shard)]
    assert all(isinstance(pl, (Shard, Replicate)) for pl in placements), placements
    assert len(shard_dims) <= 1, f"{key}: more than one sharded mesh dim {placements}"
    groups: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for rank, piece in enumerate(pieces):
        coord = _mesh_coord(piece.device_mesh, rank)
        if shard_dims:
            mesh_dim, _ = shard_dims[0]
            replica = coord[:mesh_dim] + coord[mesh_dim + 1 :]
            groups.setdefault(replica, []).append((coord[mesh_dim], piece._local_tensor))
        else:
            groups.setdefault(coord, []).append((0, piece._local_tensor))
    fulls = []
    for members in groups.values():
        members.sort(key=lambda m: m[0])
        if shard_dims:
            full = torch.cat([t for _, t in members], dim=shard_dims[0][1])
        else:
            full = members[0][1]
        assert tuple(full.shape) == tuple(pieces[0].shape), (key, full.shape, pieces[0].shape)
        fulls.append(full)
    for other in fulls[1:]:  # every replica carries the same values
        assert torch.equal(other, fulls[0]), f"{key}: replicas differ"
    return fulls[0]


def _rank_states(folder: Path, world_size: int) -> list[dict[str, Any]]:
    files = [folder / f"model_world_size_{world_size}_rank_{r}.pt" for r in range(world_size)]
    return [torch.load(f, map_location="cpu", weights_only=False) for f in files]


@pytest.mark.parametrize(("name", "step", "role"), _ckpt_params(("verl",)))
def test_verl_rank_files_match_truth(fsdp_corpus: dict[str, Path], name: str, step: int, role: str) -> None:
    """Concatenating the DTensor local shards of the verl rank files gives exactly the truth."""
    cdir = fsdp_corpus[name]
    meta = fsdp_build.load_case(name)
    entry = _entry(meta, step, role)
    folder = cdir / entry["path"]
    ws = meta["world_size"]
    for kind in ("model", "optim", "extra_state"):
        for r in range(ws):
            assert (folder / f"{kind}_world_size_{ws}_rank_{r}.pt").is_file(), (kind, r)
    states = _rank_states(folder, ws)
    truth = load_file(str(cdir / entry["truth"]))
    tied = meta["roles"][role]["tied_keys"]
    assert set(states[0]) == set(truth) | set(tied), sorted(set(states[0]) ^ (set(truth) | set(tied)))[:5]
    got = {k: full_from_rank_files(states, k) for k in states[0]}
    assert_bit_identical(got, truth, f"{name}/{entry['tag']}/{role}")
    for alias, canonical in tied.items():
        assert torch.equal(got[alias], truth[canonical]), alias
    seen = {str(tuple(v.placements)) for sd in states for v in sd.values()}
    assert seen == set(meta["placements"]), (seen, meta["placements"])


# --------------------------------------------------------------------------- training happened


def _init_state(spec: fsdp_build.FsdpCaseSpec) -> dict[str, torch.Tensor]:
    model = common.build_model(spec.model, seed=spec.seed)
    if spec.options.get("cast"):
        model = model.to(DTYPES[spec.options["cast"]])
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", [s.name for s in OWN])
def test_truth_moved_from_init(fsdp_corpus: dict[str, Path], name: str) -> None:
    """The last truth differs from the seeded init in every trainable tensor (frozen LoRA base: unchanged)."""
    spec = fsdp_build.CASES[name]
    meta = fsdp_build.load_case(name)
    init = _init_state(spec)
    entry = [c for c in meta["checkpoints"] if c.get("role") in (None, "actor")][-1]
    truth = load_file(str(fsdp_corpus[name] / entry["truth"]))
    if meta.get("lora"):
        base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in truth.items()}
        base = {k: v for k, v in base.items() if "lora_" not in k}
        assert set(base) == set(init)
        assert_bit_identical(base, init, f"{name}: frozen LoRA base")
        lora_b = [v for k, v in truth.items() if "lora_B" in k]
        assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "lora_B still zero: no training"
        return
    assert set(truth) == set(init)
    frozen = set(spec.model.get("frozen", []))  # names, or module prefixes ending in "." (a VLM's vision tower)
    is_frozen = {k: any(k == f or (f.endswith(".") and k.startswith(f)) for f in frozen) for k in truth}
    unchanged = [k for k in truth if torch.equal(truth[k], init[k]) and not is_frozen[k]]
    assert not unchanged, f"unchanged by training: {unchanged[:5]}"
    moved = [k for k in truth if is_frozen[k] and not torch.equal(truth[k], init[k])]
    assert not moved, f"frozen but changed: {moved[:5]}"


@pytest.mark.parametrize("name", [s.name for s in OWN if len(s.save_steps) > 1])
def test_checkpoints_differ_between_steps(fsdp_corpus: dict[str, Path], name: str, tmp_path: Path) -> None:
    """The saved weights (read back from the checkpoint files) change from one step to the next."""
    meta = fsdp_build.load_case(name)
    first, last = meta["checkpoints"][0], meta["checkpoints"][-1]
    assert first["step"] < last["step"]
    cdir = fsdp_corpus[name]
    if meta["kind"] == "dcp":
        a = _dcp_as_flat_dict(cdir / first["path"], tmp_path / "a")
        b = _dcp_as_flat_dict(cdir / last["path"], tmp_path / "b")
        keys = [k for k in a if k.startswith(meta["key_prefix"]) and isinstance(a[k], torch.Tensor)]
    else:
        a_states = _rank_states(cdir / first["path"], meta["world_size"])
        b_states = _rank_states(cdir / last["path"], meta["world_size"])
        keys = list(a_states[0])
        a = {k: full_from_rank_files(a_states, k) for k in keys}
        b = {k: full_from_rank_files(b_states, k) for k in keys}
    assert keys
    same = [k for k in keys if torch.equal(a[k], b[k])]
    assert not same, f"unchanged between {first['tag']} and {last['tag']}: {same[:5]}"


def test_comparator_detects_a_flipped_bit() -> None:
    """The bit-exact comparison used above is not vacuous: one ulp or a dtype change fails it."""
    truth = {"w": torch.randn(4, 3)}
    assert_bit_identical({"w": truth["w"].clone()}, truth, "same")
    bumped = truth["w"].clone()
    bumped[1, 2] = torch.nextafter(bumped[1, 2], torch.tensor(float("inf")))
    with pytest.raises(AssertionError):
        assert_bit_identical({"w": bumped}, truth, "one ulp")
    with pytest.raises(AssertionError):
        assert_bit_identical({"w": truth["w"].double()}, truth, "dtype")
    with pytest.raises(AssertionError):
        assert_bit_identical({}, truth, "missing")


# --------------------------------------------------------------------------- case.json


def _schema_sections() -> dict[str, set[str]]:
    sections: dict[str, set[str]] = {"common": set()}
    current = "common"
    for line in fsdp_build.CASE_SCHEMA_DOC.strip().splitlines():
        if line.startswith("--"):
            current = line.strip("- ").split()[0]  # "kind-specific" | "dcp" | "verl"
            sections.setdefault(current, set())
        elif line and not line[0].isspace():
            sections[current].add(line.split()[0])
    return sections


@pytest.mark.parametrize("name", [s.name for s in OWN])
def test_case_json_schema(fsdp_corpus: dict[str, Path], name: str) -> None:
    """case.json carries exactly the documented keys with sane values and paths."""
    cdir = fsdp_corpus[name]
    meta = fsdp_build.load_case(name)
    spec = fsdp_build.CASES[name]
    sections = _schema_sections()
    required = sections["common"] | sections["kind-specific"] | sections[spec.kind]
    assert required <= set(meta), sorted(required - set(meta))
    documented = set().union(*sections.values())
    assert set(meta) <= documented, f"undocumented case.json keys {sorted(set(meta) - documented)}"

    assert meta["name"] == name and meta["kind"] == spec.kind and meta["spec_hash"] == spec.spec_hash()
    assert meta["precision"] in ("fp32", "bf16") and meta["mixed_precision"] in (None, "bf16")
    assert meta["world_size"] == 2 and meta["torch_version"] == torch.__version__
    assert isinstance(meta["tied_keys"], dict) and meta["tied"] == bool(meta["tied_keys"])
    assert 0 < meta["build_seconds"] < 60, meta["build_seconds"]
    assert meta["head_dim"] in (32, 64) and meta["num_params"] > 0  # vLLM-loadable head sizes (MoE: 32)
    assert (cdir / meta["input"]).is_dir()
    steps = [c["step"] for c in meta["checkpoints"]]
    assert steps == sorted(steps) and sorted(set(steps)) == sorted(spec.save_steps)
    for c in meta["checkpoints"]:
        assert set(c) >= {"tag", "path", "truth", "step"}, c
        assert (cdir / c["path"]).is_dir() and (cdir / c["truth"]).is_file(), c
        assert not c["truth"].startswith(meta["input"] + "/")
        assert (c["path"] + "/").startswith(meta["input"] + "/"), c
        truth = load_file(str(cdir / c["truth"]))
        assert not set(truth) & set(meta["tied_keys"]), "tied alias must not be a truth key"
    if spec.kind == "dcp":
        for c in meta["checkpoints"]:
            assert (cdir / c["path"] / ".metadata").is_file()
            assert "role" not in c
        assert (cdir / meta["input"] / "config.json").is_file() == meta["has_config"]
        assert (cdir / meta["input"] / "tokenizer.json").is_file() == meta["has_tokenizer"]
        assert len(meta["model_subtrees"]) == (2 if meta["dcp_style"] == "ambiguous" else 1)
    else:
        root = cdir / meta["input"]
        assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == str(max(steps))
        assert {c["role"] for c in meta["checkpoints"]} == set(spec.options["roles"]) == set(meta["roles"])
        for c in meta["checkpoints"]:
            assert re.fullmatch(rf"{meta['input']}/global_step_{c['step']}/{c['role']}", c["path"]), c
            hf = cdir / c["path"] / "huggingface"
            assert (hf / "config.json").is_file() and (hf / "tokenizer.json").is_file()
            assert (cdir / c["path"] / "fsdp_config.json").is_file()
        assert meta["fsdp_version"] == 2 and meta["verl_version"] == fsdp_build.VERL_VERSION
        expect = ["(Replicate(), Shard(dim=0))"] if spec.options.get("mesh") else ["(Shard(dim=0),)"]
        assert meta["placements"] == expect
