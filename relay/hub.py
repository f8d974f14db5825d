"""The packet hub: one encoder's output fanned out to many subscribers.

Every subscriber (a WebRTC viewer, later the RTSP publisher and the recorder)
gets a small bounded queue. A subscriber that falls behind never slows the
others or the encoder: its backlog is dropped, it waits for the next keyframe
(and asks for one), so it never decodes a broken picture. Modelled on
mediamtx's ``internal/stream`` reader queues.

All methods run on the event loop; the encoder thread hands frames over with
``loop.call_soon_threadsafe(hub.publish, frame)``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# About a quarter of a second of video at 30 fps: enough to ride out a busy
# event-loop tick, small enough that a stuck viewer is noticed and resynced
# before its picture is visibly late.
DEFAULT_QUEUE_FRAMES = 8

# A stuck subscriber could log on every frame; once a second is enough to see it.
DROP_WARNING_INTERVAL = 1.0


@dataclass(slots=True, eq=False)
class EncodedFrame:
    """One access unit of H.264 (Annex B), as the encoder produced it."""

    data: bytes
    pts: int  # 90 kHz clock, from the capture time
    keyframe: bool
    capture_time: float  # wall clock (time.time()) when the source captured it
    published_at: float = 0.0  # wall clock when the hub got it
    # RTP payloads, packetized once per frame and shared by every viewer.
    payloads: list[bytes] | None = field(default=None, repr=False)


# Delays kept for the send-delay percentiles: ~10 s of frames for 30 viewers.
DELAY_WINDOW = 10_000


class DelayWindow:
    """The last ``DELAY_WINDOW`` capture-to-send delays (seconds), for percentiles."""

    def __init__(self, size: int = DELAY_WINDOW) -> None:
        self._values: collections.deque[float] = collections.deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self._values.append(seconds)

    def percentiles_ms(self) -> dict[str, float | None]:
        values = sorted(self._values)
        if not values:
            return {"p50": None, "p95": None, "p99": None}
        pick = lambda p: round(values[min(len(values) - 1, int(len(values) * p / 100))] * 1000, 1)  # noqa: E731
        return {"p50": pick(50), "p95": pick(95), "p99": pick(99)}


class HubClosed(Exception):
    """The hub or the subscription was closed; no more frames will come."""


class Subscription:
    """One subscriber's bounded queue of frames. Created by ``PacketHub.subscribe``."""

    def __init__(self, hub: PacketHub, name: str, max_frames: int) -> None:
        self.name = name
        self.max_frames = max_frames
        self.delivered = 0
        self.dropped = 0  # frames thrown away because this subscriber lagged
        self.resyncs = 0  # times it was sent back to wait for a keyframe
        self.waiting_keyframe = True  # a new subscriber starts at a keyframe
        self._hub = hub
        self._queue: collections.deque[EncodedFrame] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._last_warning = 0.0
        self._unwarned_drops = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._queue)

    async def get(self) -> EncodedFrame:
        """The next frame; raises ``HubClosed`` once closed."""
        while not self._queue:
            if self._closed:
                raise HubClosed(self.name)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self.delivered += 1
        return self._queue.popleft()

    def get_nowait(self) -> EncodedFrame | None:
        if not self._queue:
            if self._closed:
                raise HubClosed(self.name)
            return None
        self.delivered += 1
        return self._queue.popleft()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        self._wake()
        self._hub._remove(self)

    def _offer(self, frame: EncodedFrame) -> None:
        if not self.waiting_keyframe and len(self._queue) >= self.max_frames:
            self._drop_backlog()
        if self.waiting_keyframe:
            if not frame.keyframe:
                if self.resyncs:  # skipped on the way back to a keyframe: lost to this viewer
                    self.dropped += 1
                    self._hub.dropped += 1
                return
            self.waiting_keyframe = False
        self._queue.append(frame)
        self._wake()

    def _drop_backlog(self) -> None:
        dropped = len(self._queue)
        self._queue.clear()
        self.dropped += dropped
        self._hub.dropped += dropped
        self.resyncs += 1
        self.waiting_keyframe = True
        self._hub.request_keyframe()
        self._unwarned_drops += dropped
        now = time.monotonic()
        if now - self._last_warning >= DROP_WARNING_INTERVAL:
            log.warning(
                "stream=%s subscriber=%s lagging: dropped=%d total_dropped=%d, resuming at next keyframe",
                self._hub.stream,
                self.name,
                self._unwarned_drops,
                self.dropped,
            )
            self._last_warning = now
            self._unwarned_drops = 0

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class PacketHub:
    """Fans encoded frames out to subscribers; never blocks on any of them."""

    def __init__(
        self,
        stream: str,
        request_keyframe: Callable[[], None],
        max_frames: int = DEFAULT_QUEUE_FRAMES,
    ) -> None:
        self.stream = stream
        self.max_frames = max_frames
        self.published = 0
        self.dropped = 0  # frames dropped for lagging subscribers, all time
        # Where a frame's time goes before it leaves: capture to the hub (camera,
        # decode, encode, pipe; once per frame) and the hub to each viewer's
        # sender (the wait for its turn in the fan-out; once per viewer).
        self.pipeline_delay = DelayWindow()
        self.fanout_delay = DelayWindow()
        self._request_keyframe = request_keyframe
        self._subscribers: list[Subscription] = []
        self._closed = False

    @property
    def subscribers(self) -> list[Subscription]:
        return list(self._subscribers)

    def subscribe(self, name: str, max_frames: int | None = None) -> Subscription:
        if self._closed:
            raise HubClosed(self.stream)
        sub = Subscription(self, name, max_frames or self.max_frames)
        self._subscribers.append(sub)
        self.request_keyframe()  # so the newcomer does not wait out a whole GOP
        return sub

    def request_keyframe(self) -> None:
        self._request_keyframe()

    def publish(self, frame: EncodedFrame) -> None:
        if self._closed:
            return
        self.published += 1
        frame.published_at = time.time()
        self.pipeline_delay.add(frame.published_at - frame.capture_time)
        for sub in self._subscribers:
            sub._offer(frame)

    def close(self) -> None:
        self._closed = True
        for sub in list(self._subscribers):
            sub.close()

    def _remove(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)
