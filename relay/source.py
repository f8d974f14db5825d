"""A stream's source spec, as given to ``--source NAME=SPEC`` or in ``[streams]``: what it names, parsed.

Pure: text in, a ``SourceSpec`` or a ``ValueError`` naming what is wrong out.
The relay validates specs with it at start; the camera's worker process opens
the source it names (``relay.camera.capture.open_source``).

- ``test:`` or ``test:1280x720@30``: the synthetic camera with the pixel clock
  (``?fault=die&after=60&down=5``: misbehaving like a flaky camera).
- ``v4l2:/dev/video0`` (or a ``/dev/v4l/by-id/...`` path): a USB camera in MJPEG.
- ``rtsp://...``: an IP camera.
- ``file:PATH``: a video file, looped.

Any of them may end in ``#mode=auto|passthrough|transcode``: how this stream
treats H.264 from its source (``decide_mode``), over ``[video] mode``; an RTSP
camera also in ``#transport=udp`` (TCP by default); a V4L2 camera in
``#size=1280x720&fps=60``: the mode to ask it for (``camrelay devices`` lists
them), over ``[video] size`` and ``fps``; and in ``#audio=on|off``:
whether the stream carries its source's sound (``audio_source``), over
``[audio] enabled``. A URL's fragment is never
sent to a camera, so it fits RTSP URLs, paths and devices alike.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from .h264 import PROFILE_BASELINE, PROFILE_HIGH, PROFILE_MAIN, Sps
from .logsafe import REDACTED, redact_url

# auto: pass H.264 through when browsers can take it as it is, else transcode; passthrough: never decode nor
# encode (a source that cannot be passed through is an error); transcode: decode and encode, as always.
MODES = ("auto", "passthrough", "transcode")
SPEC_OPTIONS = ("mode", "transport", "audio", "size", "fps")  # what a spec's #fragment may set
MODE_OPTIONS = ("size", "fps")  # of those, a V4L2 camera's capture mode (the test pattern says it as WxH@FPS)
RTSP_TRANSPORTS = ("tcp", "udp")
AUDIO_OPTIONS = ("on", "off")  # a spec's #audio=: its source's sound or none, whatever [audio] enabled says
# ... or #audio=alsa:<PCM>, an ALSA capture device by name: hw:CARD=<id>,DEV=<n> (what `camrelay devices` prints),
# plughw:/dsnoop: of the same, or a PCM the ALSA configuration defines. Nothing else: a PCM name can carry a
# plugin's arguments (a file to write, a command to run), and a stream's spec reaches the API.
ALSA_PCM = re.compile(r"(?:(?:plug)?hw|dsnoop):(?:CARD=)?[A-Za-z0-9_]+(?:,(?:DEV=)?[0-9]+)?|[A-Za-z_][A-Za-z0-9_]*")
# Profiles browsers' WebRTC decoders take (8-bit 4:2:0): Constrained Baseline, Baseline, Main, High.
BROWSER_PROFILES = (PROFILE_BASELINE, PROFILE_MAIN, PROFILE_HIGH)


@dataclass(frozen=True, slots=True)
class SourceSpec:
    kind: str  # "test", "v4l2", "rtsp", "file"
    target: str  # device path, URL or file path; "" for the test pattern
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    mode: str = ""  # from the spec's #mode=; empty: [video] mode
    transport: str = ""  # an RTSP camera's, from #transport=; empty: TCP
    audio: str = ""  # from #audio=on|off; empty: [audio] enabled

    def __str__(self) -> str:
        """The spec for logs and the API: an RTSP camera's password hidden."""
        return self._text() + self._options()

    def unredacted(self) -> str:
        """The spec as given, password and all: for the camera's worker alone (never in argv, logs or the API)."""
        return (self.target if self.kind == "rtsp" else self._text()) + self._options()

    def _options(self) -> str:
        values = {"mode": self.mode, "transport": self.transport, "audio": self.audio}
        if self.kind == "v4l2":  # its capture mode; the test pattern's is in its text
            values["size"] = f"{self.width}x{self.height}" if self.width else ""
            values["fps"] = f"{self.fps:g}" if self.fps else ""
        options = "&".join(f"{key}={value}" for key, value in values.items() if value)
        return f"#{options}" if options else ""

    def _text(self) -> str:
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
    text, options = _fragment(text.strip())
    spec = _parse(text)
    if options.get("transport") and spec.kind != "rtsp":
        raise ValueError(f"source option #transport= is for rtsp:// cameras, not {spec.kind}:")
    if any(key in options for key in MODE_OPTIONS):
        options.update(_capture_mode(spec, options.pop("size", ""), options.pop("fps", "")))
    if options:
        return dataclasses.replace(spec, **options)
    return spec


def _fragment(text: str) -> tuple[str, dict[str, str]]:
    """(the spec without its ``#key=value&...`` fragment, the fragment's options); a ``#`` followed by no ``=``
    is part of a path, not a fragment."""
    head, hash_, fragment = text.rpartition("#")
    if not hash_ or "=" not in fragment:
        return text, {}
    options = {}
    for part in fragment.split("&"):
        key, eq, value = part.partition("=")
        if key not in SPEC_OPTIONS or not eq:
            raise ValueError(f"source option #{part} is not one of {', '.join(f'#{k}=' for k in SPEC_OPTIONS)}")
        if key in MODE_OPTIONS:
            if not value:
                raise ValueError(f"source option #{key}= has no value")
            options[key] = value  # read with the spec's kind (_capture_mode)
            continue
        allowed = {"mode": MODES, "transport": RTSP_TRANSPORTS, "audio": AUDIO_OPTIONS}[key]
        if key == "audio" and value.startswith("alsa:"):
            if not ALSA_PCM.fullmatch(value[5:]):
                raise ValueError(
                    f"source option #audio={value} does not name an ALSA capture device: alsa:hw:CARD=<id>,DEV=<n>"
                    " (see camrelay devices), plughw:/dsnoop: of one, or a PCM the ALSA configuration defines"
                )
        elif value not in allowed:
            raise ValueError(f"source option #{key}={value} is not one of {', '.join(allowed)}")
        options[key] = value
    return head, options


def _capture_mode(spec: SourceSpec, size: str, fps: str) -> dict[str, int | float]:
    """``#size=`` and ``#fps=`` of a V4L2 camera's spec, as its SourceSpec's fields."""
    if spec.kind != "v4l2":
        hint = " (the test pattern takes test:WxH@FPS)" if spec.kind == "test" else ""
        raise ValueError(f"source options #size= and #fps= are for v4l2: cameras, not {spec.kind}:{hint}")
    out: dict[str, int | float] = {}
    if size:
        out["width"], out["height"] = parse_size(size)
    if fps:
        out["fps"] = parse_fps(fps)
    return out


def _parse(text: str) -> SourceSpec:
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


# The sound each kind of source carries, in its worker (ipc.WorkerConfig.audio): the test pattern's own tone
# bursts; an RTSP camera's or a file's own audio track ("track": relay.camera.cameraaudio). A V4L2 camera's is
# the ALSA device on its USB device (relay.alsa.sound_for).
AUDIO_SOURCES = {"test": "test", "rtsp": "track", "file": "track"}


def shares_worker(spec: SourceSpec, mode: str) -> bool:
    """Whether a stream may share its camera worker process with others (``[video] cameras_per_worker``): an RTSP
    camera read by camrelay's own client (rtsp://, over TCP), not to be transcoded (``mode``: the config's, which
    the spec's ``#mode=`` overrides). Its thread then mostly waits on its socket, and no codec holds the process's
    GIL; anything else (a V4L2 driver that may hang, FFmpeg's demuxer, a transcode) keeps a process of its own."""
    return (
        spec.kind == "rtsp"
        and spec.target.startswith("rtsp://")
        and spec.transport != "udp"
        and (spec.mode or mode) != "transcode"
    )


def audio_source(spec: SourceSpec, enabled: bool, paired: str = "") -> str:
    """What a stream's worker captures sound from ("" none): the ALSA device the spec's ``#audio=alsa:`` names;
    else its source's own sound, when the spec's ``#audio=`` (else ``enabled``, the config's ``[audio] enabled``)
    asks for it and the source has one: a V4L2 camera's is ``paired``, the ALSA device on its USB device."""
    if spec.audio.startswith("alsa:"):
        return spec.audio
    wanted = spec.audio == "on" if spec.audio else enabled
    if not wanted:
        return ""
    if spec.kind == "v4l2":
        return f"alsa:{paired}" if paired else ""
    return AUDIO_SOURCES.get(spec.kind, "")


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


@dataclass(frozen=True, slots=True)
class ModeDecision:
    """Whether a stream passes its source's H.264 through, and why (its log line and the API's ``mode_reason``)."""

    passthrough: bool
    reason: str

    @property
    def mode(self) -> str:
        return "passthrough" if self.passthrough else "transcode"


class PassthroughRefused(ValueError):
    """``mode = "passthrough"`` for a source browsers cannot take as it is; ``str()`` says why."""


def decide_mode(mode: str, codec: str, sps: Sps | None = None, reorders: bool | None = None) -> ModeDecision:
    """Pass through or transcode what a source delivers (``codec``: FFmpeg's name, ``"test pattern"`` or
    ``"mjpeg"``; for H.264 its ``sps`` and whether its pictures come out of decode order, ``reorders``).

    Raises ``PassthroughRefused`` when ``mode`` is ``"passthrough"`` and the source cannot be passed through.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "transcode":
        return ModeDecision(False, "mode=transcode configured")
    unsuitable = _why_not(codec, sps, reorders)
    if unsuitable is None:
        assert sps is not None
        return ModeDecision(True, f"source sends H.264 {sps.describe()} without B-frames")
    if mode == "passthrough":
        raise PassthroughRefused(f"mode=passthrough is impossible: {unsuitable}")
    return ModeDecision(False, unsuitable)


def _why_not(codec: str, sps: Sps | None, reorders: bool | None) -> str | None:
    """Why browsers cannot take this source's video as it is; None when they can."""
    if codec == "test pattern":
        return "the test pattern is drawn here, there is no H.264 to pass through"
    if codec == "mjpeg":
        return "source sends MJPEG"
    if codec == "hevc":
        return "source sends H.265: aiortc has no H.265 packetizer and most browsers' WebRTC cannot decode it"
    if codec != "h264":
        return f"source sends {codec or 'an unknown codec'}, not H.264"
    if sps is None:
        return "source sends H.264 without a parameter set (SPS) to read"
    if sps.profile_idc not in BROWSER_PROFILES or sps.chroma_format_idc != 1:
        return f"source sends H.264 {sps.profile}: browsers decode 8-bit 4:2:0 Baseline, Main and High only"
    if not sps.frame_mbs_only:
        return "source sends interlaced H.264 (field coding), which browsers do not decode"
    if reorders:
        return "source sends B-frames (pictures out of decode order): browsers' WebRTC H.264 and mediamtx refuse them"
    return None
