"""WHEP (draft-ietf-wish-whep): a viewer's session from its offer, trickled candidates, its end; CORS for it.

``POST /whep/<stream>`` with an SDP offer gets ``201`` and the answer; the
``Location`` is the session, which takes ``PATCH`` (trickled candidates) and
``DELETE``. The ``201``, and an ``OPTIONS`` that carries a viewer's
credentials, list the viewer's ICE servers in ``Link`` headers. Every bad
input gets its own status and a one-line reason in the body, never a 500.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time

from aiohttp import web

from relay.logsafe import Throttled
from relay.service import UnknownStream
from relay.webrtc import ice
from relay.webrtc.sessions import OfferRejected
from relay.webrtc.shards import ShardUnavailable

from .access import VIEWER
from .common import RELAY, error, stream_or_404
from .forwarded import is_in
from .limits import RateLimiter
from .sdp import (
    MAX_CANDIDATES,
    SdpError,
    answer_all,
    candidate_count,
    check_candidate,
    check_offer,
    check_text,
    find_audio,
    fit_h264,
    is_ice_restart,
    served_only,
    usable_candidates,
)

log = logging.getLogger(__name__)
refusals = Throttled(log)  # refused sessions: one line a second at most, however many are refused

LIMITER = web.AppKey("limiter", RateLimiter)  # new viewer sessions per client address
MAX_OFFER_BYTES = 64 * 1024  # a browser offer is ~5 KiB; more is not an offer
BODY_TIMEOUT = 10.0  # seconds for a request body (an offer) to arrive once its head has: a LAN needs milliseconds
SDP_TYPE = "application/sdp"
SDPFRAG_TYPE = "application/trickle-ice-sdpfrag"
RETRY_AFTER_FULL = "10"  # seconds a client should wait when a stream is full
RETRY_AFTER_PENDING = "5"  # seconds to wait when too many sessions are still connecting (most take < 1 s)
CORS_MAX_AGE = "600"  # seconds a browser may cache a preflight
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


async def whep_offer(request: web.Request) -> web.Response:
    relay = request.app[RELAY]
    name = stream_or_404(request)
    address = request.remote or "?"
    wait = request.app[LIMITER].check(address, time.monotonic())
    if wait:
        refusals.warn("stream=%s new-session rate limit hit by %s", name, address)
        raise error(
            web.HTTPTooManyRequests,
            f"too many new sessions from {address}; retry later",
            headers={"Retry-After": str(max(1, round(wait)))},
        )
    if request.content_type != SDP_TYPE:
        raise error(
            web.HTTPUnsupportedMediaType, f"Content-Type must be {SDP_TYPE}, got {request.content_type or 'none'!r}"
        )
    body = await _read_body(request, "offer")
    try:
        offer = body.decode("utf-8")
    except UnicodeDecodeError:
        raise error(web.HTTPBadRequest, "offer is not UTF-8 text") from None
    try:
        summary = check_offer(offer)
    except SdpError as exc:
        raise error(web.HTTPBadRequest, f"malformed offer: {exc}") from None
    stream = relay.streams[name]
    audio = find_audio(offer) if stream.has_audio else None  # its Opus, to the offer's audio section if it has one
    served = served_only(usable_candidates(offer, _from_loopback(request)), summary.served, audio)
    sps = stream.sps  # of the H.264 the stream sends now; None before its first keyframe
    fit = None
    if sps is not None:
        try:
            fit = fit_h264(served, sps.profile_level_id)
        except SdpError as exc:
            refusals.warn("stream=%s offer refused: %s", name, exc)
            raise error(web.HTTPBadRequest, str(exc)) from None
        served = fit.offer_for_aiortc(served)
    _check_pending(relay, name, address)
    _check_viewer_limits(relay, name, request.remote)
    try:
        session, answer = await relay.sessions.create(
            name, served, request.remote or "?", stream.audio if audio is not None else None
        )
        if fit is not None:
            answer = fit.answer(answer)  # its profile-level-id: the SPS's (Safari shows black otherwise)
    except OfferRejected as exc:
        raise error(web.HTTPBadRequest, str(exc)) from None
    except UnknownStream:
        raise error(web.HTTPNotFound, f"no stream named {name!r}") from None
    except (ShardUnavailable, TimeoutError) as exc:  # a fan-out shard restarting or stuck: one line, a retry
        refusals.warn("stream=%s no fan-out shard took the viewer: %s", name, exc or type(exc).__name__)
        raise error(
            web.HTTPServiceUnavailable,
            f"could not set up the session: {exc or 'the fan-out shard did not answer'}",
            headers={"Retry-After": RETRY_AFTER_PENDING},
        ) from None
    except Exception as exc:  # ICE could not bind, DTLS setup failed: ours, not the client's
        log.exception("stream=%s could not set up a viewer session", name)
        raise error(
            web.HTTPServiceUnavailable,
            f"could not set up the session: {type(exc).__name__}",
            headers={"Retry-After": "5"},
        ) from None
    try:
        _check_viewer_limits(relay, name, request.remote, this_one=1)  # others may have come in meanwhile
    except web.HTTPServiceUnavailable:
        await relay.sessions.close(session.id, "over the viewer limit")
        raise
    session.candidates = candidate_count(served.splitlines())
    try:
        whole = answer_all(offer, summary.served, answer, audio)
    except Exception as exc:  # an offer the checks passed that the answer cannot be fitted to: refused, not a 500
        refusals.warn("stream=%s offer refused: its answer could not be made whole: %r", name, exc)
        await relay.sessions.close(session.id, "answer could not be made")
        raise error(web.HTTPBadRequest, "offer could not be answered") from None
    location = f"/whep/{name}/{session.id}"
    response = web.Response(
        status=201,
        body=whole.encode(),
        headers={"Location": location, "Content-Type": SDP_TYPE},
    )
    _add_ice_links(request, response)  # no ETag: a session cannot restart ICE (see whep_patch)
    return response


def _from_loopback(request: web.Request) -> bool:
    """The client is on this machine: its loopback candidates are its own (an IPv4 client of a dual-stack socket,
    ``::ffff:127.0.0.1``, as its IPv4 address)."""
    return is_in(request.remote or "", LOOPBACK)


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
        return error(
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
        raise error(web.HTTPRequestTimeout, f"{what} not received within {BODY_TIMEOUT:g}s") from None
    except ConnectionError:  # the client went away mid-body: nobody to answer, nothing worth a traceback
        raise error(web.HTTPBadRequest, f"{what} cut off: the connection was lost") from None
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
            raise error(
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
            raise error(
                web.HTTPServiceUnavailable,
                f"{what} has its maximum of {limit} viewers",
                headers={"Retry-After": RETRY_AFTER_FULL},
            )


def _session_or_404(request: web.Request):
    # One answer for a wrong stream and a wrong session: a session URL needs no credentials (it is
    # the capability), so its 404 must not tell which streams exist.
    session = request.app[RELAY].sessions.get(request.match_info["session"])
    if session is None or session.stream != request.match_info["stream"]:
        raise error(web.HTTPNotFound, "no such session")
    return session


async def whep_patch(request: web.Request) -> web.Response:
    session = _session_or_404(request)
    if request.content_type != SDPFRAG_TYPE:
        raise error(web.HTTPUnsupportedMediaType, f"Content-Type must be {SDPFRAG_TYPE}")
    # A session has no entity-tag (it cannot restart ICE): "If-Match: *" matches it, a tag does not (RFC 9110 §13.1.1).
    if request.headers.get("If-Match", "*").strip() != "*":
        raise error(
            web.HTTPPreconditionFailed,
            "If-Match names an entity-tag this relay never gave (its sessions have none); send If-Match: * or none",
        )
    body = await _read_body(request, "fragment")
    try:
        text = body.decode("utf-8")
        check_text(text, "fragment")
    except UnicodeDecodeError:
        raise error(web.HTTPBadRequest, "fragment is not UTF-8 text") from None
    except SdpError as exc:
        raise error(web.HTTPBadRequest, f"malformed fragment: {exc}") from None
    fragment = usable_candidates(text, _from_loopback(request))
    if is_ice_restart(fragment, session.offer_sdp):
        # aiortc cannot restart ICE. draft-ietf-wish-whep-03 §4.5.1: a session that trickles but cannot
        # restart answers 422, and keeps its ICE session.
        raise error(
            web.HTTPUnprocessableEntity,
            "ICE restart is not supported: this session keeps its ICE credentials; for new ones DELETE it and POST",
        )
    candidates = [line[len("a=candidate:") :] for line in fragment.splitlines() if line.startswith("a=candidate:")]
    try:
        for candidate in candidates:
            check_candidate(candidate)
    except SdpError as exc:
        raise error(web.HTTPBadRequest, f"bad candidate: {exc}") from None
    added = len(candidates)
    if session.candidates + added > MAX_CANDIDATES:
        refusals.warn(
            "stream=%s session=%s over %d candidates; refused", session.stream, session.id[:8], MAX_CANDIDATES
        )
        raise error(
            web.HTTPBadRequest,
            f"too many candidates: {session.candidates} already, {added} more, at most {MAX_CANDIDATES} a session",
        )
    session.candidates += added
    try:
        await request.app[RELAY].sessions.add_candidates(session, fragment)
    except OfferRejected as exc:
        raise error(web.HTTPBadRequest, str(exc)) from None
    except ShardUnavailable:  # its fan-out shard ended meanwhile, and the session with it
        raise error(web.HTTPNotFound, "no such session") from None
    except TimeoutError:
        raise error(
            web.HTTPServiceUnavailable, "the session's fan-out shard did not answer", headers={"Retry-After": "5"}
        ) from None
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


def setup(app: web.Application) -> None:
    w = app[RELAY].config.webrtc
    app[LIMITER] = RateLimiter(w.session_rate, w.session_burst)
    app.router.add_post("/whep/{stream}", whep_offer)
    app.router.add_route("OPTIONS", "/whep/{stream}", whep_options)
    app.router.add_route("OPTIONS", "/whep/{stream}/{session}", whep_options)
    app.router.add_patch("/whep/{stream}/{session}", whep_patch)
    app.router.add_delete("/whep/{stream}/{session}", whep_delete)
