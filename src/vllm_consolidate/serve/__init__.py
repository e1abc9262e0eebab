"""Serving a checkpoint without consolidating it first: the vLLM load-format plugin.

:mod:`vllm_consolidate.serve.vllm_plugin` registers the load format ``consolidate`` with vLLM
(entry point ``vllm.general_plugins``), so that::

    vllm serve ./run/checkpoint-196 --load-format consolidate

streams the weights straight from the ZeRO shards (or a DCP / verl / HF checkpoint) into vLLM, one
tensor at a time, with no consolidated copy on disk. Importing this package never imports vLLM or
torch; the plugin imports them only when vLLM calls it.
"""

from __future__ import annotations

__all__: list[str] = []
