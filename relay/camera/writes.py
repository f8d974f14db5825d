"""A camera worker's threads as they write to the relay (``WRITES``).

The worker has one pipe to the relay for everything it sends: pictures, sound, statuses and log lines
(``worker.PipeWriter``). While that pipe is full (the relay slow to read it), every thread that writes waits in the
write, whatever it writes: a sound thread logging that it went live, a capture thread saying the signal is back, or
one waiting for a lock that a thread in a write holds. The watches that judge a thread by what it has not done for a
while (a hung sound, a stalled capture, a silent camera) ask here whether it waits to write (then the relay is slow,
not the thread), and count its silence from when its last write that waited ended.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

# Seconds a write lasts at which it waited (the pipe full, or its lock held by a write that was): a write into a
# pipe with room takes microseconds (a 230 kB keyframe about 0.1 ms). Only such a write moves the point a watch
# counts a thread's silence from: a quick one (a status at every retry of a source that is down) is no sign of life.
WAITED = 0.05
# Seconds a waited write's end is kept for: past every watch's bound (the longest, a camera's sound track's read,
# is ~10 s), so an old end changes no watch's judgement; the record stays as small as the threads that wrote lately.
KEPT = 60.0


class Writes:
    """Which threads wait in a write (``waiting``, or ``begin`` and ``end`` around it), since when, and when each
    last came out of one that waited (``ended``). A thread's writes do not nest: each is recorded once, where it
    is made (``worker.PipeWriter``), not again by the pipelines that call it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # By thread ident: when its write began, and whose write it waits behind (a lock's holder), while it lasts.
        self._since: dict[int, tuple[float, Callable[[], int | None] | None]] = {}
        self._ended: dict[int, float] = {}  # by thread ident: the end of its last write that waited (``WAITED``)

    def begin(self, behind: Callable[[], int | None] | None = None) -> float:
        """The calling thread starts a write (or, ``behind``, waits for a lock whose holder's ident ``behind``
        gives: it waits to write only while that holder does); when, for its ``end``. Once a unit in a
        camera's worker: a plain call, not a generator's context manager (~1 us less each)."""
        began = self._clock()
        self._since[threading.get_ident()] = (began, behind)  # one thread's own key: a dict's item is atomic
        return began

    def end(self, began: float) -> None:
        """The calling thread's write that ``begin`` started at ``began`` ended."""
        me = threading.get_ident()
        now = self._clock()
        del self._since[me]
        if now - began >= WAITED:
            with self._lock:
                self._ended[me] = now
                for ident, at in list(self._ended.items()):
                    if now - at > KEPT:
                        del self._ended[ident]

    @contextlib.contextmanager
    def waiting(self, behind: Callable[[], int | None] | None = None) -> Iterator[None]:
        """``begin`` and ``end`` around the block."""
        began = self.begin(behind)
        try:
            yield
        finally:
            self.end(began)

    def waits(self, ident: int | None) -> bool:
        """Thread ``ident`` waits in a write now (or behind a lock whose holder does)."""
        entry = self._since.get(ident) if ident is not None else None
        if entry is None:
            return False
        behind = entry[1]
        if behind is None:
            return True
        holder = behind()
        return holder is not None and holder != ident and self.waits(holder)

    def ended(self, ident: int | None) -> float:
        """When thread ``ident`` last came out of a write that waited; -inf if it did not lately."""
        return self._ended.get(ident, -float("inf")) if ident is not None else -float("inf")


WRITES = Writes()  # the worker process's: every thread's writes to the relay, whichever camera it serves
