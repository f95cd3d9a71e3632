import os
import socket
import threading

import pytest

from memwarden import client as C
from memwarden import protocol as P


class FakeDaemon:
    """The daemon's side of the socket, driven by the test."""

    def __init__(self, path):
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.conn = None
        self.rfile = None
        self.n = 0

    def accept(self):
        self.conn, _ = self.server.accept()
        self.conn.settimeout(10)
        self.rfile = self.conn.makefile("rb")

    def read(self):
        return P.decode(self.rfile.readline().decode())

    def call(self, action, data=None):
        self.n += 1
        rid = f"d{self.n}"
        self.conn.sendall((P.encode(P.request(rid, action, data)) + "\n").encode())
        msg = self.read()
        assert msg.kind == "reply" and msg.request_id == rid, msg
        return msg.body

    def close(self):
        if self.conn:
            self.conn.close()
        self.server.close()


@pytest.fixture
def daemon(tmp_path):
    d = FakeDaemon(str(tmp_path / "mw.sock"))
    d.path = str(tmp_path / "mw.sock")
    yield d
    d.close()


def attach(daemon, **kw):
    t = threading.Thread(target=daemon.accept)
    t.start()
    c = C.connect(daemon.path, name="sd-server", **kw)
    t.join()
    hello = daemon.read()
    assert hello.kind == "hello"
    P.check_hello(hello)
    assert hello.body["role"] == "client" and hello.body["pid"] == os.getpid()
    return c


def test_register_reports_tensor_bytes_and_unregister_tells_the_daemon(daemon):
    c = attach(daemon)
    weights = {"w1": bytearray(3 << 20), "w2": b"\0" * 1000}
    mid = c.register("unet", weights, device="cpu", priority=70)
    note = daemon.read()
    assert note.kind == "notification" and note.event == "modelLoaded"
    info = P.check_model_info(note.data)
    assert info["modelId"] == mid and info["modelName"] == "unet"
    assert info["sizeBytes"] == (3 << 20) + 1000 and info["priority"] == 70
    models = daemon.call("getModelInfo")["data"]["models"]
    assert [m["modelId"] for m in models] == [mid]
    c.unregister(mid)
    gone = daemon.read()
    assert gone.event == "modelUnloaded" and gone.data == {"modelId": mid, "freedBytes": (3 << 20) + 1000}
    c.close()


def test_unload_request_runs_the_callback_and_forgets_the_model(daemon):
    c = attach(daemon)
    released = []
    holder = {"weights": bytearray(1 << 20)}
    mid = c.register("vae", holder["weights"], on_release=lambda m, action: (released.append((m, action)), holder.clear()))
    daemon.read()
    r = daemon.call("unloadModel", {"modelId": mid})
    assert r["success"] and r["data"]["freedBytes"] == 1 << 20
    assert released == [(mid, "unload")] and holder == {}
    assert daemon.call("getModelInfo")["data"]["models"] == []
    assert daemon.call("unloadModel", {"modelId": mid})["error"]["code"] == P.MODEL_NOT_FOUND
    c.close()


def test_pinned_or_callbackless_models_are_not_released(daemon):
    c = attach(daemon)
    pinned = c.register("p", b"\0" * 10, pinned=True, on_release=lambda *a: None)
    plain = c.register("q", b"\0" * 10)
    daemon.read(), daemon.read()
    assert daemon.call("unloadModel", {"modelId": pinned})["error"]["code"] == P.NOT_SUPPORTED
    assert daemon.call("unloadModel", {"modelId": plain})["error"]["code"] == P.NOT_SUPPORTED
    assert len(daemon.call("getModelInfo")["data"]["models"]) == 2
    c.close()


def test_optimize_releases_least_valuable_first(daemon):
    c = attach(daemon)
    calls = []
    cb = lambda m, a: calls.append(m)  # noqa: E731
    a = c.register("a", bytearray(4 << 20), priority=10, on_release=cb)
    b = c.register("b", bytearray(4 << 20), priority=90, on_release=cb)
    e = c.register("e", bytearray(4 << 20), priority=0, on_release=cb)
    for _ in range(3):
        daemon.read()
    r = daemon.call("optimizeMemory", {"deviceId": "cpu", "bytes": 3 << 20, "excludeModels": [e]})
    assert r["success"] and calls == [a], r
    assert {m["modelId"] for m in daemon.call("getModelInfo")["data"]["models"]} == {b, e}
    c.close()


def test_client_refuses_load_and_shutdown_and_unknown_lines(daemon):
    c = attach(daemon)
    assert daemon.call("loadModel", {"path": "/x"})["error"]["code"] == P.NOT_SUPPORTED
    assert daemon.call("shutdown")["error"]["code"] == P.NOT_SUPPORTED
    daemon.conn.sendall(b'{"requestId":"zz","action":"explode"}\n')
    assert daemon.read().body["error"]["code"] == P.UNKNOWN_ACTION
    assert daemon.call("ping")["data"]["pong"] is True
    c.close()


def test_connect_without_a_daemon_raises(tmp_path):
    with pytest.raises(OSError):
        C.connect(str(tmp_path / "nobody.sock"), timeout_s=0.5)


def test_sizes_of_buffers_arrays_and_unknown_objects():
    assert C.tensor_bytes([b"\0" * 7, {"x": bytearray(5)}, memoryview(b"abc")]) == {"cpu": 15}
    with pytest.raises(TypeError):
        C.tensor_bytes({"a": object()})
    import importlib.util

    if importlib.util.find_spec("numpy"):  # optional framework: sized when present
        import numpy as np

        assert C.tensor_bytes({"a": np.zeros((10, 10), dtype="float32")}) == {"cpu": 400}
