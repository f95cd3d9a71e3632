#!/usr/bin/env python3
"""memwarden.hf against transformers' own from_pretrained, on a running daemon.

    scripts/check-hf.py --device cpu                       # here: cpu-held weights (/dev/shm)
    scripts/check-hf.py --device cuda:0 --http http://127.0.0.1:5000 --park-loop 20 --second-process

Needs torch, transformers and safetensors, and a daemon (``memwarden serve``; the socket from
``--socket``, else ``$MEMWARDEN_SOCKET``, else the daemon's default). It writes a tiny Llama
causal LM with transformers' own ``save_pretrained(max_shard_size=...)`` (at least 4 shards at the defaults,
``--dtype`` float32/bfloat16/float16, tied embeddings unless ``--untied``), loads it with
``AutoModelForCausalLM.from_pretrained`` and with ``memwarden.hf.from_pretrained`` and prints,
as one JSON line at the end (``"ok": true`` when every check held):

- ``load_s``: transformers' from_pretrained (to the device) vs memwarden.hf.from_pretrained (the
  daemon reads the shards, this process maps them and builds the model); ``safetensors_s``:
  ``safetensors.torch.load_file`` of every shard to the device;
- ``logits_equal`` (bit-identical, ``torch.equal``) and ``tokens_equal`` (greedy ``generate()``,
  ``--new-tokens``);
- ``mapped``: every parameter lies in the held mapping (no copy), ``tied``: ``lm_head.weight``
  is the embedding's tensor, ``dtype`` kept;
- ``--second-process``: another process's ``from_pretrained`` of the folder (shares the held
  copy): its load time and, on cuda, the GPU memory growth across the attach (nvidia-smi);
- ``--park-loop N`` (cuda only, needs ``--http``): ``generate()`` runs N times in a thread while
  the main thread parks the model over HTTP between calls (``POST /api/memory/models/{id}/park``):
  every call's tokens equal the reference, parks wait for the call in flight (auto_use), the
  next call resumes.

GPU test plan (issue 24, "Proof"; run on the GPU machine, torch and transformers there, in one job):

1. ``memwarden serve`` with a config whose ``[workers] enabled = false`` (no worker needed: the
   socket stays), then ``scripts/check-hf.py --device cuda:0 --http http://127.0.0.1:5000
   --hidden 1024 --layers 8 --shard-size 50MB --dtype bfloat16 --park-loop 20 --second-process``:
   tokens identical and logits bit-identical; load times of transformers, safetensors.load_file
   and memwarden side by side (goal: memwarden ≥ 5× transformers; compare with the page-cache →
   pinned rate the daemon logs for the load, goal ≥ 90 %); the second process's attach ≤ 100 ms
   with nvidia-smi growth < 5 % of the model; the park loop: no crash, no wrong token, each park
   answered after the call in flight ended (``unmapHolders`` in its ``phasesMs``), the next call
   resumes.
2. The same with ``--untied`` and ``--dtype float16`` (no tie; another dtype).
3. A diffusers pipeline if diffusers can be carried (pure-Python wheel): ``memwarden.hf.pipeline``
   of a tiny pipeline saved by diffusers' own ``save_pretrained``; one step compared with
   diffusers' own from_pretrained. Otherwise say so (the CI fixtures test the folder's layout).
4. Record the figures in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "python"))


def make_checkpoint(folder: str, args: argparse.Namespace) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.hidden * 2, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=args.vocab, max_position_embeddings=256,
        tie_word_embeddings=not args.untied,
    )
    model = LlamaForCausalLM(cfg).to(getattr(torch, args.dtype))
    model.generation_config = GenerationConfig(do_sample=False, max_new_tokens=args.new_tokens)
    model.save_pretrained(folder, max_shard_size=args.shard_size, safe_serialization=True)


def pinned_read_gbps(shards: list) -> float:
    """The rate at which this host reads `shards` from the page cache into pinned memory: 8 MiB
    chunks of every shard by a pool of threads (as many as the daemon's loader uses at most),
    into one page-locked buffer allocated beforehand. The bar for memwarden's load rate."""
    import concurrent.futures

    import torch

    sizes = [os.path.getsize(s) for s in shards]
    buf = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    mv = memoryview(buf.numpy())
    fds = [os.open(s, os.O_RDONLY) for s in shards]
    chunk, jobs, at = 8 << 20, [], 0
    for fd, n in zip(fds, sizes):
        jobs += [(fd, o, min(chunk, n - o), at + o) for o in range(0, n, chunk)]
        at += n

    def read(job):
        fd, o, n, to = job
        assert os.preadv(fd, [mv[to:to + n]], o) == n

    try:
        with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as ex:
            t = time.perf_counter()
            list(ex.map(read, jobs))
            return sum(sizes) / (time.perf_counter() - t) / 1e9
    finally:
        for fd in fds:
            os.close(fd)


def gpu_used_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def second_process(folder: str, device: str, socket: str | None) -> dict:
    code = (
        "import sys, time, json; sys.path.insert(0, %r)\n"
        "import memwarden.client, memwarden.hf, torch, transformers\n"
        "f, dev = %r, %r\n"
        "cfg = transformers.AutoConfig.from_pretrained(f); memwarden.hf.resolve_class(transformers, cfg)  # imports\n"
        "c = memwarden.client.connect(%r, name='check-hf-2')\n"
        "t0 = time.perf_counter(); w = c.load_weights(f, device=dev)\n"
        "t1 = time.perf_counter(); m = memwarden.hf.from_pretrained(f, device=dev, client=c)\n"
        "t2 = time.perf_counter()\n"
        "print(json.dumps({'attach_s': t2 - t0, 'map_s': t1 - t0, 'build_s': t2 - t1, 'shared': w.shared}), flush=True)\n"
        "sys.stdin.readline()\n"
    ) % (os.path.join(REPO, "python"), folder, device, socket)
    before = gpu_used_mib() if device.startswith("cuda") else None
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    out = json.loads(line) if line else {"error": "the second process died"}
    if before is not None:
        out["gpu_growth_mib"] = gpu_used_mib() - before  # includes its CUDA context
    p.stdin.write("\n")
    p.stdin.close()
    p.wait(30)
    return out


def park_loop(model, ref_tokens, inputs, http: str, n: int) -> dict:
    """generate() n times in a thread while the main thread parks the model over HTTP."""
    import torch

    model_id = model.memwarden_weights.model_id
    errors, wrong, parks = [], 0, []
    done = threading.Event()

    def work():
        nonlocal wrong
        try:
            for _ in range(n):
                out = model.generate(**inputs, do_sample=False, max_new_tokens=ref_tokens.shape[1] - inputs["input_ids"].shape[1])
                wrong += int(not torch.equal(out.cpu(), ref_tokens.cpu()))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            done.set()

    t = threading.Thread(target=work)
    t.start()
    while not done.is_set():
        req = urllib.request.Request(f"{http}/api/memory/models/{model_id}/park", data=b"{}", method="POST",
                                     headers={"content-type": "application/json"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                body = json.load(r)
            parks.append({"ms": round((time.perf_counter() - t0) * 1e3, 1), "action": body["data"]["action"]})
        except urllib.error.HTTPError as e:
            parks.append({"status": e.code, "body": e.read().decode()[:200]})
        time.sleep(0.05)
    t.join()
    return {"calls": n, "wrong": wrong, "errors": errors, "parks": parks[:50], "parked": sum(p.get("action") == "park" for p in parks)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--socket", default=None, help="the daemon's socket (default: $MEMWARDEN_SOCKET or the daemon's default)")
    ap.add_argument("--http", default=None, help="the daemon's REST API, for --park-loop (e.g. http://127.0.0.1:5000)")
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary folder)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--untied", action="store_true")
    ap.add_argument("--shard-size", default="50KB")
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--park-loop", type=int, default=0)
    ap.add_argument("--second-process", action="store_true")
    args = ap.parse_args()

    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM

    import memwarden.client
    import memwarden.hf

    folder = args.dir or tempfile.mkdtemp(prefix="check-hf-")
    make_checkpoint(folder, args)
    shards = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    res: dict = {"device": args.device, "folder": folder, "shards": len(shards), "dtype": args.dtype,
                 "tied": not args.untied, "bytes": sum(os.path.getsize(s) for s in shards)}

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    t = time.perf_counter()
    ref = AutoModelForCausalLM.from_pretrained(folder, torch_dtype="auto").to(args.device).eval()
    sync()
    t_tf = time.perf_counter() - t
    t = time.perf_counter()
    for s in shards:
        safetensors.torch.load_file(s, device=args.device)
    sync()
    t_st = time.perf_counter() - t

    client = memwarden.client.connect(args.socket, name="check-hf")
    t = time.perf_counter()
    model = memwarden.hf.from_pretrained(folder, device=args.device, client=client)
    sync()
    t_mw = time.perf_counter() - t
    res["load_s"] = {"transformers": round(t_tf, 4), "safetensors_load_file": round(t_st, 4), "memwarden": round(t_mw, 4)}
    res["speedup_vs_transformers"] = round(t_tf / t_mw, 2)
    gbps = res["bytes"] / 1e9
    res["load_gbps"] = {"transformers": round(gbps / t_tf, 2), "safetensors_load_file": round(gbps / t_st, 2),
                        "memwarden": round(gbps / t_mw, 2), "pinned_read_baseline": round(pinned_read_gbps(shards), 2)}
    if args.http:
        with urllib.request.urlopen(f"{args.http}/api/memory/models") as r:
            mine = [x for x in json.load(r)["data"]["weights"] if x["modelId"] == model.memwarden_weights.model_id]
        if mine and mine[0].get("load"):
            res["load_gbps"]["daemon_read_and_copy"] = round(mine[0]["load"]["gbPerS"], 2)

    w = model.memwarden_weights
    ptrs = {id(p): p for p in model.parameters()}
    held = {v.data_ptr() for v in w.values()}
    res["mapped"] = all(p.data_ptr() in held and p.device.type != "meta" for p in ptrs.values())
    res["tied_ok"] = args.untied or model.lm_head.weight is model.model.embed_tokens.weight
    res["dtype_kept"] = model.dtype == getattr(torch, args.dtype) == ref.dtype
    res["misaligned_16"] = sum(p.data_ptr() % 16 != 0 for p in model.parameters())
    res["buffers_on_device"] = all(b.device.type == torch.device(args.device).type for b in model.buffers())

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (2, 12), generator=g).to(args.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        a, b = ref(**inputs).logits, model(**inputs).logits
    res["logits_equal"] = bool(torch.equal(a, b))
    res["logits_max_abs_diff"] = float((a.float() - b.float()).abs().max())
    ra = ref.generate(**inputs, do_sample=False, max_new_tokens=args.new_tokens)
    rb = model.generate(**inputs, do_sample=False, max_new_tokens=args.new_tokens)
    res["tokens_equal"] = bool(torch.equal(ra, rb))
    res["generated"] = int(rb.shape[1] - ids.shape[1])
    checks = ["mapped", "tied_ok", "dtype_kept", "buffers_on_device", "logits_equal", "tokens_equal"]

    if args.second_process:
        res["second_process"] = second_process(folder, args.device, args.socket)
        checks.append("second_shared")
        res["second_shared"] = bool(res["second_process"].get("shared"))
    if args.park_loop:
        if not (args.http and args.device.startswith("cuda")):
            res["park_loop"] = "skipped: needs --http and a cuda device (cpu-held weights are never parked)"
        else:
            res["park_loop"] = park_loop(model, ra, inputs, args.http, args.park_loop)
            res["park_loop_ok"] = not res["park_loop"]["wrong"] and not res["park_loop"]["errors"]
            checks.append("park_loop_ok")
    res["ok"] = all(bool(res[c]) for c in checks)
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
