"""The test pattern's sound (``shared/spec/test-pattern.md``, "Sound"): a tone burst at every whole second.

Sans-io: a block's first sample and its length in, its 48 kHz samples out. A
sample is named by its number on the capture clock, ``round(capture_time *
RATE)`` (``sample_at``): the same wall clock the pixel clock stamps each frame
with, so burst ``k`` starts at the sample whose capture time is ``k * 1000`` ms
exactly, sample ``k * RATE``. Silence in between, so anything that hears the
sound (an aiortc viewer, a browser, a recording) reads the audio latency and
the lip sync against the pixels without trusting any metadata.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

RATE = 48_000  # samples a second: Opus's own rate, and the spec's
BURST_SAMPLES = RATE // 10  # 100 ms
FADE_SAMPLES = RATE * 5 // 1000  # 5 ms linear fade in and out: no click a reader would take for an onset
LEVEL_DBFS = -6.0  # the tone's peak amplitude, relative to full scale
FULL_SCALE = 32767  # signed 16-bit PCM
AMPLITUDE = FULL_SCALE * 10 ** (LEVEL_DBFS / 20)
TONE_HZ = 1000
TENTH_TONE_HZ = 2000  # every tenth burst (k % 10 == 0): a reader can tell a one-second slip from none
TENTH = 10


def sample_at(capture_time: float) -> int:
    """The number of the sample captured at ``capture_time`` (seconds since the epoch, the wall clock)."""
    return round(capture_time * RATE)


def tone_of(k: int) -> int:
    """The frequency (Hz) of burst ``k``, the one that starts at second ``k`` of the capture clock."""
    return TENTH_TONE_HZ if k % TENTH == 0 else TONE_HZ


def render(first: int, count: int) -> np.ndarray:
    """The ``count`` samples from sample number ``first`` on (signed 16-bit, mono)."""
    import numpy as np  # loaded by the workers that carry sound only

    if count < 0:
        raise ValueError(f"a block cannot have {count} samples")
    start = first % RATE
    if start >= BURST_SAMPLES and start + count <= RATE:
        return np.zeros(count, dtype=np.int16)  # within one second's silence: nine blocks in ten, at no cost
    n = np.arange(first, first + count, dtype=np.int64)
    k = n // RATE
    j = n - k * RATE  # the sample's place in its second: small, so the phase is exact for any epoch
    out = np.zeros(count, dtype=np.int16)
    burst = j < BURST_SAMPLES
    jb = j[burst].astype(np.float64)
    hz = np.where(k[burst] % TENTH == 0, TENTH_TONE_HZ, TONE_HZ)
    envelope = np.minimum(1.0, np.minimum(jb, BURST_SAMPLES - jb) / FADE_SAMPLES)
    out[burst] = np.round(AMPLITUDE * envelope * np.sin(2 * np.pi * hz * jb / RATE)).astype(np.int16)
    return out
