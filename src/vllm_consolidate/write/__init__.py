"""Plan -> files: stream every planned tensor into its place, then publish the folder atomically.

* :mod:`.safetensors`: the streaming writer (kernel byte copy, or chunked casts on two threads);
* :mod:`.bin`: ``--pytorch-bin`` output through torch's archive writer;
* :mod:`.publish`: the temporary sibling folder, the output-location rules, the rename into place;
* :mod:`.remote`: the same rules for an object-store output (uploads left open until validated, then completed);
* :mod:`.cleanup`: removing what killed conversions left, and only that;
* :mod:`.assets`: copying the config, generation config and tokenizer files found by ``read.assets``.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from vllm_consolidate.plan.shards import OutputPlan, PlannedFile
from vllm_consolidate.storage.staging import StagedOutput
from vllm_consolidate.write import bin as bin_writer
from vllm_consolidate.write import safetensors as safetensors_writer
from vllm_consolidate.write.safetensors import ProgressFn


def write_plan(plan: OutputPlan, folder: Path | StagedOutput,
               progress: ProgressFn | None = None) -> list[PurePosixPath]:
    """Write every file of ``plan`` into ``folder`` (and the index, if sharded).

    Args:
        plan: The output plan.
        folder: An existing, empty folder (the temporary sibling of the final output), or the staging
            prefix of an object-store output (each file streamed as one upload, nothing on local disk).
        progress: Called with the number of bytes just written, from worker threads.

    Returns:
        The files written (paths in ``folder``; relative keys for an object store).
    """
    written: list[PurePosixPath] = []
    for pfile in plan.files:
        if isinstance(folder, StagedOutput):
            _upload_file(plan, pfile, folder, progress)
            written.append(PurePosixPath(pfile.filename))
            continue
        path = folder / pfile.filename
        if plan.format == "safetensors":
            safetensors_writer.write_safetensors_file(pfile, path, progress)
        else:
            bin_writer.write_bin_file(pfile, path, progress)
        written.append(path)
    index = plan.index()
    if index is not None:
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        if isinstance(folder, StagedOutput):
            folder.put(plan.index_filename, text.encode())
            written.append(PurePosixPath(plan.index_filename))
        else:
            path = folder / plan.index_filename
            path.write_text(text)
            written.append(path)
    return written


def _upload_file(plan: OutputPlan, pfile: PlannedFile, staged: StagedOutput, progress: ProgressFn | None) -> None:
    """Stream one planned file into its own upload under the staging prefix."""
    if plan.format == "safetensors":
        header = safetensors_writer.safetensors_header(pfile)
        with staged.sink(pfile.filename, len(header) + pfile.data_size) as sink:
            safetensors_writer.stream_safetensors_file(pfile, header, sink, progress)
    else:  # torch's archive writer appends; the size is about the data plus the zip's records
        with staged.sink(pfile.filename, None, size_hint=pfile.data_size + 2**20) as sink:
            bin_writer.write_bin_file(pfile, sink, progress)


__all__ = ["write_plan"]
