"""Mutated offers against the live WHEP endpoint: never a 500, never a session left behind.

Seeded, so a failure reproduces; the mutations are the ones that break parsers:
lines dropped, duplicated, swapped or truncated, fields replaced by junk,
bytes flipped.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

CHROMIUM = (Path(__file__).parent / "data" / "chromium_offer.sdp").read_text()
CASES = 1000
SEED = 20261122
JUNK = ["", "0", "-1", "99999999999999999999", "x" * 300, "\x7f", "é", ":", "a=b=c", "IN IP4", "/", " "]


def mutate(rng: random.Random, offer: str) -> str:
    lines = offer.splitlines()
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(lines))
        op = rng.randrange(6)
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[i])
        elif op == 2:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 3:
            lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]
        elif op == 4:
            parts = lines[i].split(" ")
            parts[rng.randrange(len(parts))] = rng.choice(JUNK)
            lines[i] = " ".join(parts)
        else:
            raw = bytearray(lines[i].encode())
            if raw:
                raw[rng.randrange(len(raw))] = rng.randrange(32, 127)
            lines[i] = raw.decode("ascii", "replace")
        if not lines:
            lines = [""]
    return "\r\n".join(lines) + "\r\n"


async def test_mutated_offers_never_500_and_leave_nothing(relay_server, http, caplog):
    rng = random.Random(SEED)
    statuses: dict[int, int] = {}
    sessions = relay_server.relay.sessions
    with caplog.at_level(logging.ERROR):
        for _ in range(CASES):
            offer = mutate(rng, CHROMIUM)
            async with http.post(
                relay_server.whep(), data=offer.encode(), headers={"Content-Type": "application/sdp"}
            ) as resp:
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                assert resp.status in (201, 400), (resp.status, await resp.text(), offer)
                if resp.status == 201:  # still a valid offer: end it like a client would
                    async with http.delete(relay_server.base + resp.headers["Location"]) as gone:
                        assert gone.status == 200
    assert statuses.get(400, 0) > CASES // 3, statuses  # the mutations really did break offers
    assert statuses.get(201, 0) > 10, statuses  # and some still got through to aiortc
    assert len(sessions) == 0 and sessions.count() == 0  # each DELETE ended its session before its answer
    assert "Traceback" not in caplog.text
