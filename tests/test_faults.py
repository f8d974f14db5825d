"""A camera that dies, hangs or sends corrupt JPEGs: viewers stay connected and
keep receiving frames (the slate during the outage, video after), no reconnect."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from relay.camera import slate
from relay.config import StreamConfig
from relay.source import parse_source_spec
from relay.webrtc.whepclient import WhepViewer, luma

from .conftest import EncodedFrames, frame_clock, make_config, start_relay

FPS = 15


def is_slate(frame) -> bool:
    """The slate is flat dark grey below the band and its text; the pattern never is."""
    y = luma(frame)
    corner = y[y.shape[0] - y.shape[0] // 8 :, : y.shape[1] // 8]
    return bool(np.abs(corner.astype(int) - slate.BACKGROUND).mean() < 6)


async def watch(viewer: WhepViewer, stream, until, timeout: float = 30.0) -> list[tuple[bool, int | None]]:
    """Read frames until ``until(seen)``; per frame seen: was it the slate, and its pixel clock."""
    seen: list[tuple[bool, int | None]] = []
    deadline = time.monotonic() + timeout
    while not until(seen):
        assert time.monotonic() < deadline, f"timed out; stream state {stream.state}, {stream.stats}"
        frame = await viewer.recv()
        seen.append((is_slate(frame), frame_clock(frame)))
    return seen


def slate_shown(seen) -> bool:
    return any(slate for slate, _ in seen)


def video_back(seen) -> bool:
    """A second of video in a row, the slate before it."""
    return len(seen) >= FPS and not slate_shown(seen[-FPS:])


def faulty(query: str) -> tuple[StreamConfig, ...]:
    return (StreamConfig("cam0", parse_source_spec(f"test:640x360@{FPS}?{query}")),)


@pytest.mark.parametrize(
    ("query", "what"),
    [
        ("fault=die&after=30&down=3&times=1", "camera unplugged for 3 s"),
        ("fault=hang&after=30&down=20&times=1", "camera stops sending without an error"),
    ],
)
async def test_viewer_rides_through_a_camera_outage(http, query, what):
    runner, relay = await start_relay(make_config(faulty(query), fps=FPS))
    stream = relay.relay.streams["cam0"]
    viewer = WhepViewer(relay.whep(), http)
    try:
        with EncodedFrames(stream) as encoded:
            await viewer.connect()
            before = await watch(viewer, stream, slate_shown)
            during = await watch(viewer, stream, video_back)
            after = [is_slate(await viewer.recv()) for _ in range(FPS)]
            assert not slate_shown(before[:FPS]), "real video before the fault"
            assert stream.stats.frames_slate > 0, f"{what}: the slate was shown"
            assert not any(after), f"{what}: video came back by itself"
            # The stream kept running: every frame the relay encoded, the slate's too, reached the viewer.
            clocks = [clock for _, clock in before + during]
            assert None not in clocks
            missed = [c for c in encoded.clocks if clocks[0] <= c <= clocks[-1] and c not in set(clocks)]
            assert not missed, f"{what}: the viewer missed {len(missed)} frames"
        assert viewer.pc.connectionState == "connected"
        assert stream.stats.source_errors >= 1
        assert stream.stats.worker_restarts == 0  # handled inside the worker
    finally:
        await viewer.close()
        await runner.cleanup()


async def test_corrupt_jpegs_are_dropped_and_counted(http):
    runner, relay = await start_relay(make_config(faulty("fault=corrupt&every=5"), fps=FPS))
    stream = relay.relay.streams["cam0"]
    viewer = WhepViewer(relay.whep(), http)
    try:
        await viewer.connect()
        samples = await viewer.read_frames(3 * FPS)
        assert all(s.latency_ms is not None for s in samples)  # only whole pictures reach viewers
        deadline = time.monotonic() + 5
        while stream.stats.frames_dropped_corrupt < 3:  # counted in the worker, reported each second
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert stream.stats.frames_slate == 0
    finally:
        await viewer.close()
        await runner.cleanup()


async def test_a_killed_worker_is_restarted_and_viewers_keep_their_session(http):
    import os
    import signal

    runner, relay = await start_relay(make_config(fps=FPS))
    stream = relay.relay.streams["cam0"]
    viewer = WhepViewer(relay.whep(), http)
    try:
        await viewer.connect()
        await viewer.read_frames(FPS)
        os.killpg(stream.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while stream.stats.worker_restarts < 1 or stream.state != "live":
            assert time.monotonic() < deadline, "worker was not restarted"
            await asyncio.sleep(0.05)
        samples = await viewer.read_frames(FPS, timeout=10)  # the same session, frames again
        assert all(s.latency_ms is not None for s in samples)
        assert viewer.pc.connectionState == "connected"
    finally:
        await viewer.close()
        await runner.cleanup()


async def test_a_frozen_worker_is_killed_by_the_watchdog_and_replaced(http):
    import os
    import signal

    runner, relay = await start_relay(make_config(fps=FPS))
    stream = relay.relay.streams["cam0"]
    try:
        frozen = stream.pid
        os.killpg(frozen, signal.SIGSTOP)  # alive, but sends nothing: a hung process
        deadline = time.monotonic() + 30
        while stream.stats.worker_restarts < 1 or stream.state != "live":
            assert time.monotonic() < deadline, "frozen worker was not replaced"
            await asyncio.sleep(0.1)
        assert stream.stats.worker_stalls == 1
        assert stream.pid != frozen
        viewer = WhepViewer(relay.whep(), http)
        try:
            await viewer.connect()
            assert all(s.latency_ms is not None for s in await viewer.read_frames(5))
        finally:
            await viewer.close()
    finally:
        await runner.cleanup()


async def test_an_encoder_that_keeps_failing_is_not_live_and_shows_in_healthz(http, caplog):
    # A GOP of 3e13 frames (keyframe_interval far past what config.load allows) makes x264 refuse
    # to open: the real failure, reached by building the Config directly as a careless caller could.
    config = make_config(keyframe_interval=1e12)
    runner, relay = await start_relay(config, wait=False)
    stream = relay.relay.streams["cam0"]
    try:
        deadline = time.monotonic() + 30
        while stream.state != "encoder_error" or stream.stats.frames_captured < 120:
            assert time.monotonic() < deadline, f"state {stream.state}, {stream.stats}"
            await asyncio.sleep(0.1)
        async with http.get(relay.base + "/healthz") as resp:
            assert resp.status == 503
            assert await resp.json() == {"ok": False, "streams_not_live": ["cam0"], "streams_failing": ["cam0"]}
        async with http.get(relay.base + "/api/v1/streams") as resp:
            (cam,) = (await resp.json())["streams"]
        assert cam["state"] == "encoder_error" and cam["last_error"].startswith("encoder failed: ")
        assert stream.stats.frames_encoded == 0
        failures = [r for r in caplog.records if "encoder failed" in r.getMessage()]
        tracebacks = [r for r in caplog.records if "Traceback" in r.getMessage()]
        # 120 frames came in; the encoder was retried with backoff (0.5, 1, 2 s ...), not once per frame.
        assert 1 <= len(failures) and len(failures) * 10 <= stream.stats.frames_captured
        assert len(tracebacks) == 1
    finally:
        await runner.cleanup()
