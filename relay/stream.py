"""One stream: a source, its capture and encode threads, and its packet hub.

    source --capture thread--> mailbox (newest frame only)
           --encode thread---> decode JPEG once, encode H.264 once
           --event loop------> PacketHub --> viewers, publishers, recorders

Capture and encode run on their own threads so the event loop never waits on
a device or a codec. The mailbox between them holds one frame: when the
encoder is slower than the camera, the older frame is dropped and counted,
never queued.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .backoff import Retry
from .capture import CapturedFrame, Source, SourceError, SourceSpec
from .encode import PTS_CLOCK, DecodeError, EncoderSettings, H264Encoder, JpegDecoder
from .hub import EncodedFrame, PacketHub

log = logging.getLogger(__name__)

# At most one forced IDR per this many seconds per stream: a storm of PLIs
# from many viewers must not turn the stream into all keyframes.
KEYFRAME_MIN_INTERVAL = 0.5
# How long close() waits for a thread; a device read is bounded by its frame time.
THREAD_JOIN_TIMEOUT = 5.0
# Smoothing for the per-frame encode time shown in the API.
EWMA_ALPHA = 0.1


class Mailbox:
    """A one-slot, newest-wins handover between two threads."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: CapturedFrame | None = None
        self._closed = False
        self.replaced = 0  # frames overwritten before the consumer took them

    def put(self, item: CapturedFrame) -> None:
        with self._cond:
            if self._item is not None:
                self.replaced += 1
            self._item = item
            self._cond.notify()

    def get(self, timeout: float) -> CapturedFrame | None:
        with self._cond:
            if self._item is None and not self._closed:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass
class StreamStats:
    frames_captured: int = 0
    frames_encoded: int = 0
    frames_dropped_encoder_busy: int = 0
    frames_dropped_corrupt: int = 0
    keyframes: int = 0
    keyframes_forced: int = 0
    bytes_encoded: int = 0
    encode_ms: float = 0.0  # smoothed decode + encode time per frame
    source_errors: int = 0
    source_opens: int = 0
    last_error: str = ""
    started: float = field(default_factory=time.time)


class Stream:
    """One camera's pipeline. ``start()`` on the event loop, ``close()`` to stop."""

    def __init__(
        self,
        name: str,
        spec: SourceSpec,
        source_factory: Callable[[], Source],
        encoder: EncoderSettings,
        retry: Retry | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.settings = encoder
        self.stats = StreamStats()
        self.state = "new"
        self.width = spec.width or 0
        self.height = spec.height or 0
        self.fps = spec.fps or encoder.fps
        self.latest_jpeg: bytes | None = None  # newest frame as the camera sent it
        self._source_factory = source_factory
        self._retry = retry or Retry()
        self._mailbox = Mailbox()
        self._stop = threading.Event()
        self._keyframe_wanted = threading.Event()
        self._last_forced = 0.0
        self._encoder = H264Encoder(encoder)
        self._source: Source | None = None
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._t0: float | None = None
        self._last_pts = -1
        self.hub = PacketHub(name, self.request_keyframe)

    @property
    def encoder_name(self) -> str:
        return self._encoder.name

    @property
    def encoders_running(self) -> int:
        return self._encoder.running

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.state = "starting"
        for target, role in ((self._capture_loop, "capture"), (self._encode_loop, "encode")):
            t = threading.Thread(target=target, name=f"{role}-{self.name}", daemon=True)
            t.start()
            self._threads.append(t)

    async def close(self) -> None:
        self._stop.set()
        self._mailbox.close()
        source = self._source
        if source is not None:
            source.close()  # unblocks a pending read
        threads, self._threads = self._threads, []
        await asyncio.to_thread(_join_all, threads)
        self.hub.close()
        self._encoder.close()
        self.state = "closed"

    def request_keyframe(self) -> None:
        """Thread-safe; honoured within ``KEYFRAME_MIN_INTERVAL``."""
        self._keyframe_wanted.set()

    # -- capture thread -------------------------------------------------

    def _capture_loop(self) -> None:
        while not self._stop.is_set():
            opened_at = time.monotonic()
            try:
                source = self._source_factory()
                self._source = source
                source.open()
                self.stats.source_opens += 1
                self.width, self.height, self.fps = source.width, source.height, source.fps
                log.info("stream=%s source=%s opened %dx%d@%g", self.name, self.spec, self.width, self.height, self.fps)
                self.state = "live"
                while not self._stop.is_set():
                    frame = source.read()
                    self.stats.frames_captured += 1
                    if frame.jpeg is not None:
                        self.latest_jpeg = frame.jpeg
                    self._mailbox.put(frame)
            except SourceError as exc:
                if self._stop.is_set():
                    break
                self._record_error(str(exc))
            except Exception as exc:  # a driver or library bug must not kill the stream
                if self._stop.is_set():
                    break
                log.exception("stream=%s source crashed", self.name)
                self._record_error(f"{type(exc).__name__}: {exc}")
            finally:
                if self._source is not None:
                    self._source.close()
                    self._source = None
            self._retry.ran(time.monotonic() - opened_at)
            delay = self._retry.next_delay()
            self.state = "retrying"
            log.warning(
                "stream=%s source=%s retry in %.1fs (attempt %d)", self.name, self.spec, delay, self._retry.attempt
            )
            self._stop.wait(delay)

    def _record_error(self, message: str) -> None:
        self.stats.source_errors += 1
        self.stats.last_error = message
        log.warning("stream=%s source error: %s", self.name, message)

    # -- encode thread --------------------------------------------------

    def _encode_loop(self) -> None:
        decoder = JpegDecoder()
        while not self._stop.is_set():
            frame = self._mailbox.get(timeout=0.5)
            if frame is None:
                continue
            self.stats.frames_dropped_encoder_busy = self._mailbox.replaced
            started = time.perf_counter()
            try:
                picture = frame.picture if frame.picture is not None else decoder.decode(frame.jpeg or b"")
            except DecodeError as exc:
                self.stats.frames_dropped_corrupt += 1
                log.debug("stream=%s %s", self.name, exc)
                continue
            force = self._take_keyframe_request()
            try:
                units = self._encoder.encode(picture, self._pts(frame.capture_time), force)
            except Exception:
                log.exception("stream=%s encoder failed; reopening", self.name)
                self._encoder.close()
                continue
            elapsed_ms = (time.perf_counter() - started) * 1000
            self.stats.encode_ms += EWMA_ALPHA * (elapsed_ms - self.stats.encode_ms)
            for data, keyframe, pts in units:
                self._publish(EncodedFrame(data, pts, keyframe, frame.capture_time), forced=force)

    def _pts(self, capture_time: float) -> int:
        if self._t0 is None:
            self._t0 = capture_time
        pts = max(round((capture_time - self._t0) * PTS_CLOCK), self._last_pts + 1)
        self._last_pts = pts
        return pts

    def _take_keyframe_request(self) -> bool:
        if not self._keyframe_wanted.is_set():
            return False
        now = time.monotonic()
        if now - self._last_forced < KEYFRAME_MIN_INTERVAL:
            return False  # stays pending; honoured on a later frame
        self._keyframe_wanted.clear()
        self._last_forced = now
        return True

    def _publish(self, frame: EncodedFrame, forced: bool) -> None:
        st = self.stats
        st.frames_encoded += 1
        st.bytes_encoded += len(frame.data)
        if frame.keyframe:
            st.keyframes += 1
            st.keyframes_forced += forced
            if not forced:
                # A regular IDR answers any request made since the last one.
                self._keyframe_wanted.clear()
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self.hub.publish, frame)
        except RuntimeError:  # loop shut down under us
            self._stop.set()


def _join_all(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(THREAD_JOIN_TIMEOUT)
        if t.is_alive():
            log.error("thread %s did not stop within %.0fs", t.name, THREAD_JOIN_TIMEOUT)
