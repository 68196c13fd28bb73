#!/usr/bin/env bash
# The demo: set up, then run the trainer -> vLLM loop end to end (GPU if present, else CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/python.sh
exec "$PY" -m lora_ipc demo "$@"
