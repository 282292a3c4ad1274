#!/usr/bin/env bash
# Issue 24: Conv-6 (then VGG-11, ResNet-18) on Fashion-MNIST at the paper's protocol on a lent
# GPU, resumable across device calls of at most 10 minutes. The work is in results/gpu_sweep.py
# (its docstring says how state travels); this wrapper sets the paths.
#   On the device, with results/gpu-carry carried (data in gpu-carry/fashion-mnist/*.gz, the
#   previous call's $OUT/sweep/* in gpu-carry/state/):
#     export DEADLINE_AT=$(( $(date +%s) + 540 )); bash results/run_fmnist_gpu.sh
#   CPU rehearsal of the whole path (20 + 10 steps, batch 12, two levels; run it twice: the
#   second run finds everything stored and trains nothing):
#     DRY=1 LAP_DATA=../shared/data OUT=/tmp/gpu-out bash results/run_fmnist_gpu.sh
# then: python results/build_fmnist_gpu.py [results/fmnist-gpu.sqlite]
# Environment: OUT, DEADLINE_AT or DEADLINE, DEVICE, PRECISION (fp32|bf16), STAGES, DB, DRY.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=PASSIVE
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" results/gpu_sweep.py
