#!/usr/bin/env bash
# One GPU check: DDPM++ and NCSN++ at the paper's size on synthetic 3x32x32 data.
# Prints ONE table: training-step time and peak memory per order (1/2/3; batch 48 and 128;
# probe_product jvp and vjp), bits/dim throughput (rtol = atol = 1e-5, uniform and truncated-normal
# dequantization) and ODE sampling throughput. No downloads. Meant to finish in <= 8 minutes on one GPU
# (cells past --budget seconds are skipped, OOM cells print OOM).
#
#   bash benchmarks/gpu_check.sh                        # on the GPU
#   bash benchmarks/gpu_check.sh --smoke --device cpu   # tiny CPU smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
exec timeout 480 "$PY" -m benchmarks.gpu_check "$@"
