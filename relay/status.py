"""One status per stream, and the three ways it is shown: the API, the status log line, Prometheus.

A stream's ``StreamStatus`` holds what its worker, its hub and each of its
consumers report (``ConsumerStats``: keys for the API and metrics of their
own). ``api()`` is each stream's entry in ``/api/v1/streams`` and
``/api/v1/status``, ``log_part()`` its part of the status line, ``metrics()``
its samples in ``/metrics``: the same numbers everywhere, a counter in one
is the counter in the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

QUANTILES = {"p50": "0.5", "p95": "0.95", "p99": "0.99"}  # a delay window's percentiles as Prometheus labels


@dataclass(frozen=True, slots=True)
class Metric:
    """One Prometheus sample: a gauge or counter, its help line, its labels, its value."""

    name: str
    kind: str  # "gauge" or "counter"
    help: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConsumerStats:
    """What one consumer of a stream reports: keys of the stream's API entry (a list extends the stream's list of
    that name: one entry per WHIP publisher), metrics of its own, and the viewers it serves (connected)."""

    api: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[Metric, ...] = ()
    viewers: int = 0


@dataclass
class StreamStatus:
    name: str
    state: str = "new"
    viewers: int = 0  # WebRTC viewers connected (the API's viewers_connected)
    # Over the telemetry's last interval (SAMPLE_INTERVAL)
    capture_fps: float = 0.0
    encoded_fps: float = 0.0
    bitrate_bps: float = 0.0
    encode_ms: float = 0.0  # decode and encode of one frame, smoothed
    keyframes_forced: int = 0
    frames_dropped: dict[str, int] = field(
        default_factory=dict
    )  # encoder_busy, corrupt, viewer_lag, thermal, source_loss
    worker_restarts: int = 0  # its worker process restarted (a shared one's: every camera of it)
    camera_restarts: int = 0  # started afresh inside its worker (stuck, silent, failed), the others untouched
    worker_moves: int = 0  # left a shared worker for a process of its own (a transcode or FFmpeg's demuxer)
    worker_splits: int = 0  # its shared worker died again and again and was split in two (relay.stream.SPLIT_WITHIN)
    source_errors: int = 0
    source: str = ""
    width: int = 0
    height: int = 0
    fps: float = 0.0
    encoder: str = ""
    encoders_running: int = 0
    mode: str = ""  # passthrough or transcode (the source's, as its worker decided); "" before it opened
    mode_reason: str = ""
    codec: str = ""  # what the source sends
    profile: str = ""  # the source's H.264 profile, level and size
    reader: str = ""  # what reads the source: rtspin (camrelay's RTSP client), ffmpeg, test pattern
    profile_level_id: str = ""  # of the H.264 the stream carries now (the slate's, while it shows)
    frames_passed_through: int = 0
    frames_decoded: int = 0
    keyframe_requests_ignored: int = 0
    frames_captured: int = 0
    frames_encoded: int = 0
    keyframes: int = 0
    frames_slate: int = 0
    worker_stalls: int = 0
    last_error: str = ""
    # Over the last ~10 s: capture to the hub (per frame), the hub to each viewer's sender; p50, p95, p99 in ms.
    pipeline_delay_ms: dict[str, float | None] = field(default_factory=dict)
    fanout_delay_ms: dict[str, float | None] = field(default_factory=dict)
    consumers: list[ConsumerStats] = field(default_factory=list)

    @property
    def restarts(self) -> int:
        """Of the camera, in all: its worker process's, in its worker, moves to a process of its own."""
        return self.worker_restarts + self.camera_restarts + self.worker_moves

    def api(self) -> dict[str, Any]:
        """The stream's entry in the API."""
        entry: dict[str, Any] = {
            "name": self.name,
            "source": self.source,
            "width": self.width,
            "height": self.height,
            "fps": self.fps,
            "codec": "H264",
            "mode": self.mode,
            "mode_reason": self.mode_reason,
            "source_codec": self.codec,
            "source_reader": self.reader,
            "profile": self.profile,
            "profile_level_id": self.profile_level_id,
            "encoder": self.encoder,
            "encoders_running": self.encoders_running,
            "state": self.state,
            "viewers": 0,  # WebRTC sessions, those still connecting included
            "viewers_connected": self.viewers,
            "capture_fps": self.capture_fps,
            "encoded_fps": self.encoded_fps,
            "bitrate_bps": self.bitrate_bps,
            "pipeline_delay_ms": self.pipeline_delay_ms,
            "fanout_delay_ms": self.fanout_delay_ms,
            "frames_captured": self.frames_captured,
            "frames_encoded": self.frames_encoded,
            "frames_passed_through": self.frames_passed_through,
            "frames_decoded": self.frames_decoded,
            "keyframe_requests_ignored": self.keyframe_requests_ignored,
            "frames_dropped": self.frames_dropped,
            "keyframes": self.keyframes,
            "keyframes_forced": self.keyframes_forced,
            "encode_ms": round(self.encode_ms, 2),
            "worker_restarts": self.worker_restarts,
            "camera_restarts": self.camera_restarts,
            "worker_moves": self.worker_moves,
            "worker_splits": self.worker_splits,
            "restarts": self.restarts,
            "rtsp_path": None,
            "rtsp_live_alias": False,
            "rtsp_published": 0,
            "whip": [],
            "frames_slate": self.frames_slate,
            "source_errors": self.source_errors,
            "worker_stalls": self.worker_stalls,
            "last_error": self.last_error,
        }
        for consumer in self.consumers:
            for key, value in consumer.api.items():
                entry[key] = entry.get(key, []) + value if isinstance(value, list) else value
        return entry

    def log_part(self) -> str:
        """The stream's part of the status line."""
        return (
            f"| stream={self.name} {self.state} mode={self.mode or '-'} fps={self.encoded_fps:.1f}"
            f" kbps={self.bitrate_bps / 1000:.0f}"
            f" viewers={self.viewers} encode_ms={self.encode_ms:.1f} dropped={sum(self.frames_dropped.values())}"
        )

    def metrics(self) -> list[Metric]:
        """The stream's samples in /metrics (conventional names, base units)."""
        labels = {"stream": self.name}
        up = int(self.state == "live")
        out = [
            Metric("camrelay_stream_up", "gauge", "1 while the stream shows live video.", up, labels),
            Metric("camrelay_stream_viewers", "gauge", "WebRTC viewers.", self.viewers, labels),
            Metric(
                "camrelay_stream_capture_fps", "gauge", "Frames per second from the source.", self.capture_fps, labels
            ),
            Metric("camrelay_stream_encoded_fps", "gauge", "Frames per second encoded.", self.encoded_fps, labels),
            Metric("camrelay_stream_bitrate_bits_per_second", "gauge", "Encoded bit rate.", self.bitrate_bps, labels),
            Metric(
                "camrelay_stream_encode_seconds", "gauge", "Decode and encode time per frame.",
                self.encode_ms / 1000, labels,
            ),
            Metric(
                "camrelay_stream_keyframes_forced_total", "counter", "IDRs forced by joins, PLI and FIR.",
                self.keyframes_forced, labels,
            ),
            Metric(
                "camrelay_stream_passthrough", "gauge", "1 while the camera's H.264 is passed through.",
                int(self.mode == "passthrough"), labels,
            ),
            Metric(
                "camrelay_stream_encoders_running", "gauge", "H.264 encoders running for the stream.",
                self.encoders_running, labels,
            ),
            Metric(
                "camrelay_stream_frames_passed_through_total", "counter", "The camera's access units sent as they are.",
                self.frames_passed_through, labels,
            ),
            Metric(
                "camrelay_stream_frames_decoded_total", "counter",
                "Pictures decoded (passed-through cameras: for JPEGs only).", self.frames_decoded, labels,
            ),
            Metric(
                "camrelay_stream_keyframe_requests_ignored_total", "counter",
                "Keyframe requests a passed-through camera cannot answer.", self.keyframe_requests_ignored, labels,
            ),
            Metric(
                "camrelay_stream_restarts_total", "counter",
                "Restarts of the stream's camera: its worker process, in its worker, moves to a process of its own.",
                self.restarts, labels,
            ),
            Metric(
                "camrelay_stream_worker_splits_total", "counter",
                "Times the stream's shared worker process died again soon after dying and was split in two.",
                self.worker_splits, labels,
            ),
            Metric("camrelay_stream_source_errors_total", "counter", "Source failures.", self.source_errors, labels),
        ]  # fmt: skip
        out += [
            Metric(
                "camrelay_stream_frames_dropped_total", "counter", "Frames dropped, by reason.", n,
                {**labels, "reason": reason},
            )
            for reason, n in self.frames_dropped.items()
        ]  # fmt: skip
        for name, percentiles, help_ in (
            ("camrelay_stream_pipeline_delay_seconds", self.pipeline_delay_ms, "Capture to hub, recent frames."),
            ("camrelay_stream_fanout_delay_seconds", self.fanout_delay_ms, "Hub to each viewer's sender."),
        ):
            out += [
                Metric(name, "gauge", help_, ms / 1000, {**labels, "quantile": QUANTILES[q]})
                for q, ms in percentiles.items()
                if ms is not None
            ]
        for consumer in self.consumers:
            out += consumer.metrics
        return out
