"""What one RTSP camera costs camrelay: passed through, beside transcoded, in the same run.

    python -m benchmarks.passthrough --size 1920x1080 --fps 30 --bitrate 4M --duration 30

A clip of the test pattern is encoded once (libx264 High, no B-frames, a
keyframe every 2 s) and looped into a local mediamtx by ``ffmpeg -c copy``,
so the camera costs almost nothing. camrelay (``camrelay serve``) relays it
with no viewer, first with ``--mode passthrough`` then ``--mode transcode``;
for each, over ``--duration`` seconds after it settles: CPU of the camera's
worker and of the relay process (% of one core), and the worker's memory
(RSS, and PSS: its share of pages shared with other processes, such as the
FFmpeg libraries every worker maps). ``--record`` turns recording on (segments
and a snapshot a second, as ``[record] enabled = true`` does), and the worker's
count of pictures it decoded for JPEGs is reported beside the frames relayed.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import av
import psutil

from benchmarks.options import add_stream_options
from benchmarks.ports import free_port, free_rtp_pair
from relay.camera.testpattern import PatternRenderer
from relay.config import parse_bitrate
from relay.rtsp import Mediamtx, MediamtxSettings, find_mediamtx
from relay.source import parse_size

CLIP_SECONDS = 10
SETTLE = 5.0  # seconds after the first frame before measuring: the worker's imports and first GOP done


def encode_clip(path: Path, width: int, height: int, fps: float, bitrate: int) -> None:
    renderer = PatternRenderer(width, height)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = bitrate
        kbps = bitrate // 1000
        stream.codec_context.options = {
            "preset": "veryfast",
            "profile": "high",
            "x264-params": f"keyint={round(2 * fps)}:bframes=0:vbv-maxrate={kbps}:vbv-bufsize={kbps}",
        }
        for i in range(round(CLIP_SECONDS * fps)):
            frame = av.VideoFrame.from_ndarray(renderer.planes(i), format="yuv420p")
            frame.pts, frame.time_base = i, fractions.Fraction(1, round(fps))
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def worker_of(relay: psutil.Process) -> psutil.Process:
    for child in relay.children(recursive=True):
        if "relay.camera.worker" in " ".join(child.cmdline()):
            return child
    raise RuntimeError("no camera worker")


def api(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/streams", timeout=5) as r:
        return json.load(r)["streams"][0]


def measure(url: str, mode: str, duration: float, state_dir: str, record: bool = False) -> dict:
    port = free_port()
    cmd = [
        sys.executable, "-m", "relay", "serve", "--no-rtsp", "--auth", "none", "--mode", mode,
        "--http-host", "127.0.0.1", "--http-port", str(port), "--ice-address", "127.0.0.1",
        "--encoder", "libx264", "--log-level", "warning",
    ]  # fmt: skip
    env = dict(os.environ, CAMRELAY_STREAMS=f"cam0={url}", CAMRELAY_STATE_DIR=state_dir)
    if record:
        env.update(CAMRELAY_RECORD_ENABLED="true", CAMRELAY_RECORD_ROOT=tempfile.mkdtemp(dir=state_dir))
    proc = subprocess.Popen(cmd, env=env)
    try:
        relay = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        while True:
            try:
                if api(port)["frames_encoded"] > 0:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{mode}: no frame within a minute")
            time.sleep(0.5)
        time.sleep(SETTLE)
        worker = worker_of(relay)
        before = api(port)
        t0 = time.monotonic()
        w0, r0 = worker.cpu_times(), relay.cpu_times()
        time.sleep(duration)
        w1, r1 = worker.cpu_times(), relay.cpu_times()
        elapsed = time.monotonic() - t0
        after = api(port)
        memory = worker.memory_full_info()
        return {
            "mode": after["mode"],
            "record": record,
            "mode_reason": after["mode_reason"],
            "worker_cpu_pct": round(100 * (w1.user + w1.system - w0.user - w0.system) / elapsed, 2),
            "relay_cpu_pct": round(100 * (r1.user + r1.system - r0.user - r0.system) / elapsed, 2),
            "worker_rss_mib": round(memory.rss / 2**20, 1),
            "worker_pss_mib": round(memory.pss / 2**20, 1),
            "worker_uss_mib": round(memory.uss / 2**20, 1),
            "worker_threads": worker.num_threads(),
            "encoders_running": after["encoders_running"],
            "fps": round((after["frames_encoded"] - before["frames_encoded"]) / elapsed, 1),
            "decoded_fps": round((after["frames_decoded"] - before["frames_decoded"]) / elapsed, 2),
            "mbps": round(after["bitrate_bps"] / 1e6, 2),
        }
    finally:
        proc.terminate()
        proc.wait(20)


async def serve(args) -> list[dict]:
    width, height = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="camrelay-pass-") as tmp:
        clip = Path(tmp) / "clip.mp4"
        encode_clip(clip, width, height, args.fps, parse_bitrate(args.bitrate))
        rtp = free_rtp_pair()
        mtx = Mediamtx(
            find_mediamtx(""),
            MediamtxSettings("127.0.0.1", free_port(), rtp, rtp + 1, log_level="warning"),
            [],
            Path(tmp),
        )
        await mtx.start()
        url = f"{mtx.publisher_base}/cam"
        camera = subprocess.Popen(
            ["ffmpeg", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(clip), "-c", "copy",
             "-f", "rtsp", "-rtsp_transport", "tcp", url],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await asyncio.sleep(2)
            results = []
            for mode in args.modes.split(","):
                results.append(await asyncio.to_thread(measure, url, mode, args.duration, tmp, args.record))
                print(json.dumps(results[-1]), flush=True)
            return results
        finally:
            camera.terminate()
            camera.wait(10)
            await mtx.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stream_options(ap, size="1920x1080")
    ap.set_defaults(bitrate="4M")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds measured per mode (default 30)")
    ap.add_argument("--modes", default="passthrough,transcode", help="modes to measure, in order")
    ap.add_argument("--record", action="store_true", help="with recording on (segments, a snapshot a second)")
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    args = ap.parse_args()
    results = asyncio.run(serve(args))
    if args.out:
        args.out.write_text(
            json.dumps({"size": args.size, "fps": args.fps, "bitrate": args.bitrate, "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
