#!/usr/bin/env bash
# Issue 15 and 16 on the GPU machine: the GPU tests (defragmentation moves on cuda:0 after the
# batch rework), a defragmentation pass's stall on another device before/after (defrag_stall,
# the old build carried as defrag_stall.old via EXTRA_BINS), the read routes at 100,000 live
# allocations (scale_bench), memory a client allocates on cuda:0 over its connection and gets
# back when killed, and `memwarden status`/`ps` with a process holding GPU memory.
#   EXTRA_BINS=/tmp/defrag_stall.old KEEP_BINS="memwarden defrag_stall defrag_stall.old scale_bench \
#     test-gpu-test test-faults-test" scripts/device-bundle
#   then on the GPU machine: bash device-run/jobs/contract.sh
set -uo pipefail
cd "$(dirname "$0")/.."
rm -rf bin && tar -xJf bin.tar.xz
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/pylib${PYTHONPATH:+:$PYTHONPATH} RUST_BACKTRACE=1 MEMWARDEN_SCRIPTS=$PWD/scripts MEMWARDEN_PY=$PWD/python
{
  echo "== machine"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; nproc
  echo "== GPU tests (tests/gpu/gpu.rs; the two-GPU test needs the two-GPU kind)"
  bin/test-gpu-test gpu:: --test-threads=1 --skip multi_gpu 2>&1 | grep -E "^test |test result|panicked"
  echo "== defragmentation under concurrent requests (tests/faults/defrag_concurrency.rs, 16 cores)"
  bin/test-faults-test defrag_concurrency:: 2>&1 | tail -8
  echo "== defrag_stall: old build, then new (cuda:0, 4096 MiB fragmented per pass)"
  for b in defrag_stall.old defrag_stall defrag_stall.old defrag_stall; do echo "-- $b"; bin/$b 5 4096; done
  echo "== scale_bench"
  bin/scale_bench 1000 10000 100000
  echo "== daemon with CUDA: a client's cuda:0 memory, status and ps with a torch process"
  printf '[workers]\nenabled = false\nsocket = "/tmp/mw-contract.sock"\n' > /tmp/mw-contract.toml
  bin/memwarden serve --listen 127.0.0.1:5079 --config /tmp/mw-contract.toml > /tmp/mw-contract.log 2>&1 &
  pid=$!
  for _ in $(seq 100); do curl -sf http://127.0.0.1:5079/health >/dev/null && break; sleep 0.2; done
  python3 -c "
import time, torch
x = torch.empty(2 << 30, dtype=torch.uint8, device='cuda:0')
print('torch holds 2 GiB on cuda:0', flush=True)
time.sleep(40)" &
  torch_pid=$!
  sleep 8
  M="bin/memwarden --url http://127.0.0.1:5079"
  $M status
  $M --json status | python3 -c "
import json, sys
d = json.load(sys.stdin)
print(json.dumps(d, indent=1)[:3000])"
  $M ps
  echo "-- a client allocates 1 GiB of device memory on cuda:0 over its socket, then is killed"
  coproc CLIENT { python3 helpers/client_memory.py /tmp/mw-contract.sock gpu-client; }
  read -r ready <&"${CLIENT[0]}"; echo "client: $ready"
  echo '{"op": "allocate", "size_bytes": 1073741824, "device": "cuda:0", "memory_type": "device"}' >&"${CLIENT[1]}"
  read -r alloc <&"${CLIENT[0]}"; echo "allocated: ${alloc:0:300}"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader
  $M allocations
  kill -9 "$CLIENT_PID"; t0=$(date +%s%N)
  for _ in $(seq 100); do
    n=$(curl -s http://127.0.0.1:5079/api/memory/allocations | python3 -c "import json,sys; print(json.load(sys.stdin)['data']['count'])")
    [ "$n" = 0 ] && break; sleep 0.01
  done
  echo "live allocations after SIGKILL: $n, after $(( ($(date +%s%N) - t0) / 1000000 )) ms (includes the polling)"
  curl -s 'http://127.0.0.1:5079/api/memory/analytics/events?limit=5' | python3 -c "
import json, sys
for e in json.load(sys.stdin)['data']['events']: print(e.get('event'), e.get('deviceId'), e.get('sizeBytes'))"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader
  kill $torch_pid 2>/dev/null; kill $pid; wait $pid
  tail -5 /tmp/mw-contract.log
} 2>&1 | tee "$OUT/contract.txt"
