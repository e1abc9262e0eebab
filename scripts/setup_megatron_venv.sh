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
# The steps shared with scripts/setup_nemo_venv.sh (create, install, stamp) are in scripts/cpu_venv.sh.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
script=setup_megatron_venv
venv="${MEGATRON_VENV:-$repo_root/.venv-megatron}"
constraints="${MEGATRON_CONSTRAINTS:-$repo_root/constraints/megatron.txt}"
constraints_var=MEGATRON_CONSTRAINTS
stamp="$venv/.megatron-setup-complete"
base_python="${MEGATRON_VENV_PYTHON:-}"
# shellcheck source=scripts/cpu_venv.sh
source "$repo_root/scripts/cpu_venv.sh"

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

venv_reuse_if_complete
venv_create_and_install
venv_finish
