#!/usr/bin/env python3
"""The dashboard in a real browser: headless Chromium driven by selenium (issue 16, item 3).

Run by scripts/browser-test, which installs Chromium, chromedriver and selenium and builds the
daemon. Starts its own daemons (workers off, a private shm dir, a free port):

1. without a token: the page loads with no console error; the figures match
   /api/memory/status within one refresh; an allocation made through the API appears without a
   reload; the Free, Clear cache and Unload buttons do what they say (checked through the API);
2. with `auth_token` set, and a /proc of the test's own (`host.proc_root`) whose meminfo it
   writes, so the host's utilization is what the test says whatever else runs: the page asks
   for the token (again after a wrong one, then never), every call carries it as the bearer
   header and no URL does; utilization crossing the thresholds shows up live as pressure events
   read from the /api/memory/events stream; a recommendation's Apply button works.

    scripts/browser_test.py --bin target/debug/memwarden [--screenshot docs/dashboard.png]
"""

import argparse
import calendar
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not download a driver or browser

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    ElementClickInterceptedException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

MIB = 1 << 20
FAST_S = 1.5  # the page's status refresh
SLOW_S = 5.0  # its models / recommendations / pressure refresh
TOKEN = "browser-test-token"


def log(msg):
    print(f"browser-test: {msg}", flush=True)


def fmt_bytes(n):
    """What the page prints for `n` bytes (app.js fmtBytes)."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    value, unit = float(abs(n)), 0
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    sign = "−" if n < 0 else ""
    if unit == 0:
        return f"{sign}{int(value)} B"
    digits = 0 if value >= 100 else 1 if value >= 10 else 2
    return f"{sign}{value:.{digits}f} {units[unit]}"


def rfc3339_ns(ts):
    """An RFC 3339 UTC time (any number of fraction digits) as comparable nanoseconds."""
    m = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?Z", ts)
    assert m, ts
    y, mo, d, h, mi, s = (int(x) for x in m.groups()[:6])
    return calendar.timegm((y, mo, d, h, mi, s)) * 10**9 + int((m.group(7) or "0").ljust(9, "0")[:9])


def wait_until(what, fn, timeout=10.0, interval=0.1):
    """Polls `fn` until it returns something truthy; fails naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = fn()
            if last:
                return last
        except (StaleElementReferenceException, NoSuchElementException, ValueError, TypeError) as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
        time.sleep(interval)


class Daemon:
    """`memwarden serve` on a free loopback port with its own config and shm dir."""

    def __init__(self, binary, root, name, token=None, extra="", host=""):
        self.work = os.path.join(root, name)
        os.makedirs(self.work)
        # Host allocations are files in this dir: on tmpfs (/dev/shm) like a real daemon's, not on
        # the disk under /tmp, which a CI machine's build outputs may have nearly filled.
        shm_parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else self.work
        self.shm = tempfile.mkdtemp(prefix=f"memwarden-browser-{name}-", dir=shm_parent)
        self.token = token
        config = os.path.join(self.work, "config.toml")
        with open(config, "w") as f:
            f.write('listen = "127.0.0.1:0"\n')
            if token:
                f.write(f'auth_token = "{token}"\n')
            f.write(f'[host]\nshared_memory_dir = "{self.shm}"\n{host}')
            f.write(f'[workers]\nenabled = false\nsocket = "{self.work}/memwarden.sock"\n')
            f.write("[optimizer]\nwatchdog = false\n")
            f.write(extra)
        self.out = open(os.path.join(self.work, "out.log"), "w+")
        self.err = open(os.path.join(self.work, "err.log"), "w+")
        self.proc = subprocess.Popen([binary, "serve", "--config", config], stdout=self.out, stderr=self.err)
        self.url = None
        deadline = time.monotonic() + 30
        while self.url is None:
            with open(self.out.name) as f:
                m = re.search(r"memwarden listening on (http://\S+)", f.read())
            if m:
                self.url = m.group(1)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                with open(self.err.name) as f:
                    sys.stderr.write(f.read())
                raise SystemExit("browser-test: the daemon did not start")
            else:
                time.sleep(0.05)
        log(f"daemon {name} at {self.url}")

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def ok(self, method, path, body=None, status=200):
        code, v = self.call(method, path, body)
        assert code == status, f"{method} {path}: {code} {v}"
        return v["data"]

    def cpu(self):
        return next(d for d in self.ok("GET", "/api/memory/status")["devices"] if d["deviceId"] == "cpu")

    def allocate(self, size, **fields):
        body = {"sizeBytes": size, "memoryType": "host", **fields}
        return self.ok("POST", "/api/memory/allocations/allocate/cpu", body, status=201)["allocationId"]

    def empty_block(self):
        """Leaves one cached pool block that holds no allocation: allocates small chunks until
        one opens a block of its own, then frees them all."""
        def blocks():
            return sum(p["blockCount"] for p in self.cpu()["pools"])
        chunks = []
        for _ in range(8):
            before = blocks()
            chunks.append(self.allocate(31 * MIB))
            if blocks() > before:
                break
        else:
            raise AssertionError("no chunk opened a new block")
        for c in chunks:
            self.ok("DELETE", f"/api/memory/allocations/{c}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.shm, ignore_errors=True)


class Page:
    """The browser, with the console log kept across reads (reading it drains it)."""

    def __init__(self, chromium, chromedriver):
        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1440,1000",
                    "--disable-extensions", "--no-first-run", "--disable-background-networking"]:
            opts.add_argument(arg)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)
        self.console = []

    def logs(self):
        self.console.extend(self.driver.get_log("browser"))
        return self.console

    def severe(self):
        return [e for e in self.logs() if e["level"] == "SEVERE"]

    def find(self, css):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def finds(self, css):
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def attr(self, css, name):
        return self.find(css).get_attribute(name)

    def click(self, css):
        def go():
            try:
                self.find(css).click()
                return True
            except ElementClickInterceptedException:
                return False
        wait_until(f"a clickable {css}", go, timeout=10)

    def confirm_click(self, css):
        """A destructive button: the first click arms it, the second runs it."""
        self.click(css)
        wait_until(f"{css} to ask for confirmation", lambda: self.find(css).text.startswith("Confirm"), timeout=3)
        self.click(css)

    def screenshot(self, path):
        height, chrome = self.driver.execute_script(
            "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]")
        self.driver.set_window_size(1440, max(900, min(int(height) + int(chrome), 4000)))
        time.sleep(0.6)  # let the layout settle at the new size
        self.driver.save_screenshot(path)
        self.driver.set_window_size(1440, 1000)
        log(f"screenshot: {path}")


CARD = '#devices [data-device="cpu"]'


def tiny_model(path, size):
    """A valid .safetensors file: one U8 tensor of `size` bytes."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + bytes(i % 251 for i in range(size)))


def check_figures_match(page, daemon, exact=False):
    """The card shows what /api/memory/status says, within one refresh of reading it. The host's
    used bytes move between two reads (other processes), so without `exact` they may differ by
    2 % of the total; a larger move is read again, up to three times."""
    for attempt in range(3):
        started = time.monotonic()
        want = daemon.cpu()

        def caught_up():
            shown = page.attr(CARD, "data-last-updated")
            return shown and rfc3339_ns(shown) >= rfc3339_ns(want["lastUpdated"])

        wait_until("the page to refresh after the API read", caught_up, timeout=2 * FAST_S + 2)
        elapsed = time.monotonic() - started
        assert elapsed <= 2 * FAST_S + 1.5, f"the page took {elapsed:.1f} s to show a new status"
        card = page.find(CARD)
        for attr, field in [("data-total", "totalMemory"), ("data-reserved", "reservedBytes"),
                            ("data-allocated", "allocatedBytes"), ("data-reservations", "reservationBytes")]:
            assert int(card.get_attribute(attr)) == want[field], f"{attr} {card.get_attribute(attr)} != {want[field]}"
        # What the operator reads is the same number, formatted.
        free = page.find(f'{CARD} [data-field="free"]')
        assert free.text == fmt_bytes(int(free.get_attribute("data-bytes"))), free.text
        assert page.find(f'{CARD} [data-field="free-sub"]').text == f"of {fmt_bytes(want['totalMemory'])}"
        pools = page.find(f'{CARD} [data-field="pools"]')
        assert int(pools.get_attribute("data-bytes")) == want["reservedBytes"]
        assert pools.text == fmt_bytes(want["reservedBytes"])
        used = int(card.get_attribute("data-used"))
        slack = 0 if exact else max(64 * MIB, want["totalMemory"] // 50)
        if abs(used - want["usedMemory"]) <= slack:
            log(f"figures match the API {elapsed:.1f} s after reading it")
            return
        log(f"used {used} on the page, {want['usedMemory']} in the API: the host moved; again")
    raise AssertionError("the page's used bytes never matched the API's")


def run_open(page, binary, root):
    """Without a token: load, figures, live allocation, Free / Clear cache / Unload buttons."""
    d = Daemon(binary, root, "open", extra="[pool]\nmax_pool_bytes = 1073741824\n")
    try:
        page.driver.get(d.url + "/")
        wait_until("the cpu card", lambda: page.attr(CARD, "data-total"), timeout=15)
        page.driver.execute_script("window.__sameDocument = true;")
        assert page.find("#token-dialog").get_attribute("hidden") is not None, "no token is configured"
        wait_until("the event stream", lambda: page.attr("#stream", "data-state") == "live")
        check_figures_match(page, d)

        # An allocation made through the API appears without a reload.
        alloc = d.allocate(64 * MIB, owner="browser-test", purpose="kv-cache")
        row = f'#allocations tr[data-allocation-id="{alloc}"]'
        started = time.monotonic()
        wait_until("the allocation's row", lambda: page.finds(row), timeout=2 * FAST_S + 2)
        wait_until("its range in the pool block map", lambda: page.finds(f'#pools [data-allocation-id="{alloc}"]'))
        wait_until("the card's pool figures",
                   lambda: int(page.attr(CARD, "data-allocated")) == d.cpu()["allocatedBytes"] >= 64 * MIB)
        assert page.driver.execute_script("return window.__sameDocument === true"), "the page was reloaded"
        assert page.find(f"{row} td:nth-child(4)").text == "64.0 MiB"
        log(f"the allocation appeared {time.monotonic() - started:.1f} s after it was made")
        check_figures_match(page, d)

        # Free, through its button.
        page.confirm_click(f'{row} button[data-action="free"]')
        wait_until("the API to forget the allocation", lambda: d.call("GET", f"/api/memory/allocation/{alloc}")[0] == 404)
        wait_until("the row to go", lambda: not page.finds(row))
        log("Free freed it")

        # Clear cache, through the device's button: a freed small allocation leaves its block cached.
        small = d.allocate(MIB)
        d.ok("DELETE", f"/api/memory/allocations/{small}")
        assert d.cpu()["reservedBytes"] > 0
        wait_until("the cached block on the card", lambda: int(page.attr(CARD, "data-reserved")) > 0)
        page.click(f'{CARD} button[data-action="clear"]')
        wait_until("the pools to be returned", lambda: d.cpu()["reservedBytes"] == 0)
        wait_until("the card to show it", lambda: int(page.attr(CARD, "data-reserved")) == 0)
        wait_until("a toast", lambda: "returned" in page.find("#toasts").text)
        log("Clear cache returned the cached block")

        # A model memwarden holds: listed, counted on the card, unloaded through its button.
        model_file = os.path.join(root, "tiny.safetensors")
        tiny_model(model_file, 2 * MIB)
        model = d.ok("POST", "/api/memory/models/load", {"path": model_file, "name": "tiny", "deviceId": "cpu"})["modelId"]
        mrow = f'#models tr[data-model-id="{model}"]'
        wait_until("the model's row", lambda: page.finds(mrow), timeout=SLOW_S + 3)
        wait_until("the card's model bytes", lambda: int(page.attr(f'{CARD} [data-field="models"]', "data-bytes")) >= 2 * MIB)
        assert page.find(f'{mrow} [data-state]').text == "resident"
        assert not page.finds(f'{mrow} button[data-action="park"]'), "cpu models cannot be parked"
        page.confirm_click(f'{mrow} button[data-action="unload"]')
        wait_until("the API to drop the model", lambda: not d.ok("GET", "/api/memory/models")["weights"])
        wait_until("the row to go", lambda: not page.finds(mrow), timeout=SLOW_S + 3)
        log("Unload unloaded the model")

        assert page.driver.execute_script("return window.__sameDocument === true"), "the page was reloaded"
        errors = page.severe()
        assert not errors, f"console errors: {errors}"
        log(f"no console errors ({len(page.logs())} console entries)")
    finally:
        page.driver.get("about:blank")  # nothing polls a stopped daemon
        d.stop()


class FakeProc:
    """A /proc holding only `meminfo` (`host.proc_root`): the test sets the host's utilization,
    so pressure changes come when it says, whatever else runs on the machine."""

    TOTAL = 64 << 30

    def __init__(self, root):
        self.path = os.path.join(root, "proc")
        os.makedirs(self.path)
        self.set(0.42)

    def set(self, utilization):
        available_kb = int(self.TOTAL * (1 - utilization)) // 1024
        text = (f"MemTotal: {self.TOTAL // 1024} kB\nMemFree: {available_kb} kB\n"
                f"MemAvailable: {available_kb} kB\nBuffers: 0 kB\nCached: 0 kB\n")
        tmp = os.path.join(self.path, "meminfo.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(self.path, "meminfo"))


def run_token(page, binary, root, screenshot):
    """With a token: the prompt, the bearer header; then pressure live from the stream, Apply."""
    proc = FakeProc(root)
    host = f'proc_root = "{proc.path}"\ncgroup_root = "{proc.path}"\n'
    d = Daemon(binary, root, "token", token=TOKEN, extra="[pool]\nmax_pool_bytes = 1073741824\n", host=host)
    try:
        page.driver.get(d.url + "/")
        dialog = "#token-dialog"
        wait_until("the token prompt", lambda: page.find(dialog).is_displayed(), timeout=10)
        assert page.attr("body", "data-prompts") == "1", page.attr("body", "data-prompts")
        assert not page.finds(f"{CARD}[data-total]"), "figures before a token"
        # A wrong token is refused and asked for again.
        page.find("#token-input").send_keys("not-the-token")
        page.click("#token-submit")
        wait_until("the prompt again", lambda: page.attr("body", "data-prompts") == "2" and page.find(dialog).is_displayed())
        assert "refused" in page.find("#token-error").text
        page.find("#token-input").send_keys(TOKEN)
        page.click("#token-submit")
        wait_until("the cpu card", lambda: page.finds(f"{CARD}[data-total]"), timeout=10)
        assert not page.find(dialog).is_displayed()
        wait_until("the event stream", lambda: page.attr("#stream", "data-state") == "live")
        time.sleep(2 * FAST_S + SLOW_S)  # every loop has called again with the token
        assert page.attr("body", "data-prompts") == "2", "the page asked again"
        assert page.driver.execute_script("return sessionStorage.getItem('memwarden.token')") == TOKEN
        urls = page.driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert urls and not [u for u in urls if TOKEN in u], urls
        assert TOKEN not in page.driver.page_source
        check_figures_match(page, d, exact=True)
        # A reload keeps the token (this tab's sessionStorage): no prompt.
        page.driver.refresh()
        wait_until("the cpu card after a reload", lambda: page.finds(f"{CARD}[data-total]"), timeout=10)
        time.sleep(FAST_S)
        assert page.attr("body", "data-prompts") == "0" and not page.find(dialog).is_displayed()
        log("the token was asked for (twice, one wrong), then sent on every call; no URL holds it")

        # Pressure, live from the stream (read with fetch(): it needs the bearer header).
        wait_until("the event stream", lambda: page.attr("#stream", "data-state") == "live")
        wait_until("the thresholds", lambda: page.finds(f'{CARD} [data-threshold="high"]'), timeout=SLOW_S + 3)
        thresholds = d.ok("GET", "/api/memory/pressure/cpu")["thresholds"]
        for name in ["moderate", "high", "critical"]:
            shown = float(page.attr(f'{CARD} [data-threshold="{name}"]', "data-value"))
            assert abs(shown - thresholds[name]) < 1e-9, (name, shown, thresholds[name])
        for u in [0.45, 0.5, 0.47, 0.55, 0.62, 0.6, 0.68, 0.74, 0.81, 0.86, 0.84, 0.9, 0.93]:
            proc.set(u)
            time.sleep(FAST_S)
        live = '#events li[data-event="pressure"][data-device="cpu"][data-live="1"]'
        wait_until("a live pressure event to moderate", lambda: page.finds(f'{live}[data-new-level="moderate"]'), timeout=10)
        wait_until("a live pressure event to high", lambda: page.finds(f'{live}[data-new-level="high"]'), timeout=10)
        wait_until("its marker on the timeline", lambda: page.finds(f'{CARD} circle[data-level="high"]'))
        wait_until("the card's level", lambda: page.attr(f'{CARD} [data-field="pressure"]', "data-level") == "high")
        log(f"the pressure changes arrived on the stream ({page.attr('body', 'data-stream-events')} events)")

        # Apply: a cached empty block under pressure is a clearCache recommendation.
        for owner, purpose, size in [("llama-70b", "kv-cache", 24), ("llama-70b", "kv-cache", 24),
                                     ("sd-server", "activations", 12), (None, "staging", 4)]:
            d.allocate(size * MIB, **({"owner": owner} if owner else {}), purpose=purpose)
        d.empty_block()
        model_file = os.path.join(root, "tiny.safetensors")
        tiny_model(model_file, 2 * MIB)
        d.ok("POST", "/api/memory/models/load", {"path": model_file, "name": "tiny-embedder", "deviceId": "cpu"})
        rec = '#recommendations li[data-type="clearCache"][data-device="cpu"]'
        wait_until("the clearCache recommendation", lambda: page.finds(rec), timeout=SLOW_S + 3)
        wait_until("the model's row", lambda: page.finds("#models tr[data-model-id]"), timeout=SLOW_S + 3)
        time.sleep(FAST_S)
        if screenshot:
            page.screenshot(screenshot)
        reserved = d.cpu()["reservedBytes"]
        page.click(f'{rec} button[data-action="apply"]')
        wait_until("the cached block to be returned", lambda: d.cpu()["reservedBytes"] < reserved)
        wait_until("the recommendation to go", lambda: not page.finds(rec), timeout=SLOW_S + 3)
        log("Apply carried out the recommendation")

        proc.set(0.45)
        wait_until("a live pressure event back to low", lambda: page.finds(f'{live}[data-new-level="low"]'), timeout=10)
        check_figures_match(page, d, exact=True)

        # The only console errors: the 401 answers that made the page ask for the token.
        errors = [e for e in page.severe() if not ("Failed to load resource" in e["message"] and " 401 " in e["message"])]
        assert not errors, f"console errors: {errors}"
        log("no console errors besides the 401 answers before the token")
    finally:
        page.driver.get("about:blank")
        d.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/debug/memwarden")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--chromedriver", default=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    ap.add_argument("--screenshot", help="save a full-page screenshot here (docs/dashboard.png)")
    args = ap.parse_args()
    # A TERM (scripts/browser-test's timeout) still stops the daemons and the browser.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    screenshot = os.path.abspath(args.screenshot) if args.screenshot else None
    root = tempfile.mkdtemp(prefix="memwarden-browser-")
    page = Page(args.chromium, args.chromedriver)
    try:
        log(f"{page.driver.capabilities.get('browserName')} {page.driver.capabilities.get('browserVersion')}")
        run_open(page, os.path.abspath(args.bin), root)
        page.logs()
        page.console.clear()
        run_token(page, os.path.abspath(args.bin), root, screenshot)
    finally:
        page.driver.quit()
        shutil.rmtree(root, ignore_errors=True)
    log("passed")


if __name__ == "__main__":
    main()
