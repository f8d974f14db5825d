"""Exponential backoff with jitter, as a pure schedule.

``delay(attempt, rand)`` is a plain function of its inputs, so the schedule is
tested with plain values and no clock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float = 0.5  # first retry: quick, most faults are a glitch
    factor: float = 2.0
    cap: float = 30.0  # a camera that is gone for good is still retried twice a minute
    jitter: float = 0.2  # +/- 20 %, so cameras on one hub do not retry in lockstep
    stable_after: float = 10.0  # a run this long resets the schedule

    def delay(self, attempt: int, rand: float = 0.5) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based); ``rand`` in [0, 1)."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        base = min(self.cap, self.initial * self.factor ** min(attempt, 64))
        return min(self.cap, base * (1 - self.jitter + 2 * self.jitter * rand))


class Retry:
    """Tracks attempts for one worker: ``next_delay()`` after a failure, ``ran(seconds)`` after a run."""

    def __init__(self, schedule: Backoff | None = None, rng: random.Random | None = None) -> None:
        self.schedule = schedule or Backoff()
        self.attempt = 0
        self._rng = rng or random.Random()

    def ran(self, seconds: float) -> None:
        if seconds >= self.schedule.stable_after:
            self.attempt = 0

    def next_delay(self) -> float:
        d = self.schedule.delay(self.attempt, self._rng.random())
        self.attempt += 1
        return d
