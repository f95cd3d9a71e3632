"""memwarden's Python side.

- ``memwarden.worker``: the model worker the daemon starts and supervises
  (``python -m memwarden.worker``).
- ``memwarden.client``: what an existing inference process imports to register the models it
  holds with the daemon and to answer its requests to free memory.
- ``memwarden.weights``: model weights held by the daemon, mapped into this process zero-copy.
- ``memwarden.hf``: Hugging Face models on held weights: ``from_pretrained(folder)`` gives a
  transformers model whose parameters are the held tensors (shared by every process that loads
  the folder), ``pipeline(folder)`` a diffusers pipeline of held components. Imports torch,
  transformers and diffusers only when called.
- ``memwarden.protocol``: the JSON-lines codec both use (docs/PROTOCOL.md).

Shared by them: ``memwarden.errors`` (``WorkerError``, ``DaemonError``), ``memwarden.dtypes`` (the
safetensors dtypes and their torch and numpy names), ``memwarden.runtime`` (installed frameworks,
torch imported on demand, the process's memory), ``memwarden.endpoint`` (one protocol connection)
and ``memwarden.safetensors_io`` (the file format). ``memwarden.models`` is the worker's model store.
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)  # the versions a hello may carry
