#!/usr/bin/env bash
# The test command: set up, then run the whole suite (GPU tests skip without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
python3 -m pytest -q tests "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
