"""WebRTC viewers (WHEP): a session per viewer, created from its offer and freed on every way out.

Each session is an aiortc peer that only packetizes and encrypts: its track
yields the hub's already-encoded frames and its sender sends them per frame
(``relay.webrtc.rtpsend``). A session that never connects, or whose viewer
falls silent, is freed by the relay (``CONNECT_TIMEOUT``, ``VIEWER_SILENCE``).
The sessions of one stream are one of its consumers (``StreamViewers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp

from ..hub import PacketHub
from ..status import ConsumerStats
from . import borrowed, ice, playout, udpbatch
from .opus import AudioTrack, add_audio
from .rtpsend import HubTrack, add_header_extension, attach_to_sender, h264_preferences, use_c_send

log = logging.getLogger(__name__)

# A session whose ICE/DTLS never completes is freed by us, not by aiortc's
# minute-long consent timeout.
CONNECT_TIMEOUT = 15.0
# A viewer that vanishes without a DELETE or a DTLS close (a laptop lid shut,
# a phone leaving Wi-Fi) would hold its slot and socket until aioice's consent
# checks give up: 6 unanswered checks 5 s apart, 30 s. A live viewer is never
# silent that long: it sends RTCP receiver reports about once a second and
# STUN consent checks every few seconds. So the relay ends a session that has
# sent nothing for VIEWER_SILENCE. Silence, not unanswered checks, because an
# overloaded but alive viewer answers late (each consent check waits 0.5 s)
# while still sending its reports.
VIEWER_SILENCE = 10.0  # seconds without a datagram from a connected viewer
LIVENESS_CHECK = 2.0  # seconds between looks
# What a viewer's answer leaves out, of what aiortc would name: the means of a receiver's bandwidth estimate
# (abs-send-time, on which a receiver bases its REMB, and the REMB feedback itself). The relay sends every viewer
# the stream's one encoding and ignores their estimates, so a viewer computing one and sending it (aiortc's on
# every packet it receives, and a REMB each time its estimate moves; a browser's about once a second) is work for
# nothing on both sides: 4 bytes a packet, a clock read a frame, RTCP to read (docs/benchmarks.md, "The 60-viewer
# collapse, found"). mediamtx's answers name neither.
UNUSED_EXTENSIONS = frozenset({"http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"})
UNUSED_FEEDBACK = frozenset({"goog-remb"})


@contextlib.contextmanager
def process_patches(ice_addresses: tuple[str, ...] = (), batch: bool = True, c_send: bool = True, c_batch: bool = True):
    """The process-wide patches of aioice and aiortc a relay needs, held while it runs
    (``relay.webrtc.borrowed.Patch``): host candidates only on ``ice_addresses`` (none: every interface), the watch
    on what each connection hears, the payload types an answer keeps from the offer (Chromium's 35-63 too), one DTLS
    certificate for every session (made at once, with its OpenSSL context), receivers' bandwidth estimators made
    only if video comes, an answer's gathering and remote candidates awaited in turn (fewer passes of the loop), ICE
    done as soon as its pair is nominated (not after aioice's 20 ms pacing wait: DTLS starts sooner), every socket a
    connection binds closed with it (a gathering cancelled half-way too), (``batch``) aioice's own sends through the
    socket batcher, and (``c_send``) the C send path where it is built (``rtpsend.use_c_send``; ``c_batch``: one C
    call a frame for every viewer of a stream, with aiortc's counts read through the C lanes' sync,
    ``borrowed.SYNCED_COUNTS``). Relays in one process share them: the addresses of all that name some, batching
    while any wants it, the C path as the last one started says."""
    with contextlib.ExitStack() as held:
        if ice_addresses:
            held.callback(borrowed.restrict_host_addresses(ice_addresses))
        held.callback(borrowed.WATCH_ICE.hold())
        held.callback(borrowed.OFFERED_PAYLOAD_TYPES.hold())
        held.callback(borrowed.SHARED_CERTIFICATE.hold())
        borrowed.make_shared_certificate()  # now, not in the first viewer's answer
        held.callback(borrowed.LAZY_BITRATE_ESTIMATOR.hold())
        held.callback(borrowed.GATHER_IN_TURN.hold())
        held.callback(borrowed.CANDIDATES_IN_TURN.hold())
        held.callback(borrowed.PROMPT_ICE.hold())
        held.callback(borrowed.CLOSE_ALL_BOUND.hold())
        if batch:
            held.callback(udpbatch.PATCH.hold())
        held.callback(borrowed.SYNCED_COUNTS.hold())
        held.callback(use_c_send(c_send, c_batch))
        yield


class OfferRejected(Exception):
    """The offer was well-formed SDP that aiortc could not apply; ``str()`` is the reason."""


@dataclass(eq=False)
class ViewerSession:
    id: str
    stream: str
    remote: str
    pc: RTCPeerConnection
    track: HubTrack
    created: float = field(default_factory=time.monotonic)
    connected_at: float | None = None
    closed: bool = False
    audio: AudioTrack | None = None  # the stream's sound, when the offer takes audio and the stream has it
    candidates: int = 0  # remote candidates offered and trickled, as WHEP counts them (signalling.sdp.MAX_CANDIDATES)
    _deadline: asyncio.TimerHandle | None = None

    def stop_tracks(self) -> None:
        self.track.stop()
        if self.audio is not None:
            self.audio.stop()

    @property
    def state(self) -> str:
        return self.pc.connectionState

    @property
    def offer_sdp(self) -> str:
        """The offer as applied: what a trickled fragment's ICE credentials are checked against."""
        return self.pc.remoteDescription.sdp


class SessionCounts:
    """What WHEP's limits and the API count, of sessions answered (``_sessions``, by id) and being set up
    (``_creating``): each with its ``stream``, ``remote`` and ``connected_at``. Viewers in this process
    (``ViewerSessions``) or in fan-out shards (``relay.webrtc.shards``)."""

    _sessions: dict
    _creating: set

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str):
        return self._sessions.get(session_id)

    def all_sessions(self):
        yield from self._sessions.values()
        yield from self._creating

    def count(self, stream: str | None = None) -> int:
        """Sessions of ``stream`` (or all), those still being set up included."""
        return sum(1 for s in self.all_sessions() if stream is None or s.stream == stream)

    def pending(self, remote: str | None = None) -> int:
        """Sessions being set up or answered but not connected yet (from client address ``remote``, or all)."""
        return sum(1 for s in self.all_sessions() if s.connected_at is None and (remote is None or s.remote == remote))


class ViewerSessions(SessionCounts):
    """Every WebRTC viewer of every stream: create from an offer, free on every exit path."""

    def __init__(
        self,
        hub_for: Callable[[str], PacketHub],
        ice_servers: Callable[[], list[RTCIceServer]] = list,
        connect_timeout: float = CONNECT_TIMEOUT,
        silence: float = VIEWER_SILENCE,
        additional_hosts: tuple[str, ...] = (),
        batch: bool = True,
        playout_delay: tuple[int, int] | None = None,
        on_change: Callable[[ViewerSession, str, str], None] | None = None,
    ) -> None:
        self._hub_for = hub_for
        # Told (session, "connected" or "closed", why) as a session connects and as it ends (a fan-out shard tells
        # the relay, relay.webrtc.shard).
        self._on_change = on_change
        self._playout_delay = playout_delay  # (min, max) ms to viewers that offer the extension; None: not sent
        self._batch = batch  # RTP through the socket batcher (relay.webrtc.udpbatch)
        self._silence = silence
        # Asked for each session (its TURN credentials are minted for it); none: host candidates only,
        # nothing waits on STUN.
        self._ice_servers = ice_servers
        self._additional_hosts = additional_hosts  # more host candidates in every answer (relay.webrtc.ice)
        self._resolver = ice.resolver()  # where their names are looked up
        self._connect_timeout = connect_timeout
        self._sessions: dict[str, ViewerSession] = {}
        # Sessions between an offer and its answer. Counted from create()'s first line, before any
        # await: the limits checked just before it then hold for offers that arrive all at once.
        self._creating: set[ViewerSession] = set()
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        pass  # in-process: nothing to start (relay.webrtc.shards starts its processes)

    def shards(self) -> list[dict]:
        """Per fan-out shard figures (``relay.webrtc.shards``); none here: every viewer is in this process."""
        return []

    def connected(self, stream: str | None = None) -> int:
        return sum(
            1 for s in self._sessions.values() if s.state == "connected" and (stream is None or s.stream == stream)
        )

    async def create(
        self,
        stream: str,
        offer_sdp: str,
        remote: str,
        audio: PacketHub | None = None,
        ice_servers: list[RTCIceServer] | None = None,
    ) -> tuple[ViewerSession, str]:
        """Answer an offer; returns the session and the SDP answer. Raises ``OfferRejected``. ``audio``: the
        stream's audio hub, sent to the offer's audio section (``signalling.sdp.find_audio``); ``ice_servers``:
        this session's (a fan-out shard's, minted by the relay), else the relay's own."""
        hub = self._hub_for(stream)
        hub.expect_joiner()  # its keyframe asked for now, if need be: published, shared, by the time it connects
        session_id = secrets.token_urlsafe(16)
        servers = self._ice_servers() if ice_servers is None else ice_servers
        pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        track = HubTrack(hub, f"webrtc-{session_id[:8]}")
        session = ViewerSession(session_id, stream, remote, pc, track)
        self._creating.add(session)
        try:
            answer = await self._set_up(session, offer_sdp, hub, audio)
        finally:
            self._creating.discard(session)
        self._sessions[session_id] = session
        pc.on("connectionstatechange", lambda: self._on_state(session))
        session._deadline = asyncio.get_running_loop().call_later(self._connect_timeout, self._on_deadline, session)
        log.info(
            "stream=%s session=%s remote=%s created viewers=%d", stream, session_id[:8], remote, self.count(stream)
        )
        return session, answer

    async def _set_up(self, session: ViewerSession, offer_sdp: str, hub: PacketHub, audio: PacketHub | None) -> str:
        """Apply the offer and return the answer; on any failure the peer connection is closed."""
        pc, track = session.pc, session.track
        try:
            transceiver = pc.addTransceiver(track, direction="sendonly")
            # Browsers list VP8 first; without this the H.264 bytes would go
            # out labelled as whatever the offer preferred.
            transceiver.setCodecPreferences(h264_preferences())
            attach_to_sender(transceiver.sender, hub, self._batch)
            if audio is not None:
                session.audio = add_audio(pc, audio, f"{track.name}-audio", self._batch)
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            except Exception as exc:  # aiortc's parser raises ValueError, AssertionError, KeyError, ...
                raise OfferRejected(f"offer could not be applied: {_reason(exc)}") from exc
            if not any(t.sender is transceiver.sender and t.mid is not None for t in pc.getTransceivers()):
                raise OfferRejected("offer has no video section this relay can send to")
            borrowed.answer_without(transceiver, UNUSED_EXTENSIONS, UNUSED_FEEDBACK)
            if self._playout_delay is not None:
                _answer_playout_delay(transceiver, offer_sdp, self._playout_delay)
            try:
                await pc.setLocalDescription(await pc.createAnswer())
            except OSError:
                raise  # ICE could not bind: our problem, not the offer's
            except Exception as exc:  # offers aiortc accepted but cannot answer (found by tests/test_fuzz_whep.py)
                raise OfferRejected(f"offer could not be answered: {_reason(exc)}") from exc
            return await ice.with_additional_hosts(pc.localDescription.sdp, self._additional_hosts, self._resolver)
        except BaseException:
            session.stop_tracks()
            await pc.close()
            raise

    async def add_candidates(self, session: ViewerSession, sdpfrag: str) -> None:
        """Trickled remote candidates (``a=candidate:`` lines of an SDP fragment).

        Those under the ``a=mid`` of an m-section the answer rejected are dropped:
        their transport is gone (the browser gathered for it before the answer).
        Those of a section it answered go to that section's ICE transport, which
        BUNDLE makes one for the video and the audio: the audio's is its, even
        where the audio came first in the offer (its BUNDLE tag), whose candidates
        aiortc's ``addIceCandidate`` would give to no transport (it skips bundled
        sections), and the video's ones too, the video then being bundled.
        """
        answered = {t.mid: t for t in session.pc.getTransceivers() if t.mid is not None}  # the video, any audio
        mid = None
        for raw in sdpfrag.splitlines():
            line = raw.strip()
            if line.startswith("a=mid:"):
                mid = line[6:]
            elif line.startswith("a=candidate:") and (mid is None or mid in answered):
                try:
                    candidate = candidate_from_sdp(line[2:].split(":", 1)[1])
                    transceiver = answered[mid] if mid is not None else next(iter(answered.values()))
                    candidate.sdpMid = transceiver.mid
                    await transceiver.sender.transport.transport.addRemoteCandidate(candidate)
                except Exception as exc:  # aiortc asserts on malformed candidates
                    raise OfferRejected(f"bad candidate line {line[:80]!r}: {_reason(exc)}") from exc
            elif line == "a=end-of-candidates":
                await session.pc.addIceCandidate(None)

    async def close(self, session_id: str, why: str) -> bool:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        session.closed = True
        if session._deadline is not None:
            session._deadline.cancel()
        # Logged as it leaves the count (the API's viewers), not after the peer connection's close: a reader of
        # both never sees one without the other.
        log.info(
            "stream=%s session=%s closed (%s) viewers=%d",
            session.stream,
            session_id[:8],
            why,
            self.count(session.stream),
        )
        if self._on_change is not None:
            self._on_change(session, "closed", why)
        session.stop_tracks()
        await session.pc.close()
        return True

    def for_stream(self, stream: str) -> StreamViewers:
        return StreamViewers(self, stream)

    async def close_stream(self, stream: str, why: str) -> None:
        await asyncio.gather(*(self.close(s.id, why) for s in list(self._sessions.values()) if s.stream == stream))

    async def close_all(self) -> None:
        self._resolver.shutdown(wait=False, cancel_futures=True)  # a lookup a dead DNS server holds ends by itself
        await asyncio.gather(*(self.close(sid, "shutdown") for sid in list(self._sessions)))
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _on_state(self, session: ViewerSession) -> None:
        state = session.pc.connectionState
        if state == "connected" and session.connected_at is None:
            session.connected_at = time.monotonic()
            if session._deadline is not None:
                session._deadline.cancel()
            session._deadline = asyncio.get_running_loop().call_later(LIVENESS_CHECK, self._check_alive, session)
            log.info(
                "stream=%s session=%s connected in %.0fms",
                session.stream,
                session.id[:8],
                (session.connected_at - session.created) * 1000,
            )
            if self._on_change is not None:
                self._on_change(session, "connected", "")
        elif state in ("failed", "closed") and not session.closed:
            self._close_soon(session.id, f"connection {state}")

    def _on_deadline(self, session: ViewerSession) -> None:
        if session.connected_at is None and not session.closed:
            log.warning(
                "stream=%s session=%s did not connect within %.0fs",
                session.stream,
                session.id[:8],
                self._connect_timeout,
            )
            self._close_soon(session.id, "connect timeout")

    def _check_alive(self, session: ViewerSession) -> None:
        if session.closed:
            return
        heard = borrowed.last_heard(session.pc)
        if heard is not None and time.monotonic() - heard > self._silence:
            log.warning(
                "stream=%s session=%s silent for %.0fs; viewer gone", session.stream, session.id[:8], self._silence
            )
            self._close_soon(session.id, "viewer silent")
            return
        session._deadline = asyncio.get_running_loop().call_later(LIVENESS_CHECK, self._check_alive, session)

    def _close_soon(self, session_id: str, why: str) -> None:
        task = asyncio.get_running_loop().create_task(self.close(session_id, why))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


class StreamViewers:
    """The WebRTC viewers of one stream, as one of its consumers: they end with it."""

    def __init__(self, sessions: ViewerSessions, stream: str) -> None:
        self.sessions = sessions
        self.stream = stream

    def start(self) -> None:
        pass  # sessions come from offers (signalling.whep)

    async def close(self) -> None:
        await self.sessions.close_stream(self.stream, "shutdown")

    def stats(self) -> ConsumerStats:
        connected = self.sessions.connected(self.stream)
        return ConsumerStats(
            {"viewers": self.sessions.count(self.stream), "viewers_connected": connected}, (), connected
        )


def _answer_playout_delay(transceiver, offer: str, delay: tuple[int, int]) -> None:
    """When the offer has the playout-delay extension on the video section (Chromium's does): the answer names it
    and every packet carries ``delay`` (relay.webrtc.playout)."""
    ext_id = playout.offered_id(offer, transceiver.mid)
    if ext_id is not None:
        borrowed.answer_extension(transceiver, ext_id, playout.URI)
        add_header_extension(transceiver.sender, ext_id, playout.value(*delay))


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__
