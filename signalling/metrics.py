"""For monitors: Prometheus ``/metrics`` and the liveness check ``/healthz``."""

from __future__ import annotations

from aiohttp import web

from relay.ipc import ENCODER_ERROR
from relay.telemetry import prometheus

from .common import RELAY

FAILED_STATES = (ENCODER_ERROR,)  # stream states that make /healthz answer 503


async def metrics(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    extra = [("camrelay_viewers", "gauge", "WebRTC viewers connected, all streams.", {}, relay.sessions.connected())]
    extra += relay.whip_metrics()
    if relay.mediamtx is not None:
        extra.append(
            ("camrelay_mediamtx_up", "gauge", "1 while mediamtx answers.", {}, int(relay.mediamtx.ready.is_set()))
        )
        extra.append(("camrelay_mediamtx_restarts_total", "counter", "mediamtx restarts.", {}, relay.mediamtx.restarts))
    for name, rec in relay.recorders.items():
        labels = {"stream": name}
        extra += [
            (
                "camrelay_recording_paused",
                "gauge",
                "1 while recording is paused for a full disk.",
                labels,
                int(rec.paused),
            ),
            ("camrelay_recording_segments_total", "counter", "MP4 segments completed.", labels, rec.segments_written),
            ("camrelay_recording_snapshots_total", "counter", "JPEG snapshots written.", labels, rec.snapshots_written),
            ("camrelay_recording_deleted_total", "counter", "Files deleted by retention.", labels, rec.deleted),
            ("camrelay_recording_disk_full_total", "counter", "Times the disk filled up.", labels, rec.pauses),
        ]
    for name, stream in relay.streams.items():
        for metric, window, help_ in (
            ("camrelay_stream_pipeline_delay_seconds", stream.hub.pipeline_delay, "Capture to hub, recent frames."),
            ("camrelay_stream_fanout_delay_seconds", stream.hub.fanout_delay, "Hub to each viewer's sender."),
        ):
            for q, ms in window.percentiles_ms().items():
                if ms is not None:
                    quantile = {"p50": "0.5", "p95": "0.95", "p99": "0.99"}[q]
                    extra.append((metric, "gauge", help_, {"stream": name, "quantile": quantile}, ms / 1000))
    text = prometheus(relay.telemetry.latest, extra)
    return web.Response(text=text, content_type="text/plain", charset="utf-8", headers={"X-Prometheus-Format": "0.0.4"})


async def healthz(request: web.Request) -> web.Response:
    """200 while every stream can reach its viewers; 503 when one is broken in the relay itself.

    A camera that is unplugged or restarting is not live, but nothing is wrong
    with the relay; an encoder that keeps failing is, and a monitor should say so.
    """
    relay = request.app[RELAY]
    streams = relay.streams.values()
    not_live = [s.name for s in streams if s.state not in ("live", "starting")]
    failing = [s.name for s in streams if s.state in FAILED_STATES]
    body = {"ok": not failing, "streams_not_live": not_live, "streams_failing": failing}
    return web.json_response(body, status=503 if failing else 200)


def setup(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
