"""Admission limits for new viewer sessions. Sans-io: the clock is a parameter.

A token bucket per client address bounds how fast one address may open
sessions (429); a cap on sessions that have not connected yet bounds what
half-open offers can hold (503).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_TRACKED_ADDRESSES = 10_000  # beyond this the oldest buckets are forgotten: memory stays bounded


@dataclass
class TokenBucket:
    rate: float  # tokens added per second
    burst: float  # most tokens held
    tokens: float = -1.0
    updated: float = 0.0

    def take(self, now: float) -> float:
        """0 if a token was taken, else the seconds until one will be there."""
        if self.tokens < 0:
            self.tokens, self.updated = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class RateLimiter:
    """New sessions per client address: ``burst`` at once, then ``rate`` a second."""

    rate: float = 1.0
    burst: float = 10.0
    buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def check(self, address: str, now: float) -> float:
        """0 to admit, else seconds to wait (for Retry-After)."""
        bucket = self.buckets.pop(address, None) or TokenBucket(self.rate, self.burst)
        self.buckets[address] = bucket  # most recently used last
        while len(self.buckets) > MAX_TRACKED_ADDRESSES:
            del self.buckets[next(iter(self.buckets))]
        return bucket.take(now)

    def refund(self, address: str) -> None:
        """Give back the token ``check`` took: what it was taken for turned out not to count."""
        bucket = self.buckets.get(address)
        if bucket is not None:
            bucket.tokens = min(bucket.burst, bucket.tokens + 1)
