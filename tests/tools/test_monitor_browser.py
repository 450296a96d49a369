"""The monitor in a real browser: headless Chromium over chromedriver's W3C WebDriver API.

A manager runs in this process with its monitor (token required); three
bus-node processes of three logical nodes each join it (``tools.cluster``).
Chromium loads the page, a screenshot is taken, and the test checks that the
page shows every node; then one node process is killed with SIGKILL and the
page, without a reload, must show its nodes failed within the heartbeat
deadline.  WebDriver is spoken with aiohttp, on the same event loop as the
manager, so the manager keeps serving while the test waits on the browser.

Chromium and chromedriver come from Debian (``scripts/test-deps.sh``); when
they are missing the test fails and says how to install them.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import subprocess
import time

import aiohttp
import psutil
import pytest

from bus.policy import TreeConfig
from manager.monitor import start_monitor
from manager.server import Manager
from tools import cluster

CHROMIUM = ("/usr/bin/chromium", "/usr/lib/chromium/chromium")
TOKEN = "browser-test-token"
INTERVAL = 0.5  # the monitor pushes a snapshot this often
HEARTBEAT, MISSES = 0.5, 3
PNG = b"\x89PNG\r\n\x1a\n"

# What the page shows: node name -> state, from the table and from the tree drawing.
PAGE_STATE = """
const rows = [...document.querySelectorAll('#nodes tbody tr[data-node]')].map(r => [r.dataset.node, r.dataset.state]);
const dots = [...document.querySelectorAll('#tree circle[data-state]')].map(c => [c.dataset.name, c.dataset.state]);
return {rows: Object.fromEntries(rows), dots: Object.fromEntries(dots), seq: Number(document.body.dataset.seq || 0),
        marker: window.__snsbusMarker || null, live: document.getElementById('live').textContent,
        navigations: performance.getEntriesByType('navigation').length};
"""


def _browser() -> tuple[str, str]:
    chromium = next((c for c in CHROMIUM if os.access(c, os.X_OK)), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail("headless Chromium is needed for this test: install Debian's chromium and chromium-driver "
                    "(`bash scripts/test-deps.sh`, which `make test` runs)", pytrace=False)
    return chromium, driver


class WebDriver:
    """Just enough of the W3C WebDriver protocol: a session, navigation, scripts, screenshots."""

    def __init__(self, driver: str, chromium: str, workdir):
        self.driver, self.chromium, self.workdir = driver, chromium, workdir
        self.proc: subprocess.Popen | None = None
        self.base = ""
        self.http: aiohttp.ClientSession | None = None
        self.session = ""

    async def start(self) -> None:
        port = cluster.free_port()
        self.base = f"http://127.0.0.1:{port}"
        home = self.workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "chromedriver.log", "wb")
        try:
            self.proc = subprocess.Popen([self.driver, f"--port={port}"], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env=dict(os.environ, HOME=str(home)))
        finally:
            log.close()
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        deadline = time.monotonic() + 20
        while True:
            try:
                async with self.http.get(self.base + "/status") as r:
                    if (await r.json())["value"]["ready"]:
                        break
            except (aiohttp.ClientError, KeyError, ValueError):
                pass
            assert self.proc.poll() is None, f"chromedriver exited; see {self.workdir / 'chromedriver.log'}"
            assert time.monotonic() < deadline, "chromedriver did not get ready within 20 s"
            await asyncio.sleep(0.1)
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": self.chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-extensions", "--window-size=1400,1100",
                     f"--user-data-dir={self.workdir / 'profile'}"]}}}}
        value = await self._call("POST", "/session", caps)
        self.session = value["sessionId"]

    async def _call(self, method: str, path: str, body=None):
        async with self.http.request(method, self.base + path, json=body) as r:
            data = await r.json()
        if r.status != 200:
            raise AssertionError(f"WebDriver {method} {path}: HTTP {r.status}: {data.get('value')}")
        return data["value"]

    async def get(self, url: str) -> None:
        await self._call("POST", f"/session/{self.session}/url", {"url": url})

    async def run(self, script: str, *args):
        return await self._call("POST", f"/session/{self.session}/execute/sync", {"script": script, "args": list(args)})

    async def screenshot(self, path) -> bytes:
        data = base64.b64decode(await self._call("GET", f"/session/{self.session}/screenshot"))
        path.write_bytes(data)
        return data

    async def stop(self) -> None:
        if self.session:
            try:
                await self._call("DELETE", f"/session/{self.session}")
            except (aiohttp.ClientError, AssertionError, asyncio.TimeoutError):
                pass
            self.session = ""
        if self.http is not None:
            await self.http.close()
            self.http = None
        if self.proc is not None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
            self.proc = None
        await asyncio.to_thread(_reap_browser, str(self.workdir))


def _reap_browser(workdir: str) -> None:
    """Chromium's helpers (crash handlers, zygotes) outlive chromedriver for a moment: wait, then kill
    by pid those whose command line names this test's directory (so never anyone else's browser)."""
    def ours():
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(workdir in part for part in p.info["cmdline"] or ()):
                    found.append(p)
            except (psutil.Error, TypeError):
                continue
        return found

    deadline = time.monotonic() + 5
    while ours() and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in ours():
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def _until(what: str, predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g}s")
        await asyncio.sleep(0.1)


def test_the_monitor_page_shows_every_node_and_a_kill_without_reload(tmp_path):
    chromium, driver = _browser()
    sdir = tmp_path / "cluster"

    async def go():
        from manager.keys import KeyService, KeyStore, local_cluster_keys

        cfg = TreeConfig(max_children=3, heartbeat=HEARTBEAT, misses=MISSES)
        keys = local_cluster_keys(sdir)  # CURVE, as bus-ctl up runs it: the nodes below pin this manager
        mgr = Manager(control="tcp://127.0.0.1:0", config=cfg, state_dir=tmp_path / "manager",
                      keys=KeyService(KeyStore(keys["keys"])))
        await mgr.start()
        mon = browser = None
        try:
            procs = await asyncio.to_thread(cluster.start_nodes, sdir, 9, per_process=3,
                                            join=mgr.link.control_endpoint)
            names = {f"{p['name']}-{i}" for p in procs for i in range(3)}

            async def joined():
                return {m.name for m in mgr.membership.alive()} >= names
            await _until("every node joins", joined, 30)
            mon = await start_monitor(mgr, token=TOKEN, trust_loopback=False, interval=INTERVAL, node_poll=1.0)
            browser = WebDriver(driver, chromium, tmp_path / "browser")
            await browser.start()
            await browser.get(f"{mon.url}?token={TOKEN}")

            async def shows_all():
                st = await browser.run(PAGE_STATE)
                ok = set(st["rows"]) == names == set(st["dots"]) and set(st["rows"].values()) == {"alive"}
                return st if ok else None
            before = await _until("the page lists every node, alive, in the table and the tree", shows_all, 20)
            assert before["live"] == "live"

            async def has_loads():
                return await browser.run("return [...document.querySelectorAll('#nodes tbody tr')]"
                                         ".every(tr => tr.children[7].textContent.includes('MiB'))")
            await _until("the node table shows memory from the proc poll", has_loads, 10)
            shot = await browser.screenshot(tmp_path / "monitor.png")
            assert shot.startswith(PNG) and len(shot) > 10_000
            await browser.run("window.__snsbusMarker = 'no reload'")

            victim = procs[1]
            killed = {f"{victim['name']}-{i}" for i in range(3)}
            t0 = time.monotonic()
            assert await asyncio.to_thread(cluster.kill_node, victim["pid"], state_dir=sdir)

            async def shows_failed():
                st = await browser.run(PAGE_STATE)
                failed = all(st["rows"].get(n) in ("dead", "unreachable") and
                             st["dots"].get(n) in ("dead", "unreachable") for n in killed)
                return st if failed else None
            deadline = cfg.dead_after + 2 * INTERVAL + 1.0  # detection + one push + the page's rendering
            after = await _until("the killed nodes turn failed on the page", shows_failed, deadline)
            took = time.monotonic() - t0
            assert took <= deadline, took
            assert after["marker"] == "no reload" and after["navigations"] == 1
            assert after["seq"] > before["seq"]

            async def survivors_alive():
                st = await browser.run(PAGE_STATE)
                return all(st["rows"].get(n) == "alive" for n in names - killed)
            await _until("the survivors stay (or come back) alive", survivors_alive, 10)
            shot = await browser.screenshot(tmp_path / "monitor-after-kill.png")
            assert shot.startswith(PNG)
            failed_rows = await browser.run(
                "return [...document.querySelectorAll('#nodes tbody tr.dead, #nodes tbody tr.unreachable')]"
                ".map(tr => tr.dataset.node)")
            assert set(failed_rows) == killed
        finally:
            if browser is not None:
                await browser.stop()
            if mon is not None:
                await mon.stop()
            await mgr.stop()
            await asyncio.to_thread(cluster.down, sdir, grace=1.0)

    asyncio.run(go())
