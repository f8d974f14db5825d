"""What camrelay's view page costs Chromium per second at 60 fps, with its own latency readout and without.

    PYTHONPATH=. .venv/bin/python docs/results/issue16-sixty/page_cost.py --fps 60 --seconds 10 --rounds 2

Starts one camrelay (test pattern 1280x720, 2 Mbit/s, as ``benchmarks.browser_latency`` does) and headless
Chromium, then opens ``/view/cam0`` alternately as it is and with the page's latency readout switched off
(``camrelayPlayer._readLatency`` emptied), and with the benchmark's own reading of every frame
(``benchmarks.chromium.PRESENTED``) or with a bare ``requestVideoFrameCallback`` counter. Per page: CPU seconds a
second of Chromium's processes (all of them, and the renderer), of the relay's camera worker, and the frames
presented a second, over ``--seconds`` s after 3 s of play.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time

import psutil

from benchmarks.chromium import PRESENTED, as_script, chromium
from benchmarks.ports import free_port
from benchmarks.rtsp_latency import start_relay

COUNT = """() => { window.presented = []; const v = () => document.getElementById("video");
  const f = () => { window.presented.push([Date.now(), 1]); v().requestVideoFrameCallback(f); };
  const go = () => v().requestVideoFrameCallback(f);
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", go); else go(); }"""
NO_READOUT = """() => { const off = () => { if (window.camrelayPlayer) window.camrelayPlayer._readLatency = () => {};
  else setTimeout(off, 5); }; off(); }"""


def cpu(procs) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


async def page_run(browser, url, readout: bool, presented: bool, seconds: float, worker) -> dict:
    page = await browser.new_page(viewport={"width": 1600, "height": 1000})
    await page.add_init_script(as_script(PRESENTED if presented else COUNT))
    if not readout:
        await page.add_init_script(as_script(NO_READOUT))
    await page.goto(url)
    await page.wait_for_function("() => window.presented.length > 30", timeout=30_000)
    await asyncio.sleep(3)
    me = psutil.Process()
    chrome = [p for p in me.children(recursive=True) if "chrom" in p.name()]
    renderer = [p for p in chrome if "--type=renderer" in " ".join(p.cmdline())]
    n0 = await page.evaluate("() => window.presented.length")
    k0 = await page.evaluate("() => window.camrelayPlayer.latencyReadings")
    c0, r0, w0, t0 = cpu(chrome), cpu(renderer), cpu([worker]), time.monotonic()
    await asyncio.sleep(seconds)
    n1 = await page.evaluate("() => window.presented.length")
    k1 = await page.evaluate("() => window.camrelayPlayer.latencyReadings")
    reader = await page.evaluate("() => [window.camrelayPlayer.clockReader, window.camrelayPlayer.latencyMs]")
    c1, r1, w1, t1 = cpu(chrome), cpu(renderer), cpu([worker]), time.monotonic()
    await page.close()
    span = t1 - t0
    return {
        "readout": readout, "benchmark_reads": presented, "presented_fps": round((n1 - n0) / span, 1),
        "page_readings_a_second": round((k1 - k0) / span, 1), "page_reader": reader[0], "page_latency_ms": reader[1],
        "chromium_cpu_pct": round(100 * (c1 - c0) / span, 1), "renderer_cpu_pct": round(100 * (r1 - r0) / span, 1),
        "worker_cpu_pct": round(100 * (w1 - w0) / span, 1), "load": psutil.getloadavg()[0],
    }  # fmt: skip


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fps", type=float, default=60)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as state:
        relay = start_relay("1280x720", args.fps, "2M", port, free_port(), state)
        try:
            worker = next(p for p in psutil.Process(relay.pid).children(recursive=True)
                          if "relay.camera.worker" in " ".join(p.cmdline()))  # fmt: skip
            async with chromium() as browser:
                for _ in range(args.rounds):
                    for readout, presented in ((True, True), (False, True), (True, False), (False, False)):
                        url = f"http://127.0.0.1:{port}/view/cam0"
                        print(json.dumps(await page_run(browser, url, readout, presented, args.seconds, worker)))
        finally:
            relay.terminate()
            relay.wait(10)


if __name__ == "__main__":
    asyncio.run(main())
