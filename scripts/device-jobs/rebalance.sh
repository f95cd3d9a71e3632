#!/usr/bin/env bash
# Two GPUs of one kind (kind nvidia-h100-x2): the rebalanceModels recommendation and the model
# move it applies, with a real torch model, checked against NVML (scripts/gpu/rebalance_check.py).
#   bash device-run/jobs/rebalance.sh
set -uo pipefail
cd "$(dirname "$0")/.."
rm -rf bin && tar -xJf bin.tar.xz  # always the carried binaries, never a warm machine's old ones
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/pylib${PYTHONPATH:+:$PYTHONPATH} RUST_BACKTRACE=1
{
  echo "== machine"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  printf '[analytics]\nfine_interval_ms = 200\n[optimizer]\nwatchdog = false\n[workers]\nsocket = "none"\n' > /tmp/mw-rebalance.toml
  bin/memwarden serve --listen 127.0.0.1:5079 --config /tmp/mw-rebalance.toml > /tmp/mw-rebalance.log 2>&1 &
  pid=$!
  for _ in $(seq 100); do curl -sf http://127.0.0.1:5079/health >/dev/null && break; sleep 0.2; done
  python3 scripts/gpu/rebalance_check.py http://127.0.0.1:5079 "$PWD/scripts" /tmp/mw-rebalance-models
  echo "rebalance_check exit $?"
  bin/memwarden --url http://127.0.0.1:5079 models
  curl -s http://127.0.0.1:5079/metrics | grep -E "^memwarden_(model|device_used|device_models)" 
  kill $pid; wait $pid
  tail -5 /tmp/mw-rebalance.log
} 2>&1 | tee "$OUT/rebalance.txt"
