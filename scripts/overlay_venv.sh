# Sourced by vllm_matrix.sh and rl_frameworks.sh (after python.sh: uses $PY): the cached venvs they test in.
# Each is layered over the main environment (scripts/overlay_venv.py), holds only what its pip arguments
# install, lives under $CACHE (outside the checkout, so CI's fresh clones reuse it) and is rebuilt only
# when its key (the interpreter, the pins) changes.
CACHE=${LORA_IPC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-ipc}

# overlay_venv VENV KEY AFTER PIP_ARGS...: VENV built for KEY unless it already is: a fresh overlay venv,
# `pip install PIP_ARGS`, then the shell function AFTER (":" for none) with VENV as its argument; the key
# is stamped only when all of that succeeded. Fails (status 1) when any of it failed.
overlay_venv() {
  local venv=$1 key=$2 after=$3
  shift 3
  if [ -f "$venv/.lora-ipc-ready" ] && [ "$(cat "$venv/.lora-ipc-ready")" = "$key" ]; then return 0; fi
  echo "building $venv" >&2
  rm -rf "$venv"
  "$PY" scripts/overlay_venv.py "$venv" >/dev/null \
    && "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" \
    && "$after" "$venv" \
    && echo "$key" > "$venv/.lora-ipc-ready"
}
