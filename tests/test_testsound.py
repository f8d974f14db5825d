"""The test pattern's sound, sample by sample, against the spec (shared/spec/test-pattern.md, "Sound")."""

import numpy as np
import pytest

from relay.camera import testsound
from relay.camera.testsound import AMPLITUDE, BURST_SAMPLES, FADE_SAMPLES, RATE, render, sample_at

K = 1_795_310_649  # a real second of the capture clock (k % 10 == 9: its burst is 1 kHz, the next one 2 kHz)
ONSET = K * RATE  # the sample whose capture time is K * 1000 ms


def zero_crossings(x: np.ndarray) -> int:
    return int(np.count_nonzero(np.signbit(x[:-1]) != np.signbit(x[1:])))


def test_the_burst_starts_at_the_sample_captured_at_the_whole_second_and_lasts_100_ms():
    assert sample_at(K) == ONSET and sample_at(K + 0.5 / RATE - 1e-9) == ONSET
    around = render(ONSET - RATE // 2, RATE)  # half a second either side of the onset
    sound = np.flatnonzero(around)
    onset = RATE // 2
    assert sound[0] == onset + 1  # the sample at the onset is the fade's zero
    assert sound[-1] < onset + BURST_SAMPLES  # and it is over 100 ms later
    assert not around[:onset].any() and not around[onset + BURST_SAMPLES :].any()  # silence either side


def test_the_tone_is_1_khz_at_minus_6_dbfs_with_5_ms_linear_fades():
    burst = render(ONSET, BURST_SAMPLES).astype(np.float64)
    steady = burst[FADE_SAMPLES:-FADE_SAMPLES]
    assert zero_crossings(burst) in (199, 200)  # 100 ms of 1 kHz: two crossings a period
    assert np.abs(steady).max() == pytest.approx(AMPLITUDE, abs=1)
    assert 20 * np.log10(np.abs(steady).max() / testsound.FULL_SCALE) == pytest.approx(-6.0, abs=0.01)
    assert np.sqrt(np.mean(steady**2)) == pytest.approx(AMPLITUDE / np.sqrt(2), rel=1e-3)
    # Linear fades: each peak of the fade in (a quarter period after each zero, j = 12, 60, 108, ...) is the
    # amplitude times j / FADE_SAMPLES; the fade out mirrors it.
    peaks = np.arange(12, FADE_SAMPLES, 48)
    assert burst[peaks] == pytest.approx(AMPLITUDE * peaks / FADE_SAMPLES, abs=1)
    assert -burst[BURST_SAMPLES - peaks] == pytest.approx(AMPLITUDE * peaks / FADE_SAMPLES, abs=1)


def test_every_tenth_burst_is_2_khz():
    assert [testsound.tone_of(k) for k in range(K - 1, K + 3)] == [1000, 1000, 2000, 1000]
    tenth = render((K + 1) * RATE, BURST_SAMPLES)
    assert zero_crossings(tenth) in (399, 400)
    assert np.abs(tenth).max() == pytest.approx(AMPLITUDE, abs=1)


@pytest.mark.parametrize("cut", [1, 240, 479, 960, 2400, 4799])
def test_a_burst_split_across_blocks_is_the_same_burst(cut):
    start = ONSET - 960
    whole = render(start, 6720)
    assert np.array_equal(np.concatenate([render(start, cut), render(start + cut, 6720 - cut)]), whole)
    assert render(start, 0).size == 0
    with pytest.raises(ValueError, match="a block cannot have -1 samples"):
        render(start, -1)
