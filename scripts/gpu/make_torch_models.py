"""Builds real torch models from their configs (no download) and saves their weights as
.safetensors files with memwarden's own writer; prints a JSON manifest
[{"name", "path", "bytes", "tensors", "source"}]. The GPU model tests load these files through the
daemon onto cuda:0.

    python3 scripts/gpu/make_torch_models.py OUTDIR [large]
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
import torch  # noqa: E402

from memwarden import safetensors_io as st  # noqa: E402

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
          torch.uint8: "U8", torch.bool: "BOOL", torch.float64: "F64"}


def large():
    """A multi-GiB model for the optimizer's GPU test."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return [("gpt2-large", "transformers GPT2LMHeadModel(n_embd=1280, n_layer=36, n_head=20)",
             lambda: GPT2LMHeadModel(GPT2Config(n_embd=1280, n_layer=36, n_head=20)))]


def models():
    """The largest real architectures available here, by config (weights randomly initialised)."""
    out = []
    try:
        from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

        out.append(("bert-base", "transformers BertModel(BertConfig())", lambda: BertModel(BertConfig())))
        out.append(("gpt2-medium", "transformers GPT2LMHeadModel(n_embd=1024, n_layer=24, n_head=16)",
                    lambda: GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=24, n_head=16))))
    except Exception:
        pass
    try:
        import torchvision

        out.append(("resnet152", "torchvision resnet152()", lambda: torchvision.models.resnet152()))
    except Exception:
        pass
    if len(out) < 2:
        out.append(("transformer-encoder-24x1024", "torch.nn.TransformerEncoder(24 x d_model 1024)",
                    lambda: torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(1024, 16, 4096), 24)))
        out.append(("transformer-decoder-12x2048-fp16", "torch.nn.TransformerDecoder(12 x d_model 2048), fp16",
                    lambda: torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(2048, 16, 8192), 12).half()))
    return out


def main(outdir, which="default"):
    os.makedirs(outdir, exist_ok=True)
    manifest = []
    for name, source, build in (large() if which == "large" else models()):
        torch.manual_seed(0)
        model = build()
        tensors = {}
        for k, t in model.state_dict().items():
            t = t.detach().contiguous().cpu()
            tensors[k] = (DTYPES[t.dtype], tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        path = os.path.join(outdir, name + ".safetensors")
        nbytes = st.write(path, tensors, {"source": source})
        manifest.append({"name": name, "path": path, "bytes": nbytes, "tensors": len(tensors), "source": source})
        del model, tensors
    print(json.dumps(manifest))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "default")
