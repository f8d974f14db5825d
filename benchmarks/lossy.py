"""A lossy link on loopback, in user space (this machine has no netem).

``LossyLink`` sits between one WebRTC viewer and the relay. It owns two UDP
sockets on 127.0.0.1: ``viewer_side`` (the viewer is told the relay lives
there) and ``relay_side`` (the relay is told the viewer lives there). It
forwards every datagram, dropping a share of those that go to the viewer and
delaying each by a random jitter, so the viewer sees the media path of a bad
Wi-Fi link. The viewer's offer and the relay's answer are rewritten with
``rewrite_candidates`` so ICE runs through the link and nothing bypasses it.

Loss and jitter can change while it runs (``set_loss``); counters tell how
many datagrams went each way and how many were dropped.
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass


@dataclass
class LinkCounters:
    to_viewer: int = 0
    to_relay: int = 0
    dropped: int = 0
    nacks: int = 0  # RTCP generic NACKs the viewer sent (RFC 4585), read from SRTCP's clear header
    plis: int = 0  # RTCP picture loss indications the viewer sent


RTPFB, PSFB = 205, 206  # RTCP feedback packet types
NACK_FMT, PLI_FMT = 1, 1


class _Side(asyncio.DatagramProtocol):
    def __init__(self, link: LossyLink, name: str) -> None:
        self.link, self.name = link, name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.link._received(self.name, data, addr)


class LossyLink:
    def __init__(self, loss: float = 0.0, jitter_ms: float = 0.0, seed: int = 1) -> None:
        self.loss, self.jitter_ms = loss, jitter_ms
        self.counters = LinkCounters()
        self._rng = random.Random(seed)
        self._viewer: _Side | None = None
        self._relay: _Side | None = None
        self.viewer_addr: tuple[str, int] | None = None  # learnt from the first datagram
        self.relay_addr: tuple[str, int] | None = None  # the relay's candidate, from its answer
        self._timers: set[asyncio.TimerHandle] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        _, self._viewer = await loop.create_datagram_endpoint(
            lambda: _Side(self, "viewer"), local_addr=("127.0.0.1", 0)
        )
        _, self._relay = await loop.create_datagram_endpoint(lambda: _Side(self, "relay"), local_addr=("127.0.0.1", 0))

    @property
    def viewer_side(self) -> int:
        assert self._viewer and self._viewer.transport
        return self._viewer.transport.get_extra_info("sockname")[1]

    @property
    def relay_side(self) -> int:
        assert self._relay and self._relay.transport
        return self._relay.transport.get_extra_info("sockname")[1]

    def set_loss(self, loss: float, jitter_ms: float | None = None) -> None:
        self.loss = loss
        if jitter_ms is not None:
            self.jitter_ms = jitter_ms

    def close(self) -> None:
        for t in self._timers:
            t.cancel()
        self._timers.clear()
        for side in (self._viewer, self._relay):
            if side and side.transport:
                side.transport.close()

    def _received(self, side: str, data: bytes, addr) -> None:
        if side == "viewer":  # from the viewer, on to the relay
            self.viewer_addr = addr
            if len(data) >= 8 and data[0] >> 6 == 2:  # RTP/RTCP version 2; SRTCP leaves the first header clear
                kind, fmt = data[1], data[0] & 0x1F
                self.counters.nacks += kind == RTPFB and fmt == NACK_FMT
                self.counters.plis += kind == PSFB and fmt == PLI_FMT
            if self.relay_addr and self._relay and self._relay.transport:
                self.counters.to_relay += 1
                self._relay.transport.sendto(data, self.relay_addr)
            return
        # From the relay, on to the viewer: the lossy direction (the media).
        if self.viewer_addr is None or not (self._viewer and self._viewer.transport):
            return
        if self._rng.random() < self.loss:
            self.counters.dropped += 1
            return
        self.counters.to_viewer += 1
        delay = self._rng.uniform(0, self.jitter_ms) / 1000 if self.jitter_ms else 0.0
        if delay <= 0:
            self._viewer.transport.sendto(data, self.viewer_addr)
            return
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def send() -> None:
            self._timers.discard(handle)
            if self._viewer and self._viewer.transport and not self._viewer.transport.is_closing():
                self._viewer.transport.sendto(data, self.viewer_addr)

        handle = loop.call_later(delay, send)
        self._timers.add(handle)


_CANDIDATE = re.compile(r"^(a=candidate:\S+ \d+ udp \d+) 127\.0\.0\.1 (\d+) (typ host.*)$", re.M | re.I)


def rewrite_candidates(sdp: str, port: int) -> tuple[str, int | None]:
    """Keep the SDP's first loopback UDP host candidate, pointed at ``port``; drop the others.

    Returns the new SDP and the port the candidate had, so that the only path is through the link.
    """
    out, original = [], None
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            m = _CANDIDATE.match(line)
            if m is None or original is not None:
                continue
            original = int(m.group(2))
            line = f"{m.group(1)} 127.0.0.1 {port} {m.group(3)}"
        out.append(line)
    return "\r\n".join(out) + "\r\n", original
