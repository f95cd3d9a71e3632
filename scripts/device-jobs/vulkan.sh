#!/usr/bin/env bash
# The Vulkan backend on an NVIDIA GPU (issue 17): NVIDIA's Vulkan driver through Debian's
# loader and GLVND (device-run/gl/*.deb, unpacked here: the GPU machine has neither), the
# hardware tests with `vulkan.nvidia = "vulkan"`, the sys tests on that driver, then
# host<->GPU rates of the CUDA backend and of the Vulkan backend (host import, and staging)
# and the raw baseline, in the same job.
#   KEEP_BINS="gpu_bench test-gpu-test test-memwarden_sys-lib" scripts/device-bundle
#   bash device-run/jobs/vulkan.sh
set -uo pipefail
cd "$(dirname "$0")/.."
rm -rf bin && tar -xJf bin.tar.xz  # always the carried binaries, never a warm machine's old ones
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export MEMWARDEN_SCRIPTS=$PWD/scripts RUST_BACKTRACE=1
for f in gl/*.deb; do dpkg -x "$f" /; done; ldconfig
if ! ls /usr/share/vulkan/icd.d/nvidia_icd*.json /etc/vulkan/icd.d/nvidia_icd*.json >/dev/null 2>&1; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
{
  echo "== machine"; nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version,pci.bus_id,uuid --format=csv,noheader; nproc
  ldconfig -p | grep libvulkan; echo "VK_DRIVER_FILES=${VK_DRIVER_FILES:-}"
  echo "== sys: blocks, host import and opaque-fd export on the NVIDIA driver"
  bin/test-memwarden_sys-lib vulkan --test-threads=1 --nocapture
  echo "== Vulkan hardware tests (tests/gpu/vulkan.rs, mod nvidia)"
  bin/test-gpu-test vulkan::nvidia:: --test-threads=1 --nocapture
  echo "== rates: CUDA backend (cuda:0)"
  bin/gpu_bench 1073741824
  echo "== rates: Vulkan backend (vulkan:0, host import)"
  MEMWARDEN_BENCH_DEVICE=vulkan:0 bin/gpu_bench 1073741824
  echo "== rates: Vulkan backend (vulkan:0, staging: vulkan.host_import = false)"
  MEMWARDEN_BENCH_DEVICE=vulkan:0 MEMWARDEN_BENCH_VULKAN_IMPORT=0 bin/gpu_bench 1073741824
  echo "== baseline (tools/gpu_baseline.cu)"
  nvcc -O2 -o /tmp/gpu_baseline tools/gpu_baseline.cu -lcuda -lnvidia-ml && /tmp/gpu_baseline | grep -Ei "pinned|pageable|H2D|D2H"
} 2>&1 | tee "$OUT/vulkan.txt"
