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
# The steps shared with scripts/setup_megatron_venv.sh (create, install, stamp) are in scripts/cpu_venv.sh.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
script=setup_nemo_venv
venv="${NEMO_VENV:-$repo_root/.venv-nemo}"
constraints="${NEMO_CONSTRAINTS:-$repo_root/constraints/nemo.txt}"
constraints_var=NEMO_CONSTRAINTS
stamp="$venv/.nemo-setup-complete"
base_python="${NEMO_VENV_PYTHON:-}"
# shellcheck source=scripts/cpu_venv.sh
source "$repo_root/scripts/cpu_venv.sh"
mapfile -t no_deps < <(sed -nE 's/^# NO_DEPS +//p' "$constraints")

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

venv_reuse_if_complete
venv_create_and_install
log "installing ${no_deps[*]} without their dependencies"
"${pip[@]}" install --quiet --no-deps "${no_deps[@]}"
rm -rf "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tests"
venv_finish
