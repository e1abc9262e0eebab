"""Generator of the DeepSpeed ZeRO checkpoint test corpus.

Every case is a REAL checkpoint written by DeepSpeed (or HF Trainer + DeepSpeed,
or ``transformers.save_pretrained``) on this CPU, next to a ground-truth
safetensors file gathered from the live engine at save time.  Results are cached
under :func:`corpus_root`; a case is complete only once its ``case.json`` exists
(written last, atomically) and carries the current spec hash.

Usage (from the repo root)::

    python -m tests.corpus.build            # build every missing case, print a table
    python -m tests.corpus.build --rebuild  # wipe and rebuild everything
    python -m tests.corpus.build llama_z2_w2_bf16 ...   # only some cases

Case directory layout (``<root>/<case>/``)::

    case.json                 metadata (schema: see ``CASE_SCHEMA_DOC``)
    truth/<tag>.safetensors   fp32 ground truth per checkpoint (never inside ckpt/ or run/)
    ckpt/                     raw layout: latest, global_stepN/, zero_to_fp32.py [, config+tokenizer]
    run/checkpoint-N/         trainer layout
    model/                    hf_* layouts written by save_pretrained
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.corpus import common
from tests.corpus.cache import (
    CKPTS_COLUMN,
    PARAMS_COLUMN,
    SECS_COLUMN,
    TIED_COLUMN,
    Cache,
    Column,
    deepspeed_version,
    hash_spec,
)

#: Bump whenever the generator's output format / semantics change (new cache root).
SCHEMA_VERSION = 1

#: Per-kind generator revision, folded into each case's spec hash when non-zero.
#: Bump one to rebuild only the cases of that kind (e.g. after a script fix).
#: trainer 1: accelerate world size fix (ranks used to believe they were all rank 0).
KIND_REVISION: dict[str, int] = {"ds": 0, "trainer": 1, "hf": 0}

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

CASE_SCHEMA_DOC = """
name              str   case name (= folder name)
arch              str   HF model_type (llama, qwen2, qwen3, mistral, qwen2_moe)
kind              str   "ds" (raw engine.save_checkpoint) | "trainer" | "hf"
stage             int|null  ZeRO stage (null for hf_* layouts)
world_size        int   number of ranks that wrote the checkpoint (1 for hf_*)
precision         str   "bf16" | "fp16" | "fp32" (training precision; saved dtype for hf_*)
tied              bool  lm_head tied to embed_tokens
tied_keys         dict  alias -> canonical name, e.g. {"lm_head.weight": "model.embed_tokens.weight"}
frozen            list  names of requires_grad=False params
buffers           list  persistent buffer names included in truth (usually empty)
layout            str   "raw" | "trainer" | "hf_sharded_safetensors" | "hf_single_safetensors"
input             str   path (relative to case dir) a user would pass to the tool
checkpoints       list  [{tag, path, truth, step}] paths relative to the case dir, oldest first
has_config        bool  config.json present at the input folder (per checkpoint for trainer)
has_tokenizer     bool  tokenizer files present likewise
deepspeed_version str
head_dim          int
vocab_size        int
hidden_size       int
num_layers        int
param_groups      int   optimizer param groups (0 for hf_*)
num_params        int   unique parameter count
big               bool  large model meant for memory tests
truth_dtype       str   dtype of the truth tensors ("fp32", or saved dtype for hf_*)
zero3_16bit_save  bool  trainer ZeRO-3 with stage3_gather_16bit_weights_on_model_save
spec_hash         str   hash of the CaseSpec; a mismatch triggers a rebuild
build_seconds     float
covers            str   human description of what the case exercises
"""


# --------------------------------------------------------------------------- specs


def tiny(
    arch: str,
    *,
    tied: bool = False,
    frozen: tuple[str, ...] = (),
    vllm: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """Spec dict of a tiny model.

    ``vllm=True`` gives a head_dim-64 model (hidden 128, 2 heads, 1 KV head, vocab
    1001 >= tokenizer size) that vLLM can load; otherwise sizes are deliberately
    awkward (hidden 66, 3 heads of 22, intermediate 101, vocab 503) so that most
    numels are not divisible by the world size and partitions get padded.
    """
    if vllm:
        dims = dict(hidden=128, intermediate=203, heads=2, kv_heads=1, vocab=1001)
    else:
        dims = dict(hidden=66, intermediate=101, heads=3, kv_heads=1, vocab=503)
    model: dict[str, Any] = dict(arch=arch, layers=2, tied=tied, frozen=list(frozen), extra={}, **dims)
    if arch == "qwen2_moe":
        model["extra"].update(
            moe_intermediate_size=37,
            shared_expert_intermediate_size=53,
            num_experts=4,
            num_experts_per_tok=2,
            # torch._grouped_mm needs 16-byte aligned strides; hidden 66 in bf16 isn't.
            experts_implementation="eager",
        )
    if arch == "qwen3":
        model["head_dim"] = model["hidden"] // model["heads"]
    model["extra"].update(extra)
    return model


#: The MoE families of issue 25, tiny and vLLM-loadable: hidden 64, 2 heads of 32, 2 layers, 4 experts (top 2).
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2")


def tiny_moe(arch: str) -> dict[str, Any]:
    """Spec dict of a tiny MoE model vLLM can load (head dim 32, vocab 1001 >= the tokenizer's).

    Each family names its expert count and sizes differently; DeepSeek-V2 has MLA attention, shared
    experts and a dense first layer (``first_k_dense_replace``), Qwen2-MoE a gated shared expert,
    Qwen3-MoE and Mixtral none.
    """
    model: dict[str, Any] = dict(arch=arch, layers=2, tied=False, frozen=[], hidden=64, intermediate=96, heads=2,
                                 kv_heads=1, vocab=1001, extra={"experts_implementation": "eager"})
    if arch == "mixtral":  # the experts' size is intermediate_size
        model["extra"].update(num_local_experts=4, num_experts_per_tok=2)
        model["intermediate"] = 48
    elif arch in ("qwen2_moe", "qwen3_moe"):
        model["extra"].update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
        if arch == "qwen2_moe":
            model["extra"]["shared_expert_intermediate_size"] = 80
        else:
            model["head_dim"] = 32
    elif arch == "deepseek_v2":
        model["kv_heads"] = 2
        model["extra"].update(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                              n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None, n_group=1, topk_group=1,
                              # vLLM's CPU MLA kernel only runs a latent size kv_lora_rank + rope of 576.
                              kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32)
    else:
        raise ValueError(f"no tiny MoE spec for {arch!r}")
    return model


#: The vision-language families of issue 25, tiny and vLLM-loadable (text: hidden 64, 2 heads of 32, 2 layers).
VLM_ARCHS = ("qwen2_vl", "llava", "gemma3", "qwen2_5_vl")

#: The modules of each family's vision tower (without its projector: Qwen2-VL's ``visual.merger``), in the
#: training (named_parameters) names; a frozen tower freezes these, the projector stays trained.
VLM_TOWER = {
    "qwen2_vl": ("model.visual.patch_embed.", "model.visual.blocks."),
    "qwen2_5_vl": ("model.visual.patch_embed.", "model.visual.blocks."),
    "llava": ("model.vision_tower.",),
    "gemma3": ("model.vision_tower.",),
}


def tiny_vlm(arch: str, *, frozen_vision: bool = False) -> dict[str, Any]:
    """Spec dict of a tiny vision-language model (text part as ``tiny_moe``'s; a vision tower of depth 1-2).

    Image/vision token ids sit above the tokenizer's vocabulary (480) and below the model's (1001).
    ``frozen_vision`` freezes the vision tower (the projector stays trained), as VLM fine-tuning usually does.
    """
    model: dict[str, Any] = dict(arch=arch, layers=2, tied=False, frozen=[], hidden=64, intermediate=96, heads=2,
                                 kv_heads=1, vocab=1001, head_dim=32, extra={})
    if arch == "qwen2_vl":  # M-RoPE sections sum to head_dim / 2
        vision = dict(text_type="qwen2_vl_text", text_extra={"rope_scaling": {"type": "mrope",
                                                                            "mrope_section": [4, 6, 6]}},
                      config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                                  spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
                      top=dict(image_token_id=990, video_token_id=991, vision_start_token_id=992,
                               vision_end_token_id=993))
    elif arch == "qwen2_5_vl":  # two blocks: one windowed, one full attention (fullatt_block_indexes)
        vision = dict(text_type="qwen2_5_vl_text", text_extra={"rope_scaling": {"type": "mrope",
                                                                              "mrope_section": [4, 6, 6]}},
                      config=dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2,
                                  fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2,
                                  temporal_patch_size=2, in_channels=3),
                      top=dict(image_token_id=990, video_token_id=991, vision_start_token_id=992,
                               vision_end_token_id=993))
    elif arch == "llava":
        vision = dict(text_type="llama",
                      config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14,
                                  projection_dim=32),
                      top=dict(image_token_index=990, vision_feature_layer=-1))
    elif arch == "gemma3":  # Gemma 3 ties its head to the embeddings
        model["tied"] = True
        vision = dict(text_type="gemma3_text", text_extra={"sliding_window": 16},
                      config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
                                  vision_use_head=False),  # as google/gemma-3-4b-it: the pooling head unused
                      top=dict(mm_tokens_per_image=1, image_token_index=990, boi_token_index=991,
                               eoi_token_index=992))
    else:
        raise ValueError(f"no tiny VLM spec for {arch!r}")
    model["vision"] = vision
    if frozen_vision:
        model["frozen"] = list(VLM_TOWER[arch])
    return model


@dataclass(frozen=True)
class CaseSpec:
    """Declarative description of one corpus case."""

    name: str
    kind: str  # "ds" | "trainer" | "hf"
    model: dict[str, Any]
    stage: int | None
    world_size: int
    precision: str
    layout: str
    save_steps: tuple[int, ...] = (2,)
    has_config: bool = False
    has_tokenizer: bool = False
    seed: int = 0
    zero_extra: dict[str, Any] = field(default_factory=dict)
    big: bool = False
    covers: str = ""

    @property
    def input(self) -> str:
        """Path (relative to the case dir) a user would pass to the tool."""
        return {"ds": "ckpt", "trainer": "run", "hf": "model"}[self.kind]

    def spec_hash(self) -> str:
        """Stable hash of the spec (+ schema version) used for cache invalidation."""
        return hash_spec(self, SCHEMA_VERSION, KIND_REVISION)

    def meta(self) -> dict[str, Any]:
        """Static part of ``case.json`` (the scripts add runtime facts)."""
        m = self.model
        return {
            "name": self.name,
            "arch": m["arch"],
            "kind": self.kind,
            "stage": self.stage,
            "world_size": self.world_size,
            "precision": self.precision,
            "layout": self.layout,
            "input": self.input,
            "has_config": self.has_config,
            "has_tokenizer": self.has_tokenizer,
            "head_dim": common.head_dim_of(m),
            "vocab_size": m["vocab"],
            "hidden_size": m["hidden"],
            "num_layers": m["layers"],
            "big": self.big,
            "truth_dtype": "fp32" if self.kind != "hf" else self.precision,
            "zero3_16bit_save": bool(self.zero_extra.get("stage3_gather_16bit_weights_on_model_save", False)),
            "spec_hash": self.spec_hash(),
            "covers": self.covers,
        }

    def plan(self, case_dir: Path) -> dict[str, Any]:
        """JSON-able instructions for the launched training script."""
        return {
            "name": self.name,
            "case_dir": str(case_dir),
            "model": self.model,
            "stage": self.stage,
            "world_size": self.world_size,
            "precision": self.precision,
            "save_steps": list(self.save_steps),
            "has_config": self.has_config,
            "has_tokenizer": self.has_tokenizer,
            "seed": self.seed,
            "zero_extra": self.zero_extra,
            "meta": self.meta(),
        }


def _ds(name: str, model: dict[str, Any], stage: int, ws: int, prec: str, covers: str, **kw: Any) -> CaseSpec:
    return CaseSpec(
        name=name, kind="ds", model=model, stage=stage, world_size=ws, precision=prec, layout="raw", covers=covers, **kw
    )


def _trainer(name: str, model: dict[str, Any], stage: int, covers: str, **kw: Any) -> CaseSpec:
    kw.setdefault("save_steps", (2, 4, 6))
    return CaseSpec(
        name=name,
        kind="trainer",
        model=model,
        stage=stage,
        world_size=2,
        precision="bf16",
        layout="trainer",
        has_config=True,
        has_tokenizer=True,
        covers=covers,
        **kw,
    )


_FROZEN_Z2 = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.input_layernorm.weight",
)
_FROZEN_Z3 = ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight")

_SPECS: list[CaseSpec] = [
    # ---- world size 1
    _ds(
        "llama_z1_w1_fp32",
        tiny("llama"),
        1,
        1,
        "fp32",
        "ZeRO-1, single rank, fp32 training, config+tokenizer",
        has_config=True,
        has_tokenizer=True,
        seed=1,
    ),
    _ds(
        "qwen3_z3_w1_bf16_tied",
        tiny("qwen3", tied=True),
        3,
        1,
        "bf16",
        "ZeRO-3 single rank, qwen3 (q/k norm), tied, no config",
        seed=2,
    ),
    # ---- world size 2
    _ds(
        "llama_z2_w2_bf16",
        tiny("llama"),
        2,
        2,
        "bf16",
        "ZeRO-2 bf16, no config/tokenizer, two tags (global_step1, global_step2; latest -> 2)",
        save_steps=(1, 2),
        seed=3,
    ),
    _ds(
        "qwen2_z3_w2_bf16_tied",
        tiny("qwen2", tied=True, vllm=True),
        3,
        2,
        "bf16",
        "ZeRO-3 bf16 tied qwen2 with q/k/v biases, head_dim 64, config+tokenizer (vLLM-loadable)",
        has_config=True,
        has_tokenizer=True,
        seed=4,
    ),
    _ds(
        "mistral_z2_w2_fp16_frozen",
        tiny("mistral", frozen=_FROZEN_Z2),
        2,
        2,
        "fp16",
        "ZeRO-2 fp16 with frozen params (embedding, one proj, one norm), config+tokenizer",
        has_config=True,
        has_tokenizer=True,
        seed=5,
    ),
    _ds(
        "llama_z3_w2_bf16_frozen",
        tiny("llama", frozen=_FROZEN_Z3),
        3,
        2,
        "bf16",
        "ZeRO-3 bf16 with frozen params, config but no tokenizer",
        has_config=True,
        seed=6,
    ),
    _ds(
        "qwen2moe_z2_w2_bf16",
        tiny("qwen2_moe"),
        2,
        2,
        "bf16",
        "MoE (qwen2_moe, fused 3-D expert tensors + shared expert) under ZeRO-2, config+tokenizer",
        has_config=True,
        has_tokenizer=True,
        seed=7,
    ),
    _ds("llama_z1_w2_fp16_tied", tiny("llama", tied=True), 1, 2, "fp16", "ZeRO-1 fp16 tied embeddings", seed=8),
    _ds("qwen2_z3_w2_fp32", tiny("qwen2"), 3, 2, "fp32", "ZeRO-3 fp32 (no mixed precision) untied", seed=9),
    # ---- world size 3 (odd: padding everywhere)
    _ds(
        "qwen2_z3_w3_bf16",
        tiny("qwen2"),
        3,
        3,
        "bf16",
        "ZeRO-3 odd world size bf16, config+tokenizer",
        has_config=True,
        has_tokenizer=True,
        seed=10,
    ),
    _ds("llama_z2_w3_fp32_tied", tiny("llama", tied=True), 2, 3, "fp32", "ZeRO-2 odd world size fp32 tied", seed=11),
    _ds(
        "mistral_z1_w3_bf16",
        tiny("mistral"),
        1,
        3,
        "bf16",
        "ZeRO-1 odd world size bf16, config+tokenizer",
        has_config=True,
        has_tokenizer=True,
        seed=12,
    ),
    _ds("qwen2moe_z3_w3_fp16", tiny("qwen2_moe"), 3, 3, "fp16", "MoE under ZeRO-3, odd world size, fp16", seed=13),
    # ---- ZeRO-2 round_robin_gradients (issue 22): param_shapes and the flat data follow the round-robin
    # order, param_slice_mappings the module's order (and safe_get_full_fp32_param is wrong, see
    # ds_train.zero12_masters). Shapes picked so some partitions are uneven: at world size 2 the no-decay
    # group (330 elements) is cut 166 + 164; at 3 (the llama shape of the report, with config and
    # tokenizer) both groups (510464, 640) are.
    *(
        _ds(
            f"llama_z2rr_w{ws}_bf16{'_offload' if offload else ''}",
            tiny("llama", vllm=ws == 3),
            2,
            ws,
            "bf16",
            f"ZeRO-2 round_robin_gradients, world size {ws}, uneven partitions"
            + (", offload_optimizer cpu" if offload else ""),
            zero_extra={"round_robin_gradients": True, **({"offload_optimizer": {"device": "cpu"}} if offload else {})},
            has_config=ws == 3,
            has_tokenizer=ws == 3,
            seed=40 + 2 * ws + offload,
        )
        for ws in (2, 3)
        for offload in (False, True)
    ),
    # ---- big (memory tests): ~74M params
    _ds(
        "llama_big_z2_w2_bf16",
        dict(
            arch="llama",
            hidden=768,
            intermediate=2048,
            layers=4,
            heads=12,
            kv_heads=4,
            vocab=32000,
            tied=False,
            frozen=[],
            extra={},
        ),
        2,
        2,
        "bf16",
        "~74M-param llama for memory tests (ZeRO-2 bf16, untied, vocab 32000)",
        save_steps=(1,),
        has_config=True,
        seed=14,
        big=True,
    ),
    # ---- HF Trainer + DeepSpeed (bf16, world 2, checkpoint-2/4/6)
    _trainer(
        "trainer_qwen2_z2_bf16",
        tiny("qwen2", tied=True, vllm=True),
        2,
        "HF Trainer ZeRO-2, tied qwen2, checkpoint-2/4/6 with tokenizer",
        seed=20,
    ),
    _trainer(
        "trainer_llama_z3_bf16",
        tiny("llama", vllm=True),
        3,
        "HF Trainer ZeRO-3 without 16-bit gather (checkpoint-N has no real weights file)",
        seed=21,
    ),
    _trainer(
        "trainer_llama_z3g16_bf16",
        tiny("llama", vllm=True),
        3,
        "HF Trainer ZeRO-3 with stage3_gather_16bit_weights_on_model_save (bf16 model.safetensors too)",
        zero_extra={"stage3_gather_16bit_weights_on_model_save": True},
        seed=22,
    ),
    # ---- plain HF layouts written by transformers
    CaseSpec(
        "hf_llama_sharded_bf16",
        "hf",
        tiny("llama", vllm=True),
        None,
        1,
        "bf16",
        "hf_sharded_safetensors",
        has_config=True,
        has_tokenizer=True,
        seed=30,
        covers="save_pretrained sharded safetensors + model.safetensors.index.json, bf16",
    ),
    CaseSpec(
        "hf_qwen2_single_fp32_tied",
        "hf",
        tiny("qwen2", tied=True, vllm=True),
        None,
        1,
        "fp32",
        "hf_single_safetensors",
        has_config=True,
        has_tokenizer=True,
        seed=31,
        covers="save_pretrained single model.safetensors, fp32, tied (lm_head not stored)",
    ),
    # Hook: sharded .bin layouts ("hf_sharded_bin") are added later; see _build_hf().
    # ---- MoE families (issue 25): fused expert parameters in training, per-expert names in save_pretrained
    _ds("mixtral_z2_w2_bf16", tiny_moe("mixtral"), 2, 2, "bf16",
        "Mixtral under ZeRO-2 (fused experts; save_pretrained: block_sparse_moe.experts.E.w1/w2/w3), config+tokenizer",
        has_config=True, has_tokenizer=True, seed=70),
    *(
        _ds(f"{arch.replace('_', '')}_z3_w2_bf16", tiny_moe(arch), 3, 2, "bf16",
            f"{arch} under ZeRO-3, head dim 32 (vLLM-loadable), config+tokenizer",
            has_config=True, has_tokenizer=True, seed=71 + i)
        for i, arch in enumerate(MOE_ARCHS)
    ),
    CaseSpec("hf_mixtral_single_fp32", "hf", tiny_moe("mixtral"), None, 1, "fp32", "hf_single_safetensors",
             has_config=True, has_tokenizer=True, seed=76,
             covers="Mixtral save_pretrained (per-expert block_sparse_moe names), fp32"),
    # ---- vision-language families (issue 25): training names model.language_model.* / model.visual.* /
    # model.vision_tower.*; save_pretrained writes other prefixes (tests/test_vlm.py)
    _ds("qwen2vl_z3_w2_fp32", tiny_vlm("qwen2_vl"), 3, 2, "fp32",
        "Qwen2-VL under ZeRO-3, vision tower trained, config+tokenizer", has_config=True, has_tokenizer=True, seed=90),
    _ds("llava_z3_w2_bf16", tiny_vlm("llava", frozen_vision=True), 3, 2, "bf16",
        "LLaVA (CLIP tower) under ZeRO-3, vision tower frozen, config+tokenizer", has_config=True, has_tokenizer=True,
        seed=91),
    _ds("gemma3_z3_w2_bf16", tiny_vlm("gemma3"), 3, 2, "bf16",
        "Gemma 3 (SigLIP tower, tied head) under ZeRO-3, vision tower trained, config+tokenizer", has_config=True,
        has_tokenizer=True, seed=92),
    _ds("qwen2vl_z2_w2_bf16_frozen", tiny_vlm("qwen2_vl", frozen_vision=True), 2, 2, "bf16",
        "Qwen2-VL under ZeRO-2 bf16, vision tower frozen (stored whole in mp_rank_00), config+tokenizer",
        has_config=True, has_tokenizer=True, seed=93),
    _ds("qwen25vl_z3_w2_bf16", tiny_vlm("qwen2_5_vl"), 3, 2, "bf16",
        "Qwen2.5-VL under ZeRO-3 bf16, vision tower trained (one windowed, one full-attention block), "
        "config+tokenizer", has_config=True, has_tokenizer=True, seed=99),
    # ---- HF Trainer + DeepSpeed on the issue-25 families (one checkpoint each, to keep the build short)
    _trainer("trainer_mixtral_z3g16_bf16", tiny_moe("mixtral"), 3,
             "HF Trainer ZeRO-3 Mixtral with 16-bit gather: DS shards (fused expert names) + Trainer's bf16 "
             "model.safetensors in checkpoint-2", zero_extra={"stage3_gather_16bit_weights_on_model_save": True},
             save_steps=(2,), seed=77),
    _trainer("trainer_qwen2vl_z3_bf16", tiny_vlm("qwen2_vl"), 3,
             "HF Trainer ZeRO-3 Qwen2-VL on image batches, vision tower trained, checkpoint-2", save_steps=(2,),
             seed=94),
]

CASES: dict[str, CaseSpec] = {c.name: c for c in _SPECS}


CACHE = Cache(lambda: f"ds-{deepspeed_version()}-v{SCHEMA_VERSION}", "corpus")
#: Root folder of the cached corpus (``$VLLMC_CORPUS_DIR`` or ``<repo>/.cache/corpus``, then ``ds-<version>-v1``).
corpus_root = CACHE.root
case_dir = CACHE.case_dir
load_case = CACHE.load_case
is_complete = CACHE.is_complete


# --------------------------------------------------------------------------- builders


def _build_ds_group(specs: list[CaseSpec]) -> None:
    ws = specs[0].world_size
    CACHE.launch("deepspeed", "ds_train.py", ws, {"cases": [s.plan(case_dir(s.name)) for s in specs]}, f"ds_w{ws}")


def _build_trainer(spec: CaseSpec) -> None:
    plan = {"cases": [spec.plan(case_dir(spec.name))]}
    CACHE.launch("deepspeed", "trainer_train.py", spec.world_size, plan, spec.name)


def _build_hf(spec: CaseSpec) -> None:
    """Write a plain transformers ``save_pretrained`` layout + truth in the saved dtype."""
    t0 = time.time()
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[spec.precision]
    cdir = case_dir(spec.name)
    out = cdir / "model"
    model = common.build_model(spec.model, seed=spec.seed).to(dtype)
    tokenizer = common.build_tokenizer()
    if spec.layout == "hf_sharded_safetensors":
        model.save_pretrained(out, max_shard_size="200KB")
        assert (out / "model.safetensors.index.json").is_file(), "expected a sharded save"
    elif spec.layout == "hf_single_safetensors":
        model.save_pretrained(out)
        assert (out / "model.safetensors").is_file()
    else:  # hook for e.g. "hf_sharded_bin"
        raise NotImplementedError(f"layout {spec.layout!r}")
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    buffers = common.persistent_buffer_names(model)
    truth = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}
    truth.update({n: b.detach().clone().contiguous() for n, b in model.named_buffers() if n in buffers})
    common.save_truth(cdir / "truth" / "model.safetensors", truth)
    tied = common.tied_map(model)
    meta = spec.meta()
    meta.update(
        tied=bool(tied),
        tied_keys=tied,
        frozen=[],
        buffers=buffers,
        param_groups=0,
        checkpoints=[{"tag": "model", "path": "model", "truth": "truth/model.safetensors", "step": 0}],
        num_params=sum(p.numel() for p in model.parameters()),
        deepspeed_version=deepspeed_version(),
        torch_version=torch.__version__,
        build_seconds=round(time.time() - t0, 2),
    )
    common.write_json_atomic(cdir / "case.json", meta)


# --------------------------------------------------------------------------- public API


def build_all(names: list[str] | None = None, *, rebuild: bool = False, verbose: bool = False) -> dict[str, Path]:
    """Build every missing (or stale) case; return ``{name: case_dir}`` for the requested cases.

    DeepSpeed cases are grouped by world size so a single ``deepspeed`` launch
    trains several models in sequence.  Stale/partial case folders are deleted first.
    """
    wanted = [CASES[n] for n in (names or list(CASES))]
    return CACHE.build(wanted, _steps, rebuild=rebuild, verbose=verbose)


def _steps(todo: list[CaseSpec]) -> list[tuple[str, Callable[[], None]]]:
    groups: dict[int, list[CaseSpec]] = {}
    for spec in todo:
        if spec.kind == "ds":
            groups.setdefault(spec.world_size, []).append(spec)
    steps: list[tuple[str, Callable[[], None]]] = [
        (f"ds world_size={ws} ({len(g)} cases)", lambda g=g: _build_ds_group(g)) for ws, g in sorted(groups.items())
    ]
    steps += [(f"trainer {s.name}", lambda s=s: _build_trainer(s)) for s in todo if s.kind == "trainer"]
    steps += [(f"hf {s.name}", lambda s=s: _build_hf(s)) for s in todo if s.kind == "hf"]
    return steps


_COLUMNS: list[Column] = [
    ("kind", "kind"),
    ("arch", "arch"),
    ("st", "stage"),
    ("ws", "world_size"),
    ("prec", "precision"),
    TIED_COLUMN,
    ("frozen", lambda c: str(len(c["frozen"]))),
    CKPTS_COLUMN,
    PARAMS_COLUMN,
    SECS_COLUMN,
]


def main(argv: list[str] | None = None) -> None:
    """CLI: build the corpus and print a summary table."""
    CACHE.cli(argv, doc=__doc__, cases=CASES, build_all=build_all, columns=_COLUMNS, title="corpus")


if __name__ == "__main__":
    main()
