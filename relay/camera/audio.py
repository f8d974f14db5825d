"""A stream's sound in its worker: captured on a thread of its own and encoded once, to Opus.

    audio source (the test sound; later a capture card's ALSA device, a camera's track)
        -> 48 kHz PCM blocks, each stamped with the capture time of its first sample
        -> one Opus encoder (20 ms frames) -> ``ipc.AUDIO`` messages to the relay

An audio source is anything with ``open``, ``read`` and ``close`` (``AudioSource``):
``read`` blocks until a block of samples has been captured and returns it as an
``AudioBlock``, 48 kHz signed 16-bit PCM with the wall-clock capture time of its
first sample (the clock the video's capture times are on, so the relay can map
both RTP clocks onto it). A source that fails raises ``SourceError``: the audio
thread logs one line, closes it and opens a new one after a backoff, while the
video goes on untouched (its own threads). ``open_audio_source`` names the one a
stream's ``WorkerConfig.audio`` asks for.

Each Opus packet goes to the relay with its pts in 48 kHz samples of the capture
clock (``SampleClock``: continuous from block to block, so receivers hear no gap
that is not there) and the capture time of its first sample.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Protocol

from .. import ipc
from ..backoff import Retry
from ..logsafe import SECRET_FILTER, redact
from . import testsound
from .capture import SourceError
from .writes import WRITES

if TYPE_CHECKING:
    import av
    import numpy as np  # loaded where samples are made or encoded: a camera without sound never loads it

log = logging.getLogger(__name__)

RATE = testsound.RATE  # 48 kHz: Opus's own rate; what every source delivers (the contract of AudioSource)
BLOCK_SAMPLES = RATE // 50  # 20 ms: one Opus frame, WebRTC's usual packet
OPUS_FRAME = BLOCK_SAMPLES
# Opus's bit rate per channel: 48 kbit/s is transparent for most speech and music (a capture card's stereo gets 96),
# a few percent of a 720p stream's 2 Mbit/s for each viewer.
OPUS_BITRATE_PER_CHANNEL = 48_000
# libopus's restricted low-delay mode (CELT only): 2.5 ms of look-ahead instead of 6.5 ms, nothing lost at the bit
# rates above (it only costs speech at very low ones).
OPUS_OPTIONS = {"application": "lowdelay", "frame_duration": "20"}
# A block whose capture time is this much past where the samples before it end came after a gap (samples lost, the
# source reopened): the pts jump with it, as the receiver's silence does. Jitter in a device's timestamps stays
# well under it. Blocks that run ahead of their capture times (a device clock a little fast) keep the pts
# continuous: RTP timestamps never go back.
RESYNC = 0.1  # seconds
# The test sound skips what it could not deliver in time after this long behind the clock (a starved thread), as
# a capture device overruns: counted, never sent late in a burst.
MAX_LATE = 0.2  # seconds
THREAD_JOIN_TIMEOUT = 5.0  # a read is bounded by a block's 20 ms, an open by the source's own deadline
# Seconds an open source may deliver no block, its thread still in its read or the encode, before that thread is
# taken as hung (an ALSA driver stuck in the kernel, which closing the source does not end) and the sound is started
# afresh on a new thread, the video untouched: the video's output watch's bound (ipc.OUTPUT_STALL). A test sound's
# or a device's block comes every 20 ms (a period at most ~100 ms); a source that may rightly wait longer says so
# in its own ``read_bound`` (a camera's track: its silence timeout).
READ_BOUND = ipc.OUTPUT_STALL
# Seconds a source's ``open`` may take before its thread is taken as hung there (an ALSA device that never returns
# from opening: its driver stuck in the kernel), left behind as a hung read's is: a device opens in tens of ms, an
# ALSA plugin that probes a server or a card within a second or two; the capture sources' own deadline to open
# (capture.OPEN_TIMEOUT). A source whose open may rightly wait longer, ended by its ``close``, says so in its own
# ``open_bound`` (a camera's track waits there for its first frame).
OPEN_BOUND = 10.0
EWMA_ALPHA = 0.1  # smoothing for the per-frame encode time


@dataclass(slots=True)
class AudioBlock:
    """Samples a source captured: 48 kHz signed 16-bit, shape (samples, channels)."""

    capture_time: float  # the wall clock (time.time()) when its first sample was captured
    samples: np.ndarray
    opus: bytes | None = None  # a camera's own Opus packet, passed through untouched (no samples then)
    duration: int = 0  # of ``opus``, in 48 kHz samples


class AudioSource(Protocol):
    """Blocking; read from the audio thread alone. ``close`` may come from any thread: it ends a pending read. One
    whose read may rightly block longer than ``READ_BOUND`` says how long in a ``read_bound`` of its own, one whose
    open may take longer than ``OPEN_BOUND`` in an ``open_bound``."""

    channels: int  # 1 or 2
    name: str  # what it is, for the log and the status: "test sound"
    overruns: int  # blocks lost because they were not read in time (a starved thread, a device's overrun)
    absent: bool  # its source has no sound (a camera without a track): nothing to wait for until it has one

    def open(self) -> None: ...

    def read(self) -> AudioBlock: ...

    def close(self) -> None: ...


class TestSoundSource:
    """The test pattern's sound (``relay.camera.testsound``), a 20 ms block as each one's last sample is due on the
    wall clock: as a capture card hands over a period once it is captured."""

    channels = 1  # the tone is the same in both ears: mono costs half the encode and the bits
    absent = False
    name = "test sound"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.overruns = 0  # blocks skipped because they were not read in time
        self._clock = clock
        self._next = 0  # the number of the next block's first sample
        self._stop = threading.Event()

    def open(self) -> None:
        self._next = testsound.sample_at(self._clock())

    def read(self) -> AudioBlock:
        end = self._next + BLOCK_SAMPLES
        wait = end / RATE - self._clock()
        if wait > 0:
            if self._stop.wait(wait):
                raise SourceError("test sound closed")
        elif -wait > MAX_LATE:
            late = testsound.sample_at(self._clock()) - end
            skipped = late // BLOCK_SAMPLES
            self.overruns += skipped
            self._next += skipped * BLOCK_SAMPLES
            end = self._next + BLOCK_SAMPLES
        first, self._next = self._next, end
        return AudioBlock(first / RATE, testsound.render(first, BLOCK_SAMPLES).reshape(-1, 1))

    def close(self) -> None:
        self._stop.set()


def open_audio_source(kind: str) -> AudioSource:
    """The source ``WorkerConfig.audio`` names: "test", the test pattern's sound; "alsa:<PCM>", an ALSA device."""
    if kind == "test":
        return TestSoundSource()
    if kind.startswith("alsa:"):
        from .alsasource import AlsaSource

        return AlsaSource(kind[5:])
    raise ValueError(f"unknown audio source {kind!r}")


class SampleClock:
    """48 kHz pts for blocks that carry a capture time (sans-io): the first block's capture time in samples, then
    each block where the one before ended, unless its capture time shows a gap (``RESYNC``)."""

    def __init__(self, resync: float = RESYNC) -> None:
        self._resync = round(resync * RATE)
        self._next: int | None = None
        self.anchors = 0  # the first block, then every gap

    def pts(self, capture_time: float, samples: int) -> int:
        at = round(capture_time * RATE)
        if self._next is None or at - self._next > self._resync:
            self._next = at
            self.anchors += 1
        pts, self._next = self._next, self._next + samples
        return pts


class OpusEncoder:
    """libopus through PyAV: blocks of any length in, 20 ms Opus packets out, each with the pts of its first sample
    as a receiver decodes it (the encoder's look-ahead already taken off)."""

    def __init__(self, channels: int) -> None:
        import av  # the worker loads PyAV only where it encodes or decodes
        import numpy as np

        if channels not in (1, 2):
            raise ValueError(f"Opus takes 1 or 2 channels here, not {channels}")
        self.channels = channels
        self.bitrate = OPUS_BITRATE_PER_CHANNEL * channels
        ctx = av.CodecContext.create("libopus", "w")
        ctx.sample_rate = RATE
        ctx.layout = "mono" if channels == 1 else "stereo"
        ctx.format = "s16"
        ctx.bit_rate = self.bitrate
        ctx.time_base = Fraction(1, RATE)
        ctx.options = dict(OPUS_OPTIONS)
        ctx.open()
        self._ctx: av.AudioCodecContext = ctx
        self._pending = np.zeros((0, channels), dtype=np.int16)  # samples short of a whole frame
        self._next = 0  # the pts the pending samples start at

    def encode(self, samples: np.ndarray, pts: int) -> list[tuple[bytes, int]]:
        """(packet, pts) for each whole 20 ms frame the samples complete; a gap in pts drops the part-frame before."""
        import av
        import numpy as np

        if len(self._pending) and pts != self._next + len(self._pending):
            self._pending = self._pending[:0]
        if not len(self._pending):
            self._next = pts
        data = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        out = []
        whole = len(data) // OPUS_FRAME * OPUS_FRAME
        for start in range(0, whole, OPUS_FRAME):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(data[start : start + OPUS_FRAME]).reshape(1, -1),
                format="s16",
                layout=self._ctx.layout.name,
            )
            frame.sample_rate = RATE
            frame.time_base = self._ctx.time_base
            frame.pts = self._next + start
            out += [(bytes(p), p.pts) for p in self._ctx.encode(frame)]
        self._pending = data[whole:].copy()
        self._next += whole
        return out


class AudioPipeline:
    """The audio thread of one stream's worker: its source read, one Opus encoder, packets to ``emit``."""

    def __init__(
        self,
        name: str,
        source_factory: Callable[[], AudioSource],
        emit: Callable[[bytes], None],
        retry: Retry | None = None,
        camera: int = 0,
    ) -> None:
        self.name = name
        self.camera = camera  # its camera's index in the worker: what its messages name
        self.source_name = ""  # the source's, once made
        self.state = "starting"  # starting, live, retrying
        self.channels = 0
        self.bitrate = 0
        self.frames_captured = 0  # blocks read from the source
        self.frames_encoded = 0  # Opus packets sent to the relay
        self.overruns = 0  # blocks the source lost because they were not read in time (by sources closed since)
        self.source_errors = 0
        self.last_error = ""
        self.encode_ms = 0.0
        self.cpu_seconds = 0.0  # of the audio thread: its capture (the test sound's render) and its encode
        self.restarts = 0  # its thread taken as hung and the sound started afresh on a new one (``restarted``)
        self._cpu_before = 0.0  # of the threads before this one (``restarted``)
        self._last_block = time.monotonic()  # while live: when its source last delivered a block (or opened)
        self._opening_since: float | None = None  # monotonic: when its source's open began, while it runs
        self._source_factory = source_factory
        self._emit = emit
        self._retry = retry or Retry()
        self._stop = threading.Event()
        self._source: AudioSource | None = None
        self._thread: threading.Thread | None = None
        self._cpu_origin = 0.0  # the audio thread's CPU time when it started
        self._lock = threading.Lock()  # the source closed and its overruns folded in, as one

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"audio-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.halt()
        self.join(THREAD_JOIN_TIMEOUT)

    def halt(self) -> None:
        """Its thread told to stop, its source closed (which ends a pending read); not waited for."""
        self._stop.set()
        source = self._source
        if source is not None:
            source.close()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(max(0.0, timeout))

    def abandon(self) -> None:
        """Halted, and whatever its thread still makes goes nowhere: its camera goes on in a new pipeline, whose
        sound is its own (two writers of one camera's sound were two streams of packets in one)."""
        self._emit = lambda data: None
        self.halt()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def opening(self) -> bool:
        """Its thread is in its source's ``open``."""
        return self._opening_since is not None

    def hung(self, now: float) -> float:
        """Seconds its source has been opening, if past its bound (``OPEN_BOUND``), or, open, has delivered no
        block, if past its bound (``READ_BOUND``): its thread is stuck in the open, a read or the encode; 0
        otherwise (while it waits to retry, its own backoff is at work; while its thread waits to write to the
        relay, the pipe is full). A write that waited is no silence of the source's: it counts from its end."""
        source, opening = self._source, self._opening_since
        if source is None:
            return 0.0
        if opening is not None:
            silent = now - opening
            return silent if silent >= getattr(source, "open_bound", OPEN_BOUND) else 0.0
        thread = self._thread.ident if self._thread is not None else None
        if self.state != "live" or WRITES.waits(thread):  # a write waiting (a packet, a log line): the pipe is full
            return 0.0
        silent = now - max(self._last_block, WRITES.ended(thread))
        return silent if silent >= getattr(source, "read_bound", READ_BOUND) else 0.0

    def restarted(self) -> AudioPipeline:
        """A new audio pipeline of the same source, started, its counters carried on and ``restarts`` one more;
        this one abandoned (its thread, if it ever returns, sends nothing)."""
        emit = self._emit
        self.abandon()
        new = AudioPipeline(self.name, self._source_factory, emit, camera=self.camera)
        new.frames_captured, new.frames_encoded = self.frames_captured, self.frames_encoded
        new.overruns, new.source_errors, new.last_error = self._overruns(), self.source_errors, self.last_error
        new._cpu_before = new.cpu_seconds = self.cpu_seconds
        new.restarts = self.restarts + 1
        new.start()
        return new

    def status(self) -> dict[str, object]:
        """Its part of the worker's ``ipc.WorkerStatus``."""
        return {
            "audio": self.source_name,
            "audio_state": "none" if self._absent() else self.state,
            "audio_codec": "opus" if self.channels else "",
            "audio_channels": self.channels,
            "audio_bitrate": self.bitrate,
            "audio_encode_ms": self.encode_ms,
            "audio_frames_captured": self.frames_captured,
            "audio_frames_dropped_overrun": self._overruns(),
            "audio_source_errors": self.source_errors,
            "audio_last_error": self.last_error,
            "audio_cpu_seconds": self.cpu_seconds,
            "audio_restarts": self.restarts,
        }

    def _absent(self) -> bool:
        source = self._source
        return source is not None and source.absent

    def _overruns(self) -> int:
        with self._lock:
            return self.overruns + (self._source.overruns if self._source is not None else 0)

    def _loop(self) -> None:
        encoder: OpusEncoder | None = None
        self._cpu_origin = time.thread_time()
        while not self._stop.is_set():
            started = time.monotonic()
            source: AudioSource | None = None
            try:
                source = self._source = self._source_factory()
                self.source_name = source.name
                self._opening_since = time.monotonic()
                try:
                    source.open()
                finally:
                    self._opening_since = None
                if self._stop.is_set():
                    break  # abandoned while it opened (hung there): it sends nothing, says nothing
                self.source_name = source.name  # what it found once open (a camera's codec, a device's name)
                if encoder is None or encoder.channels != source.channels:
                    encoder = OpusEncoder(source.channels)
                    self.channels, self.bitrate = encoder.channels, encoder.bitrate
                self._last_block = time.monotonic()
                self.state = "live"
                log.info(
                    "stream=%s audio=%s channels=%d codec=opus bitrate=%d",
                    self.name, source.name, encoder.channels, encoder.bitrate,
                )  # fmt: skip
                self._run(source, encoder, SampleClock())
            except SourceError as exc:
                if self._stop.is_set():
                    break
                self._failed(str(exc), started)
            except Exception as exc:  # the encoder (PyAV, libopus): made anew after the backoff
                encoder = None
                if self._stop.is_set():
                    break
                self._failed(f"encoder failed: {type(exc).__name__}: {exc}", started)
            finally:
                if source is not None:
                    source.close()
                    with self._lock:  # a status read meanwhile counts its overruns once
                        self._source = None
                        self.overruns += source.overruns

    def _run(self, source: AudioSource, encoder: OpusEncoder, clock: SampleClock) -> None:
        while not self._stop.is_set():
            block = source.read()
            self._last_block = time.monotonic()
            self.frames_captured += 1
            began = time.perf_counter()
            if block.opus is not None:  # a camera's own Opus: no decode, no encode
                packets = [(block.opus, clock.pts(block.capture_time, block.duration))]
            else:
                packets = encoder.encode(block.samples, clock.pts(block.capture_time, len(block.samples)))
            self.encode_ms += EWMA_ALPHA * ((time.perf_counter() - began) * 1000 - self.encode_ms)
            for data, pts in packets:
                self.frames_encoded += 1
                self._send(ipc.pack(ipc.AUDIO, data, pts=pts, capture_time=pts / RATE, camera=self.camera))
            self.cpu_seconds = self._cpu_before + time.thread_time() - self._cpu_origin

    def _send(self, data: bytes) -> None:
        """A packet to the relay; while it waits (the pipe full), and up to when it ends, not a silent source: the
        emit records that itself (``worker.PipeWriter``, in ``writes.WRITES``, as any write of the process's)."""
        self._emit(data)

    def _failed(self, message: str, started: float) -> None:
        """One line per failure, then a wait: 0.5 s, 1 s, 2 s ... 30 s (a run of 10 s starts the schedule again)."""
        self._retry.ran(time.monotonic() - started)
        delay = self._retry.next_delay()
        message = redact(message, SECRET_FILTER.secrets)
        self.source_errors += 1
        self.last_error = message
        self.state = "retrying"
        log.warning("stream=%s audio error: %s; retry %d in %.1fs", self.name, message, self._retry.attempt, delay)
        self._stop.wait(delay)
