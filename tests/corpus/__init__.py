"""Real DeepSpeed ZeRO checkpoint corpus for tests (see ``tests/corpus/README.md``)."""
