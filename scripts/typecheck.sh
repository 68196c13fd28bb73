#!/usr/bin/env bash
# Type-check lora_ipc/ with mypy as configured in pyproject.toml ([tool.mypy]); installs the pinned mypy
# into the project's interpreter first if it is missing or another version. Extra arguments go to mypy.
# Cold (no .mypy_cache): about 45 s of CPU, most of it reading torch's and vLLM's annotations; warm: a few s.
set -euo pipefail
cd "$(dirname "$0")/.."
MYPY_VERSION=$(sed -n "s/^mypy==//p" requirements/dev.txt)  # the one pin
if [ -z "${PY:-}" ]; then source scripts/python.sh; fi
if [ "$("$PY" -m mypy --version 2>/dev/null | awk '{print $2}')" != "$MYPY_VERSION" ]; then
  "$PY" -m pip install --disable-pip-version-check -q "mypy==$MYPY_VERSION"
fi
# this checkout's lora_ipc, not an installed copy (an editable install may point at another checkout)
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m mypy "$@"
