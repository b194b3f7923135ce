"""The playground page at `/`, in headless Chromium (Debian's `chromium`): the server runs a tiny
model, the page opens with `?autorun=1`, streams a completion and colours every token by its
exit layer; the DOM it leaves and a screenshot are checked. Without /usr/bin/chromium the
browser tests skip (this test installs nothing).
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from urllib.parse import urlencode

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from tests.test_server import build_checkpoint, start_server, stop_server  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
API_KEY = "play-key"
# Kept for people to look at when PLAYGROUND_SCREENSHOT names a file (nothing is written otherwise).
SCREENSHOT = os.environ.get("PLAYGROUND_SCREENSHOT")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,860"]  # fmt: skip
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent: apt-get install chromium to run the browser tests"
)


def sharpen_exits(ckpt: str, out: str) -> str:
    """The same weights with exit temperatures below 1: a random model's exits are then sure of
    some tokens and not others, so a sampled text leaves at a mix of layers (a readable screenshot)."""
    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.checkpointing import save_checkpoint
    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.model import EarlyExitGPT

    model, tok = load_checkpoint(ckpt)
    sharp = EarlyExitGPT(ModelConfig(**{**model.config.to_dict(), "exit_layer_temperature": [0.1, 0.08, 0.06]}))
    sharp.load_state_dict(model.state_dict())
    save_checkpoint(out, 0, sharp, tok)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("playground")
    ckpt = sharpen_exits(build_checkpoint(str(tmp)), str(tmp / "sharp"))
    proc, url = start_server(ckpt, "--api-key", API_KEY)
    yield url
    stop_server(proc)


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
    commands on its fd 3, replies on fd 4, NUL-separated JSON), so no websocket client is needed.
    `--dump-dom` alone cannot wait: it dumps before a streamed response has finished."""

    def __init__(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        cmd_r, self.cmd_w = os.pipe()
        self.out_r, out_w = os.pipe()
        # Park the child's ends on high numbers first: moving them straight to 3 and 4 could clobber
        # one with the other when the pipes themselves got fds 3 or 4.
        high = (os.dup2(cmd_r, 200), os.dup2(out_w, 201))
        for fd in (cmd_r, out_w):
            os.close(fd)
        shell = 'exec "$0" "$@" 3<&200 4>&201 200<&- 201>&-'
        args = [*FLAGS, "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "about:blank"]
        self.proc = subprocess.Popen(["/bin/bash", "-c", shell, CHROMIUM, *args], pass_fds=high,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        for fd in high:
            os.close(fd)
        self.buffer, self.next_id = b"", 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if method.split(".")[0] not in ("Target", "Browser"):
            msg["sessionId"] = self.session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.out_r], [], [], max(0.0, deadline - time.time()))
            if not ready:
                raise AssertionError("Chromium did not answer in time")
            chunk = os.read(self.out_r, 1 << 20)
            if not chunk:
                raise AssertionError("Chromium exited")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(line)

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str, until: str, timeout: float = 120) -> None:
        """Navigate and wait until the JS expression `until` is true."""
        self.call("Page.navigate", url=url)
        deadline = time.time() + timeout
        while not self.evaluate(until):
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {until}: {self.evaluate('document.body.innerText')}")
            time.sleep(0.2)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except AssertionError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self.cmd_w)
        os.close(self.out_r)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    b = Chromium()
    yield b
    b.close()


FINISHED = "['done', 'error'].includes(document.body.dataset.status)"


def page_url(server: str, **settings) -> str:
    return server + "/?" + urlencode({"api_key": API_KEY, "autorun": "1", "max_tokens": "16", **settings})


def test_page_is_guarded_by_the_api_key(server):
    assert httpx.get(server + "/").status_code == 401
    assert httpx.get(server + "/?api_key=wrong").status_code == 401
    for r in (httpx.get(server + "/", headers={"Authorization": f"Bearer {API_KEY}"}),
              httpx.get(server + f"/?api_key={API_KEY}")):  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "megatron-early-exit playground" in r.text
    # self-contained: nothing fetched from elsewhere
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", r.text) and "@import" not in r.text
    # the key in the address opens only the page; the API still wants the header
    assert httpx.get(server + f"/v1/models?api_key={API_KEY}").status_code == 401


@needs_chromium
@pytest.mark.parametrize("strategy,threshold", [("early_exit", "0"), ("off", "1")])
def test_generates_and_colours_tokens_by_exit_layer(server, browser, strategy, threshold):
    browser.open(page_url(server, strategy=strategy, threshold=threshold), FINISHED)
    assert browser.evaluate("document.body.dataset.status") == "done", browser.evaluate("$('error').textContent")
    spans = browser.evaluate(
        "[...document.querySelectorAll('#output .tok')].map(s => [s.dataset.layer, s.style.background, s.textContent])"
    )
    layers = [int(n) for s in spans for n in s[0].split()]
    assert len(layers) == 16  # max_tokens (the tiny model does not reach its end-of-text token here)
    counts = browser.evaluate(
        "Object.fromEntries([...document.querySelectorAll('#histogram .bar')]"
        ".map(b => [b.dataset.layer, Number(b.querySelector('.count').textContent)]))"
    )
    counts = {int(n): c for n, c in counts.items()}
    assert sum(counts.values()) == 16 and all(counts[n] == layers.count(n) for n in counts)
    assert "".join(s[2] for s in spans).strip()
    stat = lambda name: browser.evaluate(f"$('stat-{name}').textContent")  # noqa: E731
    if strategy == "early_exit":  # threshold 0: every token after the first (the prefill's) leaves at exit 1
        assert layers == [4] + [1] * 15 and counts == {1: 15, 2: 0, 3: 0, 4: 1}
        colours = {n: s[1] for s in spans for n in map(int, s[0].split())}
        assert len(set(colours.values())) == 2  # one colour per layer
        assert stat("early") == "94%" and stat("avg") == f"{(4 + 15) / 16:.2f}"
        assert re.fullmatch(r"[\d.]+x", stat("speedup")) and float(stat("full-tps")) > 0
    else:
        assert set(layers) == {4} and counts[4] == 16 and stat("avg") == "4.00" and stat("early") == "0%"


@needs_chromium
def test_screenshot(server, browser):
    settings = {"strategy": "early_exit", "threshold": "0.5", "temperature": "1", "max_tokens": "48"}
    url = page_url(server, prompt="Early exit lets easy tokens", **settings)
    browser.open(url, FINISHED)
    assert browser.evaluate("document.body.dataset.status") == "done", browser.evaluate("$('error').textContent")
    layers = browser.evaluate("[...document.querySelectorAll('#output .tok')].map(s => s.dataset.layer).join(' ')")
    # sampled without a seed: the model may draw its end-of-text token before 48 tokens
    assert 1 <= len(layers.split()) <= 48
    png = browser.screenshot()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a rendered page, not a blank one
    if SCREENSHOT:
        with open(SCREENSHOT, "wb") as f:
            f.write(png)
