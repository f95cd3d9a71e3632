"""Weights held by the daemon, mapped by a client: a fake daemon on a socketpair grants real
tmpfs memory (memfd) with descriptors passed over the socket, as the real one does."""

import os
import select
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import attached_pair, has_numpy

from memwarden import client as C
from memwarden import endpoint as E
from memwarden import protocol as P
from memwarden import weights as W

SIZE = 4096
TENSORS = {  # name: (dtype, shape, offset, bytes)
    "layer.weight": ("F32", [2, 3], 0, struct.pack("<6f", 1, 2, 3, 4, 5, 6)),
    "layer.index": ("I32", [4], 64, struct.pack("<4i", -1, 0, 1, 1 << 30)),
    "mask": ("U8", [5], 128, bytes([9, 8, 7, 6, 5])),
    "scale": ("F32", [], 192, struct.pack("<f", 0.5)),
}


def grant(model_id="w-1", **kw):
    g = {
        "modelId": model_id, "name": "tiny", "deviceId": "cpu", "handle": "shm", "allocationBytes": SIZE,
        "dataBytes": 196, "hash": "abc", "shared": False, "access": "readwrite",
        "tensors": [{"name": n, "dtype": d, "shape": s, "offset": o, "nbytes": len(b)} for n, (d, s, o, b) in TENSORS.items()],
    }
    g.update(kw)
    return g


def memfd(name="memwarden-test"):
    """A tmpfs file holding the tensors' bytes at their offsets (the daemon's shm)."""
    fd = os.memfd_create(name)
    os.ftruncate(fd, SIZE)
    for _, _, offset, data in TENSORS.values():
        os.pwrite(fd, data, offset)
    return fd


def raw(t):
    """A tensor's bytes, whichever backend built it."""
    if isinstance(t, memoryview):
        return t.tobytes()
    if hasattr(t, "numel"):  # torch
        import torch

        return t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return t.tobytes()  # numpy


def load(client, daemon, fd, g=None, **kw):
    """client.load_weights while the fake daemon answers with the grant and `fd`."""
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(client.load_weights, "/models/tiny.safetensors", **kw)
        req = daemon.answer("loadWeights", g or grant(), fds=[fd])
        weights = fut.result(timeout=10)
    os.close(fd)  # the daemon's copy; the client has its own
    return req, weights


@pytest.fixture
def pair():
    client, daemon = attached_pair()
    yield client, daemon
    client.close()
    daemon.close()


def test_load_weights_maps_the_daemons_bytes(pair):
    client, daemon = pair
    req, w = load(client, daemon, memfd(), name="tiny", priority=70, keep_alive_ms=5000)
    assert req.request_id == "c1" and "fds" not in req.body
    assert req.data == {"path": "/models/tiny.safetensors", "deviceId": "cpu", "name": "tiny", "priority": 70,
                        "pinned": False, "keepAliveMs": 5000}
    P.check_data("LoadWeights", req.data)
    assert (w.model_id, w.name, w.device, w.shared, w.mapped) == ("w-1", "tiny", "cpu", False, True)
    assert set(w) == set(TENSORS) and len(w) == 4
    for name, (_, _, _, data) in TENSORS.items():
        assert raw(w[name]) == data, name
    if w.backend != "bytes":
        assert tuple(w["layer.weight"].shape) == (2, 3) and tuple(w["scale"].shape) == ()
        assert float(w["layer.weight"][1, 2]) == 6.0 and int(w["layer.index"][3]) == 1 << 30


def test_a_refused_load_raises_daemon_error(pair):
    client, daemon = pair
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(client.load_weights, "/m.safetensors")
        req = daemon.read("request")
        daemon.send(P.error(req.request_id, P.FILE_NOT_FOUND, "no /m.safetensors"))
        with pytest.raises(C.DaemonError) as e:
            fut.result(timeout=10)
    assert e.value.code == P.FILE_NOT_FOUND and e.value.message == "no /m.safetensors"


@pytest.mark.parametrize("backend", ["bytes"] + (["numpy"] if has_numpy() else []))
def test_each_host_backend_views_the_same_bytes(backend):
    w = W.Weights(grant(), memfd(), backend=backend)
    for name, (_, _, _, data) in TENSORS.items():
        assert raw(w[name]) == data
    w.unmap(final=True)
    assert len(w) == 0 and not w.mapped


def mappings_of(name):
    with open("/proc/self/maps") as f:
        return sum(f"memfd:{name}" in line for line in f)


def test_a_host_unmap_never_leaves_a_held_tensor_dangling():
    """A tensor the application still holds keeps the mapping (torch, numpy) or is released
    (memoryview); either way no access reaches unmapped memory, and it goes with the last reference."""
    import gc

    w = W.Weights(grant(), memfd("memwarden-held"))
    held = w["mask"]
    assert mappings_of("memwarden-held") == 1
    w.unmap(final=True)
    if isinstance(held, memoryview):
        with pytest.raises(ValueError):
            held.tobytes()
    else:
        assert raw(held) == TENSORS["mask"][3]
        assert mappings_of("memwarden-held") == 1
    del held
    gc.collect()
    assert mappings_of("memwarden-held") == 0


def test_two_clients_share_one_mapping():
    (c1, d1), (c2, d2) = attached_pair("a"), attached_pair("b")
    try:
        fd = memfd()
        _, w1 = load(c1, d1, os.dup(fd))
        _, w2 = load(c2, d2, fd, grant(shared=True))
        assert w2.shared
        w1["mask"][0] = 42
        assert raw(w2["mask"])[0] == 42
        w2["mask"][4] = 17
        assert raw(w1["mask"]) == bytes([42, 8, 7, 6, 17])
    finally:
        for x in (c1, c2, d1, d2):
            x.close()


def test_loading_a_model_twice_in_one_process_gives_the_same_weights(pair):
    client, daemon = pair
    _, first = load(client, daemon, memfd())
    _, again = load(client, daemon, memfd(), grant(shared=True))
    assert again is first


def test_a_reply_declaring_descriptors_that_did_not_come_fails_the_call(pair):
    client, daemon = pair
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(client.load_weights, "/models/tiny.safetensors")
        req = daemon.read("request")
        daemon.send_line(P.encode(P.ok(req.request_id, grant(), fds=1)))  # no descriptor sent
        with pytest.raises(C.DaemonError) as e:
            fut.result(timeout=10)
    assert e.value.code == P.MALFORMED_MESSAGE


def test_a_request_declaring_descriptors_that_did_not_come_is_malformed(pair):
    client, daemon = pair
    daemon.send_line(P.encode(P.request("d7", "remapWeights", grant(), fds=1)))
    reply = daemon.read("reply")
    assert reply.request_id == "d7" and reply.body["error"]["code"] == P.MALFORMED_MESSAGE
    assert daemon.call("ping")["data"]["pong"] is True


def test_a_descriptor_no_line_claims_is_closed(pair):
    _, daemon = pair
    r, w = os.pipe()
    daemon.send_line(P.encode(P.request("d1", "ping")), fds=[w])  # sent, but the line declares none
    os.close(w)
    assert daemon.read("reply").request_id == "d1"
    ready, _, _ = select.select([r], [], [], 5)
    assert ready and os.read(r, 1) == b"", "the client kept the write end open"
    os.close(r)


def test_a_remap_without_its_descriptor_is_invalid(pair):
    client, daemon = pair
    load(client, daemon, memfd())
    assert daemon.call("remapWeights", grant())["error"]["code"] == P.INVALID_DATA
    assert daemon.call("unmapWeights", {"modelId": "w-9", "timeoutMs": 10})["error"]["code"] == P.MODEL_NOT_FOUND


def test_unmap_waits_for_use_and_answers_in_use_past_its_bound(pair):
    client, daemon = pair
    _, w = load(client, daemon, memfd())
    entered, leave = threading.Event(), threading.Event()

    def user():
        with w.use():
            entered.set()
            leave.wait(10)

    t = threading.Thread(target=user)
    t.start()
    assert entered.wait(5)
    r = daemon.call("unmapWeights", {"modelId": "w-1", "timeoutMs": 100})
    assert r["error"]["code"] == P.IN_USE
    assert w.mapped and raw(w["mask"]) == TENSORS["mask"][3]  # nothing changed

    threading.Timer(0.3, leave.set).start()
    t0 = time.monotonic()
    r = daemon.call("unmapWeights", {"modelId": "w-1", "timeoutMs": 5000})
    assert r["success"] and r["data"] == {"unmapped": True}, r
    assert time.monotonic() - t0 >= 0.25, "unmapped while a use() was open"
    t.join(5)
    assert not w.mapped and len(w) == 0  # host memory: the tensors are gone with the mapping


def test_use_of_parked_weights_resumes_them_and_reports_use(pair):
    client, daemon = pair
    _, w = load(client, daemon, memfd())
    assert daemon.call("unmapWeights", {"modelId": "w-1", "timeoutMs": 1000})["success"]
    seen = []

    def user():
        with w.use():
            seen.append(raw(w["layer.index"]))

    t = threading.Thread(target=user)
    t.start()
    resume = daemon.read("request")  # the daemon remaps first, then answers the resume
    assert resume.action == "resumeWeights" and resume.data == {"modelId": "w-1"}
    fd = memfd()
    remap = daemon.call("remapWeights", grant(), fds=[fd])
    os.close(fd)
    assert remap["success"] and remap["data"] == {"sameAddress": False}, remap
    daemon.send(P.ok(resume.request_id, {"modelId": "w-1", "state": "resident"}))
    t.join(5)
    assert seen == [TENSORS["layer.index"][3]]
    used = daemon.read("notification")
    assert used.event == "weightsUsed" and used.data == {"modelId": "w-1"}
    P.check_data("ModelRef", used.data)


def test_weights_used_is_sent_at_most_once_a_second(pair):
    client, daemon = pair
    _, w = load(client, daemon, memfd())
    for _ in range(5):
        with w.use():
            pass
    assert daemon.read("notification").event == "weightsUsed"
    assert daemon.call("ping")["success"]  # a second notification would come before this reply
    assert daemon.events == []


def test_a_failed_resume_reaches_the_user(pair):
    client, daemon = pair
    _, w = load(client, daemon, memfd())
    assert daemon.call("unmapWeights", {"modelId": "w-1", "timeoutMs": 1000})["success"]
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(lambda: w.use().__enter__())
        resume = daemon.read("request")
        daemon.send(P.error(resume.request_id, P.INSUFFICIENT_MEMORY, "cuda:0 is full"))
        with pytest.raises(C.DaemonError) as e:
            fut.result(timeout=10)
    assert e.value.code == P.INSUFFICIENT_MEMORY


def test_an_unmap_with_confirm_early_says_quiesced_before_it_replies(pair):
    """A park asks with confirmEarly: the holder says it is quiet (no use() open, none can
    start) before it unmaps, so the daemon copies out while it unmaps; the reply comes after."""
    client, daemon = pair
    _, w = load(client, daemon, memfd())
    daemon.n += 1
    daemon.send(P.request(f"d{daemon.n}", "unmapWeights", {"modelId": "w-1", "timeoutMs": 1000, "confirmEarly": True}))
    quiet = daemon.read_any()[0]
    assert quiet.kind == "notification" and quiet.event == "weightsQuiesced", quiet.body
    assert quiet.data == {"modelId": "w-1"}
    reply = daemon.read("reply")
    assert reply.body["success"] and reply.body["data"] == {"unmapped": True}
    assert not w.mapped
    # Without confirmEarly, no notice: the reply alone.
    assert daemon.call("remapWeights", dict(w.grant), fds=[memfd()])["success"]
    assert daemon.call("unmapWeights", {"modelId": "w-1", "timeoutMs": 1000})["success"]
    assert not any(e.event == "weightsQuiesced" for e in daemon.events)


def test_final_unmap_forgets_the_weights(pair):
    client, daemon = pair
    _, w = load(client, daemon, memfd())
    assert daemon.call("unmapWeights", {"modelId": "w-1", "timeoutMs": 1000, "final": True})["success"]
    assert len(w) == 0
    with pytest.raises(Exception) as e:
        with w.use():
            pass
    assert getattr(e.value, "code", None) == P.MODEL_NOT_FOUND
    assert daemon.call("unmapWeights", {"modelId": "w-1", "timeoutMs": 10})["error"]["code"] == P.MODEL_NOT_FOUND


def test_release_weights_unmaps_and_tells_the_daemon(pair):
    client, daemon = pair
    _, w = load(client, daemon, memfd())
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(client.release_weights, w)
        req = daemon.answer("releaseWeights", {"modelId": "w-1", "state": "resident", "holders": 0})
        assert fut.result(timeout=10)["holders"] == 0
    assert req.data == {"modelId": "w-1"} and not w.mapped


def test_a_grant_whose_tensors_do_not_fit_is_refused_and_its_descriptor_closed(pair):
    client, daemon = pair
    bad = grant(allocationBytes=100)  # "mask" ends at 133
    r, wr = os.pipe()
    with pytest.raises(P.ProtocolError) as e:
        W.Weights(bad, wr)
    assert e.value.code == P.INVALID_DATA and "past" in e.value.message
    assert os.read(r, 1) == b""  # the write end was closed
    os.close(r)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(client.load_weights, "/models/tiny.safetensors")
        fd = memfd()
        daemon.answer("loadWeights", bad, fds=[fd])
        os.close(fd)
        release = daemon.answer("releaseWeights", {"modelId": "w-1", "state": "resident", "holders": 0})
        with pytest.raises(P.ProtocolError):
            fut.result(timeout=10)
    assert release.data == {"modelId": "w-1"}  # the daemon no longer counts this process


def test_calls_time_out_and_fail_when_the_daemon_goes(pair):
    client, daemon = pair
    ep = client._endpoint
    with pytest.raises(TimeoutError):
        ep.call("resumeWeights", {"modelId": "w-1"}, timeout_s=0.2)
    late = daemon.read("request")
    daemon.send(P.ok(late.request_id, {}))  # dropped: nobody waits for it
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(ep.call, "resumeWeights", {"modelId": "w-1"}, 10)
        daemon.read("request")
        daemon.conn.close()
        with pytest.raises(ConnectionError):
            fut.result(timeout=10)
    with pytest.raises(ConnectionError):
        ep.call("resumeWeights", {"modelId": "w-1"})


def test_handlers_take_descriptors_and_reply_with_them():
    """The endpoint's descriptor ownership: what a handler leaves is closed; WithFds replies."""
    import socket

    a, b = socket.socketpair()
    seen = []

    def handler(action, data, fds):
        seen.append(len(fds))
        kept = fds.pop()  # taken: the endpoint leaves it open
        return E.WithFds({"kept": True}, [kept])

    ep = E.Endpoint(E.SocketTransport(b), handler)
    threading.Thread(target=ep.serve, daemon=True).start()
    from conftest import FakeDaemon

    d = FakeDaemon(a)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    d.send(P.request("d1", "trimCache"), fds=[w1, w2])
    os.close(w1), os.close(w2)
    reply, fds = d.read_any()
    assert reply.body["data"] == {"kept": True} and reply.fds == 1 and len(fds) == 1 and seen == [2]
    os.write(fds[0], b"x")  # the descriptor the handler passed back is the pipe's write end
    assert os.read(r2, 1) == b"x"
    os.close(fds[0])
    for r in (r1, r2):
        select.select([r], [], [], 5)
        assert os.read(r, 1) == b""  # every copy of both write ends is closed
        os.close(r)
    d.close()


def test_grant_pieces_must_tile_the_mapping_and_come_with_a_descriptor_each():
    assert W.grant_pieces(grant()) == [(0, SIZE)], "no pieces: one covering the mapping"
    two = grant(handle="cudaVmm", deviceId="cuda:0", pieces=[{"offset": 0, "bytes": 1024}, {"offset": 1024, "bytes": 3072}])
    assert W.grant_pieces(two) == [(0, 1024), (1024, 3072)]
    for bad in ([{"offset": 0, "bytes": 1024}, {"offset": 2048, "bytes": 2048}],  # a gap
                [{"offset": 0, "bytes": 1024}],  # short of the mapping
                [{"offset": 0, "bytes": 4096}, {"offset": 4096, "bytes": 1}]):  # past it
        with pytest.raises(P.ProtocolError) as e:
            W.grant_pieces(grant(pieces=bad))
        assert e.value.code == P.INVALID_DATA
    with pytest.raises(P.ProtocolError) as e:
        P.check_data("WeightsGrant", grant(pieces=[{"offset": 0, "bytes": 0}]))
    assert e.value.code == P.INVALID_DATA
    # Two descriptors for a grant of one piece: refused, and both closed.
    (r1, w1), (r2, w2) = os.pipe(), os.pipe()
    with pytest.raises(P.ProtocolError) as e:
        W.Weights(grant(), [w1, w2])
    assert e.value.code == P.INVALID_DATA and "descriptor" in e.value.message
    assert os.read(r1, 1) == b"" and os.read(r2, 1) == b"", "both write ends were closed"
    os.close(r1)
    os.close(r2)
