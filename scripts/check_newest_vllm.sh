#!/usr/bin/env bash
# Not part of the test command: check lora_ipc's vLLM hooks against the newest GPU vllm on PyPI and say what
# differs from the releases requirements/ pins. Exit 0: it fits (add it to requirements/vllm-api-check.txt);
# 1: something lora_ipc uses changed (the report names it); 2: the release could not be obtained.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/python.sh || exit 1
exec "$PY" scripts/check_vllm_api.py "$@"
