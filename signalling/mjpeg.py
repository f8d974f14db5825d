"""The camera's own JPEGs over HTTP: ``/snapshot/<stream>.jpg`` and MJPEG (``/mjpeg/<stream>``), no re-encode."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from .common import RELAY, error, stream_or_404
from .server import unsent_bytes

log = logging.getLogger(__name__)

# Their handler tasks, ended at shutdown (they never end by themselves).
MJPEG_CLIENTS = web.AppKey("mjpeg_clients", set)
SNAPSHOT_TIMEOUT = 3.0  # seconds to wait for a frame; the slate arrives within ~1 s of a camera going away
MJPEG_BOUNDARY = "camrelayframe"
MJPEG_IDLE = 5.0  # seconds an MJPEG client waits for a frame before looking again


async def snapshot(request: web.Request) -> web.Response:
    """The newest frame as the camera sent it: at most one frame old."""
    relay = request.app[RELAY]
    name = request.match_info["stream"]
    if name not in relay.streams:
        raise error(web.HTTPNotFound, f"no stream named {name!r}")
    feed = relay.streams[name].jpegs
    feed.acquire()
    try:
        current = feed.latest.version if feed.latest else 0
        jpeg = await feed.newer_than(current, SNAPSHOT_TIMEOUT)
    finally:
        feed.release()
    if jpeg is None:
        raise error(
            web.HTTPServiceUnavailable,
            f"stream {name!r} delivered no frame within {SNAPSHOT_TIMEOUT:g}s",
            headers={"Retry-After": "5"},
        )
    return web.Response(
        body=jpeg.data,
        content_type="image/jpeg",
        headers={"Cache-Control": "no-store", "X-Capture-Time": f"{jpeg.capture_time:.3f}"},
    )


async def mjpeg(request: web.Request) -> web.StreamResponse:
    """multipart/x-mixed-replace: every client always gets the newest frame; a slow one skips frames."""
    relay = request.app[RELAY]
    name = stream_or_404(request)
    feed = relay.streams[name].jpegs
    response = web.StreamResponse(
        headers={
            "Content-Type": f"multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY}",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",  # a reverse proxy must not collect frames
        }
    )
    await response.prepare(request)
    request.app[MJPEG_CLIENTS].add(asyncio.current_task())
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    feed.acquire()
    sent = skipped = 0
    try:
        version = 0
        while True:
            jpeg = await feed.newer_than(version, MJPEG_IDLE)
            if jpeg is None:
                continue  # the camera is between frames for long; the slate keeps them coming
            version = jpeg.version
            if unsent_bytes(transport, sock) > 0:
                skipped += 1  # the last frame is still on its way: send the newest one later, never a backlog
                continue
            head = (
                f"--{MJPEG_BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg.data)}\r\n"
                f"X-Capture-Time: {jpeg.capture_time:.3f}\r\n\r\n"
            ).encode()
            await response.write(head + jpeg.data + b"\r\n")  # waits while this client's socket is full
            sent += 1
    except (ConnectionResetError, ConnectionError):
        pass
    except asyncio.CancelledError:
        pass  # shutting down: the connection closes with the server
    finally:
        request.app[MJPEG_CLIENTS].discard(asyncio.current_task())
        feed.release()
        log.info("stream=%s mjpeg client %s left: sent=%d skipped=%d", name, request.remote, sent, skipped)
    return response


async def end_streaming_clients(app: web.Application) -> None:
    for task in list(app[MJPEG_CLIENTS]):
        task.cancel()


def setup(app: web.Application) -> None:
    app[MJPEG_CLIENTS] = set()
    app.on_shutdown.append(end_streaming_clients)
    app.router.add_get("/snapshot/{stream}.jpg", snapshot)
    app.router.add_get("/mjpeg/{stream}", mjpeg)
