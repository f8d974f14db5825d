"""Sound from an ALSA capture device: a capture card's or a webcam's USB audio, an ``AudioSource``.

FFmpeg's ``alsa`` input (through PyAV) opens the PCM by name (``hw:CARD=C920,DEV=0``,
what ``relay.alsa`` pairs with a camera). It asks for 48 kHz stereo, then mono
(a webcam's microphone); a device that only captures another rate (44.1 kHz from
an HDMI source) is opened at the nearest rate it has and resampled to 48 kHz
here, so the Opus encoder always gets what ``AudioSource`` promises. FFmpeg
stamps each period with the wall-clock time its first sample was captured (the
time read, less what the device still held), which is the clock the video's
capture times are on. A device that errors, vanishes or ends raises
``SourceError``: the audio thread logs it and opens it again after a backoff
(the rate a re-plugged HDMI source now has is read then), the video untouched.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from .audio import RATE, AudioBlock
from .capture import SourceError

if TYPE_CHECKING:
    import av

CHANNELS = (2, 1)  # asked for in turn: a capture card's stereo, else a microphone that has only one
# PCM reads that bring no whole sample after resampling (the resampler's filter fills first) before a read gives up:
# a device's period is far larger than the filter, so only a device that stopped delivering gets here.
MAX_EMPTY_READS = 64

OpenInput = Callable[[str, dict[str, str]], "av.container.InputContainer"]


def open_alsa(pcm: str, options: dict[str, str]) -> av.container.InputContainer:
    import av

    return av.open(pcm, format="alsa", options=options)


class AlsaSource:
    """An ALSA capture device (``AudioSource``); ``open_input`` opens it (the tests' is the real ALSA on a PCM
    their own ALSA configuration defines, at a rate of their choosing)."""

    absent = False  # a device that is not there is an error, retried: it is named, so it is meant to be there

    def __init__(self, pcm: str, open_input: OpenInput = open_alsa) -> None:
        self.pcm = pcm
        self.name = f"alsa:{pcm}"
        self.channels = 0
        self.rate = 0  # what the device captures at; resampled to RATE when it differs
        self.overruns = 0  # FFmpeg recovers a device's overrun itself: it shows as a gap in the capture times
        self._open_input = open_input
        self._container: av.container.InputContainer | None = None
        self._packets: Iterator[av.Packet] | None = None
        self._resampler: av.AudioResampler | None = None
        self._lock = threading.Lock()
        self._reading = False
        self._closed = False

    def open(self) -> None:
        import av

        failures = []
        for channels in CHANNELS:
            try:
                container = self._open_input(self.pcm, {"sample_rate": str(RATE), "channels": str(channels)})
                break
            except (OSError, av.FFmpegError) as exc:
                failures.append(f"{channels} channels: {getattr(exc, 'strerror', None) or exc}")
        else:
            raise SourceError(f"{self.name} cannot be opened ({'; '.join(failures)})")
        with self._lock:
            self._container = container
            if self._closed:  # closed from another thread while it opened
                self._release()
                raise SourceError(f"{self.name} closed")
        stream = container.streams.audio[0]
        self.channels = stream.codec_context.channels
        self.rate = stream.codec_context.sample_rate
        if self.channels not in (1, 2):  # Opus here takes one or two; a multichannel card is mixed down to two
            self.channels = 2
        layout = "mono" if self.channels == 1 else "stereo"
        self._resampler = av.AudioResampler(format="s16", layout=layout, rate=RATE)
        self._packets = container.demux(stream)

    def read(self) -> AudioBlock:
        import av

        with self._lock:
            if self._closed or self._packets is None or self._resampler is None:
                raise SourceError(f"{self.name} closed")
            self._reading = True
        try:
            for _ in range(MAX_EMPTY_READS):
                try:
                    packet = next(self._packets)
                except StopIteration:
                    raise SourceError(f"{self.name} ended") from None
                except (OSError, av.FFmpegError) as exc:
                    raise SourceError(f"{self.name} stopped: {getattr(exc, 'strerror', None) or exc}") from None
                if packet.pts is None or packet.time_base is None:
                    continue  # the demuxer's end-of-stream flush
                samples = [
                    out.to_ndarray().reshape(-1, self.channels)
                    for frame in packet.decode()
                    for out in self._resampler.resample(frame)
                ]
                if samples and sum(len(s) for s in samples):
                    return AudioBlock(float(packet.pts * packet.time_base), np.concatenate(samples))
            raise SourceError(f"{self.name} delivered no sound in {MAX_EMPTY_READS} reads")
        finally:
            with self._lock:
                self._reading = False
                if self._closed:
                    self._release()

    def close(self) -> None:
        """Any thread: a read in progress closes the device as it returns (FFmpeg's context is not for two)."""
        with self._lock:
            self._closed = True
            if not self._reading:
                self._release()

    def _release(self) -> None:
        container, self._container, self._packets = self._container, None, None
        if container is not None:
            container.close()
