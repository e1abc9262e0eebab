"""``vllm-consolidate inspect PATH``: parse, call :func:`vllm_consolidate.inspection.inspect_path`, print.

The report goes to stdout (``--json``: one JSON document, schema in the README's "Inspect" section).
The exit code is 0 when no problem was found, else the code of the first problem, from the same
table (``cli.common.EXIT_CODES``) that ``convert`` would exit with.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from vllm_consolidate.cli.common import exit_code

_W = 15  # label column width: "architectures: " is the longest label
_PRECISION_FROM = {"deepspeed_config": "DeepSpeed config", "config_torch_dtype": "config.json torch_dtype",
                   "stored_dtype": "the stored dtype of most weight bytes",
                   "default": "nothing recorded; convert's default"}
_LATEST_LABEL = "'latest' file"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``inspect`` on the CLI's subparsers.

    Args:
        sub: The object returned by ``ArgumentParser.add_subparsers``.

    Returns:
        The new subparser.
    """
    from vllm_consolidate.cli.common import add_storage_options, path_or_url
    from vllm_consolidate.read.assets import DEFAULT_BASE_MODEL  # not from convert: --help plans nothing
    from vllm_consolidate.read.detect import INPUT_TYPES

    p = sub.add_parser(
        "inspect", help="show what a checkpoint holds and what convert would do, from metadata only",
        description="Read a checkpoint's metadata (never its tensor data) and show its format, checkpoints, "
                    "tensors, output sizes, estimated peak RAM, where config and tokenizer would come from, and "
                    "the problems a conversion would meet. Exits with the code convert would exit with.")
    p.add_argument("path", type=path_or_url,
                   help="anything convert --input or batch --input-dir accepts (local, or s3://bucket/prefix, gs://…)")
    p.add_argument("--type", dest="input_type", choices=INPUT_TYPES, default="auto", help="input type (default: auto)")
    p.add_argument("--checkpoint-dir", type=path_or_url, default=None,
                   help="a specific checkpoint-N or global_stepN folder (overrides detection), as for convert")
    p.add_argument("--base-model-name", default=DEFAULT_BASE_MODEL,
                   help=f"where config/tokenizer the checkpoint lacks would come from (default: {DEFAULT_BASE_MODEL})")
    p.add_argument("--architecture", metavar="NAME", default=None,
                   help="as for convert: the model class the output's config.json would get")
    p.add_argument("--model-key", default=None, metavar="NAME",
                   help="as for convert: the DCP state-dict entry holding the model, when there is more than one")
    p.add_argument("--json", action="store_true", help="print the report as one JSON document on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    add_storage_options(p)
    p.set_defaults(func=cmd_inspect)
    return p


def cmd_inspect(args: argparse.Namespace) -> int:
    from vllm_consolidate.cli.common import storage_options
    from vllm_consolidate.inspection import inspect_path
    from vllm_consolidate.storage import remote

    # An object-store prefix is listed once into stand-ins (sizes from the listing); only metadata ranges
    # (pickles, headers, zip directories) are fetched, and the report names URLs.
    with remote.local_input(args.path, storage_options(args)) as folder:
        mirror = remote.mirror_of(folder)
        checkpoint_dir = mirror.local(args.checkpoint_dir) if mirror is not None else args.checkpoint_dir
        report = inspect_path(folder, args.input_type, checkpoint_dir, args.base_model_name, args.architecture,
                              model_key=args.model_key)
    problems = report.problems
    code = exit_code(problems[0].error) if problems else 0
    if args.json:
        print(json.dumps(remote.public_value(report_json(report, code)), indent=2))
    else:
        print("\n".join(remote.public(line) for line in report_lines(report)))
    return code


def report_json(report: Any, code: int) -> dict[str, Any]:
    """The ``--json`` document: the library's ``to_dict()`` plus the exit codes, which only the CLI knows."""
    data = report.to_dict()
    data["exit_code"] = code
    for inp, inp_data in zip(report.inputs, data["inputs"]):
        for problem, record in zip(inp.problems, inp_data["problems"]):
            record["exit_code"] = exit_code(problem.error)
    return data


def size(n: int) -> str:
    """Bytes in the decimal unit that fits (batch and convert print decimal units too)."""
    for unit, scale, digits in (("GB", 10**9, 2), ("MB", 10**6, 1), ("kB", 10**3, 1)):
        if n >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{n} B"


def _line(label: str, value: str) -> str:
    return f"{label + ':':<{_W}}{value}" if label else " " * _W + value


def report_lines(report: Any) -> list[str]:
    """The human report: one block per input (a folder of inputs gets a header line)."""
    lines: list[str] = []
    if report.kind == "folder":
        lines.append(_line("folder", f"{report.path}: {len(report.inputs)} inputs, as batch --input-dir finds them"))
    for inp in report.inputs:
        if lines:
            lines.append("")
        lines += input_lines(inp)
    return lines


def input_lines(inp: Any) -> list[str]:
    """The human report of one :class:`~vllm_consolidate.inspection.InputReport`."""
    lines = [_line("input", inp.path)]
    if inp.format is not None:
        lines.append(_line("format", _format(inp)))
    if inp.training_precision is not None:
        lines.append(_line("precision", f"{inp.training_precision} ({_PRECISION_FROM[inp.precision_from]})"))
    if inp.rank_files is not None:
        lines.append(_line("rank files", f"optimizer: {_ranks(inp.rank_files['optimizer'])}; "
                                         f"model states: {_ranks(inp.rank_files['model_states'])}"))
    lines += _checkpoint_lines(inp.checkpoints)
    if inp.chosen is not None:
        lines.append(_line("chosen", f"{inp.chosen} ({inp.how})"))
    if inp.tensors is not None:
        lines += _tensor_lines(inp)
    if inp.assets:
        lines += _asset_lines(inp)
    lines += [f"warning: {w}" for w in inp.warnings]
    lines += _problem_lines(inp.problems)
    return lines


def _format(inp: Any) -> str:
    parts = [inp.format]
    if inp.zero_stage is not None:
        parts += [f"ZeRO-{inp.zero_stage}", f"world size {inp.world_size}", f"tag {inp.tag}",
                  f"DeepSpeed {inp.deepspeed_version}"]
    if inp.weight_files is not None:
        parts.append(f"{inp.weight_files} {inp.weight_format} file{'s' if inp.weight_files != 1 else ''}")
    return ", ".join(parts)


def _ranks(ranks: list[int]) -> str:
    if not ranks:
        return "none"
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _checkpoint_lines(entries: list[Any]) -> list[str]:
    if not entries:
        return [_line("checkpoints", "none (no checkpoint-N or global_stepN folder in or below the input)")]
    from vllm_consolidate.read.registry import HOLDS  # loaded with the report (inspection imports it)

    labels = {**{h.word: h.label for h in HOLDS}, "latest": _LATEST_LABEL}
    width = max(len(e.name) for e in entries)
    chosen = " (* = the one convert reads)" if any(e.chosen for e in entries) else ""
    lines = [_line("checkpoints", f"{len(entries)} found{chosen}")]
    for e in entries:
        holds = " + ".join(labels[h] for h in e.holds) or "no weights"
        lines.append(_line("", f"{'*' if e.chosen else ' '} {e.name:<{width}}  {holds}"))
    return lines


def _tensor_lines(inp: Any) -> list[str]:
    text = f"{inp.tensors} tensors, {inp.parameters:,} parameters"
    if inp.dropped:
        text += f"; dropped tied {', '.join(inp.dropped)}"
    if inp.renamed:
        text += f"; {inp.renamed} names lose a wrapper prefix"
    lines = [_line("tensors", text)]
    if inp.moe:
        m = inp.moe
        lines.append(_line("experts", f"{m['experts']} experts x {m['moe_layers']} MoE layers ({m['family']}), stored "
                                      f"{m['source_layout']}, written {m['layout']} (--moe-layout)"))
    if inp.vlm:
        parts = inp.vlm["parts"]
        lines.append(_line("modality", ", ".join(f"{part} {p['parameters']:,} parameters ({p['tensors']} tensors)"
                                                 for part, p in parts.items()) + f" ({inp.vlm['family']})"
                                       + (f"; {inp.vlm['renamed']} names move to save_pretrained's prefixes"
                                          if inp.vlm.get("renamed") else "")))
    big = inp.largest_tensor
    if big is not None:
        lines.append(_line("largest", f"{big.name} {list(big.shape)} {big.dtype}, {size(big.bytes)}"))
    width = max(len(d) for d in inp.output)
    for i, (dtype, est) in enumerate(inp.output.items()):
        files = f"{est.files} file{'s' if est.files != 1 else ''}"
        lines.append(_line("output" if i == 0 else "",
                           f"{dtype:<{width}}  {size(est.bytes)} in {files}, peak RAM ~{size(est.peak_ram_bytes)}"))
    if inp.quantized:
        lines.append(_line("quantized", ", ".join(f"{k} {size(v)}" for k, v in inp.quantized.items())
                           + " (--quantize, from names and shapes)"))
    return lines


def _asset_lines(inp: Any) -> list[str]:
    a = inp.assets

    origin = " (from the adapter's base model)" if inp.format == "lora_merge" else " (from --base-model-name)"

    def where(key: str, path: str | None, extra: str = "") -> str:
        if a["from"][key] == "built":  # the reader builds it from the checkpoint's own record of its model
            return f"built from {a['config_built_from']}" + (f" ({path})" if path else "")
        if path is None:
            return "none"
        return path + (origin if a["from"][key] == "base_model" else "") + extra

    tok_files = f": {', '.join(a['tokenizer_files'])}" if a["tokenizer_files"] else ""
    lines = [_line("config", where("config", a["config"])),
             _line("generation", where("generation_config", a["generation_config"])),
             _line("tokenizer", where("tokenizer", a["tokenizer"], tok_files))]
    # The base model is consulted only for what the checkpoint lacks; say what it gave, or why nothing.
    if a["base_model"] or a["base_model_error"]:
        lines.append(_line("base model", a["base_model"] or f"not found: {a['base_model_error']}"))
    if inp.architectures:
        lines.append(_line("architectures", _architectures(inp.architectures)))
    return lines


def _architectures(arch: dict[str, Any]) -> str:
    text = "config has architectures: " + (f"yes ({', '.join(map(str, arch['in_config']))})" if arch["present"]
                                          else f"no (model_type {arch['model_type']})")
    if arch["source"] == "inferred":
        text += f"; convert would infer {', '.join(arch['output'])}"
    elif arch["source"] == "option":
        text += f"; --architecture gives {', '.join(arch['output'])}"
    elif arch["source"] is None and not arch["present"]:
        text += "; cannot be inferred (see problems)"
    return text


def _problem_lines(problems: list[Any]) -> list[str]:
    if not problems:
        return [_line("problems", "none")]
    code = exit_code(problems[0].error)
    lines = [_line("problems", f"{len(problems)} (convert would stop at the first: exit {code})")]
    for p in problems:
        lines.append(f"  error: {p.message}" + (f" [{p.path}]" if p.path else ""))
        if p.hint:
            lines.append(f"  hint: {p.hint}")
    return lines
