"""Sources: where frames come from.

A source is opened, read in a loop on a capture thread, and closed. Every read
returns a ``CapturedFrame`` stamped with its capture time. MJPEG sources (USB
cameras, capture cards, the test pattern) hand over the JPEG bytes exactly as
the device delivered them, for snapshots and MJPEG over HTTP; other sources
(RTSP cameras, files) hand over decoded pictures.

Source specs, as given to ``--source NAME=SPEC``:

- ``test:`` or ``test:1280x720@30``: the synthetic camera with the pixel clock.
- ``v4l2:/dev/video0`` (or a ``/dev/v4l/by-id/...`` path): a USB camera in MJPEG.
- ``rtsp://...``: an IP camera, decoded.
- ``file:PATH``: a video file, looped, decoded.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import av

from .logsafe import REDACTED, redact, url_passwords
from .testpattern import PatternRenderer

log = logging.getLogger(__name__)

# V4L2 keeps its own ring of buffers; anything queued in front of it only
# adds latency, so ask FFmpeg's demuxer for no probing and no extra buffering.
V4L2_OPTIONS = {"input_format": "mjpeg", "fflags": "nobuffer", "probesize": "32", "analyzeduration": "0"}
RTSP_OPTIONS = {"rtsp_transport": "tcp", "fflags": "nobuffer", "flags": "low_delay", "timeout": "5000000"}


class SourceError(Exception):
    """A source could not be opened or stopped delivering frames."""


@dataclass(slots=True)
class CapturedFrame:
    capture_time: float  # wall clock, time.time(), when the picture was taken
    jpeg: bytes | None = None  # the JPEG as the device delivered it (MJPEG sources)
    picture: av.VideoFrame | None = None  # a decoded picture (other sources)


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


class Source(Protocol):
    """Blocking; used from one capture thread only."""

    width: int
    height: int
    fps: float

    def open(self) -> None: ...

    def read(self) -> CapturedFrame: ...

    def close(self) -> None: ...


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


# When each simulated camera may be opened again, and how many faults it has
# had (keyed by its spec); per process, because the worker opens a new source
# object for every retry.
_DOWN_UNTIL: dict[str, float] = {}
_FAULTS_DONE: dict[str, int] = {}


class TestPatternSource:
    """The synthetic MJPEG camera, paced to its frame rate by the wall clock."""

    def __init__(self, width: int, height: int, fps: float, label: str = "test", faults: str = "") -> None:
        self.width, self.height, self.fps = width, height, fps
        self._label = label
        self._renderer: PatternRenderer | None = None
        self._next = 0.0
        self._stop = threading.Event()
        self._faults = parse_faults(faults) if faults else None
        self._fault_key = f"{label}?{faults}"
        self._frames = 0

    def open(self) -> None:
        if self._faults and time.monotonic() < _DOWN_UNTIL.get(self._fault_key, 0.0):
            raise SourceError("simulated camera is unplugged")
        self._renderer = PatternRenderer(self.width, self.height, self._label)
        self._next = time.monotonic()

    def read(self) -> CapturedFrame:
        if self._renderer is None:
            raise SourceError("test pattern is not open")
        if self._faults:
            self._misbehave()
        delay = self._next - time.monotonic()
        if delay > 0:
            if self._stop.wait(delay):
                raise SourceError("test pattern closed")
        else:
            # Fell behind (a busy machine): skip the missed slots rather than burst.
            self._next = time.monotonic() + delay % (1.0 / self.fps)
        self._next += 1.0 / self.fps
        now = time.time()
        jpeg = self._renderer.jpeg(int(now * 1000))
        self._frames += 1
        if self._faults and self._faults["fault"] == "corrupt" and self._frames % int(self._faults["every"]) == 0:
            jpeg = jpeg[: len(jpeg) // 2]
        return CapturedFrame(now, jpeg=jpeg)

    def _misbehave(self) -> None:
        f = self._faults
        assert f is not None
        if self._frames < f["after"]:
            return
        done = _FAULTS_DONE.get(self._fault_key, 0)
        if f["times"] and done >= f["times"]:
            return
        _FAULTS_DONE[self._fault_key] = done + 1
        if f["fault"] == "die":
            _DOWN_UNTIL[self._fault_key] = time.monotonic() + float(f["down"])
            raise SourceError("simulated camera unplugged")
        if f["fault"] == "hang":
            self._frames = 0  # after the hang, misbehave again later
            if self._stop.wait(float(f["down"])):
                raise SourceError("test pattern closed")
            self._next = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        self._renderer = None


class V4L2Source:
    """A USB camera or HDMI capture card, read as MJPEG with PyAV's v4l2 input."""

    def __init__(self, device: str, width: int, height: int, fps: float) -> None:
        self.device = device
        self.width, self.height, self.fps = width, height, fps
        self._container: av.container.InputContainer | None = None

    def open(self) -> None:
        options = dict(V4L2_OPTIONS, video_size=f"{self.width}x{self.height}", framerate=f"{self.fps:g}")
        try:
            self._container = av.open(self.device, format="video4linux2", options=options)
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"cannot open {self.device}: {exc}") from exc
        stream = self._container.streams.video[0]
        self.width = stream.codec_context.width or self.width
        self.height = stream.codec_context.height or self.height

    def read(self) -> CapturedFrame:
        if self._container is None:
            raise SourceError(f"{self.device} is not open")
        try:
            packet = next(self._container.demux(video=0))
        except (av.FFmpegError, OSError, StopIteration) as exc:
            raise SourceError(f"{self.device} stopped delivering frames: {exc}") from exc
        # The kernel's buffer timestamp would be better, but it is on the
        # monotonic clock; the time we receive it is within a few ms of it.
        return CapturedFrame(time.time(), jpeg=bytes(packet))

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


class DecodedSource:
    """An RTSP camera or a video file (looped), decoded on the capture thread."""

    def __init__(self, url: str, width: int, height: int, fps: float, *, loop: bool, options: dict[str, str]) -> None:
        self.url = url
        self.width, self.height, self.fps = width, height, fps
        self._loop = loop
        self._options = options
        self._container: av.container.InputContainer | None = None
        self._frames = None
        self._next = 0.0
        self._stop = threading.Event()

    def open(self) -> None:
        try:
            self._container = av.open(self.url, options=self._options, timeout=10)
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"cannot open {redact_url(self.url)}: {redact_text(str(exc), self.url)}") from exc
        if not self._container.streams.video:
            raise SourceError(f"{redact_url(self.url)} has no video stream")
        ctx = self._container.streams.video[0].codec_context
        self.width, self.height = ctx.width or self.width, ctx.height or self.height
        self._frames = self._container.decode(video=0)
        self._next = time.monotonic()

    def read(self) -> CapturedFrame:
        if self._container is None or self._frames is None:
            raise SourceError(f"{redact_url(self.url)} is not open")
        try:
            picture = next(self._frames)
        except StopIteration:
            if not self._loop:
                raise SourceError(f"{redact_url(self.url)} ended") from None
            self._container.seek(0)
            self._frames = self._container.decode(video=0)
            return self.read()
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(
                f"{redact_url(self.url)} stopped delivering frames: {redact_text(str(exc), self.url)}"
            ) from exc
        if self._loop:  # a file plays at its configured rate, not as fast as it decodes
            delay = self._next - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                raise SourceError("file source closed")
            self._next = max(self._next + 1.0 / self.fps, time.monotonic() - 1.0)
        picture.pts = None
        return CapturedFrame(time.time(), picture=picture)

    def close(self) -> None:
        self._stop.set()
        if self._container is not None:
            self._container.close()
            self._container = None
            self._frames = None


def redact_url(url: str) -> str:
    """``rtsp://user:secret@host/`` -> ``rtsp://user:***@host/``, for logs and the API."""
    return redact(url, url_passwords(url))


def redact_text(text: str, url: str) -> str:
    """``text`` (an FFmpeg error names the URL it failed on, escaped as Python quotes it) with ``url``'s
    password hidden in every form."""
    return redact(text, url_passwords(url))


def open_source(spec: SourceSpec, width: int, height: int, fps: float, label: str) -> Source:
    """A source for ``spec``; sizes in the spec win over the defaults given."""
    width, height = spec.width or width, spec.height or height
    fps = spec.fps or fps
    if spec.kind == "test":
        return TestPatternSource(width, height, fps, label, spec.target)
    if spec.kind == "v4l2":
        return V4L2Source(spec.target, width, height, fps)
    if spec.kind == "rtsp":
        return DecodedSource(spec.target, width, height, fps, loop=False, options=RTSP_OPTIONS)
    if spec.kind == "file":
        return DecodedSource(spec.target, width, height, fps, loop=True, options={})
    raise ValueError(f"unknown source kind {spec.kind!r}")
