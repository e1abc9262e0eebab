"""Which ``architectures`` the output's config.json gets (plan/architecture.py): pure logic, synthetic specs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vllm_consolidate import dtypes
from vllm_consolidate.errors import ConfigInvalidError, UsageError
from vllm_consolidate.plan import architecture as arch
from vllm_consolidate.plan.architecture import decide_architectures
from vllm_consolidate.source import Segment, SourceModel, TensorSpec

MAPPING = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}


@pytest.fixture(autouse=True)
def _mapping(monkeypatch):
    monkeypatch.setattr(arch, "causal_lm_classes", lambda: MAPPING)


def _source(*names: str, aliases: dict[str, str] | None = None) -> SourceModel:
    specs = [TensorSpec(n, dtypes.float32, (4, 4), [Segment("/src", 0, 64)]) for n in names]
    return SourceModel("deepspeed", None, specs, aliases=aliases or {})


BODY = ("model.embed_tokens.weight", "model.norm.weight")


def test_config_architectures_are_kept():
    d = decide_architectures({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, _source(*BODY))
    assert (d.architectures, d.source, d.changed, d.describe()) == (("Qwen2ForCausalLM",), "config", False, None)


@pytest.mark.parametrize(("config", "source"), [
    ({"model_type": "qwen2"}, _source(*BODY, "lm_head.weight")),  # its own output embedding
    ({"model_type": "qwen2", "tie_word_embeddings": True}, _source(*BODY)),  # tied by config
    ({"model_type": "qwen2"}, _source(*BODY, aliases={"lm_head.weight": "model.embed_tokens.weight"})),  # shared
    ({"model_type": "qwen2", "architectures": []}, _source(*BODY, "lm_head.weight")),  # empty counts as missing
    ({"model_type": "gpt_neox"}, _source("gpt_neox.embed_in.weight", "embed_out.weight")),
])
def test_inferred_when_the_weights_have_an_output_head_or_are_tied(config, source):
    d = decide_architectures(config, source)
    expected = MAPPING[config["model_type"]]
    assert (d.architectures, d.source, d.changed) == ((expected,), "inferred", True)
    assert d.describe() == f"inferred {expected} from model_type {config['model_type']}"
    assert d.to_dict()["message"] == d.describe()


def test_the_config_is_not_modified():
    config = {"model_type": "qwen2"}
    decide_architectures(config, _source(*BODY, "lm_head.weight"))
    assert config == {"model_type": "qwen2"}


@pytest.mark.parametrize(("config", "words"), [
    ({"model_type": "acme_lm"}, ["'acme_lm'", "no causal-LM class"]),
    ({"vocab_size": 10}, ["neither architectures nor model_type"]),
    ({"model_type": "qwen2", "tie_word_embeddings": False}, ["contradict Qwen2ForCausalLM", "not tied"]),
    ({"model_type": "qwen2"}, ["no lm_head.weight or embed_out.weight"]),  # silent config, no alias: untied
])
def test_what_cannot_be_inferred_is_an_error_naming_the_flag(config, words):
    with pytest.raises(ConfigInvalidError) as info:
        decide_architectures(config, _source(*BODY))
    message = str(info.value)
    assert all(w in message for w in words) and message.endswith("pass --architecture NAME")
    assert "--architecture" in info.value.hint


def test_without_transformers_the_error_says_so(monkeypatch):
    def missing():
        raise ModuleNotFoundError("transformers is not installed")

    monkeypatch.setattr(arch, "causal_lm_classes", missing)
    with pytest.raises(ConfigInvalidError, match="needs transformers, which is not installed"):
        decide_architectures({"model_type": "qwen2"}, _source(*BODY, "lm_head.weight"))


def test_option_is_used_as_given():
    d = decide_architectures({"model_type": "acme_lm"}, _source(*BODY), "AcmeForCausalLM")
    assert (d.architectures, d.source, d.changed) == (("AcmeForCausalLM",), "option", True)
    assert d.describe() == "AcmeForCausalLM from --architecture"
    d = decide_architectures({"model_type": "qwen2", "architectures": ["Old"]}, _source(*BODY), "New")
    assert d.describe() == "New from --architecture (config.json had Old)" and d.replaced == ("Old",)
    same = decide_architectures({"architectures": ["Qwen2ForCausalLM"]}, _source(), "Qwen2ForCausalLM")
    assert not same.changed and same.describe() == "Qwen2ForCausalLM from --architecture"


@pytest.mark.parametrize("name", ["", "Qwen2 ForCausalLM", "../x", "1Model"])
def test_option_must_be_a_class_name(name):
    with pytest.raises(UsageError):
        decide_architectures({"model_type": "qwen2"}, _source(), name)


def test_literal_mapping_is_read_from_source_text():
    text = ('from collections import OrderedDict\nX = 1\nMODEL_FOR_CAUSAL_LM_MAPPING_NAMES = OrderedDict(\n'
            '    [\n        # comment\n        ("qwen2", "Qwen2ForCausalLM"),\n        ("x", ("XForCausalLM", "Y")),\n'
            '    ]\n)\n')
    assert arch._literal_mapping(text) == {"qwen2": "Qwen2ForCausalLM", "x": "XForCausalLM"}
    assert arch._literal_mapping("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES = build()\n") is None
    assert arch._literal_mapping("OTHER = 1\n") is None
    # Cut where the statement is not closed by a bare ")" line: the whole text is parsed instead.
    assert arch._literal_mapping(text.replace("\n)\n", ")\nZ = (\n1)\n")) == {"qwen2": "Qwen2ForCausalLM",
                                                                           "x": "XForCausalLM"}


def test_literal_mapping_is_transformers_own():
    """The statement cut out of the installed modeling_auto gives exactly the mapping transformers builds."""
    from transformers.models.auto import modeling_auto

    want = {k: v[0] if isinstance(v, tuple) else v for k, v in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}
    source = Path(modeling_auto.__file__).read_text(encoding="utf-8")
    assert arch._statement(source) != source  # the cut was made
    assert arch._literal_mapping(source) == want and len(want) > 100


def test_reading_transformers_mapping_imports_neither_transformers_nor_torch():
    code = ("import sys\nfrom vllm_consolidate.plan.architecture import causal_lm_classes\n"
            "m = causal_lm_classes()\n"
            "print(m['qwen2'], m['llama'], 'torch' in sys.modules, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["Qwen2ForCausalLM", "LlamaForCausalLM", "False", "False"], proc.stderr
