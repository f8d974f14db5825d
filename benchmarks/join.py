"""Joining a stream mid-GOP: how soon a new viewer has a picture, and how soon it is back to live latency.

    python -m benchmarks.join --repeats 10 --gops 10,1 --size 1280x720 --fps 30 --bitrate 2M --out docs/results/join
    python -m benchmarks.join --browser --repeats 5 --gops 10 --out docs/results/join-chromium

For each keyframe interval (``--gops``, seconds) it starts one camrelay per join policy (``[video] join``:
``keyframe`` forces an IDR for the joiner, ``cached_gop`` starts it from the relay's copy of the current GOP),
side by side so that both see the same load, each in a process of its own with the test pattern and a viewer
that stays (the watcher). Then ``--repeats`` times for each, in turn, it connects a joiner at a point of the GOP
(spread over it: the time since the last keyframe the watcher decoded) and measures, from the moment the joiner
starts its WHEP offer:

- first frame: until it has its first decoded frame;
- back to live: until its frames reach it within ``--within`` ms of when the same frames (by pixel clock) reached
  the watcher, as the median of the ``--run`` frames from there does too;
- first second: what it received in the second from its first packet, over the stream's bit rate as the watcher
  received it over the GOP before (the burst).

aiortc viewers run in this process; with ``--browser`` the watcher and the joiner are Chromium pages of camrelay's
player (``/view/cam0``, the page load counted in), timed by the frames they present (``requestVideoFrameCallback``).
Medians and maxima of the repeats go to stdout and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
STOP_WAIT = 5.0  # seconds to wait for a viewer's tasks, or its close, to end


@dataclass
class Join:
    phase_s: float  # time since the last keyframe when the joiner sent its offer
    first_frame_ms: float | None = None
    live_ms: float | None = None  # None: not back to live within GIVE_UP
    first_second_bytes: int = 0
    first_second_x_bitrate: float | None = None
    first_clock_age_ms: float | None = None  # how old its first picture was: its first latency
    last_delta_ms: float | None = None  # behind the watcher at the end: the median of its last --run frames


@dataclass
class Case:
    gop_s: float
    policy: str
    viewer: str  # "aiortc" or "chromium"
    joins: list[Join] = field(default_factory=list)
    bitrates: list[float] = field(default_factory=list)  # the stream's, as the watcher got it before each join
    keyframes_forced: int = 0

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
            "bitrate_bps": round(statistics.median(self.bitrates)) if self.bitrates else None,
        }


def back_to_live(deltas: list[tuple[float, float]], within_ms: float, run: int, start: int = 0):
    """When a joiner was back to live: of its frames as ``(ms behind the watcher, when it got it)``, in order, the
    first that was within ``within_ms``, as the median of the ``run`` frames from it was too. Windows are looked at
    from ``start`` on; returns the time (None: no such run yet) and where to start next time."""
    for i in range(start, len(deltas) - run + 1):
        if deltas[i][0] <= within_ms and statistics.median(d for d, _ in deltas[i : i + run]) <= within_ms:
            return deltas[i][1], i
    return None, max(start, len(deltas) - run + 1)


class ByteMeter:
    """A viewer's received bytes, sampled: the stream's bit rate as a viewer that was already watching gets it."""

    def __init__(self, read) -> None:
        self.read = read  # async () -> bytes received so far
        self.samples: list[tuple[float, int]] = []
        self.stopped = False

    async def run(self) -> None:
        while not self.stopped:  # a flag too: aiortc's getStats can swallow a cancellation (gather, wait_for)
            self.samples.append((time.monotonic(), await self.read()))
            await asyncio.sleep(0.25)

    def bps(self, window: float) -> float:
        """Bits a second over the latest ``window`` seconds (or all there is)."""
        if len(self.samples) < 2:
            return 0.0
        t1, b1 = self.samples[-1]
        t0, b0 = next(((t, b) for t, b in self.samples if t >= t1 - window), self.samples[0])
        return (b1 - b0) * 8 / (t1 - t0) if t1 > t0 else 0.0


async def stop(tasks: list[asyncio.Task], *meters: ByteMeter) -> None:
    """Stop ``tasks`` (and the loops of ``meters``); wait at most STOP_WAIT for them, never for ever."""
    for meter in meters:
        meter.stopped = True
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=STOP_WAIT)


def first_second(samples: list[tuple[float, int]]) -> int:
    """Bytes received in the second from the first sample that had any."""
    first = next((t for t, b in samples if b > 0), None)
    return 0 if first is None else max((b for t, b in samples if t <= first + 1.0), default=0)


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
        self.whep = self.system.url
        self.page = f"http://127.0.0.1:{self.port}/view/cam0"

    def keyframes_forced(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/streams", timeout=5) as r:
            return json.load(r)["streams"][0]["keyframes_forced"]

    def close(self) -> None:
        self.system.close()


def rate_window(gop: float) -> float:
    """Seconds over which the watcher's bit rate is the stream's: a whole GOP, its keyframe included."""
    return max(gop, 2.0)


async def wait_phase(last_keyframe, phase: float) -> float:
    """Until ``phase`` seconds have passed since the last keyframe (the next GOP's, if this one is past it)."""
    if time.monotonic() - last_keyframe() > phase:
        seen = last_keyframe()
        while last_keyframe() == seen:
            await asyncio.sleep(0.01)
    while (elapsed := time.monotonic() - last_keyframe()) < phase:
        await asyncio.sleep(min(0.01, phase - elapsed))
    return elapsed


class Arm:
    """One relay (one join policy) with its watcher; ``join()`` measures one joiner. Subclassed per viewer kind."""

    viewer = ""

    def __init__(self, args, gop: float, policy: str) -> None:
        self.args = args
        self.case = Case(gop, policy, self.viewer)
        self.relay = Relay(args, gop, policy)
        self.received: dict[int, float] = {}  # the watcher's frames: pixel clock -> when it got them (time.time())
        self.last_keyframe = time.monotonic()  # when the watcher last decoded one
        self.meter: ByteMeter | None = None  # the watcher's received bytes
        self.tasks: list[asyncio.Task] = []
        self.forced = 0
        self.stopping = False

    def _last_keyframe(self) -> float:
        for task in self.tasks:
            if task.done():  # the watcher is gone: say why
                raise RuntimeError(f"{self.viewer} watcher of {self.case.policy} ended") from task.exception()
        return self.last_keyframe

    async def join(self) -> None:
        gop = self.case.gop_s
        phase = await wait_phase(self._last_keyframe, gop * (len(self.case.joins) + 0.5) / self.args.repeats)
        assert self.meter is not None
        bitrate = self.meter.bps(rate_window(gop))
        join, samples = await self.measure(Join(phase_s=round(phase, 2)))
        join.first_second_bytes = first_second(samples)
        join.first_second_x_bitrate = round(join.first_second_bytes * 8 / bitrate, 2) if bitrate else None
        self.case.joins.append(join)
        self.case.bitrates.append(bitrate)
        print(f"  {self.viewer} {self.case.policy} gop={gop:g}s: {asdict(join)}", flush=True)

    def live_at(self, frames: list[tuple[int, float]], posted_wall: float, join: Join, state: dict) -> float | None:
        """Whether the joiner's ``frames`` (``(clock, when it got it)``, in order, more each call) show it back to
        live; ``state`` carries what earlier calls worked out."""
        deltas = state.setdefault("deltas", [])
        for clock, received in frames[state.get("seen", 0) :]:
            if clock in self.received:
                deltas.append(((received - self.received[clock]) * 1000, received))
        state["seen"] = len(frames)
        if deltas:
            join.last_delta_ms = round(statistics.median(d for d, _ in deltas[-self.args.run :]), 1)
        live, state["start"] = back_to_live(deltas, self.args.within, self.args.run, state.get("start", 0))
        return None if live is None else round((live - posted_wall) * 1000, 1)

    async def measure(self, join: Join) -> tuple[Join, list[tuple[float, int]]]:
        raise NotImplementedError

    async def close(self) -> None:
        self.stopping = True
        await stop(self.tasks, *([self.meter] if self.meter else []))
        self.relay.close()


async def transport_bytes(viewer: WhepViewer) -> int:
    return sum(s.bytesReceived for s in (await viewer.pc.getStats()).values() if s.type == "transport")


class AiortcArm(Arm):
    viewer = "aiortc"

    async def start(self, http: aiohttp.ClientSession) -> None:
        self.http = http
        self.watcher = WhepViewer(self.relay.whep, http)
        await self.watcher.connect()
        self.meter = ByteMeter(lambda: transport_bytes(self.watcher))
        self.tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self.meter.run())]

    async def _watch(self) -> None:
        while not self.stopping:
            frame = await self.watcher.recv(timeout=10)
            now = time.time()
            if frame.key_frame:
                self.last_keyframe = time.monotonic()
            clock = clock_of(frame)
            if clock is not None:
                self.received[clock] = now

    async def measure(self, join: Join) -> tuple[Join, list[tuple[float, int]]]:
        joiner = WhepViewer(self.relay.whep, self.http)
        frames: list[tuple[int, float]] = []
        state: dict = {}
        meter = ByteMeter(lambda: transport_bytes(joiner))
        counter = asyncio.create_task(meter.run())
        try:
            posted, posted_wall = time.monotonic(), time.time()
            await joiner.connect()
            while time.monotonic() < posted + GIVE_UP:
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
                if (live := self.live_at(frames, posted_wall, join, state)) is not None:
                    join.live_ms = live
                    break
        finally:
            await stop([counter], meter)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(joiner.close(), STOP_WAIT)
        return join, meter.samples

    async def close(self) -> None:
        await super().close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.watcher.close(), STOP_WAIT)


# -- Chromium: camrelay's own player page, timed by the frames it presents

INBOUND = """async (key) => {
  const pc = window.camrelayPlayer && window.camrelayPlayer.pc;
  if (!pc) return 0;
  let value = 0;
  (await pc.getStats()).forEach((r) => { if (r.type === "inbound-rtp" && r.kind === "video") value = r[key]; });
  return value;
}"""


class ChromiumArm(Arm):
    viewer = "chromium"

    async def start(self, browser) -> None:
        from benchmarks.chromium import PRESENTED  # (Playwright only for this arm)

        self.browser = browser
        self.watcher = await browser.new_page()
        await self.watcher.goto(self.relay.page)
        await self.watcher.evaluate(PRESENTED)
        self.meter = ByteMeter(lambda: self.watcher.evaluate(INBOUND, "bytesReceived"))
        self.tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self.meter.run())]

    async def _watch(self) -> None:  # the watcher's decoded keyframes and presented frames, polled
        keyframes = 0
        while not self.stopping:
            n = await self.watcher.evaluate(INBOUND, "keyFramesDecoded")
            if n != keyframes:
                keyframes, self.last_keyframe = n, time.monotonic()
            for at, clock in await self.watcher.evaluate(
                "() => window.presented.splice(0).filter((p) => p[1] !== null)"
            ):
                self.received[clock] = at / 1000
            await asyncio.sleep(0.02)

    async def measure(self, join: Join) -> tuple[Join, list[tuple[float, int]]]:
        from benchmarks.chromium import PRESENTED, READABLE

        page = await self.browser.new_page()
        meter = ByteMeter(lambda: page.evaluate(INBOUND, "bytesReceived"))
        state: dict = {}
        counter: asyncio.Task | None = None
        try:
            posted_wall, posted = time.time(), time.monotonic()
            await page.goto(self.relay.page)  # the page sends its offer at once: loading it is part of the wait
            await page.evaluate(PRESENTED)
            counter = asyncio.create_task(meter.run())
            while time.monotonic() < posted + GIVE_UP:
                await asyncio.sleep(0.25)
                presented = [(clock, at / 1000) for at, clock in await page.evaluate(f"() => {READABLE}")]
                if presented and join.first_frame_ms is None:
                    join.first_frame_ms = round((presented[0][1] - posted_wall) * 1000, 1)
                    join.first_clock_age_ms = presented[0][1] * 1000 - presented[0][0]
                if (live := self.live_at(presented, posted_wall, join, state)) is not None:
                    join.live_ms = live
                    break
        finally:
            if counter is not None:
                await stop([counter], meter)
            await page.close()
        return join, meter.samples


async def run_gop(args, gop: float) -> list[Case]:
    """Every policy's relay side by side (the same load on each), their joins taken in turn."""
    kind = ChromiumArm if args.browser else AiortcArm
    arms: list[Arm] = []
    try:
        for policy in args.policies.split(","):
            arms.append(kind(args, gop, policy))
        async with contextlib.AsyncExitStack() as stack:
            if args.browser:
                from benchmarks.chromium import chromium

                session = await stack.enter_async_context(chromium())
            else:
                session = await stack.enter_async_context(aiohttp.ClientSession())
            for arm in arms:
                await arm.start(session)  # type: ignore[attr-defined]
            await asyncio.sleep(rate_window(gop) + 1.0)  # watchers caught up, steady, a GOP's bytes counted
            for arm in arms:
                arm.forced = arm.relay.keyframes_forced()
            for _ in range(args.repeats):
                for arm in arms:
                    await arm.join()
                    await asyncio.sleep(SETTLE)
            for arm in arms:
                arm.case.keyframes_forced = arm.relay.keyframes_forced() - arm.forced
            for arm in arms:
                await arm.close()
    finally:
        for arm in arms:
            arm.relay.close()
    return [arm.case for arm in arms]


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
    ap.add_argument(
        "--within", type=float, help="ms behind the watcher that count as live (default 5; 20 with --browser: a page"
        " shows a frame at its next vsync, 16.7 ms apart)",
    )  # fmt: skip
    ap.add_argument("--run", type=int, default=30, help="frames in a row that must be live (default 30)")
    ap.add_argument("--browser", action="store_true", help="Chromium pages instead of aiortc viewers")
    ap.add_argument("--out", help="write <out>.json")
    add_stream_options(ap)
    args = ap.parse_args(argv)
    if args.within is None:
        args.within = 20.0 if args.browser else 5.0
    load = os.getloadavg()
    cases = []
    for gop in (float(g) for g in args.gops.split(",")):
        cases += asyncio.run(run_gop(args, gop))
    print(table(cases))
    if args.out:
        out = {
            "command": " ".join(["python -m benchmarks.join", *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average": {"start": [round(x, 2) for x in load], "end": [round(x, 2) for x in os.getloadavg()]},
            "within_ms": args.within,
            "run": args.run,
            "cases": [{**c.summary(), "joins": [asdict(j) for j in c.joins]} for c in cases],
        }
        Path(f"{args.out}.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
