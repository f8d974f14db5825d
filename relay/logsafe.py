"""Log lines that are safe to write: throttled when a client could repeat them, free of secrets."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

# The same warning at most this often; the lines between are counted, not lost.
DEFAULT_INTERVAL = 1.0


class Throttled:
    """``warn(...)`` logs at most once per ``interval``; suppressed calls are counted into the next line."""

    def __init__(self, logger: logging.Logger, interval: float = DEFAULT_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._last = float("-inf")
        self.suppressed = 0

    def warn(self, msg: str, *args: object, now: float | None = None, exc_info: BaseException | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now - self._last < self.interval:
            self.suppressed += 1
            return False
        if self.suppressed:
            msg += " (and %d more like it)"
            args = (*args, self.suppressed)
        self.logger.warning(msg, *args, exc_info=exc_info)
        self._last, self.suppressed = now, 0
        return True


REDACTED = "***"
SHOWS_SECRET = {"shows_secret": True}  # ``extra=`` of the one line allowed to: the start-up viewer URL


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every (non-empty) secret replaced by ``***``; the longest first, so none is half hidden."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


class SecretFilter(logging.Filter):
    """On a handler: hides the known secrets in every record but those logged with ``extra=SHOWS_SECRET``.

    A second line of defence; the code logs no secret in the first place (tests/test_auth.py).
    """

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets and not getattr(record, "shows_secret", False):
            message = record.getMessage()
            clean = redact(message, self.secrets)
            if clean != message:
                record.msg, record.args = clean, None
            if record.exc_info:  # a traceback quotes what it likes: formatted here, redacted below
                record.exc_text = logging.Formatter().formatException(record.exc_info)
                record.exc_info = None
            if record.exc_text:
                record.exc_text = redact(record.exc_text, self.secrets)
            if record.stack_info:
                record.stack_info = redact(record.stack_info, self.secrets)
        return True


SECRET_FILTER = SecretFilter()  # the one the CLI puts on its log handler; secrets are added as they become known
