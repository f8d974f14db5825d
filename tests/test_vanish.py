"""A viewer that vanishes for real (its process killed: no DELETE, no DTLS close,
no ICE goodbye) is freed by the relay's silence rule (VIEWER_SILENCE), not by aioice's
consent failure after 30 s. Which rule freed it is the relay's log line; how long it
took is benchmarks/churn.py's to measure."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path

from relay.webrtc.sessions import VIEWER_SILENCE

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

GONE_TIMEOUT = 60.0  # seconds to wait for the session to go: past aioice's 30 s, which must not be what frees it


async def test_a_killed_viewer_is_freed_once_silent(relay_server, caplog):
    caplog.set_level(logging.INFO, logger="relay")
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
        deadline = time.monotonic() + GONE_TIMEOUT
        while relay.sessions.count():
            assert time.monotonic() < deadline, "a vanished viewer is still held"
            await asyncio.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert relay.streams["cam0"].hub.subscribers == []
    # Freed by the silence rule, and by nothing else: no goodbye, no failed ICE consent.
    closed = [r.getMessage() for r in caplog.records if " closed (" in r.getMessage()]
    assert len(closed) == 1 and "closed (viewer silent)" in closed[0], closed
    assert any(f"silent for {VIEWER_SILENCE:.0f}s; viewer gone" in r.getMessage() for r in caplog.records)
