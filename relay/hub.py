"""The packet hub: one encoder's output fanned out to many subscribers.

Every subscriber (a WebRTC viewer, the RTSP publisher, the recorder) gets a
bounded queue, its backlog. A subscriber that falls behind never slows the
others or the encoder. It gets every frame, late, while its backlog is within
its ``LagLimit`` (the stream's ``[video] max_lag`` of video); further behind,
it loses whole GOPs, skipping to a keyframe it holds, or else waits for the
next one (asked for through the stream's ``KeyframeGate``), so it never
decodes a broken picture (``relay.lag`` says why). Modelled on mediamtx's
``internal/stream`` reader queues.

Instant start (``cached_start``, for streams that cannot force a keyframe:
docs/architecture.md): the hub keeps the current GOP (``GopCache``), and a
subscriber that joins, or falls behind, reads it from the cache instead of
waiting for the next keyframe. While it reads the cache it has no queue of
its own: the cache is its backlog, and the frames published meanwhile join
the cache, so when it reaches the cache's end it goes on live with the next
frame, with no gap and no frame twice. A WebRTC viewer paces that catch-up
(``relay.webrtc.catchup``).

Sharing a forced keyframe (``share_window``, for streams that force one for a joiner): a joiner that
comes within the window of the latest keyframe starts from it, read from the GOP cache as above (the
hub keeps the current GOP for this too), instead of asking for another that the encoder's rate limit
would hold back till the window's end; and one that comes while a keyframe it asked for is on its way
waits for that one and asks for none. So one forced IDR serves every joiner of its window, however
many come, and none waits for the next window.

A live subscriber may take frames by a synchronous call instead of its queue
(``Subscription.push``: a WebRTC viewer's sender sends them there and then,
and no task is woken per subscriber per frame) while its reader waits with
nothing queued, for the first frame published in an event-loop pass; the
rest, and what it declines, are queued as above.

Subscribers that would be pushed a frame and have a ``lane`` (a key their
owner set beside ``push``) are handed it all together, in one call of the
hub's ``batch_push`` (a WebRTC stream's: one C call sends the frame to every
such viewer); those it declines are offered the frame one by one as above.
With a lane, frames they queued meanwhile go the same way first (a call per
frame for all who queued it), and so do the later frames of a pass while
the pass's burst would still fit their queue: a loop that fell behind sends
every viewer's late frames in one call each, not in a task per viewer, the
costlier way. A longer burst queues from there on, and a viewer whose queue
overflows too resyncs as without lanes (so at about twice its lag limit of
burst; it is never further behind the newest frame than its limit).

All methods run on the event loop; the encoder thread hands frames over with
``loop.call_soon_threadsafe(hub.publish, frame)``.
"""

from __future__ import annotations

import array
import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .lag import DEFAULT_MAX_LAG, MAX_LAG_BYTES, MAX_LAG_FRAMES, Backlog, KeyframeGate, LagLimit, fits

log = logging.getLogger(__name__)

# A stuck subscriber could log on every frame; once a second is enough to see it.
DROP_WARNING_INTERVAL = 1.0

# The GOP cache's caps. IP cameras send a keyframe every 2-10 s; 600 frames is 10 s at 60 fps (20 s at 30).
GOP_CACHE_MAX_FRAMES = 600
# 10 s of a 6.7 Mbit/s camera (1080p at a high bit rate); 16 cameras on a Pi hold at most 128 MiB.
GOP_CACHE_MAX_BYTES = 8 * 1024 * 1024
# The stream's bit rate (what a joiner's catch-up is paced against) is measured over this much of its latest
# video: long enough to hold a whole GOP of the cameras above, so a keyframe's weight is averaged in.
BITRATE_WINDOW = 10.0  # seconds, by the frames' pts
PTS_CLOCK = 90_000  # EncodedFrame.pts ticks per second
# Seconds a keyframe asked of the encoder is waited for before another request goes out: the encoder answers
# within its rate limit (0.5 s) and a frame; one lost with its worker (restarted: it asks anew) must not keep
# joiners from asking for ever.
KEYFRAME_WAIT = 2.0
# Keyframes asked for viewers' PLI and FIR: the first at once, then at most one this often for the stream. One
# viewer that keeps losing (a lossy link, a receiver whose socket overflows) had the shared encoder make a keyframe
# at its own limit, every 0.5 s, for every viewer: 29 keyframes in 15 s, all forced, in a 60-viewer point that
# collapsed, where the stream makes 15 (docs/benchmarks.md, "Issues 16 and 17 on the thirteenth session's main").
# A keyframe is several P-frames' bytes to every viewer; at the default GOP of 1 s the next one is never far.
VIEWER_KEYFRAME_INTERVAL = 1.0
# A joiner's keyframe is asked for when its offer comes (``expect_joiner``), not when it subscribes, once its
# answer, ICE and DTLS are done: they take 50-250 ms (loopback, 30 viewers joining at once on 2 cores:
# docs/benchmarks.md), and the IDR the encoder makes meanwhile (the next frame captured, then encoded) is then
# published, and shared, when the joiner subscribes, instead of being waited for after it. A keyframe still in
# the share window this long after the offer is shared instead; a joiner slower than this asks, as before,
# when it subscribes.
JOIN_LEAD = 0.25  # seconds


@dataclass(slots=True, eq=False)
class EncodedFrame:
    """One access unit of H.264 (Annex B), as the encoder produced it; or, in a stream's audio hub, one Opus packet
    (every one a keyframe: it decodes on its own)."""

    data: bytes
    pts: int  # from the capture time: the 90 kHz clock (H.264), 48 kHz samples (Opus)
    keyframe: bool
    capture_time: float  # wall clock (time.time()) when the source captured it
    published_at: float = 0.0  # wall clock when the hub got it
    # RTP payloads, packetized once per frame and shared by every viewer.
    payloads: list[bytes] | None = field(default=None, repr=False)
    # Where each NAL unit of ``data`` begins (``ipc.Message.nals``, ``h264.nals_at``), when its worker said: then it
    # is packetized without a scan for start codes; None for an encoded unit.
    nals: tuple[int, ...] | None = field(default=None, repr=False)


# Delays kept for the send-delay percentiles: ~10 s of frames for 30 viewers.
DELAY_WINDOW = 10_000
# Delays added one at a time go in arrays of this many (a batch's come as one array, one a viewer sent to)
DELAY_CHUNK = 256


class DelayWindow:
    """The last ``DELAY_WINDOW`` capture-to-send delays (seconds), for percentiles; a few more at times, the oldest
    being let go an array at a time. Kept in arrays of doubles: a batch's delays (``rtpsend.push_batch``, one a
    viewer) are kept as the C call wrote them, with no float object a viewer-frame."""

    def __init__(self, size: int = DELAY_WINDOW) -> None:
        self._size = size
        self._chunks: collections.deque[array.array] = collections.deque()
        self._tail: array.array | None = None  # the array ``add`` appends to (its own, never a caller's)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, seconds: float) -> None:
        tail = self._tail
        if tail is None or len(tail) >= DELAY_CHUNK:
            tail = self._tail = array.array("d")
            self._chunks.append(tail)
        tail.append(seconds)
        self._count += 1
        self._trim()

    def extend(self, seconds: Sequence[float]) -> None:
        """Many at once: an ``array('d')`` is kept as it is (the caller lets go of it), anything else copied."""
        chunk = seconds if isinstance(seconds, array.array) and seconds.typecode == "d" else array.array("d", seconds)
        if chunk:
            self._chunks.append(chunk)
            self._tail = None
            self._count += len(chunk)
            self._trim()

    def _trim(self) -> None:
        chunks = self._chunks
        while len(chunks) > 1 and self._count - len(chunks[0]) >= self._size:
            oldest = chunks.popleft()
            self._count -= len(oldest)
            if oldest is self._tail:
                self._tail = None

    def percentiles_ms(self) -> dict[str, float | None]:
        values = sorted(itertools.chain.from_iterable(self._chunks))
        if not values:
            return {"p50": None, "p95": None, "p99": None}
        pick = lambda p: round(values[min(len(values) - 1, int(len(values) * p / 100))] * 1000, 1)  # noqa: E731
        return {"p50": pick(50), "p95": pick(95), "p99": pick(99)}


class GopCache:
    """The current GOP: every frame from its keyframe on, within a cap in frames and in bytes (sans-io).

    Give it every published frame, in order (``add``). A keyframe starts a new
    GOP (a new ``frames`` list: readers of the old one keep it). A frame that
    would take the GOP over a cap empties the cache, which stays unusable
    until the next keyframe: joiners then wait for that keyframe as they
    would without a cache.
    """

    RESET = "reset"  # a keyframe started a new GOP
    ADDED = "added"
    OVERFLOW = "overflow"  # over a cap: emptied until the next keyframe
    SKIPPED = "skipped"  # not cached: no keyframe since the cache was emptied

    def __init__(self, max_frames: int = GOP_CACHE_MAX_FRAMES, max_bytes: int = GOP_CACHE_MAX_BYTES) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.frames: list[EncodedFrame] = []
        self.bytes = 0
        self.usable = False  # holds the current GOP from its keyframe
        self.overflows = 0

    def add(self, frame: EncodedFrame) -> str:
        event = self.ADDED
        if frame.keyframe:
            self.frames, self.bytes, self.usable = [], 0, True
            event = self.RESET
        elif not self.usable:
            return self.SKIPPED
        if len(self.frames) >= self.max_frames or self.bytes + len(frame.data) > self.max_bytes:
            self.clear()
            self.overflows += 1
            return self.OVERFLOW
        self.frames.append(frame)
        self.bytes += len(frame.data)
        return event

    def clear(self) -> None:
        self.frames, self.bytes, self.usable = [], 0, False


class Bitrate:
    """The bit rate of the latest ``window`` seconds of video, by the frames' pts (sans-io).

    Each frame counts for the time to the next, so the first frames of a stream (a keyframe and a few) make a
    high bit rate, never a low one: a catch-up paced against it always gets ahead of the live frames.
    """

    def __init__(self, window: float = BITRATE_WINDOW) -> None:
        self.window = round(window * PTS_CLOCK)
        self._frames: collections.deque[tuple[int, int]] = collections.deque()  # (pts, bytes)
        self._bytes = 0

    def add(self, pts: int, size: int) -> None:
        self._frames.append((pts, size))
        self._bytes += size
        while self._frames[0][0] < pts - self.window:
            self._bytes -= self._frames.popleft()[1]

    def bps(self) -> float:
        """Bits a second; 0 until two frames tell how long a frame lasts."""
        n = len(self._frames)
        span = self._frames[-1][0] - self._frames[0][0] if n else 0
        if span <= 0:
            return 0.0
        return self._bytes * 8 * PTS_CLOCK * (n - 1) / (span * n)


class HubClosed(Exception):
    """The hub or the subscription was closed; no more frames will come."""


class Subscription:
    """One subscriber's bounded queue of frames. Created by ``PacketHub.subscribe``.

    It is in one of three states: live (frames arrive in its queue), waiting
    for a keyframe (after joining, or after losing its backlog), or reading
    the hub's GOP cache (``replaying``: joined from the cache, or resynced).
    """

    def __init__(self, hub: PacketHub, name: str, limit: LagLimit) -> None:
        self.name = name
        self.limit = limit  # how far behind it may fall and still get every frame
        self.delivered = 0
        self.dropped = 0  # frames thrown away because this subscriber lagged
        # Times it fell past its limit: skipped to a keyframe, sent to wait for one, or to the GOP cache. Once per
        # fall: what it loses before it has caught up again (read its backlog to the end) counts as dropped only.
        self.resyncs = 0
        self.lagging = False  # fell past its limit and has not caught up since
        self.waiting_keyframe = True  # a new subscriber starts at a keyframe
        self.cache_starts = 0  # times it started reading the GOP cache (its join, its resyncs)
        # A live subscriber's synchronous delivery (a WebRTC viewer's sender): while its reader waits in ``get``
        # with nothing queued, a frame is handed to ``push`` as it is published instead of waking the reader's
        # task; False from it, and the frame is queued as without it.
        self.push: Callable[[EncodedFrame], bool] | None = None
        # A live subscriber with ``push`` may also be sent to with the others in one call (``PacketHub.batch_push``)
        # while this is set: its key there (a WebRTC viewer's C lane), set and cleared by whoever set ``push``.
        self.lane: object | None = None
        self._hub = hub
        self._backlog = Backlog()
        # Replaying: the index in the hub's GOP cache of the next frame to read; never its end (caught up: live).
        self._cursor: int | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._last_warning = 0.0
        self._unwarned_drops = 0

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def max_frames(self) -> int:
        return self.limit.frames

    @property
    def replaying(self) -> bool:
        """Reading the GOP cache: its next frame is already published (it catches up, or will be live after it)."""
        return self._cursor is not None

    @property
    def behind(self) -> int:
        """Frames already published that this subscriber has yet to read."""
        if self._cursor is not None:
            return len(self._hub.gop.frames) - self._cursor
        return len(self._backlog)

    def __len__(self) -> int:
        return len(self._backlog)

    async def get(self) -> EncodedFrame:
        """The next frame; raises ``HubClosed`` once closed."""
        while not self._backlog and self._cursor is None:
            if self._closed:
                raise HubClosed(self.name)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._take()

    def get_nowait(self) -> EncodedFrame | None:
        if not self._backlog and self._cursor is None:
            if self._closed:
                raise HubClosed(self.name)
            return None
        return self._take()

    def _take(self) -> EncodedFrame:
        self.delivered += 1
        self._hub.delivered += 1
        if self._cursor is None:
            frame = self._backlog.popleft()
        else:
            frames = self._hub.gop.frames
            frame = frames[self._cursor]
            self._cursor += 1
            if self._cursor == len(frames):
                self._cursor = None  # caught up: the next frame published comes to the queue
        if self.lagging and not self._backlog and self._cursor is None:
            self.lagging = False  # caught up: falling past the limit again is a new resync
        return frame

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.push = None
        self.lane = None
        self._backlog.clear()
        self._cursor = None
        self._wake()
        self._hub._remove(self)

    def _replay_from(self, index: int) -> None:
        self._cursor = index
        self.waiting_keyframe = False
        self.cache_starts += 1
        self._hub.cache_starts += 1

    def _offer(self, frame: EncodedFrame) -> None:
        if self._cursor is not None:  # the cache holds this frame too: it reads it there
            self._wake()
            return
        if not self.waiting_keyframe and self._backlog and not self._backlog.fits(self.limit, frame):
            if self._resync_from_cache(frame):
                return  # it reads this frame from the cache too
            self._fall_behind(frame)
        if self.waiting_keyframe:
            if not frame.keyframe:
                if self.resyncs:  # skipped on the way back to a keyframe: lost to this viewer
                    self._count_drops(1)
                return
            self.waiting_keyframe = False
        if self._hub.first_in_pass and self._would_push():
            try:
                taken = self.push(frame)
            except Exception as exc:  # never into the publish: the other subscribers and the camera go on
                self.push = None  # this subscriber reads through its queue from now on
                taken = False
                log.warning(
                    "stream=%s subscriber=%s push failed, queueing instead: %r", self._hub.stream, self.name, exc
                )
            if taken:
                self.delivered += 1
                self._hub.delivered += 1
                return
        self._backlog.append(frame)
        self._wake()

    def _would_push(self) -> bool:
        """A frame published now (the first of its pass) would go to ``push``: it has one, nothing is queued, and
        its reader waits for a frame."""
        return self.push is not None and not self._backlog and self._waiting()

    def _waiting(self) -> bool:
        """Its reader waits in ``get`` for a frame (and has not been woken for one)."""
        return self._waiter is not None and not self._waiter.done()

    def _resync_from_cache(self, frame: EncodedFrame) -> bool:
        """Its queue is full as ``frame`` comes: read on from the GOP cache (the frames queued, then ``frame``)
        instead of dropping them, if the cache holds them. The queued frames of an earlier GOP are lost."""
        gop = self._hub.gop
        if not (self._hub.caching and gop.frames and gop.frames[-1] is frame):
            return False
        start = len(gop.frames) - 1 - len(self._backlog)
        self._backlog.clear()
        self._replay_from(max(0, start))
        if start < 0:
            self._count_drops(-start)
        self._lagged(f"resuming from the cached GOP at frame {max(0, start)}")
        self._wake()
        return True

    def _gop_released(self, old: list[EncodedFrame], event: str) -> None:
        """The hub's cache let go of ``old`` (a keyframe began a new GOP, or it went over a cap): a subscriber
        still reading it keeps the rest in its queue if that fits; else a new GOP is read from its keyframe,
        and an over-cap one is waited out (its next keyframe). A joiner that shares a keyframe (a stream that
        forces them: ``PacketHub.share_window``) keeps the rest only while it is under half its queue: further
        behind, queued, the rest overflowed its queue as it caught up on a busy event loop (dropped, and a
        keyframe forced for it), and the new keyframe is nearer live."""
        if self._cursor is None:
            return
        rest = old[self._cursor :]
        self._cursor = None
        if fits(self.limit, rest) and (self._hub.caching or len(rest) < self.limit.frames // 2):
            self._backlog.extend(rest)
            return
        self._count_drops(len(rest))
        if event == GopCache.RESET:
            self._cursor = 0  # on to the new GOP: its keyframe, being published
        else:
            self.waiting_keyframe = True
            self._lagged("the GOP cache went over its cap; resuming at next keyframe", keyframe=True)

    def _count_drops(self, n: int) -> None:
        self.dropped += n
        self._hub.dropped += n
        self._unwarned_drops += n

    def _fall_behind(self, frame: EncodedFrame) -> None:
        """Past its limit as ``frame`` comes: on from a keyframe it holds (whole GOPs lost), else from the next."""
        skipped = self._backlog.skip_to_keyframe(self.limit, frame)
        if skipped is not None:
            self._count_drops(skipped)
            self._lagged(f"skipped {skipped} frames to a keyframe it holds")
            return
        self._count_drops(self._backlog.clear())
        self.waiting_keyframe = True
        self._lagged("resuming at next keyframe", keyframe=True)

    def _lagged(self, what: str, keyframe: bool = False) -> None:
        """It fell past its limit (a resync, unless it has not caught up since the last); ``keyframe``: it waits
        for the next keyframe, asked for through the stream's gate."""
        if not self.lagging:
            self.lagging = True
            self.resyncs += 1
            self._hub.resyncs += 1
        if keyframe:
            self._hub.keyframe_gate.ask(self._hub.clock())
        self._warn_lag(what)

    def _warn_lag(self, what: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= DROP_WARNING_INTERVAL:
            log.warning(
                "stream=%s subscriber=%s lagging: dropped=%d total_dropped=%d, %s",
                self._hub.stream,
                self.name,
                self._unwarned_drops,
                self.dropped,
                what,
            )
            self._last_warning = now
            self._unwarned_drops = 0

    def _wake(self) -> None:
        if self._waiting():
            self._waiter.set_result(None)


class PacketHub:
    """Fans encoded frames out to subscribers; never blocks on any of them.

    ``cached_start`` says, at each frame and each join, whether the stream
    starts subscribers from its GOP cache (it cannot force a keyframe, or its
    config says so); otherwise the hub keeps no cache and a joiner asks for a
    keyframe.
    """

    def __init__(
        self,
        stream: str,
        request_keyframe: Callable[[], None],
        max_frames: int = MAX_LAG_FRAMES,
        cached_start: Callable[[], bool] = lambda: False,
        gop: GopCache | None = None,
        max_lag: float | None = DEFAULT_MAX_LAG,
        clock: Callable[[], float] = time.monotonic,
        share_window: float = 0.0,
    ) -> None:
        self.stream = stream
        # Each subscriber's lag limit (``LagLimit``), as it subscribes: seconds of video (None: no time bound),
        # frames, bytes.
        self.max_lag = max_lag
        # A joiner of a stream that forces keyframes starts from the latest one when it was published at most
        # this many seconds ago (the encoder's rate limit on forced IDRs); 0: it always asks for one.
        self.share_window = share_window
        self.keyframe_requests = 0  # sent to the encoder (joins, PLI, FIR)
        self.keyframe_requests_merged = 0  # not sent: one asked for was still on its way
        self.keyframe_shares = 0  # joiners started from a keyframe of the share window
        self.keyframe_requests_ahead = 0  # of keyframe_requests: asked at a joiner's offer (``expect_joiner``)
        self.max_frames = max_frames
        self.max_bytes: int | None = MAX_LAG_BYTES
        self.clock = clock  # seconds, for the keyframe gate's interval
        self.published = 0
        self.dropped = 0  # frames dropped for lagging subscribers, all time
        self.cache_starts = 0  # subscribers started from the GOP cache (joins and resyncs), all time
        self.delivered = 0  # frames handed to subscribers (each frame once per subscriber that took it), all time
        self.resyncs = 0  # times a subscriber fell past its lag limit (``Subscription.resyncs``), all time
        self.batched = 0  # of ``delivered``: frames handed over in a ``batch_push`` call, all time
        # Packets viewers' NACKs had sent again, and those refused past a viewer's budget (relay.webrtc.resend),
        # all time: what loss costs the fan-out beyond the frames themselves.
        self.retransmits = 0
        self.retransmits_refused = 0
        self.gop = gop or GopCache()
        self.bitrate = Bitrate()
        self.newest: EncodedFrame | None = None  # the frame published last
        # Where a frame's time goes before it leaves: capture to the hub (camera, decode, encode, pipe; once per
        # frame) and the hub to each viewer's sender (the wait for its turn in the fan-out; once per viewer).
        self.pipeline_delay = DelayWindow()
        self.fanout_delay = DelayWindow()
        self._request_keyframe = request_keyframe
        self.keyframe_gate = KeyframeGate(request_keyframe)  # laggards' keyframe requests
        # Viewers' own requests (PLI, FIR: they lost what they need to decode), through a gate of their own: the
        # first at once, then at most one each VIEWER_KEYFRAME_INTERVAL, any keyframe serving those held.
        self.viewer_keyframe_gate = KeyframeGate(self.request_keyframe, VIEWER_KEYFRAME_INTERVAL)
        self._cached_start = cached_start
        self._subscribers: list[Subscription] = []
        self._closed = False
        self._last_overflow_log = float("-inf")
        self._last_batch_log = float("-inf")  # monotonic: a batch push that raised was said then
        self._keyframe_asked: float | None = None  # monotonic, while a keyframe asked for has not come
        self._in_pass = 0  # frames published in this pass of the event loop (``first_in_pass``)
        # The frames of this pass after its first (a burst: the loop was held): how many, their bytes, the pts of
        # the first of them.
        self._burst = [0, 0, 0]
        # ``batch_push(frame, subs)``: the live subscribers with a ``lane`` whose reader is parked in ``get``
        # (woken or not), all sent to in one call (frames they queued first: ``_send_queued``; a pass's later
        # frames while its burst would fit their queue: ``publish``); it returns the indices of those it did not
        # take, which are offered the frame as usual (``push``, or their queue). Set by whoever sets the lanes
        # (relay.webrtc.rtpsend: one C call a frame for every viewer). It should not raise (rtpsend's does not: it
        # knows whom it sent to); where it does, every one is offered the frame again, which may repeat it to those
        # it had reached.
        self.batch_push: Callable[[EncodedFrame, list[Subscription]], list[int]] | None = None

    @property
    def subscribers(self) -> list[Subscription]:
        return list(self._subscribers)

    @property
    def caching(self) -> bool:
        """Starting subscribers from the GOP cache (the stream's join policy)."""
        return self._cached_start()

    def subscribe(self, name: str, max_frames: int | None = None) -> Subscription:
        """A new subscriber, its backlog bounded by the hub's lag limit, or by ``max_frames`` alone: a consumer
        that sizes its own queue (the recorder's seconds of a slow disk, a test's tap that reads now and then)."""
        if self._closed:
            raise HubClosed(self.stream)
        limit = (
            LagLimit(self.max_lag, self.max_frames, self.max_bytes)
            if max_frames is None
            else LagLimit.frames_only(max_frames)
        )
        sub = Subscription(self, name, limit)
        self._subscribers.append(sub)
        if self.caching and self.gop.frames:
            sub._replay_from(0)  # at once, from the GOP's keyframe
            log.info(
                "stream=%s subscriber=%s starts from the cached GOP: frames=%d bytes=%d",
                self.stream, name, len(self.gop.frames), self.gop.bytes,
            )  # fmt: skip
        elif (age := self._shareable_keyframe_age()) is not None:
            sub._replay_from(0)  # the keyframe forced (or encoded) a moment ago: no other is asked for
            self.keyframe_shares += 1
            log.info(
                "stream=%s subscriber=%s shares the keyframe of %.0fms ago: frames=%d",
                self.stream, name, age * 1000, len(self.gop.frames),
            )  # fmt: skip
        elif self._keyframe_on_its_way():
            self.keyframe_requests_merged += 1
            log.info("stream=%s subscriber=%s waits for the keyframe asked for", self.stream, name)
        else:
            log.info("stream=%s subscriber=%s asks for a keyframe", self.stream, name)
            self.request_keyframe()  # so the newcomer does not wait out a whole GOP
        return sub

    def expect_joiner(self, lead: float = JOIN_LEAD, now: float | None = None) -> bool:
        """A viewer will subscribe in about ``lead`` seconds (its offer came; it subscribes once answered and
        connected): when no keyframe would be shareable by then and none is on its way, ask for one now, so
        that it is published, and shared, by the time it subscribes. ``now``: the wall clock (``time.time()``
        unless given). True if it asked. A stream that starts joiners from its GOP, or has no share window,
        asks nothing ahead."""
        if not self.share_window or self.caching or self._closed:
            return False
        then = (time.time() if now is None else now) + lead
        if self._shareable_keyframe_age(then) is not None or self._keyframe_on_its_way():
            return False
        log.info("stream=%s keyframe asked for ahead of a viewer connecting", self.stream)
        self.keyframe_requests_ahead += 1
        self.request_keyframe()
        return True

    def request_keyframe(self) -> None:
        """Ask the encoder for a keyframe, unless one asked for is still on its way (every subscriber waiting
        for a keyframe takes the next one)."""
        if self._keyframe_on_its_way():
            self.keyframe_requests_merged += 1
            return
        self._keyframe_asked = time.monotonic()
        self.keyframe_requests += 1
        self._request_keyframe()

    def request_keyframe_for_viewer(self) -> None:
        """A viewer's PLI or FIR: it lost packets it needs to decode. Asked of the encoder at once if no viewer's
        request went out in the last ``VIEWER_KEYFRAME_INTERVAL``, else held until then, and dropped if a keyframe
        comes first (``viewer_keyframe_gate``)."""
        self.viewer_keyframe_gate.ask(self.clock())

    def _keyframe_on_its_way(self) -> bool:
        asked = self._keyframe_asked
        return asked is not None and time.monotonic() - asked < KEYFRAME_WAIT

    def _shareable_keyframe_age(self, now: float | None = None) -> float | None:
        """Seconds since the cached GOP's keyframe was published, when a joiner may start from it
        (``share_window``); None otherwise."""
        gop = self.gop
        if not (self.share_window and gop.usable and gop.frames):
            return None
        age = (time.time() if now is None else now) - gop.frames[0].published_at
        return age if age <= self.share_window else None

    @property
    def lag_keyframe_requests(self) -> int:
        """Keyframes asked of the encoder for subscribers that fell behind (``KeyframeGate.sent``), all time."""
        return self.keyframe_gate.sent

    @property
    def first_in_pass(self) -> bool:
        """The frame being published is the first of this event-loop pass. Only such a frame is pushed: frames
        that reach the hub together (after a stall) queue, as they would for a reader whose task had no turn
        in between, so a burst longer than a queue resyncs (paced from the cache, or at a keyframe) as before.
        (With a lane, the batch takes them while the burst would fit the queue: ``publish``.)"""
        return self._in_pass <= 1

    def _pass_over(self) -> None:
        self._in_pass = 0

    def publish(self, frame: EncodedFrame, now: float | None = None) -> None:
        """``frame`` to every subscriber; ``now``: the wall clock (``time.time()`` unless given)."""
        if self._closed:
            return
        self.published += 1
        self._in_pass += 1
        if self._in_pass == 1:
            self._burst = [0, 0, 0]  # the pts: the burst's first frame's, set as it comes
            try:
                asyncio.get_running_loop().call_soon(self._pass_over)
            except RuntimeError:  # no event loop (sans-io use): every frame is a pass of its own
                self._in_pass = 0
        else:  # one more frame of the pass's burst: the frames after its first, as a reader's queue would hold them
            burst = self._burst
            if not burst[0]:
                burst[2] = frame.pts
            burst[0] += 1
            burst[1] += len(frame.data)
        frame.published_at = time.time() if now is None else now
        if frame.keyframe:
            self._keyframe_asked = None  # whatever was asked for: this one serves
        self.pipeline_delay.add(frame.published_at - frame.capture_time)
        self.bitrate.add(frame.pts, len(frame.data))
        self.newest = frame
        if frame.keyframe:
            self.keyframe_gate.keyframe()  # serves every laggard waiting for one
            self.viewer_keyframe_gate.keyframe()  # and every viewer's PLI held
        else:
            tick_at = self.clock()
            self.keyframe_gate.tick(tick_at)
            self.viewer_keyframe_gate.tick(tick_at)
        self._cache(frame)
        batch_push = self.batch_push
        if batch_push is None:
            for sub in self._subscribers:
                sub._offer(frame)
            return
        # A frame after the pass's first goes in the batch only to those whose queue would still hold the burst so
        # far: a longer burst (a stall's) queues from there on, and a viewer whose queue then overflows too resyncs
        # as without the batch (at about twice its lag limit of burst, never more than its limit behind the newest).
        burst = None if self.first_in_pass else (self._burst[0], self._burst[1], frame.pts - self._burst[2])
        batch, behind = [], []
        for sub in self._subscribers:
            # live with a lane, its reader parked in ``get`` (so it holds no frame it has yet to send; woken, it
            # finds what is left), no cache cursor, no keyframe wait: written out, this loop is most of the Python
            # a viewer's Opus packet costs
            if (
                sub.lane is not None
                and sub._waiter is not None
                and sub._cursor is None
                and not sub.waiting_keyframe
                and sub.push is not None
                and (burst is None or sub.limit.fits(*burst))
            ):
                (behind if sub._backlog else batch).append(sub)
            else:
                sub._offer(frame)
        if behind:
            batch += self._send_queued(batch_push, behind, frame)
        if batch:
            declined = self._batch(batch_push, frame, batch)
            for sub in batch:
                sub.delivered += 1
            for i in declined:
                sub = batch[i]
                sub.delivered -= 1
                sub._offer(frame)

    def _send_queued(self, batch_push, subs: list[Subscription], frame: EncodedFrame) -> list[Subscription]:
        """``subs``' queued frames, oldest first, through the batch: those that queued the same frame sent it in one
        call (after a pass of several frames, every live viewer queued the same), not each by its own send loop
        (a task woken, a frame sent alone, for every viewer: several times the batch's cost a viewer, where the
        loop is already behind). Those that caught up are returned, for ``frame``'s batch; one declined (its
        socket backed up, its lane gone) keeps the rest queued, ``frame`` behind them, for its send loop."""
        caught_up = []
        while subs:
            groups: dict[int, list[Subscription]] = {}
            for sub in subs:
                groups.setdefault(id(sub._backlog.first), []).append(sub)
            subs = []
            for group in groups.values():
                declined = set(self._batch(batch_push, group[0]._backlog.first, group))
                for i, sub in enumerate(group):
                    if i in declined:
                        sub._offer(frame)
                        continue
                    sub._backlog.popleft()
                    sub.delivered += 1
                    if not sub._backlog:
                        sub.lagging = False  # caught up (as ``_take`` says when a reader empties its queue)
                    if sub.lane is None:  # its lane failed with this frame: its send loop takes the rest
                        sub._offer(frame)
                    elif sub._backlog:
                        subs.append(sub)
                    else:
                        caught_up.append(sub)
        return caught_up

    def _batch(self, batch_push, frame: EncodedFrame, subs: list[Subscription]) -> Sequence[int]:
        """``frame`` to ``subs`` in one ``batch_push`` call, counted; the indices of those it did not take."""
        try:
            declined = batch_push(frame, subs)
        except Exception as exc:  # never into the publish: each is offered the frame its own way
            now = time.monotonic()
            if now - self._last_batch_log >= DROP_WARNING_INTERVAL:  # said once a second, not once a frame
                self._last_batch_log = now
                log.warning("stream=%s viewers=%d batch push failed, each offered its own way: %r", self.stream,
                            len(subs), exc)  # fmt: skip
            declined = range(len(subs))
        taken = len(subs) - len(declined)
        self.delivered += taken
        self.batched += taken
        return declined

    def _cache(self, frame: EncodedFrame) -> None:
        old = self.gop.frames
        if self.caching or self.share_window:
            event = self.gop.add(frame)
        elif old:
            self.gop.clear()
            event = GopCache.OVERFLOW
        else:
            return
        overflowed = event == GopCache.OVERFLOW and self.caching  # else joiners ask for a keyframe: nothing to say
        if overflowed and time.monotonic() - self._last_overflow_log >= DROP_WARNING_INTERVAL:
            self._last_overflow_log = time.monotonic()
            log.info(
                "stream=%s GOP cache over its cap (max_frames=%d max_bytes=%d) or off; joiners wait for the next"
                " keyframe",
                self.stream, self.gop.max_frames, self.gop.max_bytes,
            )  # fmt: skip
        if event in (GopCache.RESET, GopCache.OVERFLOW) and old:
            for sub in self._subscribers:
                sub._gop_released(old, event)

    def close(self) -> None:
        self._closed = True
        for sub in list(self._subscribers):
            sub.close()

    def _remove(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)
