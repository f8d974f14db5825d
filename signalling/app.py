"""The HTTP face of the relay: each edge's routes (WHEP, MJPEG and snapshots, recordings, the API,
metrics, the pages) and the checks every request passes, in one application."""

from __future__ import annotations

from aiohttp import web

from relay.service import Relay

from . import api, metrics, mjpeg, pages, recordings, whep
from .access import ACCESS, Access, guard
from .common import RELAY
from .forwarded import PROXIES, forwarded, parse_networks

EDGES = (pages, whep, api, mjpeg, recordings, metrics)  # each registers its own routes: setup(app)


def make_app(relay: Relay) -> web.Application:
    """The aiohttp application; starts and closes ``relay`` with itself."""
    # forwarded first: the checks after it see the client behind a trusted reverse proxy, not the proxy.
    app = web.Application(client_max_size=whep.MAX_OFFER_BYTES, middlewares=[forwarded, whep.cors, guard])
    app[PROXIES] = parse_networks(relay.config.http.trusted_proxies)
    app[RELAY] = relay
    app[ACCESS] = Access(relay.config, relay.state_dir)

    async def relay_lifecycle(app: web.Application):
        await relay.start()
        yield
        await relay.close()
        app[ACCESS].close()

    app.cleanup_ctx.append(relay_lifecycle)
    for edge in EDGES:
        edge.setup(app)
    return app
