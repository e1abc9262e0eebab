"""The anchor for ``--quantize``: llm-compressor's own quantization of a bf16 Hugging Face folder.

Runs in the llm-compressor venv (``scripts/setup_llmc_venv.sh``), never in ours: ``tests/test_quantize.py``
calls it by subprocess. It loads ``INPUT`` (a folder of bf16 weights + config.json) with transformers,
applies ``QuantizationModifier(targets="Linear", scheme=SCHEME, ignore=["lm_head", *IGNORE])`` through
``oneshot`` (no calibration data: these schemes need none) and saves with ``save_compressed=True``,
exactly as llm-compressor's examples for FP8_DYNAMIC, FP8_BLOCK and W8A8 do.

Usage: python tests/tools/llmc_quantize.py INPUT OUTPUT SCHEME [IGNORE ...]
       python tests/tools/llmc_quantize.py --jobs '[[INPUT, OUTPUT, SCHEME, IGNORE...], ...]'
SCHEME is ours (fp8_dynamic, fp8_block, w8a8).

       python tests/tools/llmc_quantize.py --choice OUT CONFIG...
builds each config.json's model (its ``architectures`` class, random weights, bf16), quantizes it with FP8_DYNAMIC
as above and prints one JSON line: per config, the weights stored quantized and ``quantization_config.ignore``,
as written (llm-compressor's choice of modules, with no checkpoint involved).

       python tests/tools/llmc_quantize.py --logits FOLDER...
loads each quantized folder with transformers (compressed-tensors decompresses it), prints one JSON line: whether
every folder's dequantized state dict and its logits on fixed token ids equal the first folder's, bit for bit,
and the largest logit. FP8 is not served by vLLM on CPU; this is how its output is checked end to end.
"""

from __future__ import annotations

import sys

#: Our scheme names -> llm-compressor's preset names.
SCHEMES = {"fp8_dynamic": "FP8_DYNAMIC", "fp8_block": "FP8_BLOCK", "w8a8": "W8A8"}


def logits(folders: list[str]) -> int:
    import json

    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 7, 200, 3, 150]])
    first_state, first_logits, same_state, same_logits = None, None, True, True
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        state = {k: v.float() for k, v in model.state_dict().items()}
        with torch.no_grad():
            out = model(ids).logits.float()
        if first_state is None:
            first_state, first_logits = state, out
            continue
        same_state &= state.keys() == first_state.keys() and all(torch.equal(v, first_state[k])
                                                                  for k, v in state.items())
        same_logits &= torch.equal(out, first_logits)
    print(json.dumps({"same_dequantized": same_state, "same_logits": same_logits,
                      "max_logit": float(first_logits.abs().max()), "weights": len(first_state)}))
    return 0


def quantize(src: str, dst: str, scheme: str, *ignore: str) -> None:
    """One folder through oneshot and save_pretrained(save_compressed=True)."""
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    recipe = QuantizationModifier(targets="Linear", scheme=SCHEMES[scheme], ignore=["lm_head", *ignore])
    oneshot(model=model, recipe=recipe)
    model.save_pretrained(dst, save_compressed=True)


def choice(out: str, configs: list[str]) -> int:
    import json
    import struct
    from pathlib import Path

    import torch
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    found = {}
    for i, path in enumerate(configs):
        config = transformers.AutoConfig.from_pretrained(path)
        arch = (config.architectures or ["AutoModelForCausalLM"])[0]
        cls = getattr(transformers, arch, transformers.AutoModelForCausalLM)
        model = (cls._from_config(config) if cls is not transformers.AutoModelForCausalLM
                 else cls.from_config(config)).to(torch.bfloat16)
        oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]))
        dst = Path(out) / str(i)
        model.save_pretrained(str(dst), save_compressed=True)
        quantized = []
        for f in sorted(dst.glob("*.safetensors")):
            with f.open("rb") as h:
                header = json.loads(h.read(struct.unpack("<Q", h.read(8))[0]))
            quantized += [k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F8_E4M3"]
        qc = json.loads((dst / "config.json").read_text())["quantization_config"]
        found[path] = {"quantized": sorted(quantized), "ignore": qc["ignore"]}
    print(json.dumps(found))
    return 0


def main(argv: list[str]) -> int:
    if argv[0] == "--logits":
        return logits(argv[1:])
    if argv[0] == "--choice":
        return choice(argv[1], argv[2:])
    if argv[0] == "--jobs":  # several folders in one process: llm-compressor takes seconds to import
        import json

        for job in json.loads(argv[1]):
            quantize(*job)
        return 0
    quantize(*argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
