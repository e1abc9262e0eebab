"""Megatron-Bridge's ``run_config.yaml`` and NeMo 2's ``context/model.yaml``: the model config of a save that has
no config.json and no args.

Saves are the small DCP saves of test_megatron_reader.py; the YAML is written here in the two forms Bridge
writes (facts from its checkpoint code): the model provider's fields flat (``_target_: ...ModelProvider``,
functions as ``{_target_, _call_: false}``), and the newer ``_builder_`` form with megatron-core's
``TransformerConfig`` fields nested under ``transformer:`` (the activation by name); NeMo's ``model.yaml`` (its
``io_dump`` of the model, facts from NeMo's ``lightning/io/mixin.py``) has them under ``config:``, and its
``tokenizer:`` names the folder of ``context/`` where the tokenizer was copied. Bridge's real layout, built around
a megatron-core save, is tests/test_convert_megatron.py's ``bridge`` case; NeMo's real save (nemo_toolkit 2.7.3 on
CPU) is checked by ``make check-nemo`` (tests/corpus/nemo_check.py), outside the CI budget: its venv alone takes
minutes to set up.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from tests.unit.read.test_megatron_reader import (
    CONFIG,
    FFN,
    GROUPS,
    HD,
    HEADS,
    HIDDEN,
    LAYERS,
    PADDED,
    VOCAB,
    _hf_state,
    _megatron,
    _save,
    _values,
)

from vllm_consolidate.errors import ConfigNotFoundError, CorruptCheckpointError
from vllm_consolidate.formats.megatron_common import MAX_RUN_CONFIG_BYTES
from vllm_consolidate.read.megatron import read_megatron

TRANSFORMER = {"num_layers": LAYERS, "hidden_size": HIDDEN, "ffn_hidden_size": FFN, "num_attention_heads": HEADS,
               "num_query_groups": GROUPS, "kv_channels": HD, "layernorm_epsilon": 1e-6, "normalization": "RMSNorm",
               "gated_linear_unit": True, "add_qkv_bias": False, "qk_layernorm": False}
GPT = {"vocab_size": VOCAB, "seq_length": 256, "rotary_base": 10000, "share_embeddings_and_output_weights": False,
       "position_embedding_type": "rope", "make_vocab_size_divisible_by": 16}
WANT = dict(CONFIG, attention_bias=False, mlp_bias=False, max_position_embeddings=256, rope_theta=10000,
            hidden_act="silu")


def provider_form(**changes) -> dict:
    model = {"_target_": "megatron.bridge.models.llama.llama_provider.LlamaModelProvider", **TRANSFORMER, **GPT,
             "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
             "params_dtype": {"_target_": "torch.float32", "_call_": False}}
    model.update(changes)
    return {"model": {k: v for k, v in model.items() if v is not None},
            "checkpoint": {"_target_": "megatron.bridge.training.config.CheckpointConfig", "ckpt_format": "torch_dist"}}


def builder_form() -> dict:
    return {"model": {"_builder_": "megatron.bridge.models.gpt.gpt_builder.GPTModelBuilder",
                      "_target_": "megatron.bridge.models.gpt.model_config.BridgeGPTModelConfig", **GPT,
                      "transformer": {"_target_": "megatron.core.transformer.transformer_config.TransformerConfig",
                                      **TRANSFORMER, "activation_func": "silu"}}}


def _bridge_save(tmp_path, content) -> tuple:
    sd = _hf_state(0)
    folder = _save(tmp_path / "iter_0000001", _megatron(sd), config=False)
    text = content if isinstance(content, str) else yaml.safe_dump(content)
    (folder / "run_config.yaml").write_text(text)
    return folder, sd


@pytest.mark.parametrize("form", [provider_form, builder_form])
def test_run_config_gives_the_layout_and_the_config(tmp_path, form):
    folder, sd = _bridge_save(tmp_path, form())
    source = read_megatron(folder)
    assert source.info["layout_from"] == "Megatron-Bridge run_config.yaml"
    got = _values(source)
    assert all(torch.equal(got[n], v) for n, v in sd.items())
    assert source.config == WANT


def test_tied_follows_the_keys_when_run_config_does_not_say(tmp_path):
    folder, _ = _bridge_save(tmp_path, provider_form(share_embeddings_and_output_weights=None))
    assert read_megatron(folder).config["tie_word_embeddings"] is False  # the save has output_layer.weight


@pytest.mark.parametrize(("changes", "match"), [
    ({"vocab_size": None}, "only the padded vocabulary"),
    ({"gated_linear_unit": None}, "non-gated"),  # megatron-core's default: no gated unit, so not a SwiGLU model
    ({"activation_func": {"_target_": "torch.nn.functional.gelu", "_call_": False}}, "non-gated"),
    ({"normalization": "LayerNorm"}, "LayerNorm"),
    ({"num_attention_heads": None}, "no usable head layout"),
])
def test_a_run_config_missing_what_the_split_needs_is_exit_8(tmp_path, changes, match):
    folder, _ = _bridge_save(tmp_path, provider_form(**changes))
    with pytest.raises(ConfigNotFoundError, match=match) as err:
        read_megatron(folder)
    assert "run_config.yaml" in err.value.message and "--base-model-name" in err.value.hint


def test_a_run_config_without_the_vocabulary_takes_the_named_base_model(tmp_path):
    """As Megatron-LM's args: the base model named gives the layout and config, if it is the same model."""
    import json

    folder, sd = _bridge_save(tmp_path, provider_form(vocab_size=None))
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(CONFIG))
    source = read_megatron(folder, base_model_name=str(base))
    assert (source.info["layout_from"], source.config) == (str(base / "config.json"), None)
    assert all(torch.equal(_values(source)[n], v) for n, v in sd.items())
    (base / "config.json").write_text(json.dumps(dict(CONFIG, num_attention_heads=GROUPS)))
    with pytest.raises(ConfigNotFoundError, match="another model than the model fields of Megatron-Bridge"):
        read_megatron(folder, base_model_name=str(base))


@pytest.mark.parametrize(("text", "match"), [
    ("model: [1, 2\n", "not valid YAML"),
    ("!!python/object/apply:os.system ['touch pwned']\n", "not valid YAML"),  # safe_load builds no object
    ("model: !!python/object/apply:os.system ['touch pwned']\n", "not valid YAML"),
    ("- just\n- a list\n", "no model: mapping"),
    ("model: 3\n", "no model: mapping"),
    ("# " + "x" * MAX_RUN_CONFIG_BYTES + "\n", "more than the"),
])
def test_a_hostile_or_broken_run_config_is_refused_and_never_run(tmp_path, monkeypatch, text, match):
    monkeypatch.chdir(tmp_path)
    folder, _ = _bridge_save(tmp_path, text)
    with pytest.raises(CorruptCheckpointError, match=match):
        read_megatron(folder)
    assert not (tmp_path / "pwned").exists()


def nemo_model_yaml(**changes) -> dict:
    """NeMo 2's ``context/model.yaml``: the model's io config, its ``config:`` the GPTConfig (TransformerConfig
    fields, defaults included), functions as ``{_call_: false, _target_: ...}``."""
    config = {"_target_": "nemo.collections.llm.gpt.model.llama.Llama32Config1B", **TRANSFORMER, **GPT,
              "activation_func": {"_call_": False, "_target_": "torch.nn.functional.silu"}}
    config.update(changes)
    return {"_target_": "nemo.collections.llm.gpt.model.llama.LlamaModel",
            "config": {k: v for k, v in config.items() if v is not None},
            "tokenizer": {"_target_": "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer",
                          "pretrained_model_name": "nemo_tokenizer"}}


def _nemo_save(tmp_path, content) -> tuple:
    sd = _hf_state(0)
    outer = tmp_path / "nemo_ckpt"
    _save(outer / "weights", _megatron(sd), config=False)
    (outer / "context").mkdir()
    text = content if isinstance(content, str) else yaml.safe_dump(content)
    (outer / "context" / "model.yaml").write_text(text)
    return outer, sd


def test_nemo_model_yaml_gives_the_layout_and_the_config(tmp_path):
    outer, sd = _nemo_save(tmp_path, nemo_model_yaml())
    source = read_megatron(outer)
    assert source.info["layout_from"] == "NeMo context/model.yaml"
    got = _values(source)
    assert all(torch.equal(got[n], v) for n, v in sd.items())
    assert source.config == WANT


def test_nemo_converts_with_the_tokenizer_nemo_saved(tmp_path, capsys):
    """A NeMo 2 folder alone (no config.json, no base model): config from model.yaml (the summary says so),
    tokenizer from ``context/nemo_tokenizer/``."""
    from tests.corpus import common

    from vllm_consolidate import cli

    outer, _ = _nemo_save(tmp_path, nemo_model_yaml())
    common.build_tokenizer().save_pretrained(outer / "context" / "nemo_tokenizer")
    code = cli.main(["convert", "--input", str(outer), "--output", str(tmp_path / "out"), "--no-validate-vllm",
                     "--base-model-name", ""])
    assert code == 0
    assert f"config:     built from NeMo context/model.yaml ({outer / 'context' / 'model.yaml'})\n" in (
        capsys.readouterr().out)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (
        outer / "context" / "nemo_tokenizer" / "tokenizer.json").read_bytes()


def test_inspect_names_the_nemo_model_yaml_it_builds_the_config_from(tmp_path, capsys):
    """inspect says convert's config.json is built from ``context/model.yaml`` (not "none"), in text and JSON, even
    when a base model with a config.json of its own is named (model.yaml comes first, as in convert)."""
    import json

    from vllm_consolidate import cli

    outer, _ = _nemo_save(tmp_path, nemo_model_yaml())
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(CONFIG))
    yaml_path = str(outer / "context" / "model.yaml")
    for base_model in ("", str(base)):
        assert cli.main(["inspect", str(outer), "--base-model-name", base_model]) == 0
        text = capsys.readouterr().out
        assert f"config:        built from NeMo context/model.yaml ({yaml_path})\n" in text, text
        assert cli.main(["inspect", str(outer), "--json", "--base-model-name", base_model]) == 0
        assets = json.loads(capsys.readouterr().out)["inputs"][0]["assets"]
        assert (assets["config"], assets["from"]["config"], assets["config_built_from"]) == (
            yaml_path, "built", "NeMo context/model.yaml"), assets


def test_a_nemo_model_yaml_without_vocab_size_gives_way_to_the_base_model(tmp_path):
    """NeMo's Llama presets leave vocab_size null (NeMo pads the tokenizer's size): model.yaml cannot give the true
    vocabulary, so the base model named on the command line does, as the refusal's hint says (the real save of
    tests/corpus/nemo_check.py's nemo2_llama_vocab_from_tokenizer)."""
    import json

    outer, sd = _nemo_save(tmp_path, nemo_model_yaml(vocab_size=None))
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(CONFIG))
    source = read_megatron(outer, base_model_name=str(base))
    assert source.info["layout_from"] == str(base / "config.json")
    got = _values(source)
    assert all(torch.equal(got[n], v) for n, v in sd.items())
    with pytest.raises(ConfigNotFoundError, match="only the padded vocabulary"):  # a base that gives nothing
        read_megatron(outer, base_model_name=str(tmp_path / "missing"))


def _word_tokenizer_save(folder) -> None:
    """A tokenizer of exactly VOCAB tokens (4 special), saved by transformers into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = specials + [f"w{i}" for i in range(VOCAB - len(specials))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)


def _tokenizer_len(folder) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(folder))


def test_a_nemo_model_yaml_without_vocab_size_takes_it_from_the_tokenizer(tmp_path):
    """NeMo's Llama presets leave vocab_size null: NeMo builds the embedding with len() of its tokenizer padded to
    make_vocab_size_divisible_by x TP rows (here 50 -> 64), and its HF exporter drops the padding. The tokenizer NeMo
    copied to context/ gives that size (the count agrees with transformers' len()), the padded count is checked
    against the embedding's rows, and no base model is needed."""
    outer, sd = _nemo_save(tmp_path, nemo_model_yaml(vocab_size=None))
    _word_tokenizer_save(outer / "context" / "nemo_tokenizer")
    assert _tokenizer_len(outer / "context" / "nemo_tokenizer") == VOCAB
    source = read_megatron(outer, base_model_name="")
    assert source.info["layout_from"] == "NeMo context/model.yaml and the size of context/nemo_tokenizer/tokenizer.json"
    assert source.config == WANT and source.info["vocab_size"] == VOCAB
    got = _values(source)
    assert all(torch.equal(got[n], v) for n, v in sd.items())


def _add_special_token(folder) -> None:
    """tokenizer_config.json names a special token tokenizer.json lacks (transformers adds it when loading)."""
    import json

    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = ["<new>"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert _tokenizer_len(folder) == VOCAB + 1  # what NeMo's AutoTokenizer would count: not tokenizer.json's


def _gap(folder) -> None:
    import json

    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"].append({**data["added_tokens"][0], "id": PADDED - 1, "content": "<gap>"})
    (folder / "tokenizer.json").write_text(json.dumps(data))


def _link_out(folder) -> None:
    outside = folder.parent.parent.parent / "outside.json"
    (folder / "tokenizer.json").rename(outside)
    (folder / "tokenizer.json").symlink_to(outside)


@pytest.mark.parametrize(("change", "yaml_changes", "why"), [
    (_add_special_token, {}, "would add <new>,"),
    (None, {"bos_token": "<begin>"}, "would add <begin>,"),  # NeMo's AutoTokenizer adds what model.yaml names
    (None, {"make_vocab_size_divisible_by": 128}, "pad to 128 rows"),
    (None, {"tensor_model_parallel_size": 8}, "tensor_model_parallel_size 8), not the embedding's 64"),
    (_gap, {}, "are not 0..50"),
    (lambda f: (f / "tokenizer.json").unlink(), {}, "has no tokenizer.json"),
    (_link_out, {}, "leads outside"),
    (None, {"_target_": "nemo.collections.common.tokenizers.SentencePieceTokenizer"}, "not NeMo's Hugging Face"),
])
def test_a_tokenizer_that_does_not_give_the_vocabulary_is_not_guessed_from(tmp_path, change, yaml_changes, why):
    """Whenever the count might not be NeMo's, the reader refuses (exit 8, naming why and --base-model-name)."""
    content = nemo_model_yaml(vocab_size=None)
    tokenizer_fields = {k: v for k, v in yaml_changes.items() if k in ("bos_token", "_target_")}
    content["tokenizer"].update(tokenizer_fields)
    content["config"].update({k: v for k, v in yaml_changes.items() if k not in tokenizer_fields})
    outer, _ = _nemo_save(tmp_path, content)
    _word_tokenizer_save(outer / "context" / "nemo_tokenizer")
    if change is not None:
        change(outer / "context" / "nemo_tokenizer")
    with pytest.raises(ConfigNotFoundError, match="only the padded vocabulary") as err:
        read_megatron(outer, base_model_name="")
    assert why in err.value.message and "--base-model-name" in err.value.hint, err.value.message


@pytest.mark.parametrize(("content", "match", "error"), [
    (nemo_model_yaml(vocab_size=None), "only the padded vocabulary", ConfigNotFoundError),
    ("config: !!python/object/apply:os.system ['touch pwned']\n", "not valid YAML", CorruptCheckpointError),
    ("model: {}\n", "no config: mapping", CorruptCheckpointError),
])
def test_a_nemo_model_yaml_that_cannot_give_the_layout_is_refused(tmp_path, monkeypatch, content, match, error):
    monkeypatch.chdir(tmp_path)
    outer, _ = _nemo_save(tmp_path, content)
    with pytest.raises(error, match=match):
        read_megatron(outer)
    assert not (tmp_path / "pwned").exists()


def test_the_tokenizer_folder_nemo_model_yaml_names_is_searched(tmp_path):
    """NeMo copies a local tokenizer folder to ``context/<its name>`` (``nemo_tokenizer`` only after its own HF
    import) and records that name in model.yaml: the real save of tests/corpus/nemo_check.py has ``hf_tokenizer``
    (convert then copies its tokenizer: checked there, on the real save)."""
    from vllm_consolidate.read.megatron import asset_dirs

    content = nemo_model_yaml()
    content["tokenizer"]["pretrained_model_name"] = "hf_tokenizer"
    outer, _ = _nemo_save(tmp_path, content)
    (outer / "context" / "hf_tokenizer").mkdir()
    assert asset_dirs(outer) == [outer / "context", outer / "context" / "hf_tokenizer"]
    (outer / "context" / "nemo_tokenizer").mkdir()  # both: each searched once
    assert asset_dirs(outer) == [outer / "context", outer / "context" / "nemo_tokenizer",
                                 outer / "context" / "hf_tokenizer"]


@pytest.mark.parametrize("name", ["../outside", "/abs/path", "..", "a/b", {"_target_": "DirOrStringArtifact"}])
def test_a_nemo_tokenizer_name_that_is_no_folder_of_context_is_ignored(tmp_path, name):
    """A Hub id is recorded as a mapping, and NeMo writes a single name: anything else names no copy of ours."""
    from vllm_consolidate.read.megatron import asset_dirs

    content = nemo_model_yaml()
    content["tokenizer"]["pretrained_model_name"] = name
    outer, _ = _nemo_save(tmp_path, content)
    (outer / "outside").mkdir()
    (outer / "context" / "a" / "b").mkdir(parents=True)
    assert asset_dirs(outer) == [outer / "context"]


def test_a_nemo_tokenizer_folder_linking_out_of_context_is_refused(tmp_path):
    from vllm_consolidate.errors import UnsafeInputError
    from vllm_consolidate.read.megatron import asset_dirs

    content = nemo_model_yaml()
    content["tokenizer"]["pretrained_model_name"] = "tok"
    outer, _ = _nemo_save(tmp_path, content)
    (tmp_path / "elsewhere").mkdir()
    (outer / "context" / "tok").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafeInputError, match="outside"):
        asset_dirs(outer)
