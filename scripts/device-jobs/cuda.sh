#!/usr/bin/env bash
# The CUDA backend on the GPU machine: hardware tests, then benchmarks beside the baselines.
#   bash device-run/jobs/cuda.sh [multi]     # "multi": the 2-GPU run (peer tests and copies)
set -uo pipefail
cd "$(dirname "$0")/.."
rm -rf bin && tar -xJf bin.tar.xz  # always the carried binaries, never a warm machine's old ones
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export MEMWARDEN_SCRIPTS=$PWD/scripts RUST_BACKTRACE=1
mode=${1:-single}
{
  echo "== machine"; nvidia-smi --query-gpu=index,name,memory.total,driver_version,pci.bus_id --format=csv,noheader; nproc
  nvidia-smi topo -m 2>/dev/null | head -5
  echo "== hardware tests"
  bin/test-memwarden_testkit-lib conformance --test-threads=1
  if [ "$mode" = multi ]; then
    bin/test-gpu-test gpu:: --test-threads=1
  else
    bin/test-gpu-test gpu:: --test-threads=1 --skip multi_gpu
  fi
  bin/test-http-test transfer:: --test-threads=2
  bin/test-http-test http:: --test-threads=2
  bin/test-http-test defrag:: --test-threads=2
  bin/test-http-test pressure::
  echo "== baseline (tools/gpu_baseline.cu, tools/gpu_peers.py)"
  nvcc -O2 -o /tmp/gpu_baseline tools/gpu_baseline.cu -lcuda -lnvidia-ml && /tmp/gpu_baseline
  python3 tools/gpu_peers.py
  echo "clocksource: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
  if [ "$mode" = multi ]; then
    echo "== peer baseline (torch copy_ between GPUs, 1 GiB)"
    python3 - <<'PY'
import torch
n = 1 << 30
a = torch.empty(n, dtype=torch.uint8, device="cuda:0"); b = torch.empty(n, dtype=torch.uint8, device="cuda:1")
print("torch can_device_access_peer(0,1):", torch.cuda.can_device_access_peer(0, 1))
for src, dst, name in ((a, b, "cuda:0 -> cuda:1"), (b, a, "cuda:1 -> cuda:0")):
    for _ in range(3): dst.copy_(src)
    torch.cuda.synchronize(0); torch.cuda.synchronize(1)
    times = []
    for _ in range(10):
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record(torch.cuda.current_stream(src.device)); dst.copy_(src); e.record(torch.cuda.current_stream(src.device))
        torch.cuda.synchronize(0); torch.cuda.synchronize(1); times.append(s.elapsed_time(e) / 1e3)
    times.sort(); print(f"torch peer copy {name} 1 GiB: median {n / times[5] / 1e9:.1f} GB/s")
PY
  fi
  echo "== memwarden Rust API (examples/gpu_bench)"
  if [ "$mode" = multi ]; then bin/gpu_bench $((1<<30)); else bin/gpu_bench; fi
  echo "== defragmentation throughput (examples/defrag_bench)"
  bin/defrag_bench cuda:0 $((8<<30)) $((256<<20))
  bin/defrag_bench cuda:0 $((1<<30)) $((64<<20))
  bin/defrag_bench cpu $((1<<30)) $((64<<20))
  echo "== pressure detection latency and sampler CPU (scripts/pressure_latency.py)"
  python3 scripts/pressure_latency.py bin/memwarden cuda:0 10
  python3 scripts/pressure_latency.py bin/memwarden cpu 5
  echo "== memwarden HTTP (examples/http_load)"
  for workers in 2 1; do
    printf 'worker_threads = %s\n' "$workers" > /tmp/mw.toml
    bin/memwarden serve --listen 127.0.0.1:0 --config /tmp/mw.toml > /tmp/mw.out 2>/tmp/mw.err &
    pid=$!
    for _ in $(seq 100); do grep -q listening /tmp/mw.out && break; sleep 0.1; done
    url=$(sed -n 's/^memwarden listening on //p' /tmp/mw.out)
    if [ "$workers" = 2 ]; then
      bin/memwarden --url "$url" status
      bin/memwarden --url "$url" pressure
      bin/memwarden --url "$url" --json pressure cpu | grep -E "psiTrigger|psiSome"
      nvidia-smi --query-gpu=memory.total,memory.used,memory.free --format=csv,nounits
    fi
    echo "-- worker_threads = $workers"
    bin/http_load "$url" 20000 1 1048576 cuda:0
    bin/http_load "$url" 20000 1 65536 cpu
    kill $pid; wait $pid 2>/dev/null
  done
} 2>&1 | tee "$OUT/cuda-$mode.txt"
