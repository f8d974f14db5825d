"""What every HTTP edge shares: the relay, one-line errors, the stream a path names, the host clients use."""

from __future__ import annotations

from aiohttp import web

from relay.service import Relay, lan_addresses

RELAY = web.AppKey("relay", Relay)


def error(status: type[web.HTTPException], reason: str, **kw) -> web.HTTPException:
    return status(text=reason + "\n", content_type="text/plain", **kw)


def stream_or_404(request: web.Request) -> str:
    name = request.match_info["stream"]
    if name not in request.app[RELAY].streams:
        raise error(web.HTTPNotFound, f"no stream named {name!r}")
    return name


def display_host(request: web.Request) -> str:
    """The host name a client should use for our other services (RTSP).

    The name it reached this page by, unless that is loopback: then this
    machine's first LAN address, which is what another machine needs.
    """
    try:
        host = request.url.host or "127.0.0.1"
    except ValueError:  # a malformed Host header
        host = "127.0.0.1"
    if host in ("localhost", "::1") or host.startswith("127."):
        lan = lan_addresses()
        if lan:
            return lan[0]
    return f"[{host}]" if ":" in host else host
