#!/usr/bin/env bash
# Install (idempotently) Azurite, Microsoft's Azure Storage emulator, for tests/test_azure.py (az:// in and out).
#
# Usage: scripts/setup_azurite.sh                 (installs into <repo>/.cache/azurite)
#        AZURITE_DIR=/some/path scripts/setup_azurite.sh
#
# The whole npm dependency tree is pinned by constraints/azurite/package-lock.json (azurite 3.35.0: the last
# release that runs on Node.js 20; 3.36 and later ask for Node >= 21/22). `npm ci` installs exactly that tree,
# without the optional packages (--omit=optional halves the size: ~186 MB instead of ~360 MB). Re-pin with
# `npm install --package-lock-only` in constraints/azurite after changing package.json.
# A stamp holding the lockfile's hash marks a complete install: a re-run with the same lockfile only checks the
# binary (well under a second); a changed lockfile reinstalls.
# Measured on the 2-core CI machine: 29 s with an empty npm cache (28 s warm), 0.06 s for a re-run; 186 MB on disk.
# Needs node and npm on PATH (Node.js >= 18); without them it fails, naming what is missing.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${AZURITE_DIR:-$repo_root/.cache/azurite}"
pins="$repo_root/constraints/azurite"
bin="$dir/node_modules/.bin/azurite-blob"
stamp="$dir/.azurite-setup-complete"
stamp_content="azurite $(sha256sum <"$pins/package-lock.json" | cut -c1-16)"

t0=$(date +%s)
log() { echo "[setup_azurite +$(( $(date +%s) - t0 ))s] $*"; }

if [[ -f "$stamp" && "$(cat "$stamp")" == "$stamp_content" && -x "$bin" ]]; then
  log "azurite already installed in $dir ($stamp_content)"
  exit 0
fi
for tool in node npm; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool not found; tests/test_azure.py needs Node.js and npm" \
    "to run Azurite (install Node.js >= 18)" >&2; exit 1; }
done

rm -f "$stamp"
mkdir -p "$dir"
cp "$pins/package.json" "$pins/package-lock.json" "$dir/"
log "npm ci azurite into $dir (pinned by constraints/azurite/package-lock.json)"
(cd "$dir" && npm ci --omit=optional --no-audit --no-fund --loglevel=error)
"$bin" --help >/dev/null
echo "$stamp_content" >"$stamp"
log "done: $bin ($(du -sh "$dir" | cut -f1))"
