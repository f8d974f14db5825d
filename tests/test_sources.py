"""Sources other than the live test pattern: a looped file, and a camera that is not there."""

import asyncio
import fractions
import logging
import time

import av

from relay.camera import pixelclock
from relay.config import StreamConfig
from relay.source import SourceSpec
from relay.webrtc.whepclient import WhepViewer, luma

from .conftest import make_config, start_relay

RECORDED_AT = 1_700_000_000_000  # the pixel clock the file carries in its first frame


def write_pattern_file(path, frames=45, fps=15):
    from relay.camera.testpattern import PatternRenderer

    renderer = PatternRenderer(640, 360)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(renderer.planes(RECORDED_AT + i * 1000 // fps), format="yuv420p")
            frame.pts, frame.time_base = i, fractions.Fraction(1, fps)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


async def test_file_source_loops_and_reaches_viewers(tmp_path, http):
    video = tmp_path / "pattern.mp4"
    write_pattern_file(video)
    config = make_config((StreamConfig("clip", SourceSpec("file", str(video))),), fps=15)
    runner, relay = await start_relay(config)
    viewer = WhepViewer(relay.whep("clip"), http)
    try:
        await viewer.connect()
        stamps = []
        for _ in range(60):  # more frames than the file has: it loops
            frame = await viewer.recv()
            stamps.append(pixelclock.read(luma(frame, 13)))
        assert all(t is not None for t in stamps)
        assert all(RECORDED_AT <= t < RECORDED_AT + 3000 for t in stamps)
        assert any(b < a for a, b in zip(stamps, stamps[1:], strict=False)), "the file looped"
        assert relay.relay.streams["clip"].encoders_running == 1
    finally:
        await viewer.close()
        await runner.cleanup()


async def test_missing_camera_is_retried_and_logged_without_touching_other_streams(http, caplog):
    config = make_config(
        (
            StreamConfig("ok", SourceSpec("test", "")),
            StreamConfig("gone", SourceSpec("v4l2", "/dev/video-does-not-exist")),
        )
    )
    with caplog.at_level(logging.INFO):
        runner, relay = await start_relay(config)
        try:
            gone = relay.relay.streams["gone"]
            deadline = time.monotonic() + 10
            while gone.stats.source_errors < 2 or gone.state != "no_signal":  # first retry after about 0.5 s
                assert time.monotonic() < deadline, "missing camera was not retried, or no slate"
                await asyncio.sleep(0.1)
            assert "cannot open /dev/video-does-not-exist" in gone.stats.last_error
            viewer = WhepViewer(relay.whep("ok"), http)
            try:
                await viewer.connect()
                samples = await viewer.read_frames(10)
                assert all(s.latency_ms is not None for s in samples)
            finally:
                await viewer.close()
            async with http.get(relay.base + "/api/v1/streams") as resp:
                by_name = {s["name"]: s for s in (await resp.json())["streams"]}
            assert by_name["gone"]["state"] == "no_signal" and by_name["ok"]["state"] == "live"
            assert by_name["gone"]["frames_slate"] > 0 and by_name["gone"]["encoders_running"] == 1
        finally:
            await runner.cleanup()
    assert "stream=gone source=v4l2:/dev/video-does-not-exist retry in" in caplog.text
