"""The HTTP face of the relay: WHEP, the JSON API, the viewer pages.

WHEP (draft-ietf-wish-whep): ``POST /whep/<stream>`` with an SDP offer gets
``201`` and the answer; the ``Location`` is the session, which takes ``PATCH``
(trickled candidates) and ``DELETE``. The ``201``, and an ``OPTIONS`` that
carries a viewer's credentials, list the viewer's ICE servers in ``Link``
headers. Every bad input gets its own status and a one-line reason in the
body, never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from relay.ipc import ENCODER_ERROR
from relay.logsafe import Throttled, redact_url
from relay.service import Relay, UnknownStream, lan_addresses
from relay.telemetry import prometheus
from relay.webrtc import ice
from relay.webrtc.sessions import OfferRejected

from .access import ACCESS, VIEWER, Access, guard
from .forwarded import PROXIES, forwarded, parse_networks
from .limits import RateLimiter
from .sdp import (
    SdpError,
    answer_all,
    check_candidate,
    check_offer,
    drop_mdns_candidates,
    is_ice_restart,
    is_mdns_candidate,
    served_only,
)
from .server import unsent_bytes

log = logging.getLogger(__name__)
refusals = Throttled(log)  # refused sessions: one line a second at most, however many are refused

RELAY = web.AppKey("relay", Relay)
LIMITER = web.AppKey("limiter", RateLimiter)  # new viewer sessions per client address
MJPEG_CLIENTS = web.AppKey(
    "mjpeg_clients", set
)  # their handler tasks, ended at shutdown (they never end by themselves)
MAX_OFFER_BYTES = 64 * 1024  # a browser offer is ~5 KiB; more is not an offer
BODY_TIMEOUT = 10.0  # seconds for a request body (an offer) to arrive once its head has: a LAN needs milliseconds
SDP_TYPE = "application/sdp"
SDPFRAG_TYPE = "application/trickle-ice-sdpfrag"
RETRY_AFTER_FULL = "10"  # seconds a client should wait when a stream is full
RETRY_AFTER_PENDING = "5"  # seconds to wait when too many sessions are still connecting (most take < 1 s)
CORS_MAX_AGE = "600"  # seconds a browser may cache a preflight
SNAPSHOT_TIMEOUT = 3.0  # seconds to wait for a frame; the slate arrives within ~1 s of a camera going away
MJPEG_BOUNDARY = "camrelayframe"
LISTING_LIMIT = 1000  # newest segments and snapshots listed per request
MJPEG_IDLE = 5.0  # seconds an MJPEG client waits for a frame before looking again
FAILED_STATES = (ENCODER_ERROR,)  # stream states that make /healthz answer 503
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"


def _error(status: type[web.HTTPException], reason: str, **kw) -> web.HTTPException:
    return status(text=reason + "\n", content_type="text/plain", **kw)


def _stream_or_404(request: web.Request) -> str:
    name = request.match_info["stream"]
    if name not in request.app[RELAY].streams:
        raise _error(web.HTTPNotFound, f"no stream named {name!r}")
    return name


async def whep_offer(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    name = _stream_or_404(request)
    address = request.remote or "?"
    wait = request.app[LIMITER].check(address, time.monotonic())
    if wait:
        refusals.warn("stream=%s new-session rate limit hit by %s", name, address)
        raise _error(
            web.HTTPTooManyRequests,
            f"too many new sessions from {address}; retry later",
            headers={"Retry-After": str(max(1, round(wait)))},
        )
    if request.content_type != SDP_TYPE:
        raise _error(
            web.HTTPUnsupportedMediaType, f"Content-Type must be {SDP_TYPE}, got {request.content_type or 'none'!r}"
        )
    body = await _read_body(request, "offer")
    try:
        offer = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _error(web.HTTPBadRequest, "offer is not UTF-8 text") from None
    try:
        summary = check_offer(offer)
    except SdpError as exc:
        raise _error(web.HTTPBadRequest, f"malformed offer: {exc}") from None
    _check_pending(relay, name, address)
    _check_viewer_limits(relay, name, request.remote)
    try:
        session, answer = await relay.sessions.create(
            name, served_only(drop_mdns_candidates(offer), summary.served), request.remote or "?"
        )
    except OfferRejected as exc:
        raise _error(web.HTTPBadRequest, str(exc)) from None
    except UnknownStream:
        raise _error(web.HTTPNotFound, f"no stream named {name!r}") from None
    except Exception as exc:  # ICE could not bind, DTLS setup failed: ours, not the client's
        log.exception("stream=%s could not set up a viewer session", name)
        raise _error(
            web.HTTPServiceUnavailable,
            f"could not set up the session: {type(exc).__name__}",
            headers={"Retry-After": "5"},
        ) from None
    try:
        _check_viewer_limits(relay, name, request.remote, this_one=1)  # others may have come in meanwhile
    except web.HTTPServiceUnavailable:
        await relay.sessions.close(session.id, "over the viewer limit")
        raise
    location = f"/whep/{name}/{session.id}"
    response = web.Response(
        status=201,
        body=answer_all(offer, summary.served, answer).encode(),
        headers={"Location": location, "Content-Type": SDP_TYPE},
    )
    _add_ice_links(request, response)  # no ETag: a session cannot restart ICE (see whep_patch)
    return response


def _add_ice_links(request: web.Request, response: web.StreamResponse) -> None:
    """The viewer's ICE servers, one ``Link: <url>; rel="ice-server"`` header each (RFC 9725 §4.6)."""
    for value in ice.link_headers(ice.for_viewer(request.app[RELAY].config.webrtc)):
        response.headers.add("Link", value)


async def _read_body(request: web.Request, what: str) -> bytes:
    """The whole body: 413 past ``MAX_OFFER_BYTES``, 408 when it does not arrive within ``BODY_TIMEOUT``.

    The header timeout ends once a request's head is in; a client that then
    trickles its body (a slowloris past the door) is cut off here.
    """

    def too_large(size: int) -> web.HTTPException:
        return _error(
            web.HTTPRequestEntityTooLarge,
            f"{what} larger than {MAX_OFFER_BYTES} bytes",
            max_size=MAX_OFFER_BYTES,
            actual_size=size,
        )

    if request.content_length is not None and request.content_length > MAX_OFFER_BYTES:
        raise too_large(request.content_length)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > MAX_OFFER_BYTES:
                    raise too_large(size)
                chunks.append(chunk)
    except TimeoutError:
        raise _error(web.HTTPRequestTimeout, f"{what} not received within {BODY_TIMEOUT:g}s") from None
    except ConnectionError:  # the client went away mid-body: nobody to answer, nothing worth a traceback
        raise _error(web.HTTPBadRequest, f"{what} cut off: the connection was lost") from None
    return b"".join(chunks)


def _check_pending(relay, name: str, address: str) -> None:
    """503 when too many sessions are still connecting, 429 when too many of them are this address's."""
    w = relay.config.webrtc
    for count, limit, status, whose in (
        (relay.sessions.pending(), w.max_pending, web.HTTPServiceUnavailable, ""),
        (relay.sessions.pending(address), w.max_pending_per_address, web.HTTPTooManyRequests, f" from {address}"),
    ):
        if count >= limit:
            refusals.warn("stream=%s %d sessions%s still connecting; refusing %s", name, count, whose, address)
            raise _error(
                status,
                f"too many sessions{whose} still connecting ({count}); retry later",
                headers={"Retry-After": RETRY_AFTER_PENDING},
            )


def _check_viewer_limits(relay, name: str, remote: str | None, this_one: int = 0) -> None:
    """503 with Retry-After when the stream, or the relay, has all the viewers it may carry."""
    w = relay.config.webrtc
    for count, limit, what in (
        (relay.sessions.count(name), w.max_viewers, f"stream {name!r}"),
        (relay.sessions.count(), w.max_viewers_total, "this relay"),
    ):
        if count - this_one >= limit:
            if not this_one:
                refusals.warn("stream=%s %s viewer limit %d reached; refusing %s", name, what, limit, remote)
            raise _error(
                web.HTTPServiceUnavailable,
                f"{what} has its maximum of {limit} viewers",
                headers={"Retry-After": RETRY_AFTER_FULL},
            )


def _session_or_404(request: web.Request):
    # One answer for a wrong stream and a wrong session: a session URL needs no credentials (it is
    # the capability), so its 404 must not tell which streams exist.
    session = request.app[RELAY].sessions.get(request.match_info["session"])
    if session is None or session.stream != request.match_info["stream"]:
        raise _error(web.HTTPNotFound, "no such session")
    return session


async def whep_patch(request: web.Request) -> web.Response:
    session = _session_or_404(request)
    if request.content_type != SDPFRAG_TYPE:
        raise _error(web.HTTPUnsupportedMediaType, f"Content-Type must be {SDPFRAG_TYPE}")
    # A session has no entity-tag (it cannot restart ICE): "If-Match: *" matches it, a tag does not (RFC 9110 §13.1.1).
    if request.headers.get("If-Match", "*").strip() != "*":
        raise _error(
            web.HTTPPreconditionFailed,
            "If-Match names an entity-tag this relay never gave (its sessions have none); send If-Match: * or none",
        )
    body = await _read_body(request, "fragment")
    fragment = "".join(
        line for line in body.decode("utf-8", "replace").splitlines(keepends=True) if not is_mdns_candidate(line)
    )
    if is_ice_restart(fragment, session.pc.remoteDescription.sdp):
        # aiortc cannot restart ICE. draft-ietf-wish-whep-03 §4.5.1: a session that trickles but cannot
        # restart answers 422, and keeps its ICE session.
        raise _error(
            web.HTTPUnprocessableEntity,
            "ICE restart is not supported: this session keeps its ICE credentials; for new ones DELETE it and POST",
        )
    try:
        for line in fragment.splitlines():
            if line.startswith("a=candidate:"):
                check_candidate(line.strip()[len("a=candidate:") :])
    except SdpError as exc:
        raise _error(web.HTTPBadRequest, f"bad candidate: {exc}") from None
    try:
        await request.app[RELAY].sessions.add_candidates(session, fragment)
    except OfferRejected as exc:
        raise _error(web.HTTPBadRequest, str(exc)) from None
    return web.Response(status=204)


async def whep_delete(request: web.Request) -> web.Response:
    session = _session_or_404(request)
    await request.app[RELAY].sessions.close(session.id, "DELETE")
    return web.Response(status=200)


async def whep_options(request: web.Request) -> web.Response:
    # The same answer for every path: OPTIONS needs no credentials, so it must not tell which streams exist.
    # A viewer's (with credentials, as a WHEP player sends it) also lists the ICE servers.
    headers = {"Allow": "OPTIONS, POST, PATCH, DELETE", "Accept-Post": SDP_TYPE, "Accept-Patch": SDPFRAG_TYPE}
    if _allowed_origin(request):
        headers.update(
            {
                "Access-Control-Allow-Methods": "OPTIONS, POST, PATCH, DELETE",
                "Access-Control-Allow-Headers": "Content-Type, Authorization, If-Match",
                "Access-Control-Max-Age": CORS_MAX_AGE,
            }
        )
    response = web.Response(status=204, headers=headers)
    if request.get(VIEWER):
        _add_ice_links(request, response)
    return response


def _allowed_origin(request: web.Request) -> str | None:
    """The request's Origin when the config allows it to use WHEP cross-site."""
    origin = request.headers.get("Origin")
    allowed = request.app[RELAY].config.http.cors_origins
    if origin and (origin in allowed or "*" in allowed):
        return origin
    return None


@web.middleware
async def cors(request: web.Request, handler):
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    origin = _allowed_origin(request) if request.path.startswith("/whep/") else None
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "Location, Link, ETag, Accept-Patch"
        response.headers["Vary"] = "Origin"
    if isinstance(response, web.HTTPException):
        raise response
    return response


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


def _describe(request: web.Request, stream) -> dict:
    relay = request.app[RELAY]
    info = relay.describe(stream)
    info["rtsp_url"] = relay.rtsp_url(stream.name, display_host(request))
    return info


async def api_streams(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    return web.json_response({"streams": [_describe(request, s) for s in relay.streams.values()]})


async def snapshot(request: web.Request) -> web.Response:
    """The newest frame as the camera sent it: at most one frame old."""
    relay = request.app[RELAY]
    name = request.match_info["stream"]
    if name not in relay.streams:
        raise _error(web.HTTPNotFound, f"no stream named {name!r}")
    feed = relay.streams[name].jpegs
    feed.acquire()
    try:
        current = feed.latest.version if feed.latest else 0
        jpeg = await feed.newer_than(current, SNAPSHOT_TIMEOUT)
    finally:
        feed.release()
    if jpeg is None:
        raise _error(
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
    name = _stream_or_404(request)
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


async def _recordings(request: web.Request) -> dict:
    """The segments and snapshots of a stream on disk, newest first, with download URLs."""
    relay = request.app[RELAY]
    name = _stream_or_404(request)
    recorder = relay.recorders.get(name)
    if recorder is None:
        raise _error(web.HTTPNotFound, f"stream {name!r} is not recorded (set [record] enabled = true)")
    segments, snapshots = await asyncio.to_thread(recorder.listing)

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
    name = _stream_or_404(request)
    recorder = relay.recorders.get(name)
    if recorder is None:
        raise _error(web.HTTPNotFound, f"stream {name!r} is not recorded")
    try:
        base = recorder.dir.resolve()
        path = (recorder.dir / request.match_info["path"]).resolve()  # follows latest_* links
        found = path.is_relative_to(base) and path.is_file() and path.suffix in (".mp4", ".jpg")
    except (ValueError, OSError):  # a NUL byte, a name too long
        found = False
    if not found:
        raise _error(web.HTTPNotFound, "no such recording")
    return web.FileResponse(
        path, headers={"Cache-Control": "no-store" if "latest_" in request.match_info["path"] else "max-age=3600"}
    )


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
    snapshot = relay.telemetry.latest.as_dict()
    snapshot["streams"] = [
        {**sample, **_describe(request, relay.streams[sample["name"]])}
        for sample in snapshot["streams"]
        if sample["name"] in relay.streams
    ]
    snapshot["viewers"] = relay.sessions.connected()
    snapshot["rtsp"] = {
        "enabled": relay.config.rtsp.enabled,
        "mediamtx_up": relay.mediamtx.ready.is_set() if relay.mediamtx else None,
        "mediamtx_restarts": relay.mediamtx.restarts if relay.mediamtx else 0,
    }
    return web.json_response(snapshot)


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


@aiohttp_jinja2.template("index.html")
async def index(request: web.Request) -> dict:
    return {"streams": list(request.app[RELAY].streams.values())}


@aiohttp_jinja2.template("view.html")
async def view(request: web.Request) -> dict:
    relay = request.app[RELAY]
    name = _stream_or_404(request)
    return {
        "stream": relay.streams[name],
        "rtsp_url": relay.rtsp_url(name, display_host(request)),
        "rtsp_needs_login": bool(relay.config.rtsp.user),
        "recorded": name in relay.recorders,
    }


def make_app(relay: Relay) -> web.Application:
    """The aiohttp application; starts and closes ``relay`` with itself."""
    # forwarded first: the checks after it see the client behind a trusted reverse proxy, not the proxy.
    app = web.Application(client_max_size=MAX_OFFER_BYTES, middlewares=[forwarded, cors, guard])
    app[PROXIES] = parse_networks(relay.config.http.trusted_proxies)
    app[RELAY] = relay
    app[ACCESS] = Access(relay.config, relay.state_dir)
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True)

    async def relay_lifecycle(app: web.Application):
        await relay.start()
        yield
        await relay.close()
        app[ACCESS].close()

    app.cleanup_ctx.append(relay_lifecycle)
    app[MJPEG_CLIENTS] = set()
    app[LIMITER] = RateLimiter(relay.config.webrtc.session_rate, relay.config.webrtc.session_burst)

    async def end_streaming_clients(app: web.Application) -> None:
        for task in list(app[MJPEG_CLIENTS]):
            task.cancel()

    app.on_shutdown.append(end_streaming_clients)
    app.router.add_get("/", index)
    app.router.add_get("/view/{stream}", view)
    app.router.add_post("/whep/{stream}", whep_offer)
    app.router.add_route("OPTIONS", "/whep/{stream}", whep_options)
    app.router.add_route("OPTIONS", "/whep/{stream}/{session}", whep_options)
    app.router.add_patch("/whep/{stream}/{session}", whep_patch)
    app.router.add_delete("/whep/{stream}/{session}", whep_delete)
    app.router.add_get("/api/v1/streams", api_streams)
    app.router.add_get("/api/v1/rtsp", api_rtsp)
    app.router.add_get("/snapshot/{stream}.jpg", snapshot)
    app.router.add_get("/mjpeg/{stream}", mjpeg)
    app.router.add_get("/api/v1/recordings/{stream}", api_recordings)
    app.router.add_get("/recordings/{stream}", recordings_page)
    app.router.add_get("/recordings/{stream}/{path:.+}", recording_file)
    app.router.add_get("/api/v1/status", api_status)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_static("/static/", STATIC_DIR, name="static")
    return app
