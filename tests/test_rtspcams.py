"""The test RTSP cameras send what they claim, read back over RTSP with PyAV as a relay reads them.

Tests of the simulator itself (``benchmarks/rtspcams.py``), so that tests of the relay can trust it: codec,
profile, GOP, B-frames, where the parameter sets travel, a size change within one session (on a timer or when
told), a camera that vanishes and returns, a looped clip, a camera server that asks for a password. The last
test has today's relay (which transcodes RTSP sources) serve a WHEP viewer from one of them.
"""

from __future__ import annotations

import asyncio
import threading
import time

import av
import pytest

from benchmarks.rtspcams import (
    PARAMETER_SETS,
    CameraServer,
    Encoding,
    LiveCamera,
    LoopedCamera,
    ResolutionChangeCamera,
    Watched,
    watch,
)
from relay.config import StreamConfig
from relay.source import parse_source_spec
from relay.webrtc.whepclient import WhepViewer
from tests.conftest import capture_ms, make_config, start_relay

FPS = 30  # every camera here; a GOP of g seconds is g * FPS access units
SHORT_GOP = 1.0
RELAY_OPENS_CAMERA = 30.0  # seconds: a failure, not a measurement (the relay retries a camera it cannot open)


def assert_pictures_carry_the_pixel_clock(seen: Watched, since_ms: int) -> None:
    """Every decoded picture shows a capture time, in order, none before the camera started."""
    clocks = [p.clock for p in seen.pictures]
    assert clocks and None not in clocks, clocks
    assert clocks == sorted(clocks) and clocks[0] >= since_ms


def test_high_profile_long_gop_sends_its_parameter_sets_in_the_sdp_only(start_camera):
    gop = 10.0
    since = int(time.time() * 1000)
    cam = start_camera("cam0", encoding=Encoding(profile="high", gop=gop))
    seen = watch(cam.url, keyframes=2)  # from one keyframe to the next: up to two GOPs of reading
    assert (seen.codec, seen.profile, seen.width, seen.height) == ("h264", "High", 640, 360)
    assert seen.keyframe_intervals == [gop * FPS]
    assert set(seen.sdp_nals) >= PARAMETER_SETS["h264"]  # sprop-parameter-sets
    assert seen.in_band_parameter_sets == []  # not before the IDRs, nor anywhere else
    assert not seen.reordered and "B" not in {p.kind for p in seen.pictures}
    assert_pictures_carry_the_pixel_clock(seen, since)


def test_b_frames_reorder_and_baseline_does_not(start_camera):
    with_b = start_camera("bframes", encoding=Encoding(profile="main", bframes=2, gop=SHORT_GOP))
    baseline = start_camera("baseline", encoding=Encoding(profile="baseline", gop=SHORT_GOP))
    seen = watch(with_b.url, units=2 * FPS)
    assert seen.profile == "Main"
    assert seen.reordered  # presentation order is not decode order ...
    assert "B" in {p.kind for p in seen.pictures}  # ... because there are B-frames
    seen = watch(baseline.url, units=2 * FPS)
    assert seen.profile == "Constrained Baseline"
    assert not seen.reordered and {p.kind for p in seen.pictures} <= {"I", "P"}
    assert seen.keyframe_intervals and set(seen.keyframe_intervals) == {SHORT_GOP * FPS}


@pytest.mark.parametrize("codec", ["h264", "h265"])
def test_repeated_parameter_sets_come_before_every_keyframe(start_camera, codec):
    cam = start_camera("cam0", encoding=Encoding(codec=codec, gop=SHORT_GOP, repeat_headers=True))
    seen = watch(cam.url, keyframes=3)
    keys = [i for i, u in enumerate(seen.units) if u.keyframe]
    assert seen.in_band_parameter_sets == keys
    for i in keys:
        nals = seen.units[i].nals
        assert set(nals[: len(PARAMETER_SETS[seen.codec])]) == PARAMETER_SETS[seen.codec], nals  # first, in front
    assert set(seen.sdp_nals) >= PARAMETER_SETS[seen.codec]  # and in the SDP as well


def test_h265_camera(start_camera):
    since = int(time.time() * 1000)
    cam = start_camera("cam0", encoding=Encoding(codec="h265", gop=SHORT_GOP))
    seen = watch(cam.url, keyframes=3)
    assert (seen.codec, seen.profile) == ("hevc", "Main")
    assert set(seen.sdp_nals) >= PARAMETER_SETS["hevc"] and seen.in_band_parameter_sets == []
    assert set(seen.keyframe_intervals) == {SHORT_GOP * FPS}
    assert_pictures_carry_the_pixel_clock(seen, since)


def test_resolution_changes_within_one_session(start_camera):
    sizes = ((640, 360), (960, 540))
    since = int(time.time() * 1000)
    cam = start_camera("cam0", ResolutionChangeCamera, sizes=sizes, every=2.0)
    seen = watch(cam.url, units=5 * FPS)  # one reader, one session: at least two changes
    shown = [(p.width, p.height) for p in seen.pictures]
    changes = [seen.pictures[i].unit for i in range(1, len(shown)) if shown[i] != shown[i - 1]]
    assert len(changes) >= 2 and set(shown) == set(sizes)
    for i in changes:  # each change is a keyframe whose new SPS and PPS come with it, in band
        assert seen.units[i].keyframe and set(seen.units[i].nals) >= PARAMETER_SETS["h264"], seen.units[i]
    assert_pictures_carry_the_pixel_clock(seen, since)


def test_a_resolution_change_comes_when_told_and_only_then(start_camera):
    sizes = ((640, 360), (512, 288))
    cam = start_camera("cam0", ResolutionChangeCamera, sizes=sizes, every=0)
    told: list[int] = []  # the access unit after which the camera was told to change

    def change_once(seen: Watched) -> bool:
        if not told and len(seen.units) == 2 * FPS:
            cam.change()
            told.append(len(seen.units))
        return len([p for p in seen.pictures if (p.width, p.height) == sizes[1]]) >= 2 * FPS

    seen = watch(cam.url, until=change_once)
    shown = [(p.width, p.height) for p in seen.pictures]
    first_new = shown.index(sizes[1])
    assert set(shown[:first_new]) == {sizes[0]} and set(shown[first_new:]) == {sizes[1]}  # once, and no way back
    unit = seen.units[seen.pictures[first_new].unit]
    assert seen.pictures[first_new].unit >= told[0] and unit.keyframe
    assert set(unit.nals) >= PARAMETER_SETS["h264"], unit  # the new SPS and PPS, in band


def test_a_camera_server_with_credentials_serves_only_who_has_them(tmp_path):
    with CameraServer(tmp_path, credentials=("admin", "s3cret")) as server:
        cam = LiveCamera(server, "cam0", encoding=Encoding(gop=SHORT_GOP))
        cam.start()  # publishes with them (its url has them), else the server would not have its stream
        try:
            assert cam.url.startswith(f"rtsp://admin:s3cret@127.0.0.1:{server.rtsp_port}/")
            with pytest.raises((av.FFmpegError, OSError)):  # 401 without them
                watch(cam.url.replace("admin:s3cret@", ""), units=1)
            assert len(watch(cam.url, units=FPS).units) == FPS
        finally:
            cam.stop()


def test_a_camera_that_vanishes_and_returns(start_camera, camera_server):
    cam = start_camera("cam0", encoding=Encoding(gop=SHORT_GOP))
    with av.open(cam.url, options={"rtsp_transport": "tcp"}, timeout=5) as reader:
        packets = reader.demux(video=0)
        next(packets)
        cam.kill()  # no TEARDOWN: the camera's process is gone
        assert not camera_server.ready("cam0")
        with pytest.raises((av.FFmpegError, OSError, StopIteration)):  # the reader's session ends with it
            for _ in range(10 * FPS):
                next(packets)
    with pytest.raises((av.FFmpegError, OSError)):
        watch(cam.url, units=1)  # nobody at that path now
    back = int(time.time() * 1000)
    cam.start()
    seen = watch(cam.url, units=FPS)
    assert_pictures_carry_the_pixel_clock(seen, back)


def test_a_looped_clip_plays_on_across_its_loop_point(start_camera, small_clip):
    from tests.cameras import CLIP_SECONDS

    cam = start_camera("cam0", LoopedCamera, clip=small_clip)
    seen = watch(cam.url, units=2 * CLIP_SECONDS * FPS)  # past the end of the clip at least once
    assert (seen.codec, seen.profile, seen.width, seen.height) == ("h264", "High", 640, 360)
    assert set(seen.keyframe_intervals) == {SHORT_GOP * FPS} and not seen.reordered
    pts = [u.pts for u in seen.units]
    assert {b - a for a, b in zip(pts, pts[1:], strict=False)} == {90_000 // FPS}  # no jump where it loops
    assert None not in [p.clock for p in seen.pictures]  # the clip carries the pixel clock it was made with


async def test_todays_relay_serves_a_whep_viewer_from_a_test_camera(start_camera, http):
    cam = start_camera("cam0", encoding=Encoding(profile="high", gop=SHORT_GOP))
    done = threading.Event()
    # The camera read directly all along: what it sent, to tell its pictures from the relay's slate.
    direct = asyncio.create_task(asyncio.to_thread(watch, cam.url, until=lambda _: done.is_set()))
    runner, relay = await start_relay(make_config((StreamConfig("cam0", parse_source_spec(cam.url)),)))
    viewer = WhepViewer(relay.whep("cam0"), http)
    try:
        stream = relay.relay.streams["cam0"]
        deadline = time.monotonic() + RELAY_OPENS_CAMERA
        while stream.stats.frames_captured == 0:  # the slate until the worker has the camera
            assert time.monotonic() < deadline, "the relay never got a frame from the camera"
            await asyncio.sleep(0.05)
        await viewer.connect()
        samples = await viewer.read_frames(3 * FPS, timeout=20)
    finally:
        done.set()
        await viewer.close()
        await runner.cleanup()
        sent = {p.clock for p in (await direct).pictures}
    clocks = [capture_ms(s) for s in samples]
    assert None not in clocks, clocks  # the pixel clock reads in every picture
    # The camera's pictures, through transcoding, in order. The relay's NO SIGNAL slate (its own clock) may show
    # while its worker opens the camera, or restarts it on a machine too busy to let it report in time.
    from_camera = [c for c in clocks if c in sent]
    assert len(from_camera) >= 2 * FPS and from_camera == sorted(from_camera)
