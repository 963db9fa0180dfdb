#!/usr/bin/env bash
# One GPU check, two tables, <= 8 minutes on one GPU, no downloads:
# 1. DDPM++ and NCSN++ at the paper's size on synthetic 3x32x32 data: training-step time and peak
#    memory per order (1/2/3; batch 48 and 128; probe_product jvp and vjp), bits/dim throughput
#    (rtol = atol = 1e-5, uniform and truncated-normal dequantization) and ODE sampling throughput
#    (cells past --budget seconds are skipped, OOM cells print OOM);
# 2. the CIFAR-shaped real-image run: the CIFAR-10 DDPM++ (61.8 M parameters) on 3x32x32 patches of
#    scikit-image's photographs at reduced steps, the paper's protocol (benchmarks/real_images.py,
#    data set photos32): pre-training, order 1/2/3 fine-tunes, paired test bits/dim, FID/KID. Its stages
#    are cached under runs/gpu_real_images: a second call continues an unfinished run.
#
#   bash benchmarks/gpu_check.sh                        # on the GPU
#   bash benchmarks/gpu_check.sh --smoke --device cpu   # tiny CPU smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
if [[ " $* " == *" --smoke "* ]]; then
  REAL=(--quick --datasets photos32 --device cpu --threads 1)
else
  REAL=(--datasets photos32 --device cuda --threads 4)
fi
status=0
timeout 250 "$PY" -m benchmarks.gpu_check --budget 90 "$@" || status=$?
timeout 220 "$PY" -m benchmarks.real_images "${REAL[@]}" --runs runs/gpu_real_images \
  --out runs/gpu_real_images/results || status=$?
exit "$status"
