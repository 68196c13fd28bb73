#!/usr/bin/env bash
# One call on the GPU machine: GPU tests, then the transport benchmark (7B LoRA shapes, r16 and r64).
#   device run (carry .whl):  bash benches/device_check.sh
# Needs the pyzmq wheel in .whl/ (see README "GPU check"). Writes results under $OUT (or ./bench-results).
set -uo pipefail
OUT=${OUT:-bench-results}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_transport.py -s 2>&1 | tee "$OUT/gpu-tests.log"
timeout 300 python3 benches/bench_transport.py --device cuda --iters ${ITERS:-30} --json "$OUT/transport-cuda.json" 2>&1 | tee "$OUT/bench.log"
# Full-weight refit transport: bucket throughput (GB/s) against the same-device copy floor (README-refit.md).
timeout 240 python3 benches/bench_bucket_transport.py --device cuda --layers 8 --bucket-mib 256 1024 --iters 5 \
  --json "$OUT/bucket-transport-cuda.json" 2>&1 | tee "$OUT/bucket-transport.log"
