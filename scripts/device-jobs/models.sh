#!/usr/bin/env bash
# Model memory on the GPU machine: a torch worker loading real models onto cuda:0 through the
# daemon (reports vs torch vs NVML), then the protocol round-trip benchmark.
#   bash device-run/jobs/models.sh
set -uo pipefail
cd "$(dirname "$0")/.."
rm -rf bin && tar -xJf bin.tar.xz  # always the carried binaries, never a warm machine's old ones
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export MEMWARDEN_SCRIPTS=$PWD/scripts RUST_BACKTRACE=1
{
  echo "== machine"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; nproc
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
  python3 -c "import importlib.util as u; print({m: bool(u.find_spec(m)) for m in ('numpy','safetensors','transformers','torchvision','timm')})"
  echo "== model hardware test (tests/gpu/gpu_models.rs)"
  bin/test-gpu-test gpu_models:: --test-threads=1 --nocapture
  echo "== protocol round trip (examples/protocol_bench)"
  bin/protocol_bench 20000
  bin/protocol_bench 20000
} 2>&1 | tee "$OUT/models.txt"
