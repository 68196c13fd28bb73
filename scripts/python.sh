# Sourced by setup.sh, test.sh, demo.sh and the matrix scripts: sets PY to the project's own environment,
# .venv in this checkout ($LORA_IPC_VENV to put it elsewhere). The active Python, virtual environment or
# conda environment is never used and never changed. setup.sh alone creates the venv ($LORA_IPC_MAKE_VENV=1).
_lora_ipc_pick_python() {
  local venv=${LORA_IPC_VENV:-$PWD/.venv}
  PY="$venv/bin/python"
  if [ -x "$PY" ]; then return 0; fi
  if [ "${LORA_IPC_MAKE_VENV:-0}" != 1 ]; then
    echo "no project environment at $venv: run bash scripts/setup.sh first" >&2
    return 1
  fi
  local base=${LORA_IPC_BASE_PYTHON:-python3}
  echo "creating the project environment $venv (from $base)" >&2
  if ! "$base" -m venv "$venv" 2>/dev/null; then
    rm -rf "$venv"
    # Debian/Ubuntu ship venv's pip bootstrap separately (python3.X-venv)
    local pkg
    pkg="python$("$base" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')-venv"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "installing $pkg (python3 -m venv needs it)" >&2
      apt-get install -y -q "$pkg" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$pkg" >/dev/null; }
      "$base" -m venv "$venv" || return 1
    else
      echo "$base -m venv failed: install $pkg" >&2
      return 1
    fi
  fi
}
_lora_ipc_pick_python
