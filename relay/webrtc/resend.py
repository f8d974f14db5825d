"""What a viewer's NACKs may have sent again (sans-io).

aiortc answers a NACK by sending again, one after the other, every packet it names: one RTCP packet of about 1.4 kB
can name the same packets over and over (340 entries of 17 each, 5,780 in all), each answered at once in the event
loop that feeds every viewer (7 MB out and about 70 ms of the loop, measured). A viewer's losses never need that:
a packet is asked for again only after a round trip, and what a viewer may ask for is bounded by what it was sent.

``ResendBudget`` is one viewer's: a packet is sent again at most once per ``again_after``, and at most ``rate``
a second over a burst of ``burst`` (a token bucket), whatever its NACKs say; the rest are refused and counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Packets a second a viewer may have sent again, and the burst: a 1080p keyframe at 8 Mbit/s is about 230 packets,
# a viewer losing a fifth of such a stream asks for about 160 a second. A flood is held to this, about 1 % of a
# core of the relay's loop (the retransmission's Python, some 20 us a packet).
RESEND_RATE = 400.0
RESEND_BURST = 400
# Seconds within which the same packet is not sent again: a NACK repeated before its answer could have arrived
# (a round trip on a LAN is milliseconds; a receiver waits about one before asking again).
RESEND_AGAIN_AFTER = 0.05
# Sequence numbers remembered as just sent again: past it, those older than ``again_after`` are let go.
RESEND_KEPT = 1024


class ResendBudget:
    """One viewer's: ``allow(sequence)`` says whether a NACKed packet may be sent again now; ``allowed`` and
    ``refused`` count. ``clock``: monotonic seconds (``now`` given to ``allow`` instead, sans-io)."""

    def __init__(
        self,
        rate: float = RESEND_RATE,
        burst: int = RESEND_BURST,
        again_after: float = RESEND_AGAIN_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or again_after < 0:
            raise ValueError(f"resend budget: rate {rate}, burst {burst}, again_after {again_after}")
        self.rate, self.burst, self.again_after, self.clock = rate, burst, again_after, clock
        self.tokens = float(burst)
        self._at: float | None = None
        self._sent: dict[int, float] = {}
        self.allowed = 0
        self.refused = 0

    def allow(self, sequence: int, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        if self._at is not None and now > self._at:
            self.tokens = min(float(self.burst), self.tokens + (now - self._at) * self.rate)
        self._at = now if self._at is None else max(self._at, now)
        last = self._sent.get(sequence)
        if (last is not None and now - last < self.again_after) or self.tokens < 1:
            self.refused += 1
            return False
        self.tokens -= 1
        if len(self._sent) >= RESEND_KEPT:
            self._sent = {s: t for s, t in self._sent.items() if now - t < self.again_after}
            if len(self._sent) >= RESEND_KEPT:  # all of them this recent: the oldest half goes
                self._sent = dict(list(self._sent.items())[RESEND_KEPT // 2 :])
        self._sent[sequence] = now
        self.allowed += 1
        return True
