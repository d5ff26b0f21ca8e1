#!/usr/bin/env bash
# The GPU numbers in one run: img/s with p50/p99 at 256² with heatmaps (bench_service.py --device cuda),
# the CPU cost per request with a null scorer, and scaling over worker processes. Writes bench/results/gpu-<date>.txt.
#
#   bash scripts/gpu_bench.sh model_store/vqvae/1 [WORKERS]     # a 256² export (the CLI defaults); WORKERS default 4
#
# Needs CUDA, the project's .venv and ~10 minutes. Nothing is asserted: copy the tables into the README.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: scripts/gpu_bench.sh <model version dir> [workers]}
WORKERS=${2:-4}
PY=${PY:-.venv/bin/python}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: this script records GPU numbers")'
SIZE=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1] + "/manifest.json"))["input"]["size"])' "$MODEL")
[ "$SIZE" = 256 ] || echo "note: $MODEL is ${SIZE}², the README's GPU table is stated at 256²"
mkdir -p bench/results
OUT=bench/results/gpu-$(date -u +%Y%m%d-%H%M).txt
{
  echo "# $(date -u +%FT%TZ)  $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
  echo "# $(nproc) CPUs, $("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"
  for W in 1 "$WORKERS"; do
    for P in fp32 bf16; do
      echo; echo "## bench_service.py --device cuda --workers $W --precision $P (heatmaps on and off)"
      "$PY" bench/bench_service.py --model_dir "$MODEL" --device cuda --workers "$W" --precision "$P" \
        --concurrency 1,32,128 --duration 10 --max_batch_size 32 --max_batch_delay_ms 5 --skip "$([ "$W$P" = 1fp32 ] || echo a,d)"
    done
  done
  echo; echo "## bench_overhead.py --device cuda --workers 1,2,$WORKERS (null scorer: the CPU side alone)"
  "$PY" bench/bench_overhead.py --model_dir "$MODEL" --device cuda --workers "1,2,$WORKERS" --concurrency 32
} 2>&1 | tee "$OUT"
echo "written: $OUT"
