"""DeepSpeed ZeRO consolidation on the real corpus (issue 3).

Truth is the fp32 master weights gathered from the live engine at save time (see tests/corpus), never
our own reader. Conversions run in-process through the CLI's ``main`` for speed; the entry points,
exit codes and memory are checked in subprocesses, as a user runs them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tests.corpus import build
from tests.corpus.common import model_config

from vllm_consolidate import cli

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DS_CASES = [n for n, s in build.CASES.items() if s.kind in ("ds", "trainer") and not build.CASES[n].big]

# Nothing in these tests may reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"


def _base_model(tmp: Path, name: str) -> Path:
    """A local 'base model' folder holding the case's config, for cases saved without one."""
    folder = tmp / f"base-{name}"
    if not folder.exists():
        model_config(build.CASES[name].model).save_pretrained(folder)
    return folder


def _convert(args: list[str]) -> int:
    """Run ``consolidate-for-vllm`` in-process (static validation is tested in test_validate.py)."""
    return cli.convert_main([*args, "--no-validate-vllm"])


def load_out(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output folder: its one safetensors file, or every shard its index names."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        out: dict[str, torch.Tensor] = {}
        for f in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(folder / f))
        return out
    return load_file(folder / "model.safetensors")


def assert_equal(truth: dict[str, torch.Tensor], out: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Same names; each tensor has ``dtype`` and equals the truth cast to it (``tensor.to``), bit for bit."""
    assert sorted(out) == sorted(truth), f"names differ: {sorted(set(out) ^ set(truth))}"
    for name, want in truth.items():
        got = out[name]
        expect = want.to(dtype) if want.is_floating_point() else want
        assert got.dtype == expect.dtype, f"{name}: {got.dtype} != {expect.dtype}"
        assert torch.equal(got, expect), f"{name} differs"


def _truth(name: str, case: Path, checkpoint: dict, tmp: Path) -> dict[str, torch.Tensor]:
    """The expected output: the live-engine truth, in the layout transformers' save_pretrained writes.

    The two differ only for MoE models, whose experts transformers >= 5 keeps fused in memory (and
    DeepSpeed saves fused) but writes per expert, and vision-language models (other prefixes); the truth
    goes through save_pretrained for those (tests/test_vlm.py).
    """
    truth = load_file(case / checkpoint["truth"])
    if build.CASES[name].model["arch"] in build.VLM_ARCHS:  # written under save_pretrained's prefixes
        from tests.test_vlm import expected_output

        return expected_output(build.CASES[name].model, truth, tmp / f"saved-{name}-{checkpoint['tag']}")
    if not any(".experts." in k for k in truth):
        return truth
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(model_config(build.CASES[name].model))
    model.load_state_dict(truth, strict=False)
    folder = tmp / f"saved-{name}-{checkpoint['tag']}"
    model.save_pretrained(folder)
    return load_out(folder)


def _convert_case(name: str, case: Path, out: Path, tmp: Path, *extra: str) -> None:
    meta = build.load_case(name)
    args = ["--input", str(case / meta["input"]), "--output", str(out), *extra]
    if not meta["has_config"]:
        args += ["--base-model-name", str(_base_model(tmp, name))]
    assert _convert(args) == 0


@pytest.mark.parametrize("name", DS_CASES)
def test_every_case_converts_bit_exact_fp32(name, corpus, tmp_path):
    case = corpus[name]
    meta = build.load_case(name)
    out = tmp_path / "out"
    _convert_case(name, case, out, tmp_path)
    assert_equal(_truth(name, case, meta["checkpoints"][-1], tmp_path), load_out(out), torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
    # Only our marker (provenance, and the proof that --force may replace the folder) is hidden.
    assert not any(p.name.startswith((".", "zero_to", "training_args", "rng", "trainer_state")) for p in out.iterdir()
                   if p.name != ".vllm-consolidate.json")
    assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("name", ["trainer_qwen2_z2_bf16", "trainer_llama_z3_bf16", "trainer_llama_z3g16_bf16"])
def test_every_trainer_checkpoint_via_checkpoint_dir(name, corpus, tmp_path):
    case = corpus[name]
    meta = build.load_case(name)
    for ckpt in meta["checkpoints"]:
        out = tmp_path / ckpt["tag"]
        folder = case / ckpt["path"]
        assert _convert(["--input", str(case / meta["input"]), "--checkpoint-dir", str(folder),
                         "--output", str(out)]) == 0
        assert_equal(load_file(case / ckpt["truth"]), load_out(out), torch.float32)
        # HF Trainer leaves the tokenizer in checkpoint-N: it is copied.
        assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("qwen2_z3_w2_bf16_tied", "bfloat16"), ("llama_z2_w3_fp32_tied", "bfloat16"),
     ("mistral_z2_w2_fp16_frozen", "float16"), ("qwen2moe_z3_w3_fp16", "float16"),
     ("llama_z1_w2_fp16_tied", "bfloat16"), ("trainer_llama_z3_bf16", "bfloat16")],
)
def test_half_precision_equals_truth_cast(name, dtype, corpus, tmp_path):
    case = corpus[name]
    meta = build.load_case(name)
    out = tmp_path / "out"
    _convert_case(name, case, out, tmp_path, "--dtype", dtype)
    assert_equal(_truth(name, case, meta["checkpoints"][-1], tmp_path), load_out(out), getattr(torch, dtype))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype


@pytest.mark.parametrize(("name", "expect"), [("qwen2_z3_w2_bf16_tied", torch.bfloat16),
                                              ("mistral_z2_w2_fp16_frozen", torch.float16),
                                              ("llama_z1_w1_fp32", torch.float32)])
def test_keep_original_precision_is_training_precision(name, expect, corpus, tmp_path):
    out = tmp_path / "out"
    _convert_case(name, corpus[name], out, tmp_path, "--keep-original-precision")
    tensors = load_out(out)
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {expect}


@pytest.mark.parametrize("name", ["qwen2_z3_w2_bf16_tied", "llama_z3_w2_bf16_frozen", "qwen2moe_z2_w2_bf16",
                                  "mistral_z1_w3_bf16"])
def test_transformers_logits_equal_truth(name, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    case = corpus[name]
    meta = build.load_case(name)
    out = tmp_path / "out"
    _convert_case(name, case, out, tmp_path)
    # Eager experts: torch's grouped GEMM on CPU rejects the tiny MoE's unaligned strides.
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation="eager").eval()
    reference = AutoModelForCausalLM.from_config(model_config(build.CASES[name].model),
                                                 experts_implementation="eager").eval()
    missing, unexpected = reference.load_state_dict(load_file(case / meta["checkpoints"][-1]["truth"]), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    reference.tie_weights()
    ids = torch.randint(0, meta["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_tied_embeddings_written_once(corpus, tmp_path):
    out = tmp_path / "out"
    _convert_case("llama_z2_w3_fp32_tied", corpus["llama_z2_w3_fp32_tied"], out, tmp_path)
    with safe_open(out / "model.safetensors", "pt") as fh:
        assert "lm_head.weight" not in fh.keys()
        assert fh.metadata() == {"format": "pt"}


def test_sharded_output_and_pytorch_bin(corpus, tmp_path):
    name = "qwen2_z3_w3_bf16"
    truth = load_file(corpus[name] / build.load_case(name)["checkpoints"][-1]["truth"])
    out = tmp_path / "sharded"
    _convert_case(name, corpus[name], out, tmp_path, "--max-shard-size", "200KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for f in files:
        with safe_open(out / f, "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
    assert_equal(truth, load_out(out), torch.float32)

    out = tmp_path / "bin"
    _convert_case(name, corpus[name], out, tmp_path, "--pytorch-bin")
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert_equal(truth, state, torch.float32)


# -- rank-file checks on every real checkpoint (issue 22) -------------------------------------------

#: Every DeepSpeed corpus case, ZeRO-1/2/3, raw and HF Trainer, the big one included.
ALL_DS_CASES = [n for n, s in build.CASES.items() if s.kind in ("ds", "trainer")]
ROUND_ROBIN = [n for n, s in build.CASES.items() if s.zero_extra.get("round_robin_gradients")]


@pytest.mark.parametrize("name", ALL_DS_CASES)
def test_rank_checks_pass_on_every_real_checkpoint(name, corpus, tmp_path):
    """No rank-file check refuses, or warns about, any checkpoint real DeepSpeed wrote.

    A check that refuses a real checkpoint is as bad as a missed attack: every checkpoint (every tag,
    every trainer checkpoint-N) of every DeepSpeed case goes through the reader (where every rank-file
    check runs), ``inspect`` and ``convert``. The big case is not converted (its 300 MB write is the
    memory tests' job); its reader and inspect run every check convert would.
    """
    from vllm_consolidate.inspection import inspect_path
    from vllm_consolidate.read.deepspeed import read_deepspeed, resolve_checkpoint

    case = corpus[name]
    meta = build.load_case(name)
    base = str(_base_model(tmp_path, name)) if not meta["has_config"] else "nobody/not-cached"
    for ckpt in meta["checkpoints"]:
        folder = case / ckpt["path"]
        source = read_deepspeed(resolve_checkpoint(folder).folder, case / meta["input"])
        assert not source.info.get("warnings"), (ckpt["tag"], source.info["warnings"])
        (report,) = inspect_path(case / meta["input"], checkpoint_dir=folder, base_model_name=base).inputs
        assert not report.problems, (ckpt["tag"], [p.message for p in report.problems])
        assert report.zero_stage == meta["stage"] and report.world_size == meta["world_size"]
        assert not [w for w in report.warnings if "_optim_states.pt" in w], report.warnings
        if not meta["big"]:
            out = tmp_path / ckpt["tag"]
            assert _convert(["--input", str(case / meta["input"]), "--checkpoint-dir", str(folder), "--output",
                             str(out), "--base-model-name", base]) == 0
            assert_equal(_truth(name, case, ckpt, tmp_path), load_out(out), torch.float32)


def _slice_mappings(case: Path) -> tuple[list, list[list[set[str]]]]:
    """The layouts of a ZeRO-1/2 case's last checkpoint, and each rank's ``param_slice_mappings`` names per group."""
    from vllm_consolidate.read.zero_slices import Zero12Group

    folder = _global_step(case / "ckpt")
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    ranks = sorted(folder.glob("*_optim_states.pt"), key=lambda p: int(p.name.split("rank_")[1].split("_")[0]))
    optim = [torch.load(p, map_location="cpu", weights_only=False)["optimizer_state_dict"] for p in ranks]
    pads = optim[0]["param_alignment_paddings"]
    layouts = [Zero12Group.of({k: tuple(v) for k, v in shapes.items()}, pads[g], len(ranks))
               for g, shapes in enumerate(states["param_shapes"])]
    return layouts, [[set(m) for m in sd["param_slice_mappings"]] for sd in optim]


@pytest.mark.parametrize("name", ROUND_ROBIN + ["llama_z2_w3_fp32_tied", "mistral_z1_w3_bf16"])
def test_param_slice_mappings_order(name, corpus):
    """What DeepSpeed 0.19 writes in ``param_slice_mappings``, which our reader only takes as advisory.

    Without round_robin_gradients its names are those of each rank's range in ``param_shapes`` order.
    With it, they are counted in the module's order while the flat data follows ``param_shapes``
    (the round-robin order): for some rank they name other parameters than its range holds.
    """
    layouts, mapped = _slice_mappings(corpus[name])
    world = len(mapped)
    flat_order = [[mapped[r][g] == layout.slice_names(r, world)[0] for g, layout in enumerate(layouts)]
                  for r in range(world)]
    if name in ROUND_ROBIN:
        assert not all(map(all, flat_order)), "the case must show the module-order names"
        assert all(mapped[r][g] == layout.slice_names(r, world)[1] for r in range(world)
                   for g, layout in enumerate(layouts))
    else:
        assert all(map(all, flat_order))


# -- input resolution -------------------------------------------------------------------------------

def test_input_forms_resolve_to_the_same_checkpoint(corpus, tmp_path, capsys):
    case = corpus["trainer_qwen2_z2_bf16"]
    run = case / "run"
    last = max(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    forms = {"run": run, "checkpoint": last, "global_step": next(last.glob("global_step*"))}
    digests = set()
    for label, folder in forms.items():
        out = tmp_path / label
        assert _convert(["--input", str(folder), "--output", str(out)]) == 0
        digests.add((out / "model.safetensors").read_bytes())
        printed = capsys.readouterr().out
        assert str(next(last.glob("global_step*")).name) in printed
    assert len(digests) == 1


def test_checkpoint_dir_overrides_detection(corpus, tmp_path, capsys):
    name = "llama_z2_w2_bf16"
    case = corpus[name]
    meta = build.load_case(name)
    first = meta["checkpoints"][0]
    out = tmp_path / "out"
    assert _convert(["--input", str(case / "ckpt"), "--checkpoint-dir", str(case / first["path"]), "--output",
                     str(out), "--base-model-name", str(_base_model(tmp_path, name))]) == 0
    assert "--checkpoint-dir" in capsys.readouterr().out
    assert_equal(load_file(case / first["truth"]), load_out(out), torch.float32)


def test_config_and_tokenizer_from_hub_id_in_local_cache(corpus, tmp_path, monkeypatch):
    """A Hub id resolves through a local HF cache laid out as huggingface_hub lays it out."""
    name = "llama_z2_w2_bf16"
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-llama" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    model_config(build.CASES[name].model).save_pretrained(snap)
    tok_src = corpus["qwen2_z3_w2_bf16_tied"] / "ckpt"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (tok_src / f).exists():
            shutil.copy(tok_src / f, snap / f)
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "out"
    assert _convert(["--input", str(corpus[name] / "ckpt"), "--output", str(out),
                     "--base-model-name", "acme/tiny-llama"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "tokenizer.json").is_file()


def test_missing_config_everywhere_is_an_error(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code = _convert(["--input", str(corpus["llama_z2_w2_bf16"] / "ckpt"), "--output", str(out),
                     "--base-model-name", "nobody/not-cached"])
    assert code == cli.exit_code(__import__("vllm_consolidate.errors").errors.ConfigNotFoundError("x"))
    err = capsys.readouterr().err
    assert "config.json" in err and "--base-model-name" in err
    assert not out.exists()


def test_missing_tokenizer_warns(corpus, tmp_path, capsys):
    name = "llama_z3_w2_bf16_frozen"  # config, no tokenizer
    out = tmp_path / "out"
    assert _convert(["--input", str(corpus[name] / "ckpt"), "--output", str(out),
                     "--base-model-name", "nobody/not-cached"]) == 0
    assert "no tokenizer" in capsys.readouterr().err


# -- safety -----------------------------------------------------------------------------------------

def _tree_state(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_input_is_never_modified_and_force_replaces_only_after_success(corpus, tmp_path):
    case = corpus["qwen2_z3_w2_bf16_tied"]
    before = _tree_state(case)
    out = tmp_path / "out"
    assert _convert(["--input", str(case / "ckpt"), "--output", str(out)]) == 0
    assert _convert(["--input", str(case / "ckpt"), "--output", str(out)]) == 6  # exists, no --force
    marker = out / "marker"
    marker.write_text("old")
    broken = tmp_path / "broken"
    shutil.copytree(case / "ckpt", broken)
    rank = next((broken / "global_step1").glob("*rank_1_*optim_states.pt")) if (broken / "global_step1").exists() \
        else next(broken.rglob("*rank_1_*optim_states.pt"))
    rank.write_bytes(rank.read_bytes()[: rank.stat().st_size // 2])
    assert _convert(["--input", str(broken), "--output", str(out), "--force"]) != 0
    assert marker.read_text() == "old", "a failed --force run must leave the old output untouched"
    assert _convert(["--input", str(case / "ckpt"), "--output", str(out), "--force"]) == 0
    assert not marker.exists()
    assert _tree_state(case) == before
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_disk_preflight(corpus, tmp_path, monkeypatch, capsys):
    import shutil as sh

    from vllm_consolidate.write import publish

    real = sh.disk_usage
    monkeypatch.setattr(publish.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "out"
    code = _convert(["--input", str(corpus["qwen2_z3_w2_bf16_tied"] / "ckpt"), "--output", str(out)])
    assert code == 7 and "not enough disk space" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def _ckpt_copy(corpus, tmp_path: Path, name: str) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(corpus[name] / "ckpt", dst)
    return dst


def _global_step(folder: Path) -> Path:
    return folder / (folder / "latest").read_text().strip()


def _run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "consolidate-for-vllm"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


BAD_INPUTS = ["empty", "missing_rank", "truncated_rank", "world_size", "bad_latest", "unsupported_stage"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_one_clear_line_no_output(kind, corpus, tmp_path):
    name = "qwen2_z3_w2_bf16_tied"
    if kind == "empty":
        src = tmp_path / "ckpt"
        src.mkdir()
        expect = "no checkpoint found"
    else:
        src = _ckpt_copy(corpus, tmp_path, name)
        gs = _global_step(src)
        ranks = sorted(gs.glob("*_optim_states.pt"))
        if kind == "missing_rank":
            ranks[1].unlink()
            expect = "rank 1 is missing"
        elif kind == "truncated_rank":
            ranks[1].write_bytes(ranks[1].read_bytes()[:4096])
            expect = "truncated"
        elif kind == "world_size":
            shutil.copy(ranks[1], gs / ranks[1].name.replace("rank_1_", "rank_2_"))
            expect = "world size mismatch"
        elif kind == "bad_latest":
            (src / "latest").write_text("global_step999")
            expect = "global_step999"
        else:  # rewrite one field of a real file: the recorded ZeRO stage
            state = torch.load(ranks[0], weights_only=False)
            state["optimizer_state_dict"]["zero_stage"] = 4
            torch.save(state, ranks[0])
            expect = "ZeRO stage 4 is not supported"
    out = tmp_path / "out"
    proc = _run_cli("--input", str(src), "--output", str(out))
    assert proc.returncode not in (0, 70), proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(src) in errors[0] or kind == "bad_latest" and "latest" in errors[0]
    assert "hint:" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_zero3_empty_placeholder_weights_are_refused(corpus, tmp_path):
    """HF Trainer under ZeRO-3 without 16-bit gather leaves no real weights next to global_stepN."""
    case = corpus["trainer_llama_z3_bf16"]
    ckpt = sorted((case / "run").glob("checkpoint-*"))[-1]
    proc = _run_cli("--input", str(ckpt), "--output", str(tmp_path / "out"), "--type", "hf_sharded")
    assert proc.returncode != 0
    assert "placeholder" in proc.stderr or "no checkpoint found" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_pickle_calling_os_system_is_refused_and_does_not_run(corpus, tmp_path):
    src = _ckpt_copy(corpus, tmp_path, "qwen2_z3_w2_bf16_tied")
    target = sorted(_global_step(src).glob("*_optim_states.pt"))[0]
    pwned = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {pwned}",))

    torch.save({"optimizer_state_dict": Payload()}, target)
    proc = _run_cli("--input", str(src), "--output", str(tmp_path / "out"), "--debug")
    assert proc.returncode == 5, proc.stderr
    assert "system" in proc.stderr and "not on the allowlist" in proc.stderr
    assert not pwned.exists(), "the payload ran"
    assert not (tmp_path / "out").exists()


def test_three_entry_points_agree(corpus, tmp_path):
    case = corpus["qwen2_z3_w2_bf16_tied"] / "ckpt"
    commands = {
        "sub": [str(BIN / "vllm-consolidate"), "convert"],
        "script": [str(BIN / "consolidate-for-vllm")],
        "train": [sys.executable, str(REPO / "train" / "consolidate_for_vllm.py")],
    }
    blobs = set()
    for label, cmd in commands.items():
        out = tmp_path / label
        proc = subprocess.run([*cmd, "--input", str(case), "--output", str(out), "--dtype", "bfloat16", "--json"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["detected"]["stage"] == 3 and summary["detected"]["world_size"] == 2
        assert summary["output_dtype"] == "bfloat16"
        blobs.add((out / "model.safetensors").read_bytes())
    assert len(blobs) == 1


# -- memory -----------------------------------------------------------------------------------------

_RSS_PROBE = """
import resource, sys
from vllm_consolidate import cli
args = sys.argv[1:]
code = cli.convert_main(args) if args else 0
print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
sys.exit(code)
"""


def _peak_rss(*args: str) -> int:
    proc = subprocess.run([sys.executable, "-c", _RSS_PROBE, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.rsplit("MAXRSS", 1)[1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_rss_is_bounded_by_largest_tensor(dtype, corpus, tmp_path):
    """Peak RSS above the interpreter's own stays below the largest tensor plus a small constant."""
    name = "llama_big_z2_w2_bf16"
    case = corpus[name]
    truth = case / build.load_case(name)["checkpoints"][-1]["truth"]
    with safe_open(truth, "pt") as fh:
        sizes = [fh.get_slice(k).get_shape() for k in fh.keys()]
    numels = [int(torch.Size(s).numel()) for s in sizes]
    largest, total = max(numels) * 4, sum(numels) * 4
    assert total > 3 * largest, "the case must be big enough to tell the bound from the model size"
    baseline = _baseline_rss()
    peak = _peak_rss("--input", str(case / "ckpt"), "--output", str(tmp_path / "out"), "--dtype", dtype,
                     "--no-validate-vllm")
    extra = peak - baseline
    constant = 160 * 2**20
    assert extra < largest + constant, f"peak {extra / 2**20:.0f} MiB above baseline; model {total / 2**20:.0f} MiB"


def _baseline_rss() -> int:
    probe = _RSS_PROBE.replace("code = cli.convert_main(args) if args else 0",
                               "import torch, vllm_consolidate.convert, vllm_consolidate.write.safetensors; code = 0")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    return int(proc.stdout.rsplit("MAXRSS", 1)[1])
