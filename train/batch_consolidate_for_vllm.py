#!/usr/bin/env python3
"""The guide's ``python train/batch_consolidate_for_vllm.py``: a thin wrapper over ``batch-consolidate-for-vllm``."""

import sys
from pathlib import Path

try:
    from vllm_consolidate.cli.batch import main
except ImportError:  # run from a clone without installing: use the src/ layout directly
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from vllm_consolidate.cli.batch import main

if __name__ == "__main__":
    sys.exit(main())
