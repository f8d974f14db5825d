"""aiortc's RTP send loop, done per frame instead of per packet.

aiortc's ``RTCRtpSender._run_rtp`` builds an ``RtpPacket`` object for every
packet, reads the NTP clock twice for it, serializes its header extensions,
and passes it down four coroutines to the socket: ~14 µs of Python per
packet. A 720p keyframe is ~40 packets; for 30 viewers the last one waits for
1,200 of those, and the frame before each keyframe waits too (a receiver's
jitter buffer hands a frame on when the next one starts), so keyframes set
the 95th percentile of latency.

Here each viewer's sender serializes one header per frame with aiortc's own
serializer, then for each payload patches the sequence number and marker
bit, SRTP-protects it and hands it to the socket batcher (relay.udpbatch):
no per-packet objects, clock reads or awaits. RTCP sender reports keep their
counts (updated once per frame) and NACKed packets are rebuilt from a
history of (sequence, timestamp, marker, payload) on demand.

The hooks are aiortc's name-mangled sender fields; tests/test_aiortc_hooks.py
fails if an aiortc upgrade moves them.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
import types

from aiortc import clock
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtcrtpsender import RTCRtpSender, random_sequence_number
from aiortc.rtp import RTP_HISTORY_SIZE, RtpPacket, wrap_rtx
from aiortc.utils import random32, uint16_add, uint32_add

from .udpbatch import send_now

log = logging.getLogger(__name__)

_S = "_RTCRtpSender__"  # aiortc's private sender fields
_D = "_RTCDtlsTransport__"
FIELDS = (
    "track", "mid", "rtp_started", "rtp_exited", "rtp_header_extensions_map", "rtx_payload_type",
    "rtx_sequence_number", "ntp_timestamp", "rtp_timestamp", "octet_count", "packet_count", "encoder",
)  # fmt: skip
_HISTORY = "camrelay_history"
RETRANSMITS = "camrelay_retransmits"  # NACKed packets sent again, per sender


def install(sender: RTCRtpSender) -> None:
    """Give ``sender`` the per-frame send loop and the matching retransmission."""
    missing = [f for f in FIELDS if not hasattr(sender, _S + f)]
    if missing:
        raise RuntimeError(f"aiortc's RTCRtpSender lacks {missing}; camrelay's fast send path needs updating")
    sender._run_rtp = types.MethodType(_run_rtp, sender)  # type: ignore[method-assign]
    sender._retransmit = types.MethodType(_retransmit, sender)  # type: ignore[method-assign]


def _socket_of(dtls):
    """The ICE pair's socket protocol and the viewer's address, or ConnectionError."""
    if dtls._state != DtlsState.CONNECTED:
        raise ConnectionError("DTLS not connected")
    pair = dtls.transport._connection._nominated.get(1)
    if pair is None:
        raise ConnectionError("no ICE pair")
    return pair.protocol, pair.remote_addr


async def _run_rtp(self: RTCRtpSender, codec) -> None:
    d = self.__dict__
    d[_S + "rtp_started"].set()
    history: dict[int, tuple[int, int, bool, bytes, int]] = {}
    d[_HISTORY] = history
    sequence = random_sequence_number()
    origin = random32()
    try:
        while True:
            if not d[_S + "track"]:
                await asyncio.sleep(0.02)
                continue
            frame = await self._next_encoded_frame(codec)
            if frame is None:
                continue
            timestamp = uint32_add(origin, frame.timestamp)
            payloads = frame.payloads
            ntp = clock.current_ntp_time()
            template = RtpPacket(payload_type=codec.payloadType, sequence_number=sequence, timestamp=timestamp)
            template.ssrc = self._ssrc
            template.extensions.abs_send_time = (ntp >> 14) & 0x00FFFFFF
            template.extensions.mid = d[_S + "mid"]
            header = bytearray(template.serialize(d[_S + "rtp_header_extensions_map"]))  # no payload: the header
            dtls = self.transport
            protocol, addr = _socket_of(dtls)
            protect = dtls._tx_srtp.protect
            last = len(payloads) - 1
            sent = octets = 0
            pt = header[1] & 0x7F
            for i, payload in enumerate(payloads):
                header[1] = pt | 0x80 if i == last else pt
                header[2] = sequence >> 8
                header[3] = sequence & 0xFF
                data = protect(bytes(header) + payload)
                send_now(protocol, data, addr)
                history[sequence % RTP_HISTORY_SIZE] = (sequence, timestamp, i == last, payload, codec.payloadType)
                sent += len(data)
                octets += len(payload)
                sequence = uint16_add(sequence, 1)
            # What aiortc keeps per packet, once per frame: RTCP sender reports and stats read these.
            d[_S + "ntp_timestamp"] = ntp
            d[_S + "rtp_timestamp"] = timestamp
            d[_S + "octet_count"] += octets
            d[_S + "packet_count"] += len(payloads)
            dd = dtls.__dict__
            dd[_D + "tx_bytes"] = dd.get(_D + "tx_bytes", 0) + sent  # stats only: never fail the send on them
            dd[_D + "tx_packets"] = dd.get(_D + "tx_packets", 0) + len(payloads)
    except (asyncio.CancelledError, ConnectionError, MediaStreamError):
        pass
    except Exception:
        # As aiortc does: the loop must end with rtp_exited set, or stop() hangs.
        log.warning("rtp send loop failed: %s", traceback.format_exc())
    track = d[_S + "track"]
    if track:
        track.stop()
        d[_S + "track"] = None
    d[_S + "encoder"] = None
    d[_S + "rtp_exited"].set()


async def _retransmit(self: RTCRtpSender, sequence_number: int) -> None:
    d = self.__dict__
    entry = d.get(_HISTORY, {}).get(sequence_number % RTP_HISTORY_SIZE)
    if entry is None or entry[0] != sequence_number:
        return
    sequence, timestamp, marker, payload, payload_type = entry
    d[RETRANSMITS] = d.get(RETRANSMITS, 0) + 1
    packet = RtpPacket(payload_type=payload_type, marker=int(marker), sequence_number=sequence, timestamp=timestamp)
    packet.ssrc = self._ssrc
    packet.payload = payload
    packet.extensions.abs_send_time = (clock.current_ntp_time() >> 14) & 0x00FFFFFF
    packet.extensions.mid = d[_S + "mid"]
    rtx = d[_S + "rtx_payload_type"]
    if rtx is not None:
        packet = wrap_rtx(packet, payload_type=rtx, sequence_number=d[_S + "rtx_sequence_number"], ssrc=self._rtx_ssrc)
        d[_S + "rtx_sequence_number"] = uint16_add(d[_S + "rtx_sequence_number"], 1)
    await self.transport._send_rtp(packet.serialize(d[_S + "rtp_header_extensions_map"]))


def sent(sender: RTCRtpSender) -> tuple[int, int]:
    """RTP payload bytes and packets ``sender`` has sent, as its RTCP sender reports count them."""
    d = sender.__dict__
    return d.get(_S + "octet_count", 0), d.get(_S + "packet_count", 0)
