"""Generator of the FSDP2 / torch DCP / verl checkpoint test corpus.

Every case is a REAL checkpoint written on this CPU (2 gloo ranks under ``torchrun``)
by the real framework -- ``torch.distributed.checkpoint.save`` on an FSDP2
(``fully_shard``) model, verl's own ``FSDPCheckpointManager.save_checkpoint``, or
HF ``Trainer`` with accelerate's FSDP2 plugin -- next to ground-truth safetensors
gathered from the live model at save time (``get_model_state_dict(...,
full_state_dict=True)``), never by reading the checkpoint back.

Usage (from the repo root)::

    python -m tests.corpus.fsdp_build            # build every missing case, print a table
    python -m tests.corpus.fsdp_build --rebuild  # wipe and rebuild everything
    python -m tests.corpus.fsdp_build dcp_qwen2_w2_nested_tied ...   # only some cases

Cache root: ``$VLLMC_CORPUS_DIR`` or ``<repo>/.cache/corpus``, then
``fsdp-torch-<torch version>-v<SCHEMA_VERSION>/``.  A case is complete only once its
``case.json`` exists (written last, atomically, by the launched script) and carries
the current spec hash.  ``<root>/.lock`` (flock) serialises builders, launch logs and
plans go to ``<root>/_logs/``, and the verl wheel is unpacked under
``<root>/_vendor/verl-<version>/`` (never installed into the environment).

Case directory layout (``<root>/<case>/``)::

    case.json                    metadata (schema: ``CASE_SCHEMA_DOC``)
    truth/<tag>[.<role>].safetensors   live full state dict, saved dtype, named_parameters() keys
    ckpt/                        dcp:  DCP folder(s) (``.metadata`` + ``__R_0.distcp``) [+ config, tokenizer]
                                 verl: latest_checkpointed_iteration.txt, global_step_N/{actor,critic}/
    run/checkpoint-N/            trainer_fsdp (written by ``trainer_fsdp_train.py``)

Script contract (every kind): ``torchrun --nproc_per_node W SCRIPT --plan PLAN.json``
with ``PLAN.json = {"cases": [case_plan, ...]}`` and ``case_plan`` keys ``name,
case_dir, kind, model, world_size, precision, save_steps, seed, options, meta``; the
script writes the checkpoint tree, ``truth/`` and finally ``case.json`` (= ``meta`` +
runtime facts, via ``common.write_json_atomic``).  Extra top-level plan keys (e.g.
``verl_path``) are kind-specific.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.corpus import build, cache, common
from tests.corpus.build import MOE_ARCHS, tiny, tiny_moe, tiny_vlm

#: Bump whenever the generator's output format / semantics change (new cache root).
SCHEMA_VERSION = 1

#: Per-kind generator revision, folded into each case's spec hash when non-zero.
#: Bump one to rebuild only the cases of that kind (e.g. after a script fix).
KIND_REVISION: dict[str, int] = {"dcp": 0, "verl": 0, "trainer_fsdp": 0}

#: verl release whose checkpoint manager writes the verl cases (folded into their hash).
VERL_VERSION = "0.9.1"

REPO_ROOT = build.REPO_ROOT
HERE = build.HERE

#: Launched script and user-facing input folder of each kind.
SCRIPTS: dict[str, str] = {"dcp": "fsdp_train.py", "verl": "verl_save.py", "trainer_fsdp": "trainer_fsdp_train.py"}
INPUTS: dict[str, str] = {"dcp": "ckpt", "verl": "ckpt", "trainer_fsdp": "run"}

CASE_SCHEMA_DOC = """
name            str   case name (= folder name)
kind            str   "dcp" (torch.distributed.checkpoint.save) | "verl" (FSDPCheckpointManager) | "trainer_fsdp"
arch            str   HF model_type of the (actor) model (llama, qwen2)
world_size      int   number of ranks that wrote the checkpoint
precision       str   "fp32" | "bf16": dtype of the parameters AS SAVED (= truth dtype)
mixed_precision str|null  FSDP2 MixedPrecisionPolicy param_dtype ("bf16") or null
tied            bool  lm_head tied to embed_tokens
tied_keys       dict  alias -> canonical named_parameters() name (the alias is not a truth key)
input           str   path (relative to the case dir) a user passes to the tool
checkpoints     list  [{tag, path, truth, step[, role]}] oldest first; path = folder holding the weights
                      (DCP folder with .metadata, or verl global_step_N/<role>); role: verl only
key_prefix      str   prefix of the model keys inside the checkpoint ("model.", "app.model.", "")
has_config      bool  config.json present (dcp: in input folder; verl: global_step_N/<role>/huggingface/)
has_tokenizer   bool  tokenizer files present likewise
head_dim        int
vocab_size      int
hidden_size     int
num_layers      int
num_params      int   unique parameter count of the (actor) model
torch_version   str
spec_hash       str   hash of the spec; a mismatch triggers a rebuild
build_seconds   float time the launched script spent on this case (excl. launcher/imports)
covers          str   human description of what the case exercises
-- kind-specific runtime facts (dcp and verl) --
placements      list  DTensor placements of the saved model tensors, e.g. ["(Shard(dim=0),)"]
mesh_shape      list  device mesh shape, e.g. [2] or [2, 1]
mesh_dim_names  list|null  e.g. ["fsdp"] or ["ddp", "fsdp"]
fsdp_units      list  modules wrapped by fully_shard ("<root>" for the root)
-- dcp only (facts read from the written .metadata, never used for the truth) --
dcp_style       str   "nested" | "app" | "flat" | "ambiguous"
dcp_top_keys    list  top-level keys of the dict passed to dcp.save
dcp_aliases     list  tied alias names that ARE stored in the checkpoint as their own entry
model_subtrees  list  prefixes under which a full copy of the model keys exists (2 for ambiguous)
non_model_entries list checkpoint keys that are neither model keys (incl. aliases) nor optimizer state
bytes_entries   list  BytesStorageMetadata keys outside the optimizer subtree
optimizer_bytes_entries int number of BytesStorageMetadata keys in the optimizer subtree
num_metadata_entries int  number of keys in .metadata state_dict_metadata
distcp_files    list  data files of the (last) DCP folder
-- verl only --
verl_version    str   version of verl whose FSDPCheckpointManager wrote the files
fsdp_version    int   FSDP version recorded by verl in fsdp_config.json
fsdp_config     dict  content of fsdp_config.json
roles           dict  {role: {model_class, config_architectures (as in huggingface/config.json),
                      num_params, tied_keys, fsdp_units}}
lora            dict|null  {r, lora_alpha, target_modules} of the LoRA case
role_files      list  names in the first global_step_N/<role>/ folder
huggingface_files list names in that folder's huggingface/
root_files      list  names in the verl root (input) folder
hf_config_saved_by str "verl FSDPCheckpointManager"
"""


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class FsdpCaseSpec:
    """Declarative description of one FSDP-family corpus case."""

    name: str
    kind: str  # "dcp" | "verl" | "trainer_fsdp"
    model: dict[str, Any]
    precision: str  # dtype of the params as saved
    key_prefix: str
    covers: str
    world_size: int = 2
    mixed_precision: str | None = None
    save_steps: tuple[int, ...] = (2,)
    seed: int = 0
    has_config: bool = False
    has_tokenizer: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def input(self) -> str:
        """Path (relative to the case dir) a user would pass to the tool."""
        return INPUTS[self.kind]

    def spec_hash(self) -> str:
        """Stable hash of the spec (+ schema version, kind revision, verl version)."""
        extra = {"verl": VERL_VERSION} if self.kind == "verl" else {}
        return cache.hash_spec(self, SCHEMA_VERSION, KIND_REVISION, **extra)

    def meta(self) -> dict[str, Any]:
        """Static part of ``case.json`` (the scripts add runtime facts)."""
        m = self.model
        return {
            "name": self.name,
            "kind": self.kind,
            "arch": m["arch"],
            "world_size": self.world_size,
            "precision": self.precision,
            "mixed_precision": self.mixed_precision,
            "tied": bool(m["tied"]),
            "input": self.input,
            "key_prefix": self.key_prefix,
            "has_config": self.has_config,
            "has_tokenizer": self.has_tokenizer,
            "head_dim": common.head_dim_of(m),
            "vocab_size": m["vocab"],
            "hidden_size": m["hidden"],
            "num_layers": m["layers"],
            "spec_hash": self.spec_hash(),
            "covers": self.covers,
        }

    def plan(self, case_dir: Path) -> dict[str, Any]:
        """JSON-able instructions for the launched script (see the module docstring)."""
        return {
            "name": self.name,
            "case_dir": str(case_dir),
            "kind": self.kind,
            "model": self.model,
            "world_size": self.world_size,
            "precision": self.precision,
            "save_steps": list(self.save_steps),
            "seed": self.seed,
            "options": self.options,
            "meta": self.meta(),
        }


def _qwen2_tied() -> dict[str, Any]:
    return tiny("qwen2", tied=True, vllm=True)


def _llama() -> dict[str, Any]:
    return tiny("llama", vllm=True)


def _verl(name: str, model: dict[str, Any], covers: str, seed: int, **kw: Any) -> FsdpCaseSpec:
    """A verl case: fp32 params (bf16 MixedPrecisionPolicy, verl's default), config + tokenizer, one save."""
    kw.setdefault("save_steps", (1,))
    return FsdpCaseSpec(
        name,
        "verl",
        model,
        "fp32",
        "",
        covers,
        mixed_precision="bf16",
        seed=seed,
        has_config=True,
        has_tokenizer=True,
        **kw,
    )


_SPECS: list[FsdpCaseSpec] = [
    # ---- plain torch DCP of an FSDP2 model (tests/corpus/fsdp_train.py)
    FsdpCaseSpec(
        "dcp_qwen2_w2_nested_tied",
        "dcp",
        _qwen2_tied(),
        "fp32",
        "model.",
        'FSDP2 tied qwen2 fp32; dcp.save({"model": ..., "optim": ...}) at ckpt/step-2 and ckpt/step-4; '
        "config+tokenizer+generation_config in ckpt/",
        save_steps=(2, 4),
        seed=40,
        has_config=True,
        has_tokenizer=True,
        options={"style": "nested", "subdirs": True},
    ),
    FsdpCaseSpec(
        "dcp_llama_w2_app_bf16mp",
        "dcp",
        _llama(),
        "fp32",
        "app.model.",
        'FSDP2 llama with bf16 MixedPrecisionPolicy (fp32 params saved); torch-tutorial AppState: dcp.save({"app": '
        "AppState}) straight into ckpt/ (ckpt/.metadata); no config, no tokenizer",
        mixed_precision="bf16",
        seed=41,
        options={"style": "app", "subdirs": False},
    ),
    FsdpCaseSpec(
        "dcp_llama_w2_flat_bf16",
        "dcp",
        _llama(),
        "bf16",
        "",
        "FSDP2 llama cast to bf16 before fully_shard; torchtitan-like flat model keys + optimizer.* + "
        "train_state (scalar tensor, int, BytesIO) at ckpt/step-3; config+tokenizer in ckpt/",
        save_steps=(3,),
        seed=42,
        has_config=True,
        has_tokenizer=True,
        options={"style": "flat", "subdirs": True, "cast": "bf16"},
    ),
    FsdpCaseSpec(
        "dcp_qwen2_w2_ambiguous",
        "dcp",
        _qwen2_tied(),
        "fp32",
        "model.",
        'tied qwen2 saved as {"model": sd, "ema": EMA copy (different values), "optim": ...}: two full model '
        "subtrees -> a reader must refuse as ambiguous; truth = the model subtree",
        seed=43,
        has_config=True,
        has_tokenizer=True,
        options={"style": "ambiguous", "subdirs": True},
    ),
    # ---- MoE families (issue 25): FSDP2 shards the fused [E, ...] expert parameters on the expert dim
    *(
        FsdpCaseSpec(
            f"dcp_{arch.replace('_', '')}_w2",
            "dcp",
            tiny_moe(arch),
            "fp32",
            "model.",
            f'FSDP2 {arch} fp32 (fused expert parameters); dcp.save({{"model": ..., "optim": ...}}) at ckpt/step-2; '
            "config+tokenizer in ckpt/",
            seed=80 + i,
            has_config=True,
            has_tokenizer=True,
            options={"style": "nested", "subdirs": True},
        )
        for i, arch in enumerate(MOE_ARCHS)
    ),
    # ---- vision-language families (issue 25): one with a frozen vision tower, one trained
    FsdpCaseSpec("dcp_qwen2vl_w2_frozen", "dcp", tiny_vlm("qwen2_vl", frozen_vision=True), "fp32", "model.",
                 "FSDP2 Qwen2-VL fp32, vision tower frozen; dcp.save at ckpt/step-2; config+tokenizer in ckpt/",
                 seed=95, has_config=True, has_tokenizer=True, options={"style": "nested", "subdirs": True}),
    # LLaVA's trained CLIP tower would leave post_layernorm untouched (LLaVA takes the hidden states before it)
    FsdpCaseSpec("dcp_llava_w2_frozen", "dcp", tiny_vlm("llava", frozen_vision=True), "fp32", "model.",
                 "FSDP2 LLaVA fp32, vision tower frozen; dcp.save at ckpt/step-2; config+tokenizer in ckpt/",
                 seed=96, has_config=True, has_tokenizer=True, options={"style": "nested", "subdirs": True}),
    FsdpCaseSpec("dcp_qwen25vl_w2", "dcp", tiny_vlm("qwen2_5_vl"), "fp32", "model.",
                 "FSDP2 Qwen2.5-VL fp32 (windowed + full-attention vision blocks), vision tower trained; dcp.save at "
                 "ckpt/step-2; config+tokenizer in ckpt/", seed=97, has_config=True, has_tokenizer=True,
                 options={"style": "nested", "subdirs": True}),
    FsdpCaseSpec("dcp_gemma3_w2", "dcp", tiny_vlm("gemma3"), "fp32", "model.",
                 "FSDP2 Gemma 3 fp32 (SigLIP tower trained, tied head); dcp.save at ckpt/step-2; config+tokenizer "
                 "in ckpt/", seed=98, has_config=True, has_tokenizer=True,
                 options={"style": "nested", "subdirs": True}),
    # ---- verl FSDPCheckpointManager on fully_shard models (tests/corpus/verl_save.py)
    _verl(
        "verl_qwen2_w2_tied",
        _qwen2_tied(),
        "verl actor (tied qwen2, fp32 params, bf16 MixedPrecisionPolicy as verl's default), "
        "global_step_1 + global_step_2, latest_checkpointed_iteration.txt -> 2",
        50,
        save_steps=(1, 2),
        options={"roles": ["actor"]},
    ),
    _verl(
        "verl_llama_w2_critic",
        _llama(),
        "verl actor (untied llama) + critic (AutoModelForTokenClassification, num_labels=1) in "
        "global_step_1/{actor,critic}",
        51,
        options={"roles": ["actor", "critic"]},
    ),
    _verl(
        "verl_qwen2_w2_hsdp",
        _qwen2_tied(),
        "verl actor on an HSDP mesh (2 replicas x 1 shard, verl's ddp/fsdp dim names): every rank file holds "
        "DTensors with (Replicate(), Shard(dim=0)) placements and full-size local tensors",
        52,
        options={"roles": ["actor"], "mesh": [2, 1]},
    ),
    _verl(
        "verl_qwen2_w2_lora",
        _qwen2_tied(),
        "verl actor wrapped in a peft LoRA model (r=8, all-linear): rank files hold base_model.model.* keys with "
        "base_layer/lora_A/lora_B + lora_train_meta.json -> a reader must refuse; truth = full peft state",
        53,
        options={"roles": ["actor"], "lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}},
    ),
    _verl(
        "verl_qwen3moe_w2",
        tiny_moe("qwen3_moe"),
        "verl actor, Qwen3-MoE (issue 25): verl's apply_fsdp2 shards the fused [E, ...] expert parameters; rank "
        "files hold the fused training names, huggingface/ the config",
        54,
        options={"roles": ["actor"]},
    ),
    _verl(
        "verl_qwen2vl_w2",
        tiny_vlm("qwen2_vl"),
        "verl actor, Qwen2-VL on image batches (vision tower trained): rank files hold the training names "
        "(model.language_model.*, model.visual.*), as in verl#4498/#5603",
        55,
        options={"roles": ["actor"]},
    ),
    # ---- HF Trainer + accelerate FSDP2 (tests/corpus/trainer_fsdp_train.py, written separately)
    FsdpCaseSpec(
        "trainer_fsdp_qwen2_tied",
        "trainer_fsdp",
        _qwen2_tied(),
        "fp32",
        "model.",
        "HF Trainer + FSDP2 SHARDED_STATE_DICT, tied qwen2, run/checkpoint-2 and -4",
        save_steps=(2, 4),
        seed=60,
        has_config=True,
        has_tokenizer=True,
    ),
    FsdpCaseSpec(
        "trainer_fsdp_llama_bf16mp",
        "trainer_fsdp",
        _llama(),
        "fp32",
        "model.",
        "HF Trainer + FSDP2 SHARDED_STATE_DICT with bf16 mixed precision, llama, run/checkpoint-2 and -4",
        mixed_precision="bf16",
        save_steps=(2, 4),
        seed=61,
        options={"mixed_precision": "bf16"},
    ),
]

CASES: dict[str, FsdpCaseSpec] = {c.name: c for c in _SPECS}


# --------------------------------------------------------------------------- paths / cache


def torch_version() -> str:
    """Installed torch version, read without importing torch (cheap)."""
    return cache.dist_version("torch")


CACHE = cache.Cache(lambda: f"fsdp-torch-{torch_version()}-v{SCHEMA_VERSION}", "fsdp-corpus")
#: Root folder of this corpus (``$VLLMC_CORPUS_DIR`` or ``<repo>/.cache/corpus``, then a versioned dir).
corpus_root = CACHE.root
case_dir = CACHE.case_dir
load_case = CACHE.load_case
is_complete = CACHE.is_complete


def verl_path() -> Path:
    """Folder holding the unpacked ``verl`` package (downloaded with pip, ``--no-deps``, on first use).

    verl is never installed into the environment: its wheel is unpacked under
    ``<root>/_vendor/verl-<version>/`` and put on ``sys.path`` by ``verl_save.py`` only.
    Call with the build lock held.
    """
    dest = corpus_root() / "_vendor" / f"verl-{VERL_VERSION}"
    if (dest / "verl" / "utils" / "checkpoint" / "fsdp_checkpoint_manager.py").is_file():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        # scripts/bootstrap.sh fetches the wheel at set-up time; download here only if it is missing.
        wheels = list((REPO_ROOT / ".cache" / "wheels").glob(f"verl-{VERL_VERSION}-*.whl"))
        if len(wheels) != 1:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, f"verl=={VERL_VERSION}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            wheels = list(Path(tmp).glob("verl-*.whl"))
            if proc.returncode != 0 or len(wheels) != 1:
                raise RuntimeError(f"could not download verl=={VERL_VERSION}: {proc.stdout}{proc.stderr}")
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(unpacked, members=[n for n in zf.namelist() if n.startswith("verl/")])
        (unpacked / "verl" / "utils" / "checkpoint" / "fsdp_checkpoint_manager.py").stat()
        unpacked.rename(dest)
    return dest


# --------------------------------------------------------------------------- launching


def _build_group(kind: str, specs: list[FsdpCaseSpec]) -> None:
    """One ``torchrun --nproc_per_node W`` launch of the kind's script for the whole group."""
    ws = specs[0].world_size
    plan: dict[str, Any] = {"cases": [s.plan(case_dir(s.name)) for s in specs]}
    if kind == "verl":
        plan["verl_path"] = str(verl_path())
    # DeepSpeed is not involved here (harmless either way).
    CACHE.launch("torchrun", SCRIPTS[kind], ws, plan, f"{kind}_w{ws}", env={"DS_ACCELERATOR": None})


# --------------------------------------------------------------------------- public API


def build_all(names: list[str] | None = None, *, rebuild: bool = False, verbose: bool = False) -> dict[str, Path]:
    """Build every missing (or stale) case; return ``{name: case_dir}`` for the requested cases.

    Cases are grouped by (kind, world size): one ``torchrun`` launch builds a whole group
    in sequence.  Stale/partial case folders are deleted first.
    """
    wanted = [CASES[n] for n in (names or list(CASES))]
    return CACHE.build(wanted, _steps, rebuild=rebuild, verbose=verbose)


def _steps(todo: list[FsdpCaseSpec]) -> list[tuple[str, Callable[[], None]]]:
    groups: dict[tuple[str, int], list[FsdpCaseSpec]] = {}
    for spec in todo:
        groups.setdefault((spec.kind, spec.world_size), []).append(spec)
    return [
        (f"{kind} world_size={ws} ({len(g)} cases)", lambda kind=kind, g=g: _build_group(kind, g))
        for (kind, ws), g in groups.items()
    ]


_COLUMNS: list[cache.Column] = [
    ("kind", "kind"),
    ("arch", "arch"),
    ("ws", "world_size"),
    ("prec", "precision"),
    ("mp", lambda c: str(c.get("mixed_precision") or "-")),
    cache.TIED_COLUMN,
    ("prefix", lambda c: repr(c.get("key_prefix"))),
    cache.CKPTS_COLUMN,
    cache.PARAMS_COLUMN,
    cache.SECS_COLUMN,
]


def main(argv: list[str] | None = None) -> None:
    """CLI: build the corpus and print a summary table."""
    CACHE.cli(argv, doc=__doc__, cases=CASES, build_all=build_all, columns=_COLUMNS, title="corpus")


if __name__ == "__main__":
    main()
