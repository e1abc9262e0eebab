"""The Megatron-Core reader on small saves written by torch's own DCP writer in Megatron-Core's layout.

The real Megatron corpus (tests/test_convert_megatron.py) proves the layouts against megatron-core
itself; these tests cover what needs no Megatron install: detection and the registry (a run, its
tracker, ``--checkpoint-dir``, verl's tracker of the same name), where the head layout comes from,
and the refusals. A save here is a Hugging Face model's state dict laid out as Megatron-Core stores
it (stacked layers, q/k/v interleaved per query group, ``[gate; up]``, a padded vocabulary), written
with ``torch.distributed.checkpoint.save`` beside Megatron-Core's ``metadata.json``.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from vllm_consolidate.errors import (
    ConfigNotFoundError,
    CorruptCheckpointError,
    InputNotFoundError,
    UnsafeInputError,
    UnsafePickleError,
    UnsupportedCheckpointError,
)
from vllm_consolidate.read import detect as detection
from vllm_consolidate.read.megatron import read_megatron, resolve_megatron
from vllm_consolidate.read.registry import run_saves

HEADS, GROUPS, HD, HIDDEN, FFN, LAYERS, VOCAB, PADDED = 4, 2, 8, 32, 48, 2, 50, 64
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
          "num_attention_heads": HEADS, "num_key_value_heads": GROUPS, "head_dim": HD, "intermediate_size": FFN,
          "num_hidden_layers": LAYERS, "vocab_size": VOCAB, "tie_word_embeddings": False, "rms_norm_eps": 1e-6}
# Nothing in these tests may reach the Hub (convert's default base model is not looked up online).
os.environ["HF_HUB_OFFLINE"] = "1"
MEGATRON_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                 "common_backend_version": 1}


def _hf_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"model.embed_tokens.weight": r(VOCAB, HIDDEN), "lm_head.weight": r(VOCAB, HIDDEN),
          "model.norm.weight": r(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": r(HEADS * HD, HIDDEN),
               p + "self_attn.k_proj.weight": r(GROUPS * HD, HIDDEN),
               p + "self_attn.v_proj.weight": r(GROUPS * HD, HIDDEN),
               p + "self_attn.o_proj.weight": r(HIDDEN, HEADS * HD),
               p + "mlp.gate_proj.weight": r(FFN, HIDDEN), p + "mlp.up_proj.weight": r(FFN, HIDDEN),
               p + "mlp.down_proj.weight": r(HIDDEN, FFN), p + "input_layernorm.weight": r(HIDDEN),
               p + "post_attention_layernorm.weight": r(HIDDEN)}
    return sd


def _megatron(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF state dict in Megatron-Core's global layout (stacked layer keys), with optimizer-like extras."""
    per = HEADS // GROUPS

    def qkv(i: int) -> torch.Tensor:
        p = f"model.layers.{i}.self_attn."
        q, k, v = (sd[p + f"{x}_proj.weight"] for x in "qkv")
        return torch.cat([q.view(GROUPS, per * HD, HIDDEN), k.view(GROUPS, HD, HIDDEN), v.view(GROUPS, HD, HIDDEN)],
                         dim=1).reshape(-1, HIDDEN)

    def stack(fn) -> torch.Tensor:
        return torch.stack([fn(i) for i in range(LAYERS)])

    pad = lambda t: torch.cat([t, torch.zeros(PADDED - VOCAB, HIDDEN)])  # noqa: E731
    lp = "model.layers.{}."
    return {
        "embedding.word_embeddings.weight": pad(sd["model.embed_tokens.weight"]),
        "output_layer.weight": pad(sd["lm_head.weight"]),
        "decoder.final_layernorm.weight": sd["model.norm.weight"],
        "decoder.layers.self_attention.linear_qkv.weight": stack(qkv),
        "decoder.layers.self_attention.linear_proj.weight": stack(
            lambda i: sd[lp.format(i) + "self_attn.o_proj.weight"]),
        "decoder.layers.input_layernorm.weight": stack(lambda i: sd[lp.format(i) + "input_layernorm.weight"]),
        "decoder.layers.pre_mlp_layernorm.weight": stack(
            lambda i: sd[lp.format(i) + "post_attention_layernorm.weight"]),
        "decoder.layers.mlp.linear_fc1.weight": stack(
            lambda i: torch.cat([sd[lp.format(i) + "mlp.gate_proj.weight"], sd[lp.format(i) + "mlp.up_proj.weight"]])),
        "decoder.layers.mlp.linear_fc2.weight": stack(lambda i: sd[lp.format(i) + "mlp.down_proj.weight"]),
        "optimizer.state.exp_avg.decoder.layers.mlp.linear_fc2.weight": torch.zeros(LAYERS, HIDDEN, FFN),
    }


def _save(folder: Path, tensors: dict[str, torch.Tensor], *, config: bool = True) -> Path:
    folder.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(tensors, checkpoint_id=str(folder))
    (folder / "metadata.json").write_text(json.dumps(MEGATRON_JSON))
    if config:
        (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def _values(source) -> dict[str, torch.Tensor]:
    """Each TensorSpec's bytes, read from its segments, as a tensor."""
    out = {}
    for spec in source.tensors:
        data = b""
        for seg in spec.segments:
            with open(seg.path, "rb") as fh:
                fh.seek(seg.offset)
                data += fh.read(seg.nbytes)
        out[spec.name] = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(spec.shape)
    return out


def _run(root: Path, iters: tuple[int, ...] = (1, 2), tracker: str | None = "2") -> tuple[Path, dict]:
    run = root / "run"
    truth = {}
    for n in iters:
        truth[n] = _hf_state(n)
        _save(run / f"iter_{n:07d}", _megatron(truth[n]), config=False)
    (run / "config.json").write_text(json.dumps(CONFIG))
    if tracker is not None:
        (run / "latest_checkpointed_iteration.txt").write_text(tracker)
    return run, truth


def test_save_reads_back_every_hf_tensor_bit_for_bit(tmp_path):
    sd = _hf_state(0)
    folder = _save(tmp_path / "iter_0000005", _megatron(sd))
    source = read_megatron(folder)
    got = _values(source)
    assert sorted(got) == sorted(sd)
    for name, value in sd.items():
        assert torch.equal(got[name], value), name
    assert source.info["vocab_size"] == VOCAB and source.info["layout_from"].endswith("config.json")
    assert source.info["dropped_entries"] == 1  # the optimizer entry


def test_run_picks_the_tracker_then_the_highest_and_checkpoint_dir_another(tmp_path):
    run, truth = _run(tmp_path, (1, 2, 3), tracker="2")
    detected = detection.detect(run)
    assert detected.kind == "megatron" and detected.weights_dir.name == "iter_0000002"
    got = _values(detection.read(detected))
    assert torch.equal(got["lm_head.weight"], truth[2]["lm_head.weight"])  # the run's config.json gave the layout
    (run / "latest_checkpointed_iteration.txt").unlink()
    assert detection.detect(run).weights_dir.name == "iter_0000003"
    older = detection.detect(run, checkpoint_dir=run / "iter_0000001")
    assert older.kind == "megatron" and older.weights_dir.name == "iter_0000001"
    fmt, saves = run_saves(run)
    assert fmt.kind == "megatron" and [c.step for c in saves.saves] == [1, 2, 3] and saves.latest.step == 3


@pytest.mark.parametrize(("text", "match"), [("7", "names iter_0000007, but it is missing"),
                                             ("two", "not an iteration")])
def test_a_broken_tracker_is_refused_not_passed_over(tmp_path, text, match):
    run, _ = _run(tmp_path, (1,), tracker=text)
    with pytest.raises(CorruptCheckpointError, match=match):
        detection.detect(run)


def test_type_megatron_on_another_format_is_not_found(tmp_path):
    (tmp_path / "step-1").mkdir()
    with pytest.raises(InputNotFoundError, match="no Megatron-Core"):
        detection.detect(tmp_path, "megatron")


def test_other_sharded_backend_is_unsupported(tmp_path):
    folder = _save(tmp_path / "iter_0000001", _megatron(_hf_state(0)))
    (folder / "metadata.json").write_text(json.dumps(dict(MEGATRON_JSON, sharded_backend="zarr")))
    with pytest.raises(UnsupportedCheckpointError, match="zarr"):
        resolve_megatron(folder)


def test_an_iteration_linked_out_of_the_run_is_refused(tmp_path):
    elsewhere, _ = _run(tmp_path / "elsewhere", (4,), tracker=None)
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(elsewhere / "iter_0000004", run / "iter_0000004")
    (run / "latest_checkpointed_iteration.txt").write_text("4")
    with pytest.raises(UnsafeInputError):
        detection.detect(run)


def test_no_layout_anywhere_is_exit_8_naming_base_model(tmp_path):
    folder = _save(tmp_path / "iter_0000001", _megatron(_hf_state(0)), config=False)
    with pytest.raises(ConfigNotFoundError) as err:
        read_megatron(folder)
    assert "--base-model-name" in err.value.hint


def _common(folder: Path, args: object) -> None:
    """A common.pt as Megatron-LM writes it: ``torch.save`` of a dict holding ``args``."""
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 1}, folder / "common.pt")


def _args(**changes):
    """Megatron-LM's args of the model above, as its argument parser fills them (the fields the reader uses)."""
    import argparse

    fields = dict(num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
                  group_query_attention=True, num_query_groups=GROUPS, kv_channels=HD, vocab_size=VOCAB,
                  padded_vocab_size=PADDED, seq_length=128, max_position_embeddings=256, norm_epsilon=1e-6,
                  rotary_base=10000, untie_embeddings_and_output_weights=True, swiglu=True, normalization="RMSNorm",
                  params_dtype=torch.float32)
    fields.update(changes)
    return argparse.Namespace(**{k: v for k, v in fields.items() if v is not None})


def test_args_in_common_pt_give_the_layout_and_the_config(tmp_path):
    sd = _hf_state(0)
    folder = _save(tmp_path / "iter_0000001", _megatron(sd), config=False)
    _common(folder, _args())
    source = read_megatron(folder)
    assert source.info["layout_from"] == "Megatron-LM args in common.pt"
    got = _values(source)
    assert all(torch.equal(got[n], v) for n, v in sd.items())
    assert source.config == dict(CONFIG, attention_bias=False, mlp_bias=False, max_position_embeddings=256,
                                 rope_theta=10000, hidden_act="silu")


def test_a_converted_args_only_save_loads_in_transformers(tmp_path):
    """The config.json written from args is one transformers builds the model from, with every weight the truth."""
    from transformers import AutoModelForCausalLM

    from vllm_consolidate import cli

    sd = _hf_state(0)
    folder = _save(tmp_path / "iter_0000001", _megatron(sd), config=False)
    _common(folder, _args())
    assert cli.main(["convert", "--input", str(folder), "--output", str(tmp_path / "out"), "--no-validate-vllm"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "LlamaForCausalLM"
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(sd) and all(torch.equal(loaded[n], v) for n, v in sd.items())


def test_args_without_the_true_vocabulary_are_exit_8(tmp_path):
    folder = _save(tmp_path / "iter_0000001", _megatron(_hf_state(0)), config=False)
    _common(folder, _args(vocab_size=None))
    with pytest.raises(ConfigNotFoundError, match="only the padded vocabulary"):
        read_megatron(folder)


def test_args_without_the_true_vocabulary_take_it_from_a_named_base_model(tmp_path):
    """Megatron-LM's args record the true vocabulary only when --vocab-size was given: the base model named (as
    the refusal's hint says) then gives the layout and the config, if it describes the model the args describe."""
    sd = _hf_state(0)
    folder = _save(tmp_path / "iter_0000001", _megatron(sd), config=False)
    _common(folder, _args(vocab_size=None))
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(CONFIG))
    source = read_megatron(folder, base_model_name=str(base))
    assert (source.info["layout_from"], source.config) == (str(base / "config.json"), None)
    got = _values(source)
    assert all(torch.equal(got[n], v) for n, v in sd.items())
    for field, value in (("num_key_value_heads", HEADS), ("num_hidden_layers", LAYERS + 1), ("hidden_size", 64)):
        (base / "config.json").write_text(json.dumps(dict(CONFIG, **{field: value})))
        with pytest.raises(ConfigNotFoundError, match=f"another model.*{field} {value}") as err:
            read_megatron(folder, base_model_name=str(base))
        assert "--base-model-name" in err.value.hint


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_hostile_common_pt_is_refused_and_never_run(tmp_path, monkeypatch):
    folder = _save(tmp_path / "iter_0000001", _megatron(_hf_state(0)), config=False)
    with open(folder / "common.pt", "wb") as fh:
        pickle.dump({"args": _Boom()}, fh)  # not even a zip: refused before any unpickling
    monkeypatch.chdir(tmp_path)
    with pytest.raises((UnsafePickleError, UnsupportedCheckpointError)):
        read_megatron(folder)
    torch.save({"args": _Boom()}, folder / "common.pt")
    with pytest.raises(UnsafePickleError, match="not on the allowlist"):
        read_megatron(folder)
    assert not (tmp_path / "pwned").exists()


def test_an_unknown_model_key_is_refused_by_name_before_any_chunk_is_read(tmp_path):
    tensors = _megatron(_hf_state(0))
    tensors["decoder.layers.self_attention.linear_proj.bias"] = torch.zeros(LAYERS, HIDDEN)
    folder = _save(tmp_path / "iter_0000001", tensors)
    for f in folder.glob("*.distcp"):
        f.write_bytes(b"")  # the refusal must come from the metadata alone
    with pytest.raises(UnsupportedCheckpointError, match="linear_proj.bias"):
        read_megatron(folder)


def test_nemo_weights_and_verl_megatron_layouts(tmp_path):
    """NeMo 2 keeps the save in weights/; verl's Megatron backend in global_step_N/actor/dist_ckpt with the
    config in actor/huggingface/ (found through the reader's asset folders), the run's tracker naming the step."""
    sd = _hf_state(3)
    nemo = tmp_path / "nemo"
    _save(nemo / "weights", _megatron(sd), config=False)
    (nemo / "context").mkdir()
    (nemo / "context" / "config.json").write_text(json.dumps(CONFIG))
    detected = detection.detect(nemo)
    assert detected.kind == "megatron" and detected.weights_dir == nemo  # its context/ is searched
    assert torch.equal(_values(detection.read(detected))["lm_head.weight"], sd["lm_head.weight"])
    run = tmp_path / "verl"
    for step in (1, 2):
        _save(run / f"global_step_{step}" / "actor" / "dist_ckpt", _megatron(_hf_state(step)), config=False)
        (run / f"global_step_{step}" / "actor" / "huggingface").mkdir()
        (run / f"global_step_{step}" / "actor" / "huggingface" / "config.json").write_text(json.dumps(CONFIG))
    (run / "latest_checkpointed_iteration.txt").write_text("1")
    detected = detection.detect(run)
    assert detected.kind == "megatron" and detected.weights_dir == run / "global_step_1" / "actor"
    source = detection.read(detected)
    assert source.info["layout_from"].endswith("actor/huggingface/config.json")
    assert torch.equal(_values(source)["lm_head.weight"], _hf_state(1)["lm_head.weight"])
    fmt, saves = run_saves(run)
    assert fmt.kind == "megatron" and [c.step for c in saves.saves] == [1, 2] and saves.latest.step == 1


def test_pick_ranges_are_slices_of_the_global_tensor_s_ranges():
    """``_segments`` against the plain rule (each pick range's bytes by ``sub_segments``, adjacent ranges of one file
    merged) on random merged global tensors and picks. The ranges a pick covers whole are the global tensor's own
    objects, a slice of its list: a stacked TP row-parallel weight is ~43k ranges, which rebuilding per layer cost
    more than the rest of the plan (issue 24's benchmark)."""
    import random

    from vllm_consolidate import dtypes
    from vllm_consolidate.read.chunks import _merge
    from vllm_consolidate.read.megatron import _segments
    from vllm_consolidate.read.megatron_names import Pick
    from vllm_consolidate.source import Segment, TensorSpec, sub_segments

    rnd = random.Random(0)
    shared = 0
    for _ in range(2000):
        spec_segments = _merge([Segment(rnd.choice("ab"), 4 * rnd.randint(0, 30), 4 * rnd.randint(1, 5))
                                for _ in range(rnd.randint(1, 12))])
        total = sum(s.nbytes for s in spec_segments) // 4
        ranges = []
        for _ in range(rnd.randint(1, 5)):
            start = rnd.randrange(total)
            ranges.append((start, rnd.randint(0, total - start)))
        spec = TensorSpec("w", dtypes.float32, (total,), spec_segments)
        got = _segments(spec, Pick("x", "w", (sum(c for _, c in ranges),), tuple(ranges)))
        want = _merge([s for start, count in ranges for s in sub_segments(spec_segments, 4 * start, 4 * count)])
        assert got == want, (spec_segments, ranges)
        shared += sum(1 for g in got if any(g is s for s in spec_segments))
    assert shared > 2000  # the plain rule builds every range anew
