#!/usr/bin/env bash
# Entrypoint of both images.
#   oct-entrypoint train          phantom-or-real training, then export as $EXPORT_NAME into $OCT_MODEL_STORE (the
#                                 `train` image)
#   oct-entrypoint <command ...>  run it (the `serve` image's CMD is `python -m service`)
set -euo pipefail
# The service's default model (service/settings.py SHIPPED_MODEL), which the serve image carries.
SHIPPED_MODEL=kermany-oct

log() { echo "oct-entrypoint: $*" >&2; }

has_model() {  # <store> <name> [<version>]: the store holds a version of the model (that version, when given)
  local m v
  for m in "$1/$2"/*/manifest.json; do
    v=${m%/manifest.json}; v=${v##*/}
    [ -f "$m" ] && [[ $v =~ ^[0-9]+$ ]] && { [ -z "${3:-}" ] || [ "$v" = "$3" ]; } && return 0
  done
  return 1
}

train() {
  local data_dir=${TRAIN_DATA_DIR:-/data} runs_dir=${TRAIN_RUNS_DIR:-/runs} device=${TRAIN_DEVICE:-cuda}
  local name=${EXPORT_NAME:?set EXPORT_NAME: the name of the exported model (serve it with OCT_MODEL_NAME=<name>)}
  local store=${OCT_MODEL_STORE:?set OCT_MODEL_STORE}
  if [ "$name" = "$SHIPPED_MODEL" ]; then
    # Its versions ship in the image; one trained here under the same name and number would be another model.
    log "EXPORT_NAME=$name is the shipped model's name: give the model trained here its own (e.g. vqvae)"
    exit 2
  fi
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

# Which store the service reads: the mounted one (OCT_MODEL_STORE, the volume the train profile or Job exports into)
# when it holds the model asked for (OCT_MODEL_NAME, and OCT_MODEL_VERSION when pinned), else the image's own
# read-only store (IMAGE_MODEL_STORE: the shipped model, and anything baked in) when that does. So a trained model is
# served by setting OCT_MODEL_NAME to its name, and the shipped one again by setting it back.
name=${OCT_MODEL_NAME:-$SHIPPED_MODEL}
version=${OCT_MODEL_VERSION:-}
version=${version//[[:space:]]/}
[ "${version,,}" != latest ] || version=""  # as the service reads it: empty or latest = the highest version
if [ -n "${OCT_MODEL_STORE:-}" ] && [ -n "${IMAGE_MODEL_STORE:-}" ] \
   && ! has_model "$OCT_MODEL_STORE" "$name" "$version" && has_model "$IMAGE_MODEL_STORE" "$name" "$version"; then
  log "$OCT_MODEL_STORE holds no $name${version:+ version $version}; serving the image's $IMAGE_MODEL_STORE/$name"
  export OCT_MODEL_STORE=$IMAGE_MODEL_STORE
fi

[ $# -gt 0 ] || set -- python -m service
exec "$@"
