#!/usr/bin/env bash
# Defragmentation on the GPU machine: the hardware tests (conformance with queued moves, the
# fragmented-pool scenario), then move throughput against the raw copy rate, with the driver
# baseline in the same job.
set -uo pipefail
cd "$(dirname "$0")/.."
rm -rf bin && tar -xJf bin.tar.xz  # always the carried binaries, never a warm machine's old ones
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export MEMWARDEN_SCRIPTS=$PWD/scripts RUST_BACKTRACE=1
{
  echo "== machine"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  echo "== hardware tests"
  bin/test-memwarden_testkit-lib conformance --test-threads=1
  bin/test-gpu-test gpu:: --test-threads=1 --skip multi_gpu
  bin/test-http-test defrag:: --test-threads=2
  echo "== baseline (tools/gpu_baseline.cu)"
  nvcc -O2 -o /tmp/gpu_baseline tools/gpu_baseline.cu -lcuda -lnvidia-ml && /tmp/gpu_baseline
  echo "== defragmentation throughput (examples/defrag_bench)"
  bin/defrag_bench cuda:0 $((8<<30)) $((256<<20))
  bin/defrag_bench cuda:0 $((1<<30)) $((64<<20))
  bin/defrag_bench cpu $((1<<30)) $((64<<20))
  bin/defrag_bench cpu $((4<<30)) $((256<<20))
  echo "== service pair (examples/gpu_bench, to 1 GiB)"
  bin/gpu_bench $((1<<30))
} 2>&1 | tee "$OUT/defrag.txt"
