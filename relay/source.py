"""A stream's source spec, as given to ``--source NAME=SPEC`` or in ``[streams]``: what it names, parsed.

Pure: text in, a ``SourceSpec`` or a ``ValueError`` naming what is wrong out.
The relay validates specs with it at start; the camera's worker process opens
the source it names (``relay.camera.capture.open_source``).

- ``test:`` or ``test:1280x720@30``: the synthetic camera with the pixel clock
  (``?fault=die&after=60&down=5``: misbehaving like a flaky camera).
- ``v4l2:/dev/video0`` (or a ``/dev/v4l/by-id/...`` path): a USB camera in MJPEG.
- ``rtsp://...``: an IP camera, decoded.
- ``file:PATH``: a video file, looped, decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

from .logsafe import REDACTED, redact_url


@dataclass(frozen=True, slots=True)
class SourceSpec:
    kind: str  # "test", "v4l2", "rtsp", "file"
    target: str  # device path, URL or file path; "" for the test pattern
    width: int | None = None
    height: int | None = None
    fps: float | None = None

    def __str__(self) -> str:
        if self.kind == "test":
            text = "test:"
            if self.width:
                text += f"{self.width}x{self.height}"
            if self.fps:
                text += f"@{self.fps:g}"
            return text + (f"?{self.target}" if self.target else "")
        if self.kind == "rtsp":
            return redact_url(self.target)  # shown in logs and the API: never the password
        return f"{self.kind}:{self.target}"


def parse_source_spec(text: str) -> SourceSpec:
    """Parse a source spec; raises ``ValueError`` naming what is wrong."""
    text = text.strip()
    if text.startswith(("rtsp://", "rtsps://")):
        return SourceSpec("rtsp", text)
    kind, sep, rest = text.partition(":")
    if not sep:
        raise ValueError(f"source {text!r} has no kind; expected test:, v4l2:/dev/videoN, rtsp://... or file:PATH")
    if kind == "test":
        rest, _, query = rest.partition("?")
        if query:
            parse_faults(query)  # validate now, not in the worker
        size, at, rate = rest.partition("@")
        width, height = parse_size(size) if size else (None, None)
        fps = parse_fps(rate) if at else None
        return SourceSpec("test", query, width, height, fps)
    if kind in ("v4l2", "file"):
        if not rest:
            raise ValueError(f"source {text!r} needs a path after {kind}:")
        return SourceSpec(kind, rest)
    raise ValueError(f"source {_userinfo_hidden(text)!r} has unknown kind {kind!r}; expected test, v4l2, rtsp or file")


def _userinfo_hidden(spec: str) -> str:
    """A mistyped spec for an error: whatever lies between its first : and its last @ may be a password
    (``rtsp//admin:pw@cam``, ``admin:pw@cam/x``), so it is hidden, URL or not."""
    shown = redact_url(spec)
    if REDACTED in shown:
        return shown  # a URL after all: its user name stays readable
    head, at, tail = shown.rpartition("@")
    kind, colon, _ = head.partition(":")
    return f"{kind}{colon}{REDACTED}@{tail}" if at and colon else shown


def parse_size(text: str) -> tuple[int, int]:
    w, x, h = text.lower().partition("x")
    if not x or not w.isdigit() or not h.isdigit():
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 1280x720")
    width, height = int(w), int(h)
    if not (16 <= width <= 7680 and 16 <= height <= 4320):
        raise ValueError(f"size {text!r} is outside 16x16..7680x4320")
    if width % 2 or height % 2:
        raise ValueError(f"size {text!r} must have even width and height")
    return width, height


def parse_fps(text: str) -> float:
    try:
        fps = float(text)
    except ValueError:
        raise ValueError(f"frame rate {text!r} is not a number") from None
    if not 1 <= fps <= 120:
        raise ValueError(f"frame rate {text!r} is outside 1..120")
    return fps


FAULTS = ("die", "hang", "corrupt")


def parse_faults(query: str) -> dict[str, str | float]:
    """``fault=die&after=60&down=2``: a test pattern that misbehaves like a real camera.

    - ``die``: after ``after`` frames the camera is unplugged; it cannot be
      opened for ``down`` seconds, then comes back (and dies again later).
    - ``hang``: after ``after`` frames reads block (no frames, no error) until
      the source is closed or ``down`` seconds pass.
    - ``corrupt``: every ``every``-th JPEG is cut short.

    ``times=N`` stops after N faults (default 0: forever).
    """
    out: dict[str, str | float] = {"fault": "", "after": 60.0, "down": 2.0, "every": 10.0, "times": 0.0}
    for part in query.split("&"):
        key, eq, value = part.partition("=")
        if key not in out or not eq:
            raise ValueError(f"test source option {part!r} is not one of fault=, after=, down=, every=, times=")
        if key == "fault":
            if value not in FAULTS:
                raise ValueError(f"fault {value!r} is not one of {', '.join(FAULTS)}")
            out[key] = value
        else:
            try:
                out[key] = float(value)
            except ValueError:
                raise ValueError(f"test source option {key}={value!r} is not a number") from None
    return out
