#!/usr/bin/env bash
# What the pressure sampler costs: the daemon's CPU time over 10 idle seconds with the sampler
# off, on (default intervals), and on without CUDA; then the Rust-API allocation pair again.
set -uo pipefail
cd "$(dirname "$0")/.."
rm -rf bin && tar -xJf bin.tar.xz  # always the carried binaries, never a warm machine's old ones
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name --format=csv,noheader
  tck=$(getconf CLK_TCK)
  for cfg in "pressure.enabled=false" "default" "cuda.enabled=false"; do
    case $cfg in
      pressure.enabled=false) printf '[pressure]\nenabled = false\n' > /tmp/s.toml ;;
      cuda.enabled=false) printf '[cuda]\nenabled = false\n' > /tmp/s.toml ;;
      *) : > /tmp/s.toml ;;
    esac
    bin/memwarden serve --listen 127.0.0.1:0 --config /tmp/s.toml > /dev/null 2>&1 &
    pid=$!; sleep 2
    a=$(awk '{print $14+$15}' /proc/$pid/stat); sleep 10; b=$(awk '{print $14+$15}' /proc/$pid/stat)
    echo "$cfg: $(( (b-a) * 1000 / tck )) ms of CPU in 10 s = $(awk "BEGIN{print ($b-$a)/$tck/10*100}")% of one core"
    kill $pid; wait $pid 2>/dev/null
  done
  bin/gpu_bench $((1<<20))
} 2>&1 | tee "$OUT/sampler.txt"
