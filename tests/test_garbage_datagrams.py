"""Garbage at the relay's ICE/DTLS port (random bytes, fake STUN, fake DTLS, fake
RTP/RTCP) from another address: nothing crashes, nothing is logged as an error,
and the viewer already watching keeps every frame."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import socket
import struct

from relay.webrtc.whepclient import WhepViewer

ROUNDS = 300  # of each kind below


def garbage(rng: random.Random) -> list[bytes]:
    out = []
    for _ in range(ROUNDS):
        out.append(rng.randbytes(rng.randint(1, 1400)))  # noise
        # STUN binding request with a bad (random) integrity and username
        body = struct.pack("!HH", 0x0006, 8) + rng.randbytes(8) + struct.pack("!HH", 0x0008, 20) + rng.randbytes(20)
        out.append(struct.pack("!HHI", 0x0001, len(body), 0x2112A442) + rng.randbytes(12) + body)
        # DTLS handshake record header, garbage inside
        out.append(bytes([22, 0xFE, 0xFD]) + rng.randbytes(10) + rng.randbytes(rng.randint(0, 300)))
        out.append(bytes([23, 0xFE, 0xFD]) + rng.randbytes(rng.randint(0, 300)))  # DTLS application data
        out.append(bytes([0x80, rng.choice([96, 97, 102, 200, 201, 205, 206])]) + rng.randbytes(rng.randint(10, 1200)))
        out.append(b"")  # an empty datagram
    return out


def relay_port(answer: str) -> int:
    m = re.search(r"a=candidate:\S+ 1 udp \d+ 127\.0\.0\.1 (\d+) typ host", answer)
    assert m, answer
    return int(m.group(1))


async def test_garbage_at_the_ice_port_changes_nothing_for_the_viewer(relay_server, http, caplog):
    caplog.set_level(logging.WARNING)
    viewer = WhepViewer(relay_server.whep(), http)
    await viewer.connect()
    await viewer.read_frames(5)
    port = relay_port(viewer.pc.remoteDescription.sdp)
    rng = random.Random(int.from_bytes(os.urandom(4)))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        reading = asyncio.create_task(viewer.read_frames(60))
        for i, data in enumerate(garbage(rng)):
            sock.sendto(data, ("127.0.0.1", port))
            if i % 50 == 0:
                await asyncio.sleep(0.01)  # spread over the viewer's reading
        samples = await reading
    finally:
        sock.close()
    assert all(s.latency_ms is not None for s in samples)  # every frame decoded and current
    assert relay_server.relay.sessions.count() == 1
    # And the relay still takes new viewers.
    second = WhepViewer(relay_server.whep(), http)
    await second.connect()
    await second.read_frames(3)
    await asyncio.gather(viewer.close(), second.close())
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]
