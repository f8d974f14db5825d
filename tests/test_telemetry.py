"""Telemetry: sysfs readers on a fake tree (real files), the throttling word, the
Prometheus output parsed by Prometheus' own parser, and the live endpoints."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.config import TelemetryConfig
from relay.status import StreamStatus as StreamSample
from relay.telemetry import (
    Snapshot,
    ThermalZone,
    decode_throttled,
    prometheus,
    read_thermal,
    read_throttled,
)

from .conftest import make_config, start_relay


def fake_sys(tmp_path: Path, zones: dict[str, tuple[str, str]], throttled: str | None = None) -> Path:
    root = tmp_path / "sys"
    for name, (kind, temp) in zones.items():
        zone = root / "class" / "thermal" / name
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(temp + "\n")
    if throttled is not None:
        path = root / "devices/platform/soc/soc:firmware/get_throttled"
        path.parent.mkdir(parents=True)
        path.write_text(throttled + "\n")
    return root


def test_thermal_zones_are_read_in_order_and_bad_ones_skipped(tmp_path):
    root = fake_sys(
        tmp_path,
        {
            "thermal_zone0": ("cpu-thermal", "52100"),
            "thermal_zone10": ("gpu", "48000"),
            "thermal_zone2": ("broken", "n/a"),
            "thermal_zone1": ("rp1_adc", "41500"),
        },
    )
    assert read_thermal(root) == [
        ThermalZone("thermal_zone0", "cpu-thermal", 52.1),
        ThermalZone("thermal_zone1", "rp1_adc", 41.5),
        ThermalZone("thermal_zone10", "gpu", 48.0),
    ]
    assert read_thermal(tmp_path / "nothing") == []


def test_soc_temperature_prefers_the_cpu_zone():
    zones = [ThermalZone("thermal_zone0", "wifi", 70.0), ThermalZone("thermal_zone1", "cpu-thermal", 55.0)]
    assert Snapshot(thermal=zones).temperature == 55.0
    assert Snapshot(thermal=[ThermalZone("z", "board", 40.0), ThermalZone("y", "pmic", 45.0)]).temperature == 45.0
    assert Snapshot().temperature is None


def test_throttled_word_is_decoded():
    flags = decode_throttled(0x50005)
    assert flags["under_voltage"] and flags["throttled"] and not flags["arm_frequency_capped"]
    assert flags["under_voltage_occurred"] and flags["throttled_occurred"]
    assert not flags["soft_temperature_limit_occurred"]
    assert not any(decode_throttled(0).values())


def test_throttled_from_sysfs_then_vcgencmd_then_nothing(tmp_path):
    assert read_throttled(fake_sys(tmp_path / "a", {}, throttled="50005"), vcgencmd="") == 0x50005
    script = tmp_path / "vcgencmd"
    script.write_text("#!/bin/sh\necho throttled=0x80008\n")
    script.chmod(0o755)
    assert read_throttled(tmp_path / "none", vcgencmd=str(script)) == 0x80008
    assert read_throttled(tmp_path / "none", vcgencmd="") is None


SAMPLE = StreamSample(
    name="cam0", state="live", mode="transcode", viewers=3,
    capture_fps=30.0, encoded_fps=29.9, bitrate_bps=2_000_000, encode_ms=8.5,
    keyframes_forced=4, frames_dropped={"encoder_busy": 1, "corrupt": 2, "viewer_lag": 0}, worker_restarts=1,
    source_errors=2,
)  # fmt: skip


def test_prometheus_text_parses_with_conventional_names():
    snap = Snapshot(
        cpu_percent=25.0,
        cpu_count=4,
        load=(0.5, 0.4, 0.3),
        memory_total=8 << 30,
        memory_available=6 << 30,
        rss={"relay": 100 << 20, "mediamtx": 30 << 20},
        thermal=[ThermalZone("thermal_zone0", "cpu-thermal", 52.5)],
        throttled=decode_throttled(0x4),
        streams=[SAMPLE],
    )
    families = {f.name: f for f in text_string_to_metric_families(prometheus(snap))}
    value = {f.name: {tuple(sorted(s.labels.items())): s.value for s in f.samples} for f in families.values()}
    assert value["camrelay_cpu_usage_ratio"][()] == 0.25
    assert value["camrelay_temperature_celsius"][(("type", "cpu-thermal"), ("zone", "thermal_zone0"))] == 52.5
    assert value["camrelay_throttled"][(("flag", "throttled"),)] == 1
    assert value["camrelay_stream_viewers"][(("stream", "cam0"),)] == 3
    assert value["camrelay_stream_bitrate_bits_per_second"][(("stream", "cam0"),)] == 2_000_000
    assert value["camrelay_stream_encode_seconds"][(("stream", "cam0"),)] == 0.0085
    assert families["camrelay_stream_frames_dropped"].type == "counter"
    assert value["camrelay_stream_frames_dropped"][(("reason", "corrupt"), ("stream", "cam0"))] == 2
    assert value["camrelay_process_resident_memory_bytes"][(("process", "mediamtx"),)] == 30 << 20


def test_status_line_reads_at_a_glance():
    snap = Snapshot(
        cpu_percent=23.4,
        load=(0.51, 0, 0),
        memory_available=512 << 20,
        rss={"relay": 90 << 20},
        thermal=[ThermalZone("z0", "cpu-thermal", 61.25)],
        throttled=decode_throttled(0x1),
        streams=[SAMPLE],
    )
    line = snap.log_line()
    assert line.startswith("status cpu=23% load=0.51 mem_free=512MiB temp=61.2C rss=90MiB THROTTLED=under_voltage")
    assert "| stream=cam0 live mode=transcode fps=29.9 kbps=2000 viewers=3 encode_ms=8.5 dropped=3" in line


@pytest.mark.relay_config(rtsp=True)
async def test_status_and_metrics_endpoints(relay_server, http, tmp_path):
    relay = relay_server.relay
    relay.telemetry.sys_root = fake_sys(tmp_path, {"thermal_zone0": ("cpu-thermal", "47000")}, throttled="0")
    relay.telemetry.latest = relay.telemetry.sample()  # a sample now, from the fake tree
    async with http.get(relay_server.base + "/api/v1/status") as resp:
        assert resp.status == 200
        status = await resp.json()
    system = status["system"]
    for key in (
        "cpu_percent",
        "load",
        "memory_total_bytes",
        "memory_available_bytes",
        "temperature_celsius",
        "throttled",
    ):
        assert key in system, key
    assert system["temperature_celsius"] == 47.0 and system["throttled"]["under_voltage"] is False
    assert set(status["processes"]) == {"relay", "worker-cam0", "mediamtx"}
    assert all(p["rss_bytes"] > 1 << 20 for p in status["processes"].values())
    own = status["relay"]  # what a leak would grow: the status shows it
    assert 3 < own["open_fds"] <= psutil.Process().num_fds()  # sampled just now, in this very process
    assert own["threads"] >= 1 and own["asyncio_tasks"] >= 2
    (cam,) = status["streams"]
    for key in ("capture_fps", "encoded_fps", "bitrate_bps", "encode_ms", "keyframes_forced", "frames_dropped",
                "viewers", "restarts", "state", "encoders_running", "rtsp_url"):  # fmt: skip
        assert key in cam, key
    assert status["rtsp"]["mediamtx_up"] is True
    async with http.get(relay_server.base + "/metrics") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    assert families["camrelay_temperature_celsius"].samples[0].value == 47.0
    assert families["camrelay_mediamtx_up"].samples[0].value == 1
    assert families["camrelay_stream_up"].samples[0].labels == {"stream": "cam0"}
    assert families["camrelay_open_fds"].samples[0].value > 0
    pipeline = {s.labels["quantile"]: s.value for s in families["camrelay_stream_pipeline_delay_seconds"].samples}
    # Over the frames so far, capture to the hub: how long is for the benchmarks to say (docs/benchmarks.md).
    assert set(pipeline) == {"0.5", "0.95", "0.99"} and 0 < pipeline["0.5"] <= pipeline["0.95"] <= pipeline["0.99"]
    assert families["camrelay_asyncio_tasks"].samples[0].value >= 2


def test_thermal_guard_steps_down_then_back_up_with_hysteresis():
    from relay.telemetry import ThermalGuard

    guard = ThermalGuard(limit=70.0, full_fps=30.0)
    assert guard.update(None) is None and guard.update(65.0) is None
    assert [guard.update(75.0) for _ in range(7)] == [22, 16, 12, 9, 7, 5, None]  # never below 5 fps
    assert guard.update(68.0) is None  # cooler, but inside the 5 degree hysteresis
    assert [guard.update(60.0) for _ in range(8)] == [7, 9, 12, 16, 21, 28, 30, None]


async def wait_for_stat(stream, field, target, timeout=10.0):
    deadline = time.monotonic() + timeout
    while getattr(stream.stats, field) < target:
        assert time.monotonic() < deadline, f"{field} did not reach {target}"
        await asyncio.sleep(0.05)


async def next_report(stream, timeout: float = 10.0) -> int:
    """Until the worker's next status report (its counters, such as ``frames_captured``, come only with those);
    the thermal drops it reports."""
    captured = stream.stats.frames_captured
    deadline = time.monotonic() + timeout
    while stream.stats.frames_captured == captured:
        assert time.monotonic() < deadline, "no status report from the worker"
        await asyncio.sleep(0.02)
    return stream.stats.frames_dropped_thermal


async def test_thermal_guard_drops_frames_while_hot_and_none_once_cool(tmp_path):
    config = make_config(fps=15)
    runner, running = await start_relay(dataclasses.replace(config, telemetry=TelemetryConfig(thermal_limit=70.0)))
    relay = running.relay
    stream = relay.streams["cam0"]
    try:
        # The test takes the samples (through the telemetry's own hook), one at a time: its timer is stopped.
        await relay.telemetry.close()

        hot = fake_sys(tmp_path / "hot", {"thermal_zone0": ("cpu-thermal", "80000")})
        cool = fake_sys(tmp_path / "cool", {"thermal_zone0": ("cpu-thermal", "50000")})

        def sample(sys_root: Path) -> None:
            relay.telemetry.sys_root = sys_root
            for callback in relay.telemetry.on_sample:
                callback(relay.telemetry.sample())

        for _ in range(2):
            sample(hot)  # 15 -> 11 -> 8 fps
        guard = relay.thermal_guards["cam0"]
        assert guard.current == 8
        await wait_for_stat(stream, "frames_dropped_thermal", 10)  # about every other frame is skipped
        for _ in range(3):
            sample(cool)
        assert guard.current == 15
        # Full rate again: once the worker has the command, its reports show no new skipped frame, report after
        # report, while the stream goes on.
        dropped, deadline = await next_report(stream), time.monotonic() + 10
        while (now := await next_report(stream)) != dropped:
            assert time.monotonic() < deadline, "the worker still skips frames"
            dropped = now
        encoded = stream.stats.frames_encoded
        await wait_for_stat(stream, "frames_encoded", encoded + 30)
        assert await next_report(stream) == dropped and await next_report(stream) == dropped
    finally:
        await runner.cleanup()
