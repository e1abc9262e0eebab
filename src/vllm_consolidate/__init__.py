"""vllm-consolidate: turn DeepSpeed ZeRO checkpoints and sharded HF models into folders vLLM loads."""

__version__ = "0.1.0"
