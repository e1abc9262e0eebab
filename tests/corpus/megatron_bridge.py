"""The files Megatron-Bridge writes around a ``torch_dist`` save, for the corpus's ``bridge`` kind.

ASSEMBLED, NOT WRITTEN BY MEGATRON-BRIDGE. The weights are written by megatron-core's own
``dist_checkpointing.save`` (like every corpus case), with the state dict Bridge's ``generate_state_dict``
builds (``checkpoint_version``, ``iteration``, ``model``, ``optimizer``, ``opt_param_scheduler``,
``rng_state``: no Megatron-LM ``args``). The files around it follow Bridge's checkpoint code
(``training/checkpointing.py`` ``save_checkpoint`` and ``training/utils/checkpoint_utils.py``, read for the
facts):

* ``iter_NNNNNNN/run_config.yaml``: ``ConfigContainer.to_yaml``, i.e. ``yaml.safe_dump`` of every config
  section, each a mapping with its class as ``_target_``; functions and dtypes as ``{_target_: <qualified
  name>, _call_: false}``. The ``model:`` section is the model provider's fields (megatron-core
  ``TransformerConfig`` names plus the GPT ones), flat: the provider form Bridge 0.3 writes.
* ``iter_NNNNNNN/train_state.pt``: ``torch.save(TrainState.state_dict())`` (scalar tensors), copied to
  ``<run>/latest_train_state.pt``; ``<run>/latest_checkpointed_iteration.txt`` holds the step.
* ``iter_NNNNNNN/tokenizer/``: the tokenizer's ``save_pretrained`` (``save_tokenizer_assets``).

Why assembled: megatron-bridge 0.3.1 (the newest release for Python 3.11; it accepts megatron-core 0.16)
installs with ``--no-deps``, but importing its model provider imports ``transformer_engine.pytorch``, which
has no CPU build. Only the fields a converter reads and a few others are written; the rest of a real file
(hundreds of training settings) is left out.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

RUN_CONFIG = "run_config.yaml"
TRAIN_STATE = "train_state.pt"
PROVIDERS = {"qwen2": "megatron.bridge.models.qwen.qwen_provider.Qwen2ModelProvider",
             "llama": "megatron.bridge.models.llama.llama_provider.LlamaModelProvider"}


def _fn(name: str) -> dict[str, Any]:
    """A function or dtype as Bridge's YAML representers write it."""
    return {"_target_": name, "_call_": False}


def run_config(case: dict[str, Any], step: int) -> dict[str, Any]:
    """The ``run_config.yaml`` content of a save at ``step``."""
    m, par = case["model"], case["parallel"]
    dtype = "torch.bfloat16" if case["precision"] == "bf16" else "torch.float32"
    model = {
        "_target_": PROVIDERS.get(m["arch"], "megatron.bridge.models.gpt_provider.GPTModelProvider"),
        "num_layers": m["layers"], "hidden_size": m["hidden"], "ffn_hidden_size": m["ffn"],
        "num_attention_heads": m["heads"], "num_query_groups": m["kv_heads"], "kv_channels": m["head_dim"],
        "layernorm_epsilon": m["eps"], "normalization": "RMSNorm", "gated_linear_unit": True,
        "activation_func": _fn("torch.nn.functional.silu"), "add_bias_linear": False,
        "add_qkv_bias": bool(m.get("qkv_bias")), "qk_layernorm": bool(m.get("qk_norm")),
        "position_embedding_type": "rope", "rotary_base": m["rope_base"], "rotary_percent": 1.0, "seq_length": 256,
        "vocab_size": m["vocab"], "make_vocab_size_divisible_by": 128, "should_pad_vocab": True,
        "share_embeddings_and_output_weights": bool(m["tied"]),
        "tensor_model_parallel_size": par["tp"], "pipeline_model_parallel_size": par["pp"],
        "expert_model_parallel_size": par["ep"], "sequence_parallel": False,
        "params_dtype": _fn(dtype), "pipeline_dtype": _fn(dtype), "bf16": case["precision"] == "bf16", "fp16": False,
        "num_moe_experts": m.get("experts"), "moe_router_topk": m.get("topk", 2),
        "moe_ffn_hidden_size": m.get("moe_ffn"), "moe_shared_expert_intermediate_size": m.get("shared_ffn"),
        "transformer_layer_spec": _fn("megatron.bridge.models.gpt_provider.default_layer_spec"),
        "hf_model_id": None, "init_method_std": 0.02,
    }
    run = str(Path(case["case_dir"]) / "run")
    return {
        "model": model,
        "train": {"_target_": "megatron.bridge.training.config.TrainingConfig", "train_iters": step,
                  "global_batch_size": 2, "micro_batch_size": 2},
        "optimizer": {"_target_": "megatron.bridge.training.config.OptimizerConfig", "optimizer": "adam", "lr": 1e-2,
                      "bf16": case["precision"] == "bf16", "use_distributed_optimizer": False},
        "checkpoint": {"_target_": "megatron.bridge.training.config.CheckpointConfig", "save": run, "load": None,
                       "ckpt_format": "torch_dist", "save_optim": True, "save_rng": True,
                       "save_tokenizer_assets": True},
        "tokenizer": {"_target_": "megatron.bridge.training.tokenizers.config.TokenizerConfig",
                      "tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": "hf"},
        "rng": {"_target_": "megatron.bridge.training.config.RNGConfig", "seed": case["seed"]},
    }


def write_extras(case: dict[str, Any], folder: Path, step: int, tok: Any) -> None:
    """Rank 0, after the collective save: run_config.yaml, train_state.pt (+ the run's latest copy), tokenizer/,
    the tracker, in the order Bridge's finalize step writes them."""
    import yaml

    run = Path(case["case_dir"]) / "run"
    state = {"step": torch.tensor(step, dtype=torch.int32),
             "consumed_train_samples": torch.tensor(2 * step, dtype=torch.int32),
             "skipped_train_samples": torch.tensor(0, dtype=torch.int32),
             "consumed_valid_samples": torch.tensor(0, dtype=torch.int32),
             "floating_point_operations_so_far": torch.tensor(1.0e9 * step, dtype=torch.float64),
             "do_train": torch.tensor(True), "do_valid": torch.tensor(False), "do_test": torch.tensor(False)}
    torch.save(state, folder / TRAIN_STATE)
    shutil.copy(folder / TRAIN_STATE, run / f"latest_{TRAIN_STATE}")
    (run / "latest_checkpointed_iteration.txt").write_text(str(step))
    (folder / RUN_CONFIG).write_text(yaml.safe_dump(run_config(case, step)))
    tok.save_pretrained(folder / "tokenizer")
