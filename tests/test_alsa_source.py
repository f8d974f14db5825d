"""Sound from ALSA capture devices: the real ALSA library (PyAV's), on PCMs this test's own ALSA configuration
defines, and a relay whose camera's sound device is missing.

This machine has no sound card. ALSA's ``file`` plugin stands in for one: it
captures the samples of a file of the test's, through the same ``alsa`` input
a capture card's USB audio is read with. A device that only captures 44.1 kHz,
or only mono, is that PCM opened so; nothing else is faked.
"""

from __future__ import annotations

import asyncio
import errno
import time
from pathlib import Path

import numpy as np
import pytest

from relay.camera.alsasource import AlsaSource, open_alsa
from relay.camera.audio import RATE, open_audio_source
from relay.camera.capture import SourceError
from relay.config import StreamConfig
from relay.source import SourceSpec, audio_source, parse_source_spec
from relay.webrtc.whepclient import WhepViewer

from .conftest import make_config, start_relay

TONE_HZ = 1000
AMPLITUDE = 16384  # -6 dBFS
DEADLINE = 40.0  # seconds a test waits for what it counts: a guard, not a measurement


def _tone(rate: int, seconds: float, channels: int) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    mono = np.round(AMPLITUDE * np.sin(2 * np.pi * TONE_HZ * t)).astype("<i2")
    return np.repeat(mono[:, None], channels, axis=1).tobytes()


@pytest.fixture(scope="module")
def alsa_pcms(tmp_path_factory):
    """An ALSA configuration with the system's own (for ``hw`` and ``null``) and two PCMs that capture files:
    ``camtest`` a 1 kHz tone recorded at 48 kHz stereo, ``camtest441`` the same tone at 44.1 kHz."""
    root = tmp_path_factory.mktemp("alsa")
    system = Path("/usr/share/alsa/alsa.conf")
    if not system.is_file():
        pytest.skip("no ALSA configuration on this machine (libasound2-data)")
    lines = [f"<{system}>"]
    for name, rate, channels in (("camtest", 48000, 2), ("camtest441", 44100, 2)):
        data = root / f"{name}.raw"
        data.write_bytes(_tone(rate, 2.0, channels))
        lines.append(f'pcm.{name} {{ type file; slave.pcm "null"; file "/dev/null"; infile "{data}"; format "raw" }}')
    conf = root / "asound.conf"
    conf.write_text("\n".join(lines) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALSA_CONFIG_PATH", str(conf))
        yield


def _read(source: AlsaSource, samples: int) -> tuple[list[float], np.ndarray]:
    times, blocks, have = [], [], 0
    while have < samples:
        block = source.read()
        assert block.samples.dtype == np.int16 and block.samples.shape[1] == source.channels
        times.append(block.capture_time)
        blocks.append(block.samples)
        have += len(block.samples)
    return times, np.concatenate(blocks)


def _peak_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples[:, 0].astype(float)))
    return float(np.argmax(spectrum) * RATE / len(samples))


def test_a_capture_device_is_read_at_48_khz_in_stereo_with_wall_clock_capture_times(alsa_pcms):
    source = open_audio_source("alsa:camtest")
    assert isinstance(source, AlsaSource) and source.name == "alsa:camtest"
    source.open()
    try:
        times, samples = _read(source, RATE // 2)
    finally:
        source.close()
    assert (source.channels, source.rate) == (2, RATE)
    assert round(_peak_hz(samples)) == TONE_HZ
    assert np.array_equal(samples[:, 0], samples[:, 1])  # the file's two channels, as recorded
    assert 0.9 * AMPLITUDE <= np.abs(samples).max() <= AMPLITUDE
    assert times == sorted(times)
    # The clock the video's capture times are on (time.time()), not the monotonic one: the same day, not years off.
    assert abs(times[-1] - time.time()) < 3600


def test_a_device_that_captures_only_44_1_khz_is_resampled_to_48(alsa_pcms):
    source = AlsaSource("camtest441", lambda pcm, options: open_alsa(pcm, {**options, "sample_rate": "44100"}))
    source.open()
    try:
        _, samples = _read(source, RATE // 2)
    finally:
        source.close()
    assert source.rate == 44100
    assert round(_peak_hz(samples[: RATE // 2]), -1) == TONE_HZ  # still 1 kHz: resampled, not played fast


def test_a_microphone_without_stereo_is_opened_in_mono(alsa_pcms):
    asked = []

    def mono_only(pcm: str, options: dict[str, str]):
        asked.append(options["channels"])
        if options["channels"] != "1":
            raise OSError(errno.EINVAL, "Invalid argument")
        return open_alsa(pcm, options)

    source = AlsaSource("camtest441", mono_only)
    source.open()
    try:
        _, samples = _read(source, RATE // 10)
    finally:
        source.close()
    assert asked == ["2", "1"] and source.channels == 1 and samples.shape[1] == 1


def test_a_missing_device_is_a_source_error_that_names_it(alsa_pcms):
    source = AlsaSource("hw:CARD=NoSuchCard,DEV=0")
    with pytest.raises(SourceError) as err:
        source.open()
    assert "alsa:hw:CARD=NoSuchCard,DEV=0 cannot be opened (2 channels:" in str(err.value)
    assert "; 1 channels:" in str(err.value)
    with pytest.raises(SourceError):
        source.read()  # never opened: an error, not a crash


def test_closed_from_another_thread_the_next_read_is_a_source_error(alsa_pcms):
    source = open_audio_source("alsa:camtest")
    source.open()
    source.read()
    source.close()
    with pytest.raises(SourceError, match="closed"):
        source.read()


@pytest.mark.parametrize(
    "spec, enabled, paired, expected",
    [
        ("v4l2:/dev/video0", True, "hw:CARD=C920,DEV=0", "alsa:hw:CARD=C920,DEV=0"),  # its USB device's sound
        ("v4l2:/dev/video0", True, "", ""),  # a camera with no microphone
        ("v4l2:/dev/video0", False, "hw:CARD=C920,DEV=0", ""),  # [audio] enabled = false
        ("v4l2:/dev/video0#audio=off", True, "hw:CARD=C920,DEV=0", ""),
        ("v4l2:/dev/video0#audio=on", False, "hw:CARD=C920,DEV=0", "alsa:hw:CARD=C920,DEV=0"),
        ("v4l2:/dev/video0#audio=alsa:hw:CARD=MS2109,DEV=0", True, "hw:CARD=C920,DEV=0", "alsa:hw:CARD=MS2109,DEV=0"),
        ("rtsp://cam/x#audio=alsa:plughw:1,0", False, "", "alsa:plughw:1,0"),  # named: whatever enabled says
        ("test:#audio=alsa:dsnoop_mic", True, "", "alsa:dsnoop_mic"),  # a PCM the ALSA configuration defines
    ],
)
def test_which_sound_a_stream_carries(spec, enabled, paired, expected):
    assert audio_source(parse_source_spec(spec), enabled, paired) == expected


@pytest.mark.parametrize(
    "fragment",
    [
        "alsa:",
        "alsa:file:/tmp/x",  # a plugin with arguments: it would write a file
        "alsa:hw:CARD=C920,DEV=0,EXTRA=1",
        "alsa:hw:CARD=C9 20",
        "alsa:'hw:0'",
        "pulse:default",
    ],
)
def test_an_audio_option_that_names_no_capture_device_is_refused_with_the_reason(fragment):
    with pytest.raises(ValueError, match="#audio=") as err:
        parse_source_spec(f"test:#audio={fragment}")
    if fragment.startswith("alsa:"):
        assert "camrelay devices" in str(err.value)


async def test_a_missing_sound_device_is_retried_while_the_video_plays(http):
    streams = (StreamConfig("cam0", SourceSpec("test", "", audio="alsa:hw:CARD=NoSuchCard,DEV=0")),)
    runner, relay = await start_relay(make_config(streams))
    viewer = WhepViewer(relay.whep(), http)
    try:
        await viewer.connect()
        frames = await viewer.read_frames(30)
        assert len(frames) == 30
        deadline = time.monotonic() + DEADLINE
        while True:
            async with http.get(relay.base + "/api/v1/streams") as resp:
                audio = (await resp.json())["streams"][0]["audio"]
            if audio["source_errors"] >= 2:
                break
            assert time.monotonic() < deadline, audio
            await asyncio.sleep(0.2)
        assert audio["source"] == "alsa:hw:CARD=NoSuchCard,DEV=0" and audio["state"] in ("retrying", "starting")
        assert "alsa:hw:CARD=NoSuchCard,DEV=0 cannot be opened" in audio["last_error"]
        assert len(await viewer.read_frames(30)) == 30  # still playing
        assert relay.relay.streams["cam0"].status().state == "live"
    finally:
        await viewer.close()
        await runner.cleanup()
