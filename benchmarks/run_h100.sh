#!/usr/bin/env bash
# The H100/H200 measurement, one call on the GPU machine (device tool), after MLX's CUDA build is
# installed there (../shared/device/prepare-mlx-cuda.sh xlstm==2.0.6 mlstm-kernels==2.0.6,
# then `. .gpu/b/install.sh && bash benchmarks/run_h100.sh`). Results land in $OUT.
# PRESET (h100 | h200, default h100), BUDGET (seconds per side, default 190) and EXTRA (more
# side_by_side.py arguments; default "--variants") adjust it, e.g. the H200 run of issue 19:
#   PRESET=h200 BUDGET=90 EXTRA="--quantized 4,8" bash benchmarks/run_h100.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
PRESET=${PRESET:-h100}
BUDGET=${BUDGET:-190}
EXTRA=${EXTRA---variants}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import mlx.core as mx, torch; print(mx.__version__, mx.default_device(), mx.device_info(), torch.__version__)" > "$OUT/versions.txt" 2>&1
# shellcheck disable=SC2086  # EXTRA is a list of arguments
timeout $(( 3 * BUDGET + 60 )) python3 benchmarks/side_by_side.py --preset "$PRESET" --out "$OUT/$PRESET.json" \
    --budget "$BUDGET" --profile $EXTRA 2>&1 | tee "$OUT/log.txt"
