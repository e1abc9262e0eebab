"""The options record shared by convert and batch: frozen, picklable, normalised, and how a job's copy is made."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from pathlib import Path

import pytest

from vllm_consolidate import dtypes
from vllm_consolidate.batch.manifest import NON_OUTPUT_OPTIONS, OUTPUT_OPTIONS, content_options, manifest_base
from vllm_consolidate.batch.plan import BatchOptions, Job
from vllm_consolidate.batch.run import job_spec
from vllm_consolidate.convert import DEFAULT_BASE_MODEL, ConvertOptions, convert, plan_conversion
from vllm_consolidate.errors import UsageError


def _full() -> ConvertOptions:
    return ConvertOptions(input="runs/exp1", output="models/exp1", input_type="deepspeed",
                          checkpoint_dir="runs/exp1/checkpoint-6", base_model_name="org/model", dtype="bf16",
                          keep_original_precision=False, fmt="bin", max_shard_size=5 * 10**9, force=True,
                          validate=False)


def test_pickles_and_round_trips():
    opts = _full()
    back = pickle.loads(pickle.dumps(opts))
    assert back == opts and back is not opts
    assert back.dtype is dtypes.bfloat16  # the singleton, not a copy
    assert isinstance(back.input, Path) and back.checkpoint_dir == Path("runs/exp1/checkpoint-6")


def test_frozen_and_without_callbacks():
    opts = _full()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.force = False  # type: ignore[misc]
    assert not any(callable(getattr(opts, f.name)) for f in dataclasses.fields(opts))
    params = inspect.signature(convert).parameters
    assert params["progress"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["on_stage"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("given, expected", [
    ("float32", dtypes.float32), ("bfloat16", dtypes.bfloat16), ("bf16", dtypes.bfloat16), ("fp16", dtypes.float16),
    ("half", dtypes.float16), (dtypes.float16, dtypes.float16),
])
def test_dtype_by_name_or_dtype(given, expected):
    assert ConvertOptions(dtype=given).dtype is expected


def test_unknown_dtype_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown dtype 'float99'"):
        ConvertOptions(dtype="float99")


def test_defaults():
    opts = ConvertOptions()
    assert (opts.input, opts.output, opts.dtype, opts.base_model_name) == (None, None, dtypes.float32,
                                                                          DEFAULT_BASE_MODEL)


def test_paths_are_required_to_convert_or_plan():
    for call in (convert, plan_conversion):
        with pytest.raises(UsageError, match="needs input and output"):
            call(ConvertOptions())
    with pytest.raises(UsageError, match="needs output"):
        convert(ConvertOptions(input="x"))


def test_batch_holds_one_record_and_jobs_get_copies():
    model = ConvertOptions(dtype="bfloat16", base_model_name=None, validate=False, force=True)
    opts = BatchOptions(output_dir=Path("/out"), input_dir=Path("/runs"), checkpoint_filter=["checkpoint-{2,4}"],
                        model=model)
    assert opts.checkpoint_filter == ("checkpoint-{2,4}",)
    job = opts.job_options(input=Path("/runs/a"), output=Path("/out/a"), checkpoint_dir=Path("/runs/a/checkpoint-4"))
    assert (job.input, job.output, job.checkpoint_dir) == (Path("/runs/a"), Path("/out/a"),
                                                          Path("/runs/a/checkpoint-4"))
    assert dataclasses.replace(job, input=None, output=None, checkpoint_dir=None) == model
    assert pickle.loads(pickle.dumps(opts)) == opts


def test_library_batch_defaults_look_in_the_checkpoint_only():
    assert BatchOptions(output_dir=Path("/out")).model == ConvertOptions(base_model_name=None)


def test_content_options_record_canonical_dtype_names():
    assert content_options(ConvertOptions(dtype="bf16")) == {
        "input_type": "auto", "base_model_name": DEFAULT_BASE_MODEL, "dtype": "bfloat16",
        "keep_original_precision": False, "format": "safetensors", "max_shard_size": 40 * 10**9}
    assert content_options(ConvertOptions(dtype="bf16")) == content_options(ConvertOptions(dtype="bfloat16"))
    assert content_options(ConvertOptions(keep_original_precision=True))["dtype"] is None


def test_a_job_spec_pickles_and_writes_into_a_fresh_staging_folder():
    opts = BatchOptions(output_dir=Path("/out"), model=ConvertOptions(base_model_name=None, dtype="float16"))
    job = Job(3, Path("/runs/a"), Path("/runs/a/checkpoint-6"), "checkpoint-6", 6, Path("/out/a_6"),
              detected={"type": "deepspeed"}, sources={"/runs/a/checkpoint-6/x.pt": [1, 2]})
    spec = pickle.loads(pickle.dumps(job_spec(job, opts)))
    assert spec.options.output.parent == Path("/out") and spec.options.output.name.startswith(".a_6.batch-")
    assert spec.staging == spec.options.output and spec.output == Path("/out/a_6")
    assert spec.options.force is True and opts.model.force is False  # the staging folder is the job's own
    assert spec.options.dtype is dtypes.float16 and spec.options.checkpoint_dir == job.checkpoint
    assert spec.manifest == manifest_base(input=job.input, checkpoint=job.checkpoint, checkpoint_name="checkpoint-6",
                                          step=6, detected=job.detected, sources=job.sources,
                                          options=content_options(opts.model))
    assert spec.manifest["source"]["type"] == "deepspeed"


def test_content_options_record_an_architecture_override():
    assert content_options(ConvertOptions(architecture="Qwen2ForCausalLM"))["architecture"] == "Qwen2ForCausalLM"
    assert content_options(ConvertOptions(architecture="Qwen2ForCausalLM")) != content_options(ConvertOptions())


def test_every_convert_option_is_classified_once():
    """A new ConvertOptions field must say whether it changes the output, or a rerun would skip outputs made
    with another value as "up to date" (``lora`` and ``model_key`` once did)."""
    fields = {f.name for f in dataclasses.fields(ConvertOptions)}
    assert set(OUTPUT_OPTIONS) | set(NON_OUTPUT_OPTIONS) == fields
    assert not set(OUTPUT_OPTIONS) & set(NON_OUTPUT_OPTIONS)
    assert len(set(OUTPUT_OPTIONS.values())) == len(OUTPUT_OPTIONS)  # one manifest key per field


def test_an_unclassified_field_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Grown(ConvertOptions):
        rope_scaling: float = 1.0

    with pytest.raises(TypeError, match="rope_scaling is not classified"):
        content_options(Grown())


@pytest.mark.parametrize("changed", [{"lora": "adapter"}, {"model_key": "ema"}, {"model_key": ""},
                                     {"architecture": "Qwen2ForCausalLM"}, {"input_type": "deepspeed"},
                                     {"max_shard_size": 10**9}, {"fmt": "bin"}, {"base_model_name": "org/other"},
                                     {"quantize": "w8a8"}, {"quantize": "fp8_block"}])
def test_each_output_option_changes_the_record(changed):
    assert content_options(ConvertOptions(**changed)) != content_options(ConvertOptions())


def test_options_that_do_not_change_the_output_are_not_recorded():
    assert content_options(ConvertOptions(force=True, validate=False, input="a", output="b", checkpoint_dir="a/c")) \
        == content_options(ConvertOptions())


def test_new_options_at_their_defaults_keep_older_manifests_current():
    """Manifests written before --lora/--model-key/--architecture existed hold none of them."""
    assert not {"lora", "model_key", "architecture"} & set(content_options(ConvertOptions()))
    assert content_options(ConvertOptions(lora="adapter", model_key="ema"))["lora"] == "adapter"


def test_quantize_ignore_changes_the_record_and_compares_as_json():
    """``--quantize-ignore`` is recorded as the list a manifest holds, so a rerun with the same patterns is current."""
    import json

    plain = content_options(ConvertOptions(quantize="w8a8"))
    ignoring = content_options(ConvertOptions(quantize="w8a8", quantize_ignore=("re:.*gate$",)))
    assert plain != ignoring and json.loads(json.dumps(ignoring)) == ignoring
    assert "quantize" not in content_options(ConvertOptions())  # older manifests stay current
