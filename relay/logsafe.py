"""Log lines that an attacker or a broken client could repeat many times a second."""

from __future__ import annotations

import logging
import time

# The same warning at most this often; the lines between are counted, not lost.
DEFAULT_INTERVAL = 1.0


class Throttled:
    """``warn(...)`` logs at most once per ``interval``; suppressed calls are counted into the next line."""

    def __init__(self, logger: logging.Logger, interval: float = DEFAULT_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._last = float("-inf")
        self.suppressed = 0

    def warn(self, msg: str, *args: object, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now - self._last < self.interval:
            self.suppressed += 1
            return False
        if self.suppressed:
            msg += " (and %d more like it)"
            args = (*args, self.suppressed)
        self.logger.warning(msg, *args)
        self._last, self.suppressed = now, 0
        return True
