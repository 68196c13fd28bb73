#!/usr/bin/env bash
# Device run for issue 19 (CUDA VMM slabs, csrc/vmm.c): budget <= 6 device minutes.
#   run (carry .whl and lora_ipc/_native.abi3.so):  bash benches/device_check_vmm.sh
# Builds the extension in place if a compiler is there (else uses the carried abi3 build), then the
# VMM GPU tests beside the torch path's, then the side-by-side latency bench. Results under $OUT.
set -uo pipefail
OUT=${OUT:-bench-results}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
if command -v cc >/dev/null; then
  timeout 120 python3 setup.py -q build_ext --inplace 2>&1 | tail -5 | tee "$OUT/native-build.log"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "from lora_ipc.core.memory import native; print('native', native.extension(), native.status())" 2>&1 | tee -a "$OUT/gpu.txt"
# 1. the native primitives (stub driver: needs cc) and the VMM backend's GPU tests
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_vmm.py tests/test_native.py -s -rs 2>&1 | tee "$OUT/vmm-tests.log"
# 2. torch CUDA IPC vs VMM slabs, same run: publish, steady fetch, first fetch, torch memory_allocated
timeout 150 python3 benches/bench_vmm.py --ranks 16,64 --layers 32 --iters ${ITERS:-20} --json "$OUT/bench-vmm.json" \
  2>&1 | tee "$OUT/bench-vmm.log"
