#!/usr/bin/env bash
# The H100 measurement, one call on the GPU machine (device tool), after MLX's CUDA build is
# installed there (../shared/device/prepare-mlx-cuda.sh xlstm==2.0.6 mlstm-kernels==2.0.6,
# then `. .gpu/b/install.sh && bash benchmarks/run_h100.sh`). Results land in $OUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import mlx.core as mx, torch; print(mx.__version__, mx.default_device(), mx.device_info(), torch.__version__)" > "$OUT/versions.txt" 2>&1
timeout 540 python3 benchmarks/side_by_side.py --preset h100 --out "$OUT/h100.json" --budget 190 \
    --profile --variants 2>&1 | tee "$OUT/log.txt"
