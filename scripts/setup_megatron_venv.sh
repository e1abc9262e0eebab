#!/usr/bin/env bash
# Create (idempotently) a separate virtualenv with megatron-core for CPU, used only to WRITE the Megatron test
# corpus (tests/corpus/megatron_build.py launches tests/corpus/megatron_train.py under its torchrun).
#
# Usage: scripts/setup_megatron_venv.sh           (venv at <repo>/.venv-megatron)
#        MEGATRON_VENV=/some/path scripts/setup_megatron_venv.sh
#
# Environment:
#   MEGATRON_VENV         target venv path (default: <repo>/.venv-megatron)
#   MEGATRON_VENV_PYTHON  interpreter used to create the venv (default: python3.11: megatron-core 0.16 is the
#                         newest release for 3.11, and the cached torch CPU wheel is cp311)
#   MEGATRON_CONSTRAINTS  pip constraints (default: <repo>/constraints/megatron.txt)
#
# Pins: torch==2.13.0+cpu here (a "+cpu" local version exists only as the cached wheel, so pip can never fall
# back to the multi-GB CUDA build); megatron-core, psutil and everything else in constraints/megatron.txt
# (transformers/safetensors/numpy/tokenizers at the versions of constraints/test.txt). psutil is required:
# megatron-core's torch_dist writer uses it in its worker processes without declaring it, and
# dist_checkpointing.save hangs forever when it is missing. The stamp holds the constraints' hash, so a
# change of pins re-syncs the venv.
# Measured on the 2-core machine: see the README (Tests) for the cold and re-run times.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MEGATRON_VENV:-$repo_root/.venv-megatron}"
torch_spec="torch==2.13.0+cpu"
constraints="${MEGATRON_CONSTRAINTS:-$repo_root/constraints/megatron.txt}"
[[ -f "$constraints" ]] || { echo "error: no constraints file $constraints (MEGATRON_CONSTRAINTS)" >&2; exit 1; }
stamp="$venv/.megatron-setup-complete"
stamp_content="$torch_spec constraints $(sha256sum <"$constraints" | cut -c1-16)"
# Every package named in the constraints file is installed (the file pins the whole venv).
mapfile -t packages < <(grep -vE '^\s*(#|$)' "$constraints" | sed -E 's/[=<>!~;[ ].*//')

t0=$(date +%s)
log() { echo "[setup_megatron_venv +$(( $(date +%s) - t0 ))s] $*"; }
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

verify() {
  "$venv/bin/python" - <<'PY'
import time
t = time.monotonic()
import psutil  # noqa: F401  (dist_checkpointing.save hangs without it)
import torch
import megatron.core
from megatron.core import dist_checkpointing  # noqa: F401
import transformers
if not torch.__version__.endswith("+cpu"):
    raise SystemExit(f"expected a +cpu torch build, got {torch.__version__}")
print(f"import megatron.core {megatron.core.__version__} ok (torch {torch.__version__}, "
      f"transformers {transformers.__version__}) in {time.monotonic() - t:.1f}s")
PY
}

if [[ -f "$stamp" && "$(cat "$stamp")" == "$stamp_content" && -x "$venv/bin/python" ]]; then
  log "venv $venv already complete ($stamp_content); verifying"
  verify
  exit 0
fi

base_python="${MEGATRON_VENV_PYTHON:-}"
if [[ -z "$base_python" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then base_python=python3.11; else base_python=python3; fi
fi
rm -f "$stamp"
if [[ ! -x "$venv/bin/python" ]]; then
  log "creating venv $venv with $base_python ($("$base_python" --version 2>&1))"
  "$base_python" -m venv "$venv"
fi
log "installing $torch_spec (cached CPU wheel only)"
if ! "${pip[@]}" install --quiet -c "$constraints" "$torch_spec"; then
  echo "error: could not install $torch_spec; the CPU wheel must be available via PIP_FIND_LINKS" \
       "(e.g. /opt/wheels). Refusing to fall back to the CUDA build." >&2
  exit 1
fi
log "installing ${#packages[@]} packages pinned by $constraints"
"${pip[@]}" install --quiet -c "$constraints" "${packages[@]}" "$torch_spec"
torch_installed="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
if [[ "$torch_installed" != "2.13.0+cpu" ]]; then
  echo "error: torch in $venv is $torch_installed, expected 2.13.0+cpu" >&2
  exit 1
fi
verify
echo "$stamp_content" >"$stamp"
log "done: $venv ready ($stamp_content)"
