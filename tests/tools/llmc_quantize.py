"""The anchor for ``--quantize``: llm-compressor's own quantization of a bf16 Hugging Face folder.

Runs in the llm-compressor venv (``scripts/setup_llmc_venv.sh``), never in ours: ``tests/test_quantize.py``
calls it by subprocess. It loads ``INPUT`` (a folder of bf16 weights + config.json) with transformers,
applies ``QuantizationModifier(targets="Linear", scheme=SCHEME, ignore=["lm_head", *IGNORE])`` through
``oneshot`` (no calibration data: these schemes need none) and saves with ``save_compressed=True``,
exactly as llm-compressor's examples for FP8_DYNAMIC, FP8_BLOCK and W8A8 do.

Usage: python tests/tools/llmc_quantize.py INPUT OUTPUT SCHEME [IGNORE ...]
SCHEME is ours (fp8_dynamic, fp8_block, w8a8).
"""

from __future__ import annotations

import sys

#: Our scheme names -> llm-compressor's preset names.
SCHEMES = {"fp8_dynamic": "FP8_DYNAMIC", "fp8_block": "FP8_BLOCK", "w8a8": "W8A8"}


def main(argv: list[str]) -> int:
    src, dst, scheme, *ignore = argv
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    recipe = QuantizationModifier(targets="Linear", scheme=SCHEMES[scheme], ignore=["lm_head", *ignore])
    oneshot(model=model, recipe=recipe)
    model.save_pretrained(dst, save_compressed=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
