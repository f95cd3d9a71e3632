"""memwarden.hf with real torch and transformers (skipped where they are missing, as in CI): a
tiny Llama saved in shards by transformers, its tensors in a memfd laid out as the daemon grants
them, mapped by a real ``Weights`` and built by ``from_pretrained`` (a fake client hands them
out). Logits and greedy tokens equal transformers' own ``from_pretrained``; every parameter is
a held tensor; the tie, the dtype and auto_use hold. scripts/check-hf.py does the same against a
real daemon."""

import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from memwarden import hf  # noqa: E402
from memwarden.weights import Weights  # noqa: E402

ST_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


class FakeClient:
    """load_weights → ``Weights`` over a memfd holding every shard's tensors (the daemon's shm)."""

    def __init__(self):
        self.loaded = []

    def load_weights(self, path, device="cpu", **kw):
        grant, fd = self.grant(path, device)
        self.loaded.append((path, kw))
        return Weights(grant, fd)

    def grant(self, path, device="cpu"):
        from safetensors.torch import load_file

        tensors = {}
        for f in sorted(os.listdir(path)):
            if f.endswith(".safetensors"):
                tensors.update(load_file(os.path.join(path, f)))
        fd, entries, at = os.memfd_create("hf-test"), [], 0
        for name, t in tensors.items():
            raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
            os.pwrite(fd, raw, at)
            entries.append({"name": name, "dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "offset": at, "nbytes": len(raw)})
            at += (len(raw) + 63) // 64 * 64
        size = max(4096, (at + 4095) // 4096 * 4096)
        os.ftruncate(fd, size)
        grant = {"modelId": "w-1", "name": os.path.basename(path), "deviceId": device, "handle": "shm",
                 "allocationBytes": size, "dataBytes": at, "hash": "x", "shared": False, "access": "readwrite", "tensors": entries}
        return grant, fd


@pytest.fixture(scope="module", params=[("float32", True), ("bfloat16", False)], ids=["f32-tied", "bf16-untied"])
def checkpoint(request, tmp_path_factory):
    dtype, tied = request.param
    folder = str(tmp_path_factory.mktemp("llama"))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied)
    transformers.LlamaForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(folder, max_shard_size="40KB")
    return folder, getattr(torch, dtype), tied


def test_from_pretrained_matches_transformers(checkpoint):
    folder, dtype, tied = checkpoint
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) >= 4
    client = FakeClient()
    model = hf.from_pretrained(folder, device="cpu", client=client, name="tiny")
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    assert client.loaded == [(folder, {"name": "tiny", "priority": 50, "pinned": False, "keep_alive_ms": None})]
    assert type(model) is type(ref) and model.dtype == dtype == ref.dtype and not model.training
    held = {t.data_ptr() for t in model.memwarden_weights.values()}
    assert all(p.data_ptr() in held and not p.requires_grad for p in model.parameters())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert all(b.device.type == "cpu" for b in model.buffers())
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    kw = {"attention_mask": torch.ones_like(ids), "do_sample": False, "max_new_tokens": 8}
    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))
    w = model.memwarden_weights
    assert w._uses == 0 and model.memwarden_auto_use.depth == 0


def test_auto_use_holds_use_during_forward_and_generate(checkpoint):
    folder, _, _ = checkpoint
    model = hf.from_pretrained(folder, device="cpu", client=FakeClient())
    w = model.memwarden_weights
    seen = []
    model.model.register_forward_pre_hook(lambda m, a: seen.append(w._uses))
    ids = torch.tensor([[1, 2, 3]])
    model(ids)
    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=3)
    assert seen == [1] * 4 and w._uses == 0  # one use() per outermost call, never nested twice


def test_torch_dtype_other_than_held_is_refused(checkpoint):
    folder, dtype, _ = checkpoint
    other = torch.float16
    with pytest.raises(ValueError, match="without a copy"):
        hf.from_pretrained(folder, device="cpu", client=FakeClient(), torch_dtype=other)
    hf.from_pretrained(folder, device="cpu", client=FakeClient(), torch_dtype="auto")


def test_a_remap_that_rebuilds_the_tensors_rebinds_and_reties(checkpoint):
    """A remap elsewhere (here: a new host mapping; on a GPU, a resume onto another card) rebuilds
    the tensors: the model's parameters are re-assigned to the new ones and the tie re-made."""
    folder, _, tied = checkpoint
    client = FakeClient()
    model = hf.from_pretrained(folder, device="cpu", client=client)
    w = model.memwarden_weights
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(ids).logits.clone()
    old = {t.data_ptr() for t in w.values()}
    assert w.wait_unused(1)
    w.unmap()
    assert w.remap(*client.grant(folder)) is False  # rebuilt, not at the old address
    new = {t.data_ptr() for t in w.values()}
    assert not old & new
    assert all(p.data_ptr() in new for p in model.parameters())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
