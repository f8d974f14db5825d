"""The viewer pages: every stream as a live tile (``/``), one large player (``/view/<stream>``), their files."""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from .common import RELAY, display_host, stream_or_404

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
# What the relay's pages may load and run: their own scripts, styles, pictures and video, nothing inline and nothing
# from elsewhere, so that text that reached a page (a stream's source, a device's name) can never run as a script.
# Framing is left open: dashboards (Home Assistant and the like) embed a stream's page.
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:;"
    " connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'"
)


@aiohttp_jinja2.template("index.html")
async def index(request: web.Request) -> dict:
    return {"streams": list(request.app[RELAY].streams.values())}


@aiohttp_jinja2.template("view.html")
async def view(request: web.Request) -> dict:
    relay = request.app[RELAY]
    name = stream_or_404(request)
    return {
        "stream": relay.streams[name],
        "rtsp_url": relay.rtsp_url(name, display_host(request)),
        "rtsp_needs_login": bool(relay.config.rtsp.user),
        "recorded": name in relay.recorders,
    }


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer is what its Content-Type says (no sniffing a snapshot or a JSON error into a page); a page
    has ``PAGE_POLICY``."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if response.content_type == "text/html":
        response.headers.setdefault("Content-Security-Policy", PAGE_POLICY)


def setup(app: web.Application) -> None:
    app.on_response_prepare.append(security_headers)
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True)
    app.router.add_get("/", index)
    app.router.add_get("/view/{stream}", view)
    app.router.add_static("/static/", STATIC_DIR, name="static")
