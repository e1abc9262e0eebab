"""What writing a plan costs in memory, from its metadata alone (``inspect``'s estimate, ``batch``'s admission).

RAM = :data:`JOB_BASE_RSS` (interpreter, torch, metadata: measured peak RSS of one worker converting a tiny
model) + the writer's buffers (:func:`writer_buffers`: for safetensors, each of its ``WORKERS`` threads keeps every
buffer it used at its largest size: per kind, the largest a job of the plan asks for, as
``write.safetensors.job_buffers`` sizes them from the writer's chunk constants, plus a LoRA merge's cached tiles;
for ``.bin``, the largest tensor + ``CHUNK_BYTES``) + :data:`QUANTIZE_RSS` with ``--quantize``; for an object-store
input (``s3://``, ``gs://``, ``az://``) + the read-ahead's fetched blocks (:func:`read_ahead_buffers`), and for an
object-store output + the upload's buffers, the small files held for the commit and the validation's kept ranges
(:func:`upload_buffers`). Each term is derived from the constants of the module that holds the buffers.
"""

from __future__ import annotations

from typing import Any

from vllm_consolidate.units import KIB, MIB

#: RSS of a worker before the writer's buffers: Python, torch, transformers (for validation), metadata.
#: Calibrated with the peak RSS workers report (``resource.getrusage``; torch 2.13 CPU, transformers 5):
#: tiny HF Trainer ZeRO-2/3 checkpoints to fp32 with validation 360 MiB; a 74M-parameter ZeRO-2
#: checkpoint without validation 245 MiB (fp32, no cast) and 278 MiB (bf16, cast), with validation
#: 420 MiB (bf16; the estimate is 514 MiB). Rounded up for larger models' metadata.
JOB_BASE_RSS = 450 * MIB
#: What ``--quantize`` adds to a worker: the meta model validation builds to check the Linear modules (the planner
#: too with ``--quantize-ignore``: ``plan.quantize.linear_modules``) and the quantizing threads' row blocks
#: (``write.quantize.JOB_BYTES`` of float32 rows and their scaled and rounded copies). Measured (``getrusage`` of an
#: in-process convert, torch 2.13, transformers 5.25): torch + transformers import 228 MiB, then building
#: Qwen2-0.5B's meta model and listing its Linear modules +103 MiB (Qwen3-30B-A3B's after it +3 MiB); JOB_BASE_RSS
#: already holds the imports (validation loads them too), so this is the rest, rounded up. Without validation the
#: pass imports neither torch nor transformers and stays far below this.
QUANTIZE_RSS = 160 * MIB
#: Extra RSS per tensor of metadata (specs, segments, pickled headers), generous.
PER_TENSOR_RSS = 8 * KIB


def writer_buffers(tensors: list[Any]) -> int:
    """The bytes the safetensors writer's threads hold for ``tensors`` (planned, not ``--quantize`` weights, whose
    row blocks :data:`QUANTIZE_RSS` counts): ``WORKERS`` x the sum over buffer kinds of the largest size a job asks
    for (any thread may run any job), plus the tiles a LoRA merge caches."""
    # Late: the writer's module (and what it imports) is not loaded by commands that only estimate.
    from vllm_consolidate.plan.lora_rows import TILE_CACHE, row_length, tile_rows
    from vllm_consolidate.write.safetensors import WORKERS, job_buffers

    largest: dict[str, int] = {}
    for t in tensors:
        for kind, nbytes in job_buffers(t).items():
            largest[kind] = max(largest.get(kind, 0), nbytes)
    tile = max((tile_rows(t.spec) * row_length(t.spec) * 4 for t in tensors if t.spec.delta is not None), default=0)
    return WORKERS * sum(largest.values()) + TILE_CACHE * tile


def read_ahead_buffers() -> int:
    """The most an object-store input's read-ahead holds: ``bytefile.MAX_PREFETCH_BYTES``, its budget of fetched
    blocks not yet read whole (a hint past it is dropped, and its bytes are read when needed).

    Why the budget and not the writer's window (``READ_AHEAD_BYTES`` ahead of at most ``2 * WORKERS`` jobs in flight
    of up to ``CHUNK_BYTES`` each: 128 MiB): blocks are up to ``MAX_GET_BYTES`` and held until read whole, so they
    overhang the window. Measured (batch ``peak_rss_bytes``, the 74M-parameter ZeRO-2 case to a local fp32 folder,
    moto on loopback): 222 MiB from ``s3://`` against 58 MiB from the local files, obstore itself ~7 MiB.
    """
    from vllm_consolidate.storage.bytefile import MAX_PREFETCH_BYTES

    return MAX_PREFETCH_BYTES


def upload_buffers(plan: Any, held: int = 0, kept: int = 0) -> int:
    """The bytes writing ``plan`` into an object store holds (:mod:`vllm_consolidate.storage.upload`, ``.staging``).

    Files are uploaded one after the other: the chunks waiting ahead of a gap (``WINDOW_BYTES``), obstore's buffer of
    one part and ``MAX_CONCURRENCY`` parts in flight, plus as many of the previous file's last parts (its writer does
    not wait for them); the rest of each open upload until the commit (below ``MAX_PARTS`` bytes a file); the small
    files held for the commit (``held``: config, tokenizer; the index is within :data:`PER_TENSOR_RSS`); the ranges
    the validation keeps (``kept`` bytes: none without validation), in memory up to ``streamed.MEMORY_BYTES``.
    Measured (as :func:`read_ahead_buffers`, without validation): 221 MiB to ``s3://`` against 58 MiB to a local
    folder, i.e. +163 MiB; this counts 206 MiB (the window and nine 15.8 MiB parts).
    """
    from vllm_consolidate.storage.streamed import MEMORY_BYTES
    from vllm_consolidate.storage.upload import MAX_CONCURRENCY, MAX_PARTS, WINDOW_BYTES, exact_part_size, part_size

    sized = exact_part_size if plan.format == "safetensors" else part_size  # .bin: an upload of unknown size
    part = max((sized(f.data_size) for f in plan.files), default=0)
    uploading = WINDOW_BYTES + (2 * MAX_CONCURRENCY + 1) * part
    return uploading + MAX_PARTS * len(plan.files) + held + min(MEMORY_BYTES, kept)


def reads_object_store(tensors: list[Any]) -> bool:
    """Whether any tensor is read from an object store (an input mirrored by ``storage.remote``, open now)."""
    from vllm_consolidate.storage.remote import is_standin

    return any(is_standin(t.spec.segments[0].path) for t in tensors if t.spec.segments)


def estimate_peak_ram(plan: Any, *, object_output: bool = False, held: int = 0, kept: int = 0) -> int:
    """Peak RSS of one worker converting ``plan`` (an :class:`~vllm_consolidate.plan.shards.OutputPlan`).

    Args:
        plan: The output plan; its tensors name their source files, which tell an object-store input.
        object_output: The output is an object store (``--output s3://…``).
        held: With ``object_output``: the bytes of the small files (config, tokenizer) held until the commit.
        kept: With ``object_output``: the bytes of the output the validation keeps as it streams (its header and
            sampled rows: ``convert.validation_ranges``; 0 without validation).
    """
    from vllm_consolidate.write.safetensors import CHUNK_BYTES

    tensors = plan.tensors
    base = JOB_BASE_RSS + PER_TENSOR_RSS * len(tensors)
    base += read_ahead_buffers() if reads_object_store(tensors) else 0
    base += upload_buffers(plan, held, kept) if object_output else 0
    if plan.format == "bin":
        largest = max((t.nbytes for t in tensors), default=0)
        return base + largest + CHUNK_BYTES
    quantized = [t for t in tensors if t.quant is not None]
    scales = {id(t.scale) for t in quantized if t.scale is not None}  # written by their weight's jobs
    plain = [t for t in tensors if t.quant is None and id(t) not in scales]
    return base + writer_buffers(plain) + (QUANTIZE_RSS if quantized else 0)


__all__ = ["JOB_BASE_RSS", "PER_TENSOR_RSS", "QUANTIZE_RSS", "estimate_peak_ram", "read_ahead_buffers",
           "reads_object_store", "upload_buffers", "writer_buffers"]
