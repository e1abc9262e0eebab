"""Generator of the Megatron-Core (``torch_dist``) checkpoint test corpus.

Every case is a REAL checkpoint written on this CPU by megatron-core's own ``dist_checkpointing.save`` from a
tiny ``GPTModel`` (local layer spec, gloo, TP/PP/EP ranks under ``torchrun``) after real training steps, next to
ground truth gathered from the live model at save time, mapped to HF names and verified by logits (see
``megatron_hf.py``).  megatron-core lives in its own venv (``scripts/setup_megatron_venv.sh``,
``make setup-megatron``): the launched script runs there, this registry in the test venv.

Usage (from the repo root)::

    python -m tests.corpus.megatron_build                   # build every missing case, print a table
    python -m tests.corpus.megatron_build --rebuild NAME    # rebuild some

Cache root: ``$VLLMC_CORPUS_DIR`` or ``<repo>/.cache/corpus``, then
``megatron-<megatron-core version>-v<SCHEMA_VERSION>/``.  ``case.json`` is written last.

Case directory layout (``<root>/<case>/``)::

    case.json               metadata (schema: ``CASE_SCHEMA_DOC``)
    truth/<tag>.safetensors what transformers' save_pretrained writes for the verified HF model (saved dtype)
    hf/                     that model's config.json + generation_config.json + tokenizer (no weights)
    ckpt/                   kind torch_dist: metadata.json, .metadata, __R_T.distcp, common.pt
                            (no common.pt with megatron-core 0.19+: options mcore; see MCORE_NEXT)
    run/                    kind megatron_lm: latest_checkpointed_iteration.txt, iter_0000001/, iter_0000002/
                            kind bridge: the same plus latest_train_state.pt, and in each iter_N/
                            run_config.yaml, train_state.pt, tokenizer/ (no args in common.pt)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.corpus import cache

#: Bump whenever the generator's output format / semantics change (new cache root).
SCHEMA_VERSION = 1
#: Per-kind revision folded into the spec hash when non-zero (rebuilds only that kind).
KIND_REVISION: dict[str, int] = {"torch_dist": 3, "megatron_lm": 3}
#: megatron-core release that writes the corpus (constraints/megatron.txt pins the same).
MCORE_VERSION = "0.16.1"
#: The newer release a case names with ``options={"mcore": MCORE_NEXT}`` (constraints/megatron_next.txt): the
#: first to write no common.pt (its common state is the ShardedObject ``common_state`` in the .distcp files).
#: Its source is laid over the same venv (scripts/setup_megatron_next.sh, ``make setup-megatron-next``).
MCORE_NEXT = "0.19.2"

REPO_ROOT = cache.REPO_ROOT
INPUTS = {"torch_dist": "ckpt", "megatron_lm": "run", "bridge": "run"}
#: Tokenizer size (tests.corpus.common.TOKENIZER_VOCAB): the true vocab_size of every model.
VOCAB = 480
VOCAB_DIVISIBLE_BY = 128  # Megatron-LM's default --make-vocab-size-divisible-by

CASE_SCHEMA_DOC = """
name            str   case name (= folder name)
kind            str   "torch_dist" (bare dist_checkpointing folder) | "megatron_lm" (Megatron-LM run folder)
                      | "bridge" (Megatron-Bridge run folder, assembled: tests/corpus/megatron_bridge.py)
arch            str   HF model_type (llama, qwen2, qwen3, mixtral, qwen2_moe)
hf_class        str   transformers class the truth was verified with
parallel        dict  {tp, pp, ep} (+ vpp: virtual pipeline stages per PP rank, when used); world_size = tp * pp * dp
                      (dp = world / (tp * pp))
world_size      int
precision       str   "fp32" | "bf16": dtype of the parameters as saved (= truth dtype)
tied            bool  embeddings shared with the output layer (no output_layer / lm_head)
layer_keys      str   "stacked" (decoder.layers.<param>, leading layer axis) | "per_layer" (decoder.layers.N.)
vocab_size      int   true vocabulary (tokenizer) size = HF config vocab_size
padded_vocab_size  int  Megatron's padded vocabulary (rows of the embedding / output layer)
hidden_size, num_layers, num_heads, num_kv_heads, head_dim, ffn_hidden_size   int
num_experts, moe_topk, moe_ffn_hidden_size, shared_expert_size   int|null (MoE only)
input           str   path (relative to the case dir) a user passes: "ckpt" or "run"
hf_dir          str   "hf": config.json + tokenizer for --base-model-name
checkpoints     list  [{tag, path, truth, step, logits_check, reload_check, truth_tensors, gathered_keys}] oldest
                      first; logits_check = {tol, max_abs_diff, equal, wrong_min, wrong_mappings: {name: diff}};
                      reload_check = {loader, max_abs_diff, tol}: a fresh model filled by megatron-core's own
                      dist_checkpointing.load from the folder vs the live model (<= tol = 1e-6; 0.0 but for TPxEP)
expected_step   int   step a convert of `input` should pick (the tracker's / the only one)
layout          dict  facts of the last checkpoint folder: files, metadata_json, dcp_tensors {key: [shape,
                      dtype]}, dcp_objects, common_pt_keys, common_pt_globals, common_pt_args (megatron_lm); with
                      megatron-core 0.19+ (no common.pt) the same three facts of the DCP object common_state as
                      common_state_keys, common_state_globals, common_state_args, and common_state_storage
                      {file, offset, length}
tracker         str   megatron_lm and bridge: content of latest_checkpointed_iteration.txt
run_files       list  megatron_lm and bridge: files under run/
hf_files        list  files in hf/
megatron_core_version, torch_version   str
num_params      int   elements of the gathered Megatron model (padded vocab included)
spec_hash       str   hash of the spec; a mismatch triggers a rebuild
build_seconds   float time the launched script spent on this case
covers          str   what the case exercises
"""


def _model(arch: str, *, tied: bool = False, **kw: Any) -> dict[str, Any]:
    """A tiny GPT: hidden 64, 2 layers, 4 query heads in 2 groups of head_dim 32, SwiGLU 96, vocab 480."""
    m: dict[str, Any] = dict(arch=arch, layers=2, hidden=64, ffn=96, heads=4, kv_heads=2, head_dim=32, eps=1e-6,
                             rope_base=10000, vocab=VOCAB, tied=tied, qkv_bias=arch in ("qwen2", "qwen2_moe"),
                             qk_norm=arch == "qwen3")
    if arch == "mixtral":
        m.update(experts=4, topk=2, moe_ffn=64)
    if arch == "qwen2_moe":
        m.update(experts=4, topk=2, moe_ffn=64, shared_ffn=96, norm_topk=False)
    m.update(kw)
    return m


@dataclass(frozen=True)
class MegatronCaseSpec:
    """Declarative description of one Megatron corpus case."""

    name: str
    kind: str  # "torch_dist" | "megatron_lm" | "bridge"
    model: dict[str, Any]
    covers: str
    tp: int = 1
    pp: int = 1
    ep: int = 1
    precision: str = "fp32"
    layer_keys: str = "stacked"
    save_steps: tuple[int, ...] = (2,)
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def parallel(self) -> dict[str, int]:
        """``{tp, pp, ep}``, and ``vpp`` (virtual pipeline stages per rank) when the options set it."""
        vpp = self.options.get("vpp")
        return {"tp": self.tp, "pp": self.pp, "ep": self.ep, **({"vpp": vpp} if vpp else {})}

    @property
    def world_size(self) -> int:
        """Ranks of the launch: TP x PP x DP with DP = EP (experts are split over EP x expert-TP, expert-TP = TP)."""
        return self.tp * self.pp * self.ep

    def spec_hash(self) -> str:
        """Stable hash of the spec (+ schema version, kind revision, megatron-core version)."""
        return cache.hash_spec(self, SCHEMA_VERSION, KIND_REVISION, mcore=MCORE_VERSION)

    def full_model(self) -> dict[str, Any]:
        """The model spec with Megatron-LM's padded vocabulary for this TP."""
        multiple = VOCAB_DIVISIBLE_BY * self.tp
        return {**self.model, "padded_vocab": -(-self.model["vocab"] // multiple) * multiple}

    def meta(self) -> dict[str, Any]:
        """Static part of ``case.json``."""
        m = self.full_model()
        return {
            "name": self.name, "kind": self.kind, "arch": m["arch"],
            "hf_class": {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                         "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[m["arch"]],
            "parallel": self.parallel, "world_size": self.world_size,
            "precision": self.precision, "tied": bool(m["tied"]), "layer_keys": self.layer_keys,
            "vocab_size": m["vocab"], "padded_vocab_size": m["padded_vocab"], "hidden_size": m["hidden"],
            "num_layers": m["layers"], "num_heads": m["heads"], "num_kv_heads": m["kv_heads"],
            "head_dim": m["head_dim"], "ffn_hidden_size": m["ffn"], "num_experts": m.get("experts"),
            "moe_topk": m.get("topk"), "moe_ffn_hidden_size": m.get("moe_ffn"),
            "shared_expert_size": m.get("shared_ffn"), "input": INPUTS[self.kind], "hf_dir": "hf",
            "spec_hash": self.spec_hash(), "covers": self.covers,
        }

    def plan(self, case_dir: Path) -> dict[str, Any]:
        """JSON-able instructions for ``megatron_train.py``."""
        return {
            "name": self.name, "case_dir": str(case_dir), "kind": self.kind, "model": self.full_model(),
            "parallel": self.parallel, "precision": self.precision,
            "layer_keys": self.layer_keys, "save_steps": list(self.save_steps), "seed": self.seed,
            "options": self.options, "meta": self.meta(),
        }


_SPECS: list[MegatronCaseSpec] = [
    MegatronCaseSpec("mcore_llama_tp2_fp32", "torch_dist", _model("llama"),
                     "dense Llama-like (SwiGLU, RMSNorm, RoPE, GQA 4q/2kv) fp32, TP=2, untied; bare ckpt/ "
                     "(model only, no args): config from hf/", tp=2, seed=1),
    MegatronCaseSpec("mcore_llama_pp2_tied", "torch_dist", _model("llama", tied=True),
                     "dense Llama-like fp32, PP=2 (one layer per stage), tied embeddings (the last stage's "
                     "output_layer is a replica of the embedding)", pp=2, seed=2),
    MegatronCaseSpec("mcore_qwen2_tp2_bf16_tied", "torch_dist", _model("qwen2", tied=True),
                     "Qwen2-like (QKV bias, split per query group like the weight) with bf16 params, TP=2, tied",
                     tp=2, precision="bf16", seed=3),
    MegatronCaseSpec("mcore_qwen3_tp2_perlayer", "torch_dist", _model("qwen3"),
                     "Qwen3-like (q/k RMSNorm over head_dim) fp32, TP=2, untied, saved with per-layer keys "
                     "(decoder.layers.N.*: metadata non_homogeneous_layers)", tp=2, layer_keys="per_layer",
                     seed=4),
    MegatronCaseSpec("mcore_mixtral_ep2", "torch_dist", _model("mixtral"),
                     "Mixtral-like MoE, 4 experts top-2 (softmax over the top-k), EP=2 (2 experts per rank), "
                     "SequentialMLP experts stacked as decoder.layers.mlp.experts.experts.*", ep=2, seed=5),
    MegatronCaseSpec("mcore_qwen2moe_ep2_shared", "torch_dist", _model("qwen2_moe"),
                     "Qwen2-MoE-like: 4 experts top-2 (pre-softmax, no renormalisation), shared expert with a "
                     "sigmoid gate, QKV bias, EP=2", ep=2, seed=6),
    MegatronCaseSpec("mcore_lm_run_llama_tp2", "megatron_lm", _model("llama"),
                     "Megatron-LM run folder: latest_checkpointed_iteration.txt -> 2, iter_0000001/ and "
                     "iter_0000002/ with args (Namespace) + optimizer (Adam exp_avg/exp_avg_sq) + rng_state + "
                     "scheduler, TP=2 fp32 untied", tp=2, save_steps=(1, 2), seed=7),
    MegatronCaseSpec("mcore_lm_run_qwen2moe_ep2_bf16", "megatron_lm", _model("qwen2_moe"),
                     "Megatron-LM run of the Qwen2-MoE-like model (bf16 params, EP=2): its args carry the MoE "
                     "fields (num_experts, moe_router_topk, moe_ffn_hidden_size, shared expert size and gate, "
                     "pre-softmax router); expert optimizer state", ep=2, precision="bf16", save_steps=(1, 2),
                     seed=9),
    MegatronCaseSpec("mcore_mixtral_tp2_ep2", "torch_dist", _model("mixtral"),
                     "Mixtral-like MoE on 4 ranks: TP=2 (attention, and expert-TP=2: each expert's fc1/fc2 split "
                     "over TP like a dense MLP) x EP=2", tp=2, ep=2, seed=10),
    MegatronCaseSpec("mcore_bridge_run_qwen2_tp2", "bridge", _model("qwen2", tied=True),
                     "Megatron-Bridge run folder (ASSEMBLED from Bridge's checkpoint code, weights by megatron-core: "
                     "tests/corpus/megatron_bridge.py): iter_0000001/ and iter_0000002/ each with run_config.yaml "
                     "(the model provider's fields), train_state.pt and tokenizer/, no args; "
                     "latest_checkpointed_iteration.txt -> 2, latest_train_state.pt; Qwen2-like, TP=2 fp32, tied",
                     tp=2, save_steps=(1, 2), seed=11),
    MegatronCaseSpec("mcore_llama_tp2pp2", "torch_dist", _model("llama"),
                     "dense Llama-like fp32, TP=2 x PP=2 (4 ranks), untied", tp=2, pp=2, seed=8),
    MegatronCaseSpec("mcore_mixtral_ep2_grouped_bf16", "torch_dist", _model("mixtral", grouped_gemm=True),
                     "Mixtral-like MoE with megatron-core's grouped-GEMM experts (legacy GroupedMLP: two [H, E*2F] and "
                     "[E*F, H] weights per layer; its sharded state dict writes SequentialMLP's global keys), bf16 "
                     "params (GroupedMLP's limit), EP=2", ep=2, precision="bf16", seed=13),
    MegatronCaseSpec("mcore_mixtral_ep2_grouped_singleton", "torch_dist", _model("mixtral", grouped_gemm=True),
                     "the grouped-GEMM Mixtral-like model of mcore_mixtral_ep2_grouped_bf16 saved with "
                     "singleton_local_shards (sharded-state-dict metadata): per-layer keys, each expert under its own "
                     "key mlp.experts.<e>.linear_fc1.weight_w/_v (gate/up apart) and linear_fc2.weight, dense "
                     "linear_fc1 as weight_w/_v too; bf16, EP=2", ep=2, precision="bf16", layer_keys="per_layer",
                     seed=14, options={"singleton": True}),
    MegatronCaseSpec("mcore_llama_tp2_singleton", "torch_dist", _model("llama"),
                     "dense Llama-like fp32, TP=2, saved with singleton_local_shards: per-layer keys and SwiGLU's "
                     "linear_fc1 as two TP-split tensors weight_w (gate) and weight_v (up)", tp=2,
                     layer_keys="per_layer", seed=15, options={"singleton": True}),
    MegatronCaseSpec("mcore19_lm_run_llama_tp2", "megatron_lm", _model("llama"),
                     "Megatron-LM run folder written by megatron-core 0.19.2 (see MCORE_NEXT): no common.pt, its "
                     "common state (args, iteration, optimizer param groups...) is the ShardedObject common_state "
                     "pickled inside __0_0.distcp; its args are Megatron-LM 0.19's own (parse_args + validate_args "
                     "of megatron.training); one save (iter_0000002/), TP=2 fp32 untied",
                     tp=2, save_steps=(2,), seed=13, options={"mcore": MCORE_NEXT, "args": "megatron.training"}),
    MegatronCaseSpec("mcore_llama_pp2_vpp2", "torch_dist", _model("llama", layers=4),
                     "dense Llama-like fp32, 4 layers, PP=2 x VPP=2 (interleaved: rank 0 holds layers 0 and 2, "
                     "rank 1 layers 1 and 3; saved as model0/model1 chunks whose stacked keys have a global layer "
                     "axis), untied", pp=2, seed=12, options={"vpp": 2}),
]

CASES: dict[str, MegatronCaseSpec] = {c.name: c for c in _SPECS}

CACHE = cache.Cache(lambda: f"megatron-{MCORE_VERSION}-v{SCHEMA_VERSION}", "megatron-corpus")
corpus_root = CACHE.root
case_dir = CACHE.case_dir
load_case = CACHE.load_case
is_complete = CACHE.is_complete


def venv() -> Path:
    """The megatron-core venv (``$MEGATRON_VENV`` or ``<repo>/.venv-megatron``, made by ``make setup-megatron``)."""
    return Path(os.environ.get("MEGATRON_VENV") or REPO_ROOT / ".venv-megatron")


def next_dir() -> Path:
    """megatron-core ``MCORE_NEXT``'s source folder (``$MEGATRON_NEXT_DIR`` or ``<repo>/.venv-megatron-next``)."""
    return Path(os.environ.get("MEGATRON_NEXT_DIR") or REPO_ROOT / ".venv-megatron-next")


def _build_group(specs: list[MegatronCaseSpec]) -> None:
    """One ``torchrun`` launch (the megatron venv's) building a group of cases of one world size and release."""
    torchrun = cache.venv_torchrun(venv(), "`make setup-megatron` (scripts/setup_megatron_venv.sh)")
    ws, mcore = specs[0].world_size, specs[0].options.get("mcore")
    path, label = str(REPO_ROOT), f"megatron_w{ws}"
    if mcore:  # the newer release's source first on the path, over the venv's 0.16
        if not (next_dir() / ".megatron-next-complete").is_file():
            raise RuntimeError(f"no {next_dir()}: run `make setup-megatron-next` (scripts/setup_megatron_next.sh)")
        path, label = f"{next_dir()}{os.pathsep}{path}", f"{label}_mcore{mcore}"
    plan = {"cases": [s.plan(case_dir(s.name)) for s in specs]}
    # NO_VCS_VERSION: megatron-core 0.19 appends the hash of the git repository holding its source to __version__.
    CACHE.launch(torchrun, "megatron_train.py", ws, plan, label,
                 env={"DS_ACCELERATOR": None, "PYTHONPATH": path, "NO_VCS_VERSION": "1"})


def _steps(todo: list[MegatronCaseSpec]) -> list[tuple[str, Callable[[], None]]]:
    groups: dict[tuple[int, str], list[MegatronCaseSpec]] = {}
    for spec in todo:
        groups.setdefault((spec.world_size, spec.options.get("mcore", MCORE_VERSION)), []).append(spec)
    return [(f"megatron {mcore} world_size={ws} ({len(g)} cases)", lambda g=g: _build_group(g))
            for (ws, mcore), g in groups.items()]


def build_all(names: list[str] | None = None, *, rebuild: bool = False, verbose: bool = False) -> dict[str, Path]:
    """Build every missing (or stale) case; return ``{name: case_dir}`` for the requested cases."""
    wanted = [CASES[n] for n in (names or list(CASES))]
    return CACHE.build(wanted, _steps, rebuild=rebuild, verbose=verbose)


_COLUMNS: list[cache.Column] = [
    ("kind", "kind"),
    ("arch", "arch"),
    ("tp/pp/ep", lambda c: "{tp}/{pp}/{ep}".format(**c["parallel"])),
    ("prec", "precision"),
    cache.TIED_COLUMN,
    ("keys", "layer_keys"),
    cache.CKPTS_COLUMN,
    ("logits diff", lambda c: f"{max(k['logits_check']['max_abs_diff'] for k in c['checkpoints']):.1e}"),
    cache.PARAMS_COLUMN,
    cache.SECS_COLUMN,
]


def main(argv: list[str] | None = None) -> None:
    """CLI: build the corpus and print a summary table."""
    CACHE.cli(argv, doc=__doc__, cases=CASES, build_all=build_all, columns=_COLUMNS, title="megatron corpus")


if __name__ == "__main__":
    main()
