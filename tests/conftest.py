"""Shared fixtures: a real relay on loopback, and guards against leaks.

Every test fails if it leaves a thread, a child process, an asyncio task or a
file descriptor behind. An async test that runs out of time is cancelled
before pytest-timeout fires (``pytest_runtest_call`` below), so it cleans up.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import multiprocessing as mp
import os
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from multiprocessing import resource_tracker

import aiohttp
import psutil
import pytest
from aiohttp import web

from benchmarks.ports import free_port, free_rtp_pair
from relay.camera import pixelclock
from relay.config import AuthConfig, Config, HttpConfig, RtspConfig, StreamConfig, VideoConfig, WebRTCConfig
from relay.service import Relay
from relay.source import SourceSpec
from relay.stream import Stream
from relay.webrtc.whepclient import FrameSample, WhepViewer, luma
from signalling.app import make_app
from signalling.server import make_runner, start_site

pytest_plugins = ("tests.cameras",)  # test RTSP cameras: camera_server, start_camera, small_clip

# Small frames keep a 2-core machine responsive while many peers run; the
# pixel clock needs at least 320 px.
TEST_WIDTH, TEST_HEIGHT, TEST_FPS = 640, 360, 30
OPEN = AuthConfig(mode="none")  # the suite's relays are open unless a test is about access
LEAK_SETTLE = 5.0  # seconds a closed peer may take to release its threads and sockets
# Of an async test's pytest-timeout, the share its coroutine gets before it is cancelled; the rest is for its
# finally blocks and fixtures to clean up (close peers, stop processes, delete namespaces) while the loop still
# runs. When pytest-timeout fires instead, it aborts the event loop itself: the test's cleanup then only runs
# when pytest-asyncio cancels every task at once at the loop's close, aiortc's internal tasks among them, and
# RTCPeerConnection.close() can wait there for ever (tests/test_remote.py hung so, its relay and namespaces left).
OWN_TIME_SHARE = 0.8


def _timeout_of(item: pytest.Item) -> float:
    """The pytest-timeout of ``item`` in seconds (its ``timeout`` mark, else the ini's); 0 for none."""
    marker = item.get_closest_marker("timeout")
    if marker is not None and (marker.args or "timeout" in marker.kwargs):
        return float(marker.args[0] if marker.args else marker.kwargs["timeout"] or 0)
    return float(item.config.getini("timeout") or 0)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """An async test runs under ``asyncio.timeout`` at ``OWN_TIME_SHARE`` of its pytest-timeout: out of time, it
    is cancelled like any task and fails with a TimeoutError where it waited, after its own cleanup."""
    test = getattr(item, "obj", None)
    limit = _timeout_of(item)
    if not (inspect.iscoroutinefunction(test) and limit > 0):
        return

    @functools.wraps(test)
    async def bounded(*args, **kwargs):
        async with asyncio.timeout(limit * OWN_TIME_SHARE):
            return await test(*args, **kwargs)

    item.obj = bounded


def _fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _describe_fd(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


@pytest.fixture(autouse=True)
def no_leaks():
    threads = {t.ident for t in threading.enumerate()}
    fds = _fds()
    me = psutil.Process()
    children = {p.pid for p in me.children(recursive=True)}
    yield
    deadline = time.monotonic() + LEAK_SETTLE
    while True:
        new_threads = [t for t in threading.enumerate() if t.ident not in threads and t.is_alive()]
        new_fds = _fds() - fds
        new_children = [
            p for p in me.children(recursive=True) if p.pid not in children and p.status() != psutil.STATUS_ZOMBIE
        ]
        zombies = [p for p in me.children(recursive=True) if p.status() == psutil.STATUS_ZOMBIE]
        if not (new_threads or new_fds or new_children or zombies) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    problems = []
    if new_threads:
        problems.append(f"threads left running: {[t.name for t in new_threads]}")
    if new_fds:
        problems.append(f"file descriptors left open: {[(fd, _describe_fd(fd)) for fd in sorted(new_fds)]}")
    if new_children:
        problems.append(f"child processes left running: {[(p.pid, p.name()) for p in new_children]}")
    if zombies:
        problems.append(f"zombie children: {[p.pid for p in zombies]}")
    assert not problems, "; ".join(problems)


@pytest.fixture(autouse=True)
async def no_task_leaks():
    before = set(asyncio.all_tasks())
    yield
    deadline = time.monotonic() + LEAK_SETTLE
    while True:
        left = [t for t in asyncio.all_tasks() if t not in before and t is not asyncio.current_task() and not t.done()]
        if not left or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert not left, f"asyncio tasks left running: {left}"


def make_config(
    streams: tuple[StreamConfig, ...] | None = None,
    *,
    keyframe_interval: float = 1.0,
    join: str = "auto",
    max_viewers: int = 100,
    max_viewers_total: int = 200,
    connect_timeout: float = 15.0,
    width: int = TEST_WIDTH,
    height: int = TEST_HEIGHT,
    fps: float = TEST_FPS,
    cors_origins: tuple[str, ...] = (),
    rtsp: bool = False,
    rtsp_user: str = "",
    rtsp_password: str = "",
    state_dir: str = "",
    max_pending: int = 32,
    max_pending_per_address: int = 32,
    session_rate: float = 100.0,
    session_burst: int = 1000,
    auth: AuthConfig = OPEN,
    allowed_hosts: tuple[str, ...] = (),
    playout_delay: tuple[int, int] | None | str = "default",
    shards: int = 1,
    cameras_per_worker: int = VideoConfig().cameras_per_worker,  # the config's default: what users get
) -> Config:
    return Config(
        streams=streams or (StreamConfig("cam0", SourceSpec("test", "")),),
        video=VideoConfig(
            width=width,
            height=height,
            fps=fps,
            bitrate=1_000_000,
            keyframe_interval=keyframe_interval,
            encoder="libx264",
            join=join,
            cameras_per_worker=cameras_per_worker,
        ),
        http=HttpConfig(host="127.0.0.1", port=free_port(), cors_origins=cors_origins, allowed_hosts=allowed_hosts),
        webrtc=WebRTCConfig(
            ice_addresses=("127.0.0.1",),
            connect_timeout=connect_timeout,
            max_viewers=max_viewers,
            max_viewers_total=max_viewers_total,
            max_pending=max_pending,
            max_pending_per_address=max_pending_per_address,
            session_rate=session_rate,
            session_burst=session_burst,
            shards=shards,  # 1: in-process, whatever the machine's cores ("auto" would shard on more than 2)
            **({} if playout_delay == "default" else {"playout_delay": playout_delay}),
        ),
        rtsp=rtsp_config(rtsp, rtsp_user, rtsp_password),
        auth=auth,
        state_dir=state_dir or (tempfile.mkdtemp(prefix="camrelay-state-") if rtsp or auth.mode == "token" else ""),
    )


def rtsp_config(enabled: bool, user: str = "", password: str = "") -> RtspConfig:
    if not enabled:
        return RtspConfig(enabled=False)
    rtp = free_rtp_pair()
    return RtspConfig(
        enabled=True, host="127.0.0.1", port=free_port(), rtp_port=rtp, rtcp_port=rtp + 1, api_port=free_port(),
        user=user, password=password,
    )  # fmt: skip


class RunningRelay:
    def __init__(self, relay: Relay, base: str) -> None:
        self.relay = relay
        self.base = base

    def whep(self, stream: str = "cam0") -> str:
        return f"{self.base}/whep/{stream}"

    async def wait_live(self, stream: str = "cam0", timeout: float = 10.0) -> None:
        s = self.relay.streams[stream]
        deadline = time.monotonic() + timeout
        while s.stats.frames_encoded == 0:
            assert time.monotonic() < deadline, f"stream {stream} produced no frame within {timeout}s"
            await asyncio.sleep(0.02)


def session_of(relay: RunningRelay, viewer: WhepViewer):
    """The relay's session for ``viewer``: the last part of its session URL is the id."""
    assert viewer.location
    return relay.relay.sessions.get(viewer.location.rsplit("/", 1)[1])


# -- which frames: a frame's pixel clock is its capture time, so it names the encoded frame it was made from


def frame_clock(frame) -> int | None:
    """The capture time (ms since the epoch) a decoded frame's pixel clock shows, or None where it does not read."""
    return pixelclock.read(luma(frame, frame.width // pixelclock.CELLS))


def capture_ms(sample: FrameSample) -> int | None:
    """The same for a ``WhepViewer.read_frames`` sample, which keeps the clock as a latency."""
    return None if sample.latency_ms is None else round(sample.received * 1000 - sample.latency_ms)


class EncodedFrames:
    """Every frame a stream encodes from now on, known by its capture time (ms): what its pixel clock shows.

    One more subscriber of the stream's hub, with room for minutes of video, so it never lags and never
    misses one. Like every new subscriber it starts at a keyframe: the one its subscribing asks for, one of the
    last 0.5 s it shares, or with ``join = "cached_gop"`` the cached GOP's (the last two: frames encoded before
    it subscribed). Use it as a context
    manager: it leaves the hub when done.
    """

    def __init__(self, stream: Stream, room: int = 10_000) -> None:
        self._subscription = stream.hub.subscribe("test-tap", max_frames=room)
        self._clocks: list[int] = []
        self._keyframes: set[int] = set()

    def __enter__(self) -> EncodedFrames:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._subscription.close()

    def _take(self) -> None:
        while (frame := self._subscription.get_nowait()) is not None:
            clock = int(frame.capture_time * 1000)  # as the source drew it
            self._clocks.append(clock)
            if frame.keyframe:
                self._keyframes.add(clock)

    @property
    def clocks(self) -> list[int]:
        """The capture times of the frames encoded so far, in order."""
        self._take()
        return list(self._clocks)

    @property
    def keyframes(self) -> set[int]:
        self._take()
        return set(self._keyframes)

    async def wait(self, count: int, timeout: float = 30.0) -> list[int]:
        """The capture times once at least ``count`` frames have been encoded."""
        deadline = time.monotonic() + timeout
        while len(clocks := self.clocks) < count:
            assert time.monotonic() < deadline, f"{len(clocks)} of {count} frames encoded within {timeout:g}s"
            await asyncio.sleep(0.02)
        return clocks


async def start_relay(config: Config, wait: bool = True, **relay_kw) -> tuple[web.AppRunner, RunningRelay]:
    relay = Relay(config, **relay_kw)
    runner = make_runner(make_app(relay), config.http)  # as `camrelay serve` runs it: timeouts, connection caps
    await runner.setup()
    await start_site(runner, socket.create_server((config.http.host, config.http.port)))
    running = RunningRelay(relay, f"http://{config.http.host}:{config.http.port}")
    if wait:
        await running.wait_live(next(iter(relay.streams)))
    return runner, running


@pytest.fixture
async def relay_server(request) -> AsyncIterator[RunningRelay]:
    """A real relay on loopback; ``@pytest.mark.relay_config(...)`` passes ``make_config`` options."""
    marker = request.node.get_closest_marker("relay_config")
    config = make_config(**(marker.kwargs if marker else {}))
    runner, running = await start_relay(config)
    try:
        yield running
    finally:
        await runner.cleanup()


@pytest.fixture(scope="session")
def spawn():
    """multiprocessing's spawn context, for tests that run benchmark workers. Its resource tracker (one helper
    process for the rest of the run, by design) is started here, before the per-test leak guards take their
    snapshot."""
    resource_tracker.ensure_running()
    return mp.get_context("spawn")


async def end_workers(procs: list, timeout: float) -> None:
    """Worker processes (``spawn``'s) joined, ``timeout`` s each, off the event loop; killed if still running."""
    for proc in procs:
        await asyncio.to_thread(proc.join, timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
        proc.close()  # its sentinel pipe now, not when a failed test's traceback lets go of it


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def children_running() -> list[psutil.Process]:
    """This process's descendants still running, but for Python's own multiprocessing resource tracker: the
    ``spawn`` fixture starts it for the rest of the run, by design."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "multiprocessing.resource_tracker" not in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out
