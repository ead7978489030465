"""`rlsub-tui serve`: the explorer over textual-serve, driven through its websocket as a browser tab's script
would (the same JSON messages); no real browser is started here."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlsub_tui.cli import main

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
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.2)
    yield port
    proc.terminate()
    proc.wait(10)


from test_ui import checkpoints  # noqa: E402,F401  (the fixture)


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
