"""H.264 passthrough: RTSP cameras and files whose H.264 reaches viewers, NVRs and recordings untouched.

Each camera is a test camera of ``benchmarks/rtspcams.py`` (the pixel-clock pattern encoded by libx264 or
libx265 as an IP camera would, its parameter sets in the SDP only) publishing into a camera server that asks
for a password (``camera_server`` below); the relay reads it with that password, as it reads an IP camera.
What a user would check: viewers decode frames whose pixel clocks read (the camera drew them; the relay never
re-drew them), the API says passthrough and no encoder, the worker counted no decode and no encode, and
sources browsers cannot take are transcoded with the reason given.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fractions
import itertools
import logging
import re
import threading
import time
from pathlib import Path

import av
import pytest

from benchmarks.chromium import PRESENTED, as_script, chromium, presented_clocks, wait_presented
from benchmarks.rtspcams import CameraServer, Encoding, ResolutionChangeCamera, Watched, watch
from relay import h264
from relay.config import RecordConfig, StreamConfig
from relay.source import PassthroughRefused, decide_mode, parse_source_spec
from relay.webrtc.whepclient import WhepViewer
from signalling.sdp import DECODES, h264_profile

from .conftest import frame_clock, make_config, start_relay
from .test_faults import is_slate

ROOT = Path(__file__).resolve().parent.parent
FPS = 30  # every test camera's, and the relay's
GOP_SECONDS = 3.0  # a keyframe every 3 s, as many IP cameras send
LONG_GOP_SECONDS = 10.0  # a keyframe every 10 s, the long end of what IP cameras send
LONG_GOP = round(LONG_GOP_SECONDS * FPS)  # in frames
CAMERA_LOGIN = ("admin", "cam-pa55word-9f3e")  # the cameras' user and password (the relay must never show it)
DEADLINE = 30.0  # seconds for what a test waits for: a deadline, not a measurement


# -- the decision, pure: what a source sends, and the mode asked for


HIGH = h264.parse_sps(bytes.fromhex("6764001eacb405017fcb08000003000800000301e078b175"))  # libx264 High, no B


@pytest.mark.parametrize(
    ("mode", "codec", "sps", "reorders", "passthrough", "reason"),
    [
        ("auto", "h264", HIGH, False, True, "source sends H.264 High 3.0 640x360 without B-frames"),
        ("passthrough", "h264", HIGH, False, True, "source sends H.264 High 3.0 640x360 without B-frames"),
        ("transcode", "h264", HIGH, False, False, "mode=transcode configured"),
        ("auto", "h264", HIGH, True, False, "source sends B-frames (pictures out of decode order): browsers'"),
        ("auto", "hevc", None, None, False, "source sends H.265: aiortc has no H.265 packetizer"),
        ("auto", "mjpeg", None, None, False, "source sends MJPEG"),
        ("auto", "test pattern", None, None, False, "the test pattern is drawn here"),
        ("auto", "mpeg4", None, None, False, "source sends mpeg4, not H.264"),
        ("auto", "h264", None, None, False, "source sends H.264 without a parameter set (SPS) to read"),
        ("auto", "h264", dataclasses.replace(HIGH, profile_idc=110), False, False, "source sends H.264 High 10:"),
        ("auto", "h264", dataclasses.replace(HIGH, frame_mbs_only=False), False, False, "source sends interlaced"),
    ],
)
def test_auto_passes_through_what_browsers_take_and_says_why_not(mode, codec, sps, reorders, passthrough, reason):
    decision = decide_mode(mode, codec, sps, reorders)
    assert decision.passthrough is passthrough and decision.reason.startswith(reason)
    assert decision.mode == ("passthrough" if passthrough else "transcode")


@pytest.mark.parametrize(
    ("codec", "sps", "reorders", "reason"),
    [
        ("h264", HIGH, True, "source sends B-frames"),
        ("hevc", None, None, "source sends H.265"),
        ("mjpeg", None, None, "source sends MJPEG"),
    ],
)
def test_passthrough_forced_on_what_browsers_cannot_take_is_refused_with_the_reason(codec, sps, reorders, reason):
    with pytest.raises(PassthroughRefused, match=f"^mode=passthrough is impossible: {reason}"):
        decide_mode("passthrough", codec, sps, reorders)


def test_a_cameras_timestamps_keep_their_spacing_on_the_wall_clock_and_jumps_start_afresh():
    from relay.camera.capture import SourceClock

    clock = SourceClock(resync=1.0)
    assert clock.wall_time(10.0, 1000.0) == 1000.0  # anchored at the first frame
    assert clock.wall_time(10.04, 1000.1) == pytest.approx(1000.04)  # the camera's spacing, not the network's
    assert clock.wall_time(10.08, 1000.11) == pytest.approx(1000.08)
    assert clock.wall_time(0.0, 1000.2) == 1000.2  # the file looped: anchored again
    assert clock.wall_time(None, 1000.3) == 1000.3  # no timestamp: when it came


def test_a_camera_slower_than_real_time_keeps_its_own_spacing_instead_of_jumping():
    """A camera (or link) delivering at 3/4 of real time: its frames fall behind the wall clock, but keep the
    spacing it gave them (stretched by at most the slew's 5 % while the lasting lag is taken back), so a
    receiver sees every frame one interval after the other and counts none lost; only a lag past ``max_lag``
    starts the mapping again."""
    from relay.camera.capture import CLOCK_SLEW, SourceClock

    clock = SourceClock(resync=1.0, max_lag=30.0)
    interval = 1 / 30
    stamps = [clock.wall_time(10.0 + i * interval, 1000.0 + i * interval / 0.75) for i in range(2000)]
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    lag = 1000.0 + 1999 * interval / 0.75 - stamps[-1]
    assert 10 < lag < 30  # far behind the wall clock by now, within the cap
    assert min(steps) == pytest.approx(interval) and max(steps) == pytest.approx(interval * (1 + CLOCK_SLEW))
    assert clock.anchors == 1
    for i in range(2000, 6000):  # on past the cap: anchored again, then the camera's spacing again
        clock.wall_time(10.0 + i * interval, 1000.0 + i * interval / 0.75)
    assert clock.anchors == 2


def test_a_slow_camera_clock_is_taken_back_gently_and_never_jumps():
    """A camera clock 1 % slow (far worse than a real one's tens of ppm), for 3 hours: the lag never grows past
    what one window holds, no frame's step is more than 5 % off the camera's, the mapping never starts again."""
    from relay.camera.capture import CLOCK_LAG_KEPT, CLOCK_LAG_WINDOW, CLOCK_SLEW, SourceClock

    clock = SourceClock()
    interval = 1 / 30
    previous = clock.wall_time(0.0, 0.0)
    worst_lag = worst_step = 0.0
    for i in range(1, 3 * 3600 * 30):
        now = i * interval * 1.01
        t = clock.wall_time(i * interval, now)
        worst_lag, worst_step = max(worst_lag, now - t), max(worst_step, t - previous)
        previous = t
    assert clock.anchors == 1
    assert worst_lag < CLOCK_LAG_KEPT + 2 * CLOCK_LAG_WINDOW * 0.01 + 0.05
    assert worst_step <= interval * (1 + CLOCK_SLEW) + 1e-9


def test_a_lasting_lag_that_drains_stops_the_slew():
    """Frames 3 s late for 20 s (the slew starts taking that back), then the backlog arrives at once: the slew
    stops as the lag goes (what it took back leaves frames a little ahead of when they came, well inside the
    resync bound), and the mapping never starts again."""
    from relay.camera.capture import CLOCK_LAG_KEPT, SourceClock

    clock = SourceClock()
    interval = 1 / 30
    clock.wall_time(0.0, 0.0)
    ahead = []
    for i in range(1, 1200):  # 40 s of frames
        source = i * interval
        now = source + 3.0 if source < 20 else max(20 + 3.0, source)  # late, then all at once, then on time
        ahead.append(clock.wall_time(source, now) - now)
    assert max(ahead) < CLOCK_LAG_KEPT and clock.anchors == 1


def test_a_stall_and_its_backlog_keep_the_cameras_spacing():
    from relay.camera.capture import SourceClock

    clock = SourceClock(resync=1.0)
    assert clock.wall_time(5.0, 100.0) == 100.0
    assert clock.wall_time(5.04, 101.5) == pytest.approx(100.04)  # 1.5 s late (a network stall)
    backlog = [clock.wall_time(5.04 + i * 0.04, 101.5 + i * 0.001) for i in range(1, 40)]  # then all at once
    assert backlog == pytest.approx([100.04 + i * 0.04 for i in range(1, 40)])
    assert clock.anchors == 1


@pytest.mark.parametrize(
    "source, now, why",
    [
        (9.0, 1000.2, "a step back: a file looped, a camera restarted"),
        (12.5, 1000.2, "a step forward of more than resync in the source's own time"),
    ],
)
def test_a_jump_in_the_sources_timeline_starts_the_mapping_again(source, now, why):
    from relay.camera.capture import SourceClock

    clock = SourceClock(resync=1.0)
    clock.wall_time(10.0, 1000.0)
    clock.wall_time(10.1, 1000.1)
    assert clock.wall_time(source, now) == now, why
    assert clock.anchors == 2


def test_timestamps_running_ahead_of_the_wall_clock_start_the_mapping_again():
    from relay.camera.capture import SourceClock

    clock = SourceClock(resync=1.0)
    clock.wall_time(10.0, 1000.0)
    t = [clock.wall_time(10.0 + i * 0.5, 1000.0 + i * 0.1) for i in range(1, 5)]  # a fast clock, 5x
    assert t[:2] == pytest.approx([1000.5, 1001.0])  # 0.4 and 0.8 s ahead: kept
    assert t[2] == pytest.approx(1000.3)  # 1.2 s ahead: anchored again at now
    assert clock.anchors == 2


# -- real cameras


@pytest.fixture
def camera_server(tmp_path):
    """``tests/cameras.py``'s camera server, with a password: ``start_camera`` makes its cameras here."""
    with CameraServer(tmp_path, credentials=CAMERA_LOGIN) as server:
        yield server


def live_camera(start_camera, gop: float = GOP_SECONDS, **encoding):
    """A live pixel-clock camera at 640x360, ``FPS``, a keyframe every ``gop`` seconds, encoded as ``encoding``
    says (``Encoding``'s fields: profile, bframes, codec), publishing."""
    return start_camera("cam", width=640, height=360, fps=FPS, encoding=Encoding(gop=gop, **encoding))


@contextlib.asynccontextmanager
async def relay_for(source: str, record: RecordConfig | None = None, **config):
    config = make_config((StreamConfig("cam", parse_source_spec(source)),), fps=FPS, **config)
    if record is not None:
        config = dataclasses.replace(config, record=record)
    runner, relay = await start_relay(config, wait=False)
    try:
        yield relay
    finally:
        await runner.cleanup()


async def passing_through(relay, name: str = "cam") -> None:
    """Once the stream carries the camera's own frames (before, it shows the slate: the camera's first IDR
    may be a GOP away)."""
    stream = relay.relay.streams[name]
    deadline = time.monotonic() + DEADLINE
    while not (stream.passthrough and stream.stats.frames_passed_through):
        assert time.monotonic() < deadline, f"not passed through: {stream.state} {stream.mode_reason}"
        await asyncio.sleep(0.05)


async def api(http, relay) -> dict:
    async with http.get(relay.base + "/api/v1/streams") as resp:
        return (await resp.json())["streams"][0]


async def clocks(viewer: WhepViewer, count: int) -> list[tuple[int | None, tuple[int, int]]]:
    """(pixel clock, size) of the next ``count`` frames the viewer decodes, after any slate it sees first (a
    stream shows it until the camera's first keyframe); the slate after that is an error."""
    out = []
    while len(out) < count:
        frame = await viewer.recv(timeout=DEADLINE)
        if is_slate(frame):
            assert not out, "the slate came back"
            continue
        out.append((frame_clock(frame), (frame.width, frame.height)))
    return out


def advancing(read: list[int | None]) -> bool:
    """Every clock reads, and each is later than the one before: frames in order, none re-drawn."""
    return None not in read and all(b > a for a, b in zip(read, read[1:], strict=False))


def answered_profile(answer: str) -> str:
    return re.search(r"a=fmtp:\d+ .*profile-level-id=([0-9a-f]{6})", answer)[1]


# The viewer offers High and Constrained Baseline (as Safari does): a Main camera goes to it as High, which
# decodes Main.
@pytest.mark.parametrize(
    ("profile", "profile_idc", "answered_idc"), [("baseline", "42", "42"), ("main", "4d", "64"), ("high", "64", "64")]
)
async def test_an_rtsp_camera_is_passed_through_to_a_webrtc_viewer(
    start_camera, http, profile, profile_idc, answered_idc
):
    camera = live_camera(start_camera, profile=profile)
    async with relay_for(camera.url) as relay:
        stream = relay.relay.streams["cam"]
        await passing_through(relay)
        before = await api(http, relay)  # until the camera's first IDR came, the slate showed
        viewer = WhepViewer(relay.whep("cam"), http)
        try:
            await viewer.connect()
            seen = await clocks(viewer, 2 * FPS)
            assert advancing([c for c, _ in seen]), seen
            assert {size for _, size in seen} == {(640, 360)}
            cam = await api(http, relay)
        finally:
            await viewer.close()
    assert (cam["mode"], cam["source_codec"], cam["encoder"], cam["encoders_running"]) == (
        "passthrough", "h264", "none", 0,
    )  # fmt: skip
    assert "without B-frames" in cam["mode_reason"]
    assert cam["profile_level_id"].startswith(profile_idc)
    # The answer names the profile it sends, at the level of the camera's SPS.
    answered = answered_profile(viewer.answer)
    assert (answered[:2], answered[4:]) == (answered_idc, cam["profile_level_id"][4:])
    # Since, every frame the hub carried was the camera's own: none decoded, none encoded, no keyframe forced.
    since = {key: cam[key] - before[key] for key in ("frames_passed_through", "frames_encoded", "keyframes_forced")}
    assert since["frames_passed_through"] == since["frames_encoded"] > 0  # (the first came from the cache)
    assert (since["keyframes_forced"], cam["frames_slate"] - before["frames_slate"]) == (0, 0)
    assert cam["frames_decoded"] == 0
    # The join asked a camera that cannot be asked for nothing: it started from the cached GOP.
    assert cam["join"] == "cached_gop" and cam["gop_cache"]["starts"] > before["gop_cache"]["starts"]
    assert stream.stats.worker_restarts == 0
    assert "***" in cam["source"] and camera.url.split("@")[0].split(":")[-1] not in cam["source"]


async def test_a_passed_through_camera_s_units_reach_the_hub_with_their_nal_units_places(start_camera):
    """The worker sends each of the camera's units with where its NAL units begin, as its depacketizer gathered
    them (moved where the parameter sets went in front of an IDR), and the relay publishes them with it: the
    viewers' packets and the RTSP publisher's whole NAL units are cut by them, no unit scanned. Every frame's
    places are where a scan finds its NAL units, keyframes' too."""
    camera = live_camera(start_camera, profile="high")
    async with relay_for(camera.url) as relay:
        stream = relay.relay.streams["cam"]
        await passing_through(relay)
        subscription = stream.hub.subscribe("test-nals", max_frames=10 * FPS)
        try:
            frames = [await asyncio.wait_for(subscription.get(), DEADLINE) for _ in range(2 * FPS)]
        finally:
            subscription.close()
    assert sum(f.keyframe for f in frames) >= 1
    assert [f.nals for f in frames] == [h264.nal_starts(f.data) for f in frames]


async def test_a_viewer_joining_mid_gop_sees_the_camera_before_its_next_keyframe(start_camera, http):
    """A camera with a 10 s GOP, joined 1 s into a GOP: the viewer's first picture comes from the relay's copy of
    the GOP, while the GOP it joined in is still the camera's current one (the cache has not been reset by a new
    keyframe), and from there every frame comes in order."""
    camera = live_camera(start_camera, LONG_GOP_SECONDS, profile="high")
    async with relay_for(camera.url) as relay:
        await passing_through(relay)
        deadline = time.monotonic() + DEADLINE
        while (cached := (await api(http, relay))["gop_cache"])["frames"] < FPS or cached["frames"] > LONG_GOP // 2:
            assert time.monotonic() < deadline, cached  # wait for a point 1 to 5 s into a GOP
            await asyncio.sleep(0.1)
        viewer = WhepViewer(relay.whep("cam"), http)
        try:
            await viewer.connect()
            seen = await clocks(viewer, 1)
            after = (await api(http, relay))["gop_cache"]
            seen += await clocks(viewer, FPS)
        finally:
            await viewer.close()
    assert after["frames"] >= cached["frames"], (cached, after)  # no camera keyframe yet when the first frame came
    assert after["starts"] == cached["starts"] + 1
    assert advancing([c for c, _ in seen]), seen


@contextlib.asynccontextmanager
async def watched_directly(url: str):
    """The camera read straight from its server all along (in a thread), from before the relay reads it: yields
    the ``Watched`` that fills as it goes, once its first picture came; stopped on exit."""
    done = threading.Event()
    seen: list[Watched] = []
    direct = asyncio.create_task(asyncio.to_thread(watch, url, until=lambda w: seen.append(w) or done.is_set()))
    try:
        await until(lambda: (seen and seen[0].pictures) or direct.done(), "a picture read from the camera directly")
        if direct.done():
            direct.result()  # its error, if it ended
        yield seen[0]
    finally:
        done.set()
        await direct


# The only payload type of Debian's Chromium's offer that decodes High is its High 4:4:4 one, numbered 41, in
# the lower dynamic range aiortc did not keep (relay.webrtc.borrowed.OFFERED_PAYLOAD_TYPES): this test found it.
@pytest.mark.browser
async def test_chromium_decodes_a_passed_through_high_profile_camera(start_camera, http):
    """Debian's headless Chromium opens the viewer page of a passed-through High camera: the answer names High,
    and the page presents the camera's own pictures (their pixel clocks are among those the camera drew), in
    order, with nothing decoded or encoded in the relay."""
    camera = live_camera(start_camera, profile="high")
    async with watched_directly(camera.url) as sent, relay_for(camera.url) as relay:
        await passing_through(relay)
        before = await api(http, relay)
        async with chromium() as browser:
            page = await browser.new_page()
            answers = []
            page.on(
                "response", lambda r: answers.append(r) if r.request.method == "POST" and "/whep/" in r.url else None
            )
            await page.add_init_script(as_script(PRESENTED))  # every frame it presents, from the first one on
            await page.goto(f"{relay.base}/view/cam")
            while not answers:  # the page posts its offer as it loads
                await asyncio.sleep(0.05)
            [response] = answers
            offer, answer = response.request.post_data, await response.text()
            assert response.status == 201, answer
            # The answer takes one of the offer's H.264 payload types, named as what decodes the camera's High.
            [(pt, answered)] = re.findall(r"a=fmtp:(\d+) .*profile-level-id=([0-9a-f]{6})", answer)
            assert re.search(rf"^a=rtpmap:{pt} H264/90000", offer, re.M), f"payload type {pt} is no H.264 of the offer"
            await wait_presented(page, 2 * FPS, DEADLINE * 1000)
            presented = await presented_clocks(page)
            await page.close()
        cam = await api(http, relay)
    drawn = {p.clock for p in sent.pictures}
    assert None not in drawn
    assert presented and set(presented) <= drawn, sorted(set(presented) - drawn)[:5]  # the camera's pictures
    assert presented == sorted(presented) and len(set(presented)) >= FPS  # in order, on and on (a frame may repeat)
    assert cam["profile_level_id"].startswith("64")  # the camera's SPS: High
    # Chromium on Linux offers no High: its High 4:4:4 Predictive decoder decodes High (tests/test_sdp.py).
    assert h264_profile(answered)[0] in DECODES["High"] and answered[4:] == cam["profile_level_id"][4:], answered
    assert (cam["mode"], cam["encoders_running"], cam["frames_decoded"]) == ("passthrough", 0, 0)
    assert cam["frames_slate"] == before["frames_slate"]


async def test_a_viewer_whose_offer_cannot_take_the_cameras_profile_gets_400_with_the_reason(start_camera, http):
    camera = live_camera(start_camera, profile="high")
    firefox = (ROOT / "tests" / "data" / "offer_firefox_153.sdp").read_text()  # Constrained Baseline only
    async with relay_for(camera.url) as relay:
        await passing_through(relay)
        async with http.post(relay.whep("cam"), data=firefox, headers={"Content-Type": "application/sdp"}) as resp:
            assert resp.status == 400
            reason = await resp.text()
        assert relay.relay.sessions.count() == 0
    assert reason.startswith("offer cannot take the stream's H.264 High 3.0 (64001e); it offers 42e01f"), reason


async def until(predicate, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("encoding", "reason"),
    [
        ({"bframes": 2}, "source sends B-frames (pictures out of decode order)"),
        ({"codec": "h265"}, "source sends H.265: aiortc has no H.265 packetizer"),
    ],
    ids=["b-frames", "h265"],
)
async def test_b_frames_and_h265_are_transcoded_and_the_api_says_why(start_camera, http, encoding, reason, caplog):
    camera = live_camera(start_camera, **encoding)
    caplog.set_level(logging.INFO)
    async with relay_for(camera.url) as relay:
        stream = relay.relay.streams["cam"]
        await until(lambda: stream.mode == "transcode", "transcoding the camera")
        viewer = WhepViewer(relay.whep("cam"), http)
        try:
            await viewer.connect()
            seen = await clocks(viewer, FPS)
            # The worker's counters come with its status, once a second: wait for the one after these frames.
            await until(lambda: stream.stats.frames_decoded > 0, "the decoded frames in the worker's status")
            cam = await api(http, relay)
        finally:
            await viewer.close()
    assert advancing([c for c, _ in seen]), seen  # the camera's pictures, decoded and encoded again
    assert (cam["mode"], cam["encoders_running"], cam["encoder"]) == ("transcode", 1, "libx264")
    assert cam["mode_reason"].startswith(reason)
    assert cam["frames_passed_through"] == 0 and cam["frames_decoded"] > 0
    assert f"stream=cam mode=transcode reason={reason}" in caplog.text


async def test_passthrough_forced_on_a_b_frame_camera_is_a_clear_error_not_a_crash(start_camera, http):
    camera = live_camera(start_camera, bframes=2)
    async with relay_for(f"{camera.url}#mode=passthrough") as relay:
        stream = relay.relay.streams["cam"]
        await until(lambda: stream.stats.source_errors >= 2, "the camera refused, and retried")
        await until(lambda: stream.stats.frames_slate > 0, "the slate meanwhile")
        cam = await api(http, relay)
    assert cam["last_error"].startswith("mode=passthrough is impossible: source sends B-frames")
    assert cam["state"] in ("retrying", "no_signal") and cam["frames_passed_through"] == 0
    assert cam["worker_restarts"] == 0 and cam["source"].endswith("#mode=passthrough")


async def test_a_new_resolution_mid_stream_reaches_the_viewer_and_starts_a_new_recording(start_camera, http, tmp_path):
    # One session whose size changes when the test says (every=0): new SPS and PPS in band with the next IDR.
    sizes = ((640, 360), (512, 288))
    camera = start_camera("cam", ResolutionChangeCamera, sizes=sizes, every=0, fps=FPS, gop=GOP_SECONDS)
    record = RecordConfig(enabled=True, root=str(tmp_path / "rec"), segment=60.0, snapshot_interval=0.0)
    async with relay_for(camera.url, record=record) as relay:
        await passing_through(relay)
        viewer = WhepViewer(relay.whep("cam"), http)
        try:
            await viewer.connect()
            before = await clocks(viewer, FPS)
            await asyncio.to_thread(camera.change)  # to 512x288
            after = []
            deadline = time.monotonic() + DEADLINE
            while len([s for _, s in after if s == (512, 288)]) < FPS:
                assert time.monotonic() < deadline, f"no second at the new size: {after[-3:]}"
                after += await clocks(viewer, 1)
            cam = await api(http, relay)
        finally:
            await viewer.close()
        recorder = relay.relay.recorders["cam"]
    assert {s for _, s in before} == {(640, 360)}
    sizes = [s for _, s in after]
    assert sizes == sorted(sizes, key=lambda s: s == (512, 288)), "the new size, once come, stays"
    assert advancing([c for c, _ in before + after]), "the same session went on: no frame re-drawn or lost order"
    assert (cam["width"], cam["height"], cam["mode"]) == (512, 288, "passthrough")
    assert cam["profile"].endswith("512x288") and cam["worker_restarts"] == 0
    # The recorder cut its segment where the parameter sets changed (its segments are a minute long): each
    # file plays at one size, with the camera's pixel clocks.
    assert recorder.segments_written >= 1  # the one cut; the last is finished as the relay stops
    segments = sorted((tmp_path / "rec" / "cam").glob("*/*.mp4"))
    assert len(segments) >= 2
    played = [decode(path) for path in segments]
    assert {size for frames in played for _, size in frames} == {(640, 360), (512, 288)}
    assert all(len({size for _, size in frames}) == 1 for frames in played)
    assert all(None not in [c for c, _ in frames] for frames in played)


def decode(path: Path) -> list[tuple[int | None, tuple[int, int]]]:
    with av.open(str(path)) as container:
        return [(frame_clock(f), (f.width, f.height)) for f in container.decode(video=0)]


async def test_rtsp_out_and_recordings_of_a_passthrough_stream_play_and_name_its_profile(start_camera, http, tmp_path):
    from .test_rtsp import read_rtsp, rtsp_url, wait_published

    camera = live_camera(start_camera, profile="high")
    record = RecordConfig(enabled=True, root=str(tmp_path / "rec"), segment=2.0, snapshot_interval=0.0)
    async with relay_for(camera.url, rtsp=True, record=record) as relay:
        await passing_through(relay)
        await wait_published(relay, "cam")
        url = rtsp_url(relay, "cam")
        read = await asyncio.to_thread(read_rtsp, url, 2 * FPS)
        announced = await asyncio.to_thread(announced_sps, url)
        recorder = relay.relay.recorders["cam"]
        await until(lambda: recorder.segments_written >= 2, "segments recorded")
        sps = relay.relay.streams["cam"].sps
    assert advancing(read), read
    assert announced == sps and sps.profile == "High"  # not the SPS of an encoder PyAV would have opened
    # Each segment plays, with the pixel clocks in order, and its avcC is the SPS of what it holds: the
    # camera's, or (before the camera's first keyframe) the slate's, in a segment of its own.
    played = {}
    for path in sorted((tmp_path / "rec" / "cam").glob("*/*.mp4")):
        frames = decode(path)
        assert frames and advancing([c for c, _ in frames]), path
        with av.open(str(path)) as container:
            avcc = h264.parse_avcc(bytes(container.streams.video[0].codec_context.extradata))
        played[path] = h264.parse_sps(avcc.sps[0]).profile
    assert list(played.values()).count("High") >= 1 and set(played.values()) <= {"High", "Constrained Baseline"}


def announced_sps(url: str) -> h264.Sps | None:
    """The SPS an RTSP server's SDP announces (its sprop-parameter-sets, as FFmpeg reads them)."""
    with av.open(url, options={"rtsp_transport": "tcp"}, timeout=10) as reader:
        return h264.sps_of(bytes(reader.streams.video[0].codec_context.extradata))


async def test_a_camera_that_vanishes_shows_the_slate_and_viewers_continue_when_it_returns(start_camera, http):
    camera = live_camera(start_camera, gop=1.0)
    async with relay_for(camera.url) as relay:
        stream = relay.relay.streams["cam"]
        await passing_through(relay)
        viewer = WhepViewer(relay.whep("cam"), http)
        try:
            await viewer.connect()
            before = await clocks(viewer, FPS)
            await asyncio.to_thread(camera.kill)  # unplugged: mediamtx drops the path, the relay's reads fail
            slate = 0
            while slate < FPS:  # a second of the slate, in the same session
                slate += is_slate(await viewer.recv(timeout=DEADLINE))
            await asyncio.to_thread(camera.start)  # back: publishing again
            after = await clocks(viewer, FPS)  # skips the slate until the camera's first keyframe
            connected = viewer.pc.connectionState
        finally:
            await viewer.close()
        await until(lambda: stream.encoders_running == 0, "the slate's encoder stopped")
        cam = await api(http, relay)
    assert advancing([c for c, _ in before]) and advancing([c for c, _ in after])
    assert after[0][0] > before[-1][0] and connected == "connected"
    assert cam["frames_slate"] > 0 and cam["source_errors"] >= 1 and cam["worker_restarts"] == 0
    assert (cam["mode"], cam["state"], cam["encoder"]) == ("passthrough", "live", "none")


async def test_snapshots_of_a_passthrough_stream_decode_only_while_someone_asks(start_camera, http):
    from .test_mjpeg import clock_of

    camera = live_camera(start_camera)
    async with relay_for(camera.url) as relay:
        stream = relay.relay.streams["cam"]
        await passing_through(relay)
        idle = await api(http, relay)
        async with http.get(relay.base + "/snapshot/cam.jpg") as resp:
            assert resp.status == 200
            jpeg = await resp.read()
        await until(lambda: stream.stats.frames_decoded >= 1, "the worker's count of decoded frames")  # each second
        asked = await api(http, relay)
    assert idle["frames_decoded"] == 0  # nobody asked: nothing decoded
    assert clock_of(jpeg) is not None  # the camera's picture, decoded from its last keyframe on
    assert asked["encoders_running"] == 0


def write_h264_file(path: Path, fps: int = 15, frames: int = 45) -> int:
    """An MP4 of the pattern, H.264 Constrained Baseline without B-frames: its SPS and PPS in the avcC only.
    Returns the pixel clock of its first frame."""
    from relay.camera.testpattern import PatternRenderer

    start = 1_700_000_000_000
    renderer = PatternRenderer(640, 360)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        stream.codec_context.options = {"preset": "veryfast", "profile": "baseline", "x264-params": "keyint=15"}
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(renderer.planes(start + i * 1000 // fps), format="yuv420p")
            frame.pts, frame.time_base = i, fractions.Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return start


async def test_an_h264_file_whose_parameter_sets_are_only_in_its_header_is_passed_through(tmp_path, http):
    video = tmp_path / "clip.mp4"
    start = write_h264_file(video)
    with av.open(str(video)) as container:  # as MP4 stores it: AVCC packets, the SPS and PPS out of band
        packet = next(container.demux(video=0))
        assert bytes(packet)[:4] != b"\x00\x00\x00\x01" and h264.parse_avcc(
            bytes(packet.stream.codec_context.extradata)
        )
    async with relay_for(f"file:{video}") as relay:
        await passing_through(relay)
        viewer = WhepViewer(relay.whep("cam"), http)
        try:
            await viewer.connect()
            seen = await clocks(viewer, 60)  # more frames than the file has: it loops
        finally:
            await viewer.close()
        cam = await api(http, relay)
    read = [c for c, _ in seen]
    assert None not in read and all(start <= c < start + 3000 for c in read)
    assert any(b < a for a, b in zip(read, read[1:], strict=False)), "the file looped"
    assert (cam["mode"], cam["encoders_running"]) == ("passthrough", 0)
