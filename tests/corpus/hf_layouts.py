"""Generator of REAL Hugging Face model folders for ``tests/test_hf_inputs.py``.

Every layout is written by the tool that writes it in the wild, never imitated by hand:

* ``tf5`` step (``.venv``, transformers 5): ``save_pretrained`` sharded (``max_shard_size="200KB"``)
  and single ``model.safetensors``, fp32 and bf16, llama and tied qwen2.
* ``tf4`` step (``.venv-tf4``, ``transformers<5``, created here on first use because transformers 5
  always writes safetensors): ``save_pretrained(safe_serialization=False)`` sharded and single
  ``.bin``, and a DDP-wrapped ``torch.compile``'d model's ``state_dict()`` saved with ``torch.save``
  (keys start with ``module._orig_mod.``), as a training script does.
* ``deepspeed`` step (``.venv``, DeepSpeed on CPU, one rank, ZeRO-3): ``save_pretrained`` of the
  engine's partitioned module without gathering (empty placeholder tensors), and DeepSpeed's own
  ``zero_to_fp32.py`` run with the output folder ``pytorch_model.bin`` (the nested layout), both
  sharded and single.

Each step runs in a subprocess and writes into a staging folder; the finished folders are moved
under :func:`layouts_root` and a ``<step>.done`` stamp with the spec hash is written last, so a
second run reuses everything. Usage: ``python -m tests.corpus.hf_layouts`` builds what is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.corpus import common
from tests.corpus.build import REPO_ROOT, corpus_root
from tests.corpus.cache import _free_port, build_lock

#: Bump when what a step writes changes; part of every stamp.
LAYOUTS_VERSION = 1
TF4_VENV = REPO_ROOT / ".venv-tf4"
TORCH_PIN = "torch==2.13.0"

_LLAMA = dict(
    arch="llama", hidden=64, intermediate=96, layers=2, heads=2, kv_heads=1, vocab=503, tied=False, frozen=[], extra={}
)
_QWEN2_TIED = dict(
    arch="qwen2", hidden=64, intermediate=96, layers=2, heads=2, kv_heads=1, vocab=503, tied=True, frozen=[], extra={}
)

#: step -> {layout name: description}
STEPS: dict[str, dict[str, str]] = {
    "tf5": {
        "st_sharded_bf16": "llama, save_pretrained(max_shard_size=200KB), bf16",
        "st_sharded_fp32": "tied qwen2, save_pretrained(max_shard_size=200KB), fp32",
        "st_single_fp32": "llama, save_pretrained, one model.safetensors, fp32",
        "st_single_bf16": "tied qwen2, save_pretrained, one model.safetensors, bf16",
    },
    "tf4": {
        "bin_sharded_fp32": "llama, transformers 4 save_pretrained(safe_serialization=False, max_shard_size=200KB)",
        "bin_single_bf16_tied": "tied qwen2, transformers 4 save_pretrained(safe_serialization=False), bf16",
        "bin_ddp_compiled": "llama, torch.save(DDP(torch.compile(model)).state_dict()) -> module._orig_mod. keys",
    },
    "deepspeed": {
        "z3_placeholder": "ZeRO-3 engine.module.save_pretrained without gathering: empty tensors",
        "nested_sharded": "zero_to_fp32.py CKPT pytorch_model.bin --max_shard_size 200KB (folder with shards+index)",
        "nested_single": "zero_to_fp32.py CKPT pytorch_model.bin (folder holding pytorch_model.bin)",
    },
}


def layouts_root() -> Path:
    """Folder of the cached layouts, inside the shared corpus root."""
    return corpus_root() / f"hf_layouts-v{LAYOUTS_VERSION}"


def _step_hash(step: str) -> str:
    blob = json.dumps(
        {"v": LAYOUTS_VERSION, "step": step, "layouts": STEPS[step], "models": [_LLAMA, _QWEN2_TIED]}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _done(root: Path, step: str) -> bool:
    stamp = root / f"{step}.done"
    try:
        return json.loads(stamp.read_text()).get("hash") == _step_hash(step) and all(
            (root / name).is_dir() for name in STEPS[step]
        )
    except (OSError, json.JSONDecodeError):
        return False


# -- the transformers 4 venv ----------------------------------------------------------------------------


def ensure_tf4_venv(log: Path | None = None) -> Path:
    """Create ``.venv-tf4`` (torch pinned first, then ``transformers<5``) unless it is ready; return its python.

    Idempotent: a stamp file is written last. pip is checked not to have replaced the pinned torch.
    """
    py = TF4_VENV / "bin" / "python"
    stamp = TF4_VENV / ".vllmc-tf4-ready"
    if stamp.is_file() and py.is_file():
        return py
    out = open(log, "a") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        if not py.is_file():
            subprocess.run(["python3", "-m", "venv", str(TF4_VENV)], check=True, stdout=out, stderr=subprocess.STDOUT)
        pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, TORCH_PIN], check=True, stdout=out, stderr=subprocess.STDOUT)
        subprocess.run(
            [*pip, "transformers<5", "safetensors", "tokenizers", "numpy", TORCH_PIN],
            check=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        got = subprocess.run(
            [str(py), "-c", "import torch, transformers; print(torch.__version__, transformers.__version__)"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        if not got[0].startswith("2.13.0") or int(got[1].split(".")[0]) >= 5:
            raise RuntimeError(f".venv-tf4 has torch {got[0]} / transformers {got[1]}; expected 2.13.0 / <5")
    finally:
        if log:
            out.close()
    stamp.write_text(" ".join(got) + "\n")
    return py


# -- running the steps ----------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="2",
        PYTHONUNBUFFERED="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    return env


def build_layouts(verbose: bool = False) -> Path:
    """Build every missing step; return :func:`layouts_root`, whose sub-folders are the layouts."""
    root = layouts_root()
    with build_lock(root):
        for step in STEPS:
            if _done(root, step):
                continue
            t0 = time.time()
            log = root / f"{step}.log"
            log.write_text("")
            python = str(ensure_tf4_venv(log)) if step == "tf4" else sys.executable
            staging = root / f".{step}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            with open(log, "a") as fh:
                proc = subprocess.run(
                    [python, "-m", "tests.corpus.hf_layouts", "--step", step, "--out", str(staging)],
                    cwd=REPO_ROOT,
                    env=_env(),
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    check=False,
                )
            if proc.returncode != 0:
                tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
                raise RuntimeError(f"hf layout step {step!r} failed (rc={proc.returncode}); log {log}:\n{tail}")
            for name in STEPS[step]:
                shutil.rmtree(root / name, ignore_errors=True)
                os.rename(staging / name, root / name)
            shutil.rmtree(staging, ignore_errors=True)
            common.write_json_atomic(
                root / f"{step}.done", {"hash": _step_hash(step), "seconds": round(time.time() - t0, 1)}
            )
            if verbose:
                print(f"[hf_layouts] {step}: {time.time() - t0:.1f}s", flush=True)
    return root


# -- step bodies (run inside the subprocess) ------------------------------------------------------------


def _extras(folder: Path, model: Any, precision: str) -> None:
    model.generation_config.save_pretrained(folder)
    common.build_tokenizer().save_pretrained(folder)
    if not (folder / "config.json").is_file():
        common.save_hf_extras(folder, model, None, precision)


def _step_tf5(out: Path) -> None:
    import torch

    for name, spec, dtype, shard in (
        ("st_sharded_bf16", _LLAMA, torch.bfloat16, "200KB"),
        ("st_sharded_fp32", _QWEN2_TIED, torch.float32, "200KB"),
        ("st_single_fp32", _LLAMA, torch.float32, None),
        ("st_single_bf16", _QWEN2_TIED, torch.bfloat16, None),
    ):
        model = common.build_model(spec, seed=len(name)).to(dtype)
        folder = out / name
        if shard:
            model.save_pretrained(folder, max_shard_size=shard)
            assert (folder / "model.safetensors.index.json").is_file(), name
        else:
            model.save_pretrained(folder)
            assert (folder / "model.safetensors").is_file(), name
        _extras(folder, model, "bf16" if dtype == torch.bfloat16 else "fp32")


def _step_tf4(out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    sharded = common.build_model(_LLAMA, seed=41)
    sharded.save_pretrained(out / "bin_sharded_fp32", safe_serialization=False, max_shard_size="200KB")
    assert (out / "bin_sharded_fp32" / "pytorch_model.bin.index.json").is_file()
    _extras(out / "bin_sharded_fp32", sharded, "fp32")

    tied = common.build_model(_QWEN2_TIED, seed=42).to(torch.bfloat16)
    tied.save_pretrained(out / "bin_single_bf16_tied", safe_serialization=False)
    assert (out / "bin_single_bf16_tied" / "pytorch_model.bin").is_file()
    _extras(out / "bin_single_bf16_tied", tied, "bf16")

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = common.build_model(_LLAMA, seed=43)
        wrapped = DistributedDataParallel(torch.compile(model))
        folder = out / "bin_ddp_compiled"
        folder.mkdir()
        torch.save(wrapped.state_dict(), folder / "pytorch_model.bin")
        common.save_hf_extras(folder, model, common.build_tokenizer(), "fp32")
    finally:
        dist.destroy_process_group()


def _step_deepspeed(out: Path) -> None:
    os.environ.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
    )
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    deepspeed.init_distributed(dist_backend="gloo")
    model = common.build_model(_QWEN2_TIED, seed=44)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    placeholder = out / "z3_placeholder"
    engine.module.save_pretrained(placeholder)  # the mistake: no GatheredParameters / 16-bit gather
    _extras(placeholder, model, "bf16")
    ckpt = out / "_ds_ckpt"
    engine.save_checkpoint(str(ckpt), tag="global_step1")
    for name, shard in (("nested_sharded", "200KB"), ("nested_single", "5GB")):
        folder = out / name
        folder.mkdir()
        # The command users copy from old guides: `python zero_to_fp32.py . pytorch_model.bin`.
        convert_zero_checkpoint_to_fp32_state_dict(str(ckpt), str(folder / "pytorch_model.bin"), max_shard_size=shard)
        common.save_hf_extras(folder, model, common.build_tokenizer(), "fp32")
    assert (out / "nested_sharded" / "pytorch_model.bin" / "pytorch_model.bin.index.json").is_file()
    assert (out / "nested_single" / "pytorch_model.bin" / "pytorch_model.bin").is_file()
    shutil.rmtree(ckpt)


def main(argv: list[str] | None = None) -> None:
    """Build missing layouts, or (``--step``) run one step into ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", choices=list(STEPS))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.step:
        {"tf5": _step_tf5, "tf4": _step_tf4, "deepspeed": _step_deepspeed}[args.step](args.out)
        return
    t0 = time.time()
    root = build_layouts(verbose=True)
    print(f"hf layouts in {root} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
