#!/usr/bin/env bash
# Create (idempotently) the llm-compressor venv: the anchor of `convert --quantize` (tests/test_quantize.py runs
# tests/tools/llmc_quantize.py in it by subprocess).
#
# Usage: scripts/setup_llmc_venv.sh            (venv at <repo>/.venv-llmc)
#        LLMC_VENV=/some/path scripts/setup_llmc_venv.sh
#
# Environment:
#   LLMC_VENV         target venv path (default: <repo>/.venv-llmc; the tests read LLMC_PYTHON, default
#                     <repo>/.venv-llmc/bin/python)
#   LLMC_VENV_PYTHON  interpreter used to create the venv (default: python3.11, as the cached cp311 torch wheel)
#   LLMC_CONSTRAINTS  pip constraints (default: <repo>/constraints/llmc.txt); empty: resolve afresh
#
# Its own venv, not the test venv's: llmcompressor 0.14.0.1 requires transformers<=5.17 and
# compressed-tensors==0.19.0, while .venv runs transformers 5.25. Torch is installed FIRST as exactly
# torch==2.13.0+cpu, a local version that exists only as the cached wheel (find-links): pip can never fall back
# to the multi-GB CUDA build. A stamp (versions + the constraints' hash) written last marks a complete venv; a
# re-run with a matching stamp only verifies the imports. Measured on the shared 2-core machine (load 5-7):
# 245 s for a new venv with a warm pip cache, 18 s for a re-run (verify only: importing llmcompressor).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LLMC_VENV:-$repo_root/.venv-llmc}"
torch_spec="torch==2.13.0+cpu"
llmc_spec="llmcompressor==0.14.0.1"
stamp="$venv/.llmc-setup-complete"
constraints="${LLMC_CONSTRAINTS-$repo_root/constraints/llmc.txt}"
pin=()
if [[ -n "$constraints" ]]; then
  [[ -f "$constraints" ]] || { echo "error: no constraints file $constraints (LLMC_CONSTRAINTS)" >&2; exit 1; }
  pin=(-c "$constraints")
  stamp_content="$torch_spec $llmc_spec constraints $(sha256sum <"$constraints" | cut -c1-16)"
else
  stamp_content="$torch_spec $llmc_spec unconstrained"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

verify() {
  "$venv/bin/python" - <<'PY'
import torch, transformers, compressed_tensors, llmcompressor  # noqa: E401
if not torch.__version__.endswith("+cpu"):
    raise SystemExit(f"expected a +cpu torch build, got {torch.__version__}")
print(f"llmcompressor {llmcompressor.__version__}, compressed-tensors {compressed_tensors.__version__}, "
      f"transformers {transformers.__version__}, torch {torch.__version__}")
PY
}

if [[ -f "$stamp" && "$(cat "$stamp")" == "$stamp_content" && -x "$venv/bin/python" ]]; then
  verify
  exit 0
fi
rm -f "$stamp"
if [[ ! -x "$venv/bin/python" ]]; then
  base_python="${LLMC_VENV_PYTHON:-}"
  if [[ -z "$base_python" ]]; then
    if command -v python3.11 >/dev/null 2>&1; then base_python=python3.11; else base_python=python3; fi
  fi
  "$base_python" -m venv "$venv"
fi
if ! "${pip[@]}" install --quiet "$torch_spec"; then
  echo "error: could not install $torch_spec; the CPU wheel must be available via PIP_FIND_LINKS" \
       "(e.g. /opt/wheels). Refusing to fall back to the CUDA build." >&2
  exit 1
fi
"${pip[@]}" install --quiet "${pin[@]}" "$llmc_spec" "$torch_spec"
installed="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
[[ "$installed" == "2.13.0+cpu" ]] || { echo "error: torch in $venv is $installed, expected 2.13.0+cpu" >&2; exit 1; }
verify
echo "$stamp_content" > "$stamp"
