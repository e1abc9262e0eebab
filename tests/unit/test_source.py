"""Byte-range arithmetic (pure logic): ``sub_segments`` and ``TensorSpec.slice``."""

from __future__ import annotations

from vllm_consolidate import dtypes
from vllm_consolidate.source import Segment, TensorSpec, sub_segments

SEGS = [Segment("a", 100, 10), Segment("b", 0, 5), Segment("a", 500, 20)]


def test_sub_segments_inside_one_range():
    assert list(sub_segments(SEGS, 2, 5)) == [Segment("a", 102, 5)]


def test_sub_segments_across_ranges():
    assert list(sub_segments(SEGS, 8, 10)) == [Segment("a", 108, 2), Segment("b", 0, 5), Segment("a", 500, 3)]


def test_sub_segments_whole_and_empty_and_end():
    assert list(sub_segments(SEGS, 0, 35)) == SEGS
    assert list(sub_segments(SEGS, 3, 0)) == []
    assert list(sub_segments(SEGS, 34, 1)) == [Segment("a", 519, 1)]
    assert list(sub_segments(SEGS, 35, 4)) == []


def test_slice_is_a_contiguous_run_of_elements():
    spec = TensorSpec("t", dtypes.float16, (3, 6), [Segment("f", 0, 12), Segment("g", 40, 24)])
    part = spec.slice(4, (2, 2), "p")  # elements 4..7 = bytes 8..16
    assert part.shape == (2, 2) and part.segments == [Segment("f", 8, 4), Segment("g", 40, 4)]
