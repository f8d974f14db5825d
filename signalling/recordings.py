"""Recordings over HTTP: a stream's segments and snapshots listed (a page, JSON) and served."""

from __future__ import annotations

import time

import aiohttp_jinja2
from aiohttp import web

from .common import RELAY, error, stream_or_404

LISTING_LIMIT = 1000  # newest segments and snapshots listed per request


async def _recordings(request: web.Request) -> dict:
    """The segments and snapshots of a stream on disk, newest first, with download URLs."""
    relay = request.app[RELAY]
    name = stream_or_404(request)
    recorder = relay.recorders.get(name)
    if recorder is None:
        raise error(web.HTTPNotFound, f"stream {name!r} is not recorded (set [record] enabled = true)")
    segments, snapshots = await recorder.shared_listing()

    def entries(files, limit):
        out = []
        for path, t, size in reversed(files[-limit:]):
            rel = path.relative_to(recorder.dir).as_posix()
            utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
            out.append({"time": t, "utc": utc, "bytes": size, "url": f"/recordings/{name}/{rel}"})
        return out

    return {
        "stream": name,
        "recording": not recorder.paused,
        "paused": recorder.paused,
        "segments": entries(segments, LISTING_LIMIT),
        "snapshots": entries(snapshots, LISTING_LIMIT),
        "latest_video": f"/recordings/{name}/latest_video.mp4",
        "latest_image": f"/recordings/{name}/latest_image.jpg",
    }


async def api_recordings(request: web.Request) -> web.Response:
    return web.json_response(await _recordings(request))


async def recordings_page(request: web.Request) -> web.Response:
    return aiohttp_jinja2.render_template("recordings.html", request, await _recordings(request))


async def recording_file(request: web.Request) -> web.StreamResponse:
    relay = request.app[RELAY]
    name = stream_or_404(request)
    recorder = relay.recorders.get(name)
    if recorder is None:
        raise error(web.HTTPNotFound, f"stream {name!r} is not recorded")
    try:
        base = recorder.dir.resolve()
        path = (recorder.dir / request.match_info["path"]).resolve()  # follows latest_* links
        found = path.is_relative_to(base) and path.is_file() and path.suffix in (".mp4", ".jpg")
    except (ValueError, OSError):  # a NUL byte, a name too long
        found = False
    if not found:
        raise error(web.HTTPNotFound, "no such recording")
    # private: served only with the token or the password, so a shared cache (a proxy) must not keep it for others
    cache = "no-store" if "latest_" in request.match_info["path"] else "private, max-age=3600"
    return web.FileResponse(path, headers={"Cache-Control": cache})


def setup(app: web.Application) -> None:
    app.router.add_get("/api/v1/recordings/{stream}", api_recordings)
    app.router.add_get("/recordings/{stream}", recordings_page)
    app.router.add_get("/recordings/{stream}/{path:.+}", recording_file)
