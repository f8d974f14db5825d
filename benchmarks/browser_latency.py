"""Glass-to-glass latency as a browser viewer sees it: real Chromium, the real page.

    python -m benchmarks.browser_latency --duration 30 --size 1280x720 --fps 30 --bitrate 2M

Starts a relay on loopback with the test pattern, opens ``/view/cam0`` in
headless Chromium and collects every latency reading the page makes from the
pixel clock (capture time painted into the frame, read from the video element
on a canvas at each presented frame, against the browser's clock). Also
reports the page's decoded fps and jitter-buffer delay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from benchmarks.chromium import chromium
from benchmarks.load import start_system
from benchmarks.options import add_stream_options
from benchmarks.peers import percentile

COLLECT = """() => {
  const p = window.camrelayPlayer;
  window.__samples = [];
  p.handlers.onLatencySample = (ms) => window.__samples.push(ms);
}"""


async def measure(port: int, duration: float) -> dict:
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 1600, "height": 1000})
        await page.goto(f"http://127.0.0.1:{port}/view/cam0")
        await page.wait_for_function(
            "() => window.camrelayPlayer && window.camrelayPlayer.latencyReadings > 30", timeout=30_000
        )
        await page.evaluate(COLLECT)
        start_frames = await page.evaluate("() => window.camrelayPlayer.stats.framesDecoded")
        await asyncio.sleep(duration)
        samples = await page.evaluate("() => window.__samples")
        stats = await page.evaluate("() => window.camrelayPlayer.stats")
        await page.close()
    return {
        "samples": len(samples),
        "latency_ms": {p: percentile(samples, p) for p in (50, 95, 99)},
        "max_ms": max(samples) if samples else None,
        "fps_decoded": (stats["framesDecoded"] - start_frames) / duration,
        "jitter_buffer_ms": stats["jitterBufferMs"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=30.0)
    add_stream_options(ap)
    args = ap.parse_args(argv)
    system = start_system("camrelay", args.size, args.fps, args.bitrate)
    try:
        result = asyncio.run(measure(system.port, args.duration))
    finally:
        system.close()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
