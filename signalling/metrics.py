"""For monitors: Prometheus ``/metrics`` and the liveness check ``/healthz``."""

from __future__ import annotations

from aiohttp import web

from relay.ipc import ENCODER_ERROR
from relay.status import Metric
from relay.telemetry import prometheus

from .common import RELAY

FAILED_STATES = (ENCODER_ERROR,)  # stream states that make /healthz answer 503


async def metrics(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    extra = [Metric("camrelay_viewers", "gauge", "WebRTC viewers connected, all streams.", relay.sessions.connected())]
    for shard in relay.sessions.shards():  # [webrtc] shards > 1: the fan-out processes, as /api/v1/status has them
        labels = {"shard": str(shard["shard"])}
        extra += [
            Metric("camrelay_shard_up", "gauge", "1 while the fan-out shard runs.", int(shard["up"]), labels),
            Metric("camrelay_shard_viewers", "gauge", "WebRTC sessions the fan-out shard holds.", shard["viewers"],
                   labels),
            Metric("camrelay_shard_restarts_total", "counter", "Fan-out shard restarts.", shard["restarts"], labels),
            *(Metric("camrelay_shard_frames_dropped_total", "counter",
                     "Frames dropped for the fan-out shard: by the relay's feed (pipe), by its viewers (viewer_lag).",
                     n, {**labels, "reason": reason}) for reason, n in shard["frames_dropped"].items()),
        ]  # fmt: skip
    if relay.mediamtx is not None:
        extra += [
            Metric("camrelay_mediamtx_up", "gauge", "1 while mediamtx answers.", int(relay.mediamtx.ready.is_set())),
            Metric("camrelay_mediamtx_restarts_total", "counter", "mediamtx restarts.", relay.mediamtx.restarts),
        ]
    text = prometheus(relay.snapshot(), extra)
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
