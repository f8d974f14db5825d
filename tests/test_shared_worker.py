"""RTSP cameras sharing one worker process (``[video] cameras_per_worker``, 8 by default): each still reaches
viewers and RTSP readers frame by frame, a camera that hangs leaves the others running, a worker that dies
restarts all of its cameras with viewers kept; inside the worker, a camera stuck for good, silent (its encode
thread dead) or whose watch raises is started afresh alone while the others carry on; a failure in the relay's
handling of one camera's messages restarts that camera alone; a camera that keeps failing is restarted ever less
often (the worker's and the relay's clocks injected), each side's schedule counting its own restarts only; a camera
whose sound thread hangs (in a read or in its open) gets its sound back, its video untouched; threads stuck in a
driver are left behind at most two a camera, its sound's and its capture's; counters never go back; a slow first slate
is no silence, to the worker's watch nor the relay's, nor is a full pipe to the relay; a camera that needs a transcode
or FFmpeg's demuxer moves to a process of its own; stopping stops every camera at once. (A worker that one camera
keeps crashing is split: ``tests/test_split_worker.py``.)

Cameras are ``benchmarks/rtspcams.py``'s (``start_camera``), read by a real relay in passthrough; readers are PyAV
over RTSP and aiortc over WHEP. Frames are judged by their timestamps (a frame missing is a step of two frame
intervals) and their pixel clocks, never by how long anything took.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import types

import av
import pytest

from benchmarks.rtspcams import Encoding, LoopedCamera
from relay import ipc
from relay import stream as stream_module
from relay.aio import PipeMessages
from relay.backoff import Retry
from relay.camera import audio, capture, worker, writes
from relay.camera.capture import SourceError
from relay.config import StreamConfig, VideoConfig
from relay.ipc import EncoderSettings
from relay.source import parse_source_spec
from relay.stream import Stream, share_workers
from relay.webrtc.whepclient import WhepViewer

from .conftest import frame_clock, make_config, start_relay
from .test_passthrough_out import DEADLINE, until
from .test_rtsp import rtsp_url, wait_published

FPS = 30
SHARING = VideoConfig().cameras_per_worker  # cameras a worker process: the default
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
    """(pts, pixel clock) of the first ``frames`` pictures PyAV decodes from an RTSP URL. FFmpeg's RTSP demuxer
    sometimes hands over its very first packet without a timestamp (seen: None, then 3000, 6000 ...): pictures
    before the first stamped one are not counted; every one after it is, None or not."""
    out = []
    with av.open(url, options={"rtsp_transport": "tcp"}, timeout=10) as container:
        for frame in container.decode(video=0):
            if not out and frame.pts is None:
                continue
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


def test_shared_workers_keep_the_streams_retry_and_a_group_too_big_for_the_environment_is_split():
    """Before: a shared worker was restarted with the default backoff, not the one the relay gave its streams, and
    255 cameras with long URLs made an environment string Linux refuses (MAX_ARG_STRLEN, 128 KiB)."""
    settings, retry = EncoderSettings(1_000_000, 30.0, 1.0), Retry()
    path = "p" * 2000
    streams = [
        Stream(f"cam{i}", parse_source_spec(f"rtsp://u:pw@10.0.0.{i}/{path}"), settings, 640, 360, retry=retry)
        for i in range(200)
    ]
    workers = share_workers(streams, per_worker=ipc.MAX_CAMERAS_PER_WORKER)
    sizes = [len(w._child.env[ipc.WORKER_CONFIG_ENV]) for w in workers]
    assert len(workers) > 1 and all(size <= ipc.MAX_CONFIG_ENV for size in sizes), sizes
    assert [s for w in workers for s in w.streams] == streams, "every camera, in order"
    assert all(w._child._retry is retry for w in workers)


async def test_a_shared_worker_s_log_lines_are_the_process_s_not_its_first_camera_s(caplog):
    """Before: a worker's log lines went through its first camera's stream: dropped once that stream was closing,
    while the others still ran, and a bad one blamed on that camera. Now the worker's own pipe reader logs them."""
    caplog.set_level(logging.INFO)
    settings = EncoderSettings(1_000_000, 30.0, 1.0)
    first, second = (
        Stream(n, parse_source_spec(f"rtsp://u:hunter2@10.0.0.{i}/s"), settings, 640, 360) for i, n in enumerate("ab")
    )  # a camera's password known: the redaction that met a message of a number raised into the pipe's reader
    (shared,) = share_workers([first, second], per_worker=2)
    first.closing = True  # closing first, as streams do one by one
    pipe = PipeMessages(ipc.Reader().feed, shared._on_message)  # how the worker's pipe is read
    line = {"level": logging.WARNING, "logger": "relay.camera.worker", "message": "stream=b source error: gone"}
    bad = [{**line, "message": 1}, {**line, "level": "WARNING"}, {**line, "logger": ["x"]}, {"level": 30}]
    pipe.data_received(
        ipc.pack_json(ipc.LOG, line) + ipc.pack(ipc.LOG, b"not json") + b"".join(ipc.pack_json(ipc.LOG, b) for b in bad)
    )
    pipe.connection_lost(None)
    await pipe.ended
    assert lines(caplog, "stream=b source error: gone") != [], "the second camera's line, its first stream closing"
    assert len(lines(caplog, "streams=a,b worker bad log record")) == 5 and lines(caplog, "stream=a") == []


def test_a_worker_names_a_bounded_number_of_loggers():
    """A logger is kept for good once named: past ``MAX_WORKER_LOGGERS`` names, a worker's lines go to its camera
    code's logger, the names already used keep theirs."""
    names = [f"relay.camera.made_up_{i}" for i in range(stream_module.MAX_WORKER_LOGGERS * 2)]
    got = [stream_module._worker_logger(n) for n in names]
    assert len(set(got) - {stream_module.WORKER_LOGGER}) <= stream_module.MAX_WORKER_LOGGERS
    assert got[-1] == stream_module.WORKER_LOGGER and stream_module._worker_logger(got[0]) in (
        got[0],
        stream_module.WORKER_LOGGER,
    )


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


async def test_a_failure_to_handle_one_camera_s_messages_restarts_that_camera_alone(start_camera, small_clip, caplog):
    """Before: an exception in the relay's handling of one camera's message ended the reading of the whole pipe,
    and the process with every camera in it was restarted. Now that camera alone is started afresh in the same
    process (one log line for a burst of failures), and the other camera's hub gets every frame meanwhile."""
    caplog.set_level(logging.WARNING, logger="relay.stream")
    cameras = [start_camera("bad", LoopedCamera, clip=small_clip), start_camera("good", LoopedCamera, clip=small_clip)]
    async with relay_of(cameras) as relay:
        bad, good = relay.relay.streams["bad"], relay.relay.streams["good"]
        pid = bad.pid
        handle, failed = bad._on_unit, []

        def failing(msg: ipc.Message) -> None:  # a bug in handling this camera's units, five times in a row
            if len(failed) < 5:
                failed.append(msg)
                raise RuntimeError("a bug in handling a unit")
            handle(msg)

        bad._on_unit = failing
        bad.worker.clock, bad.worker.rng = Frozen(), NO_JITTER  # a second restart never due, however slow the machine
        tap = Tap(good)
        try:
            await until(lambda: bad.stats.camera_restarts == 1, "the camera started afresh in its worker")
            passed = bad.stats.frames_passed_through
            await until(lambda: bad.stats.frames_passed_through > passed + FPS, "the camera's frames again")
            tap.take()
            pids = (bad.pid, good.pid)
        finally:
            tap.close()
    assert gaps(tap.pts) == [], "every frame of the other camera, throughout"
    assert pids == (pid, pid), "the same process"
    assert bad.stats.worker_restarts == good.stats.worker_restarts == good.stats.camera_restarts == 0
    assert len(lines(caplog, "stream=bad", "could not be handled", "the next no sooner than 0.5s")) == 1


def test_the_relay_restarts_a_camera_whose_messages_it_keeps_failing_on_ever_less_often(caplog):
    """Before: a bug in the relay's handling of a camera's every message restarted that camera every 10 s for ever.
    Now the restarts it asks of the worker back off (0.5 s, 1 s, 2 s ... at most 30 s apart; the relay's clock
    injected, no jitter), each one log line that says when the next may come, the failures between counted into
    it; a minute without a failure and the next one restarts the camera at once, the schedule started again. The
    other camera of the process is never restarted."""
    caplog.set_level(logging.WARNING, logger="relay.stream")
    settings = EncoderSettings(1_000_000, 30.0, 1.0)
    bad, good = (Stream(n, parse_source_spec(f"rtsp://10.0.0.{i}/s"), settings, 640, 360) for i, n in enumerate("bg"))
    (shared,) = share_workers([bad, good], per_worker=2)
    clock, sent, failing = Frozen(), [], [True]
    shared.clock, shared.rng = clock, NO_JITTER
    shared.command = lambda camera, cmd: sent.append((clock.now, camera, cmd))

    def on_message(msg: ipc.Message) -> None:
        if failing[0]:
            raise RuntimeError("a bug in handling a unit")

    bad.on_message = on_message

    def run(seconds: float, step: float = 0.25) -> None:  # a unit of each camera every ``step`` of the clock
        for _ in range(round(seconds / step)):
            for camera in (0, 1):
                shared._on_message(ipc.Message(ipc.UNIT, 0, camera, 0, 0.0, b"\x00\x00\x00\x01\x65"))
            clock.now += step

    start = clock.now
    run(180.0)
    failing[0] = False
    run(60.0)
    failing[0] = True
    before = len(sent)
    run(1.0)
    restarts = [when - start for when, camera, cmd in sent if (camera, cmd) == (0, ipc.CMD_RESTART)]
    assert len(restarts) == len(sent), "the bad camera's restarts, the other camera's none"
    assert restarts[:before] == [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5, 61.5, 91.5, 121.5, 151.5]
    assert restarts[before:] == [240.0, 240.5], "at once after a good minute, then 0.5 s later"
    said = lines(caplog, "stream=b", "could not be handled", "restarting the camera")
    assert len(said) == len(restarts) and len(caplog.records) == len(said), "a line a restart, no other"
    assert "restart 2, the next no sooner than 1.0s after it" in said[1] and "(1 more failures" in said[1]
    assert "restart 8, the next no sooner than 30.0s after it" in said[7] and "(119 more failures" in said[7]
    assert "the next no sooner than 0.5s after it" in said[before]
    assert good.stats.camera_restarts == 0 and good.stats.frames_encoded == 4 * 241


async def test_the_relay_s_watchdog_gives_a_worker_whose_encode_thread_just_started_a_fresh_worker_s_grace(
    monkeypatch,
):
    """Before: a passed-through camera's worker whose camera stopped started its slate's encode thread a second
    later (SLATE_AFTER) and had 2 s left for its first picture, which waits for PyAV's import and x264's open, before
    the relay's watchdog killed the process (on a Pi, or with a shared worker's cameras all going to the slate at
    once, that is not enough). Now the worker says at once that an encode thread started (``encode_starts``), and the
    watchdog gives the process a fresh one's grace; one that says nothing is still killed past WORKER_STALL."""
    killed = []
    monkeypatch.setattr(stream_module, "signal_group", lambda proc, sig: killed.append(proc.name))
    settings = EncoderSettings(1_000_000, 30.0, 1.0)
    slow, dead = (Stream(n, parse_source_spec(f"rtsp://10.0.0.{i}/s"), settings, 640, 360) for i, n in enumerate("sd"))
    camera_stopped = time.monotonic() - worker.SLATE_AFTER  # both cameras' last unit: their slates start now
    for stream in (slow, dead):
        stream.last_unit = camera_stopped
    status = ipc.WorkerStatus(encode_starts=1, slate=True)
    slow.on_message(ipc.Message(ipc.STATUS, 0, 0, 0, 0.0, status.to_json()))  # only the slow one's worker says so
    procs = [types.SimpleNamespace(name=s.name, returncode=None) for s in (slow, dead)]
    watchdogs = [asyncio.create_task(s.worker._watchdog(p)) for s, p in zip((slow, dead), procs, strict=True)]
    try:
        while time.monotonic() - camera_stopped <= stream_module.WORKER_STALL + 2 * stream_module.WATCHDOG_PERIOD:
            await asyncio.sleep(stream_module.WATCHDOG_PERIOD)
        await asyncio.wait_for(watchdogs[1], DEADLINE)
    finally:
        for task in watchdogs:
            task.cancel()
    assert killed == ["d"], "the worker that said nothing killed, the one whose slate's encoder started not"
    assert (slow.stats.worker_stalls, dead.stats.worker_stalls) == (0, 1)


@pytest.mark.parametrize(
    "encoding, reason",
    [({"bframes": 2}, "B-frames"), ({"codec": "h265"}, "H.265")],
    ids=["b-frames", "h265"],
)
async def test_a_camera_that_needs_a_transcode_leaves_the_shared_worker_for_one_of_its_own(
    start_camera, small_clip, http, encoding, reason
):
    """Before: a camera in auto that turned out to need transcoding (B-frames; H.265, which FFmpeg's demuxer
    reads) was transcoded inside the shared process, under the GIL of its other cameras. Now it stops there and
    the relay moves it to a worker of its own, where it is transcoded (a viewer decodes it, pixel clock read); the
    other camera stays in its process, never restarted, every frame in its hub."""
    plain = start_camera("plain", LoopedCamera, clip=small_clip)
    odd = start_camera("odd", width=640, height=360, fps=FPS, encoding=Encoding(**encoding))
    config = make_config(
        tuple(StreamConfig(c.path, parse_source_spec(c.url)) for c in (odd, plain)),  # plain: camera 1 of 2
        fps=FPS, cameras_per_worker=SHARING,
    )  # fmt: skip
    runner, relay = await start_relay(config, wait=False)
    try:
        p, o = relay.relay.streams["plain"], relay.relay.streams["odd"]
        await until(lambda: p.passthrough and p.stats.frames_passed_through > 0, "the plain camera live")
        pid, tap = p.pid, Tap(p)
        try:
            await until(lambda: o.mode == "transcode" and o.stats.frames_encoded > FPS, "the odd camera transcoded")
            viewer = WhepViewer(relay.whep("odd"), http)
            try:
                await viewer.connect()
                seen = [await viewer.recv(timeout=DEADLINE) for _ in range(FPS)]
            finally:
                await viewer.close()
            await until(lambda: len(tap.take()) >= FRAMES, "the plain camera's frames")
            pids = (p.pid, o.pid)
        finally:
            tap.close()
        async with http.get(relay.base + "/api/v1/streams") as resp:
            api = {s["name"]: s for s in (await resp.json())["streams"]}
        # The shared process, restarted, runs only the camera still in it (as camera 0 of one, not 1 of 2).
        os.killpg(pid, signal.SIGKILL)
        await until(lambda: p.stats.worker_restarts == 1, "the shared worker restarted")
        passed = p.stats.frames_passed_through
        await until(lambda: p.stats.frames_passed_through > passed + FPS, "the plain camera in the new process")
        after = (p.camera, o.stats.worker_restarts, o.pid == pids[1])
    finally:
        await runner.cleanup()
    assert pids[0] == pid and pids[1] not in (None, pid), "the odd camera in a process of its own, the plain stays"
    assert reason in api["odd"]["mode_reason"] and api["odd"]["encoders_running"] == 1
    assert (api["odd"]["worker_moves"], api["odd"]["worker_restarts"]) == (1, 0)
    assert (api["plain"]["mode"], api["plain"]["restarts"]) == ("passthrough", 0)
    assert gaps(tap.pts) == [], "every frame of the plain camera, throughout"
    assert all(frame_clock(f) is not None for f in seen), "the viewer decodes the transcoded camera"
    assert after == (0, 0, True), "the moved camera untouched by its old process's restart"


# -- a shared worker's cameras in this process (``worker.Cameras``), real pipelines and threads, faults injected


class Outputs:
    """What a worker's pipelines emit: each pipeline is made with its own ``emit`` (``for_pipeline``), so what an
    old pipeline still sends after it was replaced is told from its successor's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[tuple[int, int, int]] = collections.Counter()  # (pipeline, camera, kind)
        self.statuses: collections.defaultdict[int, list[ipc.WorkerStatus]] = collections.defaultdict(list)  # camera's

    def for_pipeline(self, number: int):
        def emit(data: bytes) -> None:
            kind, _, camera, *_ = ipc.parse_header(data[: ipc.HEADER.size])
            with self._lock:
                self._counts[number, camera, kind] += 1
                if kind == ipc.STATUS:
                    self.statuses[camera].append(ipc.WorkerStatus.from_json(data[ipc.HEADER.size :]))

        return emit

    def count(self, kind: int, camera: int | None = None, pipeline: int | None = None) -> int:
        with self._lock:
            return sum(
                n for (p, c, k), n in self._counts.items()
                if k == kind and camera in (None, c) and pipeline in (None, p)
            )  # fmt: skip


def pattern(camera: int):
    return lambda: capture.TestPatternSource(320, 240, 15.0, f"cam{camera}", "")


def in_process(kinds: dict[int, list], outputs: Outputs, count: int = 2, clock=time.monotonic, **sources):
    """``worker.Cameras`` of ``count`` test-pattern cameras; camera ``i``'s successive pipelines are of the classes
    ``kinds[i]`` lists (then ``worker.Pipeline``), each emitting through ``outputs`` under its number in ``made``;
    ``sources[f"cam{i}"]``: camera ``i``'s source factory; ``clock``: the restarts' schedule's (no jitter)."""
    made: list[worker.Pipeline] = []

    def make(camera: int) -> worker.Pipeline:
        queue = kinds.get(camera, [])
        cls = queue.pop(0) if queue else worker.Pipeline
        pipeline = cls(
            f"cam{camera}", "test:", sources.get(f"cam{camera}", pattern(camera)),
            EncoderSettings(200_000, 15.0, 1.0, "libx264"), outputs.for_pipeline(len(made)), size=(320, 240),
            camera=camera,
        )  # fmt: skip
        made.append(pipeline)
        return pipeline

    return worker.Cameras(make, count, clock, NO_JITTER), made


async def tick_until(cameras: worker.Cameras, condition, what: str) -> None:
    """The worker's main loop (``Cameras.tick``), faster, until ``condition()``; DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {DEADLINE:g}s"
        cameras.tick()
        await asyncio.sleep(worker.WATCH_INTERVAL / 5)


async def both_go_on(cameras: worker.Cameras, outputs: Outputs, frames: int = 15) -> None:
    before = [outputs.count(ipc.UNIT, camera) for camera in (0, 1)]
    await tick_until(
        cameras,
        lambda: all(outputs.count(ipc.UNIT, c) >= before[c] + frames for c in (0, 1)),
        f"{frames} more frames of both cameras",
    )


class Frozen:
    """A clock that stands still unless moved: an injected clock for a restarts' schedule."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Middle(random.Random):
    """Jitter that is none: every draw is the middle of the range."""

    def random(self) -> float:
        return 0.5


NO_JITTER = Middle()


def lines(caplog, *words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if all(w in r.getMessage() for w in words)]


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
    stuck = iter([lambda: StuckSource(320, 240, 15.0, "stuck", "", after=5, release=release)])
    outputs = Outputs()
    cameras, made = in_process({}, outputs, cam1=lambda: next(stuck, pattern(1))())
    cameras.start()
    try:
        await tick_until(cameras, lambda: cameras.replaced > 0, "the stuck camera replaced")
        errors = cameras.pipelines[1].status().source_errors
        await both_go_on(cameras, outputs)
    finally:
        release.set()
        await asyncio.to_thread(cameras.stop)
    assert cameras.replaced == 1 and len(made) == 3 and cameras.pipelines[1] is made[2]
    assert cameras.pipelines[0] is made[0], "the other camera's pipeline was never touched"
    assert errors >= 2, "the stall and the stuck thread, carried into the new pipeline's counters"
    assert cameras.pipelines[1].status().camera_restarts == 1


class Racing:
    """A clock that moves on a long way at every look: a restarts' schedule for which every restart is due."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1000.0
        return self.now


async def test_a_camera_whose_capture_sticks_every_time_leaves_at_most_capture_left_max_threads_behind(
    monkeypatch, caplog
):
    """Before: a camera whose driver hung every read was started afresh at every stuck capture, each time one more
    capture thread left behind, stuck for good (with its device), for as long as the relay ran. Now, with
    ``CAPTURE_LEFT_MAX`` left behind and still stuck, the camera stays dark (its slate), said once in the log and in
    its status, until one of them returns; then it is started afresh again. The other camera never stops. Its
    restarts' schedule is a clock for which every restart is due: only the cap holds it."""
    caplog.set_level(logging.WARNING, logger=worker.log.name)
    monkeypatch.setattr(worker, "CAPTURE_STALL", 0.3)
    monkeypatch.setattr(worker, "STUCK_EXIT", 0.3)
    releases: list[threading.Event] = []

    def sticking() -> StuckSource:
        releases.append(threading.Event())
        return StuckSource(320, 240, 15.0, "stuck", "", after=5, release=releases[-1])

    outputs = Outputs()
    cameras, made = in_process({}, outputs, clock=Racing(), cam1=sticking)
    cameras.start()
    try:
        await tick_until(cameras, lambda: len(made) >= 4 and made[3].stuck, "the camera's third capture stuck")
        for _ in range(10):  # ten more watches
            cameras.tick()
        held = (cameras.replaced, cameras.pipelines[1] is made[3], made[3].status().last_error)
        assert held == (2, True, "capture stuck in the driver, and 2 before it"), "no third capture thread left behind"
        frames = outputs.count(ipc.UNIT, 0)
        await tick_until(cameras, lambda: outputs.count(ipc.UNIT, 0) >= frames + 15, "the other camera meanwhile")
        releases[0].set()  # the first capture left behind returns, and its thread ends
        await tick_until(cameras, lambda: cameras.replaced >= 3, "started afresh again once one had returned")
    finally:
        for release in releases:
            release.set()
        await asyncio.to_thread(cameras.stop)
    assert worker.CAPTURE_LEFT_MAX == 2
    assert cameras.pipelines[0] is made[0], "the other camera's pipeline was never touched"
    assert len(lines(caplog, "stream=cam1", "not started afresh until one of them returns")) == 1
    assert len(lines(caplog, "stream=cam1", "capture is stuck in the driver", "starting the camera afresh")) >= 3


class EncodeThreadDies(worker.Pipeline):
    """A camera whose encode thread dies after a few frames (a bug in it, or in PyAV under it: none is known; the
    watch must not depend on which). Its capture thread goes on; nothing more leaves it, and its status says live."""

    def _encode_frame(self, frame, *args, **kwargs) -> None:
        if self.stats.frames_encoded >= 5:
            raise RuntimeError("the encode thread's bug")
        super()._encode_frame(frame, *args, **kwargs)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the bug injected: it kills
async def test_a_camera_that_stops_sending_while_its_worker_s_other_camera_sends_is_started_afresh(caplog):
    """Before: the relay's watchdog saw the process, not each camera, and a camera of a shared worker whose encode
    thread died stayed dark for good, its status live. Now the worker starts it afresh after ipc.OUTPUT_STALL of
    silence, counted in its status, in one log line, the other camera's pipeline never touched."""
    caplog.set_level(logging.WARNING, logger=worker.log.name)
    outputs = Outputs()
    cameras, made = in_process({1: [EncodeThreadDies]}, outputs)
    cameras.start()
    try:
        await tick_until(cameras, lambda: outputs.count(ipc.UNIT, 1, pipeline=1) >= 5, "the camera's first frames")
        await tick_until(cameras, lambda: cameras.replaced > 0, "the silent camera started afresh")
        assert made[1].status().state == "live", "what its status said, silent (the relay could not tell)"
        await both_go_on(cameras, outputs)
    finally:
        await asyncio.to_thread(cameras.stop)
    assert cameras.replaced == 1 and cameras.pipelines[0] is made[0] and cameras.pipelines[1] is made[2]
    assert cameras.pipelines[1].status().camera_restarts == 1
    assert len(lines(caplog, "stream=cam1", "sent nothing")) == 1
    assert lines(caplog, "stream=cam0") == []


class Unplugged(capture.TestPatternSource):
    """A camera that cannot be opened: its stream shows the slate."""

    def open(self) -> None:
        raise SourceError("unplugged")


async def test_a_camera_whose_first_slate_is_slow_is_not_taken_for_a_silent_one(caplog):
    """Before: a camera's encode thread, once started for the slate, had OUTPUT_STALL (3 s) for its first picture,
    which waits for PyAV's and numpy's import, the slate's first drawing and x264's open: on a Pi with the
    process's other cameras' slates starting at once, longer, and the camera was started afresh as if its encode
    thread had died (again at every slate). Now that first picture gets a fresh camera's grace
    (ipc.OUTPUT_STARTUP_GRACE): a first slate held back past OUTPUT_STALL restarts nothing, and then shows."""
    caplog.set_level(logging.WARNING, logger=worker.log.name)
    entered, release = threading.Event(), threading.Event()

    class SlowFirstSlate(worker.Pipeline):
        def _slate_frame(self):
            if not entered.is_set():
                entered.set()
                release.wait(DEADLINE)  # as slow as the test says
            return super()._slate_frame()

    outputs = Outputs()
    cameras, made = in_process({1: [SlowFirstSlate]}, outputs, cam1=lambda: Unplugged(320, 240, 15.0, "cam1", ""))
    cameras.start()
    try:
        await tick_until(cameras, entered.is_set, "the camera's first slate begun")
        since = time.monotonic()
        await tick_until(cameras, lambda: time.monotonic() - since > ipc.OUTPUT_STALL + 1, "watches past the stall")
        assert cameras.replaced == 0, "taken for silent while its first slate was on its way"
        release.set()
        await tick_until(cameras, lambda: outputs.count(ipc.UNIT, 1, pipeline=1) >= 5, "the slate's pictures")
    finally:
        release.set()
        await asyncio.to_thread(cameras.stop)
    assert cameras.replaced == 0 and cameras.pipelines[1] is made[1], "never taken for silent"
    assert lines(caplog, "stream=cam1", "starting the camera afresh") == []


class WatchRaises(worker.Pipeline):
    """A camera whose watch (``tick``, on the worker's main thread) raises every time: a bug in it."""

    def tick(self) -> None:
        raise RuntimeError("the watch's bug")


async def test_a_camera_whose_watch_raises_is_restarted_alone_and_not_again_before_its_schedule_says(caplog):
    """Before: one camera's exception in the worker's main loop ended the process, every camera with it. Now that
    camera alone is started afresh, in one log line; its successor raising too is not restarted again before its
    restarts' schedule says (its failures counted into the next line), and the other camera never stops."""
    caplog.set_level(logging.WARNING, logger=worker.log.name)
    outputs = Outputs()
    cameras, made = in_process({1: [WatchRaises, WatchRaises]}, outputs, clock=Frozen())  # no wait ever ends
    cameras.start()
    try:
        await tick_until(cameras, lambda: cameras.replaced > 0, "the camera started afresh")
        for _ in range(10):  # ten watches of its successor, each raising
            cameras.tick()
        await both_go_on(cameras, outputs)
    finally:
        await asyncio.to_thread(cameras.stop)
    assert cameras.replaced == 1 and len(made) == 3 and cameras.pipelines[0] is made[0]
    assert len(lines(caplog, "stream=cam1", "its watch failed", "starting the camera afresh")) == 1
    assert lines(caplog, "stream=cam0") == []


class Idle(worker.Pipeline):
    """A camera that runs no thread and sends nothing, yet never counts as silent: only its watch is looked at."""

    failing = False  # its watch raises while set (every idle camera's of the test)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.last_alive = math.inf

    def start(self) -> None:
        pass

    def tick(self) -> None:
        if self.failing:
            raise RuntimeError("the watch's bug")


async def test_a_camera_whose_watch_keeps_raising_is_restarted_ever_less_often_and_again_at_once_after_a_good_run(
    caplog,
):
    """Before: a camera whose watch raised at every tick was started afresh every 10 s for ever. Now its restarts
    back off (0.5 s, 1 s, 2 s ... at most 30 s apart; the worker's clock injected, no jitter), each restart one log
    line that says when the next may come; after a minute without a failure a new one restarts it at once, and
    the schedule starts again."""
    caplog.set_level(logging.WARNING, logger=worker.log.name)
    clock = Frozen()

    class Failing(Idle):
        pass

    cameras, made = in_process({0: [Idle], 1: [Failing] * 100}, Outputs(), clock=clock)
    restarted_at = []

    def run(seconds: float) -> None:  # the worker's main loop, for ``seconds`` of its clock
        for _ in range(round(seconds / worker.WATCH_INTERVAL)):
            replaced = cameras.replaced
            cameras.tick()
            if cameras.replaced > replaced:
                restarted_at.append(clock.now)
            clock.now += worker.WATCH_INTERVAL

    start = clock.now
    Failing.failing = True
    run(180.0)
    gaps = [b - a for a, b in zip(restarted_at, restarted_at[1:], strict=False)]
    Failing.failing = False
    run(60.0)  # a minute's good run
    Failing.failing = True
    before = len(restarted_at)
    run(1.0)
    assert restarted_at[0] == start and gaps == [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    assert restarted_at[before:] == [start + 240.0, start + 240.5], "at once after a good run, then 0.5 s"
    said = lines(caplog, "stream=cam1", "its watch failed", "starting the camera afresh")
    assert len(said) == len(restarted_at) == cameras.replaced, "a line a restart"
    assert "restart 2, the next no sooner than 1.0s after it" in said[1] and "(1 more failures" in said[1]
    assert "restart 8, the next no sooner than 30.0s after it" in said[7] and "(119 more failures" in said[7]
    assert "the next no sooner than 0.5s after it" in said[before]
    assert cameras.pipelines[0] is made[0] and lines(caplog, "stream=cam0") == []


def test_restarts_the_relay_asks_for_leave_the_worker_s_own_schedule_alone(caplog):
    """Before: each restart the relay asked for (``ipc.CMD_RESTART``, spaced by the relay's own schedule) advanced
    the worker's schedule too: after three of them, a camera whose watch then failed waited 4 s for the worker's
    first restart of it, which its line called restart 4. Now each side's schedule counts its own failures only:
    the relay's asks are done at once, each one line saying so, and the worker's own first restart is at once, then
    0.5 s later (its clock injected, standing still until moved)."""
    caplog.set_level(logging.WARNING, logger=worker.log.name)
    clock = Frozen()

    class Failing(Idle):
        pass

    cameras, made = in_process({0: [Idle], 1: [Failing] * 10}, Outputs(), clock=clock)
    for _ in range(3):
        cameras.command(1, ipc.CMD_RESTART, None)
    asked = cameras.replaced
    Failing.failing = True
    cameras.tick()
    first = cameras.replaced
    cameras.tick()
    clock.now += 0.5
    cameras.tick()
    assert (asked, first, cameras.replaced) == (3, 4, 5), "the relay's three, then the worker's own at once, 0.5 s on"
    assert len(lines(caplog, "stream=cam1", "could not handle its messages", "as the relay asks")) == 3
    said = lines(caplog, "stream=cam1", "its watch failed", "starting the camera afresh")
    assert len(said) == 2 and "restart 1, the next no sooner than 0.5s after it" in said[0], said
    assert cameras.pipelines[0] is made[0] and cameras.pipelines[1].status().camera_restarts == 5


class StatusRaises(worker.Pipeline):
    """A camera whose status raises on the worker's main thread once ``broken`` is set: a bug in it."""

    broken = threading.Event()

    def status(self) -> ipc.WorkerStatus:
        if self.broken.is_set() and threading.current_thread() is threading.main_thread():
            raise RuntimeError("the status's bug")
        return super().status()


async def test_a_camera_whose_status_raises_is_started_afresh_and_its_counters_never_go_back():
    """Before: a camera whose status raised was started afresh with the counts of the pipelines before it only,
    so the frames it had captured, as its last status said, were taken back: the relay's counters went down. Now
    its last status's counts are carried on; every counter in every status of it is at least the one before, and
    the relay keeps a counter from going back whatever a worker says."""
    StatusRaises.broken.clear()
    outputs = Outputs()
    cameras, made = in_process({1: [StatusRaises]}, outputs)
    cameras.start()
    try:
        await tick_until(cameras, lambda: len(outputs.statuses[1]) >= 2, "statuses of the camera")
        await tick_until(cameras, lambda: outputs.statuses[1][-1].frames_captured >= 15, "its frames counted")
        StatusRaises.broken.set()
        await tick_until(cameras, lambda: cameras.replaced == 1, "the camera started afresh")
        sent = len(outputs.statuses[1])
        await tick_until(cameras, lambda: len(outputs.statuses[1]) >= sent + 2, "the new pipeline's statuses")
        await both_go_on(cameras, outputs)
    finally:
        await asyncio.to_thread(cameras.stop)
    statuses = outputs.statuses[1]
    for key in ipc.WORKER_COUNTERS:
        counts = [getattr(s, key) for s in statuses]
        assert counts == sorted(counts), f"{key} never goes back: {counts}"
    assert statuses[-1].camera_restarts == 1 and cameras.pipelines[1] is made[2]

    # The relay's side: a status whose counts are lower than the one before (a worker's bug) takes nothing back.
    stream = Stream("cam1", parse_source_spec("rtsp://10.0.0.1/s"), EncoderSettings(1_000_000, 30.0, 1.0), 640, 360)
    seen = []
    for frames, restarts in ((100, 2), (40, 1), (150, 3)):
        status = ipc.WorkerStatus(frames_captured=frames, camera_restarts=restarts)
        stream.on_message(ipc.Message(ipc.STATUS, 0, 0, 0, 0.0, status.to_json()))
        api = stream.status().api()
        seen.append((api["frames_captured"], api["camera_restarts"], api["restarts"]))
    assert seen == [(100, 2, 2), (100, 2, 2), (150, 3, 3)]


class FailsToStart(worker.Pipeline):
    """A camera's new pipeline that cannot start (no thread left, an encoder that will not open)."""

    def start(self) -> None:
        raise RuntimeError("can't start new thread")


async def test_a_camera_that_cannot_be_started_afresh_stays_dark_is_tried_again_and_commands_still_count(
    caplog, monkeypatch
):
    """Before: a new pipeline that raised on start left ``Cameras.command`` by an exception, which ended the
    worker's commands thread (every later command of every camera lost) and left the camera halted for good. Now
    the failure is one log line, the other camera goes on, and the camera is started afresh on a later watch."""
    caplog.set_level(logging.WARNING, logger=worker.log.name)
    outputs = Outputs()
    cameras, made = in_process({1: [worker.Pipeline, FailsToStart]}, outputs)
    cameras.start()
    try:
        await both_go_on(cameras, outputs)
        cameras.command(1, ipc.CMD_RESTART, None)  # the relay asks for it; the new pipeline's start raises
        assert len(made) == 3 and cameras.pipelines[1] is made[1] and cameras.replaced == 0
        await tick_until(cameras, lambda: cameras.replaced == 1, "the camera started afresh after the failed start")
        assert cameras.pipelines[1] is made[3]
        await tick_until(cameras, lambda: outputs.count(ipc.UNIT, 1, 3) >= 15, "the new pipeline's frames")
        await both_go_on(cameras, outputs)
    finally:
        await asyncio.to_thread(cameras.stop)
    assert len(lines(caplog, "stream=cam1", "could not be started afresh")) == 1
    assert lines(caplog, "stream=cam0") == []


class StuckSound(audio.TestSoundSource):
    """A sound source whose read, once ``stick`` is set, blocks whatever ``close`` does until ``release`` (an
    ALSA driver stuck in the kernel: none here), then hands over its block."""

    def __init__(self, stick: threading.Event, stuck: threading.Event, release: threading.Event) -> None:
        super().__init__()
        self._stick, self._stuck, self._release = stick, stuck, release

    def read(self):
        block = super().read()
        if self._stick.is_set():
            self._stuck.set()
            self._release.wait(DEADLINE)
        return block


async def test_a_camera_replaced_while_its_sound_is_stuck_sends_nothing_more_and_is_let_go():
    """Before: a camera left behind kept its sound thread's writer (its packets went on beside its successor's, one
    stream of packets made of two) and replacing it waited on that thread. Now the old pipeline's sound goes
    nowhere once it is replaced, and the old pipeline is let go once its threads end."""
    stick, stuck, release = threading.Event(), threading.Event(), threading.Event()
    outputs = Outputs()

    class WithSound(worker.Pipeline):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.audio = audio.AudioPipeline(self.name, lambda: StuckSound(stick, stuck, release), self._emit, camera=1)

    cameras, made = in_process({1: [WithSound]}, outputs)
    cameras.start()
    try:
        await tick_until(cameras, lambda: outputs.count(ipc.AUDIO, 1, pipeline=1) >= 5, "the camera's sound")
        stick.set()
        await tick_until(cameras, stuck.is_set, "its sound's read stuck")
        cameras.command(1, ipc.CMD_RESTART, None)
        sent = outputs.count(ipc.AUDIO, 1, pipeline=1)
        release.set()  # the stuck read returns its block, and the thread ends
        await tick_until(cameras, lambda: not made[1].audio.alive, "the old sound thread ended")
        await tick_until(cameras, lambda: cameras.left_behind == [], "the old pipeline let go")
        await both_go_on(cameras, outputs)
    finally:
        release.set()
        await asyncio.to_thread(cameras.stop)
    assert outputs.count(ipc.AUDIO, 1, pipeline=1) == sent, "nothing from the old pipeline's sound after"
    assert cameras.replaced == 1 and cameras.pipelines[1] is made[2]


async def test_a_camera_whose_sound_hangs_gets_its_sound_back_on_a_new_thread_and_its_video_goes_on(caplog):
    """Before: the output watch looked at the video alone, and a camera whose sound thread hung in its source (an
    ALSA driver stuck in the kernel) went on without sound for good, its status saying live. Now a sound thread
    with no block for its bound (``audio.READ_BOUND``) is left behind and the sound started afresh on a new thread:
    its packets come again, counted in ``audio_restarts``, in one log line; the camera's video is never restarted
    and never stops."""
    caplog.set_level(logging.WARNING, logger=worker.log.name)
    stick, stuck, release = threading.Event(), threading.Event(), threading.Event()
    sources = iter([StuckSound(stick, stuck, release)])  # the first source hangs once told to; the next one never
    outputs = Outputs()

    class WithSound(worker.Pipeline):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.audio = audio.AudioPipeline(
                self.name, lambda: next(sources, None) or audio.TestSoundSource(), self._emit, camera=1
            )

    cameras, made = in_process({1: [WithSound]}, outputs)
    cameras.start()
    try:
        await tick_until(cameras, lambda: outputs.count(ipc.AUDIO, 1) >= 5, "the camera's sound")
        stick.set()
        await tick_until(cameras, stuck.is_set, "its sound's read stuck")
        hung = made[1].audio
        sent = outputs.count(ipc.AUDIO, 1)
        await tick_until(cameras, lambda: outputs.count(ipc.AUDIO, 1) >= sent + 50, "a second of sound again")
        frames = outputs.count(ipc.UNIT, 1)
        await both_go_on(cameras, outputs)
        status = made[1].status()
    finally:
        release.set()
        await asyncio.to_thread(cameras.stop)
    assert cameras.replaced == 0 and cameras.pipelines[1] is made[1], "the camera itself never restarted"
    assert made[1].audio is not hung and not hung.alive, "a new sound thread; the hung one let go once it returned"
    assert (status.audio_restarts, status.camera_restarts, status.audio_state) == (1, 0, "live")
    assert status.audio_frames_captured >= sent + 50, "its counts carried on"
    assert outputs.count(ipc.UNIT, 1) > frames and outputs.count(ipc.UNIT, 1, pipeline=1) == outputs.count(ipc.UNIT, 1)
    assert len(lines(caplog, "stream=cam1", "starting the sound afresh", "restart 1")) == 1
    assert lines(caplog, "stream=cam0") == []


class StuckOpen(audio.TestSoundSource):
    """A sound source whose open blocks whatever ``close`` does until ``release`` (an ALSA device that never returns
    from opening: none here), then opens."""

    def __init__(self, stuck: threading.Event, release: threading.Event) -> None:
        super().__init__()
        self._stuck, self._release = stuck, release

    def open(self) -> None:
        self._stuck.set()
        self._release.wait(DEADLINE)
        super().open()


@pytest.mark.parametrize("where", ["in the source", "opening the source"], ids=["read", "open"])
async def test_a_sound_that_hangs_every_time_leaves_at_most_sound_left_max_threads_behind(caplog, where):
    """Before: each restart of a sound that hung left its thread behind for good (an ALSA driver stuck in the
    kernel holds its read, and its device context open), one more at every restart for as long as the relay ran;
    and a sound whose source hung in its open (the device never returns from opening) was not watched at all, silent
    for good. Now a thread stuck in the open (past ``audio.OPEN_BOUND``) is left behind as one stuck in a read; with
    ``SOUND_LEFT_MAX`` left behind and still stuck, the sound stays silent, said once, until one of them returns;
    then it is started afresh again. The watch is driven with an injected clock, each look past any wait."""
    caplog.set_level(logging.WARNING, logger=worker.log.name)
    stick = threading.Event()
    stick.set()  # every source hangs at its first read, or in its open
    stuck: list[threading.Event] = []
    releases: list[threading.Event] = []

    def hanging() -> audio.AudioSource:
        stuck.append(threading.Event())
        releases.append(threading.Event())
        if where == "opening the source":
            return StuckOpen(stuck[-1], releases[-1])
        return StuckSound(stick, stuck[-1], releases[-1])

    outputs = Outputs()

    class WithSound(worker.Pipeline):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.audio = audio.AudioPipeline(self.name, hanging, self._emit, camera=1)

    cameras, made = in_process({1: [WithSound]}, outputs)
    cameras.start()
    camera = made[1]
    later = time.monotonic()

    async def look(sources: int) -> int:
        """The watch's look, well after the last, once ``sources`` sources were opened and are stuck."""
        nonlocal later
        await tick_until(cameras, lambda: len(stuck) >= sources and stuck[sources - 1].is_set(), "a source stuck")
        later += 1000.0
        camera._check_sound(later)
        return camera.audio.restarts

    try:
        assert await look(1) == 1
        assert await look(2) == 2
        assert [await look(3), await look(3)] == [2, 2], "no third thread left behind"
        assert len(stuck) == 3 and camera.audio.last_error.startswith(f"its thread stuck {where}")
        releases[0].set()  # the first left behind returns, and its thread ends
        await tick_until(cameras, lambda: sum(a.alive for a in camera._audio_left) == 1, "the first thread ended")
        assert await look(3) == 3, "started afresh again once one had returned"
    finally:
        for release in releases:
            release.set()
        await asyncio.to_thread(cameras.stop)
    assert worker.SOUND_LEFT_MAX == 2
    assert len(lines(caplog, "stream=cam1", "not started afresh until one of them returns")) == 1
    assert len(lines(caplog, "stream=cam1", f"its thread stuck {where}; starting the sound afresh")) == 3


def in_pipe_write(thread: threading.Thread | None, code=worker.PipeWriter.__call__.__code__) -> bool:
    """``thread`` is in a write to the relay's pipe (``worker.PipeWriter``): waiting for room in it, or for its lock
    (or, ``code``, in that function)."""
    frame = sys._current_frames().get(thread.ident) if thread is not None else None
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


class Drain(threading.Thread):
    """The relay reading the worker's pipe at last: every message counted by (camera, kind)."""

    def __init__(self, fd: int) -> None:
        super().__init__(name="drain", daemon=True)
        self._fd = fd
        self.counts: collections.Counter[tuple[int, int]] = collections.Counter()

    def run(self) -> None:
        reader = ipc.Reader()
        while data := os.read(self._fd, 1 << 16):
            for msg in reader.feed(data):
                self.counts[msg.camera, msg.kind] += 1


async def test_a_full_pipe_to_the_relay_is_not_taken_for_a_hung_source_nor_a_silent_camera(small_clip):
    """Before: a camera's threads waiting to write to the relay (the pipe full: the relay slow to read it) stopped
    reading their sources, and the watches took that for a hung sound (``AudioPipeline.hung``), a stalled capture
    (its source closed and reopened) and a camera gone silent (started afresh): healthy cameras restarted because the
    relay was slow. Now a thread that waits in a write is judged by none of them, and each counts from when the write
    ended. Two passed-through cameras with sound in a shared worker write into a real pipe nobody reads; once every
    capture and sound thread waits on it, the watches look as if 1000 s had passed (an injected time); then the pipe
    is read again and both cameras carry on, never restarted."""
    read_end, write_end = os.pipe()
    pipe = worker.PipeWriter(write_end, lambda: None)
    config = ipc.WorkerConfig("cam", f"file:{small_clip}", 640, 360, FPS, 1_000_000, 1.0, "libx264", mode="passthrough",
                              audio="test")  # fmt: skip
    configs = [dataclasses.replace(config, name=f"cam{i}") for i in (0, 1)]
    cameras = worker.Cameras(lambda i: worker.make_pipeline(configs[i], i, pipe, shared=True), 2, Frozen(), NO_JITTER)
    drain = Drain(read_end)
    cameras.start()
    try:
        threads = [thread for p in cameras.pipelines for thread in (p._capture, p.audio._thread)]
        await until(lambda: all(map(in_pipe_write, threads)), "every capture and sound thread waiting on the pipe")
        later = time.monotonic() + 1000.0
        hung = [p.audio.hung(later) for p in cameras.pipelines]
        for p in cameras.pipelines:
            p._check_stall(later)
        silent = [cameras._why_restart(p, later) for p in cameras.pipelines]
        errors = [p.stats.source_errors for p in cameras.pipelines]
        drain.start()
        await tick_until(
            cameras,
            lambda: all(drain.counts[c, ipc.UNIT] >= FPS and drain.counts[c, ipc.AUDIO] >= 50 for c in (0, 1)),
            "a second of each camera's pictures and sound read",
        )
        statuses = [p.status() for p in cameras.pipelines]
    finally:
        await asyncio.to_thread(cameras.stop)
        os.close(write_end)
        if drain.is_alive():
            drain.join(DEADLINE)
        os.close(read_end)
    assert hung == [0.0, 0.0], "the sound's threads waiting to write are not hung"
    assert silent == ["", ""], "cameras waiting to write are not silent"
    assert errors == [0, 0], "no capture taken for stalled"
    assert (
        cameras.replaced == 0
        and [(s.camera_restarts, s.audio_restarts, s.source_errors) for s in statuses] == [(0, 0, 0)] * 2
    )


def fill(fd: int) -> None:
    """The pipe ``fd`` writes to made full, as a relay slow to read it leaves it, to the last byte a message could
    take: of whole messages (each under PIPE_BUF: written whole or not at all), ever smaller, of a camera 9 the
    tests do not count."""
    os.set_blocking(fd, False)
    try:
        for size in (3000, 1000, 300, 100, 30, 10, 3, 1, 0):
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(fd, ipc.pack(ipc.UNIT, b"\0" * size, camera=9))
    finally:
        os.set_blocking(fd, True)


async def test_a_sound_thread_logging_into_a_full_pipe_is_not_taken_for_hung():
    """Before: only a pipeline's own packets counted as writes that may wait; the worker's log lines go to the relay
    through the same pipe (``ForwardingHandler`` on the same ``PipeWriter``), so a sound thread that logged it went
    live while the pipe was full waited there and was taken for hung (its sound restarted because the relay was
    slow). Now any write to the pipe counts: the thread waiting in its log line is not hung, however long it waits,
    and once the pipe is read it carries on."""
    read_end, write_end = os.pipe()
    pipe = worker.PipeWriter(write_end, lambda: None)
    handler = worker.ForwardingHandler(
        lambda level, name, msg: pipe(ipc.pack_json(ipc.LOG, {"level": level, "logger": name, "message": msg}))
    )
    logger = logging.getLogger(audio.__name__)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    sound = audio.AudioPipeline("cam0", lambda: audio.open_audio_source("test"), pipe)
    drain = Drain(read_end)
    fill(write_end)
    sound.start()
    try:
        await until(
            lambda: in_pipe_write(sound._thread) and in_pipe_write(sound._thread, handler.emit.__code__),
            "its 'went live' line waiting on the full pipe",
        )
        hung = sound.hung(time.monotonic() + 1000.0)
        drain.start()
        await until(lambda: drain.counts[0, ipc.AUDIO] >= 50, "a second of its sound read")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        sound.halt()
        await asyncio.to_thread(sound.join, DEADLINE)
        os.close(write_end)
        if drain.is_alive():
            drain.join(DEADLINE)
        os.close(read_end)
    assert hung == 0.0, "a thread waiting to write its log line is not hung"
    assert drain.counts[0, ipc.LOG] >= 1 and sound.restarts == 0


async def test_a_capture_thread_waiting_for_the_unit_lock_held_by_a_write_into_a_full_pipe_is_not_stalled():
    """Before: a capture thread waiting for the lock that keeps a camera's units and the slate apart (``_emitting``)
    while the slate's thread held it, waiting to write into a full pipe, was in no write of its own: its stall watch
    took it for a stalled source (closed and reopened) and the output watch for a silent camera. Now it waits to
    write as the holder does: judged by neither, however long; and once the holder's write ends, it is judged
    again."""
    read_end, write_end = os.pipe()
    pipe = worker.PipeWriter(write_end, lambda: None)
    config = ipc.WorkerConfig("cam0", "test:", 320, 240, FPS, 1_000_000, 1.0, "libx264", mode="passthrough")
    pipeline = worker.make_pipeline(config, 0, pipe, shared=True)
    fill(write_end)

    def slate() -> None:
        with pipeline._emitting():
            pipeline._send(ipc.pack(ipc.UNIT, b"\0" * 10_000, camera=0))  # more than a full pipe's room left

    def capture_unit() -> None:
        with pipeline._emitting():
            pass

    holder = threading.Thread(target=slate, name="encode-cam0", daemon=True)
    pipeline._encode = holder
    holder.start()
    await until(lambda: in_pipe_write(holder), "the slate's write waiting on the full pipe")
    waiter = threading.Thread(target=capture_unit, name="capture-cam0", daemon=True)
    pipeline._capture = waiter
    waiter.start()
    try:
        await until(lambda: worker.WRITES.waits(waiter.ident), "the capture thread waiting behind it")
        pipeline.stats.state = "live"
        later = time.monotonic() + 1000.0
        pipeline._check_stall(later)
        judged = (pipeline.stats.source_errors, pipeline.silent(later))
    finally:
        os.read(read_end, 1 << 20)  # room: the slate's write ends, the capture thread takes the lock
        await asyncio.to_thread(holder.join, DEADLINE)
        await asyncio.to_thread(waiter.join, DEADLINE)
        os.close(write_end)
        os.close(read_end)
    assert judged == (0, 0.0), "waiting behind a write into a full pipe: neither stalled nor silent"
    assert not worker.WRITES.waits(waiter.ident) and pipeline.silent(later) > 0, "judged again once it ended"


def test_a_camera_s_silence_counts_from_the_end_of_a_write_that_waited_and_not_from_a_quick_one(monkeypatch):
    """Before: any write of its capture or encode thread moved the point the output watch counts a camera's silence
    from, a status at every retry of a source that is down too: a shared camera whose slate had stopped was never
    taken for silent while its source was retried. Now only a write that waited (the pipe full: ``writes.WAITED``)
    does, and its silence counts from the write's end. The writes' clock is injected: a write lasts as long as the
    test says."""
    clock = Frozen(1000.0)
    monkeypatch.setattr(worker, "WRITES", writes.Writes(clock))
    took = [0.0]

    def emit(data: bytes) -> None:  # records its write as production's emit does (worker.PipeWriter)
        with worker.WRITES.waiting():
            clock.now += took[0]

    config = ipc.WorkerConfig("cam0", "test:", 320, 240, FPS, 1_000_000, 1.0, "libx264", mode="passthrough")
    pipeline = worker.make_pipeline(config, 0, emit, shared=True)
    pipeline.last_alive = 1000.0

    results: list[float] = []

    def capture_loop() -> None:  # one capture thread: a unit, the pipe full all that while; then a quick status
        took[0] = 10 * ipc.OUTPUT_STALL
        pipeline._send(b"unit")
        results.append(pipeline.silent(clock.now + 1.0))
        clock.now += 1.0
        took[0] = 0.0
        pipeline._send(b"status at a source's retry")
        results.append(pipeline.silent(clock.now + ipc.OUTPUT_STALL))

    pipeline._capture = threading.Thread(target=capture_loop, name="capture-cam0")
    pipeline._capture.start()
    pipeline._capture.join(DEADLINE)
    after_wait, after_status = results
    assert after_wait == 1.0, "counted from the end of the write that waited, not from the last unit before it"
    assert after_status == 1.0 + ipc.OUTPUT_STALL, "a quick write is no sign of life: silent past the bound"


class Recorded(capture.TestPatternSource):
    """A test pattern that records its close and the end of its last read in ``events``; with ``wait_for``, that
    read ends only once ``wait_for`` is set (or DEADLINE)."""

    def __init__(self, label: str, events: list[str], closed: threading.Event, wait_for: threading.Event | None):
        super().__init__(320, 240, 15.0, label, "")
        self._events, self._closed, self._wait_for = events, closed, wait_for

    def read(self):
        try:
            return super().read()
        except SourceError:
            if self._wait_for is not None:
                self._wait_for.wait(DEADLINE)
            self._events.append(f"{self._label} read ended")
            raise

    def close(self) -> None:
        self._events.append(f"{self._label} closed")
        super().close()
        self._closed.set()


async def test_stopping_a_shared_worker_stops_its_cameras_together(monkeypatch):
    """Before: each camera was stopped and waited for before the next was told, so N cameras slow to stop took N
    times as long. Now every camera is told first: the second camera's source is closed while the first's read
    still waits for it (it waits for exactly that), and then both end."""
    monkeypatch.setattr(worker, "THREAD_JOIN_TIMEOUT", 2 * DEADLINE)  # as if each took long: none is given up on
    events: list[str] = []
    closed = [threading.Event(), threading.Event()]
    sources = {
        "cam0": lambda: Recorded("cam0", events, closed[0], wait_for=closed[1]),
        "cam1": lambda: Recorded("cam1", events, closed[1], wait_for=None),
    }
    outputs = Outputs()
    cameras, made = in_process({}, outputs, **sources)
    cameras.start()
    await both_go_on(cameras, outputs, frames=5)
    await asyncio.to_thread(cameras.stop)
    assert events.index("cam1 closed") < events.index("cam0 read ended"), events
    names = {f"{kind}-cam{i}" for kind in ("capture", "encode") for i in (0, 1)}
    assert [t.name for t in threading.enumerate() if t.name in names] == [], "every thread of theirs ended"
