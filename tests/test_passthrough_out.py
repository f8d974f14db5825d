"""A passed-through camera on the output side: what viewers are told, the slate, snapshots, RTSP out, heat.

Test cameras are ``benchmarks/rtspcams.py``'s (``start_camera``: the pixel-clock pattern encoded by ffmpeg as an
IP camera would, published into a test mediamtx), read by a real relay in passthrough.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import subprocess
import time
from collections.abc import Callable

import av

from benchmarks.rtspcams import Encoding, ResolutionChangeCamera
from relay import h264
from relay.config import RecordConfig, StreamConfig, TelemetryConfig
from relay.source import parse_source_spec
from relay.stream import NOTHING_TO_SHED
from relay.webrtc.borrowed import watch_received_h264
from relay.webrtc.whepclient import WhepViewer

from .conftest import frame_clock, make_config, start_relay
from .test_faults import is_slate

FPS = 30
DEADLINE = 30.0  # seconds for what a test waits for: a deadline, not a measurement


@contextlib.asynccontextmanager
async def relay_for(url: str, **config):
    """A relay passing the camera at ``url`` through as stream ``cam``."""
    spec = parse_source_spec(url + "#mode=passthrough")
    extra = {key: config.pop(key) for key in ("telemetry", "record") if key in config}  # not make_config's
    made = dataclasses.replace(make_config((StreamConfig("cam", spec),), fps=FPS, **config), **extra)
    runner, relay = await start_relay(made, wait=False)
    try:
        yield relay
    finally:
        await runner.cleanup()


async def until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g}s"
        await asyncio.sleep(0.05)


async def api(http, relay) -> dict:
    async with http.get(relay.base + "/api/v1/streams") as resp:
        return (await resp.json())["streams"][0]


def answered_profile(answer: str) -> str:
    return re.search(r"^a=fmtp:\d+ .*profile-level-id=([0-9a-fA-F]{6})", answer, re.M)[1].lower()


class ReceivedSps:
    """Every SPS the aiortc viewers of this process receive (the decoder's input, as sent), by the picture it came
    with: the access unit is decoded here too, and its picture says "slate" or "camera". Not by when it arrived:
    the test reads its viewer's pictures later than they arrive, so a returning camera's first SPS can come while
    the test still reads the slate."""

    def __init__(self) -> None:
        self.seen: dict[str, list[h264.Sps]] = {}
        self._codec = av.CodecContext.create("h264", "r")
        self._units = 0
        self._pending: dict[int, list[h264.Sps]] = {}  # by the access unit's number, until its picture is decoded
        self._release = watch_received_h264(self._take)

    def _take(self, data: bytes) -> None:
        self._units += 1
        nals = h264.split_annexb(data)
        if sps := [h264.parse_sps(nal) for nal in nals if h264.nal_type(nal) == h264.NAL_SPS]:
            self._pending[self._units] = sps
        packet = av.Packet(data)
        packet.pts = self._units
        with contextlib.suppress(av.InvalidDataError):
            for frame in self._codec.decode(packet):
                if taken := self._pending.pop(frame.pts, None):
                    self.seen.setdefault("slate" if is_slate(frame) else "camera", []).extend(taken)

    def close(self) -> None:
        self._release()


async def read(viewer: WhepViewer, slate: bool, count: int) -> None:
    """Read until ``count`` frames of the slate (or of the camera) have been decoded."""
    got = 0
    while got < count:
        got += is_slate(await viewer.recv(timeout=DEADLINE)) == slate


# -- 2. the slate says what the camera says


async def test_a_viewer_that_joins_while_the_slate_shows_is_told_the_cameras_profile_in_every_phase(start_camera, http):
    """The slate of a passed-through High camera is encoded in the camera's profile and level: a viewer that joins
    while the camera is away is answered High, and every SPS it then receives (the slate's, then the camera's when
    it returns) says what its answer said; so does the API throughout."""
    camera = start_camera("cam", encoding=Encoding(profile="high", gop=1.0))
    async with relay_for(camera.url) as relay:
        stream = relay.relay.streams["cam"]
        await until(lambda: stream.passthrough and stream.stats.frames_passed_through > 0, "passed through")
        live = await api(http, relay)
        await asyncio.to_thread(camera.stop)
        await until(lambda: stream.stats.frames_slate > 0 and not stream.passthrough, "the slate")
        received = ReceivedSps()
        viewer = WhepViewer(relay.whep("cam"), http)
        try:
            await viewer.connect()
            await read(viewer, slate=True, count=FPS)
            away = await api(http, relay)
            await asyncio.to_thread(camera.start)
            await read(viewer, slate=False, count=FPS)
            back = await api(http, relay)
        finally:
            await viewer.close()
            received.close()
    answered = answered_profile(viewer.answer)
    assert live["profile"].startswith("High") and live["profile_level_id"][:2] == "64"
    assert answered == live["profile_level_id"], "answered as the camera's SPS says, though the slate showed"
    assert [away["profile_level_id"], back["profile_level_id"]] == [answered] * 2, "the API, in each phase"
    assert set(received.seen) == {"slate", "camera"}, "an SPS with each's pictures (in front of each keyframe)"
    for phase, seen in received.seen.items():
        assert {sps.profile_level_id for sps in seen} == {answered}, phase


# -- 4. RTSP out follows a new size


def rtsp_sizes(url: str, frames: int) -> list[tuple[tuple[int, int], int | None]]:
    """(size, pixel clock) of the first ``frames`` pictures PyAV decodes from an RTSP URL."""
    out = []
    with av.open(url, options={"rtsp_transport": "tcp"}, timeout=10) as container:
        for frame in container.decode(video=0):
            out.append(((frame.width, frame.height), frame_clock(frame)))
            if len(out) >= frames:
                break
    return out


def ffprobe_sizes(url: str, seconds: float) -> list[tuple[int, int]]:
    """The size of each picture ffprobe decodes from an RTSP URL in its first ``seconds``."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-rtsp_transport", "tcp", "-select_streams", "v:0", "-read_intervals",
         f"%+{seconds:g}", "-show_entries", "frame=width,height", "-of", "csv=p=0", url],
        capture_output=True, text=True, timeout=DEADLINE, check=True,
    )  # fmt: skip
    return [(int(w), int(h)) for w, h in (line.split(",")[:2] for line in out.stdout.split())]


async def test_rtsp_readers_follow_a_passed_through_camera_to_its_new_size(start_camera):
    """A camera that changes its picture size mid-stream: PyAV and ffprobe reading camrelay's RTSP URL (one
    session each, opened at the first size) decode the pictures at the new size too, the camera's pixel clocks
    in order."""
    from .test_rtsp import rtsp_url, wait_published

    sizes = ((640, 360), (960, 540))
    camera = start_camera("cam", ResolutionChangeCamera, sizes=sizes, every=3.0)
    async with relay_for(camera.url, rtsp=True) as relay:
        stream = relay.relay.streams["cam"]
        await until(lambda: stream.passthrough and stream.stats.frames_passed_through > 0, "passed through")
        await wait_published(relay, "cam")
        url = rtsp_url(relay, "cam")
        read, probed = await asyncio.gather(
            asyncio.to_thread(rtsp_sizes, url, int(9 * FPS)), asyncio.to_thread(ffprobe_sizes, url, 9.0)
        )
    assert set(sizes) <= {size for size, _ in read}, "PyAV decoded both sizes"
    clocks = [clock for _, clock in read]
    assert None not in clocks and clocks == sorted(clocks), "the camera's pictures, in order"
    assert set(sizes) <= set(probed), f"ffprobe decoded both sizes: {sorted(set(probed))}"


# -- 5. the thermal guard and a camera passed through


async def test_the_thermal_guard_says_it_has_nothing_to_shed_on_a_passed_through_camera(
    start_camera, http, tmp_path, caplog
):
    """Hot (an injected sysfs): the guard steps the stream's limit down as for any stream, and the API and the log
    say a passed-through camera has nothing to shed; every frame the camera sends still reaches the hub."""
    from .test_telemetry import fake_sys

    caplog.set_level(logging.WARNING, logger="relay.service")
    camera = start_camera("cam", encoding=Encoding(profile="high", gop=1.0))
    async with relay_for(camera.url, telemetry=TelemetryConfig(thermal_limit=70.0)) as relay:
        stream = relay.relay.streams["cam"]
        await relay.relay.telemetry.close()  # the test takes the samples, through the telemetry's own hook
        await until(lambda: stream.passthrough and stream.stats.frames_passed_through > 0, "passed through")
        relay.relay.telemetry.sys_root = fake_sys(tmp_path, {"thermal_zone0": ("cpu-thermal", "80000")})
        for _ in range(2):
            for callback in relay.relay.telemetry.on_sample:
                callback(relay.relay.telemetry.sample())
        before = stream.stats.frames_passed_through
        await until(lambda: stream.stats.frames_passed_through >= before + 2 * FPS, "two more seconds of camera")
        await until(lambda: stream.stats.frames_captured >= stream.stats.frames_passed_through, "a worker report")
        cam = await api(http, relay)
    assert relay.relay.thermal_guards["cam"].current < FPS
    assert cam["thermal"] == {"max_fps": relay.relay.thermal_guards["cam"].current, "sheds": NOTHING_TO_SHED}
    assert cam["frames_dropped"]["thermal"] == 0 and cam["mode"] == "passthrough"
    lines = [r.getMessage() for r in caplog.records if "thermal:" in r.getMessage()]
    assert len(lines) == 2 and all(line.endswith(f"; sheds {NOTHING_TO_SHED}") for line in lines), lines


# -- 3. a recorder's snapshots decode keyframes only


async def test_a_recorders_snapshots_decode_only_keyframes_and_mjpeg_every_frame_while_it_asks(
    start_camera, http, tmp_path
):
    """Recording on (a snapshot a second) with a camera that sends a keyframe every half second: the worker decodes
    one keyframe per snapshot interval (the rarer), none of the frames between; the snapshots show the camera's
    pixel clocks. An MJPEG client meanwhile gets every frame decoded, from the keyframe on."""
    from .test_mjpeg import clock_of, read_parts

    camera = start_camera("cam", encoding=Encoding(profile="high", gop=0.5))
    record = RecordConfig(enabled=True, root=str(tmp_path / "rec"), segment=60.0, snapshot_interval=1.0)
    async with relay_for(camera.url, record=record) as relay:
        stream = relay.relay.streams["cam"]
        recorder = relay.relay.recorders["cam"]
        await until(lambda: stream.passthrough and stream.stats.frames_passed_through > 0, "passed through")
        await until(lambda: recorder.snapshots_written >= 4, "snapshots")
        idle = await api(http, relay)
        async with http.get(relay.base + "/mjpeg/cam") as resp:
            # The worker reports its counts once a second: the window starts once a report was made while
            # the client read, so that no frame in it was from before the client asked.
            parts = await read_parts(resp, FPS + FPS // 2)
            asking = await api(http, relay)
            parts += await read_parts(resp, 2 * FPS)
            watched = await api(http, relay)
    snapshots = sorted((tmp_path / "rec" / "cam").glob("*/snapshots/*.jpg"))
    # Idle: at most one picture decoded a second of snapshots; the camera sent two keyframes a second. (The
    # worker reports frames_decoded and frames_captured together, once a second.)
    assert 0 < idle["frames_decoded"] <= idle["keyframes"] // 2 + 1
    assert idle["frames_decoded"] * 10 < idle["frames_captured"], "not every frame"
    assert all(clock_of(path.read_bytes()) is not None for path in snapshots[:4])
    # Watched: every frame decoded while the MJPEG client reads, not a keyframe a second. A jpeg thread that
    # falls behind on a loaded machine leaves the rest of a GOP when the next IDR comes (it decodes from there):
    # so the count is held to most of the frames (keyframes alone would be 2 of the 30 a second), not to all.
    decoded = watched["frames_decoded"] - asking["frames_decoded"]
    captured = watched["frames_captured"] - asking["frames_captured"]
    assert captured > FPS and 2 * decoded >= captured, (decoded, captured)
    assert all(clock_of(part) is not None for part in parts)
