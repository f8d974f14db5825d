"""The camera's own JPEGs, newest first: snapshots and MJPEG over HTTP, no re-encode.

``JpegFeed`` holds only the newest frame and a way to wait for the next one.
Every MJPEG client is sent the newest frame whenever it is ready for one; a
slow client simply skips the frames it was too slow for. Nothing queues, so
latency does not grow with the number of clients (the seed system's problem
at five viewers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from .status import ConsumerStats


@dataclass(frozen=True, slots=True)
class Jpeg:
    data: bytes
    capture_time: float  # wall clock when the camera took it
    version: int  # increases by one per frame


# JPEGs stay on this long after the last user leaves: a client polling
# snapshots every few seconds (Home Assistant, OctoPrint) gets fresh frames
# at once instead of switching the camera's JPEG stream on and off each time.
LINGER = 15.0


class JpegFeed:
    """Newest-frame-only JPEG fan-out; ``on_demand(demand)`` when what its users want changes.

    A user wants every frame (``every=0``: MJPEG, the snapshot API) or a picture at most every ``every`` seconds
    (a recorder's snapshots), which a camera passed through makes from its keyframes alone. The demand is
    ``None`` (nobody), ``0.0`` (every frame) or the shortest interval asked for; it rises at once and falls
    ``linger`` seconds after the last user that wanted more left.
    """

    def __init__(self, on_demand: Callable[[float | None], None], linger: float = LINGER) -> None:
        self.latest: Jpeg | None = None
        self._version = 0
        self._next: asyncio.Future[None] | None = None
        self._wants: list[float] = []  # each user's interval (0: every frame)
        self._on_demand = on_demand
        self._linger = linger
        self._off: asyncio.TimerHandle | None = None
        self._closed = False
        self.demand: float | None = None

    @property
    def users(self) -> int:
        return len(self._wants)

    @property
    def on(self) -> bool:
        return self.demand is not None

    def acquire(self, every: float = 0.0) -> None:
        self._wants.append(every)
        self._settle()

    def release(self, every: float = 0.0) -> None:
        self._wants.remove(every)
        self._settle()

    def _wanted(self) -> float | None:
        return min(self._wants) if self._wants else None

    def _settle(self) -> None:
        wanted = self._wanted()
        if _rank(wanted) < _rank(self.demand):  # more than now: at once
            if self._off is not None:
                self._off.cancel()
                self._off = None
            self._set(wanted)
        elif wanted != self.demand and self._off is None and not self._closed:
            self._off = asyncio.get_running_loop().call_later(self._linger, self._switch_down)

    def _switch_down(self) -> None:
        self._off = None
        if self._wanted() != self.demand:
            self._set(self._wanted())

    def _set(self, demand: float | None) -> None:
        self.demand = demand
        self._on_demand(demand)

    # One of its stream's consumers: fed by the stream itself, it starts with nothing to do.
    def start(self) -> None:
        pass

    async def close(self) -> None:
        self._closed = True
        if self._off is not None:
            self._off.cancel()
            self._off = None

    def stats(self) -> ConsumerStats:
        return ConsumerStats()

    def publish(self, data: bytes, capture_time: float) -> None:
        self._version += 1
        self.latest = Jpeg(data, capture_time, self._version)
        if self._next is not None and not self._next.done():
            self._next.set_result(None)
        self._next = None

    async def newer_than(self, version: int, timeout: float) -> Jpeg | None:
        """The newest frame once it is newer than ``version``; None after ``timeout`` seconds."""
        if self.latest is not None and self.latest.version > version:
            return self.latest
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can lose a cancellation (relay.aio)
                await asyncio.shield(self._next)
        except TimeoutError:
            return None
        return self.latest


def _rank(demand: float | None) -> float:
    """How much a demand asks for, the most first: every frame (0), then shorter intervals, then none."""
    return float("inf") if demand is None else demand
