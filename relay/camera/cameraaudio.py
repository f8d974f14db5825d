"""A camera's or a file's own sound, from its capture thread to the worker's audio thread.

    capture thread (RtspSource, PacketSource): coded frames, each stamped with its capture time
        -> AudioTap (bounded, newest kept, drops counted)
        -> audio thread: TrackSource.read() decodes (AAC, G.711: PyAV, resampled to 48 kHz s16)
           or passes Opus through untouched -> AudioPipeline (relay.camera.audio)

The capture thread only depacketizes (or demuxes) and hands each frame over: no
decode, no lock held beyond a deque's append, so the sound never delays the
video. Decoding is the audio thread's; a frame it cannot decode is counted
(``undecodable``) and skipped. The tap outlives the video source's reconnects:
a camera that comes back with its sound goes on in the same audio thread.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .audio import RATE, READ_BOUND, AudioBlock
from .capture import SourceError

if TYPE_CHECKING:
    import numpy as np  # loaded once sound comes: an RTSP camera's worker without sound never loads it

log = logging.getLogger(__name__)

# Frames the tap holds for the audio thread: AAC's 1024 samples at 8-48 kHz are 21-128 ms each, G.711's packets
# 20-40 ms: a second or more. A thread starved that long loses the oldest (counted), as a capture device overruns.
TAP_FRAMES = 50
# Seconds without a frame from a track that was sending before the audio source counts as failed (the camera
# dropped its sound, or came back without it): one log line, and the pipeline's backoff.
SILENCE_TIMEOUT = 5.0
MAX_CHANNELS = 2  # what Opus is encoded with here: a camera's more are mixed down by the resampler
# A camera may bundle many frames in one RTP packet (ffmpeg's RTP muxer puts up to 700 ms of AAC in one): they
# arrive at once, their capture times spread after the first. Each block waits for its own capture time (at most
# this long) before it goes on, so the relay gets the sound at its pace, not in a burst its viewers' queues drop.
MAX_PACE = 1.0  # seconds: SourceClock maps no frame further ahead of the wall clock than its resync, 1 s


@dataclass(frozen=True, slots=True)
class TrackFormat:
    """What a track's frames are: the decoder to make for them."""

    codec: str  # FFmpeg's decoder: opus (passed through), aac, pcm_mulaw, pcm_alaw, or any a file carries
    rate: int  # samples a second
    channels: int
    extradata: bytes = b""  # AAC's AudioSpecificConfig


@dataclass(frozen=True, slots=True)
class TapFrame:
    format: TrackFormat
    data: bytes
    capture_time: float  # the wall clock of its first sample, on the video's capture clock
    samples: int  # at format.rate


class AudioTap:
    """A bounded hand-over of coded frames from a capture thread to the audio thread."""

    def __init__(self, size: int = TAP_FRAMES) -> None:
        self.dropped = 0  # frames the audio thread did not take in time (the oldest go)
        self.frames = 0  # put
        self.packets_dropped = 0  # RTP packets of the track its capture thread could not read (or came late)
        # What the source said when it last opened: True it has a track it reads, False none (a camera or file
        # without sound, or whose sound cannot be read here), None not opened yet.
        self.track: bool | None = None
        self._frames: collections.deque[TapFrame] = collections.deque(maxlen=size)
        self._ready = threading.Condition()

    def put(self, frame: TapFrame) -> None:
        with self._ready:
            if len(self._frames) == self._frames.maxlen:
                self.dropped += 1
            self._frames.append(frame)
            self.frames += 1
            self._ready.notify()

    def take(self, timeout: float | None, stop: threading.Event) -> TapFrame | None:
        """The oldest frame; None when none came within ``timeout`` (None: until ``stop``) or ``stop`` is set."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._frames or stop.is_set(), timeout):
                return None
            return None if stop.is_set() else self._frames.popleft()

    def wake(self) -> None:
        with self._ready:
            self._ready.notify_all()

    def opened(self, track: bool) -> None:
        """Its capture thread opened the source: with a sound track it reads, or without."""
        self.track = track


class TrackSource:
    """An ``AudioSource`` (relay.camera.audio) of a camera's or file's track, read from its ``AudioTap``.

    ``open`` waits for the first frame (its format decides the channels); Opus frames come out as they are
    (``AudioBlock.opus``), any other is decoded and resampled to 48 kHz s16. A format change (a camera that came
    back with another codec) is a ``SourceError``: the pipeline opens the source again, with the new one."""

    # Its read waits up to SILENCE_TIMEOUT for a frame, then MAX_PACE for its time, and gives up by itself: the audio
    # thread is taken as hung only well past that (audio.AudioPipeline.hung).
    read_bound = SILENCE_TIMEOUT + MAX_PACE + READ_BOUND
    # Its open waits for the camera's first frame of sound, for as long as the camera takes (a track that comes
    # late, a camera retried with backoff), and its close ends that wait: an open never taken as hung.
    open_bound = math.inf

    def __init__(self, tap: AudioTap, clock: Callable[[], float] = time.time) -> None:
        self.channels = 0
        self.name = "sound track"
        self.undecodable = 0  # frames the decoder refused, skipped
        self._tap = tap
        self._clock = clock
        self._dropped_at_open = tap.dropped
        self._stop = threading.Event()
        self._format: TrackFormat | None = None
        self._first: TapFrame | None = None
        self._decoder = None
        self._resampler = None

    @property
    def overruns(self) -> int:
        return self._tap.dropped - self._dropped_at_open

    @property
    def absent(self) -> bool:
        """The camera or file, as last opened, has no sound this can read: waiting for one that has."""
        return self._format is None and self._tap.track is False

    def open(self) -> None:
        self._dropped_at_open = self._tap.dropped
        frame = self._tap.take(None, self._stop)
        if frame is None:
            raise SourceError("camera sound closed")
        fmt = self._format = frame.format
        self._first = frame
        self.channels = 2 if fmt.codec == "opus" else min(fmt.channels, MAX_CHANNELS)
        self.name = f"sound track ({fmt.codec} {fmt.rate} Hz {fmt.channels} ch)"
        if fmt.codec != "opus":
            import av

            decoder = av.CodecContext.create(fmt.codec, "r")
            decoder.sample_rate = fmt.rate
            decoder.layout = "mono" if fmt.channels == 1 else "stereo"
            if fmt.extradata:
                decoder.extradata = fmt.extradata
            self._decoder = decoder
            self._resampler = av.AudioResampler(
                format="s16", layout="mono" if self.channels == 1 else "stereo", rate=RATE
            )

    def read(self) -> AudioBlock:
        while True:
            frame, self._first = self._first, None
            if frame is None:
                frame = self._tap.take(SILENCE_TIMEOUT, self._stop)
            if frame is None:
                if self._stop.is_set():
                    raise SourceError("camera sound closed")
                raise SourceError(f"no sound from the camera for {SILENCE_TIMEOUT:g} s")
            ahead = frame.capture_time - self._clock()
            if ahead > 0 and self._stop.wait(min(ahead, MAX_PACE)):
                raise SourceError("camera sound closed")
            if frame.format != self._format:
                raise SourceError(f"the camera's sound changed to {frame.format.codec} {frame.format.rate} Hz")
            if frame.format.codec == "opus":
                import numpy as np

                no_samples = np.zeros((0, 2), np.int16)
                return AudioBlock(frame.capture_time, no_samples, opus=frame.data, duration=frame.samples)
            samples = self._decode(frame)
            if samples is not None and len(samples):
                return AudioBlock(frame.capture_time, samples)

    def _decode(self, frame: TapFrame) -> np.ndarray | None:
        import av

        assert self._decoder is not None and self._resampler is not None
        try:
            decoded = self._decoder.decode(av.Packet(frame.data))
            out = [r for d in decoded for r in self._resampler.resample(d)]
        except av.FFmpegError as exc:
            self.undecodable += 1
            log.debug("camera sound: undecodable frame: %s", exc)
            return None
        if not out:
            return None
        import numpy as np

        return np.concatenate([r.to_ndarray().reshape(-1, self.channels) for r in out])

    def close(self) -> None:
        self._stop.set()
        self._tap.wake()
