#!/usr/bin/env python3
"""memwarden.hf.pipeline against diffusers' own from_pretrained, on a running daemon.

    scripts/check-hf-pipeline.py --device cpu
    scripts/check-hf-pipeline.py --device cuda:0 --http http://127.0.0.1:5078

Needs torch, diffusers and safetensors, and a daemon (``memwarden serve``; the socket from
``--socket``, else ``$MEMWARDEN_SOCKET``). It writes a tiny unconditional latent-diffusion
pipeline (``LDMPipeline``: a ``VQModel``, a ``UNet2DModel`` and a DDIM scheduler, random
weights, ``--dtype``) with diffusers' own ``save_pretrained``, runs it through
``LDMPipeline.from_pretrained`` and through ``memwarden.hf.pipeline`` with the same seed, and
prints one JSON line (``"ok": true`` when every check held):

- ``images_equal``: the two pipelines' images are bit-identical;
- ``mapped``: every parameter of both held components lies in its held mapping;
- ``listing``: the daemon lists the two components under one ``group``;
- with ``--http`` on cuda: ``component_park`` (the VAE parked alone, the next run resumes it
  on its ``decode`` and gives the same image), ``group_park`` / ``group_resume``
  (``POST /api/memory/models/groups/{group}/park`` and ``…/resume``: every component parked,
  then resident, and the image still the same).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "python"))


def make_pipeline(folder: str, dtype) -> None:
    import torch
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel

    torch.manual_seed(0)
    vqvae = VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 64),
        layers_per_block=1, latent_channels=4, num_vq_embeddings=64, norm_num_groups=32, sample_size=32,
    )
    unet = UNet2DModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
    )
    pipe = LDMPipeline(vqvae=vqvae.to(dtype), unet=unet.to(dtype), scheduler=DDIMScheduler())
    pipe.save_pretrained(folder, safe_serialization=True)


def api(http: str, method: str, path: str):
    req = urllib.request.Request(http + path, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)["data"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--socket", default=None)
    ap.add_argument("--http", default=None, help="the daemon's REST API (listing; parks on cuda)")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()

    import torch
    from diffusers import LDMPipeline

    import memwarden.client
    import memwarden.hf

    dtype = getattr(torch, args.dtype)
    folder = args.dir or os.path.join(tempfile.mkdtemp(prefix="check-hf-pipeline-"), "tiny-ldm")
    make_pipeline(folder, dtype)
    res: dict = {"device": args.device, "folder": folder, "dtype": args.dtype}

    def run(pipe):
        g = torch.Generator("cpu").manual_seed(7)
        with torch.no_grad():
            return pipe(batch_size=1, generator=g, num_inference_steps=args.steps, output_type="np").images

    t = time.perf_counter()
    ref = LDMPipeline.from_pretrained(folder, torch_dtype=dtype).to(args.device)
    if args.device == "cpu":
        # On cpu diffusers keeps the tensors in the mmapped files, at their (unaligned) file
        # offsets, and CPU kernels too compute by alignment: the reference gets fresh memory,
        # as a GPU load does.
        for m in (ref.vqvae, ref.unet):
            for p in m.parameters():
                p.data = p.data.clone()
    res["load_s"] = {"diffusers": round(time.perf_counter() - t, 4)}
    client = memwarden.client.connect(args.socket, name="check-hf-pipeline")
    t = time.perf_counter()
    pipe = memwarden.hf.pipeline(folder, device=args.device, client=client)
    res["load_s"]["memwarden"] = round(time.perf_counter() - t, 4)
    res["pipeline_class"] = type(pipe).__name__
    want = run(ref)
    same = lambda: bool((run(pipe) == want).all())  # noqa: E731
    res["images_equal"] = same()
    held = {}
    for comp in ("vqvae", "unet"):
        m = getattr(pipe, comp)
        ptrs = {v.data_ptr() for v in m.memwarden_weights.values()}
        held[comp] = m.memwarden_weights.model_id
        res.setdefault("mapped", True)
        res["mapped"] &= all(p.data_ptr() in ptrs for p in m.parameters())
        # Tensors lie at their offsets in the files: one whose address is not a multiple of 16
        # may make torch pick another kernel than for a fresh allocation (256-byte aligned).
        res.setdefault("misaligned_16", {})[comp] = sum(p.data_ptr() % 16 != 0 for p in m.parameters())
    checks = ["images_equal", "mapped"]

    if args.http:
        listing = api(args.http, "GET", "/api/memory/models")["weights"]
        mine = [w for w in listing if w["modelId"] in held.values()]
        groups = {w.get("group") for w in mine}
        res["listing"] = {"components": sorted(w.get("component") for w in mine), "groups": sorted(map(str, groups))}
        res["listing_ok"] = len(mine) == 2 and len(groups) == 1 and None not in groups
        checks.append("listing_ok")
        group = next(iter(groups))
        if args.device.startswith("cuda") and res["listing_ok"]:
            p = api(args.http, "POST", f"/api/memory/models/{held['vqvae']}/park")
            res["component_park"] = {"action": p["action"], "ms": round(p["totalMs"], 1), "then_same": same()}
            state = lambda mid: next(w["state"] for w in api(args.http, "GET", "/api/memory/models")["weights"] if w["modelId"] == mid)  # noqa: E731
            res["component_park"]["resumed_by_decode"] = state(held["vqvae"]) == "resident"
            g = api(args.http, "POST", f"/api/memory/models/groups/{group}/park")
            states = {c: state(mid) for c, mid in held.items()}
            res["group_park"] = {"actions": [a["action"] for a in g["actions"]], "ms": round(g["totalMs"], 1),
                                 "freedBytes": g["freedBytes"], "states": states}
            r = api(args.http, "POST", f"/api/memory/models/groups/{group}/resume")
            res["group_resume"] = {"actions": [a["action"] for a in r["actions"]], "ms": round(r["totalMs"], 1),
                                   "states": {c: state(mid) for c, mid in held.items()}, "then_same": same()}
            res["parks_ok"] = (
                res["component_park"]["then_same"] and res["component_park"]["resumed_by_decode"]
                and set(states.values()) == {"parked"} and res["group_resume"]["then_same"]
                and set(res["group_resume"]["states"].values()) == {"resident"}
            )
            checks.append("parks_ok")
    res["ok"] = all(bool(res[c]) for c in checks)
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
