"""Milliseconds a 60 fps test-pattern frame spends in each stage of its camera worker (issue 16).

    cd CHECKOUT && PYTHONPATH=. .venv/bin/python PATH/TO/stages.py --size 1280x720 --fps 60 --frames 300

Runs, in one thread of this process and with the classes of the checkout it is run from (its ``relay``), what
a test-pattern camera's worker does to each frame: the capture thread's draw and JPEG encode
(``PatternRenderer.jpeg``; ``planes`` alone for the draw), the encode thread's JPEG decode (``JpegDecoder``)
and H.264 encode (``H264Encoder``, the stream's settings). Per stage: the median and p95 of the wall time and
the median CPU time of the process (x264's slice threads included) per frame, over ``--frames`` frames, and the
JPEG's mean size. Frames are paced at ``--fps`` as the camera paces them, so caches and x264 see a live rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from relay.camera.encode import H264Encoder, JpegDecoder
from relay.camera.testpattern import PatternRenderer
from relay.ipc import EncoderSettings

T0 = 1_700_000_000_000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--fps", type=float, default=60)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--bitrate", type=int, default=2_000_000)
    args = ap.parse_args()
    w, h = map(int, args.size.split("x"))
    draw_only, renderer = PatternRenderer(w, h), PatternRenderer(w, h)
    decoder = JpegDecoder()
    encoder = H264Encoder(EncoderSettings(args.bitrate, args.fps, 1.0, "libx264"))
    times: dict[str, list[tuple[float, float]]] = {"draw": [], "draw + JPEG": [], "decode": [], "x264": []}
    sizes = []

    def timed(stage: str, fn, *a):
        c, t = time.process_time(), time.perf_counter()
        out = fn(*a)
        times[stage].append(((time.perf_counter() - t) * 1000, (time.process_time() - c) * 1000))
        return out

    start = time.perf_counter()
    for i in range(args.frames):
        delay = start + i / args.fps - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t_ms = T0 + round(i * 1000 / args.fps)
        timed("draw", draw_only.planes, t_ms)
        jpeg = timed("draw + JPEG", renderer.jpeg, t_ms)
        sizes.append(len(jpeg))
        picture = timed("decode", decoder.decode, jpeg)
        timed("x264", encoder.encode, picture, i * 1500, False)
    out = {"size": args.size, "fps": args.fps, "frames": args.frames, "jpeg_bytes": round(statistics.mean(sizes))}
    for stage, ts in times.items():
        walls = sorted(t for t, _ in ts[10:])  # the first frames open the codecs
        cpus = [c for _, c in ts[10:]]
        out[stage] = {
            "wall_p50_ms": round(statistics.median(walls), 2),
            "wall_p95_ms": round(walls[int(0.95 * (len(walls) - 1))], 2),
            "cpu_p50_ms": round(statistics.median(cpus), 2),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
