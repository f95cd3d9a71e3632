"""memwarden.hf without torch or transformers (CI has neither): importable, clear ImportErrors, and
its pure helpers (class resolution, key matching, the auto_use wrapper) with fakes."""

import contextlib
import importlib
import json
import subprocess
import sys
import threading

import pytest
from conftest import PY_ROOT

from memwarden import hf


def test_import_without_torch_transformers_diffusers():
    code = (
        "import sys\n"
        "for m in ('torch', 'transformers', 'diffusers', 'numpy'): sys.modules[m] = None\n"
        "import memwarden, memwarden.hf, memwarden.client\n"
        "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(PY_ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@contextlib.contextmanager
def modules(**replace):
    """Puts `replace` (name → module, or None: unimportable) in sys.modules for the block."""
    saved = {n: sys.modules.get(n, KeyError) for n in replace}
    try:
        sys.modules.update(replace)
        yield
    finally:
        for n, m in saved.items():
            if m is KeyError:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def missing(*names):
    """Makes `names` unimportable for the block."""
    return modules(**{n: None for n in names})


def present(name):
    """An empty stand-in module `name` for the block (importable, with nothing in it)."""
    return modules(**{name: type(sys)(name)})


def test_from_pretrained_without_transformers_names_it():
    # torch "present", transformers not
    with present("torch"), missing("transformers"), pytest.raises(ImportError, match="needs transformers") as e:
        hf.from_pretrained("/nonexistent", device="cpu")
    assert e.value.name == "transformers"
    assert "pip install transformers" in str(e.value)


def test_from_pretrained_without_torch_names_it():
    with missing("torch", "transformers"), pytest.raises(ImportError, match="from_pretrained needs torch") as e:
        hf.from_pretrained("/nonexistent", device="cpu")
    assert e.value.name == "torch"


def test_pipeline_without_diffusers_names_it():
    with present("torch"), missing("diffusers"), pytest.raises(ImportError, match="pipeline needs diffusers") as e:
        hf.pipeline("/nonexistent", device="cpu")
    assert e.value.name == "diffusers"


def test_module_reimports_cleanly_without_frameworks():
    with missing("torch", "transformers", "diffusers"):
        importlib.reload(hf)
    importlib.reload(hf)


# ---- class resolution ----


def test_class_candidates_architectures_first_then_auto():
    assert hf.class_candidates({"architectures": ["LlamaForCausalLM"]}) == ["LlamaForCausalLM", "AutoModelForCausalLM", "AutoModel"]
    assert hf.class_candidates({}) == ["AutoModelForCausalLM", "AutoModel"]
    assert hf.class_candidates({"architectures": None}) == ["AutoModelForCausalLM", "AutoModel"]
    assert hf.class_candidates({"architectures": ["BertModel", "BertModel", ""]}, task="AutoModelForMaskedLM") == [
        "BertModel", "AutoModelForMaskedLM", "AutoModel"]


class FakeConfig:
    def __init__(self, **d):
        self.d = d

    def to_dict(self):
        return dict(self.d)


class OtherConfig(FakeConfig):
    pass


class Concrete:
    pass


class FromAuto:
    pass


class AutoCausal:
    _model_mapping = {FakeConfig: FromAuto}


class AutoBase:
    _model_mapping = {FakeConfig: Concrete, OtherConfig: Concrete}


def fake_transformers(**classes):
    m = type(sys)("transformers")
    m.__version__ = "0.test"
    for k, v in classes.items():
        setattr(m, k, v)
    return m


def test_resolve_class_prefers_the_architecture():
    tf = fake_transformers(LlamaForCausalLM=Concrete, AutoModelForCausalLM=AutoCausal, AutoModel=AutoBase)
    assert hf.resolve_class(tf, FakeConfig(architectures=["LlamaForCausalLM"])) is Concrete


def test_resolve_class_falls_back_to_auto_classes():
    tf = fake_transformers(AutoModelForCausalLM=AutoCausal, AutoModel=AutoBase)
    # an architecture this transformers lacks: the Auto class's mapping for the config's type
    assert hf.resolve_class(tf, FakeConfig(architectures=["NewModelForCausalLM"])) is FromAuto
    # no causal LM for this config type: AutoModel
    assert hf.resolve_class(tf, OtherConfig()) is Concrete


def test_resolve_class_names_what_it_tried():
    tf = fake_transformers(AutoModelForCausalLM=AutoCausal)
    with pytest.raises(ValueError) as e:
        hf.resolve_class(tf, OtherConfig(architectures=["Nope"]))
    msg = str(e.value)
    assert "Nope (not in transformers 0.test)" in msg and "AutoModelForCausalLM (no class for OtherConfig)" in msg
    assert "AutoModel (not in transformers" in msg and "cls=" in msg


# ---- key matching ----


def test_match_keys_same_added_and_removed_prefix():
    model = ["model.embed.weight", "model.norm.weight", "lm_head.weight"]
    mapping, unexpected = hf.match_keys(model, ["model.embed.weight", "norm.weight", "extra"], prefix="model")
    assert mapping == {"model.embed.weight": "model.embed.weight", "norm.weight": "model.norm.weight"}
    assert unexpected == ["extra"]
    # a head model's checkpoint in its base model
    mapping, unexpected = hf.match_keys(["embeddings.weight"], ["bert.embeddings.weight"], prefix="bert")
    assert mapping == {"bert.embeddings.weight": "embeddings.weight"} and unexpected == []
    # no prefix: exact names only
    assert hf.match_keys(["a"], ["x.a"], prefix="") == ({}, ["x.a"])


# ---- auto_use ----


class FakeWeights:
    """Counts use() entries and exits; can refuse to enter (a resume that fails)."""

    def __init__(self):
        self.entered = 0
        self.exited = 0
        self.open = 0
        self.fail = None
        self.lock = threading.Lock()
        self.exits_with = []

    @contextlib.contextmanager
    def use(self):
        if self.fail:
            raise self.fail
        with self.lock:
            self.entered += 1
            self.open += 1
        try:
            yield self
        except BaseException as e:
            self.exits_with.append(type(e).__name__)
            raise
        finally:
            with self.lock:
                self.exited += 1
                self.open -= 1


class FakeModel:
    """A module-like object whose forward calls itself (nesting) and whose generate calls forward."""

    def __init__(self, weights):
        self.w = weights
        self.seen_open = []

    def __call__(self, *a, **k):
        return self.forward(*a, **k)

    def forward(self, x, depth=0):
        self.seen_open.append(self.w.open)
        if x == "boom":
            raise RuntimeError("boom")
        if depth:
            return self(x, depth=depth - 1)
        return x

    def generate(self, xs):
        return [self(x, depth=1) for x in xs]


def test_auto_use_holds_use_for_the_outermost_call_only():
    w = FakeWeights()
    m = FakeModel(w)
    auto = hf.install_auto_use(m, w)
    assert m.memwarden_auto_use is auto and hf.install_auto_use(m, w) is auto  # installed once
    assert m(1, depth=3) == 1
    assert (w.entered, w.exited, w.open) == (1, 1, 0)
    assert m.seen_open == [1, 1, 1, 1]  # inside use() at every depth
    assert m.generate([1, 2, 3]) == [1, 2, 3]
    assert (w.entered, w.exited) == (2, 2)  # generate's forwards nest inside its use()
    assert auto.depth == 0


def test_auto_use_releases_on_exception_and_passes_it_on():
    w = FakeWeights()
    m = FakeModel(w)
    hf.install_auto_use(m, w)
    with pytest.raises(RuntimeError, match="boom"):
        m("boom", depth=2)
    assert (w.entered, w.exited, w.open) == (1, 1, 0)
    assert w.exits_with == ["RuntimeError"]
    assert m.memwarden_auto_use.depth == 0
    assert m(5) == 5 and (w.entered, w.exited) == (2, 2)  # usable again


def test_auto_use_enter_failure_counts_nothing():
    w = FakeWeights()
    w.fail = TimeoutError("not remapped")
    m = FakeModel(w)
    hf.install_auto_use(m, w)
    with pytest.raises(TimeoutError):
        m(1)
    assert m.memwarden_auto_use.depth == 0 and m.seen_open == []
    w.fail = None
    assert m(1) == 1 and (w.entered, w.exited) == (1, 1)


def test_auto_use_is_per_thread():
    w = FakeWeights()
    inside = threading.Barrier(2)
    release = threading.Event()

    class Slow(FakeModel):
        def forward(self, x, depth=0):
            inside.wait(5)
            release.wait(5)
            return super().forward(x, depth)

    m = Slow(w)
    hf.install_auto_use(m, w)
    results = []
    threads = [threading.Thread(target=lambda: results.append(m(7, depth=1))) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = threading.Event()
    for _ in range(500):  # both threads inside their own outermost call
        if w.open == 2:
            break
        deadline.wait(0.01)
    assert w.open == 2 and w.entered == 2
    release.set()
    for t in threads:
        t.join(5)
    assert results == [7, 7] and (w.entered, w.exited, w.open) == (2, 2, 0)


def test_auto_use_keeps_name_and_signature():
    import inspect

    w = FakeWeights()
    m = FakeModel(w)
    hf.install_auto_use(m, w)
    assert m.forward.__name__ == "forward"
    assert list(inspect.signature(m.forward).parameters) == ["x", "depth"]


def test_auto_use_skips_methods_the_model_lacks():
    class OnlyForward:
        def forward(self, x):
            return x

    w = FakeWeights()
    m = OnlyForward()
    hf.install_auto_use(m, w)
    assert not hasattr(m, "generate") and m.forward(3) == 3 and w.entered == 1


def test_auto_use_covers_a_vaes_decode_and_encode():
    """A diffusers pipeline calls ``vae.decode(latents)``, never the VAE's forward: decode and
    encode hold use() too, and decode calling forward inside nests."""

    class Vae:
        def __init__(self, w):
            self.w, self.seen = w, []

        def forward(self, x):
            self.seen.append(self.w.open)
            return x

        def decode(self, z):
            self.seen.append(self.w.open)
            return self.forward(z)

        def encode(self, x):
            self.seen.append(self.w.open)
            return x

    w = FakeWeights()
    v = Vae(w)
    hf.install_auto_use(v, w)
    assert v.decode(1) == 1 and v.encode(2) == 2
    assert v.seen == [1, 1, 1] and (w.entered, w.exited, w.open) == (2, 2, 0)


# ---- pipelines ----


def test_pipeline_components_are_the_weighted_subfolders(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
    }))
    for comp, f in [("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors.index.json"),
                    ("text_encoder", "model.safetensors"), ("tokenizer", "vocab.json"), ("scheduler", "scheduler_config.json")]:
        (tmp_path / comp).mkdir()
        (tmp_path / comp / f).write_text("{}")
    assert hf.pipeline_components(str(tmp_path)) == {
        "unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"),
    }


def test_pipeline_components_of_a_model_folder_says_what_it_is(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder: it has no model_index.json"):
        hf.pipeline_components(str(tmp_path))


def test_default_client_uses_memwarden_socket(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMWARDEN_SOCKET", str(tmp_path / "none.sock"))
    monkeypatch.setattr(hf, "_client", None)
    with pytest.raises(OSError):
        hf.default_client()


def test_auto_use_with_real_weights_counts_and_blocks_an_unmap():
    """A real Weights (memfd grant, no peer): the fast path enters use() itself; an unmap
    (wait_unused) waits for the outermost call, and a nested call does not enter again."""
    from test_weights import grant, memfd

    from memwarden.weights import Weights

    w = Weights(grant(), memfd())
    seen = []

    class M:
        def forward(self, depth=0):
            seen.append(w._uses)
            return self.forward(depth - 1) if depth else w.wait_unused(0.05)

    m = M()
    auto = hf.install_auto_use(m, w)
    assert auto._fast
    assert m.forward(depth=2) is False  # inside the call an unmap cannot happen
    assert seen == [1, 1, 1] and w._uses == 0
    assert w.wait_unused(0.05) is True  # after it, it can
    w.unmap(final=True)
