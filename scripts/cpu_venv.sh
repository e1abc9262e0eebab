# Sourced (not run) by scripts/setup_megatron_venv.sh and scripts/setup_nemo_venv.sh: the steps both take to build,
# idempotently, a CPU virtualenv that writes a test corpus, pinned by one constraints file.
#
# torch==2.13.0+cpu is installed first and alone ("+cpu" exists only as the cached wheel, so pip can never fall back
# to the multi-GB CUDA build), then EVERY package the constraints file names, with -c it. A stamp in the venv holds
# the constraints' hash: a venv whose stamp matches is only verified, a change of pins re-syncs it.
#
# Before sourcing, the caller sets:
#   script           its name, the log prefix
#   venv             the venv's path
#   constraints      the constraints file; constraints_var, the variable that overrides it (named in the error)
#   stamp            the stamp file in the venv
#   base_python      the interpreter that creates the venv (empty: python3.11 when present, else python3)
# and defines verify(), which imports what the venv is for with "$venv/bin/python". Then it runs:
#   venv_reuse_if_complete      # verify and exit 0 when the stamp matches
#   venv_create_and_install     # create the venv, install torch, then the constraints' packages
#   ...                         # its own steps, if any
#   venv_finish                 # check torch is the CPU build, verify, write the stamp

torch_spec="torch==2.13.0+cpu"
[[ -f "$constraints" ]] || { echo "error: no constraints file $constraints ($constraints_var)" >&2; exit 1; }
stamp_content="$torch_spec constraints $(sha256sum <"$constraints" | cut -c1-16)"
# Every package named in the constraints file is installed (the file pins the whole venv).
mapfile -t packages < <(grep -vE '^\s*(#|$)' "$constraints" | sed -E 's/[=<>!~;[ ].*//')

t0=$(date +%s)
log() { echo "[$script +$(( $(date +%s) - t0 ))s] $*"; }
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

venv_reuse_if_complete() {
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$stamp_content" && -x "$venv/bin/python" ]]; then
    log "venv $venv already complete ($stamp_content); verifying"
    verify
    exit 0
  fi
}

venv_create_and_install() {
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
}

venv_finish() {
  local torch_installed
  torch_installed="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
  if [[ "$torch_installed" != "2.13.0+cpu" ]]; then
    echo "error: torch in $venv is $torch_installed, expected 2.13.0+cpu" >&2
    exit 1
  fi
  verify
  echo "$stamp_content" >"$stamp"
  log "done: $venv ready ($stamp_content)"
}
