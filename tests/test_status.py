"""One status per stream: the API, the status line and /metrics show the same numbers, each counter in
/metrics is the API's, consumers included (WebRTC viewers, RTSP, WHIP, the recorder)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.ports import free_port
from relay.config import WhipConfig
from relay.status import ConsumerStats, Metric, StreamStatus
from relay.telemetry import Snapshot, prometheus

from .conftest import make_config, start_relay

DEADLINE = 30.0  # seconds for the relay to count what the test waits for: a deadline, not a measurement


def _api_counter(status: dict, sample) -> float | None:
    """The API's number for one counter sample of /metrics; None when the API has none."""
    if sample.name == "camrelay_mediamtx_restarts_total":
        return status["rtsp"]["mediamtx_restarts"]
    stream = {s["name"]: s for s in status["streams"]}[sample.labels["stream"]]
    whip = {w["url"]: w for w in stream["whip"]}.get(sample.labels.get("url"))
    recording = stream.get("recording", {})
    return {
        "camrelay_stream_keyframes_forced_total": lambda: stream["keyframes_forced"],
        "camrelay_stream_restarts_total": lambda: stream["restarts"],
        "camrelay_stream_worker_splits_total": lambda: stream["worker_splits"],
        "camrelay_stream_source_errors_total": lambda: stream["source_errors"],
        "camrelay_stream_frames_passed_through_total": lambda: stream["frames_passed_through"],
        "camrelay_stream_frames_decoded_total": lambda: stream["frames_decoded"],
        "camrelay_stream_keyframe_requests_ignored_total": lambda: stream["keyframe_requests_ignored"],
        "camrelay_stream_frames_dropped_total": lambda: stream["frames_dropped"][sample.labels["reason"]],
        "camrelay_stream_audio_frames_total": lambda: stream["audio"]["frames"],
        "camrelay_stream_audio_source_errors_total": lambda: stream["audio"]["source_errors"],
        "camrelay_stream_audio_restarts_total": lambda: stream["audio"]["restarts"],
        "camrelay_stream_audio_cpu_seconds_total": lambda: stream["audio"]["cpu_seconds"],
        "camrelay_stream_audio_frames_dropped_total": lambda: stream["audio"]["frames_dropped"][
            sample.labels["reason"]
        ],
        "camrelay_stream_gop_cache_starts_total": lambda: stream["gop_cache"]["starts"],
        "camrelay_stream_gop_cache_overflows_total": lambda: stream["gop_cache"]["overflows"],
        "camrelay_stream_fanout_delivered_total": lambda: stream["fanout"]["delivered"],
        "camrelay_stream_fanout_batched_total": lambda: stream["fanout"]["batched"],
        "camrelay_stream_fanout_resyncs_total": lambda: stream["fanout"]["resyncs"],
        "camrelay_stream_fanout_keyframe_requests_total": lambda: stream["fanout"]["keyframe_requests"],
        "camrelay_stream_fanout_keyframe_requests_coalesced_total": lambda: stream["fanout"][
            "keyframe_requests_coalesced"
        ],
        "camrelay_stream_fanout_retransmits_total": lambda: stream["fanout"]["retransmits"],
        "camrelay_stream_fanout_retransmits_refused_total": lambda: stream["fanout"]["retransmits_refused"],
        "camrelay_stream_keyframe_requests_total": lambda: stream["keyframe_requests"]["requests"],
        "camrelay_stream_keyframe_requests_merged_total": lambda: stream["keyframe_requests"]["merged"],
        "camrelay_stream_keyframe_shares_total": lambda: stream["keyframe_requests"]["shared"],
        "camrelay_stream_viewer_keyframe_requests_total": lambda: stream["keyframe_requests"]["viewers"],
        "camrelay_whip_sessions_total": lambda: whip["sessions"],
        "camrelay_whip_errors_total": lambda: whip["errors"],
        "camrelay_whip_sent_bytes_total": lambda: whip["bytes_sent"],
        "camrelay_recording_segments_total": lambda: recording["segments"],
        "camrelay_recording_snapshots_total": lambda: recording["snapshots"],
        "camrelay_recording_deleted_total": lambda: recording["deleted"],
        "camrelay_recording_disk_full_total": lambda: recording["disk_full"],
    }.get(sample.name, lambda: None)()


def _counters(text: str) -> list:
    return [s for f in text_string_to_metric_families(text) if f.type == "counter" for s in f.samples]


def test_a_status_shows_the_same_numbers_in_the_api_the_line_and_the_metrics():
    whip = ConsumerStats(
        {"whip": [{"url": "https://engine/...", "errors": 2}]},
        (Metric("camrelay_whip_errors_total", "counter", "WHIP errors.", 2, {"stream": "cam0"}),),
    )
    viewers = ConsumerStats({"viewers": 3, "viewers_connected": 2}, (), viewers=2)
    status = StreamStatus(
        "cam0", "live", keyframes_forced=4, worker_restarts=1, camera_restarts=2,
        frames_dropped={"encoder_busy": 1, "corrupt": 2, "viewer_lag": 3, "thermal": 5},
        consumers=[viewers, whip, ConsumerStats({"whip": [{"url": "https://other/..."}]})],
    )  # fmt: skip
    status.viewers = sum(c.viewers for c in status.consumers)
    api = status.api()
    assert api["frames_dropped"] == {"encoder_busy": 1, "corrupt": 2, "viewer_lag": 3, "thermal": 5}
    assert (api["viewers"], api["viewers_connected"], api["restarts"], api["worker_restarts"]) == (3, 2, 3, 1)
    assert (api["camera_restarts"], api["worker_moves"]) == (2, 0)
    assert [w["url"] for w in api["whip"]] == ["https://engine/...", "https://other/..."]  # every publisher's
    assert "viewers=2" in status.log_part() and "dropped=11" in status.log_part()
    families = {f.name: f for f in text_string_to_metric_families(prometheus(Snapshot(streams=[status])))}
    dropped = {s.labels["reason"]: s.value for s in families["camrelay_stream_frames_dropped"].samples}
    assert dropped == api["frames_dropped"]  # thermal too
    assert families["camrelay_stream_viewers"].samples[0].value == api["viewers_connected"]
    assert families["camrelay_whip_errors"].samples[0].value == 2


async def test_api_status_and_metrics_agree_on_every_counter(http, tmp_path: Path):
    config = make_config(rtsp=True)
    record = dataclasses.replace(config.record, enabled=True, root=str(tmp_path / "rec"), snapshot_interval=0.2)
    gone = f"http://127.0.0.1:{free_port()}/whip"  # nobody listens: each session attempt is a counted error
    config = dataclasses.replace(config, record=record, whip=(WhipConfig("cam0", gone),))
    runner, relay = await start_relay(config)
    try:
        recorder, publisher = relay.relay.recorders["cam0"], relay.relay.whip_publishers[0]
        deadline = time.monotonic() + DEADLINE
        while publisher.errors < 1 or recorder.snapshots_written < 1 or relay.relay.publishers["cam0"].published < 1:
            assert time.monotonic() < deadline, "the relay counted nothing to compare"
            await asyncio.sleep(0.05)

        async def get(path: str):
            async with http.get(relay.base + path) as resp:
                assert resp.status == 200
                return await (resp.json() if path.startswith("/api") else resp.text())

        before, metrics, after = await get("/api/v1/status"), await get("/metrics"), await get("/api/v1/status")
    finally:
        await runner.cleanup()
    counters = _counters(metrics)
    names = {s.name for s in counters}
    assert {
        "camrelay_whip_errors_total",
        "camrelay_recording_snapshots_total",
        "camrelay_mediamtx_restarts_total",
    } <= names
    for sample in counters:
        low, high = _api_counter(before, sample), _api_counter(after, sample)
        assert low is not None, f"{sample.name}{sample.labels} is in /metrics but not in /api/v1/status"
        assert low <= sample.value <= high, (sample.name, sample.labels, low, sample.value, high)
    (cam,) = after["streams"]
    reasons = {s.labels["reason"] for s in counters if s.name == "camrelay_stream_frames_dropped_total"}
    assert reasons == set(cam["frames_dropped"]) == {"encoder_busy", "corrupt", "viewer_lag", "thermal", "source_loss"}
    assert cam["rtsp_published"] > 0 and cam["whip"][0]["errors"] >= 1 and cam["recording"]["snapshots"] >= 1
