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
    """One H.264 encoder; reopens itself when the picture size or format changes."""

    def __init__(self, settings: EncoderSettings) -> None:
        self.settings = settings
        self.name = pick_encoder(settings.encoder)
        self._ctx: av.VideoCodecContext | None = None
        self._shape: tuple[int, int, str] | None = None

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
        if self.name == "libx264":
            kbps = s.bitrate // 1000
            ctx.options = {
                "preset": "ultrafast",
                "tune": "zerolatency",
                "profile": "baseline",
                "level": h264_level(width, height, s.fps),
                "forced-idr": "1",
                # Constant-ish rate with a half-second buffer: bounded frame
                # sizes keep every viewer's jitter buffer small.
                "x264-params": (
                    f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:repeat-headers=1"
                    f":vbv-maxrate={kbps}:vbv-bufsize={max(1, kbps // 2)}"
                ),
            }
        # No GLOBAL_HEADER flag: SPS and PPS travel in-band before every IDR,
        # so a viewer can start at any keyframe.
        ctx.open()
        self._ctx = ctx
        self._shape = (width, height, pix_fmt)
        log.info("encoder=%s opened %dx%d %s gop=%d bitrate=%d", self.name, width, height, pix_fmt, gop, s.bitrate)

    def encode(self, picture: av.VideoFrame, pts: int, force_keyframe: bool) -> list[tuple[bytes, bool, int]]:
        """Encode one picture; returns (Annex B bytes, is keyframe, pts) per access unit."""
        import av
        from av.video.frame import PictureType

        if picture.format.name not in DIRECT_FORMATS:
            picture = picture.reformat(format="yuv420p")
        shape = (picture.width, picture.height, picture.format.name)
        if shape != self._shape:
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
        return [(bytes(p), p.is_keyframe, p.pts if p.pts is not None else pts) for p in self._ctx.encode(picture)]

    def close(self) -> None:
        self._ctx = None
        self._shape = None
