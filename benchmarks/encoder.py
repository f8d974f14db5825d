"""What the shared encoder costs a frame, and how big its frames are, with camrelay's settings and variants.

    python -m benchmarks.encoder --size 1280x720 --fps 30 --frames 120 --repeats 3

Encodes ``--frames`` pictures of the test pattern (``relay.camera.testpattern``, moving, with fine detail) with
``relay.camera.encode.H264Encoder`` as the worker opens it (libx264 ultrafast, zerolatency: no B-frames, no
lookahead, sliced threads; a keyframe a second; a VBV buffer of half a second), then with one x264 setting
changed at a time: ``threads=1`` and ``threads=2`` (how many slices a frame is cut into and encoded at once),
and a VBV buffer of one frame (keyframes no bigger than a frame's share of the bit rate). Per variant: the time
``encode()`` takes per picture (p50, p95, max, ms; in this process, one picture at a time, as the worker's
encode thread calls it) and the mean size of keyframes and of the other frames. zerolatency already holds no
frame: every ``encode()`` returns the picture it was given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from benchmarks.options import add_stream_options
from benchmarks.peers import percentile
from relay.config import parse_bitrate
from relay.source import parse_size

WARMUP = 10  # pictures not timed: the encoder opening, its first keyframe


def variants(kbps: int, fps: float) -> dict[str, str]:
    """x264-params added to camrelay's own (later ones win), by name."""
    return {
        "camrelay (auto slice threads, VBV 0.5 s)": "",
        "threads=1": "threads=1",
        "threads=2": "threads=2",
        "VBV buffer of one frame": f"vbv-bufsize={max(1, round(kbps / fps))}",
    }


def measure(width: int, height: int, fps: float, bitrate: int, frames: int, repeats: int, extra: str) -> dict:
    import av

    from relay.camera.encode import H264Encoder
    from relay.camera.testpattern import PatternRenderer
    from relay.ipc import EncoderSettings

    renderer = PatternRenderer(width, height)
    pictures = [
        av.VideoFrame.from_ndarray(renderer.planes(round(i * 1000 / fps)), format="yuv420p") for i in range(frames)
    ]

    class Variant(H264Encoder):
        def libx264_options(self, w: int, h: int) -> dict[str, str]:
            options = super().libx264_options(w, h)
            if extra:  # after camrelay's own: x264 takes the last of a repeated key
                options["x264-params"] += f":{extra}"
            return options

    encoder = Variant(EncoderSettings(bitrate, fps, 1.0, "libx264"))
    times, keyframes, others = [], [], []
    for repeat in range(repeats):
        for i, picture in enumerate(pictures):
            started = time.perf_counter()
            units = encoder.encode(picture, (repeat * frames + i) * round(90_000 / fps), False)
            if repeat or i >= WARMUP:
                times.append((time.perf_counter() - started) * 1000)
            for data, key, _ in units:
                (keyframes if key else others).append(len(data))
    return {
        "encode_ms": {f"p{p}": round(percentile(times, p), 2) for p in (50, 95)} | {"max": round(max(times), 1)},
        "keyframe_kB": round(statistics.mean(keyframes) / 1000, 1),
        "other_kB": round(statistics.mean(others) / 1000, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=3)
    add_stream_options(ap)
    args = ap.parse_args(argv)
    width, height = parse_size(args.size)
    bitrate = parse_bitrate(args.bitrate)
    for name, extra in variants(bitrate // 1000, args.fps).items():
        result = measure(width, height, args.fps, bitrate, args.frames, args.repeats, extra)
        print(json.dumps({"variant": name, "x264_params_added": extra, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
