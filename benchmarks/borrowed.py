"""Every private aiortc and aioice name the benchmarks' light peer uses (``benchmarks/lightpeer.py``), and nothing else.

The light peer is an aiortc viewer that lets aiortc do ICE, DTLS and RTCP,
but takes each RTP datagram off its socket before SRTP: RTP headers are in
the clear in SRTP, so frames and losses can be counted without decrypting,
parsing or reassembling anything. That needs three private names, all per peer
connection (no process-wide patch, so a relay or a decoding probe in the same
process is untouched):

- the sockets of its ICE connection (``RTCIceTransport._connection``,
  aioice's ``Connection._protocols``), whose ``datagram_received`` it
  replaces on each instance (``divert_rtp``);
- the DTLS transport's ``_send_rtp``, which protects and sends the receiver
  reports it writes itself (``send_rtcp``): aiortc's receiver only reports on
  streams it parsed packets of, and it parses none here.

``relay.webrtc.borrowed`` checks the aiortc and aioice versions on import
(the bounds in ``pyproject.toml``); this module is written for the same ones
(``tests/test_lightpeer.py`` pins each name it uses).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiortc

from relay.webrtc.borrowed import WRITTEN_FOR, check_versions  # noqa: F401  (the bounds this module shares)


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
    Call after ``pc`` has gathered (``setLocalDescription``) and before media flows; until the returned release."""
    protocols = _protocols(pc)
    if not protocols:
        raise RuntimeError("the peer connection has not gathered: no ICE socket to divert")
    for protocol in protocols:

        def datagram_received(data: bytes, addr: tuple, protocol: Any = protocol) -> None:
            if not take(data):  # to whatever the class has then: aioice's, or a relay's watch in this process
                type(protocol).datagram_received(protocol, data, addr)

        protocol.datagram_received = datagram_received

    def release() -> None:
        for protocol in protocols:
            protocol.__dict__.pop("datagram_received", None)

    return release


async def send_rtcp(pc: aiortc.RTCPeerConnection, data: bytes) -> None:
    """Send one RTCP packet (``data``, in the clear) to ``pc``'s peer, protected as SRTCP by its DTLS transport;
    ConnectionError when it is not connected."""
    transceivers = pc.getTransceivers()
    if not transceivers:
        raise ConnectionError("no transceiver")
    await transceivers[0].receiver.transport._send_rtp(data)
