import json
import time

import pytest
from conftest import BACKENDS, REPO, WorkerProc, minilm_path

from memwarden import protocol as P

CASES = [c for c in json.loads((REPO / "fixtures" / "protocol" / "cases.json").read_text()) if "worker" in c]
MIB = 1 << 20


def test_hello_is_the_first_line(worker):
    h = worker.hello
    assert h.kind == "hello"
    P.check_hello(h)
    assert h.body["workerId"] == "t0" and h.body["pid"] == worker.p.pid
    assert "cpu" in h.body["devices"] and h.body["frameworks"]["python"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_worker_answers_golden_requests(worker, case):
    worker.send_line(case["line"])
    reply = worker.read()
    assert reply.kind == "reply"
    assert reply.body["success"] is case["worker"]["success"], reply.body
    if not case["worker"]["success"]:
        assert reply.body["error"]["code"] == case["worker"]["code"], reply.body
    # The worker is still serving afterwards.
    assert worker.call("ping")["success"]


def test_garbage_lines_never_kill_the_worker(worker):
    for line in ["not json", "[]", "{}", '{"event":"x"}', '{"type":"hello"}', "\x00\xff"]:
        worker.send_line(line)
    assert worker.call("ping")["data"]["pong"] is True
    assert worker.p.poll() is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_grows_rss_by_the_model_and_unload_gives_it_back(backend, model_factory):
    worker = WorkerProc("--devices", "cpu", "--backend", backend)
    try:
        check_load_unload_rss(worker, model_factory, backend)
    finally:
        worker.close()


def check_load_unload_rss(worker, model_factory, backend):
    warm_up(worker, model_factory)
    path, size = model_factory("big", mib=96)
    base = worker.rss()
    r = worker.call("loadModel", {"path": str(path), "name": "big", "deviceId": "cpu", "priority": 30})
    assert r["success"], r
    info = P.check_model_info(r["data"])
    assert info["sizeBytes"] == size
    assert info["bytesByDevice"] == {"cpu": size}
    assert info["tensorCount"] == 98 and info["priority"] == 30 and info["backend"] == backend
    grown = worker.rss() - base
    assert abs(grown - size) < 12 * MIB, (grown, size)
    listed = worker.call("getModelInfo")["data"]
    assert [m["modelId"] for m in listed["models"]] == [info["modelId"]]
    assert listed["memory"]["cpu"]["allocatedBytes"] == size
    u = worker.call("unloadModel", {"modelId": info["modelId"]})
    assert u["success"] and u["data"]["freedBytes"] == size
    assert worker.rss() - base < 12 * MIB
    assert worker.call("getModelInfo")["data"]["models"] == []
    # Unloading twice is a clear error, not a crash.
    again = worker.call("unloadModel", {"modelId": info["modelId"]})
    assert again["error"]["code"] == P.MODEL_NOT_FOUND


def warm_up(worker, model_factory):
    """Loads and unloads a small model first, so the backend's own import (numpy: ~14 MiB of
    code and data) is not counted as the model's."""
    path, _ = model_factory("warm", mib=1)
    r = worker.call("loadModel", {"path": str(path), "modelId": "warm"})
    assert r["success"], r
    assert worker.call("unloadModel", {"modelId": "warm"})["success"]


def test_real_minilm_model_loads_with_its_tensor_bytes(worker, model_factory):
    warm_up(worker, model_factory)
    base = worker.rss()
    r = worker.call("loadModel", {"path": minilm_path(), "name": "all-MiniLM-L6-v2", "modelId": "minilm"})
    assert r["success"], r
    assert r["data"]["modelId"] == "minilm"
    assert r["data"]["sizeBytes"] == 90856960 and r["data"]["tensorCount"] == 104
    assert abs(worker.rss() - base - 90856960) < 12 * MIB
    assert worker.call("unloadModel", {"modelId": "minilm"})["success"]


def test_a_corrupt_file_is_load_failed_and_nothing_is_kept(worker, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\0\0\0\0\0\0\0{not json at all")
    r = worker.call("loadModel", {"path": str(bad)})
    assert r["error"]["code"] == P.LOAD_FAILED
    assert worker.call("getModelInfo")["data"]["models"] == []


def test_duplicate_model_id_is_refused(worker, model_factory):
    path, _ = model_factory("a", mib=1)
    assert worker.call("loadModel", {"path": str(path), "modelId": "x"})["success"]
    r = worker.call("loadModel", {"path": str(path), "modelId": "x"})
    assert r["error"]["code"] == P.INVALID_DATA


def test_cuda_without_torch_is_device_unavailable(worker, model_factory):
    path, _ = model_factory("a", mib=1)
    r = worker.call("loadModel", {"path": str(path), "deviceId": "cuda:0"})
    assert r["error"]["code"] == P.DEVICE_UNAVAILABLE


def test_optimize_unloads_lowest_priority_first_and_spares_pinned_and_excluded(worker, model_factory):
    ids = {}
    for name, prio, pinned in [("low", 10, False), ("mid", 50, False), ("pinned", 0, True), ("keep", 5, False)]:
        path, size = model_factory(name, mib=4)
        r = worker.call("loadModel", {"path": str(path), "name": name, "priority": prio, "pinned": pinned, "modelId": name})
        assert r["success"]
        ids[name] = size
    r = worker.call("optimizeMemory", {"deviceId": "cpu", "bytes": 6 * MIB, "excludeModels": ["keep"]})
    assert r["success"], r
    assert r["data"]["actions"][0] == "trimCache"
    assert [a for a in r["data"]["actions"] if a.startswith("unload")] == ["unload:low", "unload:mid"]
    left = {m["modelId"] for m in worker.call("getModelInfo")["data"]["models"]}
    assert left == {"pinned", "keep"}


def test_ping_is_answered_while_a_load_runs(worker, model_factory):
    path, _ = model_factory("slow", mib=200)
    worker.send_line(P.encode(P.request("load", "loadModel", {"path": str(path)})))
    t0 = time.perf_counter()
    worker.send_line(P.encode(P.request("p", "ping")))
    first = worker.read()
    assert first.request_id == "p", "ping waited for the load"
    assert time.perf_counter() - t0 < 1.0
    assert worker.read().request_id == "load"


def test_shutdown_replies_then_exits_cleanly():
    w = WorkerProc()
    try:
        assert w.call("shutdown")["success"]
        assert w.p.wait(timeout=10) == 0
    finally:
        w.close()


def test_end_of_input_ends_the_worker():
    w = WorkerProc()
    try:
        w.p.stdin.close()
        assert w.p.wait(timeout=10) == 0
    finally:
        w.p.stdin = open("/dev/null", "wb")
        w.close()


def test_torch_reader_path_gives_the_same_tensors_as_the_file(model_factory):
    """The torch backend without the `safetensors` package (torch.frombuffer over memwarden's
    reader). Runs where torch is installed (the GPU machine's job runs it on cuda:0 too)."""
    torch = pytest.importorskip("torch")
    from memwarden import models as M
    from memwarden import safetensors_io as st

    path, size = model_factory("t", mib=3)
    real_has = M.has_module
    M.has_module = lambda n: n == "torch"
    try:
        store = M.ModelStore("torch")
        m = store.load(str(path), device_id="cpu")
    finally:
        M.has_module = real_has
    assert m.size_bytes == size and m.backend == "torch"
    h = st.read_header(str(path))
    buf = st.read_data(str(path), h)
    try:
        for t in h.tensors:
            assert m.tensors[t.name].view(torch.uint8).reshape(-1).numpy().tobytes() == bytes(buf[t.begin:t.end])
    finally:
        buf.close()
    assert store.unload(m.model_id)["freedBytes"] == size


def test_prints_from_python_and_c_code_never_reach_the_protocol_stream(tmp_path):
    """A worker whose loading code prints (Python) and writes to fd 1 directly (as C libraries
    do): the daemon's side still reads only protocol lines."""
    import subprocess
    import sys

    from conftest import PY_ROOT

    script = (
        "import os, sys\n"
        "from memwarden import models as M, worker as W\n"
        "orig = M.ModelStore.load\n"
        "def noisy(self, *a, **k):\n"
        "    print('hello from python')\n"
        "    os.write(1, b'hello from C\\n')\n"
        "    return orig(self, *a, **k)\n"
        "M.ModelStore.load = noisy\n"
        "sys.exit(W.main(['--worker-id', 'noisy', '--devices', 'cpu']))\n"
    )
    from conftest import make_model

    path = tmp_path / "m.safetensors"
    make_model(path, 1)
    p = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=dict(__import__("os").environ, PYTHONPATH=str(PY_ROOT)))
    try:
        assert P.decode(p.stdout.readline().decode()).kind == "hello"
        p.stdin.write((P.encode(P.request("1", "loadModel", {"path": str(path)})) + "\n").encode())
        p.stdin.flush()
        reply = P.decode(p.stdout.readline().decode())
        assert reply.kind == "reply" and reply.body["success"], reply.body
        p.stdin.close()
        assert p.wait(timeout=10) == 0
        err = p.stderr.read().decode()
        assert "hello from python" in err and "hello from C" in err
    finally:
        if p.poll() is None:
            p.kill()
