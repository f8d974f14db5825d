"""Every private aiortc and aioice name the benchmarks' light peer uses (``benchmarks/lightpeer.py``), and nothing else.

The light peer is an aiortc viewer that lets aiortc do ICE, DTLS and RTCP,
but takes each RTP datagram off its socket before SRTP: RTP headers are in
the clear in SRTP, so frames and losses can be counted without decrypting,
parsing or reassembling anything. That needs three private names, all per peer
connection (no process-wide patch, so a relay or a decoding probe in the same
process is untouched):

- the socket protocols of its ICE connection (``RTCIceTransport._connection``,
  aioice's ``Connection._protocols``): their sockets are read by a reader of
  its own, which hands what is not RTP to the protocol (``divert_rtp``);
- the DTLS transport's ``_send_rtp``, which protects and sends the receiver
  reports it writes itself (``send_rtcp``): aiortc's receiver only reports on
  streams it parsed packets of, and it parses none here.

The burst benchmark's join trace (``benchmarks/looplag/jointrace.py``, in the relay's process) notes each
viewer's ICE agent's steps: its agent (``ice_agent_of``) and aioice's ``Connection`` wrapped once for every agent
in that process (``trace_ice_steps``, its ``_check_list_maybe_complete`` among them).

The lip-sync probe (``benchmarks/lipsync.py``) decrypts, but reads the packets
itself: its DTLS transport's ``_handle_rtp_data`` and ``_handle_rtcp_data``
(``tap_decrypted``) hand it each decrypted RTP packet instead of aiortc's
receivers, and each RTCP packet besides them (the sender reports).

The RTCP cost benchmark (``benchmarks/rtcpcost.py``) protects a viewer's RTCP with its DTLS transport's SRTP
session (``protect_rtcp``: ``_tx_srtp``) and hands it to the relay's side where its ICE connection would
(``ice_connection_of``).

The join cost benchmark (``benchmarks/joincost.py``) times steps of a session's set-up in the relay's process by
wrapping them where they are looked up: aiortc's private ones are named here (``JOIN_STEPS``).

``relay.webrtc.borrowed`` checks the aiortc and aioice versions on import
(the bounds in ``pyproject.toml``); this module is written for the same ones
(``tests/test_lightpeer.py`` pins each name it uses).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

import aiortc

from relay.webrtc.borrowed import WRITTEN_FOR, check_versions  # noqa: F401  (the bounds this module shares)

DATAGRAM_MAX = 65536  # bytes read per datagram: the largest a UDP datagram can be

# Steps of a session's set-up that benchmarks.joincost times (label, module, attribute path: a method or a
# module-level function, wrapped where it is looked up): aiortc's start of a peer connection once its answer is
# applied (ICE, DTLS, the senders), its DTLS transport's start and two of its parts, and camrelay's own send loop
# (relay.webrtc.rtpsend), which takes the name of aiortc's it replaces (a joiner's first frames, its catch-up).
JOIN_STEPS: tuple[tuple[str, str, str], ...] = (
    ("peer connection started (ICE, DTLS, senders)", "aiortc.rtcpeerconnection",
     "RTCPeerConnection._RTCPeerConnection__connect"),
    ("DTLS: start (handshake, peer check, SRTP set up)", "aiortc.rtcdtlstransport", "RTCDtlsTransport.start"),
    ("DTLS: SRTP set up", "aiortc.rtcdtlstransport", "RTCDtlsTransport._setup_srtp"),
    ("DTLS: peer's fingerprint checked", "aiortc.rtcdtlstransport", "RTCDtlsTransport._validate_peer_identity"),
    ("a joiner's own send loop (first frames, catch-up)", "relay.webrtc.rtpsend", "_run_rtp"),
)  # fmt: skip


def _protocols(pc: aiortc.RTCPeerConnection) -> list[Any]:
    """The socket protocols of every ICE connection of ``pc`` (one per local candidate, once gathered)."""
    found = []
    for transceiver in pc.getTransceivers():
        connection = transceiver.receiver.transport.transport._connection
        found += connection._protocols
    return found


def divert_rtp(pc: aiortc.RTCPeerConnection, take: Callable[[bytes], bool]) -> Callable[[], None]:
    """Every datagram ``pc``'s ICE sockets receive goes to ``take(data)`` first, as it arrives (SRTP still
    encrypted); what it does not take (returns False: STUN, DTLS, SRTCP) goes on to aioice and aiortc as usual.
    Call after ``pc`` has gathered (``setLocalDescription``) and before media flows; until the returned release,
    which must come before ``pc`` closes.

    Each socket is read by a reader of our own that drains it at every wake-up (a frame's packets arrive
    together): asyncio's datagram transport, paused meanwhile, reads one datagram per turn of the loop, and
    that turn, not the header reads, was most of a light peer's cost (about 15 us a datagram against 2)."""
    protocols = _protocols(pc)
    if not protocols:
        raise RuntimeError("the peer connection has not gathered: no ICE socket to divert")
    loop = asyncio.get_running_loop()
    readers = []
    for protocol in protocols:
        transport = protocol.transport
        # A duplicate of the transport's descriptor (the same socket): asyncio keeps a transport's own
        # descriptor for the transport, and the duplicate closes with us.
        sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        sock.setblocking(False)
        transport.pause_reading()
        loop.add_reader(sock.fileno(), _drain, sock, protocol, take)
        readers.append((sock, transport))

    def release() -> None:
        for sock, transport in readers:
            loop.remove_reader(sock.fileno())
            sock.close()
            if not transport.is_closing():
                transport.resume_reading()
        readers.clear()

    return release


def _drain(sock: socket.socket, protocol: Any, take: Callable[[bytes], bool]) -> None:
    """Every datagram waiting on ``sock``: to ``take``, else to aioice's protocol, as its transport would."""
    recvfrom = sock.recvfrom
    while True:
        try:
            data, addr = recvfrom(DATAGRAM_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # an ICMP error from an earlier send, as asyncio reports it
            protocol.error_received(exc)
            return
        if not take(data):
            protocol.datagram_received(data, addr)


async def send_rtcp(pc: aiortc.RTCPeerConnection, data: bytes) -> None:
    """Send one RTCP packet (``data``, in the clear) to ``pc``'s peer, protected as SRTCP by its DTLS transport;
    ConnectionError when it is not connected."""
    transceivers = pc.getTransceivers()
    if not transceivers:
        raise ConnectionError("no transceiver")
    await transceivers[0].receiver.transport._send_rtp(data)


def protect_rtcp(pc: aiortc.RTCPeerConnection, data: bytes) -> bytes:
    """``data`` (one RTCP packet or a compound, in the clear) protected as SRTCP by ``pc``'s DTLS transport, as it
    would send it, and not sent (``benchmarks.rtcpcost`` hands it to the relay's side itself)."""
    return pc.getTransceivers()[0].receiver.transport._tx_srtp.protect_rtcp(data)


def ice_connection_of(pc: aiortc.RTCPeerConnection) -> Any:
    """The aioice connection of ``pc``'s (first transceiver's) ICE transport: where the relay's process reads its
    peer's datagrams (``relay.webrtc.borrowed.read_rtcp_at_once``)."""
    return pc.getTransceivers()[0].sender.transport.transport._connection


def tap_decrypted(
    pc: aiortc.RTCPeerConnection, rtp: Callable[[bytes], None], rtcp: Callable[[bytes], None]
) -> Callable[[], None]:
    """Every RTP packet ``pc``'s (bundled) DTLS transport decrypts goes to ``rtp(data)`` instead of aiortc's
    receivers, and every RTCP packet to ``rtcp(data)`` before them, until the returned release. Per connection
    (its transport's own attributes): a relay in the same process is untouched. Call it once connected."""
    transport = pc.getTransceivers()[0].receiver.transport
    deliver = transport._handle_rtcp_data

    async def handle_rtp(data: bytes, arrival_time_ms: int) -> None:
        rtp(data)

    async def handle_rtcp(data: bytes) -> None:
        rtcp(data)
        await deliver(data)

    transport._handle_rtp_data = handle_rtp
    transport._handle_rtcp_data = handle_rtcp

    def release() -> None:
        for name in ("_handle_rtp_data", "_handle_rtcp_data"):
            transport.__dict__.pop(name, None)

    return release


def observe_rtp(pc: aiortc.RTCPeerConnection, seen: Callable[[bytes], None]) -> Callable[[], None]:
    """Every datagram ``pc``'s ICE sockets receive is shown to ``seen(data)`` (SRTP still encrypted) as aioice's
    protocol gets it, then goes on unchanged: the probe reads as it did, one datagram a turn of its loop. Until
    the returned release, which must come before ``pc`` closes."""
    protocols = _protocols(pc)
    if not protocols:
        raise RuntimeError("the peer connection has not gathered: no ICE socket to observe")
    for protocol in protocols:
        received = protocol.datagram_received  # bound to the protocol, before the wrapper takes its name

        def datagram_received(data: bytes, addr: tuple, received=received) -> None:
            seen(data)
            received(data, addr)

        protocol.datagram_received = datagram_received

    def release() -> None:
        for protocol in protocols:
            protocol.__dict__.pop("datagram_received", None)

    return release


def ice_agent_of(pc: aiortc.RTCPeerConnection) -> Any | None:
    """A peer connection's ICE agent (aioice's ``Connection``, its first transceiver's transport's), or None."""
    try:
        return pc.getTransceivers()[0].sender.transport.transport._connection
    except (AttributeError, IndexError):
        return None


def trace_ice_steps(once: Callable[[Any, str], None]) -> None:
    """aioice's ``Connection`` wrapped, for every agent in this process, to call ``once(agent, step)`` at each of
    its steps: a check received (``ice_in``; ``nominated`` when it carried USE-CANDIDATE), a check of its own
    succeeded (``ice_valid``), its check list completed (``ice_done``). For the relay's process under the join
    trace only (a benchmark's), never a test's."""
    import aioice.ice

    cls = aioice.ice.Connection
    received, complete, maybe_complete = cls.request_received, cls.check_complete, cls._check_list_maybe_complete

    def traced_received(self, message, addr, protocol):
        received(self, message, addr, protocol)  # its answer sent first: the trace's time is not in it
        once(self, "ice_in")
        if "USE-CANDIDATE" in message.attributes:
            once(self, "nominated")

    def traced_complete(self, pair):
        succeeded = pair.state == pair.State.SUCCEEDED
        complete(self, pair)
        if succeeded:
            once(self, "ice_valid")

    def traced_maybe_complete(self):
        done = maybe_complete(self)
        if done:
            once(self, "ice_done")
        return done

    cls.request_received = traced_received
    cls.check_complete = traced_complete
    cls._check_list_maybe_complete = traced_maybe_complete
