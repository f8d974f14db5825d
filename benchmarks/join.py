"""Joining a stream mid-GOP: how soon a new viewer has a picture, and how soon it is back to live latency.

    python -m benchmarks.join --repeats 10 --gops 10,1 --size 1280x720 --fps 30 --bitrate 2M --out docs/results/join
    python -m benchmarks.join --browser --repeats 5 --gops 10 ...     # the same with Chromium pages

For each keyframe interval (``--gops``, seconds) and each join policy (``[video] join``: ``keyframe`` forces an
IDR for the joiner, ``cached_gop`` starts it from the relay's copy of the current GOP), it starts camrelay in a
process of its own with the test pattern, connects a viewer that stays (the watcher), then ``--repeats`` times
connects a joiner at points spread over the GOP (its phase: the time since the last keyframe the watcher
decoded) and measures, from the moment the joiner sends its WHEP offer:

- first frame: until it decodes its first frame;
- back to live: until its frames reach it within ``--within`` ms of when the same frames (by pixel clock) reached
  the watcher, and keep doing so for ``--run`` frames in a row (the first of those counts);
- first second: what it received in the second after its first packet, over the stream's bit rate (the burst).

aiortc viewers run in this process; with ``--browser`` the watcher and the joiner are Chromium pages of camrelay's
player (``/view/cam0``), timed by the frames they present (``requestVideoFrameCallback``). Medians and maxima of
the repeats go to stdout and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from benchmarks.load import start_system
from benchmarks.options import add_stream_options
from relay.camera import pixelclock
from relay.webrtc.whepclient import WhepViewer, luma

POLICIES = ("keyframe", "cached_gop")
GIVE_UP = 30.0  # seconds a joiner gets to be back to live before the repeat counts as never
SETTLE = 1.0  # seconds after a joiner leaves before the next repeat


@dataclass
class Join:
    phase_s: float  # time since the last keyframe when the joiner sent its offer
    first_frame_ms: float | None = None
    live_ms: float | None = None  # None: not back to live within GIVE_UP
    first_second_bytes: int = 0
    first_second_x_bitrate: float | None = None
    first_clock_age_ms: float | None = None  # how old its first picture was: its first latency


@dataclass
class Case:
    gop_s: float
    policy: str
    viewer: str  # "aiortc" or "chromium"
    joins: list[Join] = field(default_factory=list)
    keyframes_forced: int = 0
    bitrate_bps: float = 0.0

    def summary(self) -> dict:
        def stat(values: list[float | None]) -> dict:
            got = [v for v in values if v is not None]
            return {
                "median": round(statistics.median(got), 1) if got else None,
                "max": round(max(got), 1) if got else None,
                "missing": len(values) - len(got),
            }

        return {
            "gop_s": self.gop_s,
            "policy": self.policy,
            "viewer": self.viewer,
            "joins": len(self.joins),
            "first_frame_ms": stat([j.first_frame_ms for j in self.joins]),
            "live_ms": stat([j.live_ms for j in self.joins]),
            "first_second_x_bitrate": stat([j.first_second_x_bitrate for j in self.joins]),
            "keyframes_forced": self.keyframes_forced,
        }


def back_to_live(joiner: list[tuple[int, float]], watcher: dict[int, float], within_ms: float, run: int):
    """The time the joiner's frames (``(clock, received)`` in order) began reaching it within ``within_ms`` of the
    watcher's (``clock -> received``) for ``run`` frames in a row; None if they have not yet."""
    start, count = None, 0
    for clock, received in joiner:
        seen = watcher.get(clock)
        if seen is not None and (received - seen) * 1000 <= within_ms:
            if count == 0:
                start = received
            count += 1
            if count >= run:
                return start
        elif seen is not None:  # the watcher has it and the joiner was later: not live yet
            count = 0
    return None


def clock_of(frame) -> int | None:
    return pixelclock.read(luma(frame, frame.width // pixelclock.CELLS))


class Relay:
    """camrelay in a process of its own, with a keyframe every ``gop`` seconds and the join ``policy``."""

    def __init__(self, args, gop: float, policy: str) -> None:
        extra = ("--keyframe-interval", f"{gop:g}s")
        self.system = start_system(
            "camrelay", args.size, args.fps, args.bitrate, extra=extra, env={"CAMRELAY_VIDEO_JOIN": policy}
        )
        self.port = self.system.port

    @property
    def whep(self) -> str:
        return self.system.url

    def stream(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/streams", timeout=5) as r:
            return json.load(r)["streams"][0]

    async def bitrate(self) -> float:
        """The stream's bit rate as the relay measures it (over its telemetry's interval, once it has one)."""
        deadline = time.monotonic() + GIVE_UP
        while not (bps := self.stream()["bitrate_bps"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        return bps

    def close(self) -> None:
        self.system.close()


class AiortcWatcher:
    """The viewer that stays: when each frame (by pixel clock) reached it, and when it last decoded a keyframe."""

    def __init__(self, viewer: WhepViewer) -> None:
        self.viewer = viewer
        self.received: dict[int, float] = {}
        self.last_keyframe = 0.0  # time.monotonic()

    async def run(self) -> None:
        while True:
            frame = await self.viewer.recv(timeout=10)
            now = time.time()
            if frame.key_frame:
                self.last_keyframe = time.monotonic()
            clock = clock_of(frame)
            if clock is not None:
                self.received[clock] = now


async def wait_phase(last_keyframe, phase: float) -> float:
    """Until ``phase`` seconds have passed since the last keyframe (the next GOP's, if this one is past it)."""
    if time.monotonic() - last_keyframe() > phase:
        seen = last_keyframe()
        while last_keyframe() == seen:
            await asyncio.sleep(0.01)
    while (elapsed := time.monotonic() - last_keyframe()) < phase:
        await asyncio.sleep(min(0.01, phase - elapsed))
    return elapsed


async def aiortc_join(http, relay: Relay, watcher: AiortcWatcher, phase: float, args, bitrate: float) -> Join:
    joiner = WhepViewer(relay.whep, http)
    join = Join(phase_s=round(phase, 2))
    frames: list[tuple[int, float]] = []
    bytes_at: list[tuple[float, int]] = []

    async def count_bytes() -> None:
        while True:
            stats = await joiner.pc.getStats()
            got = sum(s.bytesReceived for s in stats.values() if s.type == "transport")
            bytes_at.append((time.monotonic(), got))
            await asyncio.sleep(0.05)

    counter = asyncio.create_task(count_bytes())
    try:
        posted, posted_wall = time.monotonic(), time.time()
        await joiner.connect()
        deadline = posted + GIVE_UP
        while time.monotonic() < deadline:
            frame = await joiner.recv(timeout=10)
            now = time.time()
            if join.first_frame_ms is None:
                join.first_frame_ms = round((time.monotonic() - posted) * 1000, 1)
            clock = clock_of(frame)
            if clock is None:
                continue
            if join.first_clock_age_ms is None:
                join.first_clock_age_ms = now * 1000 - clock
            frames.append((clock, now))
            live = back_to_live(frames, watcher.received, args.within, args.run)
            if live is not None:
                join.live_ms = round((live - posted_wall) * 1000, 1)
                break
    finally:
        counter.cancel()
        await asyncio.gather(counter, return_exceptions=True)
        await joiner.close()
    first = next((t for t, b in bytes_at if b > 0), None)
    if first is not None:
        before = max((b for t, b in bytes_at if t <= first + 1.0), default=0)
        join.first_second_bytes = before
        join.first_second_x_bitrate = round(before * 8 / bitrate, 2) if bitrate else None
    return join


async def aiortc_case(args, gop: float, policy: str) -> Case:
    relay = Relay(args, gop, policy)
    case = Case(gop, policy, "aiortc")
    try:
        async with aiohttp.ClientSession() as http:
            watcher = AiortcWatcher(WhepViewer(relay.whep, http))
            await watcher.viewer.connect()
            task = asyncio.create_task(watcher.run())
            try:
                await asyncio.sleep(3.0)  # caught up and steady
                case.bitrate_bps = await relay.bitrate()
                forced = relay.stream()["keyframes_forced"]
                for k in range(args.repeats):
                    phase = await wait_phase(lambda: watcher.last_keyframe, gop * (k + 0.5) / args.repeats)
                    join = await aiortc_join(http, relay, watcher, phase, args, case.bitrate_bps)
                    case.joins.append(join)
                    print(f"  {policy} gop={gop:g}s: {asdict(join)}", flush=True)
                    await asyncio.sleep(SETTLE)
                case.keyframes_forced = relay.stream()["keyframes_forced"] - forced
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await watcher.viewer.close()
    finally:
        relay.close()
    return case


# -- Chromium: camrelay's own player page, timed by the frames it presents

RECORD = """() => {
  window.presented = [];
  window.keyframeAt = 0;
  const v = document.getElementById("video");
  const canvas = document.createElement("canvas");
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  const onFrame = (now, meta) => {
    const w = v.videoWidth;
    if (w) {
      const s = Math.floor(w / 48);
      canvas.width = w; canvas.height = s;
      ctx.drawImage(v, 0, 0, w, s, 0, 0, w, s);
      const t = readPixelClock(ctx.getImageData(0, 0, w, s).data, w);
      if (t !== null) window.presented.push([Date.now(), t]);
    }
    v.requestVideoFrameCallback(onFrame);
  };
  v.requestVideoFrameCallback(onFrame);
}"""
BYTES = """async () => {
  const pc = window.camrelayPlayer && window.camrelayPlayer.pc;
  if (!pc) return 0;
  let bytes = 0;
  (await pc.getStats()).forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "video") bytes = r.bytesReceived;
  });
  return bytes;
}"""
KEYFRAMES = """async () => {
  const pc = window.camrelayPlayer && window.camrelayPlayer.pc;
  if (!pc) return 0;
  let n = 0;
  (await pc.getStats()).forEach((r) => { if (r.type === "inbound-rtp" && r.kind === "video") n = r.keyFramesDecoded; });
  return n;
}"""


async def chromium_case(args, gop: float, policy: str) -> Case:
    from benchmarks.chromium import chromium

    relay = Relay(args, gop, policy)
    case = Case(gop, policy, "chromium")
    url = f"http://127.0.0.1:{relay.port}/view/cam0"
    try:
        async with chromium() as browser:
            watcher = await browser.new_page()
            await watcher.goto(url)
            await watcher.evaluate(RECORD)
            await asyncio.sleep(3.0)
            case.bitrate_bps = await relay.bitrate()
            forced = relay.stream()["keyframes_forced"]
            last_keyframe = {"n": await watcher.evaluate(KEYFRAMES), "at": time.monotonic()}

            async def follow_keyframes() -> None:  # the watcher's decoded keyframes, polled
                while True:
                    n = await watcher.evaluate(KEYFRAMES)
                    if n != last_keyframe["n"]:
                        last_keyframe.update(n=n, at=time.monotonic())
                    await asyncio.sleep(0.02)

            follower = asyncio.create_task(follow_keyframes())
            try:
                for k in range(args.repeats):
                    phase = await wait_phase(lambda: last_keyframe["at"], gop * (k + 0.5) / args.repeats)
                    case.joins.append(await chromium_join(browser, watcher, url, phase, args, case.bitrate_bps))
                    print(f"  chromium {policy} gop={gop:g}s: {asdict(case.joins[-1])}", flush=True)
                    await asyncio.sleep(SETTLE)
            finally:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
            case.keyframes_forced = relay.stream()["keyframes_forced"] - forced
    finally:
        relay.close()
    return case


async def chromium_join(browser, watcher, url: str, phase: float, args, bitrate: float) -> Join:
    join = Join(phase_s=round(phase, 2))
    page = await browser.new_page()
    bytes_at: list[tuple[float, int]] = []
    try:
        posted_wall, posted = time.time(), time.monotonic()
        await page.goto(url)  # the page sends its offer at once (the goto itself: part of what a user waits for)
        await page.evaluate(RECORD)
        while time.monotonic() < posted + GIVE_UP:
            await asyncio.sleep(0.1)
            bytes_at.append((time.monotonic(), await page.evaluate(BYTES)))
            presented = await page.evaluate("() => window.presented")
            if presented and join.first_frame_ms is None:
                join.first_frame_ms = round(presented[0][0] - posted_wall * 1000, 1)
                join.first_clock_age_ms = presented[0][0] - presented[0][1]
            seen = {clock: at / 1000 for at, clock in await watcher.evaluate("() => window.presented")}
            live = back_to_live([(c, at / 1000) for at, c in presented], seen, args.within, args.run)
            if live is not None:
                join.live_ms = round((live - posted_wall) * 1000, 1)
                break
    finally:
        await page.close()
    first = next((t for t, b in bytes_at if b > 0), None)
    if first is not None:
        join.first_second_bytes = max((b for t, b in bytes_at if t <= first + 1.0), default=0)
        join.first_second_x_bitrate = round(join.first_second_bytes * 8 / bitrate, 2) if bitrate else None
    return join


def table(cases: list[Case]) -> str:
    lines = [
        "| viewer | keyframe interval | join | first frame, median / max (ms) | back to live, median / max (ms)"
        " | first second, median / max (x bit rate) | keyframes forced |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for c in cases:
        s = c.summary()
        f, live, burst = s["first_frame_ms"], s["live_ms"], s["first_second_x_bitrate"]
        never = f" ({live['missing']} never)" if live["missing"] else ""
        lines.append(
            f"| {c.viewer} | {c.gop_s:g} s | {c.policy} | {f['median']} / {f['max']} | {live['median']} / "
            f"{live['max']}{never} | {burst['median']} / {burst['max']} | {c.keyframes_forced} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=10, help="joins per case (default 10)")
    ap.add_argument("--gops", default="10,1", help="keyframe intervals in seconds (default 10,1)")
    ap.add_argument("--policies", default=",".join(POLICIES), help="join policies (default keyframe,cached_gop)")
    ap.add_argument("--within", type=float, default=5.0, help="ms of the watcher that count as live (default 5)")
    ap.add_argument("--run", type=int, default=30, help="frames in a row that must be live (default 30)")
    ap.add_argument("--browser", action="store_true", help="Chromium pages instead of aiortc viewers")
    ap.add_argument("--out", help="write <out>.json")
    add_stream_options(ap)
    args = ap.parse_args(argv)
    cases = []
    for gop in (float(g) for g in args.gops.split(",")):
        for policy in args.policies.split(","):
            run = chromium_case if args.browser else aiortc_case
            cases.append(asyncio.run(run(args, gop, policy)))
    print(table(cases))
    if args.out:
        out = {
            "command": " ".join(["python -m benchmarks.join", *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cases": [
                {**c.summary(), "bitrate_bps": c.bitrate_bps, "joins": [asdict(j) for j in c.joins]} for c in cases
            ],
        }
        Path(f"{args.out}.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
