"""Test-only workaround (issue 25): run vLLM's vision-language models text-only without torchvision.

No torchvision wheel that works with the CPU torch 2.13 build is reachable here, and vLLM 0.32 imports
transformers' torchvision-backed image/video processors when it inspects Qwen2-VL and LLaVA. Put on
``PYTHONPATH`` of the vLLM probe only, this points those module names at transformers' PIL-based
equivalents (same public names) before anything imports them. With ``limit_mm_per_prompt`` 0 no image is
ever processed, so the language model is what vLLM runs; the vision tower's tensors are compared directly.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: torchvision-backed transformers module -> its PIL-based equivalent.
ALIASES = {
    "transformers.models.qwen2_vl.image_processing_qwen2_vl":
        "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
    "transformers.models.llava.image_processing_llava": "transformers.models.llava.image_processing_pil_llava",
    "transformers.models.pixtral.image_processing_pixtral":  # vLLM's LLaVA module imports Pixtral's too
        "transformers.models.pixtral.image_processing_pil_pixtral",
    "transformers.models.gemma3.image_processing_gemma3": "transformers.models.gemma3.image_processing_pil_gemma3",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - importlib's protocol
        return importlib.util.spec_from_loader(name, self) if name in ALIASES else None

    def create_module(self, spec):  # noqa: ANN001, ANN201
        return None  # the default: a fresh module, filled in below

    def exec_module(self, module):  # noqa: ANN001, ANN201
        """The PIL module's names, and each ``XImageProcessorPil`` also as ``XImageProcessor``."""
        pil = importlib.import_module(ALIASES[module.__name__])
        module.__dict__.update({k: v for k, v in vars(pil).items() if not k.startswith("__")})
        module.__dict__.update({k[:-3]: v for k, v in vars(pil).items() if k.endswith("ImageProcessorPil")})


sys.meta_path.insert(0, _Alias())
