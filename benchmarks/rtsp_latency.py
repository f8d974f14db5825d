"""RTSP glass-to-glass latency (camrelay -> mediamtx -> reader), beside WebRTC in the same run.

    python -m benchmarks.rtsp_latency --duration 30 --size 1280x720 --fps 30 --bitrate 2M

Starts a relay on loopback with the test pattern and its mediamtx, then reads
the stream at the same time with a PyAV RTSP reader over TCP, one over UDP,
and one aiortc WebRTC viewer; each decodes every frame and reads the pixel
clock (shared/spec/test-pattern.md). The first second of each reader is
dropped: FFmpeg's RTSP demuxer hands over the frames it buffered while
probing the stream in a burst.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import aiohttp
import av

from benchmarks.options import add_stream_options
from benchmarks.peers import percentile
from benchmarks.ports import free_port, free_rtp_pair
from relay.camera import pixelclock
from relay.webrtc.borrowed import restrict_host_addresses
from relay.webrtc.whepclient import WhepViewer, luma

SETTLE = 1.0  # seconds of each reader's output that are not counted
# Lowest-latency options for FFmpeg's RTSP client: no probing delay, no reorder queue.
READER_OPTIONS = {"fflags": "nobuffer", "flags": "low_delay", "max_delay": "0", "reorder_queue_size": "0"}


def rtsp_env(rtsp_port: int, state_dir: str) -> dict[str, str]:
    """A relay's settings for its mediamtx on loopback at ``rtsp_port`` (RTP, RTCP and API on free ports)."""
    rtp = free_rtp_pair()
    return {
        "CAMRELAY_RTSP_HOST": "127.0.0.1",
        "CAMRELAY_RTSP_PORT": str(rtsp_port),
        "CAMRELAY_RTSP_RTP_PORT": str(rtp),
        "CAMRELAY_RTSP_RTCP_PORT": str(rtp + 1),
        "CAMRELAY_RTSP_API_PORT": str(free_port()),
        "CAMRELAY_STATE_DIR": state_dir,
    }


def start_relay(
    size: str,
    fps: float,
    bitrate: str,
    port: int,
    rtsp_port: int,
    state_dir: str,
    env: dict[str, str] | None = None,
    relay_dir: str = "",
) -> subprocess.Popen:
    """``env``: more ``CAMRELAY_*`` settings for it; ``relay_dir``: run the relay of that checkout."""
    env = {**os.environ, **rtsp_env(rtsp_port, state_dir), **(env or {})}
    if relay_dir:
        env["PYTHONPATH"] = relay_dir
    cmd = [
        sys.executable, "-m", "relay", "serve", "--source", f"cam0=test:{size}@{fps:g}", "--bitrate", bitrate,
        "--http-host", "127.0.0.1", "--http-port", str(port), "--ice-address", "127.0.0.1",
        "--encoder", "libx264", "--log-level", "warning", "--auth", "none",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=relay_dir or None)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rtsp", timeout=2) as r:
                info = json.load(r)
                if info["streams"]["cam0"]["published"] > 30:
                    return proc
        except (OSError, KeyError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("relay with RTSP did not start")


def rtsp_reader(url: str, transport: str, duration: float, out: list[float]) -> None:
    with av.open(url, options={"rtsp_transport": transport, **READER_OPTIONS}, timeout=10) as container:
        start = time.monotonic()
        for frame in container.decode(video=0):
            now = time.monotonic()
            if now - start > SETTLE + duration:
                break
            t = pixelclock.read(luma(frame, frame.width // pixelclock.CELLS))
            if t is not None and now - start > SETTLE:
                out.append(time.time() * 1000 - t)


async def webrtc_reader(url: str, duration: float, out: list[float]) -> None:
    async with aiohttp.ClientSession() as http:
        viewer = WhepViewer(url, http)
        try:
            await viewer.connect()
            await viewer.recv(timeout=20)
            start = time.monotonic()
            while time.monotonic() - start < SETTLE + duration:
                (s,) = await viewer.read_frames(1)
                if s.latency_ms is not None and time.monotonic() - start > SETTLE:
                    out.append(s.latency_ms)
        finally:
            await viewer.close()


def summary(samples: list[float]) -> dict:
    return {"samples": len(samples), **{f"p{p}": percentile(samples, p) for p in (50, 95, 99)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=30.0)
    add_stream_options(ap)
    args = ap.parse_args(argv)
    import tempfile

    port, rtsp_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as state:
        relay = start_relay(args.size, args.fps, args.bitrate, port, rtsp_port, state)
        try:
            results: dict[str, list[float]] = {"rtsp_tcp": [], "rtsp_udp": [], "webrtc": []}
            url = f"rtsp://127.0.0.1:{rtsp_port}/cam0"
            threads = [
                threading.Thread(target=rtsp_reader, args=(url, t, args.duration, results[f"rtsp_{t}"]))
                for t in ("tcp", "udp")
            ]
            for t in threads:
                t.start()
            restrict_host_addresses(["127.0.0.1"])
            asyncio.run(webrtc_reader(f"http://127.0.0.1:{port}/whep/cam0", args.duration, results["webrtc"]))
            for t in threads:
                t.join(args.duration + 30)
        finally:
            relay.terminate()
            relay.wait(15)
    report = {name: summary(samples) for name, samples in results.items()}
    report["frame_interval_ms"] = 1000 / args.fps
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
