import os
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import FakeDaemon

from memwarden import client as C
from memwarden import protocol as P


class Listener:
    """A listening socket where the daemon would be; `attach` connects a client to it."""

    def __init__(self, path):
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)
        self.daemon = None

    def close(self):
        if self.daemon:
            self.daemon.close()
        self.server.close()


@pytest.fixture
def listener(tmp_path):
    lst = Listener(str(tmp_path / "mw.sock"))
    yield lst
    lst.close()


def attach(listener, **kw):
    c = C.connect(listener.path, name="sd-server", **kw)
    conn, _ = listener.server.accept()
    listener.daemon = FakeDaemon(conn)
    hello = listener.daemon.read()
    assert hello.kind == "hello"
    P.check_hello(hello)
    assert hello.body["role"] == "client" and hello.body["pid"] == os.getpid()
    return c, listener.daemon


def register(c, daemon, *args, **kw):
    """Registers a model while the fake daemon answers the `register` request with its id."""
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(c.register, *args, **kw)
        req = daemon.read("request")
        assert req.action == "register"
        info = P.check_data("ModelInfo", req.data)
        daemon.send(P.ok(req.request_id, {"modelId": info["modelId"]}))
        assert fut.result(timeout=10) == info["modelId"]
    return info


def test_register_reports_tensor_bytes_and_unregister_tells_the_daemon(listener):
    c, daemon = attach(listener)
    weights = {"w1": bytearray(3 << 20), "w2": b"\0" * 1000}
    info = register(c, daemon, "unet", weights, device="cpu", priority=70)
    mid = info["modelId"]
    assert info["modelName"] == "unet" and info["backend"] == "client"
    assert info["sizeBytes"] == (3 << 20) + 1000 and info["priority"] == 70
    models = daemon.call("getModelInfo")["data"]["models"]
    assert [m["modelId"] for m in models] == [mid]
    c.unregister(mid)
    gone = daemon.read()
    assert gone.event == "modelUnloaded" and gone.data == {"modelId": mid, "freedBytes": (3 << 20) + 1000}
    c.close()


def test_register_takes_the_id_the_daemon_answers():
    from conftest import attached_pair

    c, daemon = attached_pair()
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(c.register, "vae", b"\0" * 10, on_release=lambda *a: None)
        daemon.answer("register", {"modelId": "m-42"})
        assert fut.result(timeout=10) == "m-42"
    assert [m["modelId"] for m in daemon.call("getModelInfo")["data"]["models"]] == ["m-42"]
    assert daemon.call("unloadModel", {"modelId": "m-42"})["success"]
    c.close()
    daemon.close()


def test_a_refused_register_raises_daemon_error():
    from conftest import attached_pair

    c, daemon = attached_pair()
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(c.register, "vae", b"\0" * 10)
        req = daemon.read("request")
        daemon.send(P.error(req.request_id, P.INVALID_DATA, "model info: sizeBytes is wrong"))
        with pytest.raises(C.DaemonError) as e:
            fut.result(timeout=10)
    assert e.value.code == P.INVALID_DATA and "sizeBytes" in e.value.message
    assert daemon.call("getModelInfo")["data"]["models"] == []  # nothing was kept
    c.close()
    daemon.close()


@pytest.mark.parametrize("device, code", [("tpu:7", P.DEVICE_NOT_FOUND), ("gpu-0", P.BACKEND_UNAVAILABLE)])
def test_register_on_a_device_the_daemon_lacks_raises_with_its_code(device, code):
    from conftest import attached_pair

    c, daemon = attached_pair()
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(c.register, "ghost", b"\0" * 10, device=device)
        req = daemon.read("request")
        assert req.action == "register" and req.data["deviceId"] == device
        daemon.send(P.error(req.request_id, code, f"register: device '{device}' not found"))
        with pytest.raises(C.DaemonError) as e:
            fut.result(timeout=10)
    assert e.value.code == code
    assert daemon.call("getModelInfo")["data"]["models"] == []
    c.close()
    daemon.close()


def test_register_adopts_the_daemons_canonical_device():
    from conftest import attached_pair

    c, daemon = attached_pair()
    released = []
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(c.register, "unet", bytearray(1 << 20), device="gpu-0",
                          on_release=lambda m, a: released.append(m))
        daemon.answer("register", {"modelId": "m-1", "deviceId": "cuda:0"})
        assert fut.result(timeout=10) == "m-1"
    # Reported, filtered and released under the id the daemon uses.
    assert [m["deviceId"] for m in daemon.call("getModelInfo")["data"]["models"]] == ["cuda:0"]
    assert len(daemon.call("getModelInfo", {"deviceId": "cuda:0"})["data"]["models"]) == 1
    r = daemon.call("optimizeMemory", {"deviceId": "cuda:0", "bytes": 1})
    assert r["success"] and released == ["m-1"], r
    c.close()
    daemon.close()


def test_an_error_notice_from_the_daemon_raises_on_the_next_call():
    from conftest import attached_pair

    c, daemon = attached_pair()
    daemon.send(P.notification("error", {"code": P.DEVICE_NOT_FOUND, "message": "device 'tpu:7' not found",
                                         "modelId": "ghost-1"}))
    assert daemon.call("ping")["success"]  # read in order: the notice has arrived
    with pytest.raises(C.DaemonError) as e:
        c.register("vae", b"\0" * 10, timeout_s=1)
    assert e.value.code == P.DEVICE_NOT_FOUND and "tpu:7" in e.value.message
    # Raised once: the next call goes out.
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(c.register, "vae", b"\0" * 10)
        daemon.answer("register", {"modelId": "m-2"})
        assert fut.result(timeout=10) == "m-2"
    c.close()
    daemon.close()


def test_unload_request_runs_the_callback_and_forgets_the_model(listener):
    c, daemon = attach(listener)
    released = []
    holder = {"weights": bytearray(1 << 20)}
    mid = register(c, daemon, "vae", holder["weights"],
                   on_release=lambda m, action: (released.append((m, action)), holder.clear()))["modelId"]
    r = daemon.call("unloadModel", {"modelId": mid})
    assert r["success"] and r["data"]["freedBytes"] == 1 << 20
    assert released == [(mid, "unload")] and holder == {}
    assert daemon.call("getModelInfo")["data"]["models"] == []
    assert daemon.call("unloadModel", {"modelId": mid})["error"]["code"] == P.MODEL_NOT_FOUND
    c.close()


def test_pinned_or_callbackless_models_are_not_released(listener):
    c, daemon = attach(listener)
    pinned = register(c, daemon, "p", b"\0" * 10, pinned=True, on_release=lambda *a: None)["modelId"]
    plain = register(c, daemon, "q", b"\0" * 10)["modelId"]
    assert daemon.call("unloadModel", {"modelId": pinned})["error"]["code"] == P.NOT_SUPPORTED
    assert daemon.call("unloadModel", {"modelId": plain})["error"]["code"] == P.NOT_SUPPORTED
    assert len(daemon.call("getModelInfo")["data"]["models"]) == 2
    c.close()


def test_optimize_releases_least_valuable_first(listener):
    c, daemon = attach(listener)
    calls = []
    cb = lambda m, a: calls.append(m)  # noqa: E731
    a = register(c, daemon, "a", bytearray(4 << 20), priority=10, on_release=cb)["modelId"]
    b = register(c, daemon, "b", bytearray(4 << 20), priority=90, on_release=cb)["modelId"]
    e = register(c, daemon, "e", bytearray(4 << 20), priority=0, on_release=cb)["modelId"]
    r = daemon.call("optimizeMemory", {"deviceId": "cpu", "bytes": 3 << 20, "excludeModels": [e]})
    assert r["success"] and calls == [a], r
    assert {m["modelId"] for m in daemon.call("getModelInfo")["data"]["models"]} == {b, e}
    c.close()


def test_client_refuses_load_and_shutdown_and_unknown_lines(listener):
    c, daemon = attach(listener)
    assert daemon.call("loadModel", {"path": "/x"})["error"]["code"] == P.NOT_SUPPORTED
    assert daemon.call("shutdown")["error"]["code"] == P.NOT_SUPPORTED
    assert daemon.call("loadWeights", {"path": "/x"})["error"]["code"] == P.NOT_SUPPORTED
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


def test_export_returns_the_answer_and_the_descriptor_that_came_with_it(tmp_path):
    from conftest import attached_pair

    c, daemon = attached_pair()
    f = tmp_path / "memory"
    f.write_bytes(b"vulkan memory")
    answer = {"allocationId": "a-1", "kind": "vulkanOpaqueFd", "deviceId": "vulkan:0", "offset": 4096,
              "sizeBytes": 8, "allocationBytes": 1 << 20, "memoryTypeIndex": 1, "dedicated": False,
              "deviceUuid": "GPU-12345678-9abc-def0-0102-030405060708"}
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(c.export, "a-1")
        with open(f, "rb") as src:
            req = daemon.answer("export", answer, fds=[src.fileno()])
        got, fd = fut.result(timeout=10)
    assert req.data == {"allocationId": "a-1"}
    assert got == answer
    assert fd is not None and os.fstat(fd).st_ino == f.stat().st_ino, "the caller owns the same file"
    assert os.pread(fd, 6, 0) == b"vulkan"
    os.close(fd)
    # Other kinds come without a descriptor; a refusal raises with its code.
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(c.export, "a-2")
        daemon.answer("export", {"allocationId": "a-2", "kind": "shm", "path": "/dev/shm/x"})
        assert fut.result(timeout=10) == ({"allocationId": "a-2", "kind": "shm", "path": "/dev/shm/x"}, None)
        fut = pool.submit(c.export, "nope")
        req = daemon.read("request")
        daemon.send(P.error(req.request_id, "ALLOCATION_NOT_FOUND", "allocation 'nope' not found"))
        with pytest.raises(C.DaemonError) as e:
            fut.result(timeout=10)
    assert e.value.code == "ALLOCATION_NOT_FOUND"
    c.close()
    daemon.close()
