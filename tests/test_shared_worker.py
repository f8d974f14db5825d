"""RTSP cameras sharing one worker process (``[video] cameras_per_worker``): each still reaches viewers and RTSP
readers frame by frame, a camera that hangs leaves the others running, a worker that dies restarts all of its
cameras with viewers kept, and a capture thread stuck for good is started afresh while the others carry on.

Cameras are ``benchmarks/rtspcams.py``'s (``start_camera``), read by a real relay in passthrough; readers are PyAV
over RTSP and aiortc over WHEP. Frames are judged by their timestamps (a frame missing is a step of two frame
intervals) and their pixel clocks, never by how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time

import av

from benchmarks.rtspcams import LoopedCamera
from relay import ipc
from relay.camera import capture, worker
from relay.camera.capture import SourceError
from relay.config import StreamConfig
from relay.ipc import EncoderSettings
from relay.source import SourceSpec, parse_source_spec
from relay.stream import Stream, share_workers
from relay.webrtc.whepclient import WhepViewer

from .conftest import frame_clock, make_config, start_relay
from .test_passthrough_out import DEADLINE, until
from .test_rtsp import rtsp_url, wait_published

FPS = 30
SHARING = 8  # cameras a worker process, as a user who opts into sharing would set it (the default is 1)
STEP = 90_000 // FPS  # a frame's step of the 90 kHz clock
FRAMES = 2 * FPS  # frames each reader checks


@contextlib.asynccontextmanager
async def relay_of(cameras, cameras_per_worker: int = SHARING, **config):
    """A relay passing every camera through, a stream named after each, its RTSP cameras sharing workers."""
    streams = tuple(StreamConfig(c.path, parse_source_spec(c.url + "#mode=passthrough")) for c in cameras)
    config = make_config(streams, fps=FPS, cameras_per_worker=cameras_per_worker, **config)
    runner, relay = await start_relay(config, wait=False)
    try:
        for camera in cameras:
            stream = relay.relay.streams[camera.path]
            await until(lambda s=stream: s.passthrough and s.stats.frames_passed_through > 0, f"{camera.path} live")
        yield relay
    finally:
        await runner.cleanup()


def gaps(pts: list[int]) -> list[int]:
    """The steps between consecutive timestamps that are not one frame (a frame lost, or repeated)."""
    return [b - a for a, b in zip(pts, pts[1:], strict=False) if not STEP // 2 < b - a < STEP * 3 // 2]


class Tap:
    """Every frame a stream's hub publishes from now on (a subscriber with room for minutes: it never lags)."""

    def __init__(self, stream: Stream) -> None:
        self._sub = stream.hub.subscribe(f"test-tap-{stream.name}", max_frames=10_000)
        self.pts: list[int] = []

    def take(self) -> list[int]:
        while (frame := self._sub.get_nowait()) is not None:
            self.pts.append(frame.pts)
        return self.pts

    def close(self) -> None:
        self._sub.close()


def read_rtsp(url: str, frames: int) -> list[tuple[int, int | None]]:
    """(pts, pixel clock) of the first ``frames`` pictures PyAV decodes from an RTSP URL."""
    out = []
    with av.open(url, options={"rtsp_transport": "tcp"}, timeout=10) as container:
        for frame in container.decode(video=0):
            out.append((frame.pts, frame_clock(frame)))
            if len(out) >= frames:
                break
    return out


def test_rtsp_cameras_are_grouped_by_the_config_and_other_sources_keep_a_worker_each():
    settings = EncoderSettings(1_000_000, 30.0, 1.0)

    def stream(name: str, spec: str, mode: str = "auto") -> Stream:
        return Stream(name, parse_source_spec(spec), settings, 640, 360, mode=mode)

    shared = [stream(f"cam{i}", f"rtsp://u:pw@10.0.0.{i}/s") for i in range(5)]
    alone = [
        stream("udp", "rtsp://10.0.0.9/s#transport=udp"),  # FFmpeg's demuxer
        stream("tls", "rtsps://10.0.0.9/s"),
        stream("told", "rtsp://10.0.0.9/s#mode=transcode"),
        stream("all", "rtsp://10.0.0.8/s", mode="transcode"),  # [video] mode
        stream("test", "test:"),
        stream("file", "file:/tmp/x.mp4"),
    ]
    workers = share_workers(alone[:3] + shared + alone[3:], per_worker=2)
    assert [[s.name for s in w.streams] for w in workers] == [["cam0", "cam1"], ["cam2", "cam3"]]
    assert [(s.worker.streams, s.camera) for s in shared[:2]] == [(shared[:2], 0), (shared[:2], 1)]
    assert shared[4].worker.streams == [shared[4]], "the last one alone keeps its own"
    assert all(s.worker.streams == [s] and s.camera == 0 for s in alone)
    assert share_workers(shared, per_worker=1) == []
    # What the shared worker is told: each camera's config, in order, the passwords in its environment only.
    env = workers[0]._child.env[ipc.WORKER_CONFIG_ENV]
    assert [c.source for c in ipc.configs_from_json(env)] == ["rtsp://u:pw@10.0.0.0/s", "rtsp://u:pw@10.0.0.1/s"]
    assert "pw" not in " ".join(workers[0]._child.argv)


async def test_cameras_sharing_a_worker_each_reach_rtsp_readers_and_viewers_frame_by_frame(start_camera, http):
    """Two live cameras in one worker process: each stream's hub gets every frame (no step of two frames), PyAV
    reading each from camrelay's RTSP decodes every frame with the camera's pixel clock, and a WebRTC viewer of
    each decodes them; the API says passed through, no encoder."""
    cameras = [start_camera("north"), start_camera("south")]
    async with relay_of(cameras, rtsp=True) as relay:
        streams = [relay.relay.streams[c.path] for c in cameras]
        assert streams[0].pid is not None and streams[0].pid == streams[1].pid, "one worker process"
        taps = [Tap(s) for s in streams]
        viewers = [WhepViewer(relay.whep(c.path), http) for c in cameras]
        try:
            for c in cameras:
                await wait_published(relay, c.path)
            for viewer in viewers:
                await viewer.connect()
            read = await asyncio.gather(
                *(asyncio.to_thread(read_rtsp, rtsp_url(relay, c.path), FRAMES) for c in cameras)
            )
            seen = [[await viewer.recv(timeout=DEADLINE) for _ in range(FPS)] for viewer in viewers]
            await until(lambda: all(len(t.take()) >= FRAMES for t in taps), "frames in each hub")
            async with http.get(relay.base + "/api/v1/streams") as resp:
                api = (await resp.json())["streams"]
        finally:
            for viewer in viewers:
                await viewer.close()
            for tap in taps:
                tap.close()
    for tap in taps:
        assert gaps(tap.pts) == [], "every frame of each camera in its hub"
    for frames in read:
        assert len(frames) == FRAMES and None not in [clock for _, clock in frames], "decoded, pixel clock read"
        assert gaps([pts for pts, _ in frames]) == [], "every frame to the RTSP reader"
    assert all(frame_clock(f) is not None for frames in seen for f in frames), "viewers decode the cameras"
    assert [(s["mode"], s["encoders_running"], s["restarts"]) for s in api] == [("passthrough", 0, 0)] * 2


async def test_a_camera_that_hangs_leaves_the_others_in_its_worker_running(start_camera, small_clip):
    """One camera of a shared worker stops sending (its encoder frozen, its connection open): its stream shows
    the slate, while the other camera in the same process goes on with every frame; no process is restarted, and
    the hung camera comes back when it returns."""
    hung = start_camera("hung", LoopedCamera, clip=small_clip)
    busy = start_camera("busy")
    async with relay_of([hung, busy]) as relay:
        h, b = relay.relay.streams["hung"], relay.relay.streams["busy"]
        pid = h.pid
        assert pid == b.pid
        tap = Tap(b)
        try:
            os.kill(hung.procs[-1].pid, signal.SIGSTOP)  # frozen: sends nothing, closes nothing
            await until(lambda: h.stats.frames_slate >= FPS, "a second of the slate for the hung camera")
            frozen_at = len(tap.take())
            await until(lambda: len(tap.take()) >= frozen_at + FPS, "the other camera meanwhile")
            await until(lambda: h.stats.source_errors > 0, "the hung camera's source given up and reopened")
            await asyncio.to_thread(hung.kill)
            passed = h.stats.frames_passed_through
            await asyncio.to_thread(hung.start)
            await until(lambda: h.passthrough and h.stats.frames_passed_through > passed + FPS, "the camera back")
            tap.take()
        finally:
            tap.close()
            if hung.procs:
                os.kill(hung.procs[-1].pid, signal.SIGCONT)
        assert gaps(tap.pts) == [], "every frame of the other camera, throughout"
        assert b.passthrough and b.stats.frames_slate == 0, "the other camera never showed the slate"
        assert (h.pid, b.pid) == (pid, pid) and h.stats.worker_restarts == b.stats.worker_restarts == 0


async def test_a_shared_worker_that_dies_restarts_every_camera_in_it_and_viewers_keep_their_sessions(
    start_camera, small_clip, http
):
    """The shared process killed: both its streams count a restart, come back passed through in one new process,
    and a viewer connected before decodes the camera again on the same session."""
    cameras = [start_camera("a", LoopedCamera, clip=small_clip), start_camera("b", LoopedCamera, clip=small_clip)]
    async with relay_of(cameras) as relay:
        a, b = relay.relay.streams["a"], relay.relay.streams["b"]
        viewer = WhepViewer(relay.whep("a"), http)
        try:
            await viewer.connect()
            for _ in range(FPS):
                await viewer.recv(timeout=DEADLINE)
            pid = a.pid
            os.killpg(pid, signal.SIGKILL)
            await until(lambda: a.stats.worker_restarts == b.stats.worker_restarts == 1, "both restarted")
            passed = [a.stats.frames_passed_through, b.stats.frames_passed_through]
            await until(
                lambda: a.stats.frames_passed_through > passed[0] and b.stats.frames_passed_through > passed[1],
                "both cameras passed through again",
            )
            for _ in range(FPS):  # frames of the new worker: the old one's are all in the queue by now
                await viewer.recv(timeout=DEADLINE)
            assert viewer.pc.connectionState == "connected", "the same session"
        finally:
            await viewer.close()
        assert a.pid == b.pid and a.pid not in (None, pid)


class StuckSource(capture.TestPatternSource):
    """A camera whose driver hangs: after ``after`` frames a read blocks, and closing the source does not end it
    (a V4L2 driver stuck in the kernel; none exists here). ``release`` lets the thread go at the end."""

    def __init__(self, *args, after: int, release: threading.Event) -> None:
        super().__init__(*args)
        self._after, self._release = after, release

    def read(self):
        if self._frames >= self._after:
            self._release.wait()
            raise SourceError("released")
        return super().read()


async def test_a_capture_thread_stuck_for_good_is_started_afresh_while_the_workers_other_camera_goes_on(monkeypatch):
    """The worker's two cameras: one's capture thread stays blocked after its source is closed. That camera's
    pipeline is replaced in the same process (its counters carried on), and the other camera's frames never
    stop. (A worker of one camera exits instead, for the relay to start a new one: the case before sharing.)"""
    monkeypatch.setattr(worker, "CAPTURE_STALL", 0.3)
    monkeypatch.setattr(worker, "STUCK_EXIT", 0.3)
    release = threading.Event()
    units = {0: 0, 1: 0}
    lock = threading.Lock()

    def emit(data: bytes) -> None:
        kind, _, camera, *_ = ipc.parse_header(data[: ipc.HEADER.size])
        if kind == ipc.UNIT:
            with lock:
                units[camera] += 1

    made: list[worker.Pipeline] = []

    def make(camera: int) -> worker.Pipeline:
        if camera == 1 and not made[1:]:
            factory = lambda: StuckSource(320, 240, 15.0, "stuck", "", after=5, release=release)  # noqa: E731
        else:
            factory = lambda: capture.TestPatternSource(320, 240, 15.0, f"cam{camera}", "")  # noqa: E731
        spec = SourceSpec("test", "")
        pipeline = worker.Pipeline(
            f"cam{camera}", str(spec), factory, EncoderSettings(200_000, 15.0, 1.0, "libx264"), emit,
            size=(320, 240), camera=camera,
        )  # fmt: skip
        made.append(pipeline)
        return pipeline

    cameras = worker.Cameras(make, 2)
    cameras.start()
    try:
        deadline = time.monotonic() + DEADLINE
        while cameras.replaced == 0:
            assert time.monotonic() < deadline, "the stuck camera replaced"
            cameras.tick()
            await asyncio.sleep(worker.WATCH_INTERVAL / 5)
        with lock:
            before = dict(units)
        errors = cameras.pipelines[1].status().source_errors
        while True:
            with lock:
                if units[0] >= before[0] + 15 and units[1] >= before[1] + 15:
                    break
            assert time.monotonic() < deadline, f"both cameras after the replacement: {units} from {before}"
            cameras.tick()
            await asyncio.sleep(worker.WATCH_INTERVAL / 5)
    finally:
        release.set()
        await asyncio.to_thread(cameras.stop)
        await asyncio.to_thread(made[1].stop)
    assert cameras.replaced == 1 and len(made) == 3 and cameras.pipelines[1] is made[2]
    assert cameras.pipelines[0] is made[0], "the other camera's pipeline was never touched"
    assert errors >= 2, "the stall and the stuck thread, carried into the new pipeline's counters"
