#!/usr/bin/env bash
# Rebuilds the default model shipped in xlstm_metal/assets/default_model/, end to end, offline:
#   1. corpus:    Debian's python3.11-doc (PSF License) + python-django-doc (BSD-3-Clause) HTML -> text
#   2. tokenizer: byte-level BPE, 4096 tokens, trained on that corpus
#   3. model:     `xlstm-metal train` (preset pydoc-4m), best-validation weights exported in bfloat16
#   4. install:   copy the export into xlstm_metal/assets/default_model/
#
# Usage: bash scripts/build_default_model.sh [all|corpus|tokenizer|train|install]
# Environment: WORK (default .train_data), RUN (default $WORK/run), STEPS (default 2600, the
# shipped run), MAX_TIME (seconds: size the run from measured speed instead of STEPS),
# DTYPE (default float32), PYTHON (default python3).
# The shipped model was trained on an NVIDIA H100 (MLX 0.32.4 CUDA build) with these defaults
# (see MODEL_CARD.md); on a CPU the same command runs, far slower.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORK=${WORK:-.train_data}
RUN=${RUN:-$WORK/run}
STEPS=${STEPS:-2600}
MAX_TIME=${MAX_TIME:-}
DTYPE=${DTYPE:-float32}
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
  "$PYTHON" scripts/train_tokenizer.py "$WORK/corpus.jsonl" --vocab-size 4096 --out "$WORK/tokenizer"
}

train() {
  rm -rf "$RUN"
  if [ -n "$MAX_TIME" ]; then length=(--max-time "$MAX_TIME"); else length=(--steps "$STEPS"); fi
  "$PYTHON" -m xlstm_metal train "$WORK/corpus.jsonl" --tokenizer "$WORK/tokenizer" \
    --config pydoc-4m --seq-len 512 --batch-size 32 "${length[@]}" \
    --lr 2e-3 --min-lr-ratio 0.05 --warmup 200 --weight-decay 0.1 --grad-clip 1.0 --dtype "$DTYPE" \
    --val-fraction 0.02 --eval-every 200 --eval-batches 16 --save-every 100000 --keep 1 --log-every 25 \
    --seed 0 --out "$RUN" --export "$RUN/export" --export-dtype bfloat16 --no-progress
}

install_model() {
  dest=xlstm_metal/assets/default_model
  mkdir -p "$dest"
  for f in config.json model.safetensors tokenizer.json tokenizer_config.json generation_config.json; do
    cp "$RUN/export/$f" "$dest/$f"
  done
  du -ch "$dest"/* | tail -1
}

case "$stage" in
  corpus) corpus ;;
  tokenizer) tokenizer ;;
  train) train ;;
  install) install_model ;;
  all) corpus; tokenizer; train; install_model ;;
  *) echo "unknown stage $stage (all|corpus|tokenizer|train|install)" >&2; exit 2 ;;
esac
