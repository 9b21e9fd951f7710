"""The web demo (ui/app.py) in a real browser (Playwright + Debian chromium) and through gradio_client, on top of
a real tritonserver serving the tiny model; plus the server going away and coming back."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trtqwen.cli import app as cli_app
from trtqwen.clients.client import DEFAULT_SYSTEM
from trtqwen.serve.server import port_free
from ui.backend import ERROR_MARK, Backend, conversation, message_text, precision_name

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
_taken: set[int] = set()


def free_port() -> int:
    for port in range(19500, 19600):
        if port not in _taken and port_free("127.0.0.1", port):
            _taken.add(port)
            return port
    pytest.fail("no free port in 19500-19599")


def start_ui(url: str, repo=None):
    from ui.app import launch

    demo, local = launch(url, repo=str(repo) if repo else None, port=free_port(), block=False)
    return demo, local.rstrip("/")


class Proxy:
    """A TCP forwarder to the real server's gRPC port that can be switched off (server down) and on (back)."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.target, self.port = (host, int(port)), free_port()
        self.sock: socket.socket | None = None
        self.conns: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(16)
        threading.Thread(target=self._accept, args=(self.sock,), daemon=True).start()

    def stop(self):
        if self.sock:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone leaves it listening)
            except OSError:
                pass
            self.sock.close()
            self.sock = None
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self.conns.clear()

    def _accept(self, sock):
        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture(scope="module")
def live_ui(served_tiny):
    demo, url = start_ui(served_tiny[0], served_tiny[2])
    yield url
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: `make install` installs Debian's chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, url, requested: list | None = None):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    if requested is not None:
        page.on("request", lambda r: requested.append(r.url))
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#msg textarea", timeout=30_000)
    return page


def send(page, text: str, max_tokens: int | None = None):
    if max_tokens is not None:
        box = page.locator("#max_tokens input[type=number]")
        box.fill(str(max_tokens))
        box.press("Tab")
    page.locator("#msg textarea").fill(text)
    page.locator("#msg textarea").press("Enter")


def bots(page):
    return page.locator("#chat [data-testid=bot]")


def wait_stats(page, pattern: str, timeout: float = 40):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = page.locator("#stats").inner_text()
        if re.search(pattern, s):
            return s
        time.sleep(0.05)
    pytest.fail(f"stats line never matched {pattern!r}; last: {s!r}")


def tokens(stats: str) -> int:
    return int(re.search(r"(\d+) tokens", stats).group(1))


def cancelled_on_server(repo: Path) -> int:
    """How many generations the served runtime logged as cancelled (it logs "cancelled after N tokens")."""
    return (repo / "tritonserver.log").read_text(errors="replace").count("cancelled after")


def test_browser_streams_stops_and_speaks_chinese(live_ui, browser, served_tiny):
    requested: list[str] = []
    page = open_page(browser, live_ui, requested)
    page.wait_for_function("document.querySelector('#info')?.innerText?.includes('online')", timeout=20_000)
    info = page.locator("#info").inner_text()
    assert "tensorrt_llm_bls" in info and "bf16" in info and "torch" in info, info

    # 1. an answer that grows in the DOM while the stats line fills
    send(page, "Hello! Tell me about yourself.", max_tokens=60)
    lengths = []
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if bots(page).count():
            lengths.append(len(bots(page).last.inner_text()))
        if re.search(r"\bdone\b", page.locator("#stats").inner_text()):
            break
        time.sleep(0.03)
    # (rendered markdown may shrink for a moment, e.g. when a "**" pair closes: count the steps up)
    steps_up = sum(b > a for a, b in zip(lengths, lengths[1:]))
    assert steps_up >= 3 and lengths[-1] > lengths[0], f"answer did not grow step by step: {lengths}"
    stats = wait_stats(page, r"\bdone\b")
    assert "first token" in stats and "tok/s" in stats and 0 < tokens(stats) <= 60, stats

    # 2. stop mid-stream: generation ends early and the page stays usable
    before = cancelled_on_server(served_tiny[2])
    send(page, "Write a very long story about a lighthouse keeper.", max_tokens=400)
    wait_stats(page, r"streaming.* (\d\d+) tokens")
    page.locator("#stop").click()
    stats = wait_stats(page, r"\bstopped\b", timeout=10)
    n = tokens(stats)
    assert 0 < n < 400, stats
    frozen = bots(page).last.inner_text()
    assert "[stopped]" in frozen
    time.sleep(0.5)
    assert bots(page).last.inner_text() == frozen, "text kept growing after stop"
    deadline = time.monotonic() + 15  # the server stopped generating too (tensorrt_llm_bls passes cancellation on)
    while cancelled_on_server(served_tiny[2]) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled_on_server(served_tiny[2]) > before, "the server went on generating after stop"

    # 3. Chinese, after the stop
    send(page, "你好！请用中文介绍一下长城。", max_tokens=30)
    stats = wait_stats(page, r"\bdone\b")
    assert tokens(stats) > 0
    assert "长城" in page.locator("#chat [data-testid=user]").last.inner_text()
    assert bots(page).count() == 3 and bots(page).last.inner_text().strip()

    outside = [u for u in requested if not u.startswith((live_ui, "data:", "blob:"))]
    assert len(requested) > 5 and not outside, f"the page fetched from outside: {outside[:5]}"  # no fonts, CDNs

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "ui.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")
    page.close()


def test_gradio_client_streams_and_users_get_their_own_stream(live_ui):
    from gradio_client import Client

    client = Client(live_ui, verbose=False)
    args = lambda msg, n: (msg, [], DEFAULT_SYSTEM, n, 0.7, 0.8, 20, 7)  # noqa: E731
    job = client.submit(*args("Say hello.", 40), api_name="/chat")
    answers = [message_text(out[1][-1]["content"]) for out in job if out[1]]
    assert len(answers) >= 3, answers
    assert all(b.startswith(a) for a, b in zip(answers, answers[1:])) and len(set(answers)) >= 3
    final = job.outputs()[-1]
    assert message_text(final[1][-1]["content"]).strip() and "done" in final[2]
    assert final[1][0]["role"] == "user" and message_text(final[1][0]["content"]) == "Say hello."

    # two users at once: the second streams while the first is still streaming (no queueing behind it)
    a, b = (client.submit(*args(f"user {i}", 120), api_name="/chat") for i in (1, 2))
    overlap = False
    while not (a.done() and b.done()):
        overlap |= any("streaming" in o[2] for o in a.outputs()[-1:]) and \
            any("streaming" in o[2] for o in b.outputs()[-1:]) and not a.done() and not b.done()
        time.sleep(0.02)
    assert overlap, "the two requests never streamed at the same time"
    assert "done" in a.outputs()[-1][2] and "done" in b.outputs()[-1][2]


def test_server_down_shows_error_then_recovers(served_tiny, browser):
    proxy = Proxy(served_tiny[0])  # nothing listens on its port yet: the server is "down"
    demo, url = start_ui(proxy.url)
    try:
        page = open_page(browser, url)
        page.wait_for_function("document.querySelector('#info')?.innerText?.includes('offline')", timeout=20_000)
        for attempt in (1, 2):
            send(page, "Is anyone there?", max_tokens=20)
            page.wait_for_function(f"document.querySelectorAll('#chat [data-testid=bot]').length == {attempt}")
            stats = wait_stats(page, r"error", timeout=20)
            assert "cannot reach" in stats, stats
            assert bots(page).count() == attempt and "unavailable" in bots(page).last.inner_text()
            assert page.locator("#msg textarea").input_value() == "Is anyone there?"  # kept, to send again
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "ui-server-down.png"), full_page=True)
        proxy.start()  # the server is back
        page.locator("#msg textarea").press("Enter")
        stats = wait_stats(page, r"\bdone\b")
        assert tokens(stats) > 0 and bots(page).count() == 3 and ERROR_MARK not in bots(page).last.inner_text()
        page.wait_for_function("document.querySelector('#info')?.innerText?.includes('online')", timeout=20_000)
        proxy.stop()  # and gone again, mid-session
        send(page, "Still there?", max_tokens=20)
        page.wait_for_function("document.querySelectorAll('#chat [data-testid=bot]').length == 4")
        assert "error" in wait_stats(page, r"error", timeout=20)
        page.close()
    finally:
        proxy.stop()
        demo.close()


def test_history_sent_as_chatml_skips_failed_turns():
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"{ERROR_MARK} down"},
               {"role": "user", "content": [{"type": "text", "text": "hello"}]},
               {"role": "assistant", "content": "Hi there\n\n*[stopped]*"}, {"role": "user", "content": "more"}]
    assert conversation(history) == [{"role": "user", "content": "hello"},
                                     {"role": "assistant", "content": "Hi there"}, {"role": "user", "content": "more"}]


def test_precision_names():
    assert precision_name("W4A16_AWQ", "float16") == "int4_awq" and precision_name(None, "bfloat16") == "bf16"
    assert precision_name("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", None) == "int8_sq" and precision_name(None, "float16") == "fp16"


def test_info_from_server_without_record(served_tiny):
    info = Backend(served_tiny[0]).info()
    assert info["status"] == "online" and info["served"] == "tensorrt_llm_bls"
    assert info["precision"] == "bf16" and info["tp"] == 1 and info["runtime"] == "python backend"
    assert Backend(served_tiny[0], model="ensemble").info()["served"] == "ensemble"
    off = Backend("127.0.0.1:1").info()
    assert off["status"] == "offline" and "cannot reach" in off["error"]


def test_cli_delegates_to_ui_app(monkeypatch):
    import ui.app

    calls = []
    monkeypatch.setattr(ui.app, "launch", lambda *a, **k: calls.append(k) or (None, ""))
    r = CliRunner().invoke(cli_app, ["ui", "--url", "127.0.0.1:19599", "--repo", "model_repo", "--port", "19598"])
    assert r.exit_code == 0, r.output
    assert calls[-1] == {"url": "127.0.0.1:19599", "model": None, "repo": "model_repo", "host": "127.0.0.1",
                         "port": 19598, "share": False, "concurrency": 16}
    r = CliRunner().invoke(cli_app, ["ui", "--share", "--model", "ensemble", "--host", "0.0.0.0"])
    assert r.exit_code == 0 and calls[-1]["share"] is True and calls[-1]["model"] == "ensemble"
    assert calls[-1]["host"] == "0.0.0.0"


def test_the_page_refuses_a_foreign_host_and_a_foreign_origin(live_ui):
    """DNS rebinding (evil.example resolving to 127.0.0.1) gets no page; a cross-origin request gets no CORS grant."""
    import urllib.error
    import urllib.request

    def get(path: str, **headers):
        req = urllib.request.Request(live_ui.rstrip("/") + path, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers)

    assert get("/")[0] == 200
    assert get("/", Host="evil.example:7860")[0] == 400
    status, headers = get("/config", Origin="http://evil.example")
    assert headers.get("access-control-allow-origin") in (None, "null") or status >= 400, headers
