"""A camera's own sound end to end: RTSP cameras (AAC, Opus, PCMU) into camrelay, out to real aiortc viewers.

Test cameras publish the test pattern with its sound (a 10 s loop of ``relay.camera.testsound``: a burst a
second, 2 kHz at the loop's first) into a test mediamtx; camrelay's RTSP client reads both tracks, passes
the video through and sends the sound as Opus (a camera's Opus untouched). A viewer decodes it and must hear
the bursts a second apart in its samples, a 2 kHz one every tenth, beside the video. Judged by counts and
sample positions, never by how long anything took.
"""

from __future__ import annotations

import subprocess
import threading
import time

import aiohttp
import pytest

from benchmarks.bursts import WINDOW, BurstReader, Onset
from benchmarks.rtspcams import FFMPEG, FFMPEG_QUIET, make_sound
from relay.camera.cameraaudio import AudioTap
from relay.camera.capture import SourceClock, open_source
from relay.camera.rtspsource import RtspSource
from relay.camera.testsound import RATE, TENTH
from relay.config import StreamConfig
from relay.source import audio_source, parse_source_spec
from relay.webrtc.whepclient import WhepViewer

from .conftest import make_config, start_relay
from .test_players import sections
from .test_rtpaudio import aac_payload, sender_report
from .test_rtspin import H264_MEDIA as TINY_H264
from .test_rtspin import UNITS, CaptureThread, TinyCamera, relay_config, rtp, sdp, until

DEADLINE = 40.0  # seconds a test waits for what it counts: a guard, not a measurement
BURSTS = 12  # one a second: twelve in a row hold a tenth (2 kHz) wherever they start, and the next may too


CLIP_SECONDS = 30  # the test sound's bursts, 2 kHz at seconds 0, 10 and 20: a run of bursts wraps at most once


@pytest.fixture(scope="module")
def sound_clip(tmp_path_factory):
    """A 30 s MP4 of H.264 (ffmpeg's test source, 320x180) and AAC (the test sound, bursts from its start)."""
    work = tmp_path_factory.mktemp("sound")
    wav, clip = make_sound(work / "sound.wav", CLIP_SECONDS), work / "clip.mp4"
    video = f"testsrc=size=320x180:rate=30:duration={CLIP_SECONDS}"
    subprocess.run(
        [FFMPEG, *FFMPEG_QUIET, "-f", "lavfi", "-i", video, "-i", str(wav), "-c:v", "libx264", "-preset", "ultrafast",
         "-bf", "0", "-g", "30", "-c:a", "aac", "-b:a", "64k", "-shortest", str(clip)],
        check=True,
    )  # fmt: skip
    return clip


async def hear_bursts(viewer: WhepViewer, count: int) -> list[Onset]:
    """Onsets the viewer hears until ``count`` of them in a row come a second apart, with a tenth among them
    one in ten at 2 kHz: that run."""
    reader, onsets = BurstReader(), []
    deadline = time.monotonic() + DEADLINE
    while len(a_second_apart(onsets)) < count:
        assert time.monotonic() < deadline, f"bursts heard at samples {[(o.sample, round(o.hz)) for o in onsets]}"
        onsets += reader.feed(*await viewer.recv_audio())
    run = a_second_apart(onsets)
    tenths = [i for i, o in enumerate(run) if o.tenth]
    assert all(b - a == TENTH for a, b in zip(tenths, tenths[1:], strict=False)), [round(o.hz) for o in run]
    return run


async def api_stream(http: aiohttp.ClientSession, base: str) -> dict:
    async with http.get(base + "/api/v1/streams") as resp:
        assert resp.status == 200
        return (await resp.json())["streams"][0]


def a_second_apart(onsets: list[Onset]) -> list[Onset]:
    """The longest run of onsets each one second of samples after the one before (a window either way)."""
    best: list[Onset] = []
    run: list[Onset] = []
    for onset in onsets:
        run = run + [onset] if run and abs(onset.sample - run[-1].sample - RATE) <= WINDOW else [onset]
        best = max(best, run, key=len)
    return best


@pytest.mark.parametrize(("sound", "codec"), [("aac", "aac"), ("latm", "aac"), ("opus", "opus"), ("pcmu", "pcm_mulaw")])
async def test_a_cameras_sound_is_heard_by_a_viewer_a_burst_a_second_beside_its_video_passed_through(
    http, start_camera, sound, codec
):
    camera = start_camera("cam0", sound=sound)
    config = make_config((StreamConfig("cam0", parse_source_spec(camera.url + "#mode=passthrough")),), fps=30)
    runner, relay = await start_relay(config)
    viewer = WhepViewer(relay.whep(), http, audio=True)
    try:
        await viewer.connect()
        video = await viewer.read_frames(10)
        assert all(s.latency_ms is not None for s in video)  # the camera's pixel clock: its frames, passed through
        run = await hear_bursts(viewer, BURSTS)
        assert any(o.tenth for o in run)
        api = await api_stream(http, relay.base)
    finally:
        await viewer.close()
        await runner.cleanup()
    audio = api["audio"]
    assert (api["mode"], api["source_reader"], api["encoders_running"]) == ("passthrough", "rtspin", 0)
    assert (audio["state"], audio["codec"], audio["source"].split()[2][1:]) == (
        "live",
        "opus",
        codec,
    )  # "sound track (aac"
    assert audio["frames"] >= (BURSTS - 1) * (25 if sound == "opus" else 50)  # the camera's 40 ms Opus, or 20 ms
    assert (audio["source_errors"], audio["packets_dropped"], api["worker_restarts"]) == (0, 0, 0)


AAC_MEDIA = (
    "m=audio 0 RTP/AVP 97\r\na=rtpmap:97 mpeg4-generic/48000/1\r\n"
    "a=fmtp:97 mode=AAC-hbr;sizelength=13;indexlength=3;indexdeltalength=3;config=1188\r\na=control:trackID=1\r\n"
)
GARBAGE = [
    lambda i: b"\x00\x01",  # no RTP
    lambda i: rtp(b"\x00\x10\x00", i, i * 1024, True, pt=97),  # an AU header cut short
    lambda i: rtp(b"\x00\x10\x00\x20ab", i, i * 1024, True, pt=97),  # an AU of 4 bytes with 2 of it
]


async def test_a_camera_whose_sound_is_garbage_streams_its_video_unit_for_unit_and_counts_what_it_dropped(http):
    """Every video unit of the camera comes after a sound packet that cannot be read: each unit still reaches
    the relay before the camera sends the next (the sound never holds the video), the camera is never opened
    again, and the API counts the packets of the sound it dropped."""
    camera = await TinyCamera(sdp_text=sdp(TINY_H264, AAC_MEDIA)).start()
    runner, running = await start_relay(relay_config(camera.url), wait=False)
    stream = running.relay.streams["cam0"]
    try:
        await until(camera.playing.is_set, "the relay plays the camera")
        assert camera.methods.count("SETUP") == 2  # the video, then the sound
        for i, unit in enumerate(UNITS):
            await camera.send_audio(GARBAGE[i % len(GARBAGE)](i))
            await camera.send(unit)
            await until(lambda i=i: stream.stats.frames_passed_through > i, f"unit {i} passed through")
        await until(lambda: stream.status().api()["audio"]["packets_dropped"] >= len(UNITS), "the drops counted")
        api = stream.status().api()
    finally:
        await runner.cleanup()
        await camera.close()
    assert (api["source_errors"], api["worker_restarts"], camera.describes) == (0, 0, 1)
    assert api["audio"]["frames"] == 0 and api["frames_passed_through"] == len(UNITS)


async def test_a_files_aac_is_heard_by_a_viewer_a_burst_a_second_as_its_video_plays(http, sound_clip):
    config = make_config((StreamConfig("cam0", parse_source_spec(f"file:{sound_clip}")),), fps=30)
    runner, relay = await start_relay(config)
    viewer = WhepViewer(relay.whep(), http, audio=True)
    try:
        await viewer.connect()
        assert len(await viewer.read_frames(10, clock=False)) == 10
        await hear_bursts(viewer, BURSTS // 2)
        api = await api_stream(http, relay.base)
    finally:
        await viewer.close()
        await runner.cleanup()
    audio = api["audio"]
    assert (audio["state"], audio["codec"], audio["source"]) == ("live", "opus", "sound track (aac 48000 Hz 1 ch)")
    assert (audio["source_errors"], api["worker_restarts"]) == (0, 0)


def test_rtsp_cameras_and_files_carry_their_own_sound_unless_told_not_to():
    specs = [parse_source_spec(s) for s in ("rtsp://cam/live", "file:/clips/a.mp4", "rtsp://cam/live#audio=off")]
    assert [audio_source(s, enabled=True) for s in specs] == ["track", "track", ""]
    assert [audio_source(s, enabled=False) for s in specs] == ["", "", ""]


async def test_with_the_cameras_sender_reports_the_sound_is_stamped_on_the_videos_capture_clock():
    """The camera's sender reports say sound RTP time A + 4800 (0.1 s at 48 kHz after A) was captured with
    video RTP time 9000 (0.1 s at 90 kHz): the sound frame's capture time is the one the video's clock gives
    that unit, whenever each arrived."""
    camera = await TinyCamera(sdp_text=sdp(TINY_H264, AAC_MEDIA)).start()
    tap, capture = AudioTap(), CaptureThread()
    source = open_source(parse_source_spec(camera.url), 640, 360, 30, "cam0", audio=tap)
    assert isinstance(source, RtspSource)
    source.video_clock = clock = SourceClock()
    try:
        assert await capture.opened(source) is None
        await camera.send_audio(sender_report(1, 5000.0, 0), channel=1)  # the video's: RTP 0 at NTP 5000
        await camera.send_audio(sender_report(2, 5000.0, 777_000), channel=3)  # the sound's: 777000 then
        await camera.send(UNITS[0])  # video RTP 0
        first = await capture.run(source.read_packet)
        at_zero = clock.wall_time(first.pts * source.time_base, time.time())  # as the worker's passthrough does
        await camera.send_audio(rtp(aac_payload(b"sound"), 1, 777_000 + 4800, True, pt=97))
        await camera.send(UNITS[1])  # video RTP 3000; the sound came before it
        await capture.run(source.read_packet)
        frame = tap.take(0, threading.Event())
    finally:
        await capture.close(source)
        await camera.close()
    assert frame is not None and frame.data == b"sound"
    assert abs(frame.capture_time - (at_zero + 0.1)) < 1e-6


async def test_a_camera_without_sound_says_so_and_viewers_offering_audio_get_the_video_alone(http):
    camera = await TinyCamera(sdp_text=sdp(TINY_H264)).start()
    runner, running = await start_relay(relay_config(camera.url), wait=False)
    stream = running.relay.streams["cam0"]
    viewer = WhepViewer(running.whep(), http, audio=True)
    try:
        await until(camera.playing.is_set, "the relay plays the camera")
        assert camera.methods.count("SETUP") == 1  # the video alone: there is no sound to set up
        await until(lambda: stream.status().api()["audio"]["state"] == "none", "the worker says it has no sound")
        assert not stream.has_audio
        await viewer.connect()
        assert viewer.answer is not None
        audio = next(s for s in sections(viewer.answer) if s[0].startswith("m=audio"))
        assert audio[0].split()[1] == "0"  # rejected: the answer sends nothing there
        api = stream.status().api()
    finally:
        await viewer.close()
        await runner.cleanup()
        await camera.close()
    assert (api["audio"]["source_errors"], api["worker_restarts"]) == (0, 0)
