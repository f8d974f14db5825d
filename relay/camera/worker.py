"""A camera's worker process: capture, decode once, encode once.

    CAMRELAY_WORKER_CONFIG='{"name": "cam0", "source": "test:", ...}' python -m relay.camera.worker

(``relay.ipc.WorkerConfig``, as JSON.)
Runs the source on a capture thread and the codecs on an encode thread, and
writes encoded access units (and, when asked, the camera's JPEGs) to stdout
in the ``relay.ipc`` framing. Reads one-byte commands on stdin (keyframe,
JPEG on/off); stdin closing means stop. A source that fails is retried with
backoff here; the relay restarts the whole process only if it dies.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import av

from .. import ipc
from ..backoff import Retry
from ..ipc import EncoderSettings
from ..logsafe import SECRET_FILTER, redact, url_passwords
from ..source import parse_source_spec
from . import slate
from .capture import CapturedFrame, Source, SourceError, open_source
from .encode import PTS_CLOCK, DecodeError, H264Encoder, JpegDecoder, JpegEncoder

log = logging.getLogger("relay.camera.worker")  # not __name__: this module runs as __main__

# At most one forced IDR per this many seconds: a storm of PLIs from many
# viewers must not turn the stream into all keyframes.
KEYFRAME_MIN_INTERVAL = 0.5
THREAD_JOIN_TIMEOUT = 5.0  # a device read is bounded by its frame time
EWMA_ALPHA = 0.1  # smoothing for the per-frame encode time
STATUS_INTERVAL = 1.0  # seconds between status messages to the relay
SLATE_AFTER = 1.0  # seconds without a frame before viewers see the no-signal slate
CAPTURE_STALL = 2.0  # seconds without a frame (and without an error) before the source is reopened
STUCK_EXIT = 8.0  # seconds a closed source may keep its read blocked before the worker exits
THERMAL_SLACK = 0.9  # keep a frame a little early rather than skip two at jittery rates
EXIT_STUCK = 3  # the worker's exit status when the capture thread is stuck
SIGTERM_GRACE = 2.0  # seconds between SIGTERM and leaving without cleaning up


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


Emit = Callable[[bytes], None]


class Pipeline:
    """Capture and encode threads for one source; output goes to ``emit`` as ipc messages."""

    def __init__(
        self,
        name: str,
        source: str,
        source_factory: Callable[[], Source],
        settings: EncoderSettings,
        emit: Emit,
        size: tuple[int, int] = (1280, 720),
    ) -> None:
        self.name = name
        self.size = size  # for the slate until the source reports its own
        self.settings_fps = settings.fps
        self.source = source  # for log lines, credentials already redacted
        self.stats = ipc.WorkerStatus(fps=settings.fps)
        self.send_jpeg = False
        self.max_fps = 0.0  # 0: encode every frame; lowered by the relay's thermal guard
        self._source_factory = source_factory
        self._encoder = H264Encoder(settings)
        self.stats.encoder = self._encoder.name
        self._emit = emit
        self._retry = Retry()
        self._mailbox = Mailbox()
        self._stop = threading.Event()
        self._keyframe_wanted = threading.Event()
        self._last_forced = 0.0
        self._source: Source | None = None
        self._threads: list[threading.Thread] = []
        self._last_pts = -1
        self._last_encoded = 0.0  # capture time of the last frame encoded
        self._last_frame = time.monotonic()  # when the source last delivered a frame
        self._stall_closed_at: float | None = None
        # An encoder that fails is reopened with backoff, not at every frame: opening
        # x264 costs tens of ms, and a failure per frame was a traceback per frame.
        self._encoder_retry = Retry()
        self._encoder_retry_at = 0.0  # monotonic time before which frames are not encoded
        self.encoder_failing = False

    def start(self) -> None:
        for target, role in ((self._capture_loop, "capture"), (self._encode_loop, "encode")):
            t = threading.Thread(target=target, name=f"{role}-{self.name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._mailbox.close()
        source = self._source
        if source is not None:
            source.close()  # unblocks a pending read
        for t in self._threads:
            t.join(THREAD_JOIN_TIMEOUT)
        self._encoder.close()

    def request_keyframe(self) -> None:
        self._keyframe_wanted.set()

    def status(self) -> ipc.WorkerStatus:
        st = self.stats
        st.frames_dropped_encoder_busy = self._mailbox.replaced
        st.encoder = self._encoder.name
        state = st.state
        if st.slate:
            state = "no_signal"
        if self.encoder_failing:
            state = ipc.ENCODER_ERROR  # nothing reaches viewers, whatever the camera does
        return dataclasses.replace(st, state=state, encoders_running=self._encoder.running)

    def push_status(self) -> None:
        self._emit(ipc.pack(ipc.STATUS, self.status().to_json()))

    # -- capture thread ------------------------------------------------

    def _capture_loop(self) -> None:
        st = self.stats
        while not self._stop.is_set():
            opened_at = time.monotonic()
            try:
                source = self._source_factory()
                self._source = source
                source.open()
                st.source_opens += 1
                st.width, st.height, st.fps = source.width, source.height, source.fps
                log.info("stream=%s source=%s opened %dx%d@%g", self.name, self.source, st.width, st.height, st.fps)
                st.state = "live"
                self.push_status()
                while not self._stop.is_set():
                    frame = source.read()
                    st.frames_captured += 1
                    if frame.jpeg is not None and self.send_jpeg:
                        self._emit(ipc.pack(ipc.JPEG, frame.jpeg, capture_time=frame.capture_time))
                    self._mailbox.put(frame)
            except SourceError as exc:
                if self._stop.is_set():
                    break
                self._record_error(str(exc))
            except Exception as exc:  # a driver or library bug must not end the stream
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
            st.state = "retrying"
            self.push_status()
            log.warning(
                "stream=%s source=%s retry in %.1fs (attempt %d)", self.name, self.source, delay, self._retry.attempt
            )
            self._stop.wait(delay)

    def _record_error(self, message: str) -> None:
        message = redact(message, SECRET_FILTER.secrets)  # an error may quote the camera's URL, escaped
        self.stats.source_errors += 1
        self.stats.last_error = message
        log.warning("stream=%s source error: %s", self.name, message)

    # -- encode thread -------------------------------------------------

    def _encode_loop(self) -> None:
        decoder = JpegDecoder()
        jpeg_encoder = JpegEncoder()
        st = self.stats
        while not self._stop.is_set():
            frame = self._mailbox.get(timeout=1.0 / max(1.0, st.fps or self.settings_fps))
            now = time.monotonic()
            if frame is None:
                self._check_stall(now)
                if now - self._last_frame < SLATE_AFTER:
                    continue
                frame = self._slate_frame()  # the camera is gone: keep the stream alive
            else:
                self._last_frame = now
                self._stall_closed_at = None
                if st.slate:
                    st.slate = False
                    log.info("stream=%s signal is back", self.name)
                if self.max_fps and frame.capture_time - self._last_encoded < THERMAL_SLACK / self.max_fps:
                    st.frames_dropped_thermal += 1
                    continue
                self._last_encoded = frame.capture_time
            if now < self._encoder_retry_at:
                continue  # the encoder failed; it is tried again when its backoff ends
            started = time.perf_counter()
            try:
                picture = frame.picture if frame.picture is not None else decoder.decode(frame.jpeg or b"")
            except DecodeError as exc:
                st.frames_dropped_corrupt += 1
                log.debug("stream=%s %s", self.name, exc)
                continue
            if frame.jpeg is None and self.send_jpeg:
                # Not an MJPEG source (RTSP, file, the slate): encode a JPEG only because someone wants one.
                self._emit(ipc.pack(ipc.JPEG, jpeg_encoder.encode(picture), capture_time=frame.capture_time))
            force = self._take_keyframe_request()
            try:
                units = self._encoder.encode(picture, self._pts(frame.capture_time), force)
            except Exception as exc:
                self._encoder.close()
                self._encoder_failed(exc)
                continue
            if self.encoder_failing:
                self.encoder_failing = False
                self._encoder_retry.attempt = 0
                log.warning("stream=%s encoder works again", self.name)
            if st.frames_encoded == 0 or force:
                self.push_status()  # the encoder just opened, or reopened: say so at once
            st.encode_ms += EWMA_ALPHA * ((time.perf_counter() - started) * 1000 - st.encode_ms)
            for data, keyframe, pts in units:
                st.frames_encoded += 1
                st.bytes_encoded += len(data)
                flags = 0
                if keyframe:
                    st.keyframes += 1
                    flags |= ipc.FLAG_KEYFRAME
                    if force:
                        st.keyframes_forced += 1
                        flags |= ipc.FLAG_FORCED
                    else:
                        self._keyframe_wanted.clear()  # a regular IDR answers any pending request
                self._emit(ipc.pack(ipc.UNIT, data, flags=flags, pts=pts, capture_time=frame.capture_time))

    def _encoder_failed(self, exc: Exception) -> None:
        """The stream shows ``encoder_error``; the encoder is reopened after a backoff.

        One line per retry (0.5 s, 1 s, 2 s ... 30 s apart), the traceback only with the first.
        """
        delay = self._encoder_retry.next_delay()
        self._encoder_retry_at = time.monotonic() + delay
        self.stats.last_error = f"encoder failed: {type(exc).__name__}: {exc}"
        first = not self.encoder_failing
        self.encoder_failing = True
        log.error(
            "stream=%s %s; retry %d in %.1fs",
            self.name,
            self.stats.last_error,
            self._encoder_retry.attempt,
            delay,
            exc_info=exc if first else None,
        )
        if first:
            self.push_status()

    def _pts(self, capture_time: float) -> int:
        """The 90 kHz wall clock: continuous across source and worker restarts, so
        viewers' RTP timestamps never jump back when a camera comes back."""
        pts = max(round(capture_time * PTS_CLOCK), self._last_pts + 1)
        self._last_pts = pts
        return pts

    def _slate_frame(self) -> CapturedFrame:
        st = self.stats
        if not st.slate:
            st.slate = True
            log.warning("stream=%s no signal; showing the slate", self.name)
            self.push_status()
        st.frames_slate += 1
        now = time.time()
        width, height = st.width or self.size[0], st.height or self.size[1]
        planes = slate.render(width, height, self.name, int(now * 1000))
        return CapturedFrame(now, picture=av.VideoFrame.from_ndarray(planes, format="yuv420p"))

    def _check_stall(self, now: float) -> None:
        """A source that stops delivering without an error: close it (which unblocks
        a stuck read) so the capture loop reopens it; if even that does not free
        the capture thread, end the process and let the relay start a fresh one."""
        if self.stats.state != "live":
            return
        silent = now - self._last_frame
        if silent >= CAPTURE_STALL and self._stall_closed_at is None:
            self._stall_closed_at = now
            self._record_error(f"no frame for {silent:.1f}s; reopening the source")
            source = self._source
            if source is not None:
                source.close()
        elif self._stall_closed_at is not None and now - self._stall_closed_at >= STUCK_EXIT:
            log.error("stream=%s capture is stuck in the driver; restarting the worker", self.name)
            self.push_status()
            os._exit(EXIT_STUCK)

    def _take_keyframe_request(self) -> bool:
        if not self._keyframe_wanted.is_set():
            return False
        now = time.monotonic()
        if now - self._last_forced < KEYFRAME_MIN_INTERVAL:
            return False  # stays pending; honoured on a later frame
        self._keyframe_wanted.clear()
        self._last_forced = now
        return True


class PipeWriter:
    """Thread-safe writes of whole messages to a pipe; a closed pipe stops the worker."""

    def __init__(self, fd: int, on_broken: Callable[[], None]) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._on_broken = on_broken

    def __call__(self, data: bytes) -> None:
        with self._lock:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
            except (BrokenPipeError, OSError):
                self._on_broken()


class PipeLogHandler(logging.Handler):
    """Sends log records to the relay, which logs them under the same logger name."""

    def __init__(self, emit: Emit) -> None:
        super().__init__()
        self._emit = emit

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
            msg = redact(msg, SECRET_FILTER.secrets)  # message and traceback: what leaves this process
            self._emit(ipc.pack_json(ipc.LOG, {"level": record.levelno, "logger": record.name, "message": msg}))
        except Exception:
            self.handleError(record)


def main(argv: list[str] | None = None) -> int:
    cfg = ipc.WorkerConfig.from_json(argv[0] if argv else os.environ.pop(ipc.WORKER_CONFIG_ENV))
    out_fd = os.dup(1)
    os.dup2(2, 1)  # anything that prints goes to stderr, never into the frame pipe
    stop = threading.Event()
    emit = PipeWriter(out_fd, stop.set)
    root = logging.getLogger()
    root.handlers[:] = [PipeLogHandler(emit)]
    root.setLevel(cfg.log_level.upper())

    def on_sigterm(*_: object) -> None:
        stop.set()
        # The polite stop (stdin closed) already failed if this came: do not linger in a stuck driver.
        threading.Timer(SIGTERM_GRACE, os._exit, args=(0,)).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the relay decides when we stop

    SECRET_FILTER.secrets.update(url_passwords(cfg.source))
    spec = parse_source_spec(cfg.source)
    settings = EncoderSettings(cfg.bitrate, spec.fps or cfg.fps, cfg.keyframe_interval, cfg.encoder)
    pipeline = Pipeline(
        cfg.name,
        str(spec),
        lambda: open_source(spec, cfg.width, cfg.height, cfg.fps, cfg.name),
        settings,
        emit,
        size=(spec.width or cfg.width, spec.height or cfg.height),
    )

    def commands() -> None:
        pending = b""
        while not stop.is_set():
            try:
                data = os.read(0, 64)
            except OSError:
                data = b""
            if not data:
                stop.set()
                return
            commands_in, pending = ipc.parse_commands(pending + data)
            for cmd, arg in commands_in:
                if cmd == ipc.CMD_MAX_FPS:
                    pipeline.max_fps = float(arg or 0)
                    log.info("stream=%s encoding at most %s fps", pipeline.name, arg or "all")
                elif cmd == ipc.CMD_KEYFRAME:
                    pipeline.request_keyframe()
                elif cmd == ipc.CMD_JPEG_ON:
                    pipeline.send_jpeg = True
                elif cmd == ipc.CMD_JPEG_OFF:
                    pipeline.send_jpeg = False

    threading.Thread(target=commands, name="commands", daemon=True).start()
    pipeline.start()
    while not stop.wait(STATUS_INTERVAL):
        pipeline.push_status()
    pipeline.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
