#!/usr/bin/env bash
# The whole pipeline on the embedded phantom data, for learning it and for CI (the README's first command serves the
# shipped real model instead, scripts/serve.sh):
#   set up .venv → phantom OCT2017 → train a small VQ-VAE and its latent prior → evaluate → export → serve.
# Every step is a plain CLI you can rerun on the real dataset (see README). Options (environment):
#   DEMO_DIR (default: demo)   where data and runs go      OCT_PORT (8000)  service port
#   DEMO_EPOCHS (30)           VQ-VAE epochs                DEMO_SERVE (1)   0 = stop after export
#   DEMO_PRIOR_EPOCHS (4)      prior epochs (0 = no prior, no NLL score)
#   DEMO_NAME (phantom)        the model's name in OCT_MODEL_STORE (default model_store), its own: never the shipped
#                              model's
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
DIR=${DEMO_DIR:-demo}
EPOCHS=${DEMO_EPOCHS:-30}
PRIOR_EPOCHS=${DEMO_PRIOR_EPOCHS:-4}
STORE=${OCT_MODEL_STORE:-model_store}
NAME=${DEMO_NAME:-phantom}

if [ ! -d "$DIR/data/OCT2017" ]; then
  echo "== 1/6 phantom data → $DIR/data"
  # Raised malloc thresholds: the renderer's image-sized temporaries reuse the heap instead of fresh mmaps, ~20 % less
  # CPU (as in the images, Dockerfile.gpu).
  GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456} \
    $PY -m training.phantom "$DIR/data" --train-normal 600 --test-per-class 40 --seed 0
fi
echo "== 2/6 VQ-VAE training (image_size 128, $EPOCHS epochs, CPU or GPU)"
$PY -m training.train --data_root "$DIR/data" --output_dir "$DIR/runs" --image_size 128 --epochs "$EPOCHS" \
  --batch_size 32 --n_hiddens 64 --n_residual_hiddens 32 --n_residual_layers 2 --embedding_dim 32 \
  --n_embeddings 64 --learning_rate 2e-3 --num_workers 2
RUN=$(ls -d "$DIR"/runs/*/ | sort | tail -1)
CKPT=$(ls "$RUN"best-*.ckpt | head -1)
if [ "$PRIOR_EPOCHS" -gt 0 ]; then
  echo "== 3/6 latent prior (gated PixelCNN, 8 layers x 32 channels, $PRIOR_EPOCHS epochs)"
  $PY -m training.train_prior --model_dir "$CKPT" --epochs "$PRIOR_EPOCHS" --n_layers 8 --n_channels 32 \
    --batch_size 8 --learning_rate 2e-3
fi
echo "== 4/6 evaluation on the phantom test split"
$PY -m training.inference --model_dir "$CKPT"
echo "== 5/6 export → $STORE/$NAME/<next version>"
$PY -m training.export --model_dir "$CKPT" --model_store "$STORE" --name "$NAME"
[ "${DEMO_SERVE:-1}" = 1 ] || exit 0

echo "== 6/6 service, scoring a phantom CNV scan once it is ready"
SAMPLE=$(ls "$DIR"/data/OCT2017/test/CNV/*.jpeg | head -1) OCT_MODEL_STORE="$STORE" OCT_MODEL_NAME="$NAME" \
  exec bash scripts/serve.sh
