"""Generator of the LoRA test corpus: HF Trainer + peft LoRA under DeepSpeed ZeRO-2/3, plus plain peft folders.

Every ``lora`` case is a REAL ``Trainer`` run (2 CPU ranks, bf16, ``deepspeed``
launcher) of a peft ``LoraConfig`` on a tiny vLLM-sized base model, leaving
``run/checkpoint-2`` and ``run/checkpoint-4``.  Ground truth is gathered from the
live engine in an ``on_save`` callback (fp32 masters via
``safe_get_full_fp32_param``), and the reference merge is computed by peft itself
(``merge_and_unload`` on a fresh fp32 base loaded from ``base/``).  ``peft_folder``
cases are plain ``PeftModel.save_pretrained`` folders written without DeepSpeed.

Usage (from the repo root)::

    python -m tests.corpus.lora_build               # build missing/stale cases, print a table
    python -m tests.corpus.lora_build --rebuild     # force
    python -m tests.corpus.lora_build NAME ...      # only some cases

Cache root: ``$VLLMC_CORPUS_DIR`` or ``<repo>/.cache/corpus``, then
``lora-ds-<deepspeed version>-peft-<peft version>-v<SCHEMA_VERSION>/``.  A case is
complete only once ``case.json`` exists (written last, atomically, by this
process) with the current spec hash.

Case directory layout (``<root>/<case>/``)::

    case.json                                   metadata (schema: ``CASE_SCHEMA_DOC``)
    base/                                       fp32 base: save_pretrained + tokenizer + generation config
    hf_cache/models--local--<case>-base/        (one case) offline HF hub cache holding base/ by name
    run/checkpoint-{2,4}/                       lora: what Trainer + DeepSpeed wrote
    adapter/                                    peft_folder: PeftModel.save_pretrained output
    truth/<tag>.adapter.safetensors             fp32 trainable params, keys = live peft names
    truth/<tag>.merged.safetensors              fp32 peft merge_and_unload() of base/ + adapter truth
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.corpus import build, cache, common
from tests.corpus.build import tiny, tiny_moe, tiny_vlm

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

#: Bump whenever the generator's output format / semantics change (new cache root).
SCHEMA_VERSION = 1

#: Per-kind generator revision folded into the spec hash when non-zero (rebuilds only that kind).
KIND_REVISION: dict[str, int] = {"lora": 0, "peft_folder": 0}

REPO_ROOT = build.REPO_ROOT
HERE = build.HERE

CASE_SCHEMA_DOC = """
name              str   case name (= folder name)
kind              str   "lora" (Trainer + peft + DeepSpeed run) | "peft_folder" (plain PeftModel.save_pretrained)
arch              str   HF model_type of the base (llama, qwen2)
stage             int|null  ZeRO stage (null for peft_folder)
world_size        int   ranks that wrote the checkpoint (1 for peft_folder)
precision         str   training precision ("bf16"); "fp32" for peft_folder (saved dtype)
tied              bool  base lm_head tied to embed_tokens
tied_keys         dict  base alias -> canonical name, e.g. {"lm_head.weight": "model.embed_tokens.weight"}
merged_tied_keys  dict  same for the merged model (tied_map of merge_and_unload's result)
input             str   folder (relative to the case dir) a user would pass: "run" | "adapter"
checkpoints       list  [{tag, path, adapter_truth, merged_truth, step}] relative paths, oldest first
lora_config       dict  adapter_config.json exactly as peft wrote it (identical in every checkpoint)
base_dir          str   "base": fp32 save_pretrained folder of the base model
base_ref          str   "hf_cache" (adapter names the base by hub id) | "path" (absolute path)
base_name_or_path str   base_model_name_or_path as written into adapter_config.json
hf_cache          str|null  "hf_cache" (HF_HUB_CACHE layout that resolves base_name_or_path offline) or null
hf_cache_commit   str|null  snapshot commit hash (refs/main) of the cached base
trainer_wrote     dict  tag -> sorted relative file list of what the framework wrote into that folder
                        (Trainer + DeepSpeed for lora; PeftModel.save_pretrained for peft_folder)
run_top_level     list  lora only: entries of run/ after training (Trainer writes only checkpoint-N/ there)
trainable         list  live peft names of the trainable params (= keys of every adapter truth file)
zero_init         list  live names of the LoRA factors peft initialises to zero (lora_B, lora_embedding_A)
adapter_file_dtype str  dtype of the tensors in adapter_model.safetensors ("bf16" | "fp32")
peft_version      str
deepspeed_version str
torch_version     str
transformers_version str
num_params        int   unique parameter count of the peft-wrapped model (base + adapter + modules_to_save copies)
num_trainable     int   trainable parameter count
spec_hash         str   hash of the LoraCaseSpec; a mismatch triggers a rebuild
build_seconds     float wall time of the whole case build (base + launch + truth)
covers            str   human description of what the case exercises
"""

#: Target names of a qwen2/llama decoder's linear layers.
_ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class LoraCaseSpec:
    """Declarative description of one LoRA corpus case."""

    name: str
    kind: str  # "lora" | "peft_folder"
    model: dict[str, Any]
    lora: dict[str, Any]  # LoraConfig kwargs (JSON-able)
    stage: int | None = None
    world_size: int = 1
    precision: str = "fp32"
    base_ref: str = "path"  # "path" | "hf_cache"
    save_steps: tuple[int, ...] = ()
    seed: int = 0
    zero_extra: dict[str, Any] = field(default_factory=dict)
    covers: str = ""

    @property
    def input(self) -> str:
        """Folder (relative to the case dir) a user would pass to the tool."""
        return {"lora": "run", "peft_folder": "adapter"}[self.kind]

    @property
    def repo_id(self) -> str:
        """Hub id under which the base is laid out in ``hf_cache/``."""
        return f"local/{self.name}-base"

    def spec_hash(self) -> str:
        """Stable hash of the spec (+ schema version, kind revision) used for cache invalidation."""
        return cache.hash_spec(self, SCHEMA_VERSION, KIND_REVISION)

    def meta(self) -> dict[str, Any]:
        """Static part of ``case.json``."""
        return {
            "name": self.name,
            "kind": self.kind,
            "arch": self.model["arch"],
            "stage": self.stage,
            "world_size": self.world_size,
            "precision": self.precision,
            "input": self.input,
            "base_dir": "base",
            "base_ref": self.base_ref,
            "hf_cache": "hf_cache" if self.base_ref == "hf_cache" else None,
            "spec_hash": self.spec_hash(),
            "covers": self.covers,
        }


def _lora(name: str, model: dict[str, Any], stage: int, lora: dict[str, Any], covers: str, **kw: Any) -> LoraCaseSpec:
    kw.setdefault("save_steps", (2, 4))
    return LoraCaseSpec(
        name=name,
        kind="lora",
        model=model,
        lora=lora,
        stage=stage,
        world_size=2,
        precision="bf16",
        covers=covers,
        **kw,
    )


_SPECS: list[LoraCaseSpec] = [
    _lora(
        "lora_qwen2_z2_tied",
        tiny("qwen2", tied=True, vllm=True),
        2,
        dict(r=8, lora_alpha=16, target_modules=[*_ALL_LINEAR, "embed_tokens"], bias="none", task_type="CAUSAL_LM"),
        "ZeRO-2 Trainer, tied qwen2, LoRA on all linears + the (tied) embedding; base named by hub id via hf_cache/",
        base_ref="hf_cache",
        seed=40,
    ),
    _lora(
        "lora_llama_z3_mts",
        tiny("llama", vllm=True, attention_bias=True),
        3,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            modules_to_save=["lm_head"],
            bias="lora_only",
            task_type="CAUSAL_LM",
        ),
        "ZeRO-3 (no 16-bit gather) Trainer, untied llama with attention biases, q/v LoRA, bias='lora_only' "
        "(trained q/v biases), modules_to_save=['lm_head'] (full trained lm_head copy)",
        seed=41,
    ),
    _lora(
        "lora_qwen2_z2_rslora",
        tiny("qwen2", vllm=True),
        2,
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "up_proj"],
            use_rslora=True,
            rank_pattern={"model.layers.0.self_attn.q_proj": 16},
            alpha_pattern={"v_proj": 32},
            task_type="CAUSAL_LM",
        ),
        "ZeRO-2 Trainer, untied qwen2, rsLoRA (alpha/sqrt(r)); rank_pattern on layer 0 q_proj only (16, layer 1 "
        "keeps 4), alpha_pattern on every v_proj (32)",
        seed=42,
    ),
    _lora(
        "lora_qwen2_z3_tied",
        tiny("qwen2", tied=True, vllm=True),
        3,
        dict(r=8, lora_alpha=16, target_modules="all-linear"),
        "ZeRO-3 (no 16-bit gather) Trainer, tied qwen2, target_modules='all-linear' (lm_head excluded by peft), "
        "no task_type (plain PeftModel instead of PeftModelForCausalLM)",
        seed=43,
    ),
    LoraCaseSpec(
        name="peft_dora_qwen2",
        kind="peft_folder",
        model=tiny("qwen2", vllm=True),
        lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
        seed=44,
        covers="plain peft folder, DoRA (lora_magnitude_vector), random non-zero weights: merge must refuse",
    ),
    LoraCaseSpec(
        name="peft_plain_qwen2",
        kind="peft_folder",
        model=tiny("qwen2", vllm=True),
        lora=dict(r=8, lora_alpha=16, target_modules=[*_ALL_LINEAR, "lm_head"]),
        seed=45,
        covers="plain fp32 peft folder (no DeepSpeed), random non-zero A/B, LoRA also on the untied lm_head "
        "(so peft also stores lm_head.base_layer.weight)",
    ),
]

_SPECS.extend((  # issue 25
    _lora(
        "lora_mixtral_z3_attn",
        tiny_moe("mixtral"),
        3,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"),
        "ZeRO-3 (no 16-bit gather) Trainer, Mixtral, LoRA on the attention projections only (mergeable): the "
        "merged model's experts are the base's per-expert tensors",
        seed=47,
    ),
    _lora(
        "lora_qwen2vl_z2_lm",
        tiny_vlm("qwen2_vl"),
        2,
        dict(r=4, lora_alpha=8, target_modules=r".*\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj"
             r"|down_proj)", task_type="CAUSAL_LM"),
        "ZeRO-2 Trainer on image batches, Qwen2-VL, LoRA on the language model's linear layers only (a regex); "
        "vision tower and merger frozen by peft; base/ holds save_pretrained's names (model.layers.*, visual.*)",
        seed=48,
    ),
))

CASES: dict[str, LoraCaseSpec] = {c.name: c for c in _SPECS}
#: MoE cases: base/ and the output hold per-expert names, the truth the in-memory fused ones; tests/test_moe.py
#: compares them through save_pretrained, so the tests that compare names one to one leave them out.
MOE_CASES = frozenset(n for n, c in CASES.items() if c.model["arch"] in build.MOE_ARCHS)
#: Vision-language cases: likewise (base/ and the output hold save_pretrained's prefixes; tests/test_vlm.py).
VLM_CASES = frozenset(n for n, c in CASES.items() if c.model.get("vision"))
#: The cases whose written names are not the live model's: left out of the one-to-one name comparisons.
RENAMED_CASES = MOE_CASES | VLM_CASES


# --------------------------------------------------------------------------- paths / cache


CACHE = cache.Cache(
    lambda: f"lora-ds-{cache.deepspeed_version()}-peft-{cache.dist_version('peft')}-v{SCHEMA_VERSION}", "lora-corpus"
)
#: Root folder of the cached LoRA corpus.
corpus_root = CACHE.root
case_dir = CACHE.case_dir
load_case = CACHE.load_case
is_complete = CACHE.is_complete
list_files = common.list_files


# --------------------------------------------------------------------------- base model + hub cache


def write_hf_cache(src: Path, cache: Path, repo_id: str) -> str:
    """Lay ``src``'s files out as the HF hub cache does; return the snapshot commit hash.

    ``<cache>/models--<org>--<name>/{blobs/<hash>, refs/main, snapshots/<commit>/<file> -> ../../blobs/<hash>}``;
    blob names are the sha256 for LFS-style weight files and the git blob sha1 otherwise, as on the Hub.
    """
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    entries: list[tuple[str, str]] = []
    for rel in list_files(src):
        data = (src / rel).read_bytes()
        if rel.endswith((".safetensors", ".bin")):
            digest = hashlib.sha256(data).hexdigest()
        else:
            digest = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo_dir / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        entries.append((rel, digest))
    commit = hashlib.sha1(json.dumps(entries).encode()).hexdigest()
    snap = repo_dir / "snapshots" / commit
    for rel, digest in entries:
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(repo_dir / "blobs" / digest, link.parent), link)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)  # the hub writes the bare hash, no newline
    return commit


def write_base(spec: LoraCaseSpec, cdir: Path) -> dict[str, Any]:
    """Save the fp32 base (weights, config, generation config, tokenizer) to ``base/`` [+ ``hf_cache/``]."""
    model = common.build_model(spec.model, seed=spec.seed)
    base = cdir / "base"
    model.save_pretrained(base)  # fp32 safetensors (tied lm_head not stored)
    model.generation_config.save_pretrained(base)
    common.build_tokenizer().save_pretrained(base)
    assert (base / "model.safetensors").is_file()
    info: dict[str, Any] = {"tied_keys": common.tied_map(model), "hf_cache_commit": None}
    info["tied"] = bool(info["tied_keys"])
    if spec.base_ref == "hf_cache":
        info["hf_cache_commit"] = write_hf_cache(base, cdir / "hf_cache", spec.repo_id)
        info["base_name"] = spec.repo_id
    else:
        info["base_name"] = str(base)
    return info


# --------------------------------------------------------------------------- reference merge (peft itself)


@contextlib.contextmanager
def no_hf_zero3() -> Iterator[None]:
    """Hide Trainer's global DeepSpeed config so ``from_pretrained`` builds a plain (unpartitioned) model.

    Under a ZeRO-3 Trainer run, transformers would otherwise wrap model creation in
    ``deepspeed.zero.Init`` and load weights with collective gathers (rank 0 alone would hang).
    """
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def reference_merge(
    base_dir: Path, lora_config: Any, adapter: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """peft's own merge: fresh fp32 base from ``base_dir`` + ``lora_config`` + ``adapter`` (live names), merged.

    Returns ``(named_parameters() of the merged model in fp32, tied_map of the merged model)``.
    """
    import torch
    from peft import get_peft_model

    with no_hf_zero3():
        base = auto_class(base_dir).from_pretrained(str(base_dir), dtype=torch.float32)
        model = get_peft_model(base, copy.deepcopy(lora_config))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == set(adapter), (sorted(trainable ^ set(adapter)))[:10]
        own = model.state_dict()
        for k, v in adapter.items():
            assert own[k].shape == v.shape, (k, own[k].shape, v.shape)
        missing, unexpected = model.load_state_dict(adapter, strict=False)
        assert not unexpected, unexpected
        assert not set(adapter) & set(missing)
        for k, v in adapter.items():
            assert torch.equal(model.get_parameter(k).detach(), v), k
        merged = model.merge_and_unload()
    out = {n: p.detach().float().contiguous().clone() for n, p in merged.named_parameters()}
    return out, common.tied_map(merged)


def auto_class(base_dir: Path | str) -> Any:
    """The transformers auto class that loads the base: image-text-to-text for a vision-language model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    vision = hasattr(AutoConfig.from_pretrained(str(base_dir)), "vision_config")
    return AutoModelForImageTextToText if vision else AutoModelForCausalLM


def zero_init_names(names: list[str]) -> list[str]:
    """Live names of the LoRA factors peft initialises to zero (lora_B for Linear, lora_embedding_A for Embedding)."""
    return [n for n in names if ".lora_B." in n or ".lora_embedding_A." in n]


# --------------------------------------------------------------------------- builders


def _build_lora(spec: LoraCaseSpec) -> None:
    """Base first, then the Trainer run under the deepspeed launcher, then case.json."""
    t0 = time.time()
    cdir = case_dir(spec.name)
    cdir.mkdir(parents=True)
    info = write_base(spec, cdir)
    plan = {
        "name": spec.name,
        "case_dir": str(cdir),
        "model": spec.model,
        "stage": spec.stage,
        "world_size": spec.world_size,
        "precision": spec.precision,
        "save_steps": list(spec.save_steps),
        "seed": spec.seed,
        "zero_extra": spec.zero_extra,
        "lora": spec.lora,
        "base_dir": str(cdir / "base"),
        "base_name": info["base_name"],
        "hf_cache": str(cdir / "hf_cache") if spec.base_ref == "hf_cache" else None,
    }
    # The hf_cache case resolves the base by hub id exactly as a user would: HF_HUB_CACHE + offline.
    env = {"HF_HUB_CACHE": plan["hf_cache"]} if plan["hf_cache"] else {}
    CACHE.launch("deepspeed", "lora_train.py", spec.world_size, plan, spec.name, env=env)
    partial = cdir / "_meta.json"
    meta = spec.meta()
    meta.update(json.loads(partial.read_text()))
    meta.update(tied=info["tied"], tied_keys=info["tied_keys"], hf_cache_commit=info["hf_cache_commit"])
    assert meta["base_name_or_path"] == info["base_name"], (meta["base_name_or_path"], info["base_name"])
    meta["build_seconds"] = round(time.time() - t0, 2)
    partial.unlink()
    common.write_json_atomic(cdir / "case.json", meta)


def _build_peft_folder(spec: LoraCaseSpec) -> None:
    """A plain ``PeftModel.save_pretrained`` folder with random non-zero adapter weights + peft's merge."""
    t0 = time.time()
    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cdir = case_dir(spec.name)
    cdir.mkdir(parents=True)
    info = write_base(spec, cdir)
    base = AutoModelForCausalLM.from_pretrained(info["base_name"], dtype=torch.float32)
    torch.manual_seed(spec.seed)
    model = get_peft_model(base, LoraConfig(**spec.lora))
    gen = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=gen)
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.1 * noise)  # keep the magnitude near the weight norm, but not equal to it
            else:
                p.copy_(0.05 * noise)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapter = {n: model.get_parameter(n).detach().float().contiguous().clone() for n in trainable}
    for n in zero_init_names(trainable):
        assert adapter[n].abs().sum() > 0, n
    out = cdir / "adapter"
    model.save_pretrained(str(out))
    merged, merged_tied = reference_merge(cdir / "base", model.peft_config["default"], adapter)
    common.save_truth(cdir / "truth" / "adapter.adapter.safetensors", adapter)
    common.save_truth(cdir / "truth" / "adapter.merged.safetensors", merged)
    lora_config = json.loads((out / "adapter_config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as fh:
        dtypes = {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}
    meta = spec.meta()
    meta.update(
        tied=info["tied"],
        tied_keys=info["tied_keys"],
        merged_tied_keys=merged_tied,
        hf_cache_commit=info["hf_cache_commit"],
        checkpoints=[
            {
                "tag": "adapter",
                "path": "adapter",
                "adapter_truth": "truth/adapter.adapter.safetensors",
                "merged_truth": "truth/adapter.merged.safetensors",
                "step": 0,
            }
        ],
        lora_config=lora_config,
        base_name_or_path=lora_config["base_model_name_or_path"],
        trainer_wrote={"adapter": list_files(out)},
        trainable=trainable,
        zero_init=zero_init_names(trainable),
        adapter_file_dtype={"F32": "fp32", "BF16": "bf16"}.get("".join(sorted(dtypes)), "".join(sorted(dtypes))),
        peft_version=peft.__version__,
        deepspeed_version=cache.deepspeed_version(),
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        num_params=sum(p.numel() for p in model.parameters()),
        num_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    assert meta["base_name_or_path"] == info["base_name"], (meta["base_name_or_path"], info["base_name"])
    meta["build_seconds"] = round(time.time() - t0, 2)
    common.write_json_atomic(cdir / "case.json", meta)


# --------------------------------------------------------------------------- public API


def build_all(names: list[str] | None = None, *, rebuild: bool = False, verbose: bool = False) -> dict[str, Path]:
    """Build every missing (or stale) case; return ``{name: case_dir}`` for the requested cases."""
    wanted = [CASES[n] for n in (names or list(CASES))]
    return CACHE.build(wanted, _steps, rebuild=rebuild, verbose=verbose)


def _steps(todo: list[LoraCaseSpec]) -> list[tuple[str, Callable[[], None]]]:
    builders = {"lora": _build_lora, "peft_folder": _build_peft_folder}
    return [(f"{s.kind} {s.name}", lambda s=s: builders[s.kind](s)) for s in todo]


_COLUMNS: list[cache.Column] = [
    ("kind", "kind"),
    ("arch", "arch"),
    ("st", "stage"),
    cache.TIED_COLUMN,
    ("base_ref", "base_ref"),
    cache.CKPTS_COLUMN,
    cache.PARAMS_COLUMN,
    ("trainable", "num_trainable"),
    cache.SECS_COLUMN,
]


def main(argv: list[str] | None = None) -> None:
    """CLI: build the LoRA corpus and print a summary table."""
    CACHE.cli(argv, doc=__doc__, cases=CASES, build_all=build_all, columns=_COLUMNS, title="lora corpus")


if __name__ == "__main__":
    main()
