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


# A camera started afresh again and again (in its worker, or at the relay's asking) waits as a source retried does,
# 0.5 s, 1 s, 2 s ... 30 s, and its schedule starts again only after a minute without a failure: a camera whose output
# stops is seen 15 s after a restart at the soonest (ipc.OUTPUT_STARTUP_GRACE), one stuck in its driver 10 s after its
# stall, so with the source's 10 s such a camera would be restarted every 15 s for ever.
CAMERA_RESTARTS = Backoff(stable_after=60.0)


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


class Restarts:
    """When one thing that keeps failing (a camera, started afresh in its worker) is restarted: at its first
    failure, then at the first failure once the schedule's wait since the restart before is over (the failures in
    between wait, counted in ``waiting``). The schedule starts again once it ran ``stable_after`` without a
    failure. Sans-io: every call is given the time (monotonic seconds)."""

    def __init__(self, schedule: Backoff | None = None, rng: random.Random | None = None) -> None:
        self.schedule = schedule or Backoff()
        self._retry = Retry(self.schedule, rng)
        self.restarts = 0
        self.waiting = 0  # failures since the last restart that came too soon to restart it
        self._next = float("-inf")  # no restart before this
        self._quiet_since: float | None = None  # its last failure or restart

    @property
    def first(self) -> bool:
        """The next restart is the schedule's first (none yet, or it ran well since): worth a traceback."""
        return self._retry.attempt == 0

    def due(self, now: float) -> bool:
        """It needs a restart at ``now`` (it failed, or still fails): whether to restart it now (then ``restarted``)."""
        if self._quiet_since is not None:
            self._retry.ran(now - self._quiet_since)
            if self._retry.attempt == 0:  # it ran well: the schedule starts again, with a restart at once
                self._next = now
        self._quiet_since = now
        return now >= self._next

    def failed(self, now: float) -> bool:
        """As ``due``, for one failure (an exception): one too soon is counted in ``waiting``."""
        if self.due(now):
            return True
        self.waiting += 1
        return False

    def restarted(self, now: float) -> float:
        """It was restarted at ``now``: the seconds before the next restart may come."""
        delay = self._retry.next_delay()
        self._next, self._quiet_since = now + delay, now
        self.restarts += 1
        self.waiting = 0
        return delay
