"""Tokenizer check decisions (pure logic, fake tokenizers): round-trip tolerance and missing libraries."""

from __future__ import annotations

from vllm_consolidate.validate.report import FAIL, PASS, WARN
from vllm_consolidate.validate.tokenizer import ROUNDTRIP_SAMPLE, _missing_library, _roundtrip


class _Fake:
    def __init__(self, decoded: str):
        self.decoded = decoded

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [1, 2, 3]

    def decode(self, ids: list[int], **kwargs: object) -> str:
        return self.decoded


def test_roundtrip_statuses():
    assert _roundtrip(_Fake(" " + ROUNDTRIP_SAMPLE)).status == PASS
    assert _roundtrip(_Fake(ROUNDTRIP_SAMPLE.lower())).status == WARN
    wordpiece = "hello world! the quick brown fox jumps over the lazy dog : 12345, 67. 8 and more."
    assert _roundtrip(_Fake(wordpiece)).status == WARN
    assert _roundtrip(_Fake(ROUNDTRIP_SAMPLE.replace("fox", "cat"))).status == FAIL


def test_missing_library_is_recognised_only_as_such():
    assert _missing_library(ImportError("requires the protobuf library but it was not found")) == "protobuf"
    assert _missing_library(ModuleNotFoundError("No module named 'tiktoken'")) == "tiktoken"
    assert _missing_library(ValueError("Unable to parse tokenizer.json: expected value at line 1")) is None
    assert _missing_library(OSError("sentencepiece model file is corrupt")) is None
