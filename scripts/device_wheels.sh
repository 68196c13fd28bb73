#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (it has torch, msgpack, safetensors, peft, matplotlib,
# pytest; not pyzmq) into .whl/ (git-ignored), one per CPython 3.10-3.12 (the device README says 3.12.3;
# override with DEVICE_PYS="3.12"). benches/device_check.sh installs, offline, the one pip finds
# compatible there (pip install --find-links .whl pyzmq). Needs a package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PYZMQ=${PYZMQ_VERSION:-$(python3 -c "import zmq; print(zmq.__version__)" 2>/dev/null || echo 27.1.0)}
mkdir -p .whl
rm -f .whl/pyzmq-*.whl
for PY in ${DEVICE_PYS:-3.10 3.11 3.12}; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "pyzmq==$PYZMQ" 2>&1 | grep -v "is ignored" || true
done
ls -l .whl
