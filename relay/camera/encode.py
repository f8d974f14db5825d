"""Decode once, encode H.264 once: the only codec work a stream does.

Blocking code, run on the stream's encode thread. ``JpegDecoder`` turns the
camera's JPEG into a picture; ``H264Encoder`` turns pictures into Annex B
access units that every subscriber shares. Settings follow what browsers
decode with the least delay: constrained baseline, no B-frames, SPS/PPS before
every IDR (no global header), a keyframe about every second, and IDRs on demand.
"""

from __future__ import annotations

import fractions
import logging
import os
from typing import TYPE_CHECKING

from .. import h264
from ..ipc import EncoderSettings

if TYPE_CHECKING:
    # Imported where a codec opens: a passed-through camera's worker imports this module and never loads
    # PyAV (tens of MiB of FFmpeg's libraries) unless it must decode or encode.
    import av

log = logging.getLogger(__name__)

PTS_CLOCK = 90_000  # RTP's video clock; pts in this base map 1:1 onto RTP timestamps
TIME_BASE = fractions.Fraction(1, PTS_CLOCK)
# Pictures libx264 takes as they are; anything else is converted once.
DIRECT_FORMATS = ("yuv420p", "yuvj420p")
# libx264's profile for a camera's profile_idc, to draw a passed-through camera's slate in the camera's profile.
# x264's "profile" is only a ceiling: it writes the lowest profile the tools it uses need, and ultrafast uses
# Baseline's. CABAC makes it Main, the 8x8 transform High.
X264_PROFILES = {
    h264.PROFILE_BASELINE: ("baseline", ""), h264.PROFILE_MAIN: ("main", ":cabac=1"),
    h264.PROFILE_HIGH: ("high", ":cabac=1:8x8dct=1"),
}  # fmt: skip
# The Pi 4's hardware encoder; the Pi 5 has none.
V4L2M2M_DEVICES = ("/dev/video11",)


# Bytes after the JPEG end marker that some UVC cameras pad their frames with.
JPEG_TAIL_SLACK = 1024


class DecodeError(Exception):
    """A corrupt or truncated JPEG."""


class JpegDecoder:
    def __init__(self) -> None:
        import av

        self._ctx = av.CodecContext.create("mjpeg", "r")

    def decode(self, jpeg: bytes) -> av.VideoFrame:
        if not jpeg.startswith(b"\xff\xd8"):
            raise DecodeError(f"not a JPEG ({len(jpeg)} bytes, no start marker)")
        # FFmpeg conceals a cut-off JPEG as a grey-bottomed picture; the end
        # marker (some cameras pad after it) is what tells a whole frame.
        if jpeg.rfind(b"\xff\xd9", max(0, len(jpeg) - JPEG_TAIL_SLACK)) == -1:
            raise DecodeError(f"truncated JPEG ({len(jpeg)} bytes, no end marker)")
        import av

        try:
            frames = self._ctx.decode(av.Packet(jpeg))
        except (av.FFmpegError, ValueError) as exc:
            raise DecodeError(f"corrupt JPEG ({len(jpeg)} bytes): {exc}") from exc
        if not frames:
            raise DecodeError(f"JPEG of {len(jpeg)} bytes gave no picture")
        return frames[-1]


class JpegEncoder:
    """JPEG for sources that do not deliver it (RTSP, files, the slate), only on demand."""

    QSCALE = 5  # ffmpeg's -q:v (2 best .. 31 worst): about what a good USB camera delivers
    FF_QP2LAMBDA = 118
    FLAG_QSCALE = 2

    def __init__(self) -> None:
        self._ctx: av.VideoCodecContext | None = None
        self._shape: tuple[int, int] | None = None
        self._pts = 0

    def encode(self, picture: av.VideoFrame) -> bytes:
        import av

        if picture.format.name != "yuvj420p":
            picture = picture.reformat(format="yuvj420p")
        if (picture.width, picture.height) != self._shape:
            ctx = av.CodecContext.create("mjpeg", "w")
            ctx.width, ctx.height = picture.width, picture.height
            ctx.pix_fmt = "yuvj420p"
            ctx.color_range = 2
            ctx.time_base = fractions.Fraction(1, 1000)
            ctx.flags |= self.FLAG_QSCALE
            ctx.global_quality = self.QSCALE * self.FF_QP2LAMBDA
            ctx.open()
            self._ctx, self._shape = ctx, (picture.width, picture.height)
        assert self._ctx is not None
        self._pts += 1
        picture.pts = self._pts
        picture.time_base = fractions.Fraction(1, 1000)
        return b"".join(bytes(p) for p in self._ctx.encode(picture))


def h264_level(width: int, height: int, fps: float) -> str:
    """The lowest H.264 level whose macroblock rate fits the stream."""
    mbs = ((width + 15) // 16) * ((height + 15) // 16)
    for level, max_fs, max_mbps in (
        ("3.1", 3600, 108_000),
        ("4", 8192, 245_760),
        ("4.2", 8704, 522_240),
        ("5.1", 36_864, 983_040),
    ):
        if mbs <= max_fs and mbs * fps <= max_mbps:
            return level
    return "5.2"


def pick_encoder(requested: str) -> str:
    if requested != "auto":
        return requested
    if any(os.path.exists(dev) for dev in V4L2M2M_DEVICES):
        return "h264_v4l2m2m"
    return "libx264"


class H264Encoder:
    """One H.264 encoder; reopens itself when the picture size or format changes.

    Constrained Baseline, unless told to ``match`` a camera's SPS: a passed-through camera's slate is then
    encoded in the camera's profile and level, its SPS stamped with the camera's constraint flags, so the
    stream's ``profile-level-id`` (what viewers' answers said) stays the camera's while the slate shows.
    """

    def __init__(self, settings: EncoderSettings) -> None:
        self.settings = settings
        self.name = pick_encoder(settings.encoder)
        self._ctx: av.VideoCodecContext | None = None
        self._shape: tuple[int, int, str] | None = None
        self._match: h264.Sps | None = None  # the camera's SPS the encoder's SPS is to say the same as
        self._matched: h264.Sps | None = None  # what the open encoder was opened for

    def match(self, sps: h264.Sps | None) -> None:
        """Encode from now on in ``sps``'s profile and level (None: Constrained Baseline); any thread."""
        if sps is not None and sps.profile_idc not in X264_PROFILES:
            sps = None  # not one libx264 makes (a camera passed through never sends one: decide_mode)
        self._match = sps

    @property
    def running(self) -> int:
        """1 while a codec context is open, else 0."""
        return int(self._ctx is not None)

    def _open(self, width: int, height: int, pix_fmt: str) -> None:
        s = self.settings
        gop = max(1, round(s.fps * s.keyframe_interval))
        import av

        ctx = av.CodecContext.create(self.name, "w")
        ctx.width, ctx.height = width, height
        ctx.pix_fmt = pix_fmt
        ctx.time_base = TIME_BASE
        ctx.framerate = fractions.Fraction(s.fps).limit_denominator(1001)
        ctx.bit_rate = s.bitrate
        ctx.gop_size = gop
        ctx.max_b_frames = 0
        self._matched = self._match
        if self.name == "libx264":
            ctx.options = self.libx264_options(width, height)
        # No GLOBAL_HEADER flag: SPS and PPS travel in-band before every IDR,
        # so a viewer can start at any keyframe.
        ctx.open()
        self._ctx = ctx
        self._shape = (width, height, pix_fmt)
        log.info("encoder=%s opened %dx%d %s gop=%d bitrate=%d", self.name, width, height, pix_fmt, gop, s.bitrate)

    def libx264_options(self, width: int, height: int) -> dict[str, str]:
        """libx264's options for a picture of this size: no frame held (zerolatency: no B-frames, no lookahead,
        a frame's slices encoded at once on threads of their own), Constrained Baseline or the matched SPS's
        profile and level, IDRs on demand (benchmarks/encoder.py measures the choices)."""
        s, match = self.settings, self._matched
        gop = max(1, round(s.fps * s.keyframe_interval))
        profile, tools = X264_PROFILES[match.profile_idc] if match else ("baseline", "")
        kbps = s.bitrate // 1000
        return {
            "preset": "ultrafast",
            "tune": "zerolatency",
            "profile": profile,
            "level": match.level if match and match.level != "1b" else h264_level(width, height, s.fps),
            "forced-idr": "1",
            # Constant-ish rate with a half-second buffer: bounded frame
            # sizes keep every viewer's jitter buffer small.
            "x264-params": (
                f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:repeat-headers=1"
                f":vbv-maxrate={kbps}:vbv-bufsize={max(1, kbps // 2)}{tools}"
            ),
        }

    def encode(self, picture: av.VideoFrame, pts: int, force_keyframe: bool) -> list[tuple[bytes, bool, int]]:
        """Encode one picture; returns (Annex B bytes, is keyframe, pts) per access unit."""
        import av
        from av.video.frame import PictureType

        if picture.format.name not in DIRECT_FORMATS:
            picture = picture.reformat(format="yuv420p")
        shape = (picture.width, picture.height, picture.format.name)
        if shape != self._shape or self._match is not self._matched:
            self.close()
            try:
                self._open(*shape)
            except av.FFmpegError as exc:
                if self.settings.encoder != "auto" or self.name == "libx264":
                    raise
                # A hardware encoder that is listed but does not work (busy,
                # wrong firmware): software is always there.
                log.warning("encoder=%s does not open (%s); using libx264", self.name, exc)
                self.name = "libx264"
                self._open(*shape)
        assert self._ctx is not None
        # Decoded JPEGs say pict_type=I; left alone, libx264 would make every
        # frame an IDR. Only a forced keyframe keeps I.
        picture.pict_type = PictureType.I if force_keyframe else PictureType.NONE
        picture.pts = pts
        picture.time_base = TIME_BASE
        match = self._matched if self.name == "libx264" else None
        return [
            (h264.with_profile_of(bytes(p), match) if match and p.is_keyframe else bytes(p), p.is_keyframe,
             p.pts if p.pts is not None else pts)
            for p in self._ctx.encode(picture)
        ]  # fmt: skip

    def close(self) -> None:
        self._ctx = None
        self._shape = None
