#!/usr/bin/env bash
# Foundation figures on the GPU machine: the raw driver baseline and memwarden's HTTP
# allocate+free pair on the same host, plus the host status against `free -b`.
set -uo pipefail
cd "$(dirname "$0")/.."
rm -rf bin && tar -xJf bin.tar.xz  # always the carried binaries, never a warm machine's old ones
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
{
  echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; uname -r
  echo "== baseline (tools/gpu_baseline.cu)"
  if [ -f tools/gpu_baseline.cu ]; then
    nvcc -O2 -o /tmp/gpu_baseline tools/gpu_baseline.cu -lcuda -lnvidia-ml && /tmp/gpu_baseline
  else echo "tools/gpu_baseline.cu not carried"; fi
  echo "== raw loopback round trip (python echo)"
  python3 - <<'PY'
import socket, time, multiprocessing
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1); port = srv.getsockname()[1]
def serve():
    c, _ = srv.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while (d := c.recv(100)): c.sendall(d)
p = multiprocessing.Process(target=serve); p.start()
s = socket.create_connection(("127.0.0.1", port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
ts = []
for i in range(20000):
    t = time.perf_counter(); s.sendall(b"x"); s.recv(10); ts.append(time.perf_counter() - t)
s.close(); p.join(); ts.sort()
print(f"loopback echo round trip p50 {ts[10000]*1e6:.1f} us")
PY
  echo "== memwarden"
  for workers in 2 1 0; do
    printf 'worker_threads = %s\n' "$workers" > /tmp/mw.toml
    bin/memwarden serve --listen 127.0.0.1:0 --config /tmp/mw.toml > /tmp/mw.out 2>/tmp/mw.err &
    pid=$!
    for _ in $(seq 50); do grep -q listening /tmp/mw.out && break; sleep 0.1; done
    url=$(sed -n 's/^memwarden listening on //p' /tmp/mw.out)
    if [ "$workers" = 2 ]; then
      bin/memwarden --url "$url" status
      bin/memwarden --url "$url" --json status cpu
      free -b
    fi
    echo "-- worker_threads = $workers"
    bin/http_load "$url" 20000 1 65536
    bin/http_load "$url" 20000 1 65536
    bin/http_load "$url" 20000 4 65536
    kill $pid; wait $pid 2>/dev/null
  done
} 2>&1 | tee "$OUT/foundation.txt"
