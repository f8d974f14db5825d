"""Every private aiortc and aioice name camrelay uses, and nothing else.

aiortc encodes per viewer and sends per packet; camrelay encodes once and
sends per frame. That needs a few of aiortc's and aioice's internals, all of
them here, so an upgrade that moves one breaks this module alone (and
``tests/test_aiortc_hooks.py`` names what moved):

- on each transceiver, the header extensions and feedback its answer names (``answer_extension``: playout-delay,
  which aiortc does not know; ``answer_without``: abs-send-time and goog-remb, which the relay would ignore);
- on each sender (``RTCRtpSender``): its encoder slot (``__encoder``) holds a
  packer that packs shared frames; ``_send_keyframe`` (PLI, FIR) goes to the
  shared encoder; ``_run_rtp`` and ``_retransmit`` are camrelay's per-frame
  send loop (``relay.webrtc.rtpsend``), which reads and writes the sender's private
  fields through ``SenderFields``, and ``_run_rtcp`` its sender reports' (``relay.webrtc.reports``: every
  sender's in one pass a second);
- aiortc's H.264 packetizer, with FU-A fragments all full-size but the last
  (``packetize``);
- process-wide, one DTLS certificate, its fingerprints and OpenSSL context for every peer connection
  (``SHARED_CERTIFICATE``); a receiver's bandwidth estimator made only when video comes
  (``LAZY_BITRATE_ESTIMATOR``); an answer's ICE gathering and remote candidates awaited in turn, not through
  ``asyncio.gather`` (``GATHER_IN_TURN``, ``CANDIDATES_IN_TURN``: fewer passes of the event loop); an ICE
  connection done as soon as its pair is nominated, not after aioice's 20 ms pacing wait (``PROMPT_ICE``);
- process-wide, on aioice's module and its socket protocol, each a ``Patch``
  held by whoever needs it and removed when the last holder lets go: the
  host addresses ICE gathers on (``restrict_host_addresses``), a watch on what
  each connection hears (``WATCH_ICE``, read by ``last_heard``; through it, a sender's viewer's SRTCP read as it
  arrives, its reports handed to aiortc's handlers there and then: ``read_rtcp_at_once``), and aioice's
  own data sends (``send_data_patch``, for ``relay.webrtc.udpbatch``), and every socket a connection binds closed
  with it, a gathering cancelled half-way too (``CLOSE_ALL_BOUND``); on aiortc's, the payload types its
  answers keep from an offer (``OFFERED_PAYLOAD_TYPES``: Chromium's lower dynamic range too);
- pylibsrtp's C binding (``SrtpFrameWriter``): a frame's RTP packets protected in place in one buffer (one a thread,
  shared by its senders), where ``Session.protect`` checks, copies and slices out each packet anew; and for the
  C send path (``SrtpFrameWriter.send_frame``, ``relay/webrtc/_fastsend.c``) the address of its ``srtp_protect``
  and a session's ``srtp_t``, so that C protects with the very session aiortc's RTCP and retransmissions use
  (no second libsrtp); and for the batch (``send_batch``: one C call a frame for every viewer of a stream), each
  sender's C lane bound to its ICE pair's socket and address, its SRTP session and the state that must hold
  while it sends (``bind_lane``: DTLS connected, the pair nominated, the session, the sender enabled; and, read
  as two more guards, asyncio's UDP transport open with nothing queued: its ``_closing`` and ``_buffer_size``,
  ``transport_guards``);
- aiortc's per-sender and per-transport counts (packets, octets, the last RTP timestamp and its NTP time; bytes
  and packets a DTLS transport sent), read through descriptors that first bring in what a C lane counted
  (``SYNCED_COUNTS``, ``sync_counts``): sender reports and ``getStats`` are exact, with no work per frame;
- for tests and benchmarks only, what aiortc's receivers get (``divert_decrypted_rtp``,
  ``watch_received_h264``).

Imported, it checks the versions of aiortc, aioice and pylibsrtp against those it was
written for (``WRITTEN_FOR``, the bounds in ``pyproject.toml``) and refuses
others with a message naming both.
"""

from __future__ import annotations

import array
import asyncio
import asyncio.selector_events
import collections
import contextlib
import contextvars
import datetime
import logging
import re
import struct
import time
import types
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import aioice
import aioice.ice
import aioice.mdns
import aiortc
import aiortc.rate
import aiortc.rtcicetransport
import aiortc.rtcpeerconnection
import aiortc.rtcrtpreceiver
import aiortc.rtp
import pylibsrtp
from aiortc import RTCCertificate, RTCRtpHeaderExtensionParameters
from aiortc.codecs import h264
from aiortc.codecs.h264 import H264Decoder as AiortcH264Decoder
from aiortc.codecs.h264 import H264Encoder as AiortcH264
from aiortc.rtcdtlstransport import State as DtlsState
from pylibsrtp._binding import ffi as srtp_ffi
from pylibsrtp._binding import lib as srtp_lib

from ..logsafe import Throttled

try:  # the C send path, built by ``pip install -e .`` (pyproject.toml's ext-modules) where it can be
    from . import _fastsend
except ImportError:
    _fastsend = None

log = logging.getLogger(__name__)

# [lowest, first unsupported) of each, as pyproject.toml declares them: the upper bound is the next minor
# release after the one tests/test_aiortc_hooks.py last passed with (TESTED_WITH).
WRITTEN_FOR = {"aiortc": ("1.14", "1.17"), "aioice": ("0.12", "0.14"), "pylibsrtp": ("1.0", "1.1")}
TESTED_WITH = {"aiortc": "1.16", "aioice": "0.13", "pylibsrtp": "1.0"}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


def check_versions(found: dict[str, str]) -> None:
    """``ImportError`` naming the versions these hooks were written for when one in ``found`` is outside them."""
    wrong = [
        f"{name} {version}"
        for name, version in found.items()
        if not _version(WRITTEN_FOR[name][0]) <= _version(version) < _version(WRITTEN_FOR[name][1])
    ]
    if wrong:
        wanted = " and ".join(f"{name}>={lo},<{hi}" for name, (lo, hi) in WRITTEN_FOR.items())
        tested = " and ".join(f"{name} {v}" for name, v in TESTED_WITH.items())
        raise ImportError(
            f"camrelay's aiortc and aioice hooks (relay/webrtc/borrowed.py) were written for {wanted} (tested with"
            f" {tested}); found {', '.join(wrong)}. Install those versions (pip install -e . does), or update the"
            " hooks: tests/test_aiortc_hooks.py names what moved"
        )


check_versions({"aiortc": aiortc.__version__, "aioice": aioice.__version__, "pylibsrtp": pylibsrtp.__version__})


# -- process-wide patches

_ABSENT = object()  # a Patch's original where the owner had none


class Patch:
    """One replacement of an attribute of aioice's or aiortc's, in place while anyone holds it (``hold()``, then the
    release it returns): two relays in one process share it, and the last to close removes it."""

    def __init__(self, owner: object, name: str, replacement: Any, absent: bool = False) -> None:
        self.owner = owner
        self.name = name
        self.replacement = replacement
        # ``absent``: the owner has no such attribute (a descriptor put on a class over its instances' own field),
        # and the last release deletes it again
        self.original = _ABSENT if absent else getattr(owner, name)
        self.holders = 0

    @property
    def installed(self) -> bool:
        return getattr(self.owner, self.name, None) is self.replacement

    def hold(self) -> Callable[[], None]:
        if not self.holders:
            setattr(self.owner, self.name, self.replacement)
        self.holders += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.holders -= 1
            if not self.holders:
                if self.original is _ABSENT:
                    delattr(self.owner, self.name)
                else:
                    setattr(self.owner, self.name, self.original)

        return release


# The payload types whose numbers aiortc's answer keeps from the offer (``aiortc.rtp.DYNAMIC_PAYLOAD_TYPES``,
# 96-127 alone in aiortc): also 35-63, the lower dynamic range Chromium numbers codecs from once 96-127 are
# full (RFC 3551 leaves 35-71 unassigned; 64-95 stay out, where RTCP's types would collide, RFC 5761). Without
# it aiortc answers Chromium's only High-capable H.264 (High 4:4:4 on 41, Debian's Chromium 156) with its own
# 101, which that offer gives to VP9's RTX: Chromium gets packets and assembles no frame
# (tests/test_passthrough.py::test_chromium_decodes_a_passed_through_high_profile_camera).
OFFERED_PAYLOAD_TYPES = Patch(aiortc.rtp, "DYNAMIC_PAYLOAD_TYPES", frozenset(range(35, 64)) | frozenset(range(96, 128)))


# aiortc makes every peer connection a DTLS certificate of its own (an EC key, a signed X.509: ~3 ms of the event
# loop) and every DTLS transport an OpenSSL context from it (~1.5 ms): thirty viewers joining at once were 150 ms
# of the loop that feeds the viewers already watching. The relay's sessions share one certificate (what a
# session's answer says is its fingerprint, the same for all, as a browser's persisted certificate is), and its
# context, renewed a day before aiortc's 30 days run out.
CERTIFICATE_RENEW = datetime.timedelta(days=1)


class _SharedCertificate(RTCCertificate):
    _current: RTCCertificate | None = None

    @classmethod
    def generateCertificate(cls):  # aiortc's name
        current = cls._current
        now = datetime.datetime.now(tz=datetime.UTC)
        if current is None or current.expires - now < CERTIFICATE_RENEW:
            current = cls._current = super().generateCertificate()
        return current

    def getFingerprints(self):  # aiortc's name: every answer names them; the digests are made once
        prints = self.__dict__.get("camrelay_fingerprints")
        if prints is None:
            prints = self.__dict__["camrelay_fingerprints"] = super().getFingerprints()
        return list(prints)

    def _create_ssl_context(self, srtp_profiles):
        contexts = self.__dict__.setdefault("camrelay_contexts", {})
        key = tuple(srtp_profiles)
        if key not in contexts:
            contexts[key] = super()._create_ssl_context(srtp_profiles)
        return contexts[key]


# Peer connections made while held (the relay's sessions, its WHIP publishers) share one DTLS certificate.
SHARED_CERTIFICATE = Patch(aiortc.rtcpeerconnection, "RTCCertificate", _SharedCertificate)


def make_shared_certificate() -> None:
    """The shared certificate, its fingerprints and its OpenSSL context for aiortc's SRTP profiles made now (a
    relay's start), not in its first viewer's answer and handshake: a process's first certificate and first
    OpenSSL context also set up OpenSSL's own tables, ~10 ms of the event loop where thirty viewers join a relay
    just started (0.3 and 0.4 ms each after). Hold ``SHARED_CERTIFICATE`` while calling it."""
    certificate = _SharedCertificate.generateCertificate()
    certificate.getFingerprints()
    certificate._create_ssl_context(aiortc.rtcdtlstransport.SRTP_PROFILES)


class _BitrateEstimatorOnFirstPacket:
    """aiortc's receive-side bandwidth estimator (``RemoteBitrateEstimator``), made when the first video packet
    comes. aiortc gives every video transceiver a receiver, and every receiver one at once: 1,000 rate buckets,
    each an object (~0.5 ms, and the garbage collections they set off, on the loop that feeds the viewers: a
    tenth of the relay's time while 30 viewers joined at once, docs/benchmarks.md), for a relay's sessions,
    which send and never receive video."""

    __slots__ = ("_estimator",)

    def __init__(self) -> None:
        self._estimator: aiortc.rate.RemoteBitrateEstimator | None = None

    def add(self, *args: Any, **kwargs: Any) -> Any:
        if self._estimator is None:
            self._estimator = aiortc.rate.RemoteBitrateEstimator()
        return self._estimator.add(*args, **kwargs)


# aiortc's receivers made while held (every session's, the relay's WHIP publishers') make their bandwidth
# estimator only if video comes.
LAZY_BITRATE_ESTIMATOR = Patch(aiortc.rtcrtpreceiver, "RemoteBitrateEstimator", _BitrateEstimatorOnFirstPacket)


# An answer's awaits: aiortc gathers its ICE transports' candidates, and adds each transport's remote candidates,
# through asyncio.gather, which takes passes of the event loop however little is awaited: 14 passes an answer,
# and offers that come together progress a step each per pass (docs/benchmarks.md, "Offers answered in turn").
# One transport (an answer's, bundled) is gathered, and candidates with IP addresses (the relay drops an offer's
# mDNS ones) are added, awaited in turn: 8 passes. Anything else as aiortc does it.


async def _gather_in_turn(pc: aiortc.RTCPeerConnection) -> None:
    transports = list(pc._RTCPeerConnection__iceTransports)  # type: ignore[attr-defined]
    if len(transports) != 1:
        return await GATHER_IN_TURN.original(pc)
    await transports[0].iceGatherer.gather()


async def _add_remote_candidates_in_turn(transport: aiortc.RTCIceTransport, media: Any) -> None:
    if any(aioice.mdns.is_mdns_hostname(c.ip) for c in media.ice_candidates):
        return await CANDIDATES_IN_TURN.original(transport, media)
    for candidate in media.ice_candidates:
        await transport.addRemoteCandidate(candidate)
    if media.ice_candidates_complete:
        await transport.addRemoteCandidate(None)


GATHER_IN_TURN = Patch(aiortc.rtcpeerconnection.RTCPeerConnection, "_RTCPeerConnection__gather", _gather_in_turn)
CANDIDATES_IN_TURN = Patch(aiortc.rtcpeerconnection, "add_remote_candidates", _add_remote_candidates_in_turn)


# aioice's ``Connection.connect`` starts a check, then sleeps ``AIOICE_CHECK_PACING`` (RFC 8445's Ta, which paces
# the start of the next check) before it looks whether the check list is done: every ICE connection takes at least
# that long however soon its pair is nominated (on a LAN or loopback, a millisecond or two), and aiortc starts DTLS
# only once it returns. The relay (ICE controlled, the DTLS client) sent its ClientHello 20 ms after its answer at
# the earliest, and a browser waits for it; an aiortc viewer (benchmarks.burst's joiners) waits out its own 20 ms
# too. Connections made while ``PROMPT_ICE`` is held end that wait as soon as their check list is done (completed or
# failed); while it is not, the next check still starts ``AIOICE_CHECK_PACING`` after the last.
AIOICE_CHECK_PACING = 0.02  # seconds: the sleep between checks in aioice's connect() (a literal there)
# Tests only: a pacing wait this long (seconds) instead, to see it end when the check list is done. None: aioice's.
PACING_WAIT_FOR_TESTS: float | None = None
prompt_waits_ended = 0  # pacing waits the hook ended because the check list was done: it engages (tests read it)
_ICE_CONNECTING: contextvars.ContextVar[Any] = contextvars.ContextVar("camrelay_ice_connecting", default=None)


class _PromptConnection(aioice.Connection):
    """aioice's connection whose pacing wait in ``connect`` ends when its check list is done (``_PacedAsyncio``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.camrelay_checks_done = asyncio.Event()

    async def connect(self) -> None:
        token = _ICE_CONNECTING.set(self)  # what the pacing sleep of this task's connect() waits on
        try:
            await super().connect()
        finally:
            _ICE_CONNECTING.reset(token)

    def _check_list_maybe_complete(self) -> bool:
        done = super()._check_list_maybe_complete()
        if self._check_list_done:
            self.camrelay_checks_done.set()
        return done

    def _check_list_maybe_fail(self) -> None:
        super()._check_list_maybe_fail()
        if self._check_list_done:
            self.camrelay_checks_done.set()


class _PacedAsyncio(types.ModuleType):
    """``asyncio`` as aioice's ice module sees it: the same, but for the pacing sleep in a ``_PromptConnection``'s
    ``connect``, which ends when that connection's check list is done (its other sleeps, consent's, are asyncio's).
    asyncio's names are copied in, so each of aioice's lookups (per STUN transaction) is a plain module lookup."""

    def __init__(self) -> None:
        super().__init__("asyncio")
        self.__dict__.update({k: v for k, v in vars(asyncio).items() if not k.startswith("__")})
        self.sleep = self._sleep

    @staticmethod
    async def _sleep(delay: float, result: Any = None) -> Any:
        conn = _ICE_CONNECTING.get()
        if conn is None or delay != AIOICE_CHECK_PACING or not isinstance(conn, _PromptConnection):
            return await asyncio.sleep(delay, result)
        global prompt_waits_ended
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay if PACING_WAIT_FOR_TESTS is None else PACING_WAIT_FOR_TESTS):
                await conn.camrelay_checks_done.wait()
                prompt_waits_ended += 1
        return result


class _Patches:
    """Several ``Patch``es held and released as one."""

    def __init__(self, *patches: Patch) -> None:
        self.patches = patches

    @property
    def installed(self) -> bool:
        return all(p.installed for p in self.patches)

    def hold(self) -> Callable[[], None]:
        releases = [p.hold() for p in self.patches]

        def release() -> None:
            for undo in reversed(releases):
                undo()

        return release


# aiortc's ICE transports made while held (the relay's sessions; benchmarks.burst's joiners) connect as soon as
# their pair is nominated.
PROMPT_ICE = _Patches(
    Patch(aiortc.rtcicetransport, "Connection", _PromptConnection),
    Patch(aioice.ice, "asyncio", _PacedAsyncio()),
)


_host_addresses: collections.Counter[str] = collections.Counter()  # every holder's, in the order first held


def _restricted_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return [a for a in _host_addresses if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]


HOST_ADDRESSES = Patch(aioice.ice, "get_host_addresses", _restricted_host_addresses)


def restrict_host_addresses(addresses: Iterable[str]) -> Callable[[], None]:
    """Gather ICE host candidates only on ``addresses`` (and those of other holders) until the returned release.

    aioice offers every interface but loopback; a relay bound to one LAN, or a
    test on loopback, wants exactly the addresses it names. Process-wide,
    because aioice looks the function up at gather time.
    """
    held = list(addresses)
    _host_addresses.update(held)
    release_patch = HOST_ADDRESSES.hold()

    def release() -> None:
        if held:
            _host_addresses.subtract(held)
            for address in [a for a, n in _host_addresses.items() if n <= 0]:
                del _host_addresses[address]
            held.clear()
        release_patch()

    return release


def _datagram_received(self: aioice.ice.StunProtocol, data: bytes | str, addr: tuple) -> None:
    if not data:
        return  # aiortc's DTLS transport dies on an empty datagram (IndexError): never pass one on
    conn = self.receiver
    if _from_the_peer(conn, (addr[0], addr[1])):
        conn.camrelay_last_received = time.monotonic()
        if _RTCP_FIRST_BYTE[0] <= data[0] < _RTCP_FIRST_BYTE[1] and _rtcp_now(conn, data):
            return
    elif data[0] > 3:
        # Not STUN (RFC 7983: 0-3), and not from one of the viewer's addresses: once ICE
        # has chosen a pair, DTLS and SRTP come from the remote end of a candidate pair only.
        # Garbage sprayed at the port must neither reach DTLS nor keep a session alive.
        return
    WATCH_ICE.original(self, data, addr)


# -- a sender's RTCP from its peer, handled as it arrives

# RFC 7983 and 5761: RTP and RTCP start with 128-191; RTCP's second byte (its packet type) is 192-223, as aiortc's
# ``is_rtcp`` reads it (192-208).
_RTCP_FIRST_BYTE = (128, 192)
_RTCP_FAST = "camrelay_rtcp_dtls"  # on an aioice Connection: its DTLS transport, weakly, whose RTCP is read at once
# What a viewer sends every second or so, and aiortc's handlers take without waiting for anything: reports and
# descriptions (REMBs among them are dropped: ``_unheeded``). A compound packet holding anything else (NACK, PLI, FIR,
# BYE) goes to aiortc's own handler.
_RTCP_AT_ONCE = (aiortc.rtp.RtcpRrPacket, aiortc.rtp.RtcpSrPacket, aiortc.rtp.RtcpSdesPacket)


def _unheeded(packet) -> bool:
    """A REMB (receiver estimated maximum bitrate: application-layer feedback), which aiortc's sender hands to its
    encoder's ``target_bitrate``: the relay's senders have none (one encoder for every viewer, or none at all), so it
    is dropped where it is read, not handed to aiortc in a task. An aiortc viewer sends one each time its estimate
    moves, and more often the more delay it sees: on a full machine the relay's loop spent several times its usual
    CPU on its viewers' RTCP, much of it REMBs through that task (docs/benchmarks.md, "The 60-viewer collapse,
    found")."""
    return isinstance(packet, aiortc.rtp.RtcpPsfbPacket) and packet.fmt == aiortc.rtp.RTCP_PSFB_APP


def read_rtcp_at_once(dtls: aiortc.RTCDtlsTransport) -> None:
    """SRTCP from the peer of ``dtls``'s ICE connection is read as it arrives (``WATCH_ICE``, while held): unprotected
    there and then, its reports handed to the senders (and receivers) they are for, instead of passing through
    aioice's queue and DTLS's task (some 400 us of CPU a receiver report on a relay with 64 viewers, a report a second
    a viewer: docs/benchmarks.md); REMBs are dropped (``_unheeded``). What aiortc's handlers may wait in (feedback:
    NACK, PLI, FIR; BYE) is handed to aiortc's ``_handle_rtcp_data`` in a task of its own, unprotected as well; the
    transport's counts of what it received are kept as aiortc keeps them."""
    conn = dtls.transport._connection
    conn.__dict__[_RTCP_FAST] = weakref.ref(dtls)


def _rtcp_task_done(task: asyncio.Task) -> None:
    """A feedback task ended: its exception read (in aiortc's DTLS task a ConnectionError, its retransmission meeting
    a connection gone down, ended quietly; anything else is said once a second), never the loop's 'never retrieved'."""
    _rtcp_tasks.discard(task)
    exc = None if task.cancelled() else task.exception()
    if exc is not None and not isinstance(exc, ConnectionError):
        _rtcp_failed.warn("rtcp feedback from a viewer not handled: %r", exc)


def _rtcp_now(conn: aioice.Connection, data: bytes) -> bool:
    """``data`` (an RTP or RTCP datagram from the peer) handled here if it is SRTCP on a connection whose DTLS
    transport reads it at once and is connected (True: nothing more to do); else False, for aioice and aiortc."""
    ref = conn.__dict__.get(_RTCP_FAST)
    dtls = ref() if ref is not None else None
    if dtls is None or dtls._state is not _DTLS_CONNECTED or dtls._rx_srtp is None or not aiortc.rtp.is_rtcp(data):
        return False
    f = dtls.__dict__
    f[_DTLS_RX_BYTES] += len(data)
    f[_DTLS_RX_PACKETS] += 1
    try:
        plain = dtls._rx_srtp.unprotect_rtcp(data)
        packets = aiortc.rtp.RtcpPacket.parse(plain)
    except (pylibsrtp.Error, ValueError):
        return True  # as aiortc's task: a datagram that fails authentication, or cannot be parsed, is dropped
    packets = [p for p in packets if not _unheeded(p)]
    if not all(isinstance(p, _RTCP_AT_ONCE) for p in packets):
        task = asyncio.get_running_loop().create_task(dtls._handle_rtcp_data(plain))
        _rtcp_tasks.add(task)
        task.add_done_callback(_rtcp_task_done)
        return True
    try:
        router = dtls._rtp_router
        for packet in packets:
            for recipient in router.route_rtcp(packet):
                _run_now(recipient._handle_rtcp_packet(packet))
    except Exception as exc:  # never into aioice's datagram_received: the report dropped, said once a second
        _rtcp_failed.warn("rtcp report from a viewer not handled, dropped: %r", exc)
    return True


# A report aiortc's handlers failed on, said at most once a second for the process (the rest counted into the next).
RTCP_WARNING_INTERVAL = 1.0  # seconds
_rtcp_failed = Throttled(log, RTCP_WARNING_INTERVAL)
_rtcp_tasks: set[asyncio.Task] = set()  # aiortc's handling of feedback, held until done


def _run_now(coro) -> None:
    """A coroutine that finishes without waiting (aiortc's handling of a report), run to its end here."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise RuntimeError("aiortc's RTCP report handler waited; camrelay's RTCP path needs updating")


def _from_the_peer(conn: aioice.Connection, addr: tuple) -> bool:
    """Whether ``addr`` is the peer's: any address while ICE has chosen no pair; then the remote end of one of
    the connection's candidate pairs (the peer's candidates from its description, and those it was learned at
    by its authenticated checks). Not the nominated pair's alone: with two pairs or more (IPv4 and IPv6, two
    interfaces) aioice nominates aggressively, and the two ends may settle on different pairs, the peer's DTLS
    then coming from a pair this end did not nominate (dropped, it never connected: benchmarks.burst)."""
    nominated = conn._nominated.get(1) if conn._nominated else None
    if nominated is None or addr == nominated.remote_addr:
        return True
    return any(pair.remote_addr == addr for pair in conn._check_list)


# Note when each ICE connection last heard from its peer (``last_heard``), and drop empty datagrams and
# non-STUN ones from strangers.
WATCH_ICE = Patch(aioice.ice.StunProtocol, "datagram_received", _datagram_received)


# aioice (0.13) binds a host candidate's socket for each address in turn and lists them on the connection
# (``_protocols``, which its ``close`` closes) only once the last is bound. A gathering cancelled in between (a WHIP
# publisher stopped, a shard closed with offers in flight, a test viewer's connect abandoned) left what it had bound
# in no list: a socket open for the life of the process (the suite's leak check caught one). While
# ``CLOSE_ALL_BOUND`` is held, each socket is noted on its connection as aioice binds it, closed with the
# connection, and closed at once if bound after the connection began to close. No task, no pass of the loop more.
_bound: weakref.WeakKeyDictionary[aioice.Connection, list[aioice.ice.StunProtocol]] = weakref.WeakKeyDictionary()


def _connection_made(self: aioice.ice.StunProtocol, transport: Any) -> None:
    _NOTE_BOUND.original(self, transport)
    conn = self.receiver
    if conn._closing:
        transport.close()  # a gathering that ran on past the close: nothing will use or close it
    else:
        _bound.setdefault(conn, []).append(self)


async def _close_all_bound(self: aioice.Connection) -> None:
    try:
        await _CLOSE_BOUND.original(self)
    finally:
        for protocol in _bound.pop(self, ()):
            protocol.transport.close()  # those aioice listed are closed already: a second close does nothing


_NOTE_BOUND = Patch(aioice.ice.StunProtocol, "connection_made", _connection_made)
_CLOSE_BOUND = Patch(aioice.Connection, "close", _close_all_bound)
CLOSE_ALL_BOUND = _Patches(_NOTE_BOUND, _CLOSE_BOUND)


def send_data_patch(send: Callable[[Any, bytes, tuple], None]) -> Patch:
    """aioice's data sends (DTLS, RTCP: ``StunProtocol.send_data``) made by ``send(protocol, data, addr)``."""

    async def send_data(self: aioice.ice.StunProtocol, data: bytes, addr: tuple) -> None:
        send(self, data, addr)

    return Patch(aioice.ice.StunProtocol, "send_data", send_data)


def last_heard(pc: aiortc.RTCPeerConnection) -> float | None:
    """When the peer behind ``pc`` last sent anything (monotonic), if known (``WATCH_ICE`` held)."""
    transceivers = pc.getTransceivers()  # a viewer session has exactly one
    dtls = transceivers[0].sender.transport if transceivers else None
    conn = getattr(dtls.transport, "_connection", None) if dtls else None
    return getattr(conn, "camrelay_last_received", None)


def nominated_pair(dtls: aiortc.RTCDtlsTransport) -> Any:
    """The ICE candidate pair a DTLS transport's connection chose (its ``protocol`` and ``remote_addr``), or None."""
    return dtls.transport._connection._nominated.get(1)


def divert_decrypted_rtp(handler: Callable[[Any, bytes], None]) -> Callable[[], None]:
    """Every decrypted RTP packet any DTLS transport of this process receives goes to ``handler(transport,
    data)`` instead of aiortc's parser and receivers, until the returned release (for benchmarks' light viewers,
    which count frames from RTP headers and decode nothing). Process-wide: never in a relay."""

    async def handle_rtp_data(self: aiortc.RTCDtlsTransport, data: bytes, arrival_time_ms: int) -> None:
        handler(self, data)

    return Patch(aiortc.RTCDtlsTransport, "_handle_rtp_data", handle_rtp_data).hold()


def watch_received_h264(handler: Callable[[bytes], None]) -> Callable[[], None]:
    """Every H.264 access unit an aiortc receiver of this process hands its decoder (Annex B, as depacketized) goes
    to ``handler(data)`` too, on the decoder's thread, until the returned release: for tests that read the SPS a
    viewer actually received. Process-wide: never in a relay."""
    decode = AiortcH264Decoder.decode

    def watched(self: AiortcH264Decoder, encoded_frame: Any) -> Any:
        handler(encoded_frame.data)
        return decode(self, encoded_frame)

    return Patch(AiortcH264Decoder, "decode", watched).hold()


# -- one sender


_SENDER = "_RTCRtpSender__"  # aiortc's private sender fields
_DTLS = "_RTCDtlsTransport__"
_ENCODER = _SENDER + "encoder"
SENDER_FIELDS = (
    "track", "mid", "rtp_started", "rtp_exited", "rtp_header_extensions_map", "rtx_payload_type",
    "rtx_sequence_number", "ntp_timestamp", "rtp_timestamp", "octet_count", "packet_count", "encoder",
    "rtcp_started", "rtcp_exited", "cname", "lsr", "lsr_time",
)  # fmt: skip
# The names written once per frame per viewer (``SenderFields.count``, ``count_dtls_sent``), joined once here.
_NTP_TIMESTAMP, _RTP_TIMESTAMP = _SENDER + "ntp_timestamp", _SENDER + "rtp_timestamp"
_OCTET_COUNT, _PACKET_COUNT = _SENDER + "octet_count", _SENDER + "packet_count"
_DTLS_TX_BYTES, _DTLS_TX_PACKETS = _DTLS + "tx_bytes", _DTLS + "tx_packets"
_DTLS_RX_BYTES, _DTLS_RX_PACKETS = _DTLS + "rx_bytes", _DTLS + "rx_packets"  # counted as RTCP is read at once
_DTLS_CONNECTED = DtlsState.CONNECTED


def answer_extension(transceiver: aiortc.RTCRtpTransceiver, ext_id: int, uri: str) -> None:
    """The answer to the offer just applied also names RTP header extension ``uri`` under the offer's ``ext_id``
    for ``transceiver``'s media section. aiortc keeps only the extensions it knows (``mid`` and ``abs-send-time``
    on video) in its transceiver's list, which both its answer and its sender's parameters are made from; the
    sender ignores one it does not know (``relay.webrtc.rtpsend.add_header_extension`` sends it)."""
    if not isinstance(getattr(transceiver, "_headerExtensions", None), list):
        raise RuntimeError("aiortc's RTCRtpTransceiver._headerExtensions changed; camrelay's hooks need updating")
    transceiver._headerExtensions.append(RTCRtpHeaderExtensionParameters(id=ext_id, uri=uri))


def answer_without(transceiver: aiortc.RTCRtpTransceiver, extensions: frozenset[str], feedback: frozenset[str]) -> None:
    """The answer to the offer just applied names none of the RTP header extensions ``extensions`` (URIs) nor the
    RTCP feedback ``feedback`` (types) for ``transceiver``'s media section, and its sender sends none of those
    extensions: both come from the transceiver's negotiated lists (``_headerExtensions``; ``_codecs``, each its
    ``rtcpFeedback``), which aiortc made anew for this offer (its codecs deep copies)."""
    codecs = getattr(transceiver, "_codecs", None)
    if not isinstance(getattr(transceiver, "_headerExtensions", None), list) or not isinstance(codecs, list):
        raise RuntimeError("aiortc's RTCRtpTransceiver negotiated lists changed; camrelay's hooks need updating")
    transceiver._headerExtensions = [x for x in transceiver._headerExtensions if x.uri not in extensions]
    for codec in codecs:
        codec.rtcpFeedback = [f for f in codec.rtcpFeedback if f.type not in feedback]


def attach(sender: aiortc.RTCRtpSender, packer: object, request_keyframe: Callable[[], None]) -> None:
    """``sender`` packs with ``packer`` (``pack(frame) -> (payloads, timestamp)``) instead of encoding, and its
    PLI and FIR call ``request_keyframe`` (aiortc ignores them for tracks that yield packets)."""
    if not hasattr(sender, _ENCODER) or not hasattr(sender, "_send_keyframe"):
        raise RuntimeError("aiortc's RTCRtpSender internals changed; camrelay's hooks need updating")
    setattr(sender, _ENCODER, packer)
    sender._send_keyframe = request_keyframe  # type: ignore[method-assign]


def replace_send_loop(
    sender: aiortc.RTCRtpSender, run_rtp: Callable, retransmit: Callable, run_rtcp: Callable | None = None
) -> None:
    """``sender`` runs ``run_rtp(sender, codec)`` as its RTP loop and ``retransmit(sender, sequence)`` on NACK;
    ``run_rtcp(sender)``, if given, as its RTCP loop (aiortc's sends a sender report every 0.5 to 1.5 s)."""
    missing = [f for f in SENDER_FIELDS if not hasattr(sender, _SENDER + f)]
    if missing or not hasattr(sender, "_send_rtcp"):
        raise RuntimeError(f"aiortc's RTCRtpSender lacks {missing}; camrelay's fast send path needs updating")
    sender._run_rtp = types.MethodType(run_rtp, sender)  # type: ignore[method-assign]
    sender._retransmit = types.MethodType(retransmit, sender)  # type: ignore[method-assign]
    if run_rtcp is not None:
        sender._run_rtcp = types.MethodType(run_rtcp, sender)  # type: ignore[method-assign]


class SenderFields:
    """The private fields of one ``RTCRtpSender`` that a send loop reads and writes, by name."""

    __slots__ = ("sender", "_fields")

    def __init__(self, sender: aiortc.RTCRtpSender) -> None:
        self.sender = sender
        self._fields = sender.__dict__

    @property
    def track(self):
        return self._fields[_SENDER + "track"]

    @property
    def mid(self) -> str | None:
        return self._fields[_SENDER + "mid"]

    @property
    def extensions_map(self):
        return self._fields[_SENDER + "rtp_header_extensions_map"]

    @property
    def ssrc(self) -> int:
        return self.sender._ssrc

    @property
    def enabled(self) -> bool:
        return self.sender._enabled

    @property
    def rtx_payload_type(self) -> int | None:
        return self._fields[_SENDER + "rtx_payload_type"]

    @property
    def rtx_ssrc(self) -> int:
        return self.sender._rtx_ssrc

    def next_rtx_sequence(self) -> int:
        number = self._fields[_SENDER + "rtx_sequence_number"]
        self._fields[_SENDER + "rtx_sequence_number"] = (number + 1) & 0xFFFF
        return number

    def started(self) -> None:
        self._fields[_SENDER + "rtp_started"].set()

    async def next_frame(self, codec):
        """aiortc's next encoded frame (our packer's payloads and timestamp), or None."""
        return await self.sender._next_encoded_frame(codec)

    def count(self, ntp: int, timestamp: int, octets: int, packets: int) -> None:
        """What aiortc keeps per packet, once per frame: RTCP sender reports and stats read these."""
        f = self._fields
        f[_NTP_TIMESTAMP] = ntp
        f[_RTP_TIMESTAMP] = timestamp
        f[_OCTET_COUNT] += octets
        f[_PACKET_COUNT] += packets

    def exited(self) -> None:
        """As aiortc's loop ends: the track stopped and let go, the encoder gone, ``rtp_exited`` set."""
        f = self._fields
        track = f[_SENDER + "track"]
        if track:
            track.stop()
            f[_SENDER + "track"] = None
        f[_ENCODER] = None
        f[_SENDER + "rtp_exited"].set()

    async def send_rtp(self, data: bytes) -> None:
        await self.sender.transport._send_rtp(data)

    # -- its RTCP, for a loop that stands in for aiortc's ``_run_rtcp`` (``replace_send_loop``)

    @property
    def cname(self) -> str | None:
        return self._fields[_SENDER + "cname"]

    def rtcp_started(self) -> None:
        self._fields[_SENDER + "rtcp_started"].set()

    def report_counts(self) -> tuple[int, int, int, int]:
        """(NTP time, RTP timestamp, packets, octets) for a sender report now, as aiortc's loop reads them: through
        the synced fields (``SYNCED_COUNTS``), so what the stream's batch sent is in."""
        sender = self.sender
        return (
            getattr(sender, _NTP_TIMESTAMP), getattr(sender, _RTP_TIMESTAMP),
            getattr(sender, _PACKET_COUNT), getattr(sender, _OCTET_COUNT),
        )  # fmt: skip

    def reported(self, ntp: int) -> None:
        """A sender report carrying ``ntp`` went out now: what aiortc keeps to tell the round-trip time from the
        receiver reports that answer it."""
        f = self._fields
        f[_SENDER + "lsr"] = (ntp >> 16) & 0xFFFFFFFF
        f[_SENDER + "lsr_time"] = time.time()

    async def send_bye(self) -> None:
        """The RTCP BYE aiortc's loop sends as it ends."""
        await self.sender._send_rtcp([aiortc.rtp.RtcpByePacket(sources=[self.sender._ssrc])])

    def rtcp_exited(self) -> None:
        self._fields[_SENDER + "rtcp_exited"].set()


def sent(sender: aiortc.RTCRtpSender) -> tuple[int, int]:
    """RTP payload bytes and packets ``sender`` has sent, as its RTCP sender reports count them: what its C lane sent
    in the stream's batch brought in first (``sync_counts``), as aiortc's own reads do (``SYNCED_COUNTS``)."""
    f = sender.__dict__
    for sync in f.get(_SYNC, ()):
        sync()
    return f.get(_SENDER + "octet_count", 0), f.get(_SENDER + "packet_count", 0)


def dtls_socket(dtls: aiortc.RTCDtlsTransport) -> tuple[Any, tuple, pylibsrtp.Session]:
    """The ICE pair's socket protocol, the peer's address and the outgoing SRTP session; ConnectionError
    while DTLS is not connected or ICE has no pair."""
    return DtlsSocket(dtls).get()


class DtlsSocket:
    """``dtls_socket`` for one DTLS transport, asked once per frame per viewer: what it finds is kept while the
    transport stays connected on the same ICE pair (aioice makes the pair's address anew at each read)."""

    __slots__ = ("dtls", "_pair", "_found")

    def __init__(self, dtls: aiortc.RTCDtlsTransport) -> None:
        self.dtls = dtls
        self._pair: Any = None
        self._found: tuple[Any, tuple, pylibsrtp.Session] | None = None

    def get(self) -> tuple[Any, tuple, pylibsrtp.Session]:
        """As ``dtls_socket``: the pair's socket protocol, the peer's address, the outgoing SRTP session."""
        dtls = self.dtls
        if dtls._state is not _DTLS_CONNECTED:
            raise ConnectionError("DTLS not connected")
        nominated = dtls.transport._connection._nominated
        pair = nominated.get(1) if nominated else None
        if pair is None:
            raise ConnectionError("no ICE pair")
        found = self._found
        if pair is not self._pair or found is None:
            found = self._found = (pair.protocol, pair.remote_addr, dtls._tx_srtp)
            self._pair = pair
        return found


def count_dtls_sent(dtls: aiortc.RTCDtlsTransport, octets: int, packets: int) -> None:
    """The transport's own counters (its stats), as aiortc keeps them per packet; never fails the send."""
    f = dtls.__dict__
    f[_DTLS_TX_BYTES] = f.get(_DTLS_TX_BYTES, 0) + octets
    f[_DTLS_TX_PACKETS] = f.get(_DTLS_TX_PACKETS, 0) + packets


# -- counts kept by a C lane, brought into aiortc's fields when aiortc reads them

_SYNC = "camrelay_sync"  # on a sender or a DTLS transport: callables that bring its counts up to date


class _SyncedField:
    """One of aiortc's count fields (a sender's packets, octets, last RTP timestamp and its NTP time; a DTLS
    transport's bytes and packets sent), read through the callables its owner lists under ``_SYNC`` first: a C
    lane (``relay.webrtc.rtpsend.push_batch``) counts its frames itself, and they are added to aiortc's fields
    only when something reads them (a sender report being built, ``getStats``), not once per frame per viewer.
    A data descriptor on the class, so it comes before the instance's own field, which holds the value."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        fields = obj.__dict__
        for sync in fields.get(_SYNC, ()):
            sync()
        try:
            return fields[self.name]
        except KeyError:
            raise AttributeError(self.name) from None

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.name] = value


def _synced(owner: type, name: str) -> Patch:
    return Patch(owner, name, _SyncedField(name), absent=True)


# aiortc's counts read through their owners' sync callables while held (a relay's process: ``process_patches``);
# the C batch (``rtpsend.C_BATCH``) is taken only while it is.
SYNCED_COUNTS = _Patches(
    *(_synced(aiortc.RTCRtpSender, n) for n in (_NTP_TIMESTAMP, _RTP_TIMESTAMP, _OCTET_COUNT, _PACKET_COUNT)),
    *(_synced(aiortc.RTCDtlsTransport, n) for n in (_DTLS_TX_BYTES, _DTLS_TX_PACKETS)),
)


def sync_counts(sender: aiortc.RTCRtpSender, sync: Callable[[], None]) -> Callable[[], None]:
    """``sync()`` runs before anything reads ``sender``'s counts or its DTLS transport's (``SYNCED_COUNTS``), until
    the returned release."""
    owners = [sender.__dict__, sender.transport.__dict__]
    for fields in owners:
        fields.setdefault(_SYNC, []).append(sync)

    def release() -> None:
        for fields in owners:
            syncs = fields.get(_SYNC, [])
            if sync in syncs:
                syncs.remove(sync)

    return release


# -- a C lane: one viewer's sender, sent to with the rest of its stream's viewers in one call


def new_lane(origin: int, sequence: int, clock_rate: int, history: int) -> Any:
    """A C lane (``_fastsend.Lane``) for one sender: its timestamp ``origin``, next ``sequence`` number, RTP clock and
    the packets it keeps for NACKs (0: none); None where the C send path is not built."""
    if not C_SEND_BUILT:
        return None
    return _fastsend.Lane(origin, sequence, clock_rate, history)


def bind_lane(
    lane: Any,
    sender: aiortc.RTCRtpSender,
    fd: int,
    family: int,
    gso: bool,
    fallback: Callable[[memoryview, int, bool], object],
    guards: tuple,
    counts: Any,
) -> bool:
    """``lane`` sends to ``sender``'s peer on its nominated ICE pair, with its outgoing SRTP session, on socket ``fd``
    (of ``family``; ``gso``: segmented writes), handing ``fallback`` what it cannot write, adding what it writes to
    ``counts`` (the batcher's ``c_written``). It is taken (``_fastsend.send_batch``) only while DTLS stays connected,
    on that pair and that session, the sender enabled, the pair's transport open with nothing queued, and each of
    ``guards`` (more (dict, key, value), the caller's) holds. False: not bound (DTLS or ICE down, an address by
    name)."""
    dtls = sender.transport
    if dtls._state is not _DTLS_CONNECTED or not sender._enabled:
        return False
    nominated = dtls.transport._connection._nominated
    pair = nominated.get(1) if nominated else None
    session = dtls._tx_srtp
    if pair is None or session is None:
        return False
    guards = (
        (dtls.__dict__, "_state", _DTLS_CONNECTED),
        (dtls.__dict__, "_tx_srtp", session),
        (nominated, 1, pair),
        (sender.__dict__, "_enabled", True),
        *guards,
    )
    return route_lane(
        lane, session, fd, family, pair.remote_addr, gso, pair.protocol.transport, fallback, guards, counts
    )


def route_lane(
    lane: Any,
    session: pylibsrtp.Session,
    fd: int,
    family: int,
    addr: tuple,
    gso: bool,
    transport: Any,
    fallback: Callable[[memoryview, int, bool], object],
    guards: tuple,
    counts: Any,
) -> bool:
    """``bind_lane`` without a sender (it and tests): ``lane`` protects with ``session`` (held) and writes to ``addr``
    on socket ``fd`` while ``transport`` is open with nothing queued and ``guards`` hold (``_fastsend.Lane.bind``).
    An asyncio UDP transport's two states are read as guards too (``transport_guards``), not asked of its methods
    each frame."""
    held = transport_guards(transport)
    if held is not None:
        guards, transport = (*guards, *held), None
    return lane.bind(
        session, _srtp_t(session), _SRTP_PROTECT, fd, family, addr, gso, transport, fallback, guards, counts
    )


# asyncio's UDP transport (selector event loops) and the fields its ``is_closing()`` and
# ``get_write_buffer_size()`` return (Python 3.11 to 3.13: ``self._closing``, ``self._buffer_size``)
_DATAGRAM_TRANSPORT = asyncio.selector_events._SelectorDatagramTransport
_CLOSING, _BUFFER_SIZE = "_closing", "_buffer_size"


def transport_guards(transport: Any) -> tuple | None:
    """The (dict, key, value) guards that hold while ``transport`` is open with nothing queued, for a C lane to check
    with its others (two dict reads a frame instead of two Python calls): for asyncio's own UDP transport, whose
    ``is_closing()`` and ``get_write_buffer_size()`` are its ``_closing`` and ``_buffer_size`` (pinned in
    tests/test_borrowed.py); None for any other (a subclass that overrides them, a TURN relay's): its methods are
    asked then."""
    cls = type(transport)
    fields = getattr(transport, "__dict__", None)
    if (
        not isinstance(transport, _DATAGRAM_TRANSPORT)
        or cls.is_closing is not _DATAGRAM_TRANSPORT.is_closing
        or cls.get_write_buffer_size is not _DATAGRAM_TRANSPORT.get_write_buffer_size
        or fields is None
        or fields.get(_CLOSING) is not False
        or fields.get(_BUFFER_SIZE) != 0
    ):
        return None
    return (fields, _CLOSING, False), (fields, _BUFFER_SIZE, 0)


def send_batch(
    writer: SrtpFrameWriter,
    lanes: list,
    payloads: list[bytes],
    pts: int,
    published_at: float,
    max_segments: int,
    max_bytes: int,
    abs_send_time: int = -1,
    serial: int = 0,
) -> tuple[list[int], list[tuple[int, BaseException, bool]], array.array]:
    """One frame to every lane that takes it now, in one C call (``_fastsend.send_batch``, in ``writer``'s buffer):
    (indices declined, (index, exception, taken) of lanes that failed mid-frame (``taken``: some of its packets
    were protected, their sequence numbers spent, and the frame is the lane's as if sent: it must not be sent
    again), for each lane sent the seconds from ``published_at`` to its last write, as an array of doubles).
    ``abs_send_time`` (24 bits): the same for every lane (tests); -1: each lane's from the clock as it is sent.
    Each lane taken keeps ``serial`` as its ``batch``: where the call raises, whom it had reached."""
    delays = _NO_DELAYS * len(lanes)
    declined, failed, sent = _fastsend.send_batch(
        lanes, payloads, pts, published_at, writer._buffer, SRTP_TRAILER_ROOM, max_segments, max_bytes,
        abs_send_time, serial, delays,
    )  # fmt: skip
    if failed:
        failed = [
            (i, _srtp_error(e.args[0]) if isinstance(e, _fastsend.SrtpError) else e, taken) for i, e, taken in failed
        ]
    if sent < len(delays):
        del delays[sent:]
    return declined, failed, delays


_NO_DELAYS = array.array("d", [0.0])  # one lane's room for its delay in ``send_batch``


# -- SRTP, a frame at a time

# What libsrtp may add after a packet it protects: SRTP_MAX_TAG_LEN + SRTP_MAX_MKI_LEN (pylibsrtp's own margin).
SRTP_TRAILER_ROOM = 16 + 128
# A sender's buffer: a 720p keyframe (~40 packets of ~1.2 kB) whole; bigger frames go through it in parts.
FRAME_BUFFER_BYTES = 64 * 1024
_MARKER_SEQUENCE = struct.Struct("!BH")  # an RTP header's marker and payload type byte, and its sequence number
# srtp_protect as _fastsend.c calls it (libsrtp 2's, which pylibsrtp 1.0 links); another signature: no C path
SRTP_PROTECT_TYPE = "srtp_err_status_t(*)(struct srtp_ctx_t_ *, void *, int *)"


def _srtp_protect_address() -> int:
    """Where pylibsrtp's own ``srtp_protect`` lies, for the C send path; 0 where it is not the one it calls."""
    if srtp_ffi.typeof(srtp_lib.srtp_protect).cname != SRTP_PROTECT_TYPE or srtp_ffi.sizeof("srtp_err_status_t") != 4:
        return 0
    return int(srtp_ffi.cast("uintptr_t", srtp_ffi.addressof(srtp_lib, "srtp_protect")))


_SRTP_PROTECT = _srtp_protect_address()
_SRTP_T = "_camrelay_srtp_t"  # a pylibsrtp session's srtp_t, kept on it as a number for the C send path
# Whether ``SrtpFrameWriter.send_frame`` can run here: the extension built and pylibsrtp's srtp_protect the one it
# was written for (relay.webrtc.rtpsend's switch reads it).
FASTSEND_API = 4  # _fastsend.c's API_VERSION, as send_frame, send_batch and Lane are called here
# A module built from an older _fastsend.c (pip install -e . not run again since the source changed) is left alone.
C_SEND_STALE = _fastsend is not None and getattr(_fastsend, "API_VERSION", None) != FASTSEND_API
C_SEND_BUILT = _fastsend is not None and not C_SEND_STALE and _SRTP_PROTECT != 0


def _srtp_t(session: pylibsrtp.Session) -> int:
    """``session``'s srtp_t as a number, made once (a cast a call was 0.5 us a viewer-frame)."""
    ctx = getattr(session, _SRTP_T, None)
    if ctx is None:
        ctx = int(srtp_ffi.cast("uintptr_t", session._srtp[0]))
        setattr(session, _SRTP_T, ctx)  # lives and dies with the session, as its srtp_t does
    return ctx


def _srtp_error(status: int) -> pylibsrtp.Error:
    return pylibsrtp.Error(pylibsrtp.ERRORS[status] if 0 <= status < len(pylibsrtp.ERRORS) else f"error {status}")


class SrtpFrameWriter:
    """A frame's RTP packets, SRTP-protected one after another in one buffer (``rtpsend`` keeps one a thread).

    pylibsrtp's ``Session.protect`` takes one whole packet as bytes, checks it,
    copies it into its buffer, protects it and slices out a new bytes: with the
    header and payload joined first, three copies and three objects a packet.
    Here the header and the payload are copied once, side by side, into this
    buffer and protected where they lie (``srtp_protect`` through pylibsrtp's C
    binding, on the same libsrtp session, so the sequence state is the one
    aiortc's retransmissions and RTCP use), and a run of packets is handed on as
    a view of the buffer, ready for a segmented write. Packets lie unaligned; libsrtp
    reads them byte-wise or unaligned-safe on x86-64 and AArch64.
    """

    __slots__ = ("_cdata", "_buffer", "_view", "_length")

    def __init__(self, size: int = FRAME_BUFFER_BYTES) -> None:
        self._cdata = srtp_ffi.new("unsigned char[]", size)
        self._buffer = srtp_ffi.buffer(self._cdata)
        self._view = memoryview(self._buffer)  # what runs are handed on as: no copy
        self._length = srtp_ffi.new("int *")

    def protect_frame(
        self,
        session: pylibsrtp.Session,
        header: bytes,
        payloads: list[bytes],
        sequence: int,
        emit: Callable[[bytes, int], object],
        max_segments: int,
        max_bytes: int,
    ) -> int:
        """A frame: ``header`` with each of ``payloads`` (numbered from ``sequence``, the marker on the last),
        protected with ``session`` one after the other in the buffer, each run of datagrams a segmented write can
        carry handed to ``emit(data, segment)`` as soon as it ends: equal sizes, the last may be smaller, at most
        ``max_segments`` and ``max_bytes`` (``udpbatch.gso_runs``' rule); the bytes protected. ``data`` is a view
        of the buffer, valid during the call only: ``emit`` writes it, or copies what it keeps.

        One loop, one libsrtp call a packet and no other call per packet: a method call or two a packet and the
        runs worked out after cost a viewer 5 to 6 us more a 13-packet frame (of 24 to 37: docs/benchmarks.md)."""
        buffer, view, cdata, length, ctx = self._buffer, self._view, self._cdata, self._length, session._srtp[0]
        protect, ok, pack_into = srtp_lib.srtp_protect, srtp_lib.srtp_err_status_ok, _MARKER_SEQUENCE.pack_into
        room = len(buffer) - SRTP_TRAILER_ROOM
        size = len(header)
        pt = header[1] & 0x7F
        last = len(payloads) - 1
        used = start = count = segment = sent = 0
        for i, payload in enumerate(payloads):
            middle = used + size
            end = middle + len(payload)
            if end > room and used:  # the buffer is full: what it holds leaves, and it starts again
                emit(view[start:used], segment)
                used, start, count = 0, 0, 0
                middle, end = size, size + len(payload)
            if end > room:  # alone it does not fit with its SRTP tag (C's send_frame refuses it the same way)
                raise ValueError(f"protect_frame: packet {i} of {end} bytes does not fit the {len(buffer)}-byte buffer")
            view[used:middle] = header
            view[middle:end] = payload
            pack_into(view, used + 1, pt | 0x80 if i == last else pt, (sequence + i) & 0xFFFF)
            length[0] = end - used
            status = protect(ctx, cdata + used, length)
            if status != ok:
                raise _srtp_error(status)
            n = length[0]
            if (
                count
                and n <= segment
                and used - start == count * segment
                and count < max_segments
                and used - start + n <= max_bytes
            ):
                count += 1
            else:
                if count:
                    emit(view[start:used], segment)
                start, count, segment = used, 1, n
            used += n
            sent += n
        if count:
            emit(view[start:used], segment)
        return sent

    def send_frame(
        self,
        session: pylibsrtp.Session,
        header: bytes,
        payloads: list[bytes],
        sequence: int,
        fd: int,
        family: int,
        addr: tuple,
        gso: bool,
        emit: Callable[[memoryview, int, bool], object],
        max_segments: int,
        max_bytes: int,
    ) -> tuple[int, int, int] | None:
        """``protect_frame`` in one C call (``_fastsend.send_frame``, only where ``C_SEND_BUILT``): each run is
        written from C to ``addr`` on socket ``fd`` of ``family``, in one segmented write (``gso``) or one write a
        datagram; what C could not write (the socket's buffer full, segmentation refused, any error) goes, from that
        datagram on, to ``emit(data, segment, blocked)``, the Python path's writer (``blocked``: the socket's buffer
        was full), and so does every run after it. (bytes protected, datagrams and system calls C wrote itself);
        None, with nothing done, for an address or payload it does not take (a name, not a number; not bytes):
        ``protect_frame`` then. An exception after C wrote some carries their count as ``camrelay_written``
        (datagrams, system calls)."""
        try:
            return _fastsend.send_frame(
                self._buffer, _srtp_t(session), _SRTP_PROTECT, SRTP_TRAILER_ROOM, fd, family, addr, header, payloads,
                sequence, max_segments, max_bytes, gso, emit,
            )  # fmt: skip
        except _fastsend.SrtpError as exc:
            error = _srtp_error(exc.args[0])
            error.camrelay_written = getattr(exc, "camrelay_written", (0, 0))  # type: ignore[attr-defined]
            raise error from None


# -- H.264 packetization


class _EqualFragments(AiortcH264):
    """aiortc's H.264 packetizer with FU-A fragments all full-size but the last.

    aiortc spreads a NAL unit evenly (sizes differ by one byte); full-size
    fragments make a frame's datagrams equal-size but the last, so the whole
    run leaves in one segmented write (relay.webrtc.udpbatch).
    """

    @staticmethod
    def _packetize_fu_a(data: bytes) -> list[bytes]:
        room = h264.PACKET_MAX - h264.FU_A_HEADER_SIZE
        indicator = (data[0] & 0xE0) | h264.NAL_TYPE_FU_A  # F and NRI of the NAL unit, type FU-A
        nal_type = data[0] & 0x1F
        body = memoryview(data)[h264.NAL_HEADER_SIZE :]
        last = (len(body) - 1) // room * room  # where the last fragment starts
        if last == 0:
            return [bytes((indicator, nal_type | 0xC0)) + body]  # start and end (a NAL unit just past PACKET_MAX)
        middle = bytes((indicator, nal_type))  # one header for every fragment between the first and the last
        return [
            bytes((indicator, nal_type | 0x80)) + body[:room],
            *[middle + body[i : i + room] for i in range(room, last, room)],
            bytes((indicator, nal_type | 0x40)) + body[last:],
        ]


def packetize(access_unit: bytes) -> list[bytes]:
    """RTP payloads (single NAL, STAP-A, FU-A) for one H.264 access unit (Annex B). Empty NAL units (a start
    code at the very end, two in a row) are left out: aiortc's STAP-A packer fails on one."""
    return _EqualFragments._packetize([nal for nal in AiortcH264._split_bitstream(access_unit) if nal])


def packetize_nals(nals: list[memoryview]) -> list[bytes]:
    """``packetize`` of an access unit already split into its NAL units (views, none empty: ``relay.h264.nals_at``
    by the places its worker gave), not scanned for start codes; a NAL unit cut into FU-A fragments is not
    copied first."""
    return _EqualFragments._packetize([nal if len(nal) > h264.PACKET_MAX else bytes(nal) for nal in nals])
