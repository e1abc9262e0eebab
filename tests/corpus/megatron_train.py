"""Write Megatron-Core ``torch_dist`` checkpoints of tiny GPT models on CPU, with ground truth from the live model.

Launched by :mod:`tests.corpus.megatron_build` from ``.venv-megatron`` (megatron-core, never the test venv)::

    torchrun --nproc_per_node W tests/corpus/megatron_train.py --plan PLAN.json

For each case of the plan (all with the same world size): set up TP/PP/VPP/EP groups (gloo), build a
``GPTModel`` with the local (pure megatron-core) layer spec (with VPP, one per virtual stage: the model chunks
Megatron-LM saves as ``model0``, ``model1``), run real training steps (pipelined forward and backward by hand,
the grad all-reduces of megatron's ``finalize_model_grads`` that matter here, an Adam step), and at each save step
save with megatron-core's own ``dist_checkpointing.save(..., 'torch_dist')``.  The truth is the model's
sharded state dict after ``apply_factories`` (each ``ShardedTensor`` is a chunk of one global tensor), gathered
over the ranks, mapped to HF names by :mod:`tests.corpus.megatron_hf` and loaded into the transformers class,
whose fp32 logits must equal the live Megatron model's logits (the check that makes the mapping the truth); and a
fresh model filled by megatron-core's own ``dist_checkpointing.load`` from the folder must give the live logits
bit for bit (the files hold what was trained).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.corpus import common, megatron_hf, megatron_save  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def stub_paged_stash() -> None:
    """megatron-core 0.19+ imports its MoE paged-stash Triton kernels (GPU only, never run here) unconditionally,
    and triton is not one of its dependencies: without triton that one module is replaced by an inert one with its
    names (a fake ``triton`` itself would mislead torch's own triton detection). No-op for 0.16, which has none."""
    import importlib.util
    import types

    name = "megatron.core.transformer.moe.ops.paged_stash"
    top = importlib.util.find_spec("megatron")  # the namespace package: nothing of megatron.core is imported
    places = list(top.submodule_search_locations or []) if top is not None else []
    if importlib.util.find_spec("triton") is not None or not any(
            (Path(p) / "core/transformer/moe/ops/paged_stash.py").is_file() for p in places):
        return
    kernels = types.ModuleType(name)

    def unavailable(*args: Any, **kw: Any) -> None:
        raise RuntimeError("the MoE paged stash needs triton and a GPU")

    kernels.GLOBAL_BLOCK_SIZE = 1024  # type: ignore[attr-defined]
    kernels.paged_stash_copy_kernel = kernels.paged_stash_pop_kernel = unavailable  # type: ignore[attr-defined]
    sys.modules[name] = kernels


def stub_cuda() -> None:
    """The few CUDA calls megatron-core makes on a CPU-only run: device index, synchronize, the RNG tracker."""
    stub_paged_stash()
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]  # used as a device= argument
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    # The PP tied-embedding set-up moves the last stage's copy to CUDA before all-reducing it.
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]

    @contextlib.contextmanager
    def fork(self: Any, name: str = "") -> Any:  # CPU init needs no per-TP-rank CUDA RNG state
        yield

    mrandom.CudaRNGStatesTracker.fork = fork  # type: ignore[method-assign]
    from megatron.core.transformer.moe import moe_utils

    # 0.16.1's router GEMM tests `te_general_gemm is not None`, a name bound only when TransformerEngine imports.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    stub_grouped_gemm()


def gmm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
    """The ``grouped_gemm`` package's ``ops.gmm`` on the CPU: rows ``[s_i, s_i + n_i)`` of ``a`` times ``b[i]``.

    The package is a CUDA kernel (github.com/fanshiqing/grouped_gemm); its contract is this loop. It is used only
    by the forward and backward of the legacy ``GroupedMLP``: what the checkpoint holds is written by megatron-core's
    own ``GroupedMLP.sharded_state_dict`` and ``dist_checkpointing.save``, and the truth is still checked by the
    live model's logits.
    """
    outs, start = [], 0
    for i, n in enumerate(batch_sizes.tolist()):
        outs.append(a[start:start + n] @ (b[i].t() if trans_b else b[i]))
        start += n
    return torch.cat(outs)


def stub_grouped_gemm() -> None:
    """Make megatron-core's legacy ``GroupedMLP`` build and run without the CUDA-only ``grouped_gemm`` package."""
    import types

    try:
        from megatron.core.transformer.moe import grouped_gemm_util as gg
    except ImportError:  # megatron-core 0.19 dropped the legacy GroupedMLP with it
        return
    gg.grouped_gemm_is_available = lambda: True
    gg.assert_grouped_gemm_is_available = lambda: None
    gg.ops = types.SimpleNamespace(gmm=gmm)


def transformer_config(model: dict[str, Any], par: dict[str, int], dtype: torch.dtype) -> Any:
    """The ``TransformerConfig`` of a model spec (Llama/Qwen-like: SwiGLU, RMSNorm, RoPE, GQA, no dropout)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw: dict[str, Any] = {}
    if model.get("experts"):
        kw.update(
            num_moe_experts=model["experts"],
            moe_router_topk=model["topk"],
            moe_ffn_hidden_size=model["moe_ffn"],
            moe_token_dispatcher_type="allgather",  # alltoall creates a CUDA stream
            moe_router_load_balancing_type="none",
            moe_router_pre_softmax=not model.get("norm_topk", True),
        )
        if model.get("shared_ffn"):
            kw.update(moe_shared_expert_intermediate_size=model["shared_ffn"], moe_shared_expert_gate=True)
    return TransformerConfig(
        num_layers=model["layers"],
        hidden_size=model["hidden"],
        ffn_hidden_size=model["ffn"],
        num_attention_heads=model["heads"],
        num_query_groups=model["kv_heads"],
        kv_channels=model["head_dim"],
        normalization="RMSNorm",
        layernorm_epsilon=model["eps"],
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(model.get("qkv_bias")),
        qk_layernorm=bool(model.get("qk_norm")),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=True,
        init_method_std=0.05,
        tensor_model_parallel_size=par["tp"],
        pipeline_model_parallel_size=par["pp"],
        expert_model_parallel_size=par["ep"],
        virtual_pipeline_model_parallel_size=par.get("vpp"),
        pipeline_dtype=dtype,  # PP refuses to build without it
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        **kw,
    )


def build_model(model: dict[str, Any], par: dict[str, int], dtype: torch.dtype) -> list[Any]:
    """This rank's model chunks: one ``GPTModel`` per virtual pipeline stage (one without VPP)."""
    return [build_gpt(model, par, dtype, vp) for vp in range(par["vpp"])] if par.get("vpp") else [
        build_gpt(model, par, dtype)]


def build_gpt(model: dict[str, Any], par: dict[str, int], dtype: torch.dtype, vp_stage: int | None = None) -> Any:
    """A ``GPTModel`` (local layer spec) holding this rank's pipeline stage (its virtual stage ``vp_stage``)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = transformer_config(model, par, dtype)
    # The legacy GroupedMLP: experts as two [H, E*2F] / [E*F, H] weights (TEGroupedMLP needs TransformerEngine);
    # asked for only when wanted: megatron-core 0.19 has neither it nor the keyword.
    grouped = {"moe_grouped_gemm": True, "moe_use_legacy_grouped_gemm": True} if model.get("grouped_gemm") else {}
    spec = get_gpt_layer_local_spec(
        num_experts=model.get("experts"), qk_layernorm=bool(model.get("qk_norm")), normalization="RMSNorm", **grouped
    )
    gpt = GPTModel(
        config,
        spec,
        vocab_size=model["padded_vocab"],
        max_sequence_length=256,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        parallel_output=False,  # gathered logits: compared with the HF model's
        share_embeddings_and_output_weights=bool(model["tied"]),
        position_embedding_type="rope",
        rotary_base=model["rope_base"],
        vp_stage=vp_stage,
    )
    if model.get("grouped_gemm"):  # not silently SequentialMLP: the case is about the grouped layout
        assert any(type(m).__name__ == "GroupedMLP" for m in gpt.modules()), "no GroupedMLP built"
    if model.get("experts") and par["tp"] > 1:
        # MoELayer refuses TP without sequence parallelism in training mode (a performance guard); with no
        # dropout anywhere, eval mode computes the same forward and backward.
        gpt.eval()
    return gpt


def _first(chunk: Any) -> bool:
    """The chunk holds the model's first (virtual) pipeline stage: the embedding."""
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=chunk.vp_stage)


def _last(chunk: Any) -> bool:
    """The chunk holds the model's last (virtual) pipeline stage: the output layer."""
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=chunk.vp_stage)


def pipeline_forward(chunks: list[Any], ids: torch.Tensor) -> list[tuple[torch.Tensor, Any]]:
    """Forward through every pipeline stage by hand (megatron's schedules allocate on CUDA).

    With VPP the stages form a ring: virtual stage ``v`` of the last rank sends to stage ``v + 1`` of the first,
    which is the ring's next rank, so each chunk in turn receives from the previous rank and sends to the next.
    Returns per chunk ``(output, recv)``: its output (logits on the last stage) and the tensor received from the
    previous stage (None on the first), whose ``.grad`` the backward pass sends back.
    """
    from megatron.core import parallel_state as ps

    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    # Megatron's default causal mask is built on CUDA: pass it (True = masked out).
    mask = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).triu(1)[None, None]
    outs = []
    for gpt in chunks:
        recv = None
        if not _first(gpt):
            recv = torch.empty(ids.shape[1], ids.shape[0], gpt.config.hidden_size, dtype=gpt.config.pipeline_dtype)
            dist.recv(recv, ps.get_pipeline_model_parallel_prev_rank())
            recv.requires_grad_(True)
            gpt.set_input_tensor(recv)
        out = gpt(ids, pos, mask)
        if not _last(gpt):
            dist.send(out.detach().contiguous(), ps.get_pipeline_model_parallel_next_rank())
        outs.append((out, recv))
    return outs


def train_step(chunks: list[Any], opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    """One real step: pipelined forward, backward (grads sent back stage by stage, chunks in reverse), Adam step."""
    from megatron.core import parallel_state as ps

    loss = 0.0
    for gpt, (out, recv) in reversed(list(zip(chunks, pipeline_forward(chunks, ids), strict=True))):
        if _last(gpt):
            # Our own cross-entropy on the gathered logits (megatron's vocab-parallel one trips autograd at TP=1).
            total = F.cross_entropy(out.float().flatten(0, 1), torch.roll(ids, -1, dims=1).flatten())
            total.backward()
            loss = float(total)
        else:
            grad = torch.empty_like(out)
            dist.recv(grad, ps.get_pipeline_model_parallel_next_rank())
            out.backward(grad)
        if recv is not None:
            dist.send(recv.grad.contiguous(), ps.get_pipeline_model_parallel_prev_rank())
    for gpt in chunks:
        finalize_grads(gpt)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def finalize_grads(gpt: Any) -> None:
    """The grad all-reduces of megatron's DDP and ``finalize_model_grads`` that matter here."""
    from megatron.core import parallel_state as ps

    for p in gpt.parameters():
        # DDP's part of it: data-parallel replicas average their grads (experts over the expert-DP group), so
        # the replicas stay equal even where MoE token routing makes their float sums differ in the last bit.
        group = ps.get_data_parallel_group() if getattr(p, "allreduce", True) else ps.get_expert_data_parallel_group()
        if p.grad is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(p.grad, group=group)
            p.grad /= dist.get_world_size(group)
    if gpt.config.qk_layernorm and ps.get_tensor_model_parallel_world_size() > 1:
        # Also finalize_model_grads: q/k norms act on each rank's own heads, so their TP replicas' grads are summed.
        for name, p in gpt.named_parameters():
            if "q_layernorm" in name or "k_layernorm" in name:
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    if gpt.share_embeddings_and_output_weights and ps.get_pipeline_model_parallel_world_size() > 1:
        # Megatron's finalize_model_grads: the first stage's embedding and the last stage's output copy of it
        # get the sum of both grads, so the two copies stay equal.
        if gpt._is_in_embd_group():
            dist.all_reduce(gpt.shared_embedding_or_output_weight().grad, group=gpt.embd_group)


def live_logits(chunks: list[Any], ids: torch.Tensor) -> torch.Tensor | None:
    """The live model's full-vocabulary logits ``[b, s, padded_vocab]`` on the last stage (None elsewhere)."""
    with torch.no_grad():
        out, _ = pipeline_forward(chunks, ids)[-1]
    return out.float() if _last(chunks[-1]) else None


def run_case(case: dict[str, Any]) -> None:
    """Build, train, save and verify one case (see the module docstring)."""
    from megatron.core import parallel_state as ps

    t0 = time.time()
    par, model, dtype = case["parallel"], case["model"], DTYPES[case["precision"]]
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=par["tp"],
        pipeline_model_parallel_size=par["pp"],
        virtual_pipeline_model_parallel_size=par.get("vpp"),
        expert_model_parallel_size=par["ep"],
    )
    torch.manual_seed(case["seed"])
    gpt = build_model(model, par, dtype)
    opt = torch.optim.Adam([p for chunk in gpt for p in chunk.parameters()], lr=1e-2)
    gen = torch.Generator().manual_seed(case["seed"])
    tok = megatron_hf.tokenizer()
    assert len(tok) <= model["vocab"], (len(tok), model["vocab"])
    prompt = torch.tensor([tok.encode(megatron_hf.PROMPT)])
    checkpoints = []
    for step in range(1, max(case["save_steps"]) + 1):
        ids = torch.randint(0, model["vocab"], (2, 16), generator=gen)  # the same batch on every rank
        train_step(gpt, opt, ids)
        if step in case["save_steps"]:
            record = megatron_save.save_and_verify(
                case, gpt, opt, step, prompt, tok,
                lambda p, folder=None: fp32_logits(gpt if folder is None else reload(case, folder), model, par, p),
            )
            checkpoints.append(record)
    if dist.get_rank() == 0:
        megatron_save.finish_case(case, checkpoints, time.time() - t0)
    dist.barrier()


def reload(case: dict[str, Any], folder: Path) -> list[Any]:
    """A freshly initialised model (other seed) filled by megatron-core's own ``dist_checkpointing.load``."""
    from megatron.core import dist_checkpointing

    torch.manual_seed(case["seed"] + 1000)
    fresh = build_model(case["model"], case["parallel"], DTYPES[case["precision"]])
    request = megatron_save.model_state(fresh, megatron_save.sd_metadata(case))
    loaded = dist_checkpointing.load(request, str(folder))
    for key, chunk in zip(request, fresh, strict=True):
        chunk.load_state_dict(loaded[key], strict=True)
    return fresh


def fp32_logits(gpt: list[Any], model: dict[str, Any], par: dict[str, int], ids: torch.Tensor,
                ) -> torch.Tensor | None:
    """The live model's fp32 logits; for bf16 params, those of an fp32 replica holding the same (upcast) values,
    so that the mapping check compares like with like (megatron and transformers round bf16 differently)."""
    if gpt[0].config.params_dtype == torch.float32:
        return live_logits(gpt, ids)
    replica = build_model(model, par, torch.float32)
    if model.get("grouped_gemm"):
        # GroupedMLP's forward asserts config.bf16 (its kernel's limit). Set after the build, so the replica's
        # attention keeps the fp32 softmax it was built with; the experts then run in fp32 like the rest.
        for chunk in replica:
            chunk.config.bf16 = True
    for chunk, copy in zip(gpt, replica, strict=True):
        sd = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in chunk.state_dict().items()}
        copy.load_state_dict(sd, strict=True)
    return live_logits(replica, ids)


def main() -> None:
    """Run every case of the plan in this torchrun launch."""
    plan = common.read_plan()
    dist.init_process_group("gloo")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    stub_cuda()
    for case in plan["cases"]:
        run_case(case)
    dist.destroy_process_group()


# The guard is needed: dist_checkpointing.save starts a "spawn" multiprocessing Manager for its write results, and
# a spawned child re-imports this script; run at import, init_process_group would wait forever in that child for
# ranks that never come (the save then hangs just after common.pt).
if __name__ == "__main__":
    main()
