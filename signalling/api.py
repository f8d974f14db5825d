"""The JSON API: streams, RTSP, the relay's status."""

from __future__ import annotations

from aiohttp import web

from relay.logsafe import redact_url
from relay.status import StreamStatus

from .common import RELAY, display_host


def _streams(request: web.Request, statuses: list[StreamStatus]) -> list[dict]:
    """Each stream's API entry, with the RTSP URL for the host this client reached us by."""
    relay, host = request.app[RELAY], display_host(request)
    return [{**s.api(), "rtsp_url": relay.rtsp_url(s.name, host)} for s in statuses]


async def api_streams(request: web.Request) -> web.Response:
    return web.json_response({"streams": _streams(request, request.app[RELAY].stream_statuses())})


async def api_rtsp(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    r = relay.config.rtsp
    m = relay.mediamtx
    return web.json_response(
        {
            "enabled": r.enabled,
            "port": r.port if not r.publish_url else None,
            "publish_url": redact_url(r.publish_url) if r.publish_url else None,
            "credentials_required": bool(r.user),
            "mediamtx_pid": m.pid if m else None,
            "mediamtx_restarts": m.restarts if m else 0,
            "mediamtx_ready": m.ready.is_set() if m else None,
            "streams": {
                name: {
                    "url": relay.rtsp_url(name, display_host(request)),
                    "published": p.published,
                    "sessions": p.sessions,
                }
                for name, p in relay.publishers.items()
            },
        }
    )


async def api_status(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    now = relay.snapshot()
    snapshot = now.as_dict()
    snapshot["streams"] = _streams(request, now.streams)
    snapshot["viewers"] = relay.sessions.connected()
    snapshot["shards"] = relay.sessions.shards()  # the fan-out processes ([webrtc] shards > 1); [] in-process
    snapshot["rtsp"] = {
        "enabled": relay.config.rtsp.enabled,
        "mediamtx_up": relay.mediamtx.ready.is_set() if relay.mediamtx else None,
        "mediamtx_restarts": relay.mediamtx.restarts if relay.mediamtx else 0,
    }
    return web.json_response(snapshot)


def setup(app: web.Application) -> None:
    app.router.add_get("/api/v1/streams", api_streams)
    app.router.add_get("/api/v1/rtsp", api_rtsp)
    app.router.add_get("/api/v1/status", api_status)
