"""The reading of the test pattern's sound (benchmarks/bursts.py), with made-up received audio."""

import numpy as np
import pytest

from benchmarks.bursts import BurstReader, Onset, consecutive, drift_ms, lip_sync
from relay.camera.testsound import RATE, render

K = 1_795_310_641  # k % 10 == 1: bursts K+9 and K+19 are the tenth ones
CHUNK = 960  # 20 ms, as aiortc hands Opus frames on


def heard(first: int, seconds: float, latency: float, chunk: int = CHUNK) -> list[tuple[float, np.ndarray]]:
    """The test sound from sample ``first`` on, in chunks each received ``latency`` seconds after its last sample
    was captured."""
    out = []
    for start in range(first, first + round(seconds * RATE), chunk):
        out.append(((start + chunk) / RATE + latency, render(start, chunk)))
    return out


def read(chunks) -> list[Onset]:
    reader = BurstReader()
    return [onset for received, samples in chunks for onset in reader.feed(received, samples)]


def test_each_burst_is_found_once_with_its_k_tone_and_latency():
    onsets = read(heard(K * RATE - 2 * CHUNK, 12.5, latency=0.150))
    assert [o.k for o in onsets] == list(range(K, K + 13))
    assert [o.tenth for o in onsets] == [(o.k % 10 == 0) for o in onsets]
    assert [round(o.hz, -2) for o in onsets[8:11]] == [1000, 2000, 1000]
    assert not any(o.slipped for o in onsets)
    # The onset's window is whole with the 20 ms chunk that starts at the burst; it comes 150 ms after that.
    assert [o.latency_ms for o in onsets] == pytest.approx([170.0] * 13, abs=1e-3)
    assert [o.sample for o in onsets] == [2 * CHUNK + i * RATE for i in range(13)]


@pytest.mark.parametrize("chunk", [7 * 48, 441, 1024, 4800])
def test_windows_run_across_chunks_of_any_size(chunk):
    onsets = read(heard(K * RATE - 5000, 3.0, latency=0.0, chunk=chunk))
    assert [o.k for o in onsets] == [K, K + 1, K + 2]
    assert [o.sample % 480 for o in onsets] == [0, 0, 0]  # windows counted from the first sample fed
    assert all(0 <= o.latency_ms * RATE / 1000 - (o.sample + 480 - 5000) % RATE < chunk for o in onsets)


def test_a_latency_over_a_second_shows_as_a_slip_at_the_tenth_burst():
    onsets = read(heard(K * RATE, 12.0, latency=1.2))
    assert {o.k % 10 for o in onsets if o.slipped} == {0, 1}  # burst K+9 (2 kHz) read as K+10, K+10 as K+11
    assert len(consecutive(onsets)) == len(onsets)  # k still consecutive: only the tone tells


def test_a_tone_held_or_a_burst_missed():
    reader = BurstReader()
    tone = render(K * RATE, 4000)  # the steady part of a burst, held for 3 s
    held = np.tile(tone[500:3500], 48)
    assert reader.feed(1.0, held) == [] and reader.feed(4.0, np.zeros(960, dtype=np.int16)) == []
    onsets = read(heard(K * RATE, 5.0, 0.1))
    del onsets[2]  # burst K+2 lost: the first of the two longest runs
    assert [o.k for o in consecutive(onsets)] == [K, K + 1]


def test_lip_sync_is_the_audio_latency_less_the_video_received_at_the_same_time():
    onsets = [Onset(K + 0.120, 0, 1000.0), Onset(K + 1.130, RATE, 1000.0), Onset(K + 2.125, 2 * RATE, 1000.0)]
    video = [(K + 0.05, 90.0), (K + 0.10, 100.0), (K + 0.15, 110.0), (K + 1.125, 80.0), (K + 1.9, 70.0)]
    synced = lip_sync(onsets, video)
    assert [s.audio_ms for s in synced] == pytest.approx([120.0, 130.0], abs=1e-3)
    assert [s.video_ms for s in synced] == [100.0, 80.0]
    assert [s.lip_sync_ms for s in synced] == pytest.approx([20.0, 50.0], abs=1e-3)  # the third has no video near it


def test_drift_is_the_rise_of_a_fitted_line_over_the_run():
    times = [0.0, 1.0, 2.0, 3.0, 4.0]
    assert drift_ms(times, [10.0, 12.0, 11.0, 13.0, 14.0]) == pytest.approx(0.9 * 4)
    assert drift_ms([5.0], [1.0]) is None and drift_ms([1.0, 1.0], [1.0, 2.0]) is None


def test_file_sync_places_an_onset_by_the_nearest_frames_pixel_clock():
    from benchmarks.bursts import file_sync_ms

    # Frames every 1/30 s on the file's timeline; the one at 2.0 s shows capture time 1_000_000_500 ms.
    video = [(2.0 + i / 30, 1_000_000_500 + round(i * 1000 / 30)) for i in range(-30, 31)]
    assert file_sync_ms(2.5, video) == 0  # 500 ms after that frame: the whole second 1_000_001_000
    assert file_sync_ms(2.52, video) == pytest.approx(20, abs=1)  # 20 ms after it: the sound is late
    assert file_sync_ms(2.47, video) == pytest.approx(-30, abs=1)
    assert file_sync_ms(1.0, []) is None
