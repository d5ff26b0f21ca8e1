#!/usr/bin/env bash
# The shipped real model, no training: set up .venv (idempotent: seconds once it exists), then serve the newest
# version of model_store/kermany-oct on http://127.0.0.1:$OCT_PORT and score one real CNV B-scan once it is ready.
# Loopback only, so no API key is needed; Ctrl-C stops it. Options (environment):
#   OCT_PORT (8000)   service port
#   SAMPLE            the scan scored once ready (default: a real CNV B-scan in samples/kermany); empty = none
#   OCT_MODEL_STORE, OCT_MODEL_NAME, OCT_MODEL_VERSION, …   any other setting of docs/service.md
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PORT=${OCT_PORT:-8000}
SAMPLE=${SAMPLE-samples/kermany/CNV/CNV-1188386-2.jpeg}
URL=http://127.0.0.1:$PORT
echo "serve: ${OCT_MODEL_NAME:-the shipped model} on $URL (viewer at /, API at /docs; Ctrl-C stops it)"
if [ -n "$SAMPLE" ]; then
  (
    for _ in $(seq 1 180); do
      if curl -sf "$URL/readyz" >/dev/null 2>&1; then
        echo "serve: ready; scoring $SAMPLE:"
        answer=$(curl -s -F "file=@$SAMPLE" "$URL/score?heatmaps=false")
        echo "$answer"  # one write: the service's log lines share this terminal
        exit 0
      fi
      sleep 1
    done
    echo "serve: the service did not become ready within 180 s" >&2
  ) &
fi
OCT_HOST=127.0.0.1 OCT_PORT="$PORT" exec .venv/bin/python -m service
