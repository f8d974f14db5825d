"""WebRTC viewers: aiortc peers that only packetize and encrypt.

Each viewer's track yields the hub's already-encoded frames, so aiortc never
encodes for a viewer. Two aiortc internals are touched, both per sender
instance and both pinned by tests (``tests/test_aiortc_hooks.py``):

- the sender's packer is replaced by ``SharedPacker``, which splits each access
  unit into RTP payloads once per frame for all viewers instead of once per
  viewer;
- the sender's ``_send_keyframe`` (called on PLI and FIR) is routed to the
  shared encoder, because aiortc ignores PLI for tracks that yield packets.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.codecs import h264
from aiortc.codecs.h264 import H264Encoder as AiortcH264
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpparameters import RTCRtpCodecCapability
from aiortc.sdp import candidate_from_sdp

from . import ice, rtpsend
from .hub import EncodedFrame, HubClosed, PacketHub, Subscription

log = logging.getLogger(__name__)

# The profile every browser decodes in hardware or software: constrained baseline, level 3.1.
PREFERRED_PROFILES = ("42e01f", "42001f")
# A session whose ICE/DTLS never completes is freed by us, not by aiortc's
# minute-long consent timeout.
CONNECT_TIMEOUT = 15.0
_SENDER_ENCODER_ATTR = "_RTCRtpSender__encoder"


class SharedPacker:
    """Stands in for aiortc's per-sender H.264 encoder: packs, never encodes."""

    def pack(self, frame: EncodedFrame) -> tuple[list[bytes], int]:
        return payloads_for(frame), frame.pts


class _EqualFragments(AiortcH264):
    """aiortc's H.264 packetizer with FU-A fragments all full-size but the last.

    aiortc spreads a NAL unit evenly (sizes differ by one byte); full-size
    fragments make a frame's datagrams equal-size but the last, so the whole
    run leaves in one segmented write (relay.udpbatch).
    """

    @staticmethod
    def _packetize_fu_a(data: bytes) -> list[bytes]:
        room = h264.PACKET_MAX - h264.FU_A_HEADER_SIZE
        indicator = (data[0] & 0xE0) | h264.NAL_TYPE_FU_A  # F and NRI of the NAL unit, type FU-A
        nal_type = data[0] & 0x1F
        body = memoryview(data)[h264.NAL_HEADER_SIZE :]
        starts = range(0, len(body), room)
        last = starts[-1]
        return [
            bytes((indicator, nal_type | (0x80 if i == 0 else 0) | (0x40 if i == last else 0))) + body[i : i + room]
            for i in starts
        ]


def payloads_for(frame: EncodedFrame) -> list[bytes]:
    """RTP payloads (single NAL, STAP-A, FU-A) for one frame, computed once."""
    if frame.payloads is None:
        frame.payloads = _EqualFragments._packetize(AiortcH264._split_bitstream(frame.data))
    return frame.payloads


class HubTrack(MediaStreamTrack):
    """A video track whose frames are the hub's encoded access units.

    It subscribes on the first ``recv()``, which aiortc makes only once DTLS
    is up: the join keyframe is asked for when the viewer can take it, and no
    queue fills (and overflows) while ICE is still connecting.
    """

    kind = "video"

    def __init__(self, hub: PacketHub, name: str) -> None:
        super().__init__()
        self.hub = hub
        self.name = name
        self.subscription: Subscription | None = None

    async def recv(self) -> EncodedFrame:  # type: ignore[override]
        if self.readyState != "live":
            raise MediaStreamError
        try:
            if self.subscription is None:
                self.subscription = self.hub.subscribe(self.name)
            frame = await self.subscription.get()
        except HubClosed:
            self.stop()
            raise MediaStreamError from None
        self.hub.fanout_delay.add(time.time() - frame.published_at)
        return frame

    def stop(self) -> None:
        super().stop()
        if self.subscription is not None:
            self.subscription.close()


def attach_to_sender(sender: RTCRtpSender, hub: PacketHub) -> None:
    """Make ``sender`` pack shared frames and route its PLI/FIR to the shared encoder."""
    if not hasattr(sender, _SENDER_ENCODER_ATTR) or not hasattr(sender, "_send_keyframe"):
        raise RuntimeError("aiortc's RTCRtpSender internals changed; camrelay's hooks need updating")
    setattr(sender, _SENDER_ENCODER_ATTR, SharedPacker())
    sender._send_keyframe = hub.request_keyframe  # type: ignore[method-assign]
    rtpsend.install(sender)


def h264_preferences() -> list[RTCRtpCodecCapability]:
    """H.264 packetization-mode 1 (best profile first) and its RTX, nothing else."""
    codecs = RTCRtpSender.getCapabilities("video").codecs
    h264 = [
        c for c in codecs if c.mimeType.lower() == "video/h264" and str(c.parameters.get("packetization-mode")) == "1"
    ]
    rank = {profile: i for i, profile in enumerate(PREFERRED_PROFILES)}
    h264.sort(key=lambda c: rank.get(c.parameters.get("profile-level-id"), len(rank)))
    rtx = [c for c in codecs if c.mimeType.lower() == "video/rtx"]
    return h264 + rtx


def restrict_host_addresses(addresses: list[str] | None) -> None:
    """Gather ICE host candidates only on ``addresses`` (None: every interface).

    aioice offers every interface but loopback; a relay bound to one LAN, or a
    test on loopback, wants exactly the addresses it names. Process-wide,
    because aioice looks the function up at gather time.
    """
    if addresses is None:
        aioice.ice.get_host_addresses = _ORIGINAL_GET_HOST_ADDRESSES
        return
    fixed = list(addresses)

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in fixed if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = host_addresses


_ORIGINAL_GET_HOST_ADDRESSES = aioice.ice.get_host_addresses

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
_ORIGINAL_DATAGRAM_RECEIVED = aioice.ice.StunProtocol.datagram_received


def _datagram_received(self: aioice.ice.StunProtocol, data: bytes | str, addr: tuple) -> None:
    if not data:
        return  # aiortc's DTLS transport dies on an empty datagram (IndexError): never pass one on
    conn = self.receiver
    pair = conn._nominated.get(1) if conn._nominated else None
    if pair is None or (addr[0], addr[1]) == pair.remote_addr:
        conn.camrelay_last_received = time.monotonic()
    elif data[0] > 3:
        # Not STUN (RFC 7983: 0-3), and not from the viewer's address: once ICE
        # has chosen a pair, DTLS and SRTP come from its remote address only.
        # Garbage sprayed at the port must neither reach DTLS nor keep a session alive.
        return
    _ORIGINAL_DATAGRAM_RECEIVED(self, data, addr)


def watch_ice(on: bool) -> None:
    """Process-wide (like ``restrict_host_addresses``): note when each ICE connection last heard
    from its peer, and drop empty datagrams and non-STUN ones from strangers."""
    aioice.ice.StunProtocol.datagram_received = _datagram_received if on else _ORIGINAL_DATAGRAM_RECEIVED


def last_heard(pc: RTCPeerConnection) -> float | None:
    """When the viewer behind ``pc`` last sent anything (monotonic), if known."""
    transceivers = pc.getTransceivers()  # a viewer session has exactly one
    dtls = transceivers[0].sender.transport if transceivers else None
    conn = getattr(dtls.transport, "_connection", None) if dtls else None
    return getattr(conn, "camrelay_last_received", None)


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
    _deadline: asyncio.TimerHandle | None = None

    @property
    def state(self) -> str:
        return self.pc.connectionState


class ViewerSessions:
    """Every WebRTC viewer of every stream: create from an offer, free on every exit path."""

    def __init__(
        self,
        hub_for: Callable[[str], PacketHub],
        ice_servers: Callable[[], list[RTCIceServer]] = list,
        connect_timeout: float = CONNECT_TIMEOUT,
        silence: float = VIEWER_SILENCE,
        additional_hosts: tuple[str, ...] = (),
    ) -> None:
        self._hub_for = hub_for
        self._silence = silence
        # Asked for each session (its TURN credentials are minted for it); none: host candidates only,
        # nothing waits on STUN.
        self._ice_servers = ice_servers
        self._additional_hosts = additional_hosts  # more host candidates in every answer (relay.ice)
        self._resolver = ice.resolver()  # where their names are looked up
        self._connect_timeout = connect_timeout
        self._sessions: dict[str, ViewerSession] = {}
        # Sessions between an offer and its answer. Counted from create()'s first line, before any
        # await: the limits checked just before it then hold for offers that arrive all at once.
        self._creating: set[ViewerSession] = set()
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> ViewerSession | None:
        return self._sessions.get(session_id)

    def count(self, stream: str | None = None) -> int:
        """Sessions of ``stream`` (or all), those still being set up included."""
        return sum(1 for s in self._all() if stream is None or s.stream == stream)

    def pending(self, remote: str | None = None) -> int:
        """Sessions being set up or answered but not connected yet (from client address ``remote``, or all)."""
        return sum(1 for s in self._all() if s.connected_at is None and (remote is None or s.remote == remote))

    def _all(self):
        yield from self._sessions.values()
        yield from self._creating

    def connected(self, stream: str | None = None) -> int:
        return sum(
            1 for s in self._sessions.values() if s.state == "connected" and (stream is None or s.stream == stream)
        )

    async def create(self, stream: str, offer_sdp: str, remote: str) -> tuple[ViewerSession, str]:
        """Answer an offer; returns the session and the SDP answer. Raises ``OfferRejected``."""
        hub = self._hub_for(stream)
        session_id = secrets.token_urlsafe(16)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self._ice_servers()))
        track = HubTrack(hub, f"webrtc-{session_id[:8]}")
        session = ViewerSession(session_id, stream, remote, pc, track)
        self._creating.add(session)
        try:
            answer = await self._set_up(session, offer_sdp, hub)
        finally:
            self._creating.discard(session)
        self._sessions[session_id] = session
        pc.on("connectionstatechange", lambda: self._on_state(session))
        session._deadline = asyncio.get_running_loop().call_later(self._connect_timeout, self._on_deadline, session)
        log.info(
            "stream=%s session=%s remote=%s created viewers=%d", stream, session_id[:8], remote, self.count(stream)
        )
        return session, answer

    async def _set_up(self, session: ViewerSession, offer_sdp: str, hub: PacketHub) -> str:
        """Apply the offer and return the answer; on any failure the peer connection is closed."""
        pc, track = session.pc, session.track
        try:
            transceiver = pc.addTransceiver(track, direction="sendonly")
            # Browsers list VP8 first; without this the H.264 bytes would go
            # out labelled as whatever the offer preferred.
            transceiver.setCodecPreferences(h264_preferences())
            attach_to_sender(transceiver.sender, hub)
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            except Exception as exc:  # aiortc's parser raises ValueError, AssertionError, KeyError, ...
                raise OfferRejected(f"offer could not be applied: {_reason(exc)}") from exc
            if not any(t.sender is transceiver.sender and t.mid is not None for t in pc.getTransceivers()):
                raise OfferRejected("offer has no video section this relay can send to")
            try:
                await pc.setLocalDescription(await pc.createAnswer())
            except OSError:
                raise  # ICE could not bind: our problem, not the offer's
            except Exception as exc:  # offers aiortc accepted but cannot answer (found by tests/test_fuzz_whep.py)
                raise OfferRejected(f"offer could not be answered: {_reason(exc)}") from exc
            return await ice.with_additional_hosts(pc.localDescription.sdp, self._additional_hosts, self._resolver)
        except BaseException:
            track.stop()
            await pc.close()
            raise

    async def add_candidates(self, session: ViewerSession, sdpfrag: str) -> None:
        """Trickled remote candidates (``a=candidate:`` lines of an SDP fragment).

        Those under the ``a=mid`` of an m-section the answer rejected are dropped:
        their transport is gone (the browser gathered for it before the answer).
        """
        ours = _first_mid(session.pc)
        mid = None
        for raw in sdpfrag.splitlines():
            line = raw.strip()
            if line.startswith("a=mid:"):
                mid = line[6:]
            elif line.startswith("a=candidate:") and mid in (None, ours):
                try:
                    candidate = candidate_from_sdp(line[2:].split(":", 1)[1])
                    candidate.sdpMid = ours
                    await session.pc.addIceCandidate(candidate)
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
        session.track.stop()
        await session.pc.close()
        log.info(
            "stream=%s session=%s closed (%s) viewers=%d",
            session.stream,
            session_id[:8],
            why,
            self.count(session.stream),
        )
        return True

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
        heard = last_heard(session.pc)
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


def _first_mid(pc: RTCPeerConnection) -> str | None:
    for t in pc.getTransceivers():
        if t.mid is not None:
            return t.mid
    return None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__
