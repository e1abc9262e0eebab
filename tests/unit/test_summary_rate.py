"""The write rate in the convert summary and the batch progress lines: shown only when it means something."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_consolidate.batch.plan import Job
from vllm_consolidate.batch.run import BatchEvent
from vllm_consolidate.batch.states import EventKind
from vllm_consolidate.cli import batch as cli_batch
from vllm_consolidate.cli.common import rate
from vllm_consolidate.cli.convert import print_summary
from vllm_consolidate.convert import ConvertResult


@pytest.mark.parametrize(("nbytes", "seconds", "shown"), [
    (1_600_000, 3.2, None),  # a tiny model: mostly start-up and validation, not writing
    (0, 0.0, None),
    (2 * 10**9, 0.2, None),  # too quick to time
    (99 * 10**6, 10.0, None),
    (500 * 10**6, 2.0, "250 MB/s"),
    (6 * 10**9, 4.8, "1.25 GB/s"),
    (10**9, 1.0, "1.00 GB/s"),
])
def test_rate(nbytes, seconds, shown):
    assert rate(nbytes, seconds) == shown


def _result(nbytes: int, seconds: float) -> ConvertResult:
    return ConvertResult(output=Path("/out"), status="converted", detected={"type": "deepspeed"},
                         files=["model.safetensors"], tensors=2, parameters=10, bytes_read=nbytes,
                         bytes_written=nbytes, output_dtype="float32", seconds=seconds,
                         assets={"config": "/ckpt/config.json", "generation_config": None, "tokenizer": None})


def test_summary_of_a_small_output_has_no_rate(capsys):
    print_summary(_result(1_600_000, 3.2))
    out = capsys.readouterr().out
    assert "time:       3.2 s\n" in out and "/s" not in out
    assert "generation: none (transformers and vLLM defaults apply)" in out


def test_summary_of_a_large_output_has_one(capsys):
    print_summary(_result(6 * 10**9, 4.8))
    assert "time:       4.8 s (1.25 GB/s)\n" in capsys.readouterr().out


def test_batch_done_line(tmp_path):
    job = Job(id=1, input=tmp_path, checkpoint=tmp_path, checkpoint_name="checkpoint-2", step=2,
              output=tmp_path / "small", seconds=2.5, result={"bytes_written": 1_600_000})
    printer = cli_batch._Printer(total=1)
    line = printer._line(BatchEvent(EventKind.DONE, job))
    assert line.startswith("done     small in 2.5 s (") and line.endswith(")") and "/s" not in line
    job.result, job.seconds = {"bytes_written": 3 * 10**9}, 6.0
    assert printer._line(BatchEvent(EventKind.DONE, job)).endswith(", 500 MB/s)")


def test_summary_names_the_quantization_scheme_only_when_quantized(capsys):
    print_summary(_result(1_600_000, 3.2))
    assert "quantized:" not in capsys.readouterr().out
    result = _result(1_600_000, 3.2)
    result.quantize = "w8a8"
    print_summary(result)
    assert "quantized:  w8a8 (compressed-tensors" in capsys.readouterr().out
