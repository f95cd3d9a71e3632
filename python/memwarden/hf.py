"""Hugging Face models whose weights memwarden holds: one call, no wrapper code.

    import memwarden.hf

    model = memwarden.hf.from_pretrained("/models/llama-3-8b", device="cuda:0")
    out = model.generate(**tok("Hello", return_tensors="pt").to("cuda:0"), max_new_tokens=20)

``from_pretrained(path)`` gives a transformers model whose parameters and persistent buffers *are*
the tensors memwarden holds for the folder (``client.load_weights(path)``, mapped zero-copy: a
second process doing the same shares the one copy). It is built the way transformers builds it:

- the config from the folder (``AutoConfig.from_pretrained``; extra keyword arguments override
  its fields, as in transformers) and ``generation_config.json`` when the folder has one;
- the class from the config when ``cls`` is not given: the first of its ``architectures`` that
  transformers has, else ``AutoModelForCausalLM``, else ``AutoModel``;
- parameters created on the ``meta`` device (no memory, no random init), buffers created for
  real, so non-persistent buffers (rotary ``inv_freq``, ``position_ids``, …) get the values the
  model's own ``__init__`` computes; they are then moved to ``device``;
- the checkpoint's dtype kept: the model is built in the floating dtype most of the held bytes
  have (``torch_dtype=`` may only name that dtype, or ``"auto"``: no copy is ever made);
- the held tensors assigned to the parameters (``load_state_dict(assign=True)``; a checkpoint
  saved without or with the base model's prefix is matched), then ``model.tie_weights()``, so
  tied parameters (``lm_head.weight``) are the held embedding, never a meta tensor. Parameters the
  checkpoint lacks and nothing ties are an error naming them;
- ``requires_grad`` off (the held copy is shared: an optimizer step would change it for every
  holder) and ``model.eval()``.

The model keeps its ``Weights`` as ``model.memwarden_weights``. When the daemon moves the weights
to another GPU (a resume with another target), the tensors are re-assigned and the ties re-made.

**auto_use** (default on): the model holds ``weights.use()`` for the duration of its outermost
``forward`` and of ``generate()`` on each thread, so a park waits for the call to end and a parked
model is resumed by its next call. Nested calls (``generate`` calling ``forward``, a model
calling itself) enter once. Costs about 4 µs per outermost call on CPU
(``scripts/bench-hf-auto-use.py``; docs/PERFORMANCE.md).

``pipeline(path)`` builds a diffusers pipeline whose weighted components (``unet``, ``vae``,
``text_encoder``, …) are each a held model (named ``<pipeline>/<component>``), built as above;
tokenizers and schedulers are loaded by diffusers.

This module imports only the standard library: torch, transformers (and diffusers for
``pipeline``) are imported when called, and a missing one is an ImportError naming it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import os
import threading
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

__all__ = [
    "AutoUse",
    "class_candidates",
    "default_client",
    "from_pretrained",
    "install_auto_use",
    "match_keys",
    "pipeline",
]

_client: Any = None
_client_lock = threading.Lock()
_build_lock = threading.RLock()  # one model built at a time (params_on_meta patches torch)


def default_client() -> Any:
    """The module's connection to the daemon, opened on first use (``$MEMWARDEN_SOCKET``, else the
    daemon's default socket: ``memwarden.client.default_socket_path()``)."""
    global _client
    with _client_lock:
        if _client is None or not _client.connected:
            from . import client as C

            _client = C.connect(name=f"memwarden.hf-{os.getpid()}")
        return _client


def require(module: str, what: str) -> Any:
    """Imports `module` for `what`, or raises an ImportError naming it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pkg = {"torch": "torch", "transformers": "transformers", "diffusers": "diffusers"}.get(module, module)
        raise ImportError(
            f"{what} needs {module}, which is not importable here ({e}); install it: pip install {pkg}",
            name=module,
        ) from e


# ---- class resolution (pure: works on the config's dict) ----


def class_candidates(config: Mapping[str, Any], task: str = "AutoModelForCausalLM") -> List[str]:
    """The transformers class names to try for a config (``config.json`` as a dict), in order:
    its ``architectures``, then `task` (an Auto class), then ``AutoModel``."""
    names: List[str] = []
    for arch in config.get("architectures") or []:
        if isinstance(arch, str) and arch and arch not in names:
            names.append(arch)
    for auto in (task, "AutoModel"):
        if auto not in names:
            names.append(auto)
    return names


def resolve_class(transformers: Any, config: Any, task: str = "AutoModelForCausalLM") -> Any:
    """The concrete model class for `config` (a transformers config): the first of
    ``class_candidates`` that transformers has (an Auto class is resolved through its mapping for
    the config's type). Raises ValueError naming what was tried."""
    tried = []
    for name in class_candidates(config.to_dict() if hasattr(config, "to_dict") else dict(config), task):
        cls = getattr(transformers, name, None)
        if cls is None:
            tried.append(f"{name} (not in transformers {getattr(transformers, '__version__', '?')})")
            continue
        mapping = getattr(cls, "_model_mapping", None)
        if mapping is None:  # a concrete class
            return cls
        try:
            return mapping[type(config)]
        except (KeyError, ValueError):
            tried.append(f"{name} (no class for {type(config).__name__})")
    raise ValueError(f"no transformers class for this config: tried {', '.join(tried)}; pass cls=")


def match_keys(model_keys: Iterable[str], checkpoint_keys: Iterable[str], prefix: str = "") -> Tuple[Dict[str, str], List[str]]:
    """Maps each checkpoint tensor to the model's state-dict key: the same name, else with the
    base model's `prefix` added (a base model's checkpoint in a model with a head) or removed (a
    model with a head's checkpoint in its base model). Returns ``({checkpoint key: model key},
    [checkpoint keys the model has no place for])``."""
    model = set(model_keys)
    mapping: Dict[str, str] = {}
    unexpected: List[str] = []
    cut = prefix + "." if prefix else ""
    for key in checkpoint_keys:
        if key in model:
            mapping[key] = key
        elif cut and cut + key in model:
            mapping[key] = cut + key
        elif cut and key.startswith(cut) and key[len(cut):] in model:
            mapping[key] = key[len(cut):]
        else:
            unexpected.append(key)
    return mapping, unexpected


# ---- auto_use ----


class AutoUse:
    """Holds ``weights.use()`` while the outermost call wrapped by it runs on a thread: entering
    again on the same thread (a nested call) only counts. Other threads enter on their own."""

    def __init__(self, weights: Any):
        self.weights = weights
        self._local = threading.local()
        from .weights import Weights  # standard library only

        self._fast = isinstance(weights, Weights)

    @property
    def depth(self) -> int:
        """This thread's nesting depth (0: not inside a wrapped call)."""
        return getattr(self._local, "depth", 0)

    def enter(self) -> None:
        local = self._local
        depth = getattr(local, "depth", 0)
        if depth == 0:
            if self._fast:
                self.weights._enter()  # use()'s own entry, without the generator's cost
                local.cm = None
            else:
                cm = self.weights.use()
                cm.__enter__()  # may resume a parked model; raises before anything is counted
                local.cm = cm
        local.depth = depth + 1

    def exit(self, exc: Optional[BaseException] = None) -> None:
        local = self._local
        local.depth -= 1
        if local.depth == 0:
            cm, local.cm = local.cm, None
            if cm is None:
                self.weights._exit()
            elif exc is None:
                cm.__exit__(None, None, None)
            else:
                cm.__exit__(type(exc), exc, exc.__traceback__)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        except BaseException as e:
            self.exit(e)
            raise
        self.exit()

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` running inside ``held()``; ``functools.wraps`` keeps its name and signature
        (``inspect.signature`` follows ``__wrapped__``, as transformers' generate does)."""

        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.enter()
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:
                self.exit(e)
                raise
            self.exit()
            return result

        wrapped.__memwarden_auto_use__ = self  # type: ignore[attr-defined]
        return wrapped


AUTO_USE_METHODS = ("forward", "generate", "encode", "decode")


def install_auto_use(model: Any, weights: Any, methods: Iterable[str] = AUTO_USE_METHODS) -> AutoUse:
    """Wraps `model`'s `methods` that it has (as instance attributes: ``nn.Module.__call__`` calls
    ``self.forward``, so hooks and ``model(x)`` keep working) so that each holds
    ``weights.use()`` for its outermost call. ``encode`` and ``decode`` are a diffusers VAE's
    entry points (a pipeline calls ``vae.decode(latents)``, never its forward). Installing twice wraps once. Returns the ``AutoUse``
    (also ``model.memwarden_auto_use``)."""
    existing = getattr(model, "memwarden_auto_use", None)
    if existing is not None:
        return existing
    auto = AutoUse(weights)
    for name in methods:
        fn = getattr(model, name, None)
        if callable(fn):
            object.__setattr__(model, name, auto.wrap(fn))
    object.__setattr__(model, "memwarden_auto_use", auto)
    return auto


# ---- building a model on held weights ----


@contextlib.contextmanager
def params_on_meta(torch: Any) -> Iterator[None]:
    """Parameters registered meanwhile are created on the ``meta`` device (no memory, no init
    cost); buffers are created for real (as ``accelerate.init_empty_weights()`` does, and
    transformers 4's from_pretrained; transformers 5 re-computes them after a meta build), so those a module computes in ``__init__`` are right.
    It patches ``nn.Module.register_parameter`` process-wide meanwhile (as accelerate does):
    builds are serialized, but a module another thread builds at the same time gets meta
    parameters too."""
    nn = torch.nn
    with _build_lock:
        original = nn.Module.register_parameter

        def register_parameter(module: Any, name: str, param: Any) -> None:
            original(module, name, param)
            if param is not None and param.device.type != "meta":
                p = module._parameters[name]
                module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

        nn.Module.register_parameter = register_parameter
        try:
            yield
        finally:
            nn.Module.register_parameter = original


@contextlib.contextmanager
def default_dtype(torch: Any, dtype: Any) -> Iterator[None]:
    if dtype is None or not dtype.is_floating_point:
        yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def held_dtype(torch: Any, weights: Mapping[str, Any]) -> Any:
    """The floating dtype most of the held bytes have (None without a floating tensor)."""
    bytes_by: Dict[Any, int] = {}
    for t in weights.values():
        if hasattr(t, "dtype") and t.dtype.is_floating_point:
            bytes_by[t.dtype] = bytes_by.get(t.dtype, 0) + t.numel() * t.element_size()
    return max(bytes_by, key=bytes_by.__getitem__) if bytes_by else None


def _check_dtype(torch: Any, asked: Any, held: Any) -> None:
    if asked is None or asked == "auto":
        return
    want = getattr(torch, asked) if isinstance(asked, str) else asked
    if held is not None and want != held:
        raise ValueError(f"the held checkpoint is {held}; memwarden maps it without a copy, so torch_dtype can only be {held} or 'auto'")


class _Binder:
    """What ``Weights.bind`` registers: its ``load_state_dict`` assigns the held tensors to the model
    (key names matched), re-ties the tied weights and moves the buffers not held to the device;
    the weights call it again when a remap rebuilds the tensors."""

    def __init__(self, model: Any, device: str, prefix: str):
        self.model = model
        self.device = device
        self.prefix = prefix

    def load_state_dict(self, weights: Mapping[str, Any], strict: bool = False, assign: bool = True) -> None:
        model = self.model
        self.device = getattr(weights, "device", self.device)  # a resume onto another GPU moves the buffers too
        model_keys = model.state_dict(keep_vars=True).keys()
        mapping, unexpected = match_keys(model_keys, list(weights.keys()), self.prefix)
        ignored = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
        unexpected = [k for k in unexpected if not _matches_any(k, ignored)]
        if unexpected:
            text = f"the checkpoint has tensors this model has no place for: {_names(unexpected)}"
            if strict:
                raise ValueError(text)
            warnings.warn(f"{text} (left unused, as transformers does)", stacklevel=2)
        model.load_state_dict({mk: weights[ck] for ck, mk in mapping.items()}, strict=False, assign=True)
        tie = getattr(model, "tie_weights", None)
        if tie is not None:
            if "missing_keys" in inspect.signature(tie).parameters:  # transformers 5: ties either way round
                tie(missing_keys=set(model_keys) - set(mapping.values()))
            else:
                tie()
        self._settle()

    def _settle(self) -> None:
        """No parameter may stay on meta; buffers not held (non-persistent ones, persistent ones the
        checkpoint lacks) go to the device."""
        torch = require("torch", "memwarden.hf")
        missing = [n for n, p in self.model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
        if missing:
            raise ValueError(f"the checkpoint lacks parameters of this model and none is tied to a held one: {_names(missing)}")
        device = torch.device(self.device)
        for module_name, module in self.model.named_modules():
            for name, buf in list(module._buffers.items()):
                if buf is None or buf.device == device:
                    continue
                if buf.device.type == "meta":
                    raise ValueError(f"buffer {module_name + '.' if module_name else ''}{name} is on meta and not held")
                module._buffers[name] = buf.to(device)
        self.model.requires_grad_(False)


def _matches_any(key: str, patterns: List[str]) -> bool:
    import re

    return any(re.search(p, key) for p in patterns)


def _names(keys: List[str], at_most: int = 8) -> str:
    more = f" and {len(keys) - at_most} more" if len(keys) > at_most else ""
    return ", ".join(keys[:at_most]) + more


def _config_dir(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def _no_init_weights(transformers: Any) -> Any:
    """transformers' context that skips weight init (``modeling_utils`` in 4.x, ``initialization``
    in 5.x), or None."""
    for where in ("modeling_utils", "initialization"):
        with contextlib.suppress(ImportError):
            fn = getattr(importlib.import_module(f"{transformers.__name__}.{where}"), "no_init_weights", None)
            if fn is not None:
                return fn
    return None


def _construct(torch: Any, transformers: Any, cls: Any, config: Any, dtype: Any, **kwargs: Any) -> Any:
    """`cls` built from `config` with parameters on meta, in `dtype`, without weight init."""
    if dtype is not None:  # transformers 5 names it dtype (torch_dtype is its deprecated alias)
        setattr(config, "dtype" if isinstance(getattr(type(config), "torch_dtype", None), property) else "torch_dtype", dtype)
    no_init = _no_init_weights(transformers)
    with contextlib.ExitStack() as stack:
        stack.enter_context(params_on_meta(torch))
        stack.enter_context(default_dtype(torch, dtype))
        if no_init is not None:
            stack.enter_context(no_init())
        if hasattr(cls, "_from_config"):
            return cls._from_config(config, **kwargs)
        return cls(config, **kwargs)


def bind_held(model: Any, weights: Any, device: str, auto_use: bool = True, prefix: str = "") -> Any:
    """Points `model`'s parameters and persistent buffers at `weights` (re-done after a remap that
    rebuilds them), re-ties, moves the other buffers to `device`, ``eval()``; with `auto_use`,
    ``install_auto_use``. Returns `model`."""
    binder = _Binder(model, device, prefix)
    weights.bind(binder, strict=False)
    object.__setattr__(model, "memwarden_weights", weights)
    object.__setattr__(model, "_memwarden_binder", binder)  # bind() holds it weakly
    model.eval()
    if auto_use:
        install_auto_use(model, weights)
    return model


def from_pretrained(path: str, cls: Any = None, device: str = "cuda:0", client: Any = None, auto_use: bool = True,
                    *, name: Optional[str] = None, priority: int = 50, pinned: bool = False,
                    keep_alive_ms: Optional[int] = None, **kwargs: Any) -> Any:
    """A transformers model for the Hugging Face folder `path` whose weights memwarden holds on
    `device` (see the module's docstring). `cls`: the model class (default: from the config).
    `client`: a ``memwarden.client.Client`` (default: ``default_client()``). `name`, `priority`,
    `pinned`, `keep_alive_ms`: as ``client.load_weights``. Keyword arguments: ``torch_dtype``
    (``"auto"`` or the held dtype), ``attn_implementation``, ``trust_remote_code``, ``config``
    (a config object instead of the folder's), the rest override config fields.

    Raises ImportError naming torch or transformers when missing, DaemonError for the daemon's
    refusals (FILE_NOT_FOUND, INVALID_MODEL_FILE, INSUFFICIENT_MEMORY, …), ValueError when the
    checkpoint does not fit the model."""
    torch = require("torch", "memwarden.hf.from_pretrained")
    transformers = require("transformers", "memwarden.hf.from_pretrained")
    folder = _config_dir(path)
    asked_dtype = kwargs.pop("torch_dtype", kwargs.pop("dtype", None))
    build_kw = {k: kwargs.pop(k) for k in ("attn_implementation",) if k in kwargs}
    trust = kwargs.pop("trust_remote_code", False)
    config = kwargs.pop("config", None)
    if config is None:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust, **kwargs)
    elif kwargs:
        for k, v in kwargs.items():
            setattr(config, k, v)
    if cls is None:
        cls = resolve_class(transformers, config)
    weights = (client or default_client()).load_weights(path, device=device, name=name, priority=priority,
                                                        pinned=pinned, keep_alive_ms=keep_alive_ms)
    with weights.use():  # a park waits until the model is bound
        dtype = held_dtype(torch, weights)
        _check_dtype(torch, asked_dtype, dtype)
        model = _construct(torch, transformers, cls, config, dtype, **build_kw)
        bind_held(model, weights, weights.device, auto_use, getattr(cls, "base_model_prefix", "") or "")
    if getattr(model, "can_generate", lambda: False)() and os.path.exists(os.path.join(folder, "generation_config.json")):
        with contextlib.suppress(Exception):
            model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    return model


# ---- diffusers pipelines ----

WEIGHT_FILES = (
    "model.safetensors.index.json", "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
)


def pipeline_components(path: str) -> Dict[str, Tuple[str, str]]:
    """The components of the diffusers pipeline folder `path` that have weights (a sub-folder with
    one of ``WEIGHT_FILES``): ``{component: (library, class name)}`` from ``model_index.json``."""
    index_path = os.path.join(path, "model_index.json")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not a diffusers pipeline folder: it has no model_index.json") from None
    out: Dict[str, Tuple[str, str]] = {}
    for comp, spec in index.items():
        if comp.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or None in spec:
            continue
        sub = os.path.join(path, comp)
        if any(os.path.exists(os.path.join(sub, w)) for w in WEIGHT_FILES):
            out[comp] = (spec[0], spec[1])
    return out


def _component(torch: Any, library: str, class_name: str, folder: str, weights: Any, auto_use: bool) -> Any:
    lib = require(library, f"the pipeline component {os.path.basename(folder)} ({library}.{class_name})")
    cls = getattr(lib, class_name)
    dtype = held_dtype(torch, weights)
    if library == "transformers":
        config = lib.AutoConfig.from_pretrained(folder)
        model = _construct(torch, lib, cls, config, dtype)
    else:  # a diffusers ModelMixin: from_config
        config = cls.load_config(folder)
        with params_on_meta(torch), default_dtype(torch, dtype):
            model = cls.from_config(config)
    return bind_held(model, weights, weights.device, auto_use, getattr(cls, "base_model_prefix", "") or "")


def pipeline(path: str, cls: Any = None, device: str = "cuda:0", client: Any = None, auto_use: bool = True,
             *, name: Optional[str] = None, priority: int = 50, pinned: bool = False,
             keep_alive_ms: Optional[int] = None, **kwargs: Any) -> Any:
    """A diffusers pipeline for the pipeline folder `path` (``model_index.json``): each component
    with weights is a held model of its own, named ``<name>/<component>`` (`name` defaults to the
    folder's name), built on its held tensors like ``from_pretrained``; the others (tokenizers,
    schedulers) and the pipeline itself come from ``cls.from_pretrained(path, **components,
    **kwargs)`` (`cls` defaults to ``diffusers.DiffusionPipeline``). Each component holds its own
    ``use()`` around its forward with `auto_use`, so one can be parked while the others work.
    Raises ImportError naming diffusers (or torch, transformers) when missing."""
    torch = require("torch", "memwarden.hf.pipeline")
    diffusers = require("diffusers", "memwarden.hf.pipeline")
    group = name or os.path.basename(os.path.normpath(path))
    client = client or default_client()
    components: Dict[str, Any] = {}
    for comp, (library, class_name) in pipeline_components(path).items():
        folder = os.path.join(path, comp)
        weights = client.load_weights(folder, device=device, name=f"{group}/{comp}", priority=priority,
                                      pinned=pinned, keep_alive_ms=keep_alive_ms)
        with weights.use():
            components[comp] = _component(torch, library, class_name, folder, weights, auto_use)
    return (cls or diffusers.DiffusionPipeline).from_pretrained(path, **components, **kwargs)
