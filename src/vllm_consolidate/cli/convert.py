"""``vllm-consolidate convert`` and ``consolidate-for-vllm``: parse, call ``convert.convert``, print."""

from __future__ import annotations

import argparse
import json
import sys

from vllm_consolidate.cli.common import Progress, add_model_options, model_options, path_or_url, rate


def convert_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--input", required=True, type=path_or_url,
                   help="checkpoint, training run or HF model folder, local or s3://bucket/prefix (gs://, az://)")
    p.add_argument("--output", required=True, type=path_or_url,
                   help="output folder, or an object-store prefix (s3://bucket/prefix, gs://..., az://...)")
    p.add_argument("--checkpoint-dir", type=path_or_url, default=None,
                   help="a specific checkpoint-N or global_stepN folder (overrides auto-detection)")
    add_model_options(p)
    p.set_defaults(func=cmd_convert)
    return p


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def print_summary(result) -> None:
    """Human summary of a :class:`~vllm_consolidate.convert.ConvertResult` on stdout."""
    d = result.detected
    if result.status == "already_consolidated":
        print(f"already consolidated: {result.output} holds one {d.get('format', '')} weights file "
              "and nothing would change")
        print("  vLLM can load it as it is; pass --force, --dtype or --pytorch-bin to convert anyway.")
        return
    parts = [d.get("type", "?")]
    if d.get("stage") is not None:
        parts += [f"ZeRO-{d['stage']}", f"world size {d['world_size']}", f"tag {d['tag']}"]
    if d.get("trained_dtype"):
        parts.append(f"trained in {d['trained_dtype']}")
    print(f"detected:   {', '.join(parts)}")
    print(f"chosen:     {d.get('weights_dir')} ({d.get('how')})")
    if d.get("type") == "lora_merge":
        n = len(d["lora_replaced"])
        replaced = f"; replaced {n} tensors (modules_to_save, biases, saved base layers)" if n else ""
        print(f"lora:       merged {d['lora_modules']} LoRA modules from {d['lora_source']} into {d['base_model']}"
              + replaced)
    elif d.get("type") == "lora_adapter":
        checked = f"checked against {d['base_model']}" if d.get("base_model") else "not checked against a base model"
        print(f"lora:       adapter of {d['lora_modules']} LoRA modules from {d['lora_source']}; {checked}")
    extra = f"; dropped tied {', '.join(result.dropped)}" if result.dropped else ""
    print(f"tensors:    {result.tensors} tensors, {result.parameters:,} parameters{extra}")
    if result.moe:
        m = result.moe
        print(f"experts:    {m['layout']} ({m['experts']} experts x {m['moe_layers']} MoE layers, {m['family']}; "
              f"stored {m['source_layout']})")
    if result.vlm:
        parts = ", ".join(f"{name} {p['parameters']:,} parameters ({p['tensors']} tensors)"
                          for name, p in result.vlm["parts"].items() if p["tensors"])
        moved = result.vlm.get("renamed")
        moved_text = f"; {moved} names moved to save_pretrained's prefixes" if moved else ""
        print(f"modality:   {result.vlm['family']} vision-language model: {parts}{moved_text}")
    if result.quantize:
        print(f"quantized:  {result.quantize} (compressed-tensors, as llm-compressor writes it)")
    if result.renamed:
        print(f"renamed:    {len(result.renamed)} names lost a wrapper prefix")
    print(f"bytes:      read {_gb(result.bytes_read)}, wrote {_gb(result.bytes_written)} as {result.output_dtype}")
    print(f"files:      {', '.join(result.files)}")
    origin = result.assets
    if d.get("type") == "lora_adapter":  # an adapter folder holds adapter_config.json, not the model's config
        print(f"tokenizer:  {origin.get('tokenizer') or 'none'}")
    else:
        _print_model_assets(result, origin)
    speed = rate(result.bytes_written, result.seconds)
    print(f"time:       {result.seconds:.1f} s" + (f" ({speed})" if speed else ""))
    if result.validation is not None:
        counts = result.validation["counts"]
        source = next((c for c in result.validation["checks"] if c["name"] == "source_values"), None)
        print(f"validation: {'passed' if result.validation['ok'] else 'FAILED'} ({counts['pass']} checks passed, "
              f"{counts['warn']} warnings)" + (f"; source: {source['message']}" if source else ""))
    print(f"output:     {result.output}")


def _print_model_assets(result, origin: dict) -> None:
    d = result.detected  # a config the reader built (Megatron's args, Bridge's or NeMo's YAML) is what is written
    built = f"built from {d['layout_from']} ({d['config_file']})" if d.get("config_file") else None
    print(f"config:     {built or origin.get('config') or 'none'}")
    note = (result.architectures or {}).get("message")
    if note:
        print(f"architectures: {note}")
    print(f"tokenizer:  {origin.get('tokenizer') or 'none'}")
    print(f"generation: {origin.get('generation_config') or 'none (transformers and vLLM defaults apply)'}")


def cmd_convert(args: argparse.Namespace) -> int:
    from vllm_consolidate.convert import convert

    opts = model_options(args, input=args.input, output=args.output, checkpoint_dir=args.checkpoint_dir)
    progress = Progress(enabled=not args.json)
    try:
        result = convert(opts, progress=progress, on_stage=progress.stage)
    finally:
        progress.close()
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print_summary(result)
    return 0


