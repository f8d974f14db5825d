"""Reading the test pattern's sound as it is heard: burst onsets, audio latency, lip sync (sans-io).

The spec's reading (``shared/spec/test-pattern.md``, "Sound"): find burst
onsets in the received audio by its energy in 10 ms windows crossing half the
burst's level; an onset received at wall-clock time ``R`` ms belongs to the
burst ``k = floor(R / 1000)`` while the audio latency is under a second, and
the audio latency is ``R - k * 1000``. Every tenth burst is 2 kHz: a reader
whose ``k`` is a second off hears a 1 kHz burst where a 2 kHz one belongs
(``Onset.slipped``). Lip sync is the audio latency minus the video latency of
the frames received at the same time (``lip_sync``); positive: sound is late.

Plain values in and out: the received audio as chunks of mono samples, each
with the wall-clock time it became available (an aiortc viewer's decoded
frame, a browser's captured buffer), so the tests and ``benchmarks.lipsync``
read it the same way, and its own tests feed it made-up chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from relay.camera.testsound import AMPLITUDE, BURST_SAMPLES, RATE, TENTH, TENTH_TONE_HZ, TONE_HZ

WINDOW = RATE // 100  # 10 ms windows, as the spec reads it
# A window is in a burst when its energy (mean square) is over half the steady tone's: -3 dB. Opus keeps a
# tone's level within a dB at the rates camrelay encodes at, and its silence far below this.
THRESHOLD = (AMPLITUDE**2 / 2) / 2
# A "burst" that lasts more than this many windows is not one (a tone held, noise): no onset is reported.
MAX_BURST_WINDOWS = 3 * BURST_SAMPLES // WINDOW
# The frequency that tells a tenth burst (2 kHz) from the others (1 kHz): halfway between them.
TENTH_ABOVE_HZ = (TONE_HZ + TENTH_TONE_HZ) / 2
VIDEO_NEAR = 0.1  # seconds: video frames received this close to an onset are "received at the same time"


@dataclass(frozen=True, slots=True)
class Onset:
    """One burst heard: when its onset was received, where it starts in the received audio, its frequency."""

    received: float  # wall clock (seconds) when the window that crossed the threshold was received: R
    sample: int  # the crossing window's first sample, counted from the first sample the reader was given
    hz: float  # the burst's frequency, by its zero crossings

    @property
    def k(self) -> int:
        """The burst it belongs to: the second of the capture clock it started at (latency under a second)."""
        return math.floor(self.received)

    @property
    def latency_ms(self) -> float:
        return (self.received - self.k) * 1000

    @property
    def tenth(self) -> bool:
        """It sounds like a tenth burst (2 kHz)."""
        return self.hz > TENTH_ABOVE_HZ

    @property
    def slipped(self) -> bool:
        """Its tone is not the one burst ``k`` has: the latency is a second (or more) off what it reads."""
        return self.tenth != (self.k % TENTH == 0)


class BurstReader:
    """Finds burst onsets in received audio, fed chunk by chunk (``feed``); windows run across chunks."""

    def __init__(self) -> None:
        self.samples = 0  # samples fed so far
        self.windows = 0  # whole windows read so far
        self._pending = np.zeros(0, dtype=np.float64)  # fed samples not yet in a whole window
        self._burst: list[np.ndarray] = []  # the windows of the burst being heard
        self._onset: tuple[float, int] | None = None  # (received, sample) of its crossing window

    def feed(self, received: float, samples: np.ndarray) -> list[Onset]:
        """The onsets of the bursts that ended within these samples (mono), received at ``received`` (seconds,
        the wall clock); a burst is reported once it is over, its frequency known."""
        self.samples += len(samples)
        data = np.concatenate([self._pending, np.asarray(samples, dtype=np.float64)])
        whole = len(data) // WINDOW * WINDOW
        self._pending = data[whole:]
        found = []
        for window in data[:whole].reshape(-1, WINDOW):
            loud = float(np.mean(window**2)) > THRESHOLD
            if loud:
                if self._onset is None:
                    self._onset = (received, self.windows * WINDOW)
                self._burst.append(window)
            elif self._onset is not None:
                onset = self._end()
                if onset is not None:
                    found.append(onset)
            self.windows += 1
        return found

    def _end(self) -> Onset | None:
        assert self._onset is not None
        (received, sample), burst = self._onset, self._burst
        self._onset, self._burst = None, []
        if len(burst) > MAX_BURST_WINDOWS:
            return None
        sound = np.concatenate(burst)
        crossings = np.count_nonzero(np.signbit(sound[:-1]) != np.signbit(sound[1:]))
        return Onset(received, sample, float(crossings * RATE / (2 * len(sound))))


def consecutive(onsets: list[Onset]) -> list[Onset]:
    """The longest run of onsets whose ``k`` follow one another (one burst each second, none missed)."""
    best: list[Onset] = []
    run: list[Onset] = []
    for onset in onsets:
        run = run + [onset] if run and onset.k == run[-1].k + 1 else [onset]
        if len(run) > len(best):
            best = run
    return best


@dataclass(frozen=True, slots=True)
class LipSync:
    """One onset beside the video received at the same time."""

    received: float  # R, seconds
    audio_ms: float  # the onset's audio latency
    video_ms: float  # the median latency of the video frames received within VIDEO_NEAR of it

    @property
    def lip_sync_ms(self) -> float:
        """Audio latency minus video latency: positive, the sound is late."""
        return self.audio_ms - self.video_ms


def lip_sync(onsets: list[Onset], video: list[tuple[float, float]], near: float = VIDEO_NEAR) -> list[LipSync]:
    """Each onset with the video latency of the frames received within ``near`` seconds of it (``video``: each
    frame's (received, latency ms), as the pixel clock reads it); onsets with no such frame are left out."""
    out = []
    for onset in onsets:
        around = [latency for received, latency in video if abs(received - onset.received) <= near]
        if around:
            out.append(LipSync(onset.received, onset.latency_ms, float(np.median(around))))
    return out


def drift_ms(times: list[float], values: list[float]) -> float | None:
    """How far ``values`` (ms) moved over the span of ``times`` (seconds), by a least-squares line: its rise from
    the first time to the last. None with fewer than two points."""
    if len(times) < 2 or max(times) == min(times):
        return None
    slope = float(np.polyfit(np.asarray(times) - times[0], np.asarray(values), 1)[0])
    return slope * (max(times) - min(times))


def file_sync_ms(onset: float, video: list[tuple[float, int]]) -> float | None:
    """Lip sync read from a recording or a reader's demuxed stream, where both tracks share one timeline: a burst
    onset at ``onset`` (seconds on that timeline) placed on the capture clock by the video frame nearest it
    (``video``: each frame's (time on the timeline, capture ms its pixel clock shows)), minus the whole second the
    burst belongs to. Positive: the sound is late against the picture. None without video."""
    if not video:
        return None
    at, clock = min(video, key=lambda v: abs(v[0] - onset))
    placed = clock + (onset - at) * 1000
    return placed - round(placed / 1000) * 1000
