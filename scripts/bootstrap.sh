#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test extras. Idempotent: a stamp keyed by
# pyproject.toml's hash skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.vllmc-installed"
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import vllm_consolidate" 2>/dev/null; then
  exit 0
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# torch first and pinned: 2.13.0 is the CPU wheel cached on this machine; any other spec pulls a CUDA build.
"$VENV/bin/pip" install --quiet --disable-pip-version-check torch==2.13.0
"$VENV/bin/pip" install --quiet --disable-pip-version-check -e ".[test]"
# verl is not installed (its dependencies include ray and vLLM): the FSDP test corpus unpacks its wheel and
# runs only its checkpoint manager (tests/corpus/verl_save.py).
"$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps -d .cache/wheels verl==0.9.1
echo "$want" > "$stamp"
echo "bootstrap: $VENV ready in $(( $(date +%s) - start )) s" >&2
