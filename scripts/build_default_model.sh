#!/usr/bin/env bash
# Rebuilds the default model shipped in xlstm_metal/assets/default_model/, end to end, offline:
#   1. corpus:    Debian's python3.11-doc (PSF License) + python-django-doc (BSD-3-Clause) HTML -> text
#   2. tokenizer: the packaged byte-level BPE (4096 tokens; RETRAIN_TOKENIZER=1 trains one on the
#                 corpus instead, as the first build did)
#   3. model:     `xlstm-metal train` (preset pydoc-15m), best-validation weights exported in float32
#   4. quantize:  `xlstm-metal convert -q --q-recipe mixed-4-6` (4-bit blocks, 6-bit tied
#                 embedding/LM head, float gates, bfloat16 scales): ~9 MB
#   5. install:   copy the quantized export into xlstm_metal/assets/default_model/
#
# Usage: bash scripts/build_default_model.sh [all|corpus|tokenizer|train|quantize|install]
# Environment: WORK (default .train_data), RUN (default $WORK/run), STEPS (default 1400, the
# shipped run), MAX_TIME (seconds: size the run from measured speed instead of STEPS),
# DTYPE (default float32), RECIPE (default mixed-4-6), PYTHON (default python3).
# The shipped model was trained on an NVIDIA H200 (MLX 0.32.4 CUDA build) with these defaults
# (see MODEL_CARD.md); on a CPU the same command runs, far slower. That run's float32 export
# ($RUN/export/model.safetensors, not in the repository) had sha256
# 115c4b3060e159de8b8da79174913166d3f050a2d95775819ef132761b7ccd0e; the quantize stage turns it
# into the packaged model.safetensors byte for byte (sha256
# 59c794c8632d2b7565aefd3e88e355b1bd69361a78d72846e311ca6f974acb46). Quantization fidelity of
# the export (the packaged tokenizer files copied beside it): benchmarks/quantization_fidelity.py
# --model "$RUN/export" --corpus "$WORK/corpus.jsonl" --tokens 80000 --dtype bfloat16 (BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORK=${WORK:-.train_data}
RUN=${RUN:-$WORK/run}
STEPS=${STEPS:-1400}
MAX_TIME=${MAX_TIME:-}
DTYPE=${DTYPE:-float32}
RECIPE=${RECIPE:-mixed-4-6}
stage=${1:-all}
mkdir -p "$WORK"

corpus() {
  if [ ! -d /usr/share/doc/python3.11/html ] || [ ! -d /usr/share/doc/python-django-doc/html ]; then
    echo "installing the documentation packages (Debian)" >&2
    apt-get install -y python3.11-doc python-django-doc >/dev/null
  fi
  "$PYTHON" scripts/pydoc_corpus.py --out "$WORK/corpus.jsonl"
}

tokenizer() {
  if [ -n "${RETRAIN_TOKENIZER:-}" ]; then
    "$PYTHON" scripts/train_tokenizer.py "$WORK/corpus.jsonl" --vocab-size 4096 --out "$WORK/tokenizer"
  else
    mkdir -p "$WORK/tokenizer"
    cp xlstm_metal/assets/default_model/tokenizer.json xlstm_metal/assets/default_model/tokenizer_config.json \
      "$WORK/tokenizer/"
  fi
}

train() {
  rm -rf "$RUN"
  if [ -n "$MAX_TIME" ]; then length=(--max-time "$MAX_TIME"); else length=(--steps "$STEPS"); fi
  "$PYTHON" -m xlstm_metal train "$WORK/corpus.jsonl" --tokenizer "$WORK/tokenizer" \
    --config pydoc-15m --seq-len 512 --batch-size 32 "${length[@]}" \
    --lr 1.2e-3 --min-lr-ratio 0.05 --warmup 150 --weight-decay 0.1 --grad-clip 1.0 --dtype "$DTYPE" \
    --val-fraction 0.02 --eval-every 100 --eval-batches 16 --save-every 100000 --keep 1 --log-every 50 \
    --seed 0 --out "$RUN" --export "$RUN/export" --export-dtype float32 --no-progress
}

quantize() {
  "$PYTHON" -m xlstm_metal convert "$RUN/export" "$RUN/quantized" -q --q-recipe "$RECIPE" --dtype bfloat16 \
    --overwrite
}

install_model() {
  dest=xlstm_metal/assets/default_model
  mkdir -p "$dest"
  for f in config.json model.safetensors generation_config.json xlstm_mlx_lm.py; do
    cp "$RUN/quantized/$f" "$dest/$f"
  done
  # The tokenizer as the stage above gave it (train's copy drops tokenizer.json's BOS template).
  for f in tokenizer.json tokenizer_config.json; do
    cmp -s "$WORK/tokenizer/$f" "$dest/$f" || cp "$WORK/tokenizer/$f" "$dest/$f"
  done
  du -ch "$dest"/* | tail -1
}

case "$stage" in
  corpus) corpus ;;
  tokenizer) tokenizer ;;
  train) train ;;
  quantize) quantize ;;
  install) install_model ;;
  all) corpus; tokenizer; train; quantize; install_model ;;
  *) echo "unknown stage $stage (all|corpus|tokenizer|train|quantize|install)" >&2; exit 2 ;;
esac
