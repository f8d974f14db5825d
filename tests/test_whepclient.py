"""The WHEP client the tests and benchmarks read frames with (``relay.webrtc.whepclient``), against a real relay."""

from __future__ import annotations

import asyncio
import random

from relay.webrtc.whepclient import WhepViewer

from .conftest import TEST_FPS

CANCELS = 200  # on Python 3.11's wait_for about 2 % were swallowed: 200 miss it about once in a hundred runs
STOP_DEADLINE = 10.0  # seconds a cancelled reader gets to end: a deadline, not a measurement (it never ended)


async def test_a_task_reading_frames_stops_when_cancelled_even_as_a_frame_arrives(relay_server, http):
    """A task looping on ``recv`` is cancelled at random moments of the frame interval; every cancellation ends
    it (with wait_for, one that came as a frame did was swallowed, and the loop ran on for ever)."""
    viewer = WhepViewer(relay_server.whep(), http)
    stop = False  # how a reader that ignored its cancellation is stopped after all
    ended = 0
    try:
        await viewer.connect()
        await viewer.recv(timeout=STOP_DEADLINE)

        async def read() -> None:
            while not stop:
                await viewer.recv(timeout=STOP_DEADLINE)

        for _ in range(CANCELS):
            reader = asyncio.create_task(read())
            await asyncio.sleep(random.uniform(0, 2 / TEST_FPS))  # somewhere between frames, or as one comes
            reader.cancel()
            done, _ = await asyncio.wait([reader], timeout=STOP_DEADLINE)
            if not done:  # it ran on
                stop = True
                await asyncio.wait([reader], timeout=STOP_DEADLINE)
                break
            ended += reader.cancelled()
    finally:
        await viewer.close()
    assert ended == CANCELS, f"cancellation {ended + 1} of {CANCELS} was ignored: the reader ran on"
