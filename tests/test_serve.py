"""`rlsub-tui serve`: the explorer over textual-serve, driven through its websocket as a browser tab's script
would (the same JSON messages), and loaded in a real headless Chromium (Debian's, installed by `.ci/run`)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlsub_tui.cli.main import main

textual_serve = pytest.importorskip("textual_serve", reason="textual-serve is not installed (pip install '.[serve]')")
aiohttp = pytest.importorskip("aiohttp", reason="aiohttp (a textual-serve dependency) is not installed")

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(checkpoints, tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
    argv = [sys.executable, "-m", "rlsub_tui", "serve", str(checkpoints / "base"),
            *(str(checkpoints / r) for r in ("seed0", "seed1", "seed2")), "--port", str(port),
            "--export-dir", str(tmp_path)]
    # its own process group: teardown ends the server and every app process it started for a browser tab
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.2)
    yield port
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


async def _screen_text(ws, until: str, seconds: float = 60) -> str:
    """Collect what the app writes (terminal escapes and text) until `until` appears."""
    seen = ""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            msg = await asyncio.wait_for(ws.receive(), timeout=1)
        except asyncio.TimeoutError:
            continue
        if msg.type == aiohttp.WSMsgType.BINARY:
            seen += msg.data.decode("utf-8", errors="replace")
        elif msg.type == aiohttp.WSMsgType.TEXT:
            seen += msg.data
        elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            break
        if until in seen:
            return seen
    raise AssertionError(f"{until!r} never appeared; got {seen[-500:]!r}")


def test_serve_page_and_a_key_press_through_the_websocket(server):
    async def session():
        async with aiohttp.ClientSession() as http:
            page = await (await http.get(f"http://127.0.0.1:{server}/")).text()
            assert "rlsub-tui" in page and "/ws" in page
            async with http.ws_connect(f"http://127.0.0.1:{server}/ws?width=100&height=30") as ws:
                await ws.send_str(json.dumps(["resize", {"width": 100, "height": 30}]))
                await _screen_text(ws, "complete")  # the app's first screen, analysis done
                await ws.send_str(json.dumps(["stdin", "?"]))  # the help screen's title reaches us
                await _screen_text(ws, "which parameters did the runs update")

    asyncio.run(session())


def test_serve_refuses_bad_arguments_before_listening(checkpoints, capsys):
    base = str(checkpoints / "base")
    assert main(["serve", base, str(checkpoints / "seed0"), "--runs", "nothing*", "--port", "1"]) == 2
    assert "matches no run" in capsys.readouterr().err
    assert main(["serve", base, str(checkpoints / "seed0"), "--port", "70000"]) == 2
    assert "between 1 and 65535" in capsys.readouterr().err


# Records what the page's own script receives over its websocket, so the test can read the terminal's
# output (xterm.js draws it on a canvas, not in the DOM). Installed before any of the page's scripts run.
RECORD_WEBSOCKET = """
window.__received = [];
const Native = window.WebSocket;
window.WebSocket = function (...args) {
  const ws = new Native(...args);
  ws.addEventListener("message", async (event) => {
    const data = event.data;
    const text = typeof data === "string" ? data
      : new TextDecoder().decode(data instanceof Blob ? await data.arrayBuffer() : data);
    window.__received.push(text);
  });
  return ws;
};
window.WebSocket.prototype = Native.prototype;
Object.assign(window.WebSocket, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
"""

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,800"]


def _browser(profile: Path):
    """Debian's Chromium driven by selenium through Debian's chromedriver (no browser download)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("no Chromium and chromedriver on PATH (apt-get install chromium chromium-driver; .ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))


def _wait_received(driver, text: str, seconds: float = 40) -> str:
    deadline = time.monotonic() + seconds
    seen = ""
    while time.monotonic() < deadline:
        seen = "".join(driver.execute_script("return window.__received || [];"))
        if text in seen:
            return seen
        time.sleep(0.25)
    raise AssertionError(f"{text!r} never reached the browser; it got {seen[-500:]!r}")


@pytest.fixture
def browser(tmp_path):
    driver = _browser(tmp_path / "chromium-profile")  # skips, saying why, before any server starts
    yield driver
    driver.quit()


def test_serve_in_a_real_headless_browser(browser, server):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver = browser
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_WEBSOCKET})
    driver.set_page_load_timeout(20)
    driver.get(f"http://127.0.0.1:{server}/")
    assert "rlsub-tui" in driver.find_element(By.CSS_SELECTOR, ".intro").get_attribute("textContent")
    # the page's script opened the app's websocket and the first screen arrived, analysis done
    first = _wait_received(driver, "complete")
    assert "rlsub-tui" in first
    assert "-first-byte" in driver.find_element(By.TAG_NAME, "body").get_attribute("class")  # intro gone
    terminal = driver.find_element(By.CSS_SELECTOR, ".textual-terminal")
    assert terminal.size["width"] > 400 and terminal.size["height"] > 200
    assert driver.find_elements(By.CSS_SELECTOR, ".textual-terminal canvas")  # xterm drew on its canvas
    # a key typed into the page travels to the app, which answers with its help screen
    assert "which parameters did the runs update" not in first
    ActionChains(driver).move_to_element(terminal).click().send_keys("?").perform()
    _wait_received(driver, "which parameters did the runs update")
