"""When each access unit of an RTSP camera is handed on: camrelay's RTSP client beside FFmpeg's demuxer.

    python -m benchmarks.rtspin --size 1920x1080 --fps 30 --bitrate 4M --frames 300

One test camera (``benchmarks/rtspcams.py``: the pixel-clock pattern, libx264,
published into a local mediamtx) read at the same time by ``RtspSource``
(relay/camera/rtspsource.py) and by PyAV's RTSP demuxer with camrelay's options
(``RTSP_OPTIONS``), each on its own thread. Units are matched by their last
bytes (the same slice data from both); for each, how much later FFmpeg handed
it on than camrelay's client did. Both read the same packets off the same
server at the same moment, so the machine's load shows in both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

from benchmarks.rtspcams import CameraServer, Encoding, LiveCamera
from relay.camera.capture import RTSP_OPTIONS, PacketSource
from relay.camera.rtspsource import RtspSource
from relay.source import parse_size

KEY_BYTES = 64  # a unit's last bytes: slice data, the same whichever reader delivered it


def read(source, frames: int, seen: dict[bytes, float]) -> None:
    source.open()
    try:
        for _ in range(frames):
            data = bytes(source.read_packet())
            seen.setdefault(data[-KEY_BYTES:], time.monotonic())
    finally:
        source.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--bitrate", default="4M")
    ap.add_argument("--frames", type=int, default=300)
    args = ap.parse_args(argv)
    width, height = parse_size(args.size)
    with CameraServer() as server:
        camera = LiveCamera(server, "cam", width, height, args.fps, Encoding(bitrate=args.bitrate))
        camera.start()
        try:
            ours: dict[bytes, float] = {}
            ffmpeg: dict[bytes, float] = {}
            sources = [
                (RtspSource(camera.url, width, height, args.fps, fallback=lambda: None), ours),  # type: ignore[arg-type]
                (PacketSource(camera.url, width, height, args.fps, options=RTSP_OPTIONS), ffmpeg),
            ]
            threads = [threading.Thread(target=read, args=(s, args.frames, seen)) for s, seen in sources]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            camera.stop()
    held = sorted((ffmpeg[k] - ours[k]) * 1000 for k in ours.keys() & ffmpeg.keys())
    result = {
        "units_matched": len(held),
        "ffmpeg_later_ms": {
            "p5": round(held[len(held) // 20], 1),
            "p50": round(statistics.median(held), 1),
            "p95": round(held[len(held) * 19 // 20], 1),
        },
        "frame_time_ms": round(1000 / args.fps, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
