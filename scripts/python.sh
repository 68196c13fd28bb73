# Sourced by setup.sh, test.sh and demo.sh: sets PY, the interpreter lora_ipc is installed into and run with.
#
# - inside a virtual environment (activated, or python3 itself is one): that environment's python3;
# - else a .venv this checkout made before: its python;
# - else python3 where it accepts global installs (pyenv, conda, a container's own Python);
# - else (PEP 668 "externally-managed-environment", Debian/Ubuntu's system Python, or no pip at all):
#   create .venv in the checkout and use it. setup.sh alone creates it ($LORA_IPC_MAKE_VENV=1).
_lora_ipc_pick_python() {
  local venv="$PWD/.venv"
  if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then PY="$VIRTUAL_ENV/bin/python"; return; fi
  if python3 -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; then PY=python3; return; fi
  if [ -x "$venv/bin/python" ]; then PY="$venv/bin/python"; return; fi
  if python3 - <<'PYEOF' 2>/dev/null
import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
try:
    import pip  # noqa: F401
except ImportError:
    managed = True
sys.exit(1 if managed else 0)
PYEOF
  then PY=python3; return; fi
  if [ "${LORA_IPC_MAKE_VENV:-0}" != 1 ]; then
    echo "python3 is externally managed (PEP 668) and there is no .venv here: run scripts/setup.sh first" >&2
    return 1
  fi
  echo "python3 refuses global installs (PEP 668): creating $venv" >&2
  if ! python3 -m venv "$venv" 2>/dev/null; then
    rm -rf "$venv"
    # Debian/Ubuntu ship venv's pip bootstrap separately (python3.X-venv)
    local pkg
    pkg="python$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')-venv"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "installing $pkg (python3 -m venv needs it)" >&2
      apt-get install -y -q "$pkg" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$pkg" >/dev/null; }
      python3 -m venv "$venv"
    else
      echo "python3 -m venv failed: install $pkg (or use a Python that accepts pip installs)" >&2
      return 1
    fi
  fi
  PY="$venv/bin/python"
}
_lora_ipc_pick_python
