"""A hub subscriber that falls behind: how far it may, what it loses beyond that, the keyframes asked for it.

Sans-io: frames are anything with ``pts`` (90 kHz), ``keyframe`` and
``data``; the clock is a parameter. ``relay.hub`` keeps a ``Backlog`` per
subscriber and one ``KeyframeGate`` per stream.

Why this policy (docs/benchmarks.md, "Graceful overload"). The hub used to
drop a subscriber's backlog as soon as it held 8 frames, send it back to
wait for the next keyframe and ask the encoder for one. At the edge of
capacity every viewer's fan-out lags at once: each dropped its 8 frames,
each asked for a keyframe, the forced keyframe (several P-frames' bytes, to
every viewer, at the moment the box had least time) made the next lag
longer, and so on: at 270 viewers on one core, 8 resyncs per viewer in 15 s
and 40 % of frames lost. Now:

- **Late rather than nothing.** A subscriber keeps every frame, late, while
  its backlog (the frames published that it has not read) spans at most
  ``LagLimit.seconds`` of video, ``bytes`` and ``frames``: a busy event
  loop's burst, a socket backed up for a moment, cost latency, not pictures.
  Frames are shared, so a backlog holds references, not copies.
- **Whole GOPs, when far behind.** Past the limit it loses the oldest frames
  up to a keyframe it already holds, from which the rest fits the limit
  (``Backlog.skip_to_keyframe``): a decodable picture at once, no request.
  Only with no such keyframe does it drop its backlog and wait for the next
  one, asking for it through the gate.
- **One resync per fall.** It resyncs once when it falls past the limit; the
  frames it loses until it has caught up again (read its backlog to the end)
  are counted as drops of the same fall, not as more resyncs.
- **No keyframe storm.** ``KeyframeGate``: the keyframe asked for one
  laggard serves every laggard until it comes, and at most one is asked
  every ``LAG_KEYFRAME_INTERVAL``.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

PTS_CLOCK = 90_000  # a frame's pts ticks per second

# How far behind a subscriber may be and still get every frame, late: long enough to ride out a stalled event
# loop or a socket backed up for a moment (each cost a viewer 8+ frames and a keyframe wait under the 8-frame
# rule), short enough that a viewer who cannot keep up skips ahead before its picture is a second late. Seconds
# of video, from its oldest unread frame to the newest; ``[video] max_lag`` sets it.
DEFAULT_MAX_LAG = 1.0
MIN_MAX_LAG, MAX_MAX_LAG = 0.1, 10.0  # the config's range: at least 3 frames at 30 fps; at most an IP camera's GOP
# Bytes a backlog may hold: 4 s of an 8 Mbit/s 1080p camera, so the time bound is what binds for any camera a Pi
# relays; what a viewer's link gets in one burst when it catches up, and what one laggard keeps alive of
# frames the others have long sent.
MAX_LAG_BYTES = 4 * 1024 * 1024
# Frames a backlog may hold whatever their pts say (a source whose timestamps stand still): 10 s at 30 fps.
MAX_LAG_FRAMES = 300
# At most one keyframe a second asked of the encoder for laggards. Each forced keyframe goes to every viewer and
# weighs several P-frames: asked once per laggard (the 8-frame rule did), they came at the encoder's own cap of
# two a second and fed the overload they answered. A laggard may wait up to this long more for its picture.
LAG_KEYFRAME_INTERVAL = 1.0


class Frame(Protocol):
    pts: int
    keyframe: bool
    data: bytes


@dataclass(frozen=True, slots=True)
class LagLimit:
    """How much a subscriber's backlog may hold: ``seconds`` of video by pts (None: no time bound), ``frames``,
    ``bytes`` (None: no byte bound)."""

    seconds: float | None = DEFAULT_MAX_LAG
    frames: int = MAX_LAG_FRAMES
    bytes: int | None = MAX_LAG_BYTES

    @classmethod
    def frames_only(cls, frames: int) -> LagLimit:
        """A bound in frames alone: a consumer that sizes its own queue (the recorder: seconds of a slow disk)."""
        return cls(seconds=None, frames=frames, bytes=None)

    def fits(self, frames: int, size: int, span: int) -> bool:
        """Whether a backlog of ``frames`` frames, ``size`` bytes and ``span`` pts ticks (oldest to newest) fits."""
        return (
            frames <= self.frames
            and (self.bytes is None or size <= self.bytes)
            and (self.seconds is None or span <= self.seconds * PTS_CLOCK)
        )


class Backlog:
    """A subscriber's frames published and not yet read, oldest first, with their bytes."""

    def __init__(self) -> None:
        self._frames: collections.deque[Frame] = collections.deque()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._frames)

    def __bool__(self) -> bool:
        return bool(self._frames)

    def append(self, frame: Frame) -> None:
        self._frames.append(frame)
        self.bytes += len(frame.data)

    def extend(self, frames: Iterable[Frame]) -> None:
        for frame in frames:
            self.append(frame)

    @property
    def first(self) -> Frame:
        """The oldest frame (IndexError when empty)."""
        return self._frames[0]

    def popleft(self) -> Frame:
        frame = self._frames.popleft()
        self.bytes -= len(frame.data)
        return frame

    def clear(self) -> int:
        """Empties it; the frames it held."""
        n = len(self._frames)
        self._frames.clear()
        self.bytes = 0
        return n

    def fits(self, limit: LagLimit, frame: Frame) -> bool:
        """Whether it stays within ``limit`` with ``frame`` added."""
        oldest = self._frames[0].pts if self._frames else frame.pts
        return limit.fits(len(self._frames) + 1, self.bytes + len(frame.data), frame.pts - oldest)

    def skip_to_keyframe(self, limit: LagLimit, frame: Frame) -> int | None:
        """Past ``limit`` as ``frame`` comes: drop the frames before the oldest keyframe after its first frame
        (``frame`` itself included) from which the rest, ``frame`` with it, fits; the frames dropped. None, and
        nothing dropped, when there is no such keyframe."""
        frames = self._frames
        count, size = len(frames) + 1, self.bytes + len(frame.data)
        for i, f in enumerate(frames):
            if i and f.keyframe and limit.fits(count - i, size, frame.pts - f.pts):
                for _ in range(i):
                    self.popleft()
                return i
            size -= len(f.data)
        if frame.keyframe:  # the frame coming starts a GOP of its own: everything before it goes
            return self.clear()
        return None

    def __iter__(self):
        return iter(self._frames)


def fits(limit: LagLimit, frames: list[Frame], coming: int = 1) -> bool:
    """Whether ``frames`` (oldest first), and ``coming`` frames more, fit ``limit`` (their span: as they are)."""
    span = frames[-1].pts - frames[0].pts if frames else 0
    return limit.fits(len(frames) + coming, sum(len(f.data) for f in frames), span)


class KeyframeGate:
    """Keyframe requests for subscribers that fell behind, on their way to the encoder (``send``).

    ``ask`` for each laggard that waits for a keyframe; ``keyframe`` when one is published (it serves every
    laggard waiting); ``tick`` at every other frame. A request goes out at once unless one went out less than
    ``interval`` seconds before; then it is held, and goes out when the interval ends if no keyframe came
    meanwhile. So however many laggards ask, the encoder is asked at most once per interval, and never again
    for laggards a keyframe already served.
    """

    def __init__(self, send: Callable[[], None], interval: float = LAG_KEYFRAME_INTERVAL) -> None:
        self.interval = interval
        self.asked = 0  # laggards' requests
        self.sent = 0  # requests that reached the encoder
        self._send = send
        self._held = False
        self._last = -math.inf

    def ask(self, now: float) -> None:
        self.asked += 1
        self._held = True
        self.tick(now)

    def tick(self, now: float) -> None:
        if self._held and now - self._last >= self.interval:
            self._held = False
            self._last = now
            self.sent += 1
            self._send()

    def keyframe(self) -> None:
        self._held = False
