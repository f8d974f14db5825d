"""One stream: a camera's worker process feeding a packet hub.

    worker process (capture -> decode once -> encode once)
        --pipe--> Stream (event loop) --> PacketHub --> viewers, publishers, recorders

The codecs run in their own process because PyAV and numpy hold the GIL for a
whole decode or render, which would stall the event loop and every viewer's
packets (measured: 40-60 ms stalls with them on a thread). The Stream
supervises the process: if it dies it is restarted with backoff, and the hub,
with every subscriber on it, stays — the producer is swapped, the consumers
are kept.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from dataclasses import dataclass

from . import ipc
from .aio import cancel_and_wait, signal_group
from .backoff import Retry
from .hub import EncodedFrame, PacketHub
from .ipc import EncoderSettings
from .logsafe import SECRET_FILTER, redact, url_passwords
from .mjpeg import JpegFeed
from .source import SourceSpec
from .supervise import Child, Process

log = logging.getLogger(__name__)

# A worker sends a frame (the slate, if its camera is gone) at the stream's
# rate; this long without one means the process itself is stuck: kill it.
WORKER_STALL = 3.0
WORKER_STARTUP_GRACE = 15.0  # a fresh worker imports PyAV and opens its source first
WATCHDOG_PERIOD = 0.5
PIPE_LIMIT = 1 << 20  # reader buffer and the most one read takes; one 4K JPEG fits


@dataclass(slots=True)
class StreamStats(ipc.Counters):
    """A stream's counters over every worker it has run (the encoded frames as the relay received them)."""

    worker_restarts: int = 0
    worker_stalls: int = 0


class Stream:
    """One camera's pipeline. ``start()`` on the event loop, ``await close()`` to stop."""

    def __init__(
        self,
        name: str,
        spec: SourceSpec,
        settings: EncoderSettings,
        width: int,
        height: int,
        log_level: str = "info",
        retry: Retry | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.stats = StreamStats()
        self.state = "new"
        self.width = spec.width or width
        self.height = spec.height or height
        self.fps = spec.fps or settings.fps
        self.encoder_name = ""
        self.encoders_running = 0
        self.jpegs = JpegFeed(self.set_jpeg)  # the camera's JPEGs, while anyone wants them
        self.hub = PacketHub(name, self.request_keyframe)
        SECRET_FILTER.secrets.update(url_passwords(spec.target))  # the camera's: hidden in every log line and status
        worker_config = ipc.WorkerConfig(
            name,
            str(spec) if spec.kind != "rtsp" else spec.target,
            width,
            height,
            settings.fps,
            settings.bitrate,
            settings.keyframe_interval,
            settings.encoder,
            log_level,
        )
        self._worker = Child(
            f"stream={name} worker",
            [sys.executable, "-m", "relay.camera.worker"],
            # In the environment, not argv: any local user can read argv (ps), and an RTSP camera's URL
            # holds its password. /proc/<pid>/environ is readable by us only.
            env={ipc.WORKER_CONFIG_ENV: worker_config.to_json()},
            started=self._worker_started,
            run=self._run_worker,
            ended=self._worker_ended,
            retry=retry,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=PIPE_LIMIT,
        )
        self._closing = False
        self._want_jpeg = False
        self._max_fps = 0
        self._base_counts = StreamStats()  # counters of workers that have exited
        self._last_unit = 0.0

    @property
    def pid(self) -> int | None:
        """The worker process's pid while one runs."""
        return self._worker.pid

    def start(self) -> None:
        self.state = "starting"
        self._worker.supervise()

    async def close(self) -> None:
        self._closing = True
        await self._worker.stop()
        self.hub.close()
        self.jpegs.close()
        self.encoders_running = 0
        self.state = "closed"

    def request_keyframe(self) -> None:
        """From the event loop; the worker rate-limits forced IDRs."""
        self._command(ipc.CMD_KEYFRAME)

    def set_max_fps(self, fps: float) -> None:
        """Encode at most ``fps`` frames a second (0: all); kept across worker restarts."""
        self._max_fps = int(min(255, max(0, fps)))
        self._command(ipc.CMD_MAX_FPS + bytes([self._max_fps]))

    def set_jpeg(self, on: bool) -> None:
        self._want_jpeg = on
        self._command(ipc.CMD_JPEG_ON if on else ipc.CMD_JPEG_OFF)

    def _command(self, cmd: bytes) -> None:
        proc = self._worker.proc
        if proc is not None and proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.write(cmd)

    def _worker_started(self, proc: Process) -> None:
        if self._want_jpeg:
            self._command(ipc.CMD_JPEG_ON)
        if self._max_fps:
            self._command(ipc.CMD_MAX_FPS + bytes([self._max_fps]))
        self.request_keyframe()  # viewers kept across a restart need a fresh IDR
        self._last_unit = time.monotonic() + WORKER_STARTUP_GRACE - WORKER_STALL

    async def _run_worker(self, proc: Process) -> None:
        watchdog = asyncio.get_running_loop().create_task(self._watchdog(proc))
        try:
            assert proc.stdout is not None
            await self.read_worker(proc.stdout)
        finally:
            await cancel_and_wait(watchdog)

    async def _worker_ended(self, code: int | None) -> None:
        self._fold_counts()
        if not self._closing:
            self.stats.worker_restarts += 1
            self.encoders_running = 0
            self.state = "restarting"

    async def read_worker(self, pipe: asyncio.StreamReader) -> None:
        """The worker's messages (``relay.ipc``) from its stdout, until it ends or turns out corrupt."""
        reader = ipc.Reader()
        while data := await pipe.read(PIPE_LIMIT):
            try:
                messages = reader.feed(data)
            except ipc.ProtocolError as exc:
                log.error("stream=%s worker pipe is corrupt (%s); restarting the worker", self.name, exc)
                return
            for msg in messages:
                self._on_message(msg)

    def _on_message(self, msg: ipc.Message) -> None:
        if msg.kind == ipc.UNIT:
            self._on_unit(msg)
        elif msg.kind == ipc.JPEG:
            self.jpegs.publish(msg.payload, msg.capture_time)
        elif msg.kind == ipc.STATUS:
            try:
                self._on_status(ipc.WorkerStatus.from_json(msg.payload))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("stream=%s bad status from worker: %r", self.name, exc)
        elif msg.kind == ipc.LOG:
            try:
                record = msg.json()
                message = redact(record["message"], SECRET_FILTER.secrets)  # the worker's own, checked
                logging.getLogger(record["logger"]).log(record["level"], "%s", message)
            except (ValueError, KeyError, TypeError):
                log.error("stream=%s bad log record from worker", self.name)

    async def _watchdog(self, proc: Process) -> None:
        while proc.returncode is None:
            await asyncio.sleep(WATCHDOG_PERIOD)
            silent = time.monotonic() - self._last_unit
            if silent > WORKER_STALL and proc.returncode is None:
                self.stats.worker_stalls += 1
                log.error("stream=%s worker sent nothing for %.1fs; killing it", self.name, silent)
                signal_group(proc, signal.SIGKILL)
                return

    def _on_unit(self, msg: ipc.Message) -> None:
        self._last_unit = time.monotonic()
        st = self.stats
        st.frames_encoded += 1
        st.bytes_encoded += len(msg.payload)
        if msg.keyframe:
            st.keyframes += 1
            st.keyframes_forced += msg.forced
        self.hub.publish(EncodedFrame(msg.payload, msg.pts, msg.keyframe, msg.capture_time))

    def _on_status(self, s: ipc.WorkerStatus) -> None:
        base, st = self._base_counts, self.stats
        for key in ipc.WORKER_COUNTERS:
            setattr(st, key, getattr(base, key) + getattr(s, key))
        st.encode_ms = s.encode_ms
        st.last_error = redact(s.last_error, SECRET_FILTER.secrets)  # shown to every viewer in the API
        self.state = s.state
        self.width, self.height, self.fps = s.width or self.width, s.height or self.height, s.fps or self.fps
        self.encoder_name = s.encoder
        self.encoders_running = s.encoders_running

    def _fold_counts(self) -> None:
        """A worker ended: keep its counters as the base for the next one."""
        for key in ipc.WORKER_COUNTERS:
            setattr(self._base_counts, key, getattr(self.stats, key))
