"""A viewer's catch-up from the GOP cache: when each cached frame leaves, and its RTP timestamp (sans-io).

A viewer that starts from the hub's GOP cache (``relay.hub``) has up to a
GOP of frames that are seconds old to send before it is live. How receivers
play frames whose timestamps are old:

- Chromium (WebRTC's ``VideoStreamBufferController`` and ``VCMTiming``): a
  frame's render time is its RTP timestamp mapped to local time by
  ``TimestampExtrapolator``, a least-squares fit of timestamps to arrival
  times over every frame since the stream began (no forgetting), plus the
  jitter delay; a frame is decoded when that time comes, at once if it has
  passed. It never skips an H.264 frame as too late: its ``FrameBuffer``
  only fast-forwards to a later decodable frame, and in a chain of P-frames
  each needs the one before. Old timestamps sent in a burst would play at
  real time, spaced by their timestamps, and leave the viewer a GOP behind
  for good; timestamps that advance faster than arrivals would bend the fit
  (and raise the jitter estimate) for long after, and a render time more
  than 10 s off resets its timing. A timestamp lower than the one before
  is dropped from the fit as reordered.
- aiortc decodes each frame as soon as the next one starts arriving, whatever
  its timestamp, but reads a timestamp lower than the one before as a
  wrap-around (its ``TimestampMapper``), and its frames' pts jump by 2^32.

So each cached frame is stamped with the live clock at the moment it leaves:
the newest frame's pts plus the time since it was published
(``RtpTimeline.catch_up``). The GOP's seconds of timestamps are compressed
into the span of the catch-up, which ends where the live frames' own
timestamps go on (``RtpTimeline.live``). To the receiver the catch-up is a
live stream whose frames come fast; it renders each as it arrives, and its
fit of timestamps to arrivals, and so its delay, is that of the live stream
before, during and after. The timestamps only ever grow, and RTCP sender
reports, which pair the last timestamp sent with the time it was sent,
agree with them.

The cached frames leave at most ``CATCHUP_RATE`` times the stream's bit rate
as the hub measures it (``CatchUpPacer``): a whole 10 s GOP is caught up in
about 10 / (4 - 1) = 3.3 s (live frames keep joining the cache meanwhile),
and the joiner's first second carries at most 4 times the stream's bit rate
plus its first frame (and one frame more).
"""

from __future__ import annotations

# A joiner's catch-up leaves at this many times the stream's bit rate: a few times, so it is live within
# seconds (a GOP of G seconds takes G / (CATCHUP_RATE - 1)) without a burst a viewer's link cannot take.
CATCHUP_RATE = 4.0
# A catch-up that fell behind its schedule (its send loop woke late) may send this much early to make up, and
# no more: a busy event loop never turns into a burst above the rate.
CATCHUP_MAX_CREDIT = 0.05  # seconds
# The bit rate paced against when the stream's is not known yet, so a catch-up always moves: the lowest the
# config allows (relay.config.MIN_BITRATE). From its second frame on the hub measures the stream's own.
CATCHUP_MIN_BITRATE = 100_000  # bits per second
PTS_CLOCK = 90_000  # RTP ticks per second of H.264 video, and the hub's pts


class CatchUpPacer:
    """When each frame of a catch-up may leave: at most ``rate`` bytes a second from ``start`` (seconds, any clock).

    The first frame (the keyframe) leaves at once and does not hold the next: a receiver may wait for the next
    frame's first packet to know the keyframe complete (aiortc does). Each later frame of n bytes holds the next
    for n / rate seconds after its own due time, or after ``max_credit`` before the time it was sent, whichever
    is later. The rate is the one given when asked: the stream's bit rate as measured then.
    """

    def __init__(self, start: float, max_credit: float = CATCHUP_MAX_CREDIT) -> None:
        self.max_credit = max_credit
        self.frames = 0
        self.bytes = 0
        self._since = start  # the due time of the last frame sent (at first: the start)
        self._owed = 0  # its bytes: what holds the next

    def due(self, rate: float) -> float:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        return self._since + self._owed / rate

    def wait(self, now: float, rate: float) -> float:
        """Seconds until the next frame may leave (0: now)."""
        return max(0.0, self.due(rate) - now)

    def sent(self, size: int, now: float, rate: float) -> None:
        """A frame of ``size`` bytes left at ``now``."""
        self._since = max(self.due(rate), now - self.max_credit)
        self._owed = size if self.frames else 0
        self.frames += 1
        self.bytes += size


def catchup_rate(bitrate_bps: float) -> float:
    """Bytes a second a catch-up may send, for a stream of ``bitrate_bps`` (0: not known yet)."""
    return CATCHUP_RATE * max(bitrate_bps, CATCHUP_MIN_BITRATE) / 8


class RtpTimeline:
    """One viewer's RTP timestamps, in 90 kHz ticks before its sender's random origin: they only grow.

    Live frames carry their pts (plus ``offset``, 0 unless a catch-up ended late: see ``live``); frames of a
    catch-up carry the live clock at the time they leave (``catch_up``).
    """

    def __init__(self) -> None:
        self.last: int | None = None
        self.offset = 0  # added to live frames' pts

    def live(self, pts: int) -> int:
        """The timestamp of a live frame: its pts, raised (for good) above the last timestamp if need be.

        A catch-up's last frame is stamped when it leaves; if the next frame's pts is not above that (it was
        published less than a frame's time after the one before), this viewer's live frames are shifted by
        the difference from then on, so its timestamps still grow at the stream's pace.
        """
        timestamp = self.peek(pts)
        self.offset = timestamp - pts
        return self._stamp(timestamp)

    def peek(self, pts: int) -> int:
        """The timestamp ``live(pts)`` would give, taking nothing (a send that may yet be declined)."""
        if self.last is not None and pts + self.offset <= self.last:
            return self.last + 1
        return pts + self.offset

    def catch_up(self, newest_pts: int, since_newest: float) -> int:
        """The timestamp of a cached frame leaving ``since_newest`` seconds after the newest frame (pts
        ``newest_pts``) was published: the live clock now, or one tick above the last timestamp."""
        clock = newest_pts + self.offset + round(since_newest * PTS_CLOCK)
        return self._stamp(clock if self.last is None else max(clock, self.last + 1))

    def _stamp(self, timestamp: int) -> int:
        self.last = timestamp
        return timestamp


class ViewerTiming:
    """One viewer's pacing and RTP timestamps (sans-io): its track asks before and after it takes each frame.

    ``wait`` before taking a frame: a viewer that is reading the GOP cache starts a catch-up, which lasts until
    it takes a frame with nothing behind it. ``stamp`` after: the frame's timestamp.
    """

    def __init__(self) -> None:
        self.timeline = RtpTimeline()
        self.pacer: CatchUpPacer | None = None  # while catching up
        self.started = 0.0  # when the catch-up began
        self.catchups = 0  # catch-ups finished

    @property
    def catching_up(self) -> bool:
        return self.pacer is not None

    def wait(self, replaying: bool, bitrate_bps: float, now: float) -> float:
        """Seconds to wait before taking the next frame; ``replaying``: the subscription reads the GOP cache;
        ``bitrate_bps``: the stream's, as measured now."""
        if self.pacer is None and replaying:
            self.pacer = CatchUpPacer(now)
            self.started = now
        return 0.0 if self.pacer is None else self.pacer.wait(now, catchup_rate(bitrate_bps))

    def stamp(
        self, pts: int, size: int, newest_pts: int, since_newest: float, behind: int, now: float, bitrate_bps: float
    ) -> int:
        """The RTP timestamp of a frame (``pts``, ``size`` bytes) taken at ``now`` with ``behind`` frames still to
        take; the newest frame published has ``newest_pts`` and came ``since_newest`` seconds ago."""
        if self.pacer is None:
            return self.timeline.live(pts)
        timestamp = self.timeline.catch_up(newest_pts, since_newest)
        self.pacer.sent(size, now, catchup_rate(bitrate_bps))
        if not behind:
            self.pacer = None
            self.catchups += 1
        return timestamp
