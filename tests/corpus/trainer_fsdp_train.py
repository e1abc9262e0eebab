"""Train tiny models with HF ``Trainer`` + FSDP2 on CPU, leaving real ``checkpoint-N`` folders.

Launched by ``fsdp_build.py`` as::

    torchrun --nproc_per_node 2 --master_port P tests/corpus/trainer_fsdp_train.py --plan plan.json

``plan.json`` is ``{"cases": [case_plan, ...]}``; the cases are trained one after the
other in this one process group.  Each leaves ``<case_dir>/run/checkpoint-N/`` exactly
as ``Trainer`` writes it with accelerate's FSDP2 plugin (``fsdp_version=2``,
``state_dict_type=SHARDED_STATE_DICT``): ``pytorch_model_fsdp_0/`` and ``optimizer_0/``
(torch DCP folders: ``.metadata`` + ``__R_0.distcp``), ``rng_state_R.pth``,
``scheduler.pt``, ``trainer_state.json`` -- and nothing else: with SHARDED_STATE_DICT
``Trainer.save_model`` never reaches ``_save``, so no ``config.json``, tokenizer files or
``training_args.bin`` land in ``checkpoint-N`` (``case.json`` records what was observed).

Running Trainer + FSDP2 on a CPU-only box (torch 2.13, transformers 5.x, accelerate 1.x):

* ``TrainingArguments(use_cpu=True, ddp_backend="gloo", fsdp=True, fsdp_config=...)``:
  ``use_cpu=True`` makes Trainer build ``PartialState(cpu=True, backend="gloo")``, i.e. a
  correct 2-rank ``MULTI_CPU`` state on the torchrun process group, and it also lets
  ``bf16=True`` pass ``TrainingArguments`` validation (no ``is_torch_bf16_gpu_available``
  patch is needed here, and ``trainer_train``, which installs one, is not imported).
* ...but accelerate then trains **plain DDP**: ``AcceleratorState.__init__`` only turns
  ``distributed_type`` into ``FSDP`` (and stores ``fsdp_plugin``) inside its
  multi-GPU/XPU/NPU/... branch, so on ``MULTI_CPU`` the plugin Trainer passes is dropped,
  ``Trainer.is_fsdp_enabled`` is False, the model is wrapped in DDP and checkpoints hold
  ``model.safetensors`` + ``optimizer.pt``.  We wrap ``AcceleratorState.__init__``
  (:func:`enable_fsdp_on_cpu`): when it leaves a ``MULTI_CPU`` state although an
  ``fsdp_plugin`` was passed, do exactly what the GPU branch does -- set
  ``distributed_type = FSDP`` (also in ``PartialState._shared_state``), call
  ``fsdp_plugin.set_mixed_precision(mixed_precision)`` when mixed precision is on (this
  builds FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16,
  output_dtype=bf16)``), and store ``fsdp_plugin``.  Everything downstream (accelerate's
  ``fsdp2_prepare_model`` -> ``fully_shard`` on the gloo default mesh, Trainer's
  ``save_fsdp_model``/``save_fsdp_optimizer``) is the unmodified library code.
  :func:`train_case` asserts ``trainer.is_fsdp_enabled`` and that the trained model
  really is an ``FSDPModule``, and :func:`check_dcp_layout` asserts that every parameter
  is stored as one chunk in each of ``__0_0.distcp`` and ``__1_0.distcp``.
* The gloo process group is initialised here (from the torchrun env) before
  ``TrainingArguments``; accelerate's ``PartialState`` finds it initialised and reuses it,
  also for the second and later cases (Trainer resets ``AcceleratorState`` per case).
* FSDP1 (``fsdp_version=1``) is not used: with the same patch it fails in
  ``FullyShardedDataParallel.__init__`` ("Inconsistent compute device and `device_id`
  on rank 0: cpu vs cpu:0").  FSDP2's ``fully_shard`` runs fine on gloo/CPU.
* ``RandomTokens``, the shared ``TrainingArguments`` and the callback base come from
  ``train_common`` (no DeepSpeed import in this process).
* Ground truth: a ``TrainerCallback.on_save`` runs on every rank right after each
  ``checkpoint-N`` is written and gathers the full state dict from the live model with
  ``get_model_state_dict(model, StateDictOptions(full_state_dict=True, cpu_offload=True))``
  (collective, ``train_common.save_full_truth``); rank 0 writes
  ``<case>/truth/checkpoint-N.safetensors`` keyed by ``named_parameters()`` names
  (+ persistent buffers; the tied alias is not stored), in the dtype the live sharded
  parameters have (== the dtype stored in the DCP files; fp32 also under bf16 mixed
  precision, where only the compute copies are bf16).  For a tied
  model the DCP model checkpoint *does* hold the alias (``model.lm_head.weight``, equal
  to ``model.model.embed_tokens.weight``); ``case.json["dcp_aliases"]`` lists such keys.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import accelerate  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from accelerate.state import AcceleratorState, PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402
from tests.corpus import common, train_common  # noqa: E402
from tests.corpus.train_common import DTYPE_NAMES  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader  # noqa: E402
from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

#: Cases whose user script also saves config + generation config + tokenizer into ``run/``.
RUN_ASSET_CASES = frozenset({"trainer_fsdp_qwen2_tied"})
#: Folder names accelerate uses for model / optimizer DCP checkpoints (model index 0).
MODEL_DIR, OPTIM_DIR = "pytorch_model_fsdp_0", "optimizer_0"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def enable_fsdp_on_cpu() -> None:
    """Make ``AcceleratorState`` honour an ``fsdp_plugin`` on ``MULTI_CPU`` (see module docstring).

    Mirrors the FSDP lines of accelerate's multi-GPU branch in ``AcceleratorState.__init__``.
    Idempotent; only acts on the first (initialising) call that carries an ``fsdp_plugin``.
    """
    if getattr(AcceleratorState.__init__, "_cpu_fsdp_patch", False):
        return
    original = AcceleratorState.__init__

    @functools.wraps(original)
    def init(self: AcceleratorState, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init._cpu_fsdp_patch = True  # type: ignore[attr-defined]
    AcceleratorState.__init__ = init  # type: ignore[method-assign]


class TruthCallback(train_common.SaveTruth):
    """Gather the full state dict from the live FSDP2 model right after every checkpoint save."""

    def __init__(self, case: dict[str, Any], keys: list[str], tied: dict[str, str]) -> None:
        """Remember where to write and which state-dict keys make up the truth (``tied``: allowed aliases)."""
        super().__init__(case)
        self.keys = keys
        self.tied = tied
        self.dtypes: set[torch.dtype] = set()

    def collect(self, model: Any, tag: str, step: int) -> dict[str, Any]:
        """Collective gather of the full state dict; rank 0 writes ``truth/<tag>.safetensors``."""
        assert isinstance(model, FSDPModule), type(model)
        entry = {"tag": tag, "path": f"run/{tag}/{MODEL_DIR}", "truth": f"truth/{tag}.safetensors", "step": step}
        truth, _ = train_common.save_full_truth(model, self.keys, self.tied, self.case_dir / entry["truth"])
        self.dtypes |= {t.dtype for t in truth.values()}
        return entry


def training_args(case: dict[str, Any], run_dir: Path) -> TrainingArguments:
    """Trainer arguments: FSDP2 + SHARDED_STATE_DICT on gloo/CPU (see module docstring)."""
    options = case.get("options") or {}
    mp = options.get("mixed_precision", "no")
    assert mp in ("no", "bf16"), mp
    return train_common.trainer_args(
        case,
        run_dir,
        use_cpu=True,  # MULTI_CPU PartialState on gloo; FSDP is switched on by enable_fsdp_on_cpu()
        fsdp=True,
        fsdp_config={
            "version": 2,
            "state_dict_type": "SHARDED_STATE_DICT",
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": True,
            "cpu_ram_efficient_loading": False,
        },
        bf16=mp == "bf16",
        save_only_model=False,
    )


def dcp_metadata(folder: Path) -> Any:
    """Read a DCP folder's ``.metadata`` (layout facts only; never used for the truth)."""
    return FileSystemReader(str(folder)).read_metadata()


def key_prefix(meta: Any, names: list[str]) -> str:
    """Prefix that model keys carry inside the DCP ``.metadata`` (e.g. ``"model."``)."""
    keys = set(meta.state_dict_metadata)
    probe = names[0]
    candidates = [k[: -len(probe)] for k in keys if k.endswith(probe)]
    for prefix in sorted(candidates, key=len):
        if all(prefix + n in keys for n in names):
            return prefix
    raise AssertionError(f"no common key prefix for {probe!r} in {sorted(keys)[:8]}")


def check_dcp_layout(folder: Path, prefix: str, names: list[str], world: int) -> str:
    """Assert a real sharded DCP save: every tensor has chunks in every rank's ``.distcp``.

    Returns the stored dtype name of the model tensors.
    """
    assert (folder / ".metadata").is_file(), folder
    files = {f"__{r}_0.distcp" for r in range(world)}
    present = {p.name for p in folder.glob("*.distcp")}
    assert present == files, (folder, present)
    meta = dcp_metadata(folder)
    per_key: dict[str, set[str]] = {}
    for index, info in meta.storage_data.items():
        per_key.setdefault(index.fqn, set()).add(info.relative_path)
    dtypes = set()
    for n in names:
        md = meta.state_dict_metadata[prefix + n]
        assert isinstance(md, TensorStorageMetadata), (n, md)
        assert len(md.chunks) == world, (n, md.chunks)
        assert per_key[prefix + n] == files, (n, per_key[prefix + n])
        dtypes.add(md.properties.dtype)
    (dtype,) = dtypes
    return DTYPE_NAMES[dtype]


def observed_layout(run_dir: Path, tags: list[str]) -> tuple[list[str], list[str]]:
    """Top-level entries Trainer wrote into ``checkpoint-N`` (same for every N) and the full file list."""
    tops = {tag: sorted(p.name for p in (run_dir / tag).iterdir()) for tag in tags}
    first = tops[tags[0]]
    assert all(v == first for v in tops.values()), tops
    return first, common.list_files(run_dir / tags[0])


def train_case(case: dict[str, Any]) -> None:
    """Train one case and (rank 0) write its ``case.json``."""
    t0 = time.time()
    case_dir = Path(case["case_dir"])
    run_dir = case_dir / "run"
    targs = training_args(case, run_dir)
    world = dist.get_world_size()
    assert targs.world_size == world == case["world_size"], (targs.world_size, world, case["world_size"])
    assert case.get("precision", "fp32") == "fp32", case.get("precision")

    model = common.build_model(case["model"], seed=case["seed"])
    tied = common.tied_map(model)
    buffers = common.persistent_buffer_names(model)
    names = [n for n, _ in model.named_parameters()]
    num_params = sum(p.numel() for p in model.parameters())
    tokenizer = common.build_tokenizer()
    run_assets = case["name"] in RUN_ASSET_CASES or bool((case.get("options") or {}).get("run_assets"))
    if run_assets and dist.get_rank() == 0:
        # What a user's script does before training (tokenizer.save_pretrained(output_dir) etc.).
        common.save_hf_extras(run_dir, model, tokenizer, "fp32")
    dist.barrier()

    callback = TruthCallback(case, names + buffers, tied)
    trainer = train_common.make_trainer(case, model, targs, tokenizer, callback)
    assert trainer.is_fsdp_enabled, "accelerate fell back to DDP: FSDP was not switched on"
    plugin = trainer.accelerator.state.fsdp_plugin
    assert plugin.fsdp_version == 2 and "SHARDED_STATE_DICT" in str(plugin.state_dict_type), plugin
    trainer.train()
    assert isinstance(trainer.model_wrapped, FSDPModule), type(trainer.model_wrapped)
    live_policy = trainer.model_wrapped._get_fsdp_state()._mp_policy  # what fully_shard really got
    param_dtype = live_policy.param_dtype
    fsdp_units = [n or "<root>" for n, m in trainer.model_wrapped.named_modules() if isinstance(m, FSDPModule)]
    mixed_precision = trainer.accelerator.state.mixed_precision
    dist.barrier()

    if dist.get_rank() == 0:
        callback.check_steps()
        tags = [c["tag"] for c in callback.checkpoints]
        model_meta = dcp_metadata(run_dir / tags[0] / MODEL_DIR)
        prefix = key_prefix(model_meta, names)
        truth_keys = {prefix + k for k in names + buffers}
        dcp_aliases = sorted(k[len(prefix) :] for k in model_meta.state_dict_metadata if k not in truth_keys)
        stored = {check_dcp_layout(run_dir / t / MODEL_DIR, prefix, names, world) for t in tags}
        (precision,) = stored
        assert {DTYPE_NAMES[d] for d in callback.dtypes} == {precision}, (callback.dtypes, precision)
        for t in tags:
            assert (run_dir / t / OPTIM_DIR / ".metadata").is_file(), t
        trainer_wrote, ckpt_files = observed_layout(run_dir, tags)
        places = [run_dir / t for t in tags] + [run_dir]
        meta = dict(case["meta"])
        meta.update(
            tied=bool(tied),
            tied_keys=tied,
            buffers=buffers,
            checkpoints=callback.checkpoints,
            key_prefix=prefix,
            dcp_aliases=dcp_aliases,
            has_config=any((p / "config.json").is_file() for p in places),
            has_tokenizer=any((p / f).is_file() for p in places for f in TOKENIZER_FILES),
            run_assets=sorted(p.name for p in run_dir.iterdir() if p.is_file()),
            trainer_wrote=trainer_wrote,
            checkpoint_files=ckpt_files,
            fsdp_version=plugin.fsdp_version,
            state_dict_type=str(plugin.state_dict_type).rsplit(".", 1)[-1],
            mixed_precision=mixed_precision,
            mp_param_dtype=DTYPE_NAMES.get(param_dtype) if param_dtype is not None else None,
            mp_reduce_dtype=DTYPE_NAMES.get(live_policy.reduce_dtype) if live_policy.reduce_dtype else None,
            fsdp_units=fsdp_units,
            precision=precision,
            num_params=num_params,
            torch_version=torch.__version__,
            transformers_version=transformers.__version__,
            accelerate_version=accelerate.__version__,
            build_seconds=round(time.time() - t0, 2),
        )
        common.write_json_atomic(case_dir / "case.json", meta)
    dist.barrier()


def main() -> None:
    """Entry point under ``torchrun --nproc_per_node 2``."""
    cases = common.read_plan()["cases"]
    enable_fsdp_on_cpu()
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    for case in cases:
        train_case(case)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
