#!/usr/bin/env bash
# Lay a newer megatron-core (constraints/megatron_next.txt: 0.19.2) over the Megatron corpus venv, for the corpus
# case written without common.pt (tests/corpus/megatron_build.py runs it with PYTHONPATH=<this folder>).
#
# Usage: scripts/setup_megatron_next.sh       (folder <repo>/.venv-megatron-next; needs .venv-megatron first)
#
# Environment:
#   MEGATRON_NEXT_DIR   target folder (default: <repo>/.venv-megatron-next): holds megatron/ only
#   MEGATRON_VENV       the 0.16 venv whose python, torch and packages run it (default: <repo>/.venv-megatron)
#
# Why not a second venv: megatron-core 0.17+ declare Requires-Python >= 3.12, and on 3.12 pip would take a
# multi-GB CUDA torch (the cached CPU wheel is cp311). The 0.19 source runs on 3.11 with torch 2.13.0+cpu as is,
# but for one module it imports unconditionally that needs triton (GPU kernels, never run on CPU):
# tests/corpus/megatron_train.py stub_paged_stash replaces that module when triton is absent. Its own
# dependencies (torch, numpy, packaging) are .venv-megatron's. Its wheel is downloaded (hash-pinned) and only the
# Python files of its megatron/ folder are kept (its C++ dataset helper, built for 3.12, is not used here).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${MEGATRON_NEXT_DIR:-$repo_root/.venv-megatron-next}"
venv="${MEGATRON_VENV:-$repo_root/.venv-megatron}"
reqs="$repo_root/constraints/megatron_next.txt"
stamp="$dest/.megatron-next-complete"
stamp_content="$(sha256sum <"$reqs" | cut -c1-16)"
version="$(grep -oE '^megatron-core==[^ ]+' "$reqs" | cut -d= -f3)"

t0=$(date +%s)
log() { echo "[setup_megatron_next +$(( $(date +%s) - t0 ))s] $*"; }

verify() {
  # NO_VCS_VERSION: else its version gets "+<hash>" of whatever git repository holds the folder (this one).
  NO_VCS_VERSION=1 PYTHONPATH="$dest:$repo_root" "$venv/bin/python" - "$version" "$dest" <<'PY'
import sys
from tests.corpus.megatron_train import stub_paged_stash
stub_paged_stash()
import megatron.core
from megatron.core import dist_checkpointing  # noqa: F401
want, where = sys.argv[1], sys.argv[2]
if megatron.core.__version__ != want or not megatron.core.__file__.startswith(where + "/"):
    raise SystemExit(f"expected megatron-core {want} from {where}, got {megatron.core.__version__} "
                     f"from {megatron.core.__file__}")
print(f"import megatron.core {megatron.core.__version__} over {sys.prefix} ok")
PY
}

[[ -x "$venv/bin/python" ]] || { echo "error: no $venv: run scripts/setup_megatron_venv.sh first" >&2; exit 1; }
if [[ -f "$stamp" && "$(cat "$stamp")" == "$stamp_content" && -f "$dest/megatron/core/package_info.py" ]]; then
  # Verified (an import, ~15 s on the 2-core machine) when the stamp was written: not again on every make test.
  log "$dest already complete (megatron-core $version)"
  exit 0
fi
rm -rf "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
log "downloading the megatron-core $version cp312 wheel (hash-pinned)"
"$venv/bin/python" -m pip --disable-pip-version-check download --quiet --no-deps --only-binary :all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --require-hashes -r "$reqs" -d "$tmp"
# Its megatron/ tree, as pip would install it, but for the compiled parts (built for 3.12; the dataset helpers).
"$venv/bin/python" - "$tmp" "$dest" <<'PY'
import pathlib, sys, zipfile
tmp, dest = map(pathlib.Path, sys.argv[1:])
(wheel,) = tmp.glob("megatron_core-*.whl")
with zipfile.ZipFile(wheel) as zf:
    names = [n for n in zf.namelist() if n.startswith("megatron/") and not n.endswith(".so")]
    zf.extractall(dest, names)
PY
verify
echo "$stamp_content" >"$stamp"
log "done: megatron-core $version in $dest"
