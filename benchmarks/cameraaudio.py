"""What a camera's sound costs its worker: AAC decoded and encoded once to Opus, Opus passed through, or none.

    python -m benchmarks.cameraaudio --seconds 60 --rounds 3

Three test cameras (``benchmarks.rtspcams.LiveCamera``, 640x360 at 30 fps, H.264) publish into a private
mediamtx, one with AAC (64 kbit/s, 48 kHz mono), one with Opus (40 ms packets), one without sound. One
camrelay (in this process, no viewer) passes the three through, each read by camrelay's RTSP client; over the
same window (a shared machine's load falls on all three alike) it reads each worker's CPU time (psutil) and its
audio thread's (the API's ``audio.cpu_seconds``). Prints a Markdown table: per round and the median, % of a core.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.rtspcams import CameraServer, LiveCamera
from relay.config import Config, StreamConfig
from relay.service import Relay
from relay.source import parse_source_spec

ARMS = {"aac": "aac", "opus": "opus", "none": ""}  # stream name: the camera's sound
START_TIMEOUT = 30.0  # seconds for every stream to be passing its camera through and its sound live
SETTLE = 3.0  # seconds after that before measuring: the first keyframes, the decoders' start


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def measure(relay: Relay, seconds: float) -> dict[str, tuple[float, float]]:
    """Each stream's worker CPU and its audio thread's, % of a core, over ``seconds``."""
    streams = {name: relay.streams[name] for name in ARMS}
    before = {n: (cpu_seconds(s.pid), s.stats.audio_cpu_seconds) for n, s in streams.items()}
    began = time.monotonic()
    await asyncio.sleep(seconds)
    took = time.monotonic() - began
    after = {n: (cpu_seconds(s.pid), s.stats.audio_cpu_seconds) for n, s in streams.items()}
    return {n: (100 * (after[n][0] - before[n][0]) / took, 100 * (after[n][1] - before[n][1]) / took) for n in streams}


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as work, CameraServer(Path(work)) as server:
        cameras = [LiveCamera(server, name, sound=sound) for name, sound in ARMS.items()]
        for camera in cameras:
            camera.start()
        specs = [f"{c.url}#mode=passthrough" + ("" if c.sound else "&audio=off") for c in cameras]
        config = Config(
            streams=tuple(StreamConfig(c.path, parse_source_spec(s)) for c, s in zip(cameras, specs, strict=True))
        )
        relay = Relay(config)
        await relay.start()
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not all(
                s.stats.frames_passed_through and (s.stats.audio_frames_encoded or not s.audio_source)
                for s in relay.streams.values()
            ):
                if time.monotonic() > deadline:
                    raise SystemExit("the streams did not all start")
                await asyncio.sleep(0.5)
            await asyncio.sleep(SETTLE)
            rounds = [await measure(relay, args.seconds) for _ in range(args.rounds)]
        finally:
            await relay.close()
            for camera in cameras:
                camera.stop()
    print(f"{platform.machine()}, {psutil.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| camera's sound | worker CPU, % of a core (rounds) | median | its audio thread, median |")
    print("|---|---|---|---|")
    for name in ARMS:
        workers = [r[name][0] for r in rounds]
        audio = [r[name][1] for r in rounds]
        shown = ", ".join(f"{w:.2f}" for w in workers)
        print(f"| {name} | {shown} | {statistics.median(workers):.2f} | {statistics.median(audio):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="each round's window")
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
