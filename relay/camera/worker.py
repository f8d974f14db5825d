"""A camera's worker process: pass the camera's H.264 through, or decode once and encode once.

    CAMRELAY_WORKER_CONFIG='[{"name": "cam0", "source": "test:", ...}]' python -m relay.camera.worker

(``relay.ipc.WorkerConfig`` per camera, as a JSON list: one camera, or several RTSP cameras that share the
process, ``[video] cameras_per_worker``; each camera is a ``Pipeline`` of its own threads, ``Cameras`` watches them
all.) Runs each source on a capture thread. A source that sends H.264 browsers can
take (``relay.source.decide_mode``) is passed through: the capture thread
writes the camera's access units, parameter sets in front of each IDR, and no
codec runs. Anything else is decoded and encoded on an encode thread. Either
way access units (and, when asked, JPEGs) go to stdout in the ``relay.ipc``
framing. The encode thread also draws the NO SIGNAL slate while a camera is
gone (for a passed-through camera it runs only then), and a passed-through
camera's JPEGs are decoded on a thread of their own only while someone wants
them. Reads one-byte commands on stdin (keyframe, JPEG on/off); stdin closing
means stop. A source that fails is retried with backoff here; the relay
restarts the whole process only if it dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import gc
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import h264, ipc
from ..backoff import CAMERA_RESTARTS, Restarts, Retry
from ..devices import offers_h264
from ..h264 import H264Error, ParameterSets
from ..ipc import KEYFRAME_MIN_INTERVAL, EncoderSettings
from ..logsafe import SECRET_FILTER, ForwardingHandler, Throttled, redact, url_passwords
from ..source import ModeDecision, PassthroughRefused, decide_mode, parse_source_spec
from .capture import CapturedFrame, PacketSource, Source, SourceClock, SourceError, UseDemuxer, open_source
from .encode import PTS_CLOCK, DecodeError, H264Encoder, JpegDecoder, JpegEncoder
from .rtspsource import RtspSource
from .writes import WRITES

if TYPE_CHECKING:
    from .audio import AudioPipeline  # numpy and PyAV: loaded by the workers that carry sound only
    from .cameraaudio import AudioTap

log = logging.getLogger("relay.camera.worker")  # not __name__: this module runs as __main__

THREAD_JOIN_TIMEOUT = 5.0  # a device read is bounded by its frame time
EWMA_ALPHA = 0.1  # smoothing for the per-frame encode time
STATUS_INTERVAL = 1.0  # seconds between status messages to the relay
SLATE_AFTER = 1.0  # seconds without a frame before viewers see the no-signal slate
# Seconds a passed-through camera's units may come with no IDR (viewers' decoders start at one) while they keep
# the slate away: a GOP, 1-4 s on cameras, up to 8 with "smart" codecs. Past it the slate shows and the status
# says why; a camera that never sent an IDR stayed "live" with no picture and no error.
FIRST_IDR_WAIT = 10.0
CAPTURE_STALL = 2.0  # seconds without a frame (and without an error) before the source is reopened
# Seconds a source may take to open, or between two packets of its probe, before it is closed and opened again:
# longer than any source's own deadline (RtspSource.OPEN_TIMEOUT, FFmpeg's capture.OPEN_TIMEOUT: 10 s) and a
# probe's wait for its next packet; a last resort for a reader without one (FFmpeg's demuxer has no deadline
# on a read, and a camera sending only RTCP held a probe for ever, the stall watch looking only at live ones).
OPEN_STALL = 30.0
STUCK_EXIT = 8.0  # seconds a closed source may keep its read blocked before the worker exits
THERMAL_SLACK = 0.9  # keep a frame a little early rather than skip two at jittery rates
EXIT_STUCK = 3  # the worker's exit status when the capture thread is stuck
SIGTERM_GRACE = 2.0  # seconds between SIGTERM and leaving without cleaning up
WATCH_INTERVAL = 0.25  # seconds between the main thread's looks for a stalled or silent camera
# Packets read before a stream's SPS shows up in-band (a camera that sends it only before IDRs, none in the
# SDP): 20 s at 30 fps, longer than any camera's GOP. Past it the stream is taken as unreadable H.264.
SPS_PROBE_PACKETS = 600
# Bytes the probe may hold read ahead: SPS_PROBE_PACKETS units of up to rtspin.MAX_UNIT_BYTES each were 9 GiB.
# 32 MiB is many GOPs of any camera camrelay can pass through.
PROBE_MAX_BYTES = 32 * 2**20
# Packets whose timestamps are looked at, when the SPS does not say whether pictures are reordered
# (B-frames): a B-frame shows within two or three pictures of an I or P.
REORDER_PROBE_PACKETS = 12
# A passed-through camera's access units since its last IDR are kept (for JPEGs on demand, which decode from
# there) up to this many bytes: a 16 s GOP at 4 Mbit/s. Past it, JPEGs wait for the next IDR.
GOP_KEEP_BYTES = 8 * 2**20
JPEG_WAIT = 0.5  # seconds the JPEG thread waits for a new unit before it looks at whether it is still wanted
JPEG_SLACK = 0.9  # a keyframe a little early for a snapshot interval is taken, not skipped for the next GOP
# Seconds between two log lines about the relay's commands that failed in the worker (the rest counted into the next).
COMMAND_LOG_INTERVAL = 10.0
# A sound thread stuck in its source's open or a read (an ALSA driver stuck in the kernel) is left behind and the
# sound started afresh on a new thread; at most this many left behind and still stuck a camera: each holds a device
# context open, and a source that hangs every time would otherwise add one every restart for good. Past it the sound
# stays silent, said once, until one of them returns.
SOUND_LEFT_MAX = 2
# A camera's capture thread stuck in its driver (a read that closing the source does not end) is left behind when the
# camera is started afresh in a shared worker; at most this many left behind and still stuck a camera: each holds a
# thread and its device (a V4L2 descriptor, its buffers mapped), and a driver that hangs every time would otherwise
# add one at every restart for good. Past it the camera stays dark (its slate), said once, until one of them returns.
CAPTURE_LEFT_MAX = 2


class NeedsOwnProcess(Exception):
    """A camera of a shared worker turned out to need a transcode or FFmpeg's demuxer: both hold the GIL the
    process's other cameras share. It stops and says why in its status; the relay moves it to a process of its own."""


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


class Gop:
    """A passed-through camera's access units since its last IDR, for a decoder that starts late (JPEGs on
    demand); at most ``limit`` bytes, past which the rest of the GOP is not kept."""

    def __init__(self, limit: int = GOP_KEEP_BYTES) -> None:
        self._cond = threading.Condition()
        self._limit = limit
        # (access unit, capture time on the wall clock, for its JPEG; when it came, monotonic, for intervals)
        self._units: list[tuple[bytes, float, float]] = []
        self._bytes = 0
        self._full = False
        self.generation = 0  # one more at every IDR
        self._waiting = 0  # readers waiting in newer(): a unit added wakes them (no notify, a Python call, for none)

    def add(self, unit: bytes, idr: bool, capture_time: float, arrived: float) -> None:
        with self._cond:
            if idr:
                self._units, self._bytes, self._full = [], 0, False
                self.generation += 1
            elif self._full or not self._units:
                return  # nothing to decode it against
            if self._bytes + len(unit) > self._limit and self._units:
                self._full = True
                return
            self._units.append((unit, capture_time, arrived))
            self._bytes += len(unit)
            if self._waiting:
                self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._units, self._bytes, self._full = [], 0, False
            self.generation += 1

    def newer(self, generation: int, index: int, timeout: float) -> tuple[int, list[tuple[bytes, float, float]]]:
        """(the current generation, the units a reader at ``index`` of ``generation`` has not seen yet);
        a new generation's units from its IDR on. Waits up to ``timeout`` for one."""
        with self._cond:
            if generation == self.generation and index >= len(self._units):
                self._waiting += 1
                try:
                    self._cond.wait(timeout)
                finally:
                    self._waiting -= 1
            if generation != self.generation:
                index = 0
            return self.generation, self._units[index:]


Emit = Callable[[bytes], None]


class Pipeline:
    """The capture thread, and the encode and JPEG threads while they are needed; output goes to ``emit``
    as ipc messages."""

    def __init__(
        self,
        name: str,
        source: str,
        source_factory: Callable[[], Source | PacketSource],
        settings: EncoderSettings,
        emit: Emit,
        size: tuple[int, int] = (1280, 720),
        mode: str = "auto",
        audio: AudioPipeline | None = None,
        audio_tap: AudioTap | None = None,
        camera: int = 0,
        shared: bool = False,
    ) -> None:
        self.name = name
        self.camera = camera  # its index in the worker: what its messages name
        self.shared = shared  # the worker runs other cameras: it neither transcodes nor uses FFmpeg's demuxer here
        self.audio = audio  # the stream's sound, on a thread of its own; None without
        # Its sound's pipelines before this one's, abandoned when they hung, until their threads end.
        self._audio_left: list[AudioPipeline] = []
        self._sound_restarts = Restarts(CAMERA_RESTARTS)  # a sound that hangs again and again: ever less often
        self._sound_held = False  # its sound hung with SOUND_LEFT_MAX threads already left behind: said once
        self.audio_tap = audio_tap  # where its source's capture thread hands a camera's or file's sound over
        self.size = size  # for the slate until the source reports its own
        self.settings_fps = settings.fps
        self.source = source  # for log lines, credentials already redacted
        self.mode = mode  # as configured: auto, passthrough, transcode
        self.decision: ModeDecision | None = None  # for the source open now (or last)
        self.stats = ipc.WorkerStatus(fps=settings.fps)
        self.send_jpeg = False
        self.jpeg_every = 0.0  # >0: JPEGs of keyframes only, at most one per this many seconds (passed through)
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
        self._source: Source | PacketSource | None = None
        self._units_lost_before = 0  # by the sources this worker opened before the current one
        self._capture: threading.Thread | None = None
        self._encode: threading.Thread | None = None  # while transcoding, or while the slate shows
        self._jpegs: threading.Thread | None = None  # a passed-through camera's JPEGs, while wanted
        self._threads_lock = threading.Lock()
        # Held while a unit is written: a passed-through camera's first unit and the slate's last never cross
        # (``_emitting``).
        self._unit_lock = UnitLock()
        self._pts_lock = threading.Lock()
        self._last_pts = -1
        self._last_encoded = 0.0  # capture time of the last frame encoded
        self._last_frame = time.monotonic()  # when the source last delivered a frame to the output
        self._last_read = time.monotonic()  # when the source last delivered anything (frames skipped included)
        self._stall_closed_at: float | None = None
        self._opening = False  # the capture thread opens or probes a source (its state: starting, retrying)
        self._probe_bytes = 0  # of the packets the probe holds read ahead
        self._last_status = 0.0
        # Passthrough: camera units wait for an IDR after the source opens and after slate frames went out;
        # slate frames start with an IDR after camera units went out.
        self._need_idr = True
        self._slate_idr = False
        self._gop = Gop()
        # An encoder that fails is reopened with backoff, not at every frame: opening
        # x264 costs tens of ms, and a failure per frame was a traceback per frame.
        self._encoder_retry = Retry()
        self._encoder_retry_at = 0.0  # monotonic time before which frames are not encoded
        self.encoder_failing = False
        self.stuck = False  # its capture thread stayed blocked after its source was closed: to be replaced
        # Monotonic: when it last showed it works (a unit or the slate sent, the slate's encoder started, a camera's
        # units held back for their first IDR): ``Cameras`` starts a camera silent for ipc.OUTPUT_STALL afresh.
        self.last_alive = time.monotonic() + ipc.OUTPUT_STARTUP_GRACE - ipc.OUTPUT_STALL
        # The counters of the pipelines this camera had before in this process (replaced when stuck), added to its
        # own in every status: the relay's counts never go back.
        self.counted_before: ipc.Counters | None = None
        self.reported: ipc.WorkerStatus | None = None  # its last status made: what it counted, should one fail

    @property
    def passing_through(self) -> bool:
        return self.decision is not None and self.decision.passthrough

    def start(self) -> None:
        self._capture = threading.Thread(target=self._capture_loop, name=f"capture-{self.name}", daemon=True)
        self._capture.start()
        if self.audio is not None:
            self.audio.start()

    def stop(self) -> None:
        self.halt()
        self.join(time.monotonic() + THREAD_JOIN_TIMEOUT)
        self._encoder.close()

    def join(self, deadline: float) -> None:
        """Its threads waited for until ``deadline`` (monotonic), all of them together."""
        for t in self._threads():
            t.join(max(0.0, deadline - time.monotonic()))
        for audio in self._sound():
            audio.join(deadline - time.monotonic())

    def _sound(self) -> list[AudioPipeline]:
        """Its sound's pipeline, and those it abandoned (hung) whose thread has not ended."""
        return ([self.audio] if self.audio is not None else []) + self._sound_left()

    def _sound_left(self) -> list[AudioPipeline]:
        """The sound's pipelines it abandoned (hung) whose thread has not ended; those that ended let go."""
        self._audio_left = [a for a in self._audio_left if a.alive]
        return self._audio_left

    @property
    def capturing(self) -> bool:
        """Its capture thread runs (a pipeline left behind: still stuck in its source)."""
        return self._capture is not None and self._capture.is_alive()

    def _threads(self) -> list[threading.Thread]:
        return [t for t in (self._capture, self._encode, self._jpegs) if t is not None]

    def release(self) -> bool:
        """An abandoned pipeline's encoder closed once its encode thread has ended; whether all its threads have
        (then nothing of it is left)."""
        if not any(t.is_alive() for t in self._threads()):
            self._encoder.close()
            return not any(audio.alive for audio in self._sound())
        return False

    def request_keyframe(self) -> None:
        self._keyframe_wanted.set()

    def set_jpeg(self, on: bool, every: float = 0.0) -> None:
        self.jpeg_every = every
        self.send_jpeg = on
        self._start_jpegs()

    def status(self) -> ipc.WorkerStatus:
        st = self.stats
        st.frames_dropped_encoder_busy = self._mailbox.replaced
        st.frames_dropped_source_loss = self._units_lost_before + getattr(self._source, "units_lost", 0)
        running = self._encoder.running
        st.encoder = "none" if self.passing_through and not running else self._encoder.name
        state = st.state
        if st.slate:
            state = "no_signal"
        if self.encoder_failing:
            state = ipc.ENCODER_ERROR  # nothing reaches viewers, whatever the camera does
        audio = self.audio.status() if self.audio is not None else {}
        if self.audio_tap is not None:
            audio["audio_packets_dropped"] = self.audio_tap.packets_dropped
        out = dataclasses.replace(st, state=state, encoders_running=running, **audio)
        if self.counted_before is not None:
            for key in ipc.WORKER_COUNTERS:
                setattr(out, key, getattr(self.counted_before, key) + getattr(out, key))
        self.reported = out
        return out

    def abandon(self) -> None:
        """Stop it without waiting for its threads (one may be stuck in a driver): its source closed, whatever its
        threads (its sound's too) still do goes nowhere, the GOP it kept for JPEGs let go. The camera goes on in a
        new pipeline."""
        self._emit = _discard
        if self.audio is not None:
            self.audio.abandon()
        self.halt()
        self._gop.clear()

    def halt(self) -> None:
        """Its threads told to stop, its source closed (which unblocks a pending read); none waited for."""
        self._stop.set()
        self._mailbox.close()
        if self.audio is not None:
            self.audio.halt()
        source = self._source
        if source is not None:
            source.close()

    def _send(self, data: bytes) -> None:
        """``data`` to the relay (``emit``). A thread waits here while the pipe is full (the relay slow to read it):
        not a source that hung, nor a camera gone silent. The emit records that itself (``PipeWriter``, in
        ``writes.WRITES``, as any write of the process's: a log line's too); recording it here as well took a
        second lock and a generator a unit."""
        self._emit(data)

    def _emitting(self) -> UnitLock:
        """The unit lock, for a ``with``: held while a unit is written."""
        return self._unit_lock

    def silent(self, now: float) -> float:
        """Seconds it sent nothing, not even the slate (``last_alive``), as the output watch counts them: none while
        one of its threads waits to write to the relay (the pipe full), and from when its capture or encode thread
        last came out of a write that waited, if later (``writes.WRITES``)."""
        threads = [t.ident for t in self._threads()]
        if any(map(WRITES.waits, threads)):
            return 0.0
        capture, encode = (t.ident if t is not None else None for t in (self._capture, self._encode))
        return now - max(self.last_alive, WRITES.ended(capture), WRITES.ended(encode))

    def push_status(self) -> None:
        self._last_status = time.monotonic()
        self._send(ipc.pack(ipc.STATUS, self.status().to_json(), camera=self.camera))

    def tick(self) -> None:
        """From the main thread, every ``WATCH_INTERVAL``: a stalled camera, a silent one, a hung sound, the status."""
        now = time.monotonic()
        self._check_stall(now)
        self._check_sound(now)
        if now - self._last_frame >= SLATE_AFTER:
            self._start_encoding()  # the slate, for a passed-through camera (a transcoding one has it running)
        if now - self._last_status >= STATUS_INTERVAL:
            self.push_status()

    def _check_sound(self, now: float) -> None:
        """Its sound's thread stuck in its source's open, a read or the encode (past the source's bound): the sound
        started afresh on a new thread, counted, in one line; the video's threads untouched."""
        audio = self.audio
        silent = audio.hung(now) if audio is not None and not self._stop.is_set() else 0.0
        if audio is None or not silent:
            return
        where = "opening the source" if audio.opening else "in the source"
        left = len(self._sound_left())
        if left >= SOUND_LEFT_MAX:
            if not self._sound_held:
                self._sound_held = True
                audio.last_error = f"its thread stuck {where}, and {left} before it"
                log.warning("stream=%s audio=%s no sound for %.1fs, its thread stuck %s, and %d left behind before it "
                            "still stuck in the source: not started afresh until one of them returns", self.name,
                            audio.source_name, silent, where, left)  # fmt: skip
            return
        if not self._sound_restarts.due(now):
            return
        self._sound_held = False
        delay = self._sound_restarts.restarted(now)
        log.warning("stream=%s audio=%s no sound for %.1fs, its thread stuck %s; starting the sound afresh: restart "
                    "%d, the next no sooner than %.1fs after it", self.name, audio.source_name, silent, where,
                    audio.restarts + 1, delay)  # fmt: skip
        self.audio = audio.restarted()
        self._audio_left.append(audio)
        self.push_status()

    # -- threads that run while they are needed

    def _start_encoding(self) -> None:
        with self._threads_lock:
            started = self._encode is None and not self._stop.is_set()
            if started:
                self._encode = threading.Thread(target=self._encode_loop, name=f"encode-{self.name}", daemon=True)
                self._encode.start()
                # Its first picture waits for PyAV's and numpy's import (a passed-through camera's worker has neither
                # before its first slate), the slate's first drawing and x264's open: on a Pi, with the process's
                # other cameras' slates starting at once under one GIL, longer than OUTPUT_STALL. It gets a fresh
                # camera's grace, not a camera's silence (a false restart, again at every slate).
                self.last_alive = time.monotonic() + ipc.OUTPUT_STARTUP_GRACE - ipc.OUTPUT_STALL
                self.stats.encode_starts += 1
        if started:
            self.push_status()  # at once: the relay's watchdog gives the process the same grace

    def _leave_encoding(self) -> bool:
        """Whether the encode thread may end: a passed-through camera delivers again, nothing to encode."""
        with self._threads_lock:
            if not self.passing_through or time.monotonic() - self._last_frame >= SLATE_AFTER:
                return False
            self._encode = None
            self._encoder.close()
        _give_back_memory()
        log.info("stream=%s slate encoder stopped; passing the camera through", self.name)
        self.push_status()
        return True

    def _start_jpegs(self) -> None:
        with self._threads_lock:
            if self.send_jpeg and self.passing_through and self._jpegs is None and not self._stop.is_set():
                self._jpegs = threading.Thread(target=self._jpeg_loop, name=f"jpeg-{self.name}", daemon=True)
                self._jpegs.start()

    def _leave_jpegs(self) -> bool:
        with self._threads_lock:
            if self.send_jpeg and self.passing_through and not self._stop.is_set():
                return False
            self._jpegs = None
            return True

    # -- capture thread ------------------------------------------------

    def _capture_loop(self) -> None:
        st = self.stats
        while not self._stop.is_set():
            opened_at = self._last_read = time.monotonic()  # the open's watch starts now
            self._stall_closed_at = None  # this thread is not stuck: it opens again
            self._opening = True
            try:
                source = self._open_source()
                st.source_opens += 1
                st.width, st.height, st.fps = source.width, source.height, source.fps
                decision, sets = self._choose_mode(source)
                if self.shared and not decision.passthrough:
                    raise NeedsOwnProcess(decision.reason)
                self._opening = False
                self._last_read = time.monotonic()  # the stall watch starts now, not when the worker did
                if not st.slate:  # a source that opens in time has a second for its first frame, as any
                    self._last_frame = self._last_read
                st.state = "live"
                if sets is not None:
                    self._pass_through(source, sets)  # type: ignore[arg-type]
                else:
                    self._transcode(source)
            except NeedsOwnProcess as exc:
                self._leave(str(exc))
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
                self._opening = False
                if self._source is not None:
                    source, self._source = self._source, None  # the status never counts its losses twice
                    self._units_lost_before += getattr(source, "units_lost", 0)
                    source.close()
                self._gop.clear()
            if self._stop.is_set():
                break
            self._retry.ran(time.monotonic() - opened_at)
            delay = self._retry.next_delay()
            st.state = "retrying"
            self.push_status()
            log.warning(
                "stream=%s source=%s retry in %.1fs (attempt %d)", self.name, self.source, delay, self._retry.attempt
            )
            self._stop.wait(delay)

    def _leave(self, reason: str) -> None:
        """A camera of a shared worker that needs a process of its own: it stops here, its status says why."""
        log.info("stream=%s needs a worker process of its own: %s; leaving the shared one", self.name, reason)
        self.stats.own_process = reason
        self.stats.state = "starting"  # again, in its own process
        self.halt()
        self.push_status()

    def _open_source(self) -> Source | PacketSource | RtspSource:
        """The source, open; one that cannot read what the camera sends hands over to one that can (an RTSP
        camera's H.265 to FFmpeg's demuxer). Which reader it is goes in the log when it changes, and the status."""
        source = self._source = self._source_factory()
        reason = ""
        try:
            source.open()
        except UseDemuxer as exc:
            source.close()
            reason = exc.reason
            if self.shared:
                raise NeedsOwnProcess(f"{reason}: FFmpeg's demuxer reads it") from None
            source = self._source = exc.fallback()
            source.open()
        if source.reader != self.stats.reader:
            self.stats.reader = source.reader
            log.info("stream=%s reader=%s%s", self.name, source.reader, f" reason={reason}" if reason else "")
        return source

    def _choose_mode(self, source: Source | PacketSource) -> tuple[ModeDecision, ParameterSets | None]:
        """Pass through or transcode this source (logged, and in the status); for passthrough, the stream's
        parameter sets as known so far. Reads ahead, when it must, for the SPS and the order of pictures;
        what it read is read again after. ``SourceError`` when passthrough is required and impossible."""
        st = self.stats
        st.codec, st.profile = source.codec, ""
        sps, reorders, out_of_band = None, None, []
        if source.codec == "h264" and self.mode != "transcode" and isinstance(source, PacketSource | RtspSource):
            sps, reorders, out_of_band = self._probe(source)
            if sps is not None:
                st.profile = sps.describe()
        try:
            decision = decide_mode(self.mode, source.codec, sps, reorders)
        except PassthroughRefused as exc:
            st.mode, st.mode_reason = "", str(exc)
            raise SourceError(str(exc)) from None
        if decision != self.decision:
            log.info("stream=%s mode=%s reason=%s", self.name, decision.mode, decision.reason)
        self.decision = decision
        st.mode, st.mode_reason = decision.mode, decision.reason
        if not decision.passthrough:
            return decision, None
        assert sps is not None
        self._encoder.match(sps)  # the slate, when it shows, in the camera's profile and level
        st.width, st.height = sps.width, sps.height
        st.fps = sps.fps if sps.fps and 1 <= sps.fps <= 120 else source.fps
        return decision, ParameterSets(out_of_band)

    def _probe(self, source: PacketSource | RtspSource) -> tuple[h264.Sps | None, bool | None, list[bytes]]:
        """(the SPS, whether pictures are reordered, the parameter sets from out of band) of an H.264 source."""
        try:
            out_of_band = h264.extradata_parameter_sets(source.extradata)
            sets = ParameterSets(out_of_band)
            length = _avcc_length(source.extradata)
            read: list = []
            self._probe_bytes = 0
            while sets.sps is None and len(read) < SPS_PROBE_PACKETS and not self._stop.is_set():
                self._probe_read(source, read, "before its SPS")
                with contextlib.suppress(H264Error):  # a corrupt packet: the next may do
                    sets.access_unit(_annexb(bytes(read[-1]), length))
            sps = h264.parse_sps(sets.sps) if sets.sps is not None else None
        except H264Error as exc:
            raise SourceError(f"{self.source} sends H.264 that cannot be read: {exc}") from None
        reorders = sps.reorders if sps is not None else None
        if sps is not None and reorders is None:
            while len(read) < REORDER_PROBE_PACKETS and not self._stop.is_set():
                self._probe_read(source, read, "to see the order of its pictures")
            reorders = h264.out_of_order([p.pts for p in read])
        source.unread(read)
        return sps, reorders, out_of_band

    def _probe_read(self, source: PacketSource | RtspSource, read: list, why: str) -> None:
        """One more packet read ahead into ``read``; ``SourceError`` past ``PROBE_MAX_BYTES`` of them."""
        read.append(source.read_packet())
        self._last_read = time.monotonic()  # the open's watch: the probe goes on
        self._probe_bytes += read[-1].size
        if self._probe_bytes > PROBE_MAX_BYTES:
            raise SourceError(f"{self.source} sent over {PROBE_MAX_BYTES} bytes {why}: it cannot be passed through")

    def _transcode(self, source: Source | PacketSource) -> None:
        """Frames to the encode thread (newest wins); an MJPEG camera's own JPEGs to the relay when wanted."""
        st = self.stats
        self._start_encoding()
        self.push_status()
        while not self._stop.is_set():
            frame = source.read()
            self._last_read = time.monotonic()
            st.frames_captured += 1
            if frame.jpeg is not None and self.send_jpeg:
                self._send(ipc.pack(ipc.JPEG, frame.jpeg, capture_time=frame.capture_time, camera=self.camera))
            self._mailbox.put(frame)

    def _pass_through(self, source: PacketSource | RtspSource, sets: ParameterSets) -> None:
        """The camera's access units to the relay as they are, each IDR with the parameter sets in front."""
        st = self.stats
        clock = SourceClock()
        if isinstance(source, RtspSource):
            source.video_clock = clock  # a camera's sound goes on the video's clock (its sender reports)
        length = _avcc_length(source.extradata)
        changes = 0
        self._need_idr = True
        waiting: float | None = None  # since when units come and none is an IDR
        told = False  # the status says so
        self.push_status()
        self._start_jpegs()
        while not self._stop.is_set():
            packet = source.read_packet()
            self._last_read = time.monotonic()
            st.frames_captured += 1
            kinds, starts = getattr(packet, "kinds", None), getattr(packet, "starts", None)
            try:
                if kinds is not None and starts is not None and not length:  # camrelay's depacketizer's unit
                    unit, idr, starts = sets.access_unit_at(packet.data, kinds, starts)
                else:
                    unit, idr = sets.access_unit(_annexb(bytes(packet), length), kinds)
                    starts = None
            except H264Error as exc:
                st.frames_dropped_corrupt += 1
                log.debug("stream=%s %s", self.name, exc)
                continue
            if sets.changes != changes:
                changes = sets.changes
                self._new_parameter_sets(sets)
            if self._need_idr and not idr:
                waiting = self._last_read if waiting is None else waiting
                if self._last_read - waiting < FIRST_IDR_WAIT:
                    self.last_alive = self._last_read
                    if not st.slate:  # a camera that sends, up to its first IDR: no slate (nor PyAV to draw it)
                        self._last_frame = self._last_read
                elif not told:
                    told = True
                    self._record_error(f"{self.source} sent no IDR for {FIRST_IDR_WAIT:g} s; the slate shows until one")
                continue  # a viewer's decoder cannot use it: it starts at an IDR
            waiting, told = None, False
            now = time.time()
            when = clock.wall_time(None if packet.pts is None else packet.pts * source.time_base, now)
            self._gop.add(unit, idr, now, self._last_read)
            flags = ipc.FLAG_PASSTHROUGH | (ipc.FLAG_KEYFRAME if idr else 0)
            with self._emitting():
                self._need_idr = False
                self._slate_idr = True
                self._last_frame = time.monotonic()
                self._stall_closed_at = None
                if st.slate:
                    st.slate = False
                    log.info("stream=%s signal is back", self.name)
                    self.push_status()
                self._send(
                    ipc.pack(
                        ipc.UNIT,
                        unit,
                        flags=flags,
                        pts=self._pts(when),
                        capture_time=now,
                        camera=self.camera,
                        nals=starts,
                    )  # fmt: skip
                )
                self.last_alive = time.monotonic()

    def _new_parameter_sets(self, sets: ParameterSets) -> None:
        """The camera changed its SPS or PPS (a new size or profile): still passable, or reopened in auto."""
        assert sets.sps is not None
        try:
            sps = h264.parse_sps(sets.sps)
        except H264Error as exc:
            raise SourceError(f"{self.source} sent an SPS that cannot be read: {exc}") from None
        st = self.stats
        log.info("stream=%s new parameter sets: %s (was %s)", self.name, sps.describe(), st.profile)
        st.profile, st.width, st.height = sps.describe(), sps.width, sps.height
        try:
            decision = decide_mode(self.mode, "h264", sps, sps.reorders)
        except PassthroughRefused as exc:
            raise SourceError(str(exc)) from None
        if not decision.passthrough:
            raise SourceError(f"{self.source} changed to {sps.describe()}: {decision.reason}; reopening")
        self._encoder.match(sps)
        self.push_status()

    def _record_error(self, message: str) -> None:
        message = redact(message, SECRET_FILTER.secrets)  # an error may quote the camera's URL, escaped
        self.stats.source_errors += 1
        self.stats.last_error = message
        log.warning("stream=%s source error: %s", self.name, message)

    # -- JPEG thread: a passed-through camera's pictures, decoded only while someone wants them

    def _jpeg_loop(self) -> None:
        import av  # a passed-through camera's worker loads PyAV only once someone wants JPEGs

        st = self.stats
        log.info("stream=%s decoding for JPEGs", self.name)
        decoder = av.CodecContext.create("h264", "r")
        decoder.flags |= av.codec.context.Flags.low_delay
        encoder = JpegEncoder()
        # Units of the current GOP: seen (waited for), and fed to the decoder. Every frame wanted: each is fed,
        # from the IDR on. A picture every so often (a recorder): only IDRs are, each alone, one per ``every``.
        generation, seen, fed, last = -1, 0, 0, None
        while not self._stop.is_set() and not self._leave_jpegs():
            every = self.jpeg_every
            start = seen if every else fed
            current, units = self._gop.newer(generation, start, JPEG_WAIT)
            if current != generation:
                generation, seen, fed, start = current, 0, 0, 0
            seen = max(seen, start + len(units))
            if every:
                # Intervals on the monotonic clock: a wall clock stepped back (NTP) stopped them for as long.
                if start or fed or not units or (last is not None and units[0][2] - last < every * JPEG_SLACK):
                    continue
                units = units[:1]
            fed = start + len(units)
            picture, taken, arrived = None, 0.0, 0.0
            for unit, capture_time, when in units:
                try:
                    frames = decoder.decode(av.Packet(unit))
                except av.FFmpegError as exc:
                    log.debug("stream=%s undecodable unit: %s", self.name, exc)
                    continue
                st.frames_decoded += len(frames)
                if frames:
                    picture, taken, arrived = frames[-1], capture_time, when
            if picture is not None and self.send_jpeg:  # only the newest of a batch: a late decoder catches up
                last = arrived
                self._send(ipc.pack(ipc.JPEG, encoder.encode(picture), capture_time=taken, camera=self.camera))
        log.info("stream=%s JPEG decoding stopped", self.name)

    # -- encode thread: transcoding, and the slate

    def _encode_loop(self) -> None:
        decoder: JpegDecoder | None = None
        jpeg_encoder = JpegEncoder()
        st = self.stats
        while not self._stop.is_set():
            frame = self._mailbox.get(timeout=1.0 / max(1.0, st.fps or self.settings_fps))
            now = time.monotonic()
            if frame is None:
                if now - self._last_frame < SLATE_AFTER:
                    if self._leave_encoding():
                        return
                    continue
                with self._emitting():  # the camera's own units are not written meanwhile
                    if time.monotonic() - self._last_frame >= SLATE_AFTER:
                        self._encode_frame(self._slate_frame(), jpeg_encoder, None, slate=True)
                continue
            self._last_frame = now
            self._stall_closed_at = None
            if st.slate:
                st.slate = False
                log.info("stream=%s signal is back", self.name)
            if self.max_fps and frame.capture_time - self._last_encoded < THERMAL_SLACK / self.max_fps:
                st.frames_dropped_thermal += 1
                continue
            self._last_encoded = frame.capture_time
            if decoder is None and frame.jpeg is not None:
                decoder = JpegDecoder()  # made once an MJPEG camera sends: a passed-through one never needs it
            self._encode_frame(frame, jpeg_encoder, decoder)

    def _encode_frame(
        self, frame: CapturedFrame, jpeg_encoder: JpegEncoder, decoder: JpegDecoder | None, slate: bool = False
    ) -> None:
        st = self.stats
        if time.monotonic() < self._encoder_retry_at:
            return  # the encoder failed; it is tried again when its backoff ends
        started = time.perf_counter()
        try:
            picture = frame.picture
            if picture is None:
                assert decoder is not None
                picture = decoder.decode(frame.jpeg or b"")
        except DecodeError as exc:
            st.frames_dropped_corrupt += 1
            log.debug("stream=%s %s", self.name, exc)
            return
        if not slate:
            st.frames_decoded += 1  # the camera's picture, decoded here or by the source
        if frame.jpeg is None and self.send_jpeg:
            # Not an MJPEG source (RTSP, file, the slate): encode a JPEG only because someone wants one.
            self._send(
                ipc.pack(ipc.JPEG, jpeg_encoder.encode(picture), capture_time=frame.capture_time, camera=self.camera)
            )
        force = self._take_keyframe_request()
        if slate and self._slate_idr:  # camera units went out since: the slate must start afresh
            self._slate_idr = False
            force = True
        try:
            units = self._encoder.encode(picture, self._pts(frame.capture_time), force)
        except Exception as exc:
            self._encoder.close()
            self._encoder_failed(exc)
            return
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
            self._send(
                ipc.pack(ipc.UNIT, data, flags=flags, pts=pts, capture_time=frame.capture_time, camera=self.camera)
            )
            self.last_alive = time.monotonic()
        if slate:
            self._need_idr = True  # a passed-through camera resumes at an IDR, not on the slate's pictures

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
        with self._pts_lock:
            pts = max(round(capture_time * PTS_CLOCK), self._last_pts + 1)
            self._last_pts = pts
            return pts

    def _slate_frame(self) -> CapturedFrame:
        import av

        from . import slate  # numpy: imported by the workers that draw it only

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
        """A source that stops delivering without an error, or takes too long to open and probe: close it
        (which unblocks a stuck read) so the capture loop reopens it; if even that does not free the capture
        thread, end the process and let the relay start a fresh one."""
        capture = self._capture.ident if self._capture is not None else None
        if WRITES.waits(capture):
            return  # its capture thread waits to write to the relay: the pipe is full, not the source silent
        if self._opening:
            limit, what = OPEN_STALL, "not open, or no packet while probing it,"
        elif self.stats.state == "live":
            limit, what = CAPTURE_STALL, "no frame"
        else:
            return  # waiting to retry
        silent = now - max(self._last_read, WRITES.ended(capture))
        if silent >= limit and self._stall_closed_at is None:
            self._stall_closed_at = now
            self._record_error(f"{what} for {silent:.1f}s; reopening the source")
            source = self._source
            if source is not None:
                source.close()
        elif self._stall_closed_at is not None and now - self._stall_closed_at >= STUCK_EXIT and not self.stuck:
            self.stuck = True  # the worker's Cameras start it afresh, or end the process (a camera of its own)
            self._record_error(f"capture stuck in the driver for {now - self._stall_closed_at:.1f}s after closing")
            self.push_status()

    def _take_keyframe_request(self) -> bool:
        if not self._keyframe_wanted.is_set():
            return False
        now = time.monotonic()
        if now - self._last_forced < KEYFRAME_MIN_INTERVAL:
            return False  # stays pending; honoured on a later frame
        self._keyframe_wanted.clear()
        self._last_forced = now
        return True


def _give_back_memory() -> None:
    """Return the heap a closed encoder freed to the system: glibc keeps freed memory for reuse, so a
    passed-through camera's worker would hold a slate encoder's tens of MiB for good."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _avcc_length(extradata: bytes) -> int:
    """The NAL length size of a source whose packets are AVCC (MP4, MKV: extradata is avcC); 0 for Annex B."""
    return h264.parse_avcc(extradata).length_size if extradata[:1] == b"\x01" else 0


def _annexb(data: bytes, avcc_length: int) -> bytes:
    return h264.avcc_to_annexb(data, avcc_length) if avcc_length else data


class UnitLock:
    """A lock held while a unit is written, and its holder's ident while held. A thread that waits for it while its
    holder waits in a write waits to write too (``writes.WRITES``; recorded only when it has to wait: a lock taken
    at once is no wait, and most are). Taken once a unit by a camera's capture thread: a plain object, not a
    generator's context manager made at every unit."""

    __slots__ = ("_lock", "holder")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.holder: int | None = None

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            began = WRITES.begin(behind=lambda: self.holder)
            try:
                self._lock.acquire()
            finally:
                WRITES.end(began)
        self.holder = threading.get_ident()

    def __exit__(self, *exc: object) -> None:
        self.holder = None
        self._lock.release()


class PipeWriter:
    """Thread-safe writes of whole messages to a pipe; a closed pipe stops the worker."""

    def __init__(self, fd: int, on_broken: Callable[[], None]) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._on_broken = on_broken

    def __call__(self, data: bytes) -> None:
        began = WRITES.begin()  # the one record of this write (the pipelines' sends do not wrap it again)
        try:
            with self._lock:
                written = os.write(self._fd, data)  # most: a pipe with room takes a whole message at once
                if written < len(data):
                    view = memoryview(data)
                    while written < len(data):
                        written += os.write(self._fd, view[written:])
        except (BrokenPipeError, OSError):
            self._on_broken()
        finally:
            WRITES.end(began)


def _discard(data: bytes) -> None:
    """Where an abandoned pipeline's messages go."""


def make_pipeline(cfg: ipc.WorkerConfig, camera: int, emit: Emit, shared: bool = False) -> Pipeline:
    """One camera of the worker, as its ``WorkerConfig`` says, its messages marked as camera ``camera`` (``shared``:
    the worker runs other cameras too)."""
    spec = parse_source_spec(cfg.source)
    settings = EncoderSettings(cfg.bitrate, spec.fps or cfg.fps, cfg.keyframe_interval, cfg.encoder)
    # A UVC camera that can send H.264 itself is asked for it, unless the stream must transcode.
    h264_device = spec.kind == "v4l2" and cfg.mode != "transcode" and offers_h264(spec.target)
    audio, tap = None, None
    if cfg.audio == "track":  # the camera's or file's own sound, handed over by its capture thread
        from .audio import AudioPipeline
        from .cameraaudio import AudioTap, TrackSource

        tap = AudioTap()
        audio = AudioPipeline(cfg.name, functools.partial(TrackSource, tap), emit, camera=camera)
    elif cfg.audio:
        from .audio import AudioPipeline, open_audio_source

        audio = AudioPipeline(cfg.name, lambda: open_audio_source(cfg.audio), emit, camera=camera)
    return Pipeline(
        cfg.name,
        str(spec),
        lambda: open_source(spec, cfg.width, cfg.height, cfg.fps, cfg.name, h264_device, tap),
        settings,
        emit,
        size=(spec.width or cfg.width, spec.height or cfg.height),
        mode=cfg.mode,
        audio=audio,
        audio_tap=tap,
        camera=camera,
        shared=shared,
    )


class Cameras:
    """The worker's cameras, one ``Pipeline`` each (its own threads, its own stall watch), watched from the main
    thread. A camera is started afresh in a new pipeline (its counters carried on, ``camera_restarts`` one more,
    the others untouched) when its capture thread stays stuck after its source was closed, when its watch raises,
    when the relay asks (``ipc.CMD_RESTART``: its messages could not be handled there) and, in a shared worker,
    when it sent nothing, not even the slate, for ``ipc.OUTPUT_STALL`` (its encode thread died: the relay's
    watchdog sees only that some camera of the process sends); one whose capture is stuck with ``CAPTURE_LEFT_MAX``
    of its pipelines left behind still stuck stays dark until one of them returns. A worker of one camera whose
    capture is stuck ends instead, and the relay starts a new process; one that goes silent is the relay's
    watchdog's. A camera started afresh again and again waits longer each time (``backoff.CAMERA_RESTARTS``), except
    when the relay asks: the relay keeps its own schedule, and its asks are not counted in the worker's. ``clock``
    and ``rng``: the schedule's (the tests' own)."""

    def __init__(
        self,
        make: Callable[[int], Pipeline],
        count: int,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._make = make
        # Held while a command is applied and while a camera is replaced: no command goes to a pipeline on its way
        # out (the new one takes over the old one's JPEG and frame-rate wishes and a pending keyframe request).
        self._lock = threading.Lock()
        self.pipelines = [make(i) for i in range(count)]
        self.replaced = 0  # pipelines started afresh
        self.left_behind: list[Pipeline] = []  # replaced, some thread of theirs still running
        self._clock = clock
        self._restarts = [Restarts(CAMERA_RESTARTS, rng) for _ in range(count)]
        # Its last new pipeline could not be made or started (it stays dark): the counts its next one carries on.
        self._carried: list[ipc.Counters | None] = [None] * count
        self._held = [False] * count  # stuck with CAPTURE_LEFT_MAX left behind still stuck: said once

    @property
    def shared(self) -> bool:
        return len(self.pipelines) > 1

    def get(self, camera: int) -> Pipeline | None:
        """The pipeline of camera ``camera``; None for a number the worker has no camera of (ignored)."""
        return self.pipelines[camera] if 0 <= camera < len(self.pipelines) else None

    def start(self) -> None:
        for pipeline in self.pipelines:
            pipeline.start()

    def stop(self) -> None:
        """Every camera told to stop at once, then their threads waited for together: at most
        ``THREAD_JOIN_TIMEOUT`` in all, not that much per camera."""
        with self._lock:
            pipelines = self.pipelines + self.left_behind
        for pipeline in pipelines:
            pipeline.halt()
        deadline = time.monotonic() + THREAD_JOIN_TIMEOUT
        for pipeline in pipelines:
            pipeline.join(deadline)
        for pipeline in pipelines:
            pipeline.release()

    def command(self, camera: int, cmd: bytes, arg: int | None) -> None:
        """One of the relay's commands (``ipc.parse_commands``), applied to the camera's current pipeline."""
        with self._lock:
            pipeline = self.get(camera)
            if pipeline is None:
                log.warning("command %r for camera %d: this worker has %d", cmd, camera, len(self.pipelines))
            elif cmd == ipc.CMD_RESTART:  # the relay asks as its own schedule says (relay.stream.Worker)
                self._replace(camera, "the relay could not handle its messages", asked=True)
            else:
                try:
                    _apply(pipeline, cmd, arg)
                except Exception as exc:
                    self._failed(camera, f"its command {cmd!r}", exc)

    def tick(self) -> None:
        """Each camera's watch (``Pipeline.tick``), and a new pipeline for any that needs one."""
        for camera in range(len(self.pipelines)):
            with self._lock:
                pipeline = self.pipelines[camera]
                try:
                    pipeline.tick()
                except Exception as exc:  # one camera's bug is not the others' restart
                    self._failed(camera, "its watch", exc)
                    continue
                why = self._why_restart(pipeline, time.monotonic())
                if not why and self._carried[camera] is not None:
                    why = "its last start failed"
                if why and pipeline.stuck and self._hold(camera, pipeline):
                    continue
                if why and self._restarts[camera].due(self._clock()):  # else it waits, as its schedule says
                    self._replace(camera, why)
        with self._lock:
            self.left_behind = [p for p in self.left_behind if not p.release()]

    def _hold(self, camera: int, pipeline: Pipeline) -> bool:
        """With ``_lock`` held, its capture stuck: whether the camera stays as it is, dark, because
        ``CAPTURE_LEFT_MAX`` of its pipelines left behind are still stuck (said once: a log line, its status's
        ``last_error``), until one of them returns. A worker of one camera is never held: it ends instead."""
        left = sum(1 for p in self.left_behind if p.camera == camera and p.capturing)
        if not self.shared or left < CAPTURE_LEFT_MAX:
            self._held[camera] = False
            return False
        if not self._held[camera]:
            self._held[camera] = True
            pipeline.stats.last_error = f"capture stuck in the driver, and {left} before it"
            log.warning("stream=%s capture stuck in the driver, and %d left behind before it still stuck: not started "
                        "afresh until one of them returns", pipeline.name, left)  # fmt: skip
            pipeline.push_status()
        return True

    def _why_restart(self, pipeline: Pipeline, now: float) -> str:
        if pipeline.stuck:
            return "capture is stuck in the driver"
        silent = pipeline.silent(now)
        # Not one leaving the process, nor one whose encoder fails (its status says so, and it retries by itself).
        watched = self.shared and not pipeline.stats.own_process and not pipeline.encoder_failing
        if watched and silent >= ipc.OUTPUT_STALL:
            return f"sent nothing (no frame, no slate) for {silent:.1f}s"
        return ""

    def _failed(self, camera: int, what: str, exc: Exception) -> None:
        """With ``_lock`` held: ``what`` raised ``exc``; the camera restarted, unless its last restart was too recent
        (then the failure is counted into the next restart's line)."""
        if self._restarts[camera].failed(self._clock()):
            self._replace(camera, f"{what} failed: {type(exc).__name__}: {exc}", exc)

    def _replace(self, camera: int, why: str, exc: Exception | None = None, asked: bool = False) -> None:
        """With ``_lock`` held: camera ``camera`` started afresh in a new pipeline. ``asked``: by the relay, whose own
        schedule spaces its asks (``relay.stream.Worker``); the worker's schedule counts the worker's restarts only,
        so a camera the relay restarted is not made to wait longer for the worker's first."""
        old = self.pipelines[camera]
        if not self.shared and old.stuck:
            log.error("stream=%s %s; restarting the worker", old.name, why)
            os._exit(EXIT_STUCK)
        others = f" (the worker's {len(self.pipelines) - 1} others carry on)" if self.shared else ""
        restarts = self._restarts[camera]
        delay = 0.0
        if asked:  # the worker's own next restart waits as its schedule says, untouched by this one
            log.warning("stream=%s %s; starting the camera afresh%s, as the relay asks", old.name, why, others)
        else:
            first, waiting = restarts.first, restarts.waiting
            delay = restarts.restarted(self._clock())
            more = f" ({waiting} more failures since the last restart)" if waiting else ""
            # One line a restart (the schedule spaces them), the traceback with the first of a run of them only.
            log.warning(
                "stream=%s %s%s; starting the camera afresh%s; restart %d, the next no sooner than %.1fs after it",
                old.name, why, more, others, restarts.restarts, delay, exc_info=exc if first else None,
            )  # fmt: skip
        counted = self._carried[camera]  # taken when its last new pipeline failed to start (none has run since)
        if counted is None:
            try:
                counted = old.status()
            except Exception:  # what failed may be its status: its counts are then those of its last one, never fewer
                counted = dataclasses.replace(old.reported or old.counted_before or ipc.WorkerStatus())
        counted.camera_restarts += 1
        old.abandon()
        try:
            new = self._make(camera)
            new.counted_before = counted
            new.send_jpeg, new.jpeg_every, new.max_fps = old.send_jpeg, old.jpeg_every, old.max_fps
            new.request_keyframe()  # its viewers start again from an IDR
            new.start()
        except Exception as exc:  # no thread left, an encoder that will not open: the camera stays dark, tried again
            self._carried[camera] = counted
            again = "as the worker's schedule allows" if asked else f"in {delay:.1f}s"
            log.error("stream=%s could not be started afresh: %s: %s; trying again %s",
                      old.name, type(exc).__name__, exc, again)  # fmt: skip
            return
        self._carried[camera] = None
        self.pipelines[camera] = new
        self.replaced += 1
        self.left_behind.append(old)


def _apply(pipeline: Pipeline, cmd: bytes, arg: int | None) -> None:
    if cmd == ipc.CMD_MAX_FPS:
        pipeline.max_fps = float(arg or 0)
        log.info("stream=%s encoding at most %s fps", pipeline.name, arg or "all")
    elif cmd == ipc.CMD_KEYFRAME:
        pipeline.request_keyframe()
    elif cmd == ipc.CMD_JPEG_ON:
        pipeline.set_jpeg(True)
    elif cmd == ipc.CMD_JPEG_KEYFRAMES:
        pipeline.set_jpeg(True, float(arg or 1))
    elif cmd == ipc.CMD_JPEG_OFF:
        pipeline.set_jpeg(False)


def main(argv: list[str] | None = None) -> int:
    configs = ipc.configs_from_json(argv[0] if argv else os.environ.pop(ipc.WORKER_CONFIG_ENV))
    out_fd = os.dup(1)
    os.dup2(2, 1)  # anything that prints goes to stderr, never into the frame pipe
    stop = threading.Event()
    emit = PipeWriter(out_fd, stop.set)
    root = logging.getLogger()
    root.handlers[:] = [
        ForwardingHandler(
            lambda level, name, msg: emit(ipc.pack_json(ipc.LOG, {"level": level, "logger": name, "message": msg}))
        )
    ]
    root.setLevel(configs[0].log_level.upper())

    def on_sigterm(*_: object) -> None:
        stop.set()
        # The polite stop (stdin closed) already failed if this came: do not linger in a stuck driver.
        threading.Timer(SIGTERM_GRACE, os._exit, args=(0,)).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the relay decides when we stop

    for cfg in configs:
        SECRET_FILTER.secrets.update(url_passwords(cfg.source))
    shared = len(configs) > 1
    cameras = Cameras(lambda camera: make_pipeline(configs[camera], camera, emit, shared), len(configs))

    command_log = Throttled(log, COMMAND_LOG_INTERVAL)

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
            for camera, cmd, arg in commands_in:
                try:
                    cameras.command(camera, cmd, arg)
                except Exception as exc:  # this thread ends only with stdin: every later command still counts
                    command_log.warn("command %r for camera %d failed: %s: %s", cmd, camera, type(exc).__name__, exc)

    threading.Thread(target=commands, name="commands", daemon=True).start()
    cameras.start()
    while not stop.wait(WATCH_INTERVAL):
        cameras.tick()
    cameras.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
