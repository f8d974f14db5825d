"""Glass-to-glass latency in real Chromium: camrelay's viewer page beside mediamtx's own, from the same camera.

    python -m benchmarks.browser_latency --duration 20 --repeats 3 --size 1280x720 --fps 30 --bitrate 2M
    python -m benchmarks.browser_latency --systems camrelay --playout-delays off,0:0,0:100,0:500 --repeats 3
    python -m benchmarks.browser_latency --systems camrelay --relay-dir /tmp/camrelay-main   # another checkout's

Each repeat, for each ``--playout-delays`` value (camrelay's ``[webrtc] playout_delay``; "default": as configured),
starts camrelay with the test pattern and RTSP on (its private mediamtx), and a second mediamtx that pulls
camrelay's RTSP and serves it over WebRTC (``benchmarks/baselines/mediamtx_whep.py``): the same camera, the same
encoding, two servers. Then, one page at a time in headless Chromium (software decode), each of ``--systems``:
camrelay's viewer page (``/view/cam0``, ``static/whep.js``) and mediamtx's own (``/cam0/``, its ``reader.js``).
After ``--warmup`` seconds of playing, for ``--duration`` seconds it reads the pixel clock of every frame the page
presents (``requestVideoFrameCallback``, a canvas; ``benchmarks.chromium.PRESENTED``; with ``--clock-reader frame``
from the decoded frame, ``PRESENTED_FRAME``: the canvas costs Chromium's renderer about 4 ms a frame in software,
which the page measured then does not get) against the browser's clock, and the video receiver's ``getStats()``
(every peer connection the page made): frames received, decoded and dropped (``framesDropped``: before decoding, or
missed their display deadline), and the jitter buffer's mean delay. Both pages run the same measuring script;
mediamtx's is given whep.js's pixel-clock reader in a scope of its own.

Per page it reports latency p50/p95/p99/max (ms), the frames presented a second, framesDropped (and as a share
of the frames received), the jitter buffer delay, and Chromium's decode time and processing delay (first packet
to decoded picture) a frame; then the median of the repeats per system and setting.
Results go to stdout and, with ``--out``, to ``<out>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

from benchmarks.baselines import mediamtx_whep
from benchmarks.chromium import PRESENTED, PRESENTED_FRAME, as_script, chromium
from benchmarks.options import add_stream_options, run_facts
from benchmarks.peers import percentile

SYSTEMS = ("camrelay", "mediamtx")
CLOCK_READERS = {"canvas": PRESENTED, "frame": PRESENTED_FRAME}  # how the benchmark reads each frame's clock
WHEP_JS = Path(__file__).resolve().parent.parent / "static" / "whep.js"
PLAY_TIMEOUT_MS = 30_000
VIEWPORT = {"width": 1600, "height": 1000}  # the 720p picture drawn at its size on either page

# Every RTCPeerConnection the page makes, kept in window.__pcs for getStats (either page, before its scripts run).
KEEP_PEER_CONNECTIONS = """() => {
  const Native = window.RTCPeerConnection;
  window.__pcs = [];
  const Kept = function (...args) { const pc = new Native(...args); window.__pcs.push(pc); return pc; };
  Kept.prototype = Native.prototype;
  Object.setPrototypeOf(Kept, Native);
  window.RTCPeerConnection = Kept;
}"""

# The video receivers' counters, summed over the page's open peer connections.
VIDEO_STATS = """async () => {
  const out = { framesReceived: 0, framesDecoded: 0, framesDropped: 0, jitterBufferDelay: 0, emitted: 0,
                totalDecodeTime: 0, totalProcessingDelay: 0 };
  for (const pc of window.__pcs) {
    if (pc.connectionState === "closed") continue;
    (await pc.getStats()).forEach((r) => {
      if (r.type !== "inbound-rtp" || r.kind !== "video") return;
      out.framesReceived += r.framesReceived || 0;
      out.framesDecoded += r.framesDecoded || 0;
      out.framesDropped += r.framesDropped || 0;
      out.jitterBufferDelay += r.jitterBufferDelay || 0;
      out.emitted += r.jitterBufferEmittedCount || 0;
      out.totalDecodeTime += r.totalDecodeTime || 0;
      out.totalProcessingDelay += r.totalProcessingDelay || 0;
    });
  }
  return out;
}"""


def page_url(system: str, ref: mediamtx_whep.Reference) -> str:
    if system == "camrelay":
        return f"http://127.0.0.1:{ref.camrelay_port}/view/cam0"
    return ref.whep_url.removesuffix("whep")  # mediamtx's own page for the path, with its reader.js


def _readable(since: int) -> str:
    """A JS expression: [Date.now(), clock] of the frames presented from index ``since`` on whose clock reads."""
    return f"window.presented.slice({since}).filter((p) => p[1] !== null)"


async def measure_page(browser, system: str, url: str, warmup: float, duration: float, reader: str = "canvas") -> dict:
    """One page of ``system`` at ``url``: played ``warmup`` s, then measured for ``duration`` s, each frame's clock
    read by ``reader`` (of ``CLOCK_READERS``)."""
    page = await browser.new_page(viewport=VIEWPORT)
    try:
        await page.add_init_script(as_script(KEEP_PEER_CONNECTIONS))
        if system != "camrelay":  # camrelay's page loads whep.js itself; mediamtx's gets its clock reader
            await page.add_init_script(f"(() => {{\n{WHEP_JS.read_text()}\n}})();")
        await page.add_init_script(as_script(CLOCK_READERS[reader]))
        await page.goto(url)
        await page.wait_for_function(f"() => {_readable(0)}.length >= 30", timeout=PLAY_TIMEOUT_MS)
        await asyncio.sleep(warmup)
        start = await page.evaluate("() => window.presented.length")
        before = await page.evaluate(VIDEO_STATS)
        await asyncio.sleep(duration)
        after = await page.evaluate(VIDEO_STATS)
        presented = await page.evaluate(f"() => {_readable(start)}")
    finally:
        await page.close()
    latencies = [at - clock for at, clock in presented]
    delta = {k: after[k] - before[k] for k in before}
    return {
        "system": system,
        "samples": len(latencies),
        "latency_ms": {f"p{p}": _round(percentile(latencies, p)) for p in (50, 95, 99)},
        "max_ms": max(latencies) if latencies else None,
        "presented_fps": round(len({clock for _, clock in presented}) / duration, 1),
        "frames_received": delta["framesReceived"],
        "frames_dropped": delta["framesDropped"],
        "dropped_pct": _round(100 * delta["framesDropped"] / delta["framesReceived"])
        if delta["framesReceived"]
        else None,
        "jitter_buffer_ms": _round(1000 * delta["jitterBufferDelay"] / delta["emitted"]) if delta["emitted"] else None,
        # Chromium's decoder's time a frame, and a frame's first packet's arrival to its decoded picture
        "decode_ms": _per_frame(delta["totalDecodeTime"], delta["framesDecoded"]),
        "processing_ms": _per_frame(delta["totalProcessingDelay"], delta["framesDecoded"]),
    }


def _per_frame(seconds: float, frames: int) -> float | None:
    return _round(1000 * seconds / frames) if frames else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def playout_env(setting: str) -> dict[str, str]:
    """camrelay's environment for a ``--playout-delays`` value: "default", "off", or "MIN:MAX" (ms)."""
    if setting == "default":
        return {}
    return {"CAMRELAY_WEBRTC_PLAYOUT_DELAY": setting.replace(":", ",")}


async def run(args: argparse.Namespace) -> list[dict]:
    runs = []
    async with chromium() as browser:
        for repeat in range(args.repeats):
            for setting in args.playout_delays:
                ref = await asyncio.to_thread(
                    mediamtx_whep.start, args.size, args.fps, args.bitrate, None, playout_env(setting), args.relay_dir
                )
                try:
                    for system in args.systems:
                        result = await measure_page(
                            browser, system, page_url(system, ref), args.warmup, args.duration, args.clock_reader
                        )
                        result.update(
                            repeat=repeat,
                            playout_delay=setting if system == "camrelay" else "",
                            clock_reader=args.clock_reader,
                        )
                        runs.append(result)
                        print(json.dumps(result), flush=True)
                finally:
                    await asyncio.to_thread(ref.close)
    return runs


def medians(runs: list[dict]) -> list[dict]:
    """Per system and setting, the median of each figure over the repeats."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["system"], r["playout_delay"]), []).append(r)
    out = []
    for (system, setting), rs in groups.items():

        def med(get, rs: list[dict] = rs) -> float | None:
            values = [v for v in map(get, rs) if v is not None]
            return _round(statistics.median(values)) if values else None

        out.append(
            {
                "system": system,
                "playout_delay": setting,
                "repeats": len(rs),
                "p50_ms": med(lambda r: r["latency_ms"]["p50"]),
                "p95_ms": med(lambda r: r["latency_ms"]["p95"]),
                "p99_ms": med(lambda r: r["latency_ms"]["p99"]),
                "presented_fps": med(lambda r: r["presented_fps"]),
                "frames_dropped": med(lambda r: r["frames_dropped"]),
                "dropped_pct": med(lambda r: r["dropped_pct"]),
                "jitter_buffer_ms": med(lambda r: r["jitter_buffer_ms"]),
                "decode_ms": med(lambda r: r["decode_ms"]),
                "processing_ms": med(lambda r: r["processing_ms"]),
                "runs_p95_ms": [r["latency_ms"]["p95"] for r in rs],
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds measured per page")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds a page plays before it is measured")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    ap.add_argument(
        "--playout-delays",
        default="default",
        help='camrelay\'s [webrtc] playout_delay per setting, comma-separated: "default", "off" or MIN:MAX in ms',
    )
    ap.add_argument("--relay-dir", default="", help="run camrelay (and its page) from this checkout")
    ap.add_argument(
        "--clock-reader",
        choices=sorted(CLOCK_READERS),
        default="canvas",
        help="how each presented frame's pixel clock is read: a canvas (as before), or the decoded frame",
    )
    ap.add_argument("--out", help="write <out>.json")
    add_stream_options(ap)
    args = ap.parse_args(argv)
    args.systems = args.systems.split(",")
    args.playout_delays = args.playout_delays.split(",")
    if unknown := set(args.systems) - set(SYSTEMS):
        ap.error(f"unknown systems: {', '.join(sorted(unknown))}")
    runs = asyncio.run(run(args))
    report = {**run_facts(" ".join(["python -m benchmarks.browser_latency", *(argv or sys.argv[1:])])), "runs": runs}
    report["medians"] = medians(runs)
    for line in report["medians"]:
        print(json.dumps(line))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
