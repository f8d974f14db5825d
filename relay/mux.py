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


def write(container: av.container.OutputContainer, frame: EncodedFrame, base: int) -> None:
    """Mux one access unit, its pts counted from ``base``."""
    packet = av.Packet(frame.data)
    packet.stream = container.streams.video[0]
    packet.time_base = TIME_BASE
    packet.pts = packet.dts = frame.pts - base
    packet.is_keyframe = frame.keyframe
    container.mux(packet)
