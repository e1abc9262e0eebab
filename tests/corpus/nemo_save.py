"""Write a REAL NeMo 2 checkpoint (``weights/`` + ``context/``) of a tiny Qwen2 GPT on CPU, with its truth.

Launched by :mod:`tests.corpus.nemo_build` from ``.venv-nemo`` (nemo_toolkit 2.7.3 + megatron-core 0.16.1, never
the test venv)::

    torchrun --nproc_per_node 1 tests/corpus/nemo_save.py --plan PLAN.json

Two variants: the config sets ``vocab_size`` (NeMo's Qwen2 presets, and any model its HF import made), which NeMo
uses unpadded; or leaves it None (NeMo's Llama presets), and NeMo pads the tokenizer's size.

The save is NeMo's own CPU code path, the one its ``llm.import_ckpt`` takes (``ModelConnector.nemo_setup`` and
``nemo_save`` in ``nemo/lightning/io/connector.py``): a ``nemo.lightning.Trainer`` on CPU with a
``MegatronStrategy`` (gloo), ``strategy.connect`` + ``setup_environment``, the model built by
``llm.Qwen2Model.configure_model`` (megatron-core's ``GPTModel``, NeMo's default layer spec, which is the local
one without TransformerEngine), then ``trainer.save_checkpoint`` (``MegatronCheckpointIO``:
``dist_checkpointing.save`` into ``weights/``) and ``TrainerContext.io_dump`` into ``context/`` (``io.json``,
``model.yaml``, and the tokenizer artifact copied to ``context/nemo_tokenizer/``). Before the save every parameter
is moved off its initial value (norms start at exactly 1, biases at 0), standing in for training.

Truth: the live model's sharded state dict, gathered and mapped to HF names by the Megatron corpus's own mapping
(:mod:`tests.corpus.megatron_hf`), verified by HF fp32 logits equal to the live model's and by wrong mappings
being caught (the same check as every Megatron case).

On CPU: megatron-core's few CUDA calls are stubbed as in ``megatron_train.py``; NeMo 2.7.3's async checkpoint
wrapper imports ``megatron.core.dist_checkpointing.strategies.tensorstore``, which megatron-core 0.16 no longer
has, so the save is synchronous (``ckpt_async_save=False``, what NeMo does anyway when async is off).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.corpus import common, megatron_hf, megatron_save  # noqa: E402
from tests.corpus.megatron_train import stub_cuda  # noqa: E402


def nemo_model(m: dict[str, Any], tokenizer_dir: Path, preset_vocab: bool) -> Any:
    """``llm.Qwen2Model`` or ``llm.LlamaModel`` of the spec, with NeMo's HF ``AutoTokenizer`` of the corpus tokenizer
    (the artifact ``io_dump`` copies into ``context/<its folder name>``).

    ``preset_vocab``: the config sets ``vocab_size`` (as NeMo's Qwen2 presets and its HF import do), which NeMo uses
    unpadded; else it is None (NeMo's Llama presets) and NeMo pads the tokenizer's size (multiple of 128 x TP).
    """
    from nemo.collections import llm
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

    config_cls, model_cls = {"qwen2": (llm.Qwen2Config, llm.Qwen2Model), "llama": (llm.LlamaConfig, llm.LlamaModel)}[
        m["arch"]]
    config = config_cls(
        num_layers=m["layers"], hidden_size=m["hidden"], ffn_hidden_size=m["ffn"], num_attention_heads=m["heads"],
        num_query_groups=m["kv_heads"], kv_channels=m["head_dim"], layernorm_epsilon=m["eps"],
        rotary_base=float(m["rope_base"]), vocab_size=m["vocab"] if preset_vocab else None, seq_length=256,
        share_embeddings_and_output_weights=bool(m["tied"]),
        # The CUDA fusions NeMo's Llama presets turn on (TransformerEngine's) are off, as on any machine without TE.
        apply_rope_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False,
    )
    return model_cls(config, tokenizer=AutoTokenizer(str(tokenizer_dir)))


def connect(model: Any) -> Any:
    """NeMo's CPU trainer for a model (``ModelConnector.nemo_setup``), the model built on it."""
    import nemo.lightning as nl
    from lightning.pytorch.trainer.states import TrainerFn
    from nemo.lightning import _strategy_lib

    strategy = nl.MegatronStrategy(ckpt_save_optimizer=False, always_save_context=True, ckpt_async_save=False)
    trainer = nl.Trainer(devices=1, accelerator="cpu", strategy=strategy)
    trainer.state.fn = TrainerFn.FITTING  # as nemo_setup: the state a save at the end of training has
    trainer.strategy.connect(model)
    trainer.strategy.setup_environment()
    with _strategy_lib.megatron_cpu_init_context(model.config):
        model.configure_model()
    return trainer


def save(trainer: Any, out: Path) -> None:
    """``ModelConnector.nemo_save``: the weights by the strategy's checkpoint IO, then the context."""
    from nemo.lightning.ckpt_utils import ckpt_to_context_subdir
    from nemo.lightning.io.pl import TrainerContext

    trainer.strategy._setup_optimizers = False
    trainer.strategy._init_model_parallel = False
    trainer.strategy.setup(trainer)
    out.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(out)
    TrainerContext.from_trainer(trainer).io_dump(ckpt_to_context_subdir(out), yaml_attrs=["model"])


def live_logits(gpt: Any, ids: torch.Tensor) -> torch.Tensor:
    """The live megatron-core model's fp32 logits (over the padded vocabulary when padded)."""
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    mask = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).triu(1)[None, None]  # True = masked out
    with torch.no_grad():
        return gpt(ids, pos, mask).float()


def run_case(case: dict[str, Any]) -> None:
    """Build, perturb, save and verify the case (see the module docstring)."""
    t0 = time.time()
    m, case_dir = case["model"], Path(case["case_dir"])
    tok = megatron_hf.tokenizer()
    tok_dir = case_dir / "hf_tokenizer"  # io_dump copies it to context/hf_tokenizer
    tok.save_pretrained(tok_dir)
    torch.manual_seed(case["seed"])
    model = nemo_model(m, tok_dir, not case["options"].get("vocab_from_tokenizer"))
    trainer = connect(model)
    gpt = model.module
    assert gpt.vocab_size == m["padded_vocab"], (gpt.vocab_size, m["padded_vocab"])
    with torch.no_grad():  # stands in for training: norms leave 1, biases leave 0
        for p in gpt.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = case_dir / "nemo"
    save(trainer, folder)
    prompt = torch.tensor([tok.encode(megatron_hf.PROMPT)])
    meta = megatron_save.sd_metadata({"layer_keys": "stacked"})
    gathered = megatron_hf.gather_global({"model": gpt.sharded_state_dict(metadata=meta)})
    sd = megatron_hf.to_hf(gathered, m, False)
    check = megatron_hf.check_logits(m, {k: v.float() for k, v in sd.items()}, prompt, live_logits(gpt, prompt))
    names = megatron_hf.save_truth(case_dir, "final", m, sd, torch.float32, tok)
    import shutil

    shutil.rmtree(tok_dir)
    import megatron.core
    import nemo

    record = {
        "tag": "final", "path": "nemo", "truth": "truth/final.safetensors", "step": None, "logits_check": check,
        "truth_tensors": len(names),
        "gathered_keys": {k: [list(v.shape), str(v.dtype)] for k, v in sorted(gathered.items())},
    }
    meta_out = dict(case["meta"])
    meta_out.update(
        checkpoints=[record],
        layout={"weights": megatron_save.folder_facts(folder / "weights"), "files": common.list_files(folder)},
        nemo_version=nemo.__version__, megatron_core_version=megatron.core.__version__,
        torch_version=torch.__version__, build_seconds=round(time.time() - t0, 2),
        num_params=sum(v.numel() for v in gathered.values()), hf_files=common.list_files(case_dir / "hf"),
    )
    common.write_json_atomic(case_dir / "case.json", meta_out)


def main() -> None:
    """Run the plan's case (one rank: NeMo's trainer sets up the gloo group from torchrun's environment)."""
    plan = common.read_plan()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    stub_cuda()
    for case in plan["cases"]:
        run_case(case)


# The guard: dist_checkpointing.save starts a "spawn" multiprocessing Manager, whose child re-imports this script.
if __name__ == "__main__":
    main()
