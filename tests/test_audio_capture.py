"""A stream's sound in its worker: the test sound paced by the clock, its pts, one Opus encoder, the audio thread
that retries a failing source while it never stops (relay/camera/audio.py)."""

from __future__ import annotations

import logging
import threading

import av
import numpy as np
import pytest

from benchmarks.bursts import WINDOW, BurstReader
from relay import ipc
from relay.backoff import Backoff, Retry
from relay.camera import audio as camera_audio
from relay.camera.audio import (
    BLOCK_SAMPLES,
    MAX_LATE,
    RATE,
    AudioPipeline,
    OpusEncoder,
    SampleClock,
    open_audio_source,
)
from relay.camera.capture import SourceError
from relay.camera.testsound import render

K = 1_795_310_641  # a second of the capture clock
DEADLINE = 10.0  # seconds a test waits for what it counts: a guard, not a measurement
LOOKAHEAD = 120  # libopus's look-ahead in its low-delay mode: 2.5 ms at 48 kHz


class Clock:
    """An injected wall clock that never waits: reads find their block already due."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_test_sound_hands_over_contiguous_20_ms_blocks_stamped_with_their_first_samples_capture_time():
    clock = Clock(K - 0.01)
    source = camera_audio.TestSoundSource(clock)
    source.open()
    first = round((K - 0.01) * RATE)
    blocks = []
    for _ in range(5):
        clock.now += 0.02  # each block is due 20 ms after the one before
        blocks.append(source.read())
    assert [round(b.capture_time * RATE) for b in blocks] == [first + i * BLOCK_SAMPLES for i in range(5)]
    assert all(b.samples.shape == (BLOCK_SAMPLES, 1) and b.samples.dtype == np.int16 for b in blocks)
    assert np.array_equal(np.concatenate([b.samples[:, 0] for b in blocks]), render(first, 5 * BLOCK_SAMPLES))
    assert source.overruns == 0


def test_a_test_sound_read_too_late_skips_what_it_missed_as_a_device_overruns():
    clock = Clock(K)
    source = camera_audio.TestSoundSource(clock)
    source.open()
    assert round(source.read().capture_time * RATE) == K * RATE
    clock.now += MAX_LATE  # just in time: nothing is lost, the next block comes at once
    assert round(source.read().capture_time * RATE) == K * RATE + BLOCK_SAMPLES
    clock.now += 1.0  # a second more behind: the blocks no one read in time are gone, up to the one due now
    block = source.read()
    assert source.overruns == 57
    assert round(block.capture_time * RATE) + BLOCK_SAMPLES == round(clock.now * RATE)


def test_a_closed_test_sound_ends_its_pending_read():
    source = camera_audio.TestSoundSource()
    source.open()
    source.close()
    with pytest.raises(SourceError, match="test sound closed"):
        source.read()


def test_the_sample_clock_runs_on_from_block_to_block_and_jumps_only_with_a_gap():
    clock = SampleClock()
    assert clock.pts(K, 960) == K * RATE
    assert clock.pts(K + 0.0203, 960) == K * RATE + 960  # a device's jitter: the samples run on
    assert clock.pts(K + 0.03, 960) == K * RATE + 1920  # ahead of their capture times: never back
    assert clock.pts(K + 1.0, 960) == (K + 1) * RATE  # a gap (samples lost, a reopen): the pts jump
    assert clock.anchors == 2


def test_opus_packets_carry_the_pts_a_receiver_decodes_their_first_sample_at():
    encoder = OpusEncoder(1)
    assert (encoder.channels, encoder.bitrate) == (1, 48_000)
    start = K * RATE - 5 * BLOCK_SAMPLES
    packets = []
    # Blocks of any size: 20 ms packets come out, each at its own pts.
    for offset, size in ((0, 700), (700, 2000), (2700, 2100), (4800, 3 * RATE)):
        block = render(start + offset, size).reshape(-1, 1)
        packets += encoder.encode(block, start + offset)
    assert [pts for _, pts in packets] == [start - LOOKAHEAD + i * 960 for i in range(len(packets))]
    assert len(packets) == (4800 + 3 * RATE) // 960
    # Decoded, each burst is where its pts say: the reading of the spec finds them all, 1 kHz and 2 kHz.
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate, decoder.layout, decoder.format = RATE, "mono", "s16"
    reader, onsets = BurstReader(), []
    for data, pts in packets:
        for frame in decoder.decode(av.Packet(data)):
            samples = frame.to_ndarray().reshape(-1)
            onsets += reader.feed((pts + len(samples)) / RATE, samples)
    assert [(o.k, o.tenth) for o in onsets] == [(K, False), (K + 1, False), (K + 2, False)]
    for onset in onsets:  # the window that crosses is within a window (10 ms) of the burst's first sample
        captured = start - LOOKAHEAD + onset.sample
        assert abs(captured - onset.k * RATE) < WINDOW


def test_a_gap_in_the_pts_drops_the_part_frame_before_it():
    encoder = OpusEncoder(2)
    assert encoder.bitrate == 96_000
    silence = np.zeros((500, 2), dtype=np.int16)
    assert encoder.encode(silence, 0) == []
    packets = encoder.encode(np.zeros((960, 2), dtype=np.int16), 10_000)  # the 500 before are lost with the gap
    assert [pts for _, pts in packets] == [10_000 - LOOKAHEAD]
    with pytest.raises(ValueError, match="Opus takes 1 or 2 channels here, not 6"):
        OpusEncoder(6)
    with pytest.raises(ValueError, match="unknown audio source 'alsa'"):
        open_audio_source("alsa")


class FailingSource:
    """A device that will not open (the ALSA card unplugged), ``failures`` times; then the test sound."""

    channels, name, overruns = 1, "flaky", 0

    def __init__(self, failures: list[int]) -> None:
        self._failures = failures

    def open(self) -> None:
        if self._failures[0] > 0:
            self._failures[0] -= 1
            raise SourceError("no such device")

    def read(self):
        raise AssertionError("never read: it did not open")

    def close(self) -> None:
        pass


def test_the_audio_thread_logs_a_failing_source_once_a_failure_and_retries_it_with_backoff(caplog):
    failures = [2]
    messages: list[bytes] = []
    got = threading.Event()

    def source():
        return FailingSource(failures) if failures[0] else camera_audio.TestSoundSource()

    def emit(data: bytes) -> None:
        messages.append(data)
        if len(messages) >= 10:
            got.set()

    retry = Retry(Backoff(initial=0.01, cap=0.02, jitter=0.0))
    audio = AudioPipeline("cam9", source, emit, retry)
    with caplog.at_level(logging.INFO, logger="relay.camera.audio"):
        audio.start()
        try:
            assert got.wait(DEADLINE), f"{len(messages)} audio packets"
        finally:
            audio.stop()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines == [
        "stream=cam9 audio error: no such device; retry 1 in 0.0s",
        "stream=cam9 audio error: no such device; retry 2 in 0.0s",
    ]
    status = audio.status()
    assert (status["audio_source_errors"], status["audio_last_error"], status["audio_state"]) == (
        2, "no such device", "live",
    )  # fmt: skip
    assert (status["audio"], status["audio_codec"], status["audio_channels"]) == ("test sound", "opus", 1)
    decoded = ipc.parse(b"".join(messages))[0]
    assert {m.kind for m in decoded} == {ipc.AUDIO}
    assert np.all(np.diff([m.pts for m in decoded]) == 960)  # one run of 20 ms packets, none missing
    assert all(m.capture_time == m.pts / RATE for m in decoded)
    assert status["audio_frames_captured"] >= len(decoded)
