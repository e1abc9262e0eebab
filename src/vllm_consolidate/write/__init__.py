"""Plan -> files: stream every planned tensor into its place, then publish the folder atomically.

* :mod:`.safetensors`: the streaming writer (kernel byte copy, or chunked casts on two threads);
* :mod:`.bin`: ``--pytorch-bin`` output through torch's archive writer;
* :mod:`.publish`: the temporary sibling folder, the output-location rules, the rename into place;
* :mod:`.cleanup`: removing what killed conversions left, and only that;
* :mod:`.assets`: copying the config, generation config and tokenizer files found by ``read.assets``.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_consolidate.plan.shards import OutputPlan
from vllm_consolidate.write import bin as bin_writer
from vllm_consolidate.write import safetensors as safetensors_writer
from vllm_consolidate.write.safetensors import ProgressFn


def write_plan(plan: OutputPlan, folder: Path, progress: ProgressFn | None = None) -> list[Path]:
    """Write every file of ``plan`` into ``folder`` (and the index, if sharded).

    Args:
        plan: The output plan.
        folder: An existing, empty folder (the temporary sibling of the final output).
        progress: Called with the number of bytes just written, from worker threads.

    Returns:
        The files written.
    """
    written = []
    for pfile in plan.files:
        path = folder / pfile.filename
        if plan.format == "safetensors":
            safetensors_writer.write_safetensors_file(pfile, path, progress)
        else:
            bin_writer.write_bin_file(pfile, path, progress)
        written.append(path)
    index = plan.index()
    if index is not None:
        path = folder / plan.index_filename
        path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


__all__ = ["write_plan"]
