"""The hub's H.264 into an FFmpeg muxer (RTSP, MP4), described by the stream's own parameter sets.

PyAV's ``add_stream("h264")`` makes an encoder and opens it when the muxer
starts: libx264 with its default settings (High profile, B-frames), whose SPS
and PPS then replace the stream's own in the muxer's header, the SDP's
``sprop-parameter-sets`` or MP4's ``avcC``. A camera passed through, or a
stream encoded as Constrained Baseline, would be announced as something it is
not. Muxing needs no encoder: the stream is made from a template that FFmpeg
reads from the parameter sets themselves, so the header describes the packets
and no codec runs.
"""

from __future__ import annotations

import fractions
import io

import av

from . import h264
from .hub import EncodedFrame

TIME_BASE = fractions.Fraction(1, 90_000)  # the hub's pts clock
OPUS_CLOCK = 48_000  # the audio hub's pts ticks per second
OPUS_TIME_BASE = fractions.Fraction(1, OPUS_CLOCK)
OPUS_FRAME_SAMPLES = 960  # the worker's 20 ms frames
# The muxer's Opus stream is described by an OpusHead (MP4's dOps) that PyAV makes by opening a libopus encoder,
# which never encodes here: opened in low-delay mode as the worker's is, so its pre-skip (120 samples) is the one
# the packets have.
OPUS_HEAD_OPTIONS = {"application": "lowdelay"}
OPUS_STEREO = 0x04  # the TOC byte's s bit (RFC 6716 3.1)


class NoParameterSets(ValueError):
    """The first frame given to a muxer carries no SPS and PPS to describe the stream with."""


def add_h264_stream(container: av.container.OutputContainer, first: EncodedFrame, fps: float) -> av.VideoStream:
    """A video stream of ``container`` for the H.264 whose first keyframe is ``first`` (with its SPS and PPS)."""
    sets = h264.parameter_sets(first.data)
    sps = h264.sps_of(sets) if sets else None
    if sets is None or sps is None:
        raise NoParameterSets("the stream's first keyframe has no SPS and PPS")
    with av.open(io.BytesIO(sets), format="h264") as template:
        stream = container.add_stream_from_template(template.streams.video[0])
    stream.time_base = TIME_BASE
    ctx = stream.codec_context
    ctx.extradata = sets
    ctx.width, ctx.height = sps.width, sps.height
    ctx.framerate = fractions.Fraction(fps).limit_denominator(1001)
    return stream


def write(container: av.container.OutputContainer, frame: EncodedFrame, base: int, audio: bool = False) -> None:
    """Mux one access unit (or with ``audio`` one Opus packet), its pts counted from ``base``."""
    packet = av.Packet(frame.data)
    packet.stream = container.streams.audio[0] if audio else container.streams.video[0]
    packet.time_base = OPUS_TIME_BASE if audio else TIME_BASE
    packet.pts = packet.dts = frame.pts - base
    if audio:
        packet.duration = OPUS_FRAME_SAMPLES
    packet.is_keyframe = frame.keyframe
    container.mux(packet)


def opus_channels(packet: bytes) -> int:
    """1 or 2: the channels an Opus packet's TOC byte says it codes."""
    return 2 if packet and packet[0] & OPUS_STEREO else 1


def audio_base(audio: EncodedFrame, video: EncodedFrame) -> int:
    """The audio pts a timeline that starts at ``video`` (pts 0) counts audio from: the audio captured at the
    same time, so both tracks line up by their capture times."""
    return audio.pts - round((audio.capture_time - video.capture_time) * OPUS_CLOCK)


def add_opus_stream(container: av.container.OutputContainer, channels: int) -> av.AudioStream:
    """An audio stream of ``container`` for the stream's Opus packets, muxed as they are."""
    stream = container.add_stream("libopus", rate=OPUS_CLOCK, options=dict(OPUS_HEAD_OPTIONS))
    stream.codec_context.layout = "stereo" if channels == 2 else "mono"
    stream.time_base = OPUS_TIME_BASE
    return stream
