#!/usr/bin/env bash
# Analytics, recommendations and /metrics on the GPU machine: the analytics test binary, then a
# daemon with its CUDA devices scraped and checked against the status API and NVML
# (scripts/gpu/analytics_check.py, parsed with prometheus_client from device-run/pylib).
#   bash device-run/jobs/analytics.sh
set -uo pipefail
cd "$(dirname "$0")/.."
rm -rf bin && tar -xJf bin.tar.xz  # always the carried binaries, never a warm machine's old ones
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/pylib${PYTHONPATH:+:$PYTHONPATH} RUST_BACKTRACE=1
{
  echo "== machine"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  echo "== analytics tests (tests/http/analytics.rs)"
  bin/test-http-test analytics:: --test-threads=1
  echo "== daemon with CUDA: scripted workload, /metrics, analytics"
  printf '[analytics]\nfine_interval_ms = 200\n[workers]\nenabled = false\nsocket = "none"\n' > /tmp/mw-analytics.toml
  bin/memwarden serve --listen 127.0.0.1:5077 --config /tmp/mw-analytics.toml > /tmp/mw-serve.log 2>&1 &
  pid=$!
  for _ in $(seq 50); do curl -sf http://127.0.0.1:5077/health >/dev/null && break; sleep 0.2; done
  python3 scripts/gpu/analytics_check.py http://127.0.0.1:5077; echo "analytics_check exit $?"
  curl -s http://127.0.0.1:5077/metrics > "$OUT/metrics.txt"
  bin/memwarden --url http://127.0.0.1:5077 analytics --window 5m
  bin/memwarden --url http://127.0.0.1:5077 recommend
  kill $pid; wait $pid
} 2>&1 | tee "$OUT/analytics.txt"
