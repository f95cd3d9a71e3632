#!/usr/bin/env python3
"""Pressure detection latency and the monitor's CPU cost, against a real daemon.

    pressure_latency.py MEMWARDEN_BINARY DEVICE [TRIALS]

Starts `memwarden serve` with its `moderate` threshold a little above DEVICE's utilization now,
subscribes to /api/memory/events, and in each trial (1) takes memory up to just below the
threshold, (2) takes one more chunk that crosses it — torch on `cuda:N`, written bytes on
`cpu` — and (3) times from the end of that allocation call to the `moderate` event, then frees
and waits for `low`. Then it leaves the daemon idle for 10 s and reads the CPU time it used
(/proc/PID/stat), at the default sampling intervals. Standard library only (torch for GPUs).
"""
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import queue

CHUNK = 512 << 20


def get(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", path)
    return json.loads(c.getresponse().read())["data"]


def follow(port, out):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request("GET", "/api/memory/events")
    r = c.getresponse()
    while True:
        line = r.readline()
        if not line:
            return
        if line.startswith(b"data:"):
            out.put((time.monotonic(), json.loads(line[5:])))


def start(binary, config_text):
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    cfg.write(config_text)
    cfg.close()
    p = subprocess.Popen([binary, "serve", "--listen", "127.0.0.1:0", "--config", cfg.name],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    port = int(p.stdout.readline().strip().rsplit(":", 1)[1])
    return p, port


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    binary, device = sys.argv[1], sys.argv[2]
    trials = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    gpu = device.startswith("cuda")
    if gpu:
        import torch
        torch.cuda.init()
        torch.empty(1, device=device)  # create the context before measuring

    # Where the device is now, then a daemon whose moderate threshold is 4 chunks above it.
    probe, port = start(binary, "")
    st = get(port, f"/api/memory/pressure/{device}")
    probe.terminate(); probe.wait()
    total, u0 = st["totalMemory"], st["utilizationPercentage"] / 100
    margin = 4 * CHUNK / total
    moderate = u0 + margin
    cfg = (f"[pressure]\nmoderate = {moderate}\nhigh = {min(0.99, moderate + 0.3)}\n"
           f"critical = {min(0.995, moderate + 0.35)}\nhysteresis = {margin / 4}\n")
    daemon, port = start(binary, cfg)
    events = queue.Queue()
    threading.Thread(target=follow, args=(port, events), daemon=True).start()
    time.sleep(0.5)

    def wait_for(level, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            t, e = events.get(timeout=max(0.01, deadline - time.monotonic()))
            if e["deviceId"] == device and e["newLevel"] == level:
                return t

    latencies = []
    for _ in range(trials):
        # Up to just below the threshold: 3 chunks (moderate is 4 chunks above the start).
        if gpu:
            base = [torch.empty(CHUNK, dtype=torch.uint8, device=device) for _ in range(3)]
            torch.cuda.synchronize()
        else:
            base = [b"\x01" * CHUNK for _ in range(3)]
        time.sleep(0.2)
        # The crossing chunk (1.5 chunks, so noise cannot keep it below the threshold).
        if gpu:
            cross = torch.empty(CHUNK * 3 // 2, dtype=torch.uint8, device=device)
            torch.cuda.synchronize()
        else:
            cross = b"\x01" * (CHUNK * 3 // 2)
        t0 = time.monotonic()
        t1 = wait_for("moderate")
        latencies.append(max(0.0, t1 - t0))
        del base, cross
        if gpu:
            torch.cuda.empty_cache()
        wait_for("low")
    idle0, w0 = cpu_seconds(daemon.pid), time.monotonic()
    time.sleep(10)
    cpu = (cpu_seconds(daemon.pid) - idle0) / (time.monotonic() - w0)
    daemon.terminate(); daemon.wait()
    ms = sorted(x * 1e3 for x in latencies)
    print(f"pressure detection on {device}: {trials} trials, latency from the end of the crossing allocation "
          f"to the event: p50 {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms "
          f"(default sampler intervals: host 60 ms, GPU 20 ms)")
    print(f"daemon CPU while idle with the sampler running: {cpu * 100:.3f}% of one core")


if __name__ == "__main__":
    main()
