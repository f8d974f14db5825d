"""Log lines that are safe to write: throttled when a client could repeat them, free of secrets."""

from __future__ import annotations

import base64
import functools
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from urllib.parse import quote, unquote

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
# Control characters in what another party wrote (a camera's or a WHIP server's answer): a bare LF forges a log
# line, an escape sequence drives the terminal that shows the log. Tab stays.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def printable(text: str, limit: int | None = None) -> str:
    """``text`` with each control character (``CONTROL_CHARS``) a "?", cut to ``limit`` characters if given."""
    return CONTROL_CHARS.sub("?", text if limit is None else text[:limit])


# Characters of a remote server's reason phrase (a camera's RTSP answer, a WHIP server's refusal) quoted in a log
# line and the API's last_error: "Not Found", not 64 KiB of it.
MAX_REASON = 100


def reason_phrase(text: str) -> str:
    """A remote server's reason phrase as camrelay quotes it: printable, at most ``MAX_REASON`` characters."""
    return printable(text, MAX_REASON)


SHOWS_SECRET = {"shows_secret": True}  # ``extra=`` of the one line allowed to: the start-up viewer URL


# The password of scheme://user:password@ (or a mistyped scheme:/user:password@) anywhere in a text, known or
# not: a config error quoting a source with a wrong scheme, an error that escaped the URL. It runs to the last
# @ before a space, so a password holding an unencoded @ is hidden whole.
URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*:/{0,2}[^\s/:@]*:)(?P<password>[^\s/]*)@")
WORD = re.compile(r"\S+")  # the pattern never spans a space, so it is tried one word at a time
MAX_SCANNED_WORD = 1024  # characters: a URL is far shorter; a longer word with : and @ is hidden whole
FORMS_CACHED = 16  # sets of secrets whose forms are kept: the process's one, growing, and a few of config errors


# A password a camera takes in its URL's path or query instead of the user information: Dahua's and Amcrest's
# "?channel=1&user=admin&password=..." and the "/user=admin_password=..._channel=1_stream=0.sdp" of XMEye cameras.
# The value runs to the next parameter (&, ;, #, or _name= in the XMEye form) or the URL's end.
URL_PARAM_PASSWORD = re.compile(
    r"[?&;/_](?:password|passwd|pass|pwd|token|secret)=(?P<value>[^&;#\s]*?)(?=[&;#\s]|_[A-Za-z]+=|$)", re.IGNORECASE
)


def url_passwords(url: str) -> list[str]:
    """The password in ``scheme://user:password@host/...``, if it has one, and ``user:password`` in base64; and
    the values of password-like parameters in its path or query (``URL_PARAM_PASSWORD``).

    The user information ends at the last @ before the path (``rtsp://u:pw@cam/x@1080p``: ``pw``); a
    password with an unencoded / (which FFmpeg would not take either) ends at the URL's last @ instead.
    """
    rest = url.partition("://")[2]
    found = [m.group("value") for m in URL_PARAM_PASSWORD.finditer(rest) if m.group("value")]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    userinfo, at, _ = (authority if "@" in authority else rest).rpartition("@")
    user, _, password = userinfo.partition(":")
    if not (at and password):
        return found
    # and HTTP Basic's credential as an RTSP client sends it (a camera may quote it back in an error)
    return [password, base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode(), *found]


def variants(secret: str) -> set[str]:
    """The forms ``secret`` takes in a text: as given and percent-decoded (a URL holds the encoded form, an
    error may show either), each percent-encoded, or escaped as repr (in either kind of quotes), ascii,
    JSON and unicode_escape show it."""
    forms = set()
    for s in (secret, unquote(secret)):
        forms |= {s, quote(s), quote(s, safe=""), json.dumps(s)[1:-1], json.dumps(s, ensure_ascii=False)[1:-1]}
        for escaped in (repr(s)[1:-1], ascii(s)[1:-1], s.encode("unicode_escape").decode("ascii")):
            bare = escaped.replace("\\'", "'")  # as inside "...": ' not escaped
            forms |= {bare, bare.replace("'", "\\'")}
    forms.discard("")
    return forms


@functools.lru_cache(maxsize=FORMS_CACHED)
def _forms(secrets: frozenset[str]) -> tuple[str, ...]:
    return tuple(sorted({f for s in secrets if s for f in variants(s)}, key=len, reverse=True))


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every form of every secret (``variants``), the longest first so none is half hidden,
    and the password of any URL in it replaced by ``***``."""
    for form in _forms(frozenset(secrets)):
        text = text.replace(form, REDACTED)
    return WORD.sub(_hide_url_password, text) if "@" in text else text


def _hide_url_password(word: re.Match[str]) -> str:
    text = word.group()
    if "@" not in text or ":" not in text:
        return text
    if len(text) > MAX_SCANNED_WORD:
        return REDACTED  # the pattern's cost grows with the square of a word's length
    return URL_PASSWORD.sub(rf"\g<head>{REDACTED}@", text)


class SecretFilter(logging.Filter):
    """On a handler: hides the known secrets (and URL passwords) in every record but those logged with
    ``extra=SHOWS_SECRET``.

    A second line of defence; the code logs no secret in the first place (tests/test_auth.py).
    """

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "shows_secret", False):
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


class ForwardingHandler(logging.Handler):
    """Log records handed to another process (a child's, to the relay, which logs them under the same logger
    name): ``send(level, logger name, message)``, the message and its traceback redacted first (what leaves the
    process)."""

    def __init__(self, send: Callable[[int, str, str], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
            self._send(record.levelno, record.name, redact(msg, SECRET_FILTER.secrets))
        except Exception:
            self.handleError(record)


def redact_url(url: str) -> str:
    """``rtsp://user:secret@host/`` -> ``rtsp://user:***@host/``, for logs and the API."""
    return redact(url, url_passwords(url))


def redact_text(text: str, url: str) -> str:
    """``text`` (an FFmpeg error names the URL it failed on, escaped as Python quotes it) with ``url``'s
    password hidden in every form."""
    return redact(text, url_passwords(url))
