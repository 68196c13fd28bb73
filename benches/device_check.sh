#!/usr/bin/env bash
# The GPU machine's one run (issue 18): probe, GPU tests, benches; <= 6 device-minutes, JSON + PNG under $OUT.
#   here, once:        bash scripts/device_wheels.sh          (pyzmq wheels into the git-ignored .whl/)
#   device run:        bash benches/device_check.sh           (run(..., carry=[".whl"], timeout_s=420))
#   CPU rehearsal:     bash benches/device_check.sh --cpu     (same steps, CPU tensors, tiny sizes; CI runs it)
# Stops at once, exit 3, naming the module, when a dependency is missing. See docs/design/cuda.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results}; mkdir -p "$OUT"; export OUT
PY=${PYTHON:-python3}
if ! "$PY" -c "import zmq" >/dev/null 2>&1; then
  if ls .whl/pyzmq-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      --find-links .whl pyzmq || { echo "device_check: MISSING DEPENDENCY: no wheel in .whl/ installs pyzmq for $("$PY" -V)"; exit 3; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "device_check: MISSING DEPENDENCY: pyzmq is not importable and .whl/ holds no pyzmq wheel" \
         "(run scripts/device_wheels.sh here and carry .whl)"
    exit 3
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec timeout -k 10 ${DEVICE_CHECK_TIMEOUT_S:-380} "$PY" benches/device_check.py --out "$OUT" "$@"
