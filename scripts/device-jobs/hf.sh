#!/usr/bin/env bash
# Issue 24's GPU proof: Hugging Face checkpoints held by memwarden and used by transformers
# (scripts/check-hf.py's docstring has the plan). A daemon with the default config (no workers),
# then check-hf.py on cuda:0: a small Llama sharded by transformers (tokens and logits against
# transformers' own from_pretrained, a second process's attach, parks over HTTP while generate()
# runs in a loop), a larger one for the load rates (transformers, safetensors.load_file and
# memwarden side by side), and the pinned-copy baseline in the same job.
#   DIFFUSERS=1 scripts/device-bundle     (KEEP_BINS="memwarden" is enough; DIFFUSERS=1 carries
#                                          diffusers for the pipeline check)
#   device run, carry ["device-run"], command "bash device-run/jobs/hf.sh"
set -uo pipefail
cd "$(dirname "$0")/.."
rm -rf bin && tar -xJf bin.tar.xz
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/python MEMWARDEN_PY=$PWD/python
rc=0
{
  echo "== machine"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  d=$(mktemp -d); sock=$d/mw.sock
  printf 'listen = "127.0.0.1:5078"\n[workers]\nenabled = false\nsocket = "%s"\n' "$sock" > $d/config.toml
  bin/memwarden serve --config $d/config.toml > $d/daemon.log 2>&1 &
  daemon=$!
  for i in $(seq 50); do [ -S $sock ] && break; sleep 0.2; done
  common=(--device cuda:0 --socket "$sock" --http http://127.0.0.1:5078)
  echo "== small Llama, bf16, tied, >= 4 shards: equality, second process, parks during generate()"
  python3 scripts/check-hf.py "${common[@]}" --hidden 1024 --layers 8 --vocab 32000 --shard-size 50MB \
    --dtype bfloat16 --park-loop 20 --second-process --dir $d/small || rc=1
  echo "== same, float16, untied"
  python3 scripts/check-hf.py "${common[@]}" --hidden 512 --layers 4 --vocab 32000 --shard-size 20MB \
    --dtype float16 --untied --dir $d/untied || rc=1
  echo "== load rates: a larger checkpoint (bf16, about 4.3 GB, 3 shards)"
  python3 scripts/check-hf.py "${common[@]}" --hidden 4096 --layers 12 --vocab 32000 --shard-size 2GB \
    --dtype bfloat16 --new-tokens 5 --dir $d/large || rc=1
  echo "== a diffusers pipeline (LDMPipeline: VQModel + UNet2DModel), held per component, parked per component and as a group"
  if [ -d wheels ]; then
    mkdir -p $d/pylib-diffusers && for w in wheels/*.whl; do python3 -m zipfile -e "$w" $d/pylib-diffusers; done
    PYTHONPATH=$PYTHONPATH:$d/pylib-diffusers python3 scripts/check-hf-pipeline.py "${common[@]}" --dir $d/tiny-ldm || rc=1
    PYTHONPATH=$PYTHONPATH:$d/pylib-diffusers python3 scripts/check-hf-pipeline.py "${common[@]}" --dtype float16 \
      --dir $d/tiny-ldm-fp16 || rc=1
  else
    echo "no wheels/ (bundle with DIFFUSERS=1): pipeline not checked"
  fi
  kill $daemon; wait $daemon 2>/dev/null
  grep -iE "error|warn" $d/daemon.log | tail -20
  cp $d/daemon.log "$OUT/daemon.log"
  if [ -f tools/gpu_peers.py ]; then echo "== baselines (../shared/tools)"; python3 tools/gpu_peers.py || true; fi
  echo "== rc $rc"
  exit $rc
} 2>&1 | tee "$OUT/hf.txt"
exit "${PIPESTATUS[0]}"
