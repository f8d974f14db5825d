"""WHIP egress (RFC 9725): push a stream's one encoding to a media server that fans it out.

A ``WhipPublisher`` is one more hub subscriber, exactly like a WebRTC viewer:
its aiortc sender gets the shared packer and the per-frame send loop
(``relay.webrtc.rtpsend.attach_to_sender``), so no second encoder runs, the server's
PLI asks the shared encoder for a keyframe, and a slow or dead server costs
only its own bounded queue (it skips to the next keyframe like any viewer),
never the viewers' frames.

A session: the full offer (aiortc gathers every candidate first; it does not
trickle) is POSTed with ``Authorization: Bearer <token>``; the ``201``'s
``Location``, relative or absolute, is the session, DELETEd on stop and
before the next one. The token goes only to the configured URL's own origin
(scheme, host, port): a redirect or a ``Location`` elsewhere never gets it.

ICE servers that the ``201`` names in ``Link`` headers (those aiortc can
parse) come first, before the relay's own: aiortc gathers with the first STUN
and the first TURN URL only, and the engine's are its own. aiortc cannot add
servers to an offer it has made, so when they would change the servers it
gathers with (new credentials alone do not), the session is ended and offered
once more with them. They are kept for later sessions once a session gathered
with them connects, and dropped when one fails before it connects.

The offer names the stream's H.264 as its SPS says (``profile-level-id``: High for a
camera passed through that sends High), not aiortc's Constrained Baseline; the
answer is named back for aiortc, which matches codecs on it. A stream whose
SPS has not been seen yet (no keyframe) is not offered until it has; one whose
profile changes (another camera, a new SPS) is offered again.

A server that refuses, vanishes (silent, or its connection fails) or cannot
be reached gets one log line and a retry with backoff; only time spent
publishing resets the backoff.

The URL is shown as ``scheme://host:port/...`` only: some services put the
stream's secret in the path (Cloudflare) or in the query.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiortc import RTCBundlePolicy, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from yarl import URL

from .. import h264
from ..aio import cancel_and_wait
from ..backoff import Backoff, Retry
from ..config import IceServer
from ..hub import PacketHub
from ..logsafe import MAX_REASON, printable, reason_phrase, redact
from ..status import ConsumerStats, Metric
from . import borrowed
from .ice import gathered_with, parse_links
from .rtpsend import HubTrack, attach_to_sender, h264_preferences
from .sessions import CONNECT_TIMEOUT, LIVENESS_CHECK

log = logging.getLogger(__name__)

SDP_TYPE = "application/sdp"
# An offer is answered in well under a second; a server that takes longer is hung, and the POST is tried again.
POST_TIMEOUT = 10.0
# The DELETE on stop: a server that is gone must not hold the relay's shutdown for long.
DELETE_TIMEOUT = 2.0
MAX_ANSWER_BYTES = 64 * 1024  # an answer is ~2 KiB; more is not an answer
# A live server sends STUN consent checks every few seconds and RTCP (mediamtx also a PLI every 2 s);
# this long without a datagram, it is gone (killed, rebooted, unplugged). As for viewers
# (relay.webrtc.sessions.VIEWER_SILENCE), silence and not unanswered checks: a busy server answers late.
SERVER_SILENCE = 10.0
# Reconnect pacing: the first retry at once (a restart), then slower; a server that keeps refusing
# (a wrong token) is asked again at most twice a minute. stable_after counts publishing only: a connect
# timeout (15 s) or a POST timeout (10 s) as long is a failure like any other.
RETRY = Backoff(initial=0.5, cap=30.0)
ERROR_CHARS = 200  # of a refusal's body, in the log and the API
SPS_POLL = 0.1  # seconds between looks for the stream's first SPS (its first keyframe) before a first offer
_RTPMAP_H264 = re.compile(r"^a=rtpmap:(\d{1,3}) H264/", re.I | re.M)  # a payload type is 0..127


class WhipError(Exception):
    """One session ended or could not start; ``str()`` is the reason, fit for one log line."""


class _OfferAgain(Exception):
    """The 201 named ICE servers that would change those aiortc gathers with; that session is ended."""

    def __init__(self, servers: list[IceServer]) -> None:
        self.servers = servers


def origin(url: str) -> tuple[str, str | None, int | None]:
    """(scheme, host, port), the scheme's default port filled in: whom a request to ``url`` goes to."""
    u = URL(url)
    return u.scheme, u.host, u.port


def shown_url(url: str) -> str:
    """``https://user:pw@host:8443/secret/whip?token=x`` -> ``https://host:8443/...``: for logs and the API."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/..."


class WhipPublisher:
    """Publishes one stream's hub to one WHIP endpoint until closed."""

    def __init__(
        self,
        hub: PacketHub,
        url: str,
        bearer_token: str = "",
        ice_servers: Callable[[], list[RTCIceServer]] = list,
        connect_timeout: float = CONNECT_TIMEOUT,
        retry: Backoff = RETRY,
        batch: bool = True,
        index: int = 0,
        sps: Callable[[], h264.Sps | None] | None = None,
    ) -> None:
        self.hub = hub
        self.index = index  # of its [[whip]] entry: its metrics' label
        self.stream = hub.stream
        self.url = url
        self.shown_url = shown_url(url)
        self.state = "starting"  # connecting, publishing, retrying, stopped
        self.sessions = 0  # sessions that connected
        self.errors = 0
        self.last_error = ""
        self.link_servers: list[IceServer] = []  # the engine's (Link headers) of the last session that connected
        self.profile_level_id = ""  # offered in the last offer: the stream's SPS ("" for aiortc's own)
        self.answered_profile_level_id = ""  # what the server's answer named for it
        # The SPS of what the hub carries (the stream's), to offer its profile; None: aiortc's Constrained Baseline.
        self._sps = sps
        self._token = bearer_token
        self._origin = origin(url)  # the token's only destination
        # The relay's own ([webrtc] ice_servers), asked for each session: minted TURN credentials expire.
        self._ice_servers = ice_servers
        self._connect_timeout = connect_timeout
        self._batch = batch  # RTP through the socket batcher (relay.webrtc.udpbatch)
        self._sent = (0, 0)  # payload bytes and packets of the sessions that ended
        self._sender = None  # the current session's RTP sender
        self._retry = Retry(retry)
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._release_bound: Callable[[], None] | None = None  # borrowed.CLOSE_ALL_BOUND, while started

    @property
    def bytes_sent(self) -> int:
        """RTP payload bytes sent to the server, all sessions."""
        return self._sent[0] + (borrowed.sent(self._sender)[0] if self._sender else 0)

    @property
    def packets_sent(self) -> int:
        return self._sent[1] + (borrowed.sent(self._sender)[1] if self._sender else 0)

    def describe(self) -> dict:
        """For the API: never the token, and the URL without its path."""
        return {
            "url": self.shown_url,
            "state": self.state,
            "sessions": self.sessions,
            "errors": self.errors,
            "last_error": self.last_error,
            "bytes_sent": self.bytes_sent,
            "packets_sent": self.packets_sent,
            "ice_servers": [url for s in self.link_servers for url in s.urls],
            "profile_level_id": self.profile_level_id,
            "answered_profile_level_id": self.answered_profile_level_id,
        }

    def stats(self) -> ConsumerStats:
        labels = {"stream": self.stream, "whip": str(self.index), "url": self.shown_url}
        up = int(self.state == "publishing")
        return ConsumerStats(
            {"whip": [self.describe()]},
            (
                Metric("camrelay_whip_up", "gauge", "1 while publishing over WHIP.", up, labels),
                Metric(
                    "camrelay_whip_sessions_total", "counter", "WHIP sessions that connected.", self.sessions, labels
                ),
                Metric(
                    "camrelay_whip_errors_total",
                    "counter",
                    "WHIP sessions refused, failed or lost.",
                    self.errors,
                    labels,
                ),
                Metric("camrelay_whip_sent_bytes_total", "counter", "RTP payload bytes sent.", self.bytes_sent, labels),
            ),
        )

    def start(self) -> None:
        parts = urlsplit(self.url)
        if self._token and parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
            log.warning("stream=%s whip=%s sends its bearer token over plain http; use https", *self._ids())
        # A new connection per request: no kept-alive socket to a server that has since restarted.
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        # A session's ICE sockets closed with it, when the publisher is stopped in its gathering too
        self._release_bound = borrowed.CLOSE_ALL_BOUND.hold()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"whip-{self.stream}")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        if self._http is not None:
            await self._http.close()
        if self._release_bound is not None:
            self._release_bound()
            self._release_bound = None
        self.state = "stopped"
        log.info("stream=%s whip=%s stopped", *self._ids())

    def _ids(self) -> tuple[str, str]:
        return self.stream, self.shown_url

    async def _run(self) -> None:
        while True:
            try:
                await self._session()
            except (WhipError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                self._failed(exc)
            except Exception as exc:  # a bug: its traceback once a retry, never faster
                self._failed(exc, traceback=True)
            delay = self._retry.next_delay()
            self.state = "retrying"
            log.warning("stream=%s whip=%s %s; retrying in %.1fs", *self._ids(), self.last_error, delay)
            await asyncio.sleep(delay)

    def _failed(self, exc: BaseException, traceback: bool = False) -> None:
        self.errors += 1
        text = str(exc).strip() or type(exc).__name__
        if not isinstance(exc, WhipError):
            text = f"{type(exc).__name__}: {text}"
        # An exception may quote the URL (and so a secret in its path) or the token.
        self.last_error = redact(text.replace(self.url, self.shown_url), [self._token])[:ERROR_CHARS]
        if traceback:
            log.error("stream=%s whip=%s failed unexpectedly", *self._ids(), exc_info=exc)

    async def _session(self) -> None:
        self.state = "connecting"
        own = self._ice_servers()  # once a session: both offers gather with the same minted credentials
        links, self.link_servers = self.link_servers, []  # kept again once a session gathered with them connects
        try:
            offered = await self._offer(links, own, again=True)
        except _OfferAgain as exc:
            log.info("stream=%s whip=%s server names other ICE servers; offering again with them", *self._ids())
            links = exc.servers
            offered = await self._offer(links, own, again=False)
        pc, track, location, named = offered
        try:
            await self._wait_connected(pc)
            self.link_servers = named or links
            self.sessions += 1
            self.state = "publishing"
            log.info("stream=%s whip=%s publishing session=%d", *self._ids(), self.sessions)
            await self._watch(pc)
        finally:
            await self._close_session(pc, track, location)

    async def _offer(
        self, links: list[IceServer], own: list[RTCIceServer], again: bool
    ) -> tuple[RTCPeerConnection, HubTrack, str, list[IceServer]]:
        """A peer connection gathered with the engine's ``links`` and the relay's ``own`` servers, with the answer
        applied; its track, the session's URL and the ICE servers the 201 named. ``_OfferAgain`` (the session
        ended) when ``again`` and those would change the servers aiortc gathers with."""
        config = RTCConfiguration(iceServers=_servers(links, own), bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
        pc = RTCPeerConnection(config)
        track = HubTrack(self.hub, f"whip-{self.stream}")
        location = None
        try:
            # Subscribed first: the keyframe that makes the SPS known is the track's first frame, not missed.
            while self._sps is not None and self._sps() is None:
                await asyncio.sleep(SPS_POLL)  # nothing to describe yet: the stream has not sent a keyframe
            transceiver = pc.addTransceiver(track, direction="sendonly")
            codecs = h264_preferences()
            if self._sps is not None:  # one H.264 payload type (and its RTX), named as the stream's SPS says
                codecs = [c for i, c in enumerate(codecs) if i == 0 or c.mimeType.lower() == "video/rtx"]
            transceiver.setCodecPreferences(codecs)
            attach_to_sender(transceiver.sender, self.hub, self._batch)
            self._sender = transceiver.sender
            await pc.setLocalDescription(await pc.createOffer())
            offer, aiortcs = self._name_profile(pc.localDescription.sdp)
            answer, location, named = await self._post(offer)
            if again and named and gathered_with(_servers(named, own)) != gathered_with(_servers(links, own)):
                raise _OfferAgain(named)
            answer = self._check_answer(answer, aiortcs)
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            except Exception as exc:  # aiortc's parser raises ValueError, AssertionError, KeyError, ...
                raise WhipError(f"answer could not be applied: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            await self._close_session(pc, track, location)
            raise
        return pc, track, location, named

    def _name_profile(self, offer: str) -> tuple[str, dict[int, str]]:
        """The offer with each H.264 payload type named as the stream's SPS says; and what aiortc had named them."""
        sps = self._sps() if self._sps is not None else None
        aiortcs = h264_payload_types(offer)
        self.profile_level_id = sps.sdp_profile_level_id if sps is not None else ""
        if not self.profile_level_id:
            return offer, {}
        for pt in aiortcs:
            offer = h264.with_profile_level_id(offer, pt, self.profile_level_id)
        return offer, aiortcs

    def _check_answer(self, answer: str, aiortcs: dict[int, str]) -> str:
        """The answer named back for aiortc; ``WhipError`` when it takes no H.264 payload type of the offer."""
        taken = {pt: pli for pt, pli in h264_payload_types(answer).items() if pt in aiortcs}
        if aiortcs and not taken:
            raise WhipError(f"refused H.264 profile-level-id {self.profile_level_id}: the answer takes no H.264")
        self.answered_profile_level_id = next(iter(taken.values()), "")
        for pt in taken:
            answer = h264.with_profile_level_id(answer, pt, aiortcs[pt])
        return answer

    def _check_profile(self) -> None:
        """A stream whose SPS now names another profile than the one offered: ``WhipError``, to offer again."""
        sps = self._sps() if self._sps is not None and self.profile_level_id else None
        if sps is not None and sps.sdp_profile_level_id != self.profile_level_id:
            raise WhipError(
                f"the stream now sends profile-level-id {sps.sdp_profile_level_id} ({sps.describe()}), "
                f"offered {self.profile_level_id}; offering again"
            )

    def _headers(self, url: str, **extra: str) -> dict[str, str]:
        """With the token only for the configured URL's origin (aiohttp drops it from a redirect elsewhere)."""
        if self._token and origin(url) == self._origin:
            extra["Authorization"] = f"Bearer {self._token}"
        return extra

    async def _post(self, offer: str) -> tuple[str, str, list[IceServer]]:
        """POST the offer; the answer, the session's absolute URL and the ICE servers of the ``Link`` headers."""
        assert self._http is not None
        async with self._http.post(
            self.url,
            data=offer.encode(),
            headers=self._headers(self.url, **{"Content-Type": SDP_TYPE}),
            timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT),
        ) as resp:
            body = b""  # the whole answer, or a little more than one can be
            while len(body) <= MAX_ANSWER_BYTES and (chunk := await resp.content.read(MAX_ANSWER_BYTES + 1)):
                body += chunk
            if resp.status != 201:
                reason = body.decode(errors="replace").strip().splitlines()[0] if body.strip() else resp.reason
                raise WhipError(f"refused: {resp.status} {reason_phrase(reason or '')}")
            if resp.content_type != SDP_TYPE or len(body) > MAX_ANSWER_BYTES:
                raise WhipError(f"201 without an SDP answer ({resp.content_type or 'no Content-Type'})")
            if "Location" not in resp.headers:
                raise WhipError("201 without a Location")
            try:
                location = urljoin(str(resp.url), resp.headers["Location"])  # the URL after any redirect
            except ValueError:  # http://[::1/x
                raise WhipError(
                    f"201 with a Location that cannot be read: {printable(resp.headers['Location'], MAX_REASON)!r}"
                ) from None
            return body.decode(errors="replace"), location, parse_links(resp.headers.getall("Link", []))

    async def _wait_connected(self, pc: RTCPeerConnection) -> None:
        """Until the connection is up and its first packet sent: a server has a stream for its readers only once
        media came (the stream's first keyframe may be a forced one, half a second away)."""
        deadline = time.monotonic() + self._connect_timeout
        while pc.connectionState != "connected" or not (self._sender and borrowed.sent(self._sender)[1]):
            if pc.connectionState in ("failed", "closed"):
                raise WhipError(f"connection {pc.connectionState} before it was up")
            if time.monotonic() > deadline:
                up = "connected, nothing sent" if pc.connectionState == "connected" else "no connection"
                raise WhipError(f"{up} within {self._connect_timeout:g}s (ICE or DTLS)")
            await asyncio.sleep(LIVENESS_CHECK / 10)

    async def _watch(self, pc: RTCPeerConnection) -> None:
        """Until the connection fails or the server falls silent; a long enough run resets the backoff."""
        since = time.monotonic()
        try:
            while True:
                await asyncio.sleep(LIVENESS_CHECK)
                if pc.connectionState != "connected":
                    raise WhipError(f"connection {pc.connectionState}")
                heard = borrowed.last_heard(pc)
                if heard is not None and time.monotonic() - heard > SERVER_SILENCE:
                    raise WhipError(f"server silent for {SERVER_SILENCE:g}s")
                self._check_profile()
        finally:
            self._retry.ran(time.monotonic() - since)

    async def _close_session(self, pc: RTCPeerConnection, track: HubTrack, location: str | None) -> None:
        try:
            try:
                await self._delete(location)  # first: RFC 9725's way to end a session; closing DTLS is the fallback
            finally:  # even when the publisher is stopped in the DELETE: else the session's ICE sockets stay open
                track.stop()
                await pc.close()
        finally:
            # read once the send loop has ended (pc.close waits for it): every frame sent until then counted, the
            # stream's batch's too (its lane's last counts are brought in as the loop ends)
            if self._sender is not None:
                sent = borrowed.sent(self._sender)
                self._sent = (self._sent[0] + sent[0], self._sent[1] + sent[1])
                self._sender = None

    async def _delete(self, location: str | None) -> None:
        """End the session on the server; one that is gone or refuses is not waited for."""
        if location is None or self._http is None:
            return
        try:
            async with self._http.delete(
                location, headers=self._headers(location), timeout=aiohttp.ClientTimeout(total=DELETE_TIMEOUT)
            ) as resp:
                await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:  # ValueError: no URL
            log.debug("stream=%s whip=%s DELETE failed: %s", *self._ids(), type(exc).__name__)


def _servers(links: list[IceServer], own: list[RTCIceServer]) -> list[RTCIceServer]:
    """The engine's servers first: aiortc gathers with the first STUN and the first TURN URL only."""
    return [s.to_aiortc() for s in links] + own


def h264_payload_types(sdp: str) -> dict[int, str]:
    """The H.264 payload types of ``sdp``'s video sections that are not refused (port 0), each with its
    ``profile-level-id`` ("" where its fmtp names none)."""
    out: dict[int, str] = {}
    for section in re.split(r"^(?=m=)", sdp, flags=re.M)[1:]:
        if not section.startswith("m=video ") or section.split(" ", 2)[1] == "0":
            continue
        for pt in (int(p) for p in _RTPMAP_H264.findall(section) if int(p) <= 127):
            fmtp = re.search(rf"^a=fmtp:{pt} .*?profile-level-id=([0-9A-Fa-f]{{6}})", section, re.M)
            out[pt] = fmtp[1].lower() if fmtp else ""
    return out
