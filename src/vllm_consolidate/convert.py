"""Convert one checkpoint into an inference-ready Hugging Face folder.

The steps, in order: detect the input, read its metadata, find config and tokenizer, decide names
and dtypes, plan every output file, check disk space, stream the weights into a temporary sibling
folder, copy the assets, validate, and only then rename the folder into place. On any failure the
temporary folder is removed and ``--output`` is left as it was. An object-store output (``s3://…``) is
streamed into multipart uploads of its final keys instead, kept open (invisible) until the model is
validated and then completed, our marker last (:mod:`vllm_consolidate.write.remote`); no weight byte is
written to the local disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from vllm_consolidate.conversion import (  # the records and planning; re-exported (see __all__)
    DEFAULT_BASE_MODEL,
    DEFAULT_MAX_SHARD_SIZE,
    Conversion,
    ConvertOptions,
    ConvertResult,
    adapter_config_of,
    input_paths,
    marker_info,
    plan_conversion,
    summary_fields,
    unchanged_single,
    validate_output,
    write_files,
)
from vllm_consolidate.read.assets import asset_bytes
from vllm_consolidate.read.registry import is_single_file_model
from vllm_consolidate.storage import remote
from vllm_consolidate.storage.urls import ObjectURL, is_object_url
from vllm_consolidate.write import publish as pub
from vllm_consolidate.write import remote as rpub
from vllm_consolidate.write.cleanup import clean_stale


def convert(opts: ConvertOptions, *, progress: Callable[[int, int], None] | None = None,
            on_stage: Callable[[str], None] | None = None) -> ConvertResult:
    """Convert one checkpoint; see the module docstring for the steps.

    Args:
        opts: What to convert and how; ``input`` and ``output`` are required. An object-store ``input``
            is listed once into a mirror of stand-ins and its bytes read by ranged GETs; the summary,
            the marker and errors name its URLs.
        progress: Called as ``progress(bytes_done, bytes_total)`` while writing (from writer threads).
        on_stage: Called with a short description as each long step without a byte count starts
            (e.g. validation).

    Raises:
        ConsolidateError: Any problem with the input, the options, the disk or the result.
    """
    opts.require_paths()
    if not is_object_url(str(opts.input)):
        return _convert(opts, progress, on_stage)
    with remote.local_input(str(opts.input), dict(opts.storage_options)) as folder:
        local = replace(opts, input=folder, checkpoint_dir=_local_checkpoint_dir(opts, folder))
        result = _convert(local, progress, on_stage)
    result.detected = remote.public_value(result.detected)
    result.assets = remote.public_value(result.assets)
    result.warnings = [remote.public(w) for w in result.warnings]
    if result.status == "already_consolidated":  # nothing local to point at: the input itself is the model
        result.output = remote.public(str(result.output))
    return result


def _local_checkpoint_dir(opts: ConvertOptions, folder: Path) -> Path | None:
    """``--checkpoint-dir`` of an object-store input: its URL (or path relative to the input) in the mirror."""
    if opts.checkpoint_dir is None:
        return None
    mirror = remote.mirror_of(folder)
    return mirror.local(opts.checkpoint_dir) if mirror is not None else None


def _convert(opts: ConvertOptions, progress: Callable[[int, int], None] | None,
             on_stage: Callable[[str], None] | None) -> ConvertResult:
    started = time.monotonic()
    opts.require_paths()
    url = rpub.output_url(opts.output)
    if url is not None:
        return _convert_to_store(opts, url, started, progress, on_stage)
    output = Path(opts.output).absolute()
    pub.check_output_name(output)
    pub.check_output_path(output)
    # The full location check (with the detected weights folder) runs in plan_conversion; this one
    # comes first so that a --force over a parent of the input is refused for what it is.
    pub.check_output_location(output, input_paths(opts))
    pub.check_replaceable(output, opts.force)
    conv = plan_conversion(opts)
    plan, assets = conv.plan, conv.assets
    common = summary_fields(conv, opts)
    # A folder whose config.json needs architectures written is not "already consolidated": vLLM refuses it.
    if (is_single_file_model(conv.source) and not opts.force and not conv.architecture.changed
            and unchanged_single(conv.source, plan)):
        return ConvertResult(output=conv.detected.weights_dir, status="already_consolidated", files=[],
                             bytes_read=0, bytes_written=0, seconds=time.monotonic() - started, **common)

    # Never the input, even when it is named like one of our leftovers (a copy of a temporary folder).
    clean_stale(output, protect=input_paths(opts, conv.detected.weights_dir))
    parents = pub.CreatedParents(output)
    try:
        parents.make()
        pub.preflight_disk(output, plan.total_size + asset_bytes(assets))
        written, report = _write_and_publish(opts, conv, output, progress, on_stage)
    except OSError as exc:
        parents.remove()
        mapped = pub.os_error(exc, output)
        if mapped is None:
            raise
        raise mapped from exc
    except BaseException:
        parents.remove()
        raise
    return ConvertResult(
        output=output, status="converted", files=written,
        bytes_read=sum(t.spec.nbytes for t in plan.tensors if t.spec.segments),  # not --quantize's scales
        bytes_written=sum((output / f).stat().st_size for f in written),
        seconds=time.monotonic() - started, dropped=conv.dropped, renamed=dict(conv.source.renamed),
        validation=report.to_dict() if report is not None else None, **common,
    )


def _convert_to_store(opts: ConvertOptions, url: ObjectURL, started: float,
                      progress: Callable[[int, int], None] | None,
                      on_stage: Callable[[str], None] | None) -> ConvertResult:
    """:func:`convert` into an object store: the same checks, then stream into open uploads, validate, commit.

    No weight byte touches the local disk (but validation samples past ``streamed.MEMORY_BYTES``, in an unlinked
    file); on any failure (or Ctrl-C, SIGTERM) the open uploads are aborted and anything staged deleted (see
    :mod:`vllm_consolidate.write.remote`).
    """
    from vllm_consolidate.storage.staging import StagedOutput
    from vllm_consolidate.storage.staging import clean_stale as clean_stale_staging
    from vllm_consolidate.storage.store import open_store

    rpub.check_output_url(url, input_paths(opts))
    store = open_store(url, dict(opts.storage_options))
    rpub.check_replaceable(store, url, opts.force)
    conv = plan_conversion(opts)
    clean_stale_staging(store, url)  # what a killed run for this output left in its staging prefix
    common = summary_fields(conv, opts)
    adapter = adapter_config_of(conv) is not None
    scans: dict[str, Any] = {}
    with StagedOutput(store, url) as staged:
        if opts.validate and not adapter:
            staged.observe = lambda rel: _stream_scan(scans, rel)
        if opts.validate:
            staged.keep = lambda rel, size: validation_ranges(conv, rel)
        written = write_files(conv, staged, progress)
        nbytes = rpub.staged_sizes(staged, written)

        def validate() -> Any:
            return validate_staged(conv, staged, opts, url, on_stage, adapter, scans)

        report = rpub.commit(staged, marker_info(opts, conv, written), opts.force,
                             validate=validate if opts.validate else None)
    if report is not None:
        report.path = str(url)
        conv.warnings.extend(report.warning_messages())
    return ConvertResult(
        output=url, status="converted", files=written,  # type: ignore[arg-type]
        bytes_read=sum(t.spec.nbytes for t in conv.plan.tensors if t.spec.segments), bytes_written=nbytes,
        seconds=time.monotonic() - started, dropped=conv.dropped, renamed=dict(conv.source.renamed),
        validation=report.to_dict() if report is not None else None, **common,
    )


def _stream_scan(scans: dict[str, Any], rel: str) -> Callable[[bytes], None] | None:
    """The value scan fed with a staged safetensors file's bytes as they are uploaded (None for other files)."""
    from vllm_consolidate.validate.values import StreamScan

    if not rel.endswith(".safetensors"):
        return None
    scan = scans[rel] = StreamScan(rel)
    return scan.feed


def validation_ranges(conv: Conversion, rel: str) -> list[tuple[int, int]]:
    """The byte ranges of output file ``rel`` the validation reads: the safetensors header and the sampled
    elements of every tensor (:func:`~vllm_consolidate.validate.source.sample_ranges`), from the plan alone."""
    from vllm_consolidate.validate.source import sample_ranges
    from vllm_consolidate.write.safetensors import safetensors_header

    pfile = next((f for f in conv.plan.files if f.filename == rel), None)
    if pfile is None or conv.plan.format != "safetensors":
        return []
    start = len(safetensors_header(pfile))
    ranges = [(0, start)]
    for t in pfile.tensors:
        size = t.out_dtype.itemsize
        ranges.extend((start + t.offset + first * size, start + t.offset + (first + count) * size)
                      for first, count in sample_ranges(tuple(t.spec.shape)))
    return ranges


def validate_staged(conv: Conversion, staged: Any, opts: ConvertOptions, output: ObjectURL,
                    on_stage: Callable[[str], None] | None, adapter: bool, scans: dict[str, Any] | None = None) -> Any:
    """Validate an object-store output before its commit, from what the run holds (no download of the output).

    The open uploads cannot be read yet: their weight files are read from the ranges kept as they streamed
    (:mod:`vllm_consolidate.storage.streamed`, :func:`validation_ranges`); the small files from the bytes held
    for the commit (written into a private local folder for transformers, removed with it); a staged
    ``--pytorch-bin`` archive by ranged GET. ``scans``: the value scans of the weight files, made as they were
    uploaded (``_stream_scan``); when every one completed, the NaN/Inf scan reads nothing (else, e.g. ``.bin``
    shards, it reads them back).
    """
    from vllm_consolidate.storage.bytefile import RemoteObject
    from vllm_consolidate.storage.streamed import StreamedView
    from vllm_consolidate.validate.values import StreamScan

    done = bool(scans) and all(s.complete for s in scans.values())  # type: ignore[union-attr]
    values = StreamScan.check(list(scans.values())) if done else None  # type: ignore[union-attr]
    objects: dict[str, Any] = {rel: staged.kept[rel] for rel in staged.staged if rel in staged.kept}
    for rel in staged.staged:
        if rel not in objects and rel not in staged.held:
            objects[rel] = RemoteObject(staged.store, staged.url.key(rel), staged.staged[rel], None,
                                        str(staged.url.child(rel)))
    with StreamedView(output, staged.held, objects) as view:
        return validate_output(conv, view.path, str(output), on_stage, adapter, values)  # type: ignore[arg-type]


def _write_and_publish(opts: ConvertOptions, conv: Conversion, output: Path,
                       progress: Callable[[int, int], None] | None,
                       on_stage: Callable[[str], None] | None) -> tuple[list[str], Any]:
    """Stream the weights and assets into a locked temporary sibling, validate it, and rename it into place."""
    adapter = adapter_config_of(conv) is not None
    with pub.Staging(output) as staging:
        tmp = staging.path
        written = write_files(conv, tmp, progress)
        pub.write_marker(tmp, marker_info(opts, conv, written))
        report = validate_output(conv, tmp, output, on_stage, adapter) if opts.validate else None
        staging.publish(opts.force)
    if report is not None:
        report.path = output  # it ran on the temporary folder, now renamed
        conv.warnings.extend(report.warning_messages())
    return written, report


#: What callers import from here: the flow (:func:`convert`) and, for compatibility, the records and planning
#: that live in :mod:`vllm_consolidate.conversion`.
__all__ = ["DEFAULT_BASE_MODEL", "DEFAULT_MAX_SHARD_SIZE", "ConvertOptions", "ConvertResult", "convert",
           "plan_conversion", "validate_staged", "validation_ranges"]
