"""The proxy's page at ``/`` in a real browser: headless Chromium (Debian's ``chromium`` package), DevTools protocol.

The page is driven as a user would: pick a profile, ask, and both answers stream in side by side;
the steered answer must equal the API's answer for that profile, the plain one the large model's
own. Skipped (with the reason) when no Chromium is installed. ``COSTEER_PROXY_SCREENSHOT=path.png``
also saves the screenshot there (``docs/proxy_page.png`` was made this way).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from test_proxy import CONTEXTS, PROMPTS, chat, pair, profiles, proxy_for, runner  # noqa: F401 (fixtures)
from test_split import FakeVLLM

websockets_sync = pytest.importorskip("websockets.sync.client")
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
# Skipped only off CI (a developer's machine without Chromium); CI installs it (scripts/test.sh) and must run it.
pytestmark = pytest.mark.skipif(BROWSER is None and os.environ.get("CI") != "true",
                                reason="no Chromium installed (apt-get install -y chromium)")


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol (JSON over a websocket)."""

    def __init__(self, profile_dir: Path):
        self.proc = subprocess.Popen([BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                      "--disable-extensions", "--window-size=1280,860", "--remote-debugging-port=0",
                                      "--remote-debugging-address=127.0.0.1", f"--user-data-dir={profile_dir}",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = profile_dir / "DevToolsActivePort", time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert self.proc.poll() is None and time.monotonic() < deadline, "Chromium did not start"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        while True:
            pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(websockets_sync.connect(pages[0]["webSocketDebuggerUrl"], max_size=64 << 20))
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while not self.js(expression):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.1)

    def close(self):
        self.stack.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_the_page_in_a_real_browser(pair, runner, profiles, tmp_path):  # noqa: F811 (the fixtures above)
    question, n_new = PROMPTS[0], 12
    with FakeVLLM(pair[0], pair[2]) as fake, proxy_for(fake.url, runner, profiles=profiles) as proxy:
        steered = chat(proxy, question, profile="alice", max_tokens=n_new).choices[0].message.content
        plain = chat(proxy, question, max_tokens=n_new, extra_body={"costeer_plain": True}).choices[0].message.content
        inline = chat(proxy, question, CONTEXTS[2], max_tokens=n_new).choices[0].message.content
        browser = Browser(tmp_path / "chromium")
        try:
            # a user picks the profile "alice" and asks (the form is filled from the address, then Ask runs)
            browser.call("Page.enable")
            browser.call("Page.navigate", url=f"{proxy.url}/?profile=alice&max_tokens={n_new}&temperature=0&q="
                                              + httpx.QueryParams({"q": question})["q"].replace(" ", "%20")
                                              + "&autorun=1")
            browser.wait("document.body && document.body.dataset.done === '1'")
            assert browser.js("document.getElementById('profile').value") == "alice"
            assert browser.js("getComputedStyle(document.getElementById('inline_row')).display") == "none"
            assert browser.js("[...document.getElementById('profile').options].map(o => o.value)") == [
                "alice", "bob", "secret", "zoe", ""]
            assert browser.js("document.getElementById('steered').textContent") == steered
            assert browser.js("document.getElementById('plain').textContent") == plain
            assert browser.js("document.getElementById('steered').dataset.done") == "1"
            assert "tokens" in browser.js("document.getElementById('steered_meta').textContent")
            png = browser.call("Page.captureScreenshot", format="png")["data"]
            # then switches to an inline context and asks again by clicking
            browser.js(f"""(() => {{ const s = document.getElementById('profile'); s.value = '';
                s.dispatchEvent(new Event('change'));
                document.getElementById('inline').value = {json.dumps(CONTEXTS[2])};
                document.body.dataset.done = ''; document.getElementById('ask').click(); }})()""")
            browser.wait("document.body.dataset.done === '1'")
            assert browser.js("getComputedStyle(document.getElementById('inline_row')).display") != "none"
            assert browser.js("document.getElementById('steered').textContent") == inline
            assert browser.js("document.getElementById('plain').textContent") == plain
        finally:
            browser.close()
    import base64

    data = base64.b64decode(png)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    (tmp_path / "page.png").write_bytes(data)
    if os.environ.get("COSTEER_PROXY_SCREENSHOT"):
        Path(os.environ["COSTEER_PROXY_SCREENSHOT"]).write_bytes(data)
