"""A viewer that vanishes for real (its process killed: no DELETE, no DTLS close,
no ICE goodbye) is freed once it has been silent for VIEWER_SILENCE, not after aioice's 30 s."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from relay.webrtc.sessions import LIVENESS_CHECK, VIEWER_SILENCE

ROOT = Path(__file__).resolve().parent.parent

VIEWER = """
import asyncio, sys
import aiohttp
from relay.webrtc.borrowed import restrict_host_addresses
from relay.webrtc.whepclient import WhepViewer

async def main():
    restrict_host_addresses(["127.0.0.1"])
    async with aiohttp.ClientSession() as http:
        v = WhepViewer(sys.argv[1], http)
        await v.connect()
        await v.read_frames(3)
        print("watching", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""

DEADLINE = VIEWER_SILENCE + LIVENESS_CHECK + 3  # a little slack for a busy test machine


async def test_a_killed_viewer_is_freed_once_silent(relay_server, caplog):
    relay = relay_server.relay
    proc = subprocess.Popen(
        [sys.executable, "-c", VIEWER, relay_server.whep()], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line.strip() == "watching"
        assert relay.sessions.count() == 1
        proc.kill()  # no goodbye of any kind
        proc.wait()
        killed = time.monotonic()
        while relay.sessions.count():
            assert time.monotonic() - killed < DEADLINE, f"a vanished viewer still held after {DEADLINE:.0f} s"
            await asyncio.sleep(0.2)
        freed_after = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert relay.streams["cam0"].hub.subscribers == []
    assert freed_after > VIEWER_SILENCE - 1  # freed by the silence rule, not by some goodbye
    assert any("silent for" in r.getMessage() for r in caplog.records)
