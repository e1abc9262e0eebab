"""Record ``convert --json``, ``inspect`` (JSON and text) and ``batch --dry-run --json`` over the corpus, to compare.

Not a test: run it once with the old source tree and once with the new one, then diff the two files::

    PYTHONPATH=/old/src python tests/tools/json_compare.py record before.json
    PYTHONPATH=/new/src python tests/tools/json_compare.py record after.json
    python tests/tools/json_compare.py diff before.json after.json

Paths (the corpus root, the temporary output) and times are replaced by placeholders; exit codes,
stderr and every other JSON field are kept.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CORPUS = Path(os.environ.get("VLLMC_CORPUS_DIR", "/work/main/.cache/corpus"))
#: Cases converted (inspect and batch run on every case): one or more of each format.
CONVERT = ("llama_z1_w1_fp32", "qwen2_z3_w2_bf16_tied", "trainer_qwen2_z2_bf16", "qwen2moe_z2_w2_bf16",
           "hf_llama_sharded_bf16", "hf_qwen2_single_fp32_tied", "dcp_llama_w2_flat_bf16", "trainer_fsdp_qwen2_tied",
           "dcp_qwen2_w2_ambiguous", "verl_qwen2_w2_tied", "verl_llama_w2_critic", "verl_qwen2_w2_lora",
           "lora_qwen2_z2_tied", "peft_plain_qwen2", "peft_dora_qwen2", "st_single_bf16", "bin_sharded_fp32")
_TIME = re.compile(r'"(\w*(?:seconds|time|created|elapsed|throughput|available|free)\w*)": [0-9.e+-]+')


#: The folder of a case that is its input, the first present.
INPUT_FOLDERS = ("ckpt", "run", "model", "adapter")


def _cases() -> list[tuple[str, Path]]:
    out = []
    for group in sorted(p for p in CORPUS.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for case in sorted(p for p in group.iterdir() if p.is_dir() and not p.name.startswith("_")):
            if case.name == "hf_layouts-v1":
                out += [(p.name, p) for p in sorted(case.iterdir()) if p.is_dir()]
                continue
            found = next((case / f for f in INPUT_FOLDERS if (case / f).is_dir()), None)
            if found is not None:
                out.append((case.name, found))
    return out


def _run(args: list[str], tmp: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "vllm_consolidate", *args], capture_output=True, text=True, env=env,
                       timeout=900)
    def clean(s: str) -> str:
        s = s.replace(tmp, "<TMP>").replace(str(CORPUS), "<CORPUS>")
        return _TIME.sub(r'"\1": <T>', s)
    return {"rc": p.returncode, "stdout": clean(p.stdout), "stderr": clean(p.stderr)}


def record(dest: str) -> None:
    out: dict[str, dict] = {}
    for name, case in _cases():
        print(name, file=sys.stderr, flush=True)
        base = ["--base-model-name", str(case.parent / "base")] if (case.parent / "base").is_dir() else []
        with tempfile.TemporaryDirectory() as tmp:
            out[f"inspect {name}"] = _run(["inspect", "--json", str(case), *base], tmp)
            out[f"inspect-text {name}"] = _run(["inspect", str(case), *base], tmp)
            for extra in ([], ["--all-checkpoints"]):
                out[f"batch {name} {extra}"] = _run(["batch", "--dry-run", "--json", "--input-dir", str(case),
                                                     "--output-dir", f"{tmp}/b", *extra, *base], tmp)
            if name in CONVERT:
                out[f"convert {name}"] = _run(["convert", "--json", "--no-validate-vllm", "--input", str(case),
                                               "--output", f"{tmp}/out", *base], tmp)
            if "lora" in name or "peft" in name:
                out[f"convert-adapter {name}"] = _run(["convert", "--json", "--no-validate-vllm", "--lora", "adapter",
                                                       "--input", str(case), "--output", f"{tmp}/adapter", *base], tmp)
    Path(dest).write_text(json.dumps(out, indent=1, sort_keys=True))


def diff(a: str, b: str) -> int:
    def norm(records: dict) -> dict:  # the rules of _run again: a record made before a rule was added gets it too
        return {k: {f: _TIME.sub(r'"\1": <T>', v) if isinstance(v, str) else v for f, v in r.items()}
                for k, r in records.items()}

    before, after = norm(json.loads(Path(a).read_text())), norm(json.loads(Path(b).read_text()))
    bad = 0
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            bad += 1
            print(f"DIFFERS: {key}\n  before: {before.get(key)}\n  after:  {after.get(key)}")
    print(f"{len(before)} records before, {len(after)} after, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] == "record":
        record(sys.argv[2])
    else:
        sys.exit(diff(sys.argv[2], sys.argv[3]))
