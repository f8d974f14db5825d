"""A test camera: the pixel-clock pattern, encoded as an IP camera would, published to an RTSP server.

    python -m tests.rtspcam rtsp://127.0.0.1:8554/cam --size 640x360 --fps 30 --profile high --gop 150

Runs until its stdin closes (the test that started it ends). Each frame carries its capture time in the
pixel clock (shared/spec/test-pattern.md), drawn just before it is encoded. The encoder writes its parameter
sets as a global header, so they reach the server in the SDP only (mediamtx then repeats them before
IDRs, as it does for every H.264 publisher). A line ``size WxH`` on stdin switches to another size at the
next frame, with new parameter sets in-band: a camera whose resolution is changed while it streams.
"""

from __future__ import annotations

import argparse
import fractions
import io
import sys
import threading
import time

import av

from relay.camera.testpattern import PatternRenderer
from relay.source import parse_size


def encoder(codec: str, size: tuple[int, int], fps: int, args, global_header: bool) -> av.VideoCodecContext:
    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height = size
    ctx.pix_fmt = "yuv420p"
    ctx.time_base = fractions.Fraction(1, fps)
    ctx.framerate = fractions.Fraction(fps)
    ctx.bit_rate = 800_000
    if global_header:
        ctx.flags |= av.codec.context.Flags.global_header
    if codec == "libx264":
        # "fast", not "ultrafast": ultrafast turns off what makes x264 write High (8x8 transforms, CABAC).
        ctx.options = {
            "preset": "fast" if args.profile == "high" else "veryfast",
            "profile": args.profile,
            "tune": "zerolatency" if not args.bframes else "film",
            "x264-params": f"keyint={args.gop}:min-keyint={args.gop}:scenecut=0:bframes={args.bframes}"
            + ":rc-lookahead=0:threads=1",
        }
    else:
        ctx.options = {"preset": "ultrafast", "x265-params": f"keyint={args.gop}:bframes={args.bframes}:log-level=0"}
    ctx.open()
    return ctx


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--size", default="640x360")
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--profile", default="high", choices=("baseline", "main", "high"))
    p.add_argument("--gop", type=int, default=150, help="frames between IDRs")
    p.add_argument("--bframes", type=int, default=0)
    p.add_argument("--codec", default="libx264", choices=("libx264", "libx265"))
    args = p.parse_args(argv)
    size = parse_size(args.size)
    out = av.open(args.url, "w", format="rtsp", options={"rtsp_transport": "tcp"}, timeout=10)
    ctx = encoder(args.codec, size, args.fps, args, global_header=True)
    # The muxer's stream from a template of the encoder's own headers (relay.mux explains why not add_stream).
    with av.open(io.BytesIO(bytes(ctx.extradata)), format="h264" if args.codec == "libx264" else "hevc") as t:
        stream = out.add_stream_from_template(t.streams.video[0])
    stream.time_base = fractions.Fraction(1, 90_000)
    stream.codec_context.extradata = ctx.extradata
    stream.codec_context.width, stream.codec_context.height = size
    out.start_encoding()
    renderer = PatternRenderer(*size)
    done = threading.Event()
    resize: list[tuple[int, int]] = []

    def commands() -> None:
        for line in sys.stdin:
            if line.startswith("size "):
                resize.append(parse_size(line.split()[1]))
        done.set()

    threading.Thread(target=commands, daemon=True).start()
    start = time.monotonic()
    i = 0
    while not done.is_set():
        if resize:  # the camera is reconfigured: new size, new SPS/PPS in-band
            for packet in ctx.encode(None):
                _mux(out, stream, packet, args.fps)
            size = resize.pop()
            ctx = encoder(args.codec, size, args.fps, args, global_header=False)
            renderer = PatternRenderer(*size)
        frame = av.VideoFrame.from_ndarray(renderer.planes(int(time.time() * 1000)), format="yuv420p")
        frame.pts, frame.time_base = i, fractions.Fraction(1, args.fps)
        for packet in ctx.encode(frame):
            _mux(out, stream, packet, args.fps)
        i += 1
        delay = start + i / args.fps - time.monotonic()
        if delay > 0:
            done.wait(delay)
    out.close()
    return 0


def _mux(out, stream, packet, fps: int) -> None:
    packet.stream = stream
    packet.pts = packet.pts * 90_000 // fps
    packet.dts = packet.dts * 90_000 // fps
    packet.time_base = stream.time_base
    out.mux(packet)


if __name__ == "__main__":
    sys.exit(main())
