#!/usr/bin/env bash
# One call on the GPU machine (issue #9): environment smoke test, GPU tests, then the transport
# benchmark at Llama-7B LoRA shapes (all 7 projections, 32 layers, bf16) r16 and r64.
#   device run (carry .whl):  bash benches/device_check.sh        (budget: <= 8 device minutes)
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
# 1. plain torch CUDA sharing between two processes, so an environment fault is not blamed on us
timeout 60 python3 - <<'PY' 2>&1 | tee "$OUT/smoke.log" || exit 1
import torch, torch.multiprocessing as mp
def child(q):
    t = q.get(); q.put(float(t.sum()))
if __name__ == "__main__":
    ctx = mp.get_context("spawn"); q = ctx.Queue(); p = ctx.Process(target=child, args=(q,)); p.start()
    t = torch.ones(1 << 20, device="cuda"); q.put(t); p.join(30)
    print("smoke: torch CUDA sharing", "ok" if q.get() == float(1 << 20) else "WRONG")
PY
# 2. the GPU tests (issue #9 items 1-7, round trips, 300-cycle memory soak) and the CPU transport tests
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_transport.py -s 2>&1 | tee "$OUT/gpu-tests.log"
# 3. the benchmark: lora_ipc, /dev/shm safetensors, torch IPC per tensor, device-to-device floor
timeout 180 python3 benches/bench_transport.py --device cuda --ranks 16,64 --layers 32 --iters ${ITERS:-30} \
  --json "$OUT/bench-gpu.json" 2>&1 | tee "$OUT/bench.log"
# 4. full-weight refit transport (issue #11): bucket throughput (GB/s) against the same-device copy floor
timeout 120 python3 benches/bench_bucket_transport.py --device cuda --layers 8 --bucket-mib 256 1024 --iters 5 \
  --json "$OUT/bucket-transport-cuda.json" 2>&1 | tee "$OUT/bucket-transport.log"
