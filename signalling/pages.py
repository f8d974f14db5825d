"""The viewer pages: every stream as a live tile (``/``), one large player (``/view/<stream>``), their files."""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from .common import RELAY, display_host, stream_or_404

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"


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


def setup(app: web.Application) -> None:
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True)
    app.router.add_get("/", index)
    app.router.add_get("/view/{stream}", view)
    app.router.add_static("/static/", STATIC_DIR, name="static")
