#!/usr/bin/env python3
"""The Windows daemon under Wine, called from Linux (scripts/test-windows runs it under Xvfb):
memwarden.exe serves the REST API with host memory from Windows (status from
GlobalMemoryStatusEx; `host` and `pinned` allocations through VirtualAlloc and VirtualLock: bytes
written, read back and compared, then freed), lists the Direct3D 12 adapter as d3d12:0 with
DXGI's figures, and memwarden.exe's own `status` prints them. Exits non-zero on any failure.

    scripts/windows/smoke.py target/x86_64-pc-windows-gnu/debug/memwarden.exe
"""
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    exe = os.path.abspath(sys.argv[1])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    d = tempfile.mkdtemp(prefix="mw-wine-")
    config = os.path.join(d, "config.toml")
    with open(config, "w") as f:
        f.write(f'listen = "127.0.0.1:{port}"\n[workers]\nenabled = false\n')
    log = open(os.path.join(d, "daemon.log"), "w")
    daemon = subprocess.Popen(["wine", exe, "serve", "--config", "Z:" + config.replace("/", "\\")], stdout=log, stderr=log)

    def api(method, path, body=None, raw=None, ctype="application/json"):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(url + path, method=method, data=data, headers={"Content-Type": ctype})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["data"]

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status = api("GET", "/api/memory/status")
                break
            except OSError:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise SystemExit(f"the Windows daemon did not answer: {open(log.name).read()[-2000:]}")
                time.sleep(0.5)
        started = time.monotonic()
        cpu = next(dv for dv in status["devices"] if dv["deviceId"] == "cpu")
        assert cpu["source"] == "GlobalMemoryStatusEx", cpu
        assert 0 < cpu["availableMemory"] <= cpu["totalMemory"], cpu
        print(f"status: cpu {cpu['totalMemory'] >> 20} MiB total, {cpu['availableMemory'] >> 20} MiB available, "
              f"from {cpu['source']}")
        # Direct3D 12 (under Xvfb, Wine's vkd3d over lavapipe): d3d12:0 with DXGI's figures; no
        # memory type yet, so an allocation there is refused by name.
        d3d = next((dv for dv in status["devices"] if dv["deviceId"] == "d3d12:0"), None)
        assert d3d is not None, [b for b in status["backends"] if b["name"] == "d3d12"]
        assert d3d["source"] in ("dxgi-budget", "dxgi-dedicated") and d3d["totalMemory"] > 0, d3d
        print(f"status: d3d12:0 {d3d['name']!r}, {d3d['totalMemory'] >> 20} MiB, {d3d['availableMemory'] >> 20} MiB "
              f"available, from {d3d['source']}")
        try:
            api("POST", "/api/memory/allocations/allocate", {"sizeBytes": 1 << 20, "deviceId": "d3d12:0"})
            raise AssertionError("an allocation on d3d12:0 succeeded without blocks")
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
            assert e.code == 400 and body["error"]["code"] == "INVALID_ARGUMENT", body
            print(f"d3d12:0 allocation: {e.code} {body['error']['code']}: {body['error']['message']}")
        payload = os.urandom(1 << 20)
        for kind in ("host", "pinned"):
            a = api("POST", "/api/memory/allocations/allocate", {"sizeBytes": 64 << 20, "memoryType": kind, "deviceId": "cpu"})
            api("PUT", f"/api/memory/allocations/{a['allocationId']}/data?offset=4096", raw=payload,
                ctype="application/octet-stream")
            back = api("GET", f"/api/memory/allocations/{a['allocationId']}/data?offset=4096&length={len(payload)}")
            assert base64.b64decode(back["dataBase64"]) == payload, f"{kind}: the bytes read back differ"
            freed = api("DELETE", f"/api/memory/allocations/{a['allocationId']}")
            assert freed["freedBytes"] == 64 << 20, freed
            print(f"{kind}: 64 MiB allocated at {a['address']}, 1 MiB written and read back equal, freed")
        out = subprocess.run(["wine", exe, "--url", url, "status"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "host memory" in out.stdout, out.stdout + out.stderr
        print("memwarden.exe status:\n" + "\n".join(out.stdout.splitlines()[:4]))
        print(f"the checks took {time.monotonic() - started:.1f} s after the daemon answered")
        return 0
    finally:
        daemon.terminate()
        # The Windows process outlives its `wine` launcher: end every process of the prefix.
        subprocess.run(["wineserver", "-k"], check=False)
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()


if __name__ == "__main__":
    sys.exit(main())
