"""``make demo``: consolidate a small real ZeRO-3 checkpoint and print the summary.

The checkpoint is written once by real DeepSpeed on this CPU (tests/corpus) and cached; the demo
then runs the same command a user would.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from tests.corpus import build

CASE = "qwen2_z3_w2_bf16_tied"


def main() -> int:
    print(f"demo: preparing the '{CASE}' checkpoint with real DeepSpeed (cached after the first run)...", flush=True)
    case = build.build_all([CASE])[CASE]
    meta = build.load_case(CASE)
    out = Path(os.environ.get("DEMO_OUT", ".cache/demo/qwen2-zero3-bf16")).absolute()
    cmd = [
        str(Path(sys.executable).parent / "vllm-consolidate"),
        "convert",
        "--input",
        str(case / meta["input"]),
        "--output",
        str(out),
        "--dtype",
        "bfloat16",
        "--force",
    ]
    print("demo: $ " + shlex.join(cmd), flush=True)
    code = subprocess.call(cmd)
    if code == 0:
        print(f"demo: done. Load it with vLLM: LLM(model='{out}')")
    return code


if __name__ == "__main__":
    sys.exit(main())
