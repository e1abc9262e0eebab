#!/usr/bin/env bash
# Create (idempotently) a separate virtualenv with nemo_toolkit 2.7.3 + megatron-core 0.16.1 for CPU, used only to
# WRITE the NeMo 2 corpus case (tests/corpus/nemo_build.py launches tests/corpus/nemo_save.py under its torchrun).
#
# Usage: scripts/setup_nemo_venv.sh           (venv at <repo>/.venv-nemo)
#        NEMO_VENV=/some/path scripts/setup_nemo_venv.sh
#
# Environment:
#   NEMO_VENV         target venv path (default: <repo>/.venv-nemo)
#   NEMO_VENV_PYTHON  interpreter used to create the venv (default: python3.11, as the Megatron venv)
#   NEMO_CONSTRAINTS  pip constraints (default: <repo>/constraints/nemo.txt)
#
# Pins: torch==2.13.0+cpu (the cached wheel only: pip can never fall back to the CUDA build); every package named in
# the constraints file, installed with -c it; then the "# NO_DEPS" lines of that file (nemo_toolkit, nemo_run,
# nvidia-modelopt) without their dependencies: their declared ones are the whole toolkit (ASR, TTS, cloud
# launchers...), of which the save path imports only what the constraints list. nemo_toolkit ships a top-level
# `tests` package that would shadow this repo's tests/ (a namespace package): it is removed.
# The stamp holds the constraints' hash, so a change of pins re-syncs the venv.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NEMO_VENV:-$repo_root/.venv-nemo}"
torch_spec="torch==2.13.0+cpu"
constraints="${NEMO_CONSTRAINTS:-$repo_root/constraints/nemo.txt}"
[[ -f "$constraints" ]] || { echo "error: no constraints file $constraints (NEMO_CONSTRAINTS)" >&2; exit 1; }
stamp="$venv/.nemo-setup-complete"
stamp_content="$torch_spec constraints $(sha256sum <"$constraints" | cut -c1-16)"
mapfile -t packages < <(grep -vE '^\s*(#|$)' "$constraints" | sed -E 's/[=<>!~;[ ].*//')
mapfile -t no_deps < <(sed -nE 's/^# NO_DEPS +//p' "$constraints")

t0=$(date +%s)
log() { echo "[setup_nemo_venv +$(( $(date +%s) - t0 ))s] $*"; }
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

verify() {
  "$venv/bin/python" - <<'PY'
import time
t = time.monotonic()
import psutil  # noqa: F401  (dist_checkpointing.save hangs without it)
import torch
import megatron.core
import nemo
from nemo.collections import llm  # noqa: F401
from nemo.lightning.io.pl import MegatronCheckpointIO  # noqa: F401
if not torch.__version__.endswith("+cpu"):
    raise SystemExit(f"expected a +cpu torch build, got {torch.__version__}")
print(f"import nemo {nemo.__version__} + megatron.core {megatron.core.__version__} ok (torch {torch.__version__}) "
      f"in {time.monotonic() - t:.1f}s")
PY
}

if [[ -f "$stamp" && "$(cat "$stamp")" == "$stamp_content" && -x "$venv/bin/python" ]]; then
  log "venv $venv already complete ($stamp_content); verifying"
  verify
  exit 0
fi

base_python="${NEMO_VENV_PYTHON:-}"
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
log "installing ${no_deps[*]} without their dependencies"
"${pip[@]}" install --quiet --no-deps "${no_deps[@]}"
rm -rf "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tests"
torch_installed="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
if [[ "$torch_installed" != "2.13.0+cpu" ]]; then
  echo "error: torch in $venv is $torch_installed, expected 2.13.0+cpu" >&2
  exit 1
fi
verify
echo "$stamp_content" >"$stamp"
log "done: $venv ready ($stamp_content)"
