#!/usr/bin/env bash
# Entrypoint of both images.
#   oct-entrypoint train          phantom-or-real training, then export into $OCT_MODEL_STORE (the `train` image)
#   oct-entrypoint <command ...>  run it (the `serve` image's CMD is `python -m service`)
set -euo pipefail

log() { echo "oct-entrypoint: $*" >&2; }

has_model() {  # any <store>/<name>/<version>/manifest.json
  [ -d "$1" ] && [ -n "$(find "$1" -mindepth 3 -maxdepth 3 -name manifest.json -print -quit 2>/dev/null)" ]
}

train() {
  local data_dir=${TRAIN_DATA_DIR:-/data} runs_dir=${TRAIN_RUNS_DIR:-/runs} device=${TRAIN_DEVICE:-cuda}
  local name=${OCT_MODEL_NAME:?set OCT_MODEL_NAME: the model name the service will load}
  local store=${OCT_MODEL_STORE:?set OCT_MODEL_STORE}
  local data=$data_dir
  if [ -z "$(ls -A "$data_dir" 2>/dev/null)" ]; then
    # No dataset mounted: a synthetic one proves the whole pipeline end to end on any host.
    data=$runs_dir/phantom
    log "no dataset in $data_dir; generating a phantom dataset in $data"
    # shellcheck disable=SC2086  # PHANTOM_ARGS is a list of CLI flags
    python -m training.phantom "$data" ${PHANTOM_ARGS:-}
  else
    log "training on the dataset mounted at $data_dir"
  fi
  local out=$runs_dir/train
  mkdir -p "$out"
  local before
  before=$(ls -1 "$out")
  # shellcheck disable=SC2086  # TRAIN_ARGS is a list of CLI flags
  python -m training.train --data_root "$data" --output_dir "$out" --device "$device" ${TRAIN_ARGS:-}
  local run="" d
  for d in "$out"/*/; do  # the run this command created is the folder that was not there before
    d=${d%/}
    if [ -d "$d" ] && ! grep -qxF "${d##*/}" <<<"$before"; then run=$d; fi
  done
  [ -n "$run" ] || { log "training.train created no run folder under $out"; exit 1; }
  local ckpt
  ckpt=$(find "$run" -maxdepth 1 -name 'best-*.ckpt' -print -quit)
  [ -n "$ckpt" ] || { log "no best-*.ckpt in $run"; exit 1; }
  log "exporting $ckpt as $name into $store"
  # shellcheck disable=SC2086  # EXPORT_ARGS is a list of CLI flags
  python -m training.export --model_dir "$ckpt" --model_store "$store" --name "$name" --data_root "$data" \
    --device "$device" ${EXPORT_VERSION:+--version "$EXPORT_VERSION"} ${EXPORT_ARGS:-}
}

if [ "${1:-}" = "train" ]; then
  shift
  [ $# -eq 0 ] || { log "train takes no arguments; use TRAIN_ARGS / PHANTOM_ARGS / EXPORT_ARGS"; exit 2; }
  train
  exit 0
fi

# A baked-in model (build arg BAKED_MODEL_DIR) is served only while the mounted store holds none, so a volume
# filled by the train profile or by hand always wins.
if [ -n "${OCT_MODEL_STORE:-}" ] && [ -n "${BAKED_MODEL_STORE:-}" ] \
   && ! has_model "$OCT_MODEL_STORE" && has_model "$BAKED_MODEL_STORE"; then
  log "no model in $OCT_MODEL_STORE; serving the baked-in store $BAKED_MODEL_STORE"
  export OCT_MODEL_STORE=$BAKED_MODEL_STORE
fi

[ $# -gt 0 ] || set -- python -m service
exec "$@"
