"""Many viewers joining at once: does every one connect, how soon has each a picture, and what do the others see?

    python -m benchmarks.burst --joiners 30 --repeats 3 --size 1280x720 --fps 30 --bitrate 2M --out docs/results/burst
    python -m benchmarks.burst --relay-dir /tmp/camrelay-main ...   # the same against another checkout's relay

Starts camrelay (``relay serve``, the test pattern, ``[video] join`` as configured: a forced IDR for joiners of a
transcoded stream) and ``--watchers`` viewers that stay (``benchmarks.markerprobe``: each access unit decoded at its
marker bit, its pixel clock read; nothing held by the reader). After ``--baseline`` seconds, ``--joiners`` WHEP
viewers start their offers at the same instant, spread over worker processes of ``--per-worker``
(``benchmarks.peers.PEERS_PER_WORKER`` by default). Each joiner is a real aiortc peer (ICE, DTLS, SRTP) whose
decrypted RTP is depacketized here and whose first IDR is decoded at its marker bit: its first picture. Measured per
joiner, from just before it makes its offer (``first_picture_*``; ``from_post_*`` from its POST, once the offer is
made: the issue's measure): the offer made, the answer, ICE, ICE+DTLS connected, its first RTP packet, its first
keyframe whole, the first decoded picture (its decode's own time, and the picture's age by its pixel clock); and the
relay's own steps for it (``benchmarks/looplag/jointrace.py``: answered, connected, subscribed and how it starts, the
keyframe it starts from published, first frame sent). One that is not connected with a picture within ``--give-up``
seconds counts as failed, with the reason.

The probe shares the relay's machine, and 30 aiortc viewers cost more CPU than the relay serving them (making their
offers, ~4 ms each; decoding their first pictures, ~6 ms each at 720p; handling their packets): with the relay alone
on one core and the probe on the other (``--pin --source-apart``) the relay's loop waited for the joiners, and
their first pictures came later than with both sharing the two (docs/benchmarks.md, issue 16). So by default
(``--probe browser``) a joiner does before the instant and after the burst what a browser does on its own machine:
its offer is made (ICE gathered) beforehand, and its first keyframe is decoded after the burst, alone, its first
picture counted as when that keyframe was whole plus its decode's own time; and its ICE is done as soon as its
pair is nominated, as a browser's is (aioice waits out a 20 ms pacing first). ``--probe aiortc`` is the probe as
it was before 2026-11-30. ``--probe chromium``: the joiners are headless Chromium pages with camrelay's player
(``benchmarks/burstpages.py``), their offers made before and their POSTs held to the instant; ``--probe
chromium,browser,aiortc`` runs each in turn every repeat, against one relay. ``--profile`` records the relay and a
joiners' worker with py-spy over each burst.
After ``--hold`` seconds of watching, the joiners leave; the next repeat starts after ``--settle``.

For the relay: the forced IDRs it reports (``keyframes_forced``) from the first POST to the last first picture, and
per second of that window; how late its event loop ran a 5 ms timer before and during the burst
(``benchmarks/looplag``, put on its PYTHONPATH); its CPU time. For the watchers: their latency before the burst
(their usual) against while the others joined (from the first POST to the last joiner's first picture), and how many
of their frames came more than two frame intervals later than their usual median. Results go to stdout, and with
``--out`` to ``<out>.json`` (with ``--raw``, each joiner's steps too: where a burst's time went, joiner by joiner)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks import burstpages
from benchmarks.load import CAMRELAY_LOAD_ENV, camrelay_command, stop_processes
from benchmarks.markerprobe import answer_payload_type, run_marker_probe
from benchmarks.options import add_stream_options, run_facts
from benchmarks.peers import PEERS_PER_WORKER, percentile
from benchmarks.pinning import Split, add_core_options, pin_tree, split_or_exit, thread_on
from benchmarks.ports import free_port

LOOP_LAG_PROBE = Path(__file__).resolve().parent / "looplag"  # on the relay's PYTHONPATH
LOOP_LAG_ENV = "BENCH_LOOP_LAG_FILE"  # where it writes (benchmarks/looplag/sitecustomize.py)
JOIN_TRACE_ENV = "BENCH_JOIN_TRACE_FILE"  # where the relay notes each joiner's steps (benchmarks/looplag/jointrace.py)
START_TIMEOUT = 30.0  # seconds for the relay to encode its first frame
READY_TIMEOUT = 60.0  # seconds for the watchers to have their first picture
WORKER_SLACK = 60.0  # seconds a joiners' worker has beyond --give-up and --hold to report (closing, its pages)
LEAD = 1.0  # seconds between telling the joiners' workers when to start and that instant: all are waiting by then
POLL = 0.005  # seconds between a joiner's looks for its first picture
# --probe: whether a joiner's offer is made before the instant, its ICE prompt and its decode after the burst
# (JoinPlan's offer_early, prompt_ice, decode_after), a viewer's own work kept off the relay's cores: browser, all;
# chromium: the joiners are headless Chromium pages (benchmarks/burstpages.py), whose offers are made before too.
PROBES = {"browser": True, "aiortc": False, "chromium": True}
PROFILE_SECONDS = 1.0  # --profile: py-spy records this long from just before the offers (a burst's first pictures)
PROFILE_RATE = 500  # samples a second (py-spy's default 100 sees too few of a 2 ms answer)
PROFILE_EARLY = 0.2  # seconds before the offers it starts: py-spy's own attach is done by then
# A joiner's time from its POST, phase by phase (``phases``): each phase ends at the step named, measured from the
# end of the one before (joiner's steps and the relay's, on one wall clock: one machine).
PHASES = (
    ("answer", "answered"),  # POST to the answer in the joiner's hands (the relay's answer and the HTTP round trip)
    ("ice", "ice"),  # to its ICE completed (the relay's checks, its answers to them)
    ("dtls", "connected"),  # to its DTLS connected (the joiner is the DTLS server: done before the relay)
    ("relay_connected", "relay.connected"),  # the relay's DTLS done (its client Finished answered) and SRTP up
    ("first_sent", "relay.first_sent"),  # subscribed to the hub, the keyframe taken, its first datagrams written
    ("first_packet", "first_packet"),  # the joiner's first RTP packet decrypted
    ("keyframe", "keyframe"),  # its first keyframe whole (the marker bit)
    ("decoded", "first_picture"),  # decoded
)


@dataclass
class JoinerResult:
    posted: float = 0.0  # wall clock just before it made its offer (then POSTed it)
    offered_ms: float | None = None  # from posted: its offer made (ICE gathered), the POST going out
    answered_ms: float | None = None  # from posted: the 201 and its answer
    ice_ms: float | None = None  # its ICE connected
    connected_ms: float | None = None  # ICE and DTLS connected
    first_packet_ms: float | None = None  # its first RTP packet, decrypted
    keyframe_ms: float | None = None  # its first keyframe whole (the packet with its marker bit)
    first_picture_ms: float | None = None  # its first decoded picture
    decode_ms: float | None = None  # how long that picture's decode took
    first_age_ms: float | None = None  # how old that picture was (its pixel clock)
    frames_after: int = 0  # access units received over --hold after the first picture
    name: str = ""  # the relay's name for it (webrtc-<session id[:8]>): its lines in the relay's join trace
    relay: dict = field(default_factory=dict)  # from the relay's join trace: event -> ms from posted, and how
    error: str = ""
    presented_ms: float | None = None  # --probe chromium: its first frame handed to the compositor
    browser: dict = field(default_factory=dict)  # --probe chromium: the page's own steps and getStats


@dataclass(frozen=True)
class JoinPlan:
    url: str
    count: int
    give_up: float
    hold: float
    addresses: tuple[str, ...] = ("127.0.0.1",)  # the joiners' ICE host candidates
    offer_early: bool = False  # offers made (ICE gathered) before the instant: only the POSTs go out together
    prompt_ice: bool = False  # joiners' ICE done when nominated, not after aioice's 20 ms wait (borrowed.PROMPT_ICE)
    decode_after: bool = False  # first keyframes decoded after the burst, each timed alone (a viewer's own CPU)
    nice: int = 0  # the joiners' processes' niceness: above 0, the relay and its encoder get the CPU first


def join_worker(plan: JoinPlan, ready: mp.Queue, at, results: mp.Queue) -> None:
    """A worker process's joiners: once ready (imported, peers made) it says so on ``ready``; all offer at the
    wall-clock instant the parent then puts in ``at`` (an ``mp.Value``, 0 until set); each is measured to its
    first picture, held, closed."""
    os.nice(plan.nice)
    try:
        out = asyncio.run(_joiners(plan, ready, at))
    except Exception as exc:  # report, never hang the parent
        ready.put("error")
        out = [asdict(JoinerResult(error=f"worker: {type(exc).__name__}: {exc}"))] * plan.count, 0.0
    results.put(out)


class _Joiner:
    """One joiner's RTP after decryption: depacketized, its first IDR decoded, later units counted."""

    def __init__(self, decode_after: bool = False) -> None:
        self.decode_after = decode_after  # keep the first keyframe, decode it later (``decode_kept``)
        self.kept: bytes | None = None
        self.depacketizer = None
        self.decoder = None
        self.first_packet: float | None = None
        self.keyframe: float | None = None  # its first keyframe whole
        self.decode_s: float | None = None
        self.first_picture: float | None = None
        self.first_clock: int | None = None
        self.units = 0

    def rtp(self, data: bytes) -> None:
        from relay.rtspin import RtspError, parse_rtp

        if self.depacketizer is None:
            return  # before its answer named the payload type
        if self.first_packet is None:
            self.first_packet = time.time()
        try:
            packet = parse_rtp(data)
            if packet.payload_type != self.depacketizer.payload_type:
                return  # RTX
            units = self.depacketizer.push(packet)
        except RtspError:
            return
        for unit in units:
            self.units += 1
            if self.keyframe is None and unit.keyframe:
                self.keyframe = time.time()
                if self.decode_after:
                    self.kept = unit.data
            if self.decode_after:
                continue
            if self.first_picture is None and (unit.keyframe or self.decoder is not None):
                self._decode(unit.data)

    @property
    def waiting(self) -> bool:
        """Still waiting for what it is measured to: its first picture, or with ``decode_after`` its keyframe."""
        return self.kept is None if self.decode_after else self.first_picture is None

    def decode_kept(self) -> None:
        """``decode_after``: its kept keyframe decoded now, alone; its first picture is when the keyframe was whole
        plus that decode's own time (its age by its pixel clock: at that time)."""
        if self.kept is None:
            return
        self._decode(self.kept)
        if self.decode_s is not None:
            self.first_picture = self.keyframe + self.decode_s  # its pixel clock (first_clock) is the capture time

    def _decode(self, data: bytes) -> None:
        import av

        from relay.webrtc.whepclient import sample

        if self.decoder is None:
            self.decoder = av.CodecContext.create("h264", "r")
            self.decoder.flags |= av.codec.context.Flags.low_delay
        started = time.perf_counter()
        try:
            pictures = self.decoder.decode(av.Packet(data))
        except av.FFmpegError:
            return
        if pictures:
            self.decode_s = time.perf_counter() - started
            s = sample(pictures[0])
            self.first_picture = s.received
            self.first_clock = None if s.latency_ms is None else round(s.received * 1000 - s.latency_ms)
            self.decoder = None  # one picture is all a joiner decodes: thirty decoders would be the load


async def _joiners(plan: JoinPlan, ready: mp.Queue, at) -> tuple[list[dict], float]:
    """Its joiners' results, and the CPU time (s) this process took from their offers to their first pictures."""
    import aiohttp

    from relay.webrtc.borrowed import PROMPT_ICE, divert_decrypted_rtp, restrict_host_addresses
    from relay.webrtc.whepclient import WhepViewer

    by_transport: dict[object, _Joiner] = {}
    release = [
        divert_decrypted_rtp(lambda transport, data: (j := by_transport.get(transport)) and j.rtp(data)),
        restrict_host_addresses(plan.addresses),
        *([PROMPT_ICE.hold()] if plan.prompt_ice else []),
    ]
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            viewers = [WhepViewer(plan.url, http) for _ in range(plan.count)]
            joiners = [_Joiner(plan.decode_after) for _ in viewers]
            offers = [await v.make_offer() for v in viewers] if plan.offer_early else [None] * len(viewers)
            ready.put("ready")
            while not at.value:
                await asyncio.sleep(POLL)
            await asyncio.sleep(max(0.0, at.value - time.time()))
            cpu = time.process_time()
            results = await asyncio.gather(
                *(_join(v, j, o, plan, by_transport) for v, j, o in zip(viewers, joiners, offers, strict=True))
            )
            cpu = time.process_time() - cpu
            if plan.decode_after:  # the burst is over: each keyframe decoded alone, as on a viewer's own machine
                for joiner, result in zip(joiners, results, strict=True):
                    joiner.decode_kept()
                    fill_picture(result, joiner)
                    if joiner.kept is not None and result.first_picture_ms is None and not result.error:
                        result.error = "its first keyframe gave no picture"  # counted as a failure, with why
            await asyncio.sleep(plan.hold)
            for joiner, result in zip(joiners, results, strict=True):
                result.frames_after = joiner.units
            await asyncio.gather(*(v.close() for v in viewers), return_exceptions=True)
            return [asdict(r) for r in results], cpu
    finally:
        for undo in release:
            undo()


async def _join(viewer, joiner: _Joiner, offer: str | None, plan: JoinPlan, by_transport: dict) -> JoinerResult:
    """One joiner, measured from just before it makes its offer (``offer`` None), or with its offer made already,
    from just before its POST."""
    from relay.rtspin import H264Depacketizer

    r = JoinerResult(posted=time.time())
    t0 = time.monotonic()
    since = lambda: (time.monotonic() - t0) * 1000  # noqa: E731
    offered = viewer.http.post  # its POST goes out once its offer is made

    def post(*args, **kwargs):
        r.offered_ms = since()
        return offered(*args, **kwargs)

    viewer.http = _PostWatch(viewer.http, post)

    @viewer.pc.on("iceconnectionstatechange")
    def ice_state() -> None:
        if r.ice_ms is None and viewer.pc.iceConnectionState == "completed":
            r.ice_ms = since()

    try:
        async with asyncio.timeout(plan.give_up):
            if offer is None:
                await viewer.connect()  # adds its transceiver, offers, POSTs
            else:
                await viewer.send_offer(offer)
            r.answered_ms = since()
            r.name = "webrtc-" + (viewer.location or "").rsplit("/", 1)[-1][:8]
            by_transport[viewer.pc.getTransceivers()[0].receiver.transport] = joiner
            joiner.depacketizer = H264Depacketizer(answer_payload_type(viewer.answer))
            while joiner.waiting:
                await asyncio.sleep(POLL)
    except TimeoutError:
        r.error = f"no picture within {plan.give_up:g} s (connection {viewer.pc.connectionState})"
    except Exception as exc:
        r.error = f"{type(exc).__name__}: {exc}"
    if viewer.stats.connected_at is not None:
        r.connected_ms = (viewer.stats.connected_at - t0) * 1000
    if not joiner.decode_after:
        fill_picture(r, joiner)
    joiner.units = 0  # from here on: what it gets while held
    return r


def fill_picture(r: JoinerResult, joiner: _Joiner) -> None:
    """A joiner's packet, keyframe and picture times, from its ``posted``."""
    if joiner.first_packet is not None:
        r.first_packet_ms = (joiner.first_packet - r.posted) * 1000
    if joiner.keyframe is not None:
        r.keyframe_ms = (joiner.keyframe - r.posted) * 1000
    if joiner.decode_s is not None:
        r.decode_ms = joiner.decode_s * 1000
    if joiner.first_picture is not None:
        r.first_picture_ms = (joiner.first_picture - r.posted) * 1000
        if joiner.first_clock is not None:
            r.first_age_ms = joiner.first_picture * 1000 - joiner.first_clock


class _PostWatch:
    """An aiohttp session whose ``post`` is ``post`` (the rest its own): notes when a joiner's offer goes out."""

    def __init__(self, http, post) -> None:
        self._http = http
        self.post = post

    def __getattr__(self, name: str):
        return getattr(self._http, name)


# -- the relay ---------------------------------------------------------------------------------------------------


@dataclass
class Relay:
    proc: subprocess.Popen
    port: int
    loop_lag_file: str = ""  # benchmarks/looplag's record of how late its event loop ran a 5 ms timer
    join_trace_file: str = ""  # benchmarks/looplag/jointrace.py's: each joiner's steps in the relay

    def join_trace(self) -> tuple[dict[str, dict], list[float]]:
        """Each viewer's steps in the relay (name -> event -> (wall clock, detail), the first of each kind), and
        when the hub published each keyframe."""
        try:
            lines = Path(self.join_trace_file).read_text().splitlines()
        except OSError:
            return {}, []
        steps: dict[str, dict] = {}
        keyframes = []
        for line in lines:
            t, event, name, *detail = line.split(" ")
            if event == "keyframe":
                keyframes.append(float(t))
            else:
                steps.setdefault(name, {}).setdefault(event, (float(t), " ".join(detail)))
        return steps, keyframes

    def loop_lag(self, start: float, end: float) -> dict:
        """How late the relay's event loop ran its probe's timer between ``start`` and ``end`` (wall clock)."""
        try:
            lines = Path(self.loop_lag_file).read_text().splitlines()
        except OSError:
            return {}
        lags = [float(ms) for t, ms in (line.split() for line in lines) if start <= float(t) <= end]
        return {
            "samples": len(lags),
            **{f"p{p}": _r(percentile(lags, p)) for p in (50, 95)},
            "max": _r(max(lags, default=None)),
        }

    @property
    def whep(self) -> str:
        return f"http://127.0.0.1:{self.port}/whep/cam0"

    def cpu_seconds(self) -> float:
        """CPU time of the relay process and its children (the camera's worker, mediamtx if any)."""
        import psutil

        main = psutil.Process(self.proc.pid)
        return sum(sum(p.cpu_times()[:2]) for p in (main, *main.children(recursive=True)))

    def stream(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/streams", timeout=5) as r:
            return json.load(r)["streams"][0]


def start_relay(args: argparse.Namespace, split: Split | None = None) -> Relay:
    """The relay, started on ``split.system``'s cores when pinned (its camera worker on the generator's with
    ``--source-apart``)."""
    with thread_on(split.system) if split else contextlib.nullcontext():
        relay = _start_relay(args)
    if split:
        import psutil

        main = psutil.Process(relay.proc.pid)
        placed = pin_tree([main], split.system)
        placed += pin_tree(main.children(recursive=True), split.generator if args.source_apart else split.system)
        print(f"pinned: {json.dumps(placed)}", flush=True)
    return relay


def _start_relay(args: argparse.Namespace) -> Relay:
    port = free_port()
    cmd = camrelay_command(args.size, args.fps, args.bitrate, port)  # ICE on 127.0.0.1
    cmd += [arg for address in args.ice_addresses[1:] for arg in ("--ice-address", address)]
    lag = tempfile.NamedTemporaryFile(prefix="camrelay-loop-lag-", suffix=".txt", delete=False)
    lag.close()
    trace = tempfile.NamedTemporaryFile(prefix="camrelay-join-trace-", suffix=".txt", delete=False)
    trace.close()
    env = {
        **os.environ, **CAMRELAY_LOAD_ENV, "CAMRELAY_VIDEO_KEYFRAME_INTERVAL": f"{args.gop:g}",
        LOOP_LAG_ENV: lag.name, JOIN_TRACE_ENV: trace.name,
    }  # fmt: skip
    paths = (args.relay_dir, str(LOOP_LAG_PROBE), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    proc = subprocess.Popen(cmd, env=env, cwd=args.relay_dir or None)
    relay = Relay(proc, port, lag.name, trace.name)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the relay exited with {proc.returncode} during start-up")
        try:
            if relay.stream()["frames_encoded"] > 0:
                return relay
        except OSError:
            pass
        time.sleep(0.2)
    stop_processes(proc)
    raise SystemExit("the relay did not start")


# -- one repeat --------------------------------------------------------------------------------------------------


@dataclass
class Repeat:
    joiners: list[dict] = field(default_factory=list)
    forced: int = 0  # forced IDRs from the first POST to the last first picture (or the give-up)
    window_s: float = 0.0
    watchers: list[dict] = field(default_factory=list)
    fanout_ms: dict = field(default_factory=dict)  # the relay's own hub-to-sender delays, read after the burst
    relay_cpu_s: float = 0.0  # the relay process and its camera worker, from the offers to the joiners' leaving
    loop_lag_ms: dict = field(default_factory=dict)  # how late the relay's loop ran a 5 ms timer: before, during
    joiners_cpu_s: float = 0.0  # the joiners' processes, from their offers to their first pictures
    started: float = 0.0  # wall clock at its start
    load: float = 0.0  # the 1-minute load average then


def run_repeat(args: argparse.Namespace, relay: Relay, ctx, probe: str) -> Repeat:
    fps, joiners = args.fps, args.joiners
    started, load = time.time(), os.getloadavg()[0]
    watch_for = args.baseline + LEAD + args.give_up + args.hold
    ready, start, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    watchers = [
        ctx.Process(target=run_marker_probe, args=(relay.whep, watch_for, fps, ready, start, results), daemon=True)
        for _ in range(args.watchers)
    ]
    for p in watchers:
        p.start()
    for _ in watchers:
        kind, detail = ready.get(timeout=READY_TIMEOUT)
        if kind != "ready":
            raise SystemExit(f"a watcher could not start: {detail}")
    joined, joiners_ready, at, workers = ctx.Queue(), ctx.Queue(), ctx.Value("d", 0.0), []
    for first in range(0, joiners, args.per_worker):
        count = min(args.per_worker, joiners - first)
        plan = JoinPlan(
            relay.whep,
            count,
            args.give_up,
            args.hold,
            tuple(args.ice_addresses),
            *(PROBES[probe],) * 3,  # offer early, prompt ICE, decode after: all or none
            args.probe_nice,
        )
        target = burstpages.join_worker if probe == "chromium" else join_worker
        workers.append(ctx.Process(target=target, args=(plan, joiners_ready, at, joined), daemon=True))
    for p in workers:
        p.start()
    for _ in workers:
        if joiners_ready.get(timeout=READY_TIMEOUT) != "ready":
            raise SystemExit("a joiners' worker could not start")
    start.set()  # the watchers' measuring: their usual latency first
    time.sleep(args.baseline)
    before = relay.stream()["keyframes_forced"]
    relay_cpu = relay.cpu_seconds()
    at.value = time.time() + LEAD
    print(f"joiners offer at {at.value:.3f} (relay pid {relay.proc.pid})", flush=True)  # e.g. to profile it then
    profilers = start_profiles(args, relay, workers, at.value)
    out = Repeat(started=started, load=load)
    deadline = time.monotonic() + args.give_up + args.hold + WORKER_SLACK
    for _ in workers:
        try:
            joiners_of_worker, cpu = joined.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:  # a worker starved of CPU (30 Chromium pages on one core): its joiners failed, it ends
            missing = joiners - len(out.joiners)
            error = f"its worker did not report within {args.give_up + args.hold + WORKER_SLACK:g} s"
            out.joiners.extend(asdict(JoinerResult(error=error)) for _ in range(missing))
            stop_workers(workers)
            break
        out.joiners.extend(asdict(JoinerResult(**j)) for j in joiners_of_worker)
        out.joiners_cpu_s += cpu
    posted = min(j["posted"] for j in out.joiners if j["posted"]) if any(j["posted"] for j in out.joiners) else at.value
    firsts = [j["posted"] + j["first_picture_ms"] / 1000 for j in out.joiners if j["first_picture_ms"] is not None]
    end = max(firsts) if len(firsts) == joiners else posted + args.give_up
    out.window_s = end - posted
    # The forced IDRs are read after the joiners left: the count covers the window and the hold after it, when
    # nothing joins (a lagging viewer's resync would ask too, and would be counted).
    out.relay_cpu_s = relay.cpu_seconds() - relay_cpu  # to the joiners' leaving: the burst and the hold
    out.forced = relay.stream()["keyframes_forced"] - before
    out.fanout_ms = relay.stream()["fanout_delay_ms"]
    for p in workers:
        p.join(10)
    for profiler in profilers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            profiler.wait(PROFILE_SECONDS + 10)
        stop_processes(profiler)
    time.sleep(1.5)  # the probe's file is written every second
    out.loop_lag_ms = {"before": relay.loop_lag(posted - args.baseline, posted), "during": relay.loop_lag(posted, end)}
    trace, keyframes = relay.join_trace()
    for joiner in out.joiners:
        steps = trace.get(joiner["name"], {})
        joiner["relay"] = {event: round((t - joiner["posted"]) * 1000, 1) for event, (t, _) in steps.items()}
        joiner["relay"]["how"] = steps.get("subscribed", (0, ""))[1]
        if "subscribed" in steps:  # the keyframe it starts from: the one shared, or the next published
            at = steps["subscribed"][0]
            shared = [k for k in keyframes if k <= at]
            kf = shared[-1] if joiner["relay"]["how"].startswith("shared") and shared else next(
                (k for k in keyframes if k > at), None)  # fmt: skip
            if kf is not None:
                joiner["relay"]["keyframe"] = round((kf - joiner["posted"]) * 1000, 1)
    for _ in watchers:
        reading = results.get(timeout=watch_for + 60)
        out.watchers.append(split_watcher(reading, posted, end, fps))
    for p in watchers:
        p.join(10)
    return out


def stop_workers(workers: list) -> None:
    """Joiners' workers still running, and what they started (Playwright's driver, Chromium), ended."""
    import psutil

    for p in workers:
        if not p.is_alive():
            continue
        with contextlib.suppress(psutil.NoSuchProcess):
            children = psutil.Process(p.pid).children(recursive=True)
            p.kill()
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()


def start_profiles(args: argparse.Namespace, relay: Relay, workers: list, at: float) -> list[subprocess.Popen]:
    """With ``--profile PREFIX``: py-spy recording the relay and the first joiners' worker process for
    ``PROFILE_SECONDS`` from just before the offers at ``at`` (wall clock), each to ``PREFIX-<who>-<n>.txt`` (its
    raw, collapsed stacks: ``sort -k2 -n``-able, flamegraph.pl-able). Non-blocking: the process is never paused."""
    if not args.profile:
        return []
    time.sleep(max(0.0, at - PROFILE_EARLY - time.time()))
    args.profiled = getattr(args, "profiled", 0) + 1
    spy = str(Path(sys.executable).with_name("py-spy"))
    how = ["--rate", str(PROFILE_RATE), "--duration", f"{PROFILE_SECONDS:g}", "--format", "raw"]
    how += ["--nonblocking", "--idle", "--threads"]  # never paused; the event loop's thread told apart, idle too
    return [
        subprocess.Popen(
            [spy, "record", "--pid", str(pid), *how, "-o", f"{args.profile}-{who}-{args.profiled}.txt"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for who, pid in (("relay", relay.proc.pid), ("joiners", workers[0].pid))
    ]


def phases(joiner: dict) -> dict[str, float | None]:
    """A joiner's time from its POST, phase by phase (``PHASES``; ms; None where a step is missing: the next
    phase then counts from the last step seen; negative where a step came before the one listed before it)."""
    offered = joiner.get("offered_ms")
    out: dict[str, float | None] = {}
    last = offered
    for phase, step in PHASES:
        where, _, key = step.rpartition(".")
        t = (joiner.get("relay", {}) if where else joiner).get(key if where else key + "_ms")
        out[phase] = None if t is None or last is None else _r(t - last)
        last = t if t is not None else last
    return out


def split_watcher(reading: dict, burst_start: float, burst_end: float, fps: float) -> dict:
    """A watcher's latencies before the burst (its usual) and while the others joined, by each picture's
    capture time."""
    before = [
        ms for ms, clock in zip(reading["latencies_ms"], reading["clocks"], strict=True) if clock < burst_start * 1000
    ]
    during = [
        ms for ms, clock in zip(reading["latencies_ms"], reading["clocks"], strict=True)
        if burst_start * 1000 <= clock <= burst_end * 1000
    ]  # fmt: skip
    usual = statistics.median(before) if before else None
    late = None if usual is None else usual + 2 * 1000 / fps
    return {
        "error": reading["error"],
        "lost": reading["lost"],
        "before": {
            "frames": len(before),
            **{f"p{p}": _r(percentile(before, p)) for p in (50, 95)},
            "max": _r(max(before, default=None)),
        },
        "during": {
            "frames": len(during),
            **{f"p{p}": _r(percentile(during, p)) for p in (50, 95)},
            "max": _r(max(during, default=None)),
        },
        "late_during": None if late is None else sum(ms > late for ms in during),
        "late_before": None if late is None else sum(ms > late for ms in before),
        "late_threshold_ms": _r(late),
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _at_percentile(joiners: list[dict], p: float) -> dict:
    """The joiner whose time from POST to its first picture is at percentile ``p`` (nearest rank)."""
    ranked = sorted(
        (j for j in joiners if j["offered_ms"] is not None), key=lambda j: j["first_picture_ms"] - j["offered_ms"]
    )
    return ranked[min(len(ranked) - 1, max(0, round(p / 100 * len(ranked)) - 1))] if ranked else {}


def summarise(repeat: Repeat, joiners: int) -> dict:
    ok = [j for j in repeat.joiners if not j["error"] and j["first_picture_ms"] is not None]
    firsts = [j["first_picture_ms"] for j in ok]
    from_post = [j["first_picture_ms"] - j["offered_ms"] for j in ok if j["offered_ms"] is not None]
    return {
        "connected": f"{len(ok)}/{joiners}",
        "errors": sorted({j["error"] for j in repeat.joiners if j["error"]}),
        "answer_p50_ms": _r(percentile([j["answered_ms"] for j in ok if j["answered_ms"] is not None], 50)),
        "connected_p50_ms": _r(percentile([j["connected_ms"] for j in ok if j["connected_ms"]], 50)),
        "connected_max_ms": _r(max((j["connected_ms"] for j in ok if j["connected_ms"]), default=None)),
        "steps_p50_ms": {
            step: _r(percentile([j[step + "_ms"] for j in ok if j[step + "_ms"] is not None], 50))
            for step in ("offered", "answered", "ice", "connected", "first_packet", "keyframe", "first_picture")
        },
        "relay_steps_p50_ms": {
            step: _r(percentile([j["relay"][step] for j in ok if step in j["relay"]], 50))
            for step in (
                "post_in",
                "offer_in",
                "answered",
                "ice_in",
                "nominated",
                "ice_valid",
                "ice_done",
                "connected",
                "subscribed",
                "keyframe",
                "first_sent",
            )
        },
        "decode_p50_max_ms": [
            _r(percentile([j["decode_ms"] for j in ok if j["decode_ms"] is not None], 50)),
            _r(max((j["decode_ms"] for j in ok if j["decode_ms"] is not None), default=None)),
        ],
        "relay_starts": {
            how: sum(1 for j in ok if j["relay"].get("how", "").split(" ")[0] == how)
            for how in ("shared", "asked", "waits")
        },
        # From its POST (the offer made): the measure. first_picture_* count from before its offer was made.
        "from_post_p50_p95_max_ms": [
            _r(percentile(from_post, 50)),
            _r(percentile(from_post, 95)),
            _r(max(from_post, default=None)),
        ],
        # Where the time of the joiner at p95 (from POST) went, and each phase's median over all joiners.
        "phases_p95_joiner_ms": phases(_at_percentile(ok, 95)) if ok else {},
        "phases_p50_ms": {
            phase: _r(percentile([p for j in ok if (p := phases(j)[phase]) is not None], 50)) for phase, _ in PHASES
        },
        "first_picture_p50_ms": _r(percentile(firsts, 50)),
        "first_picture_p95_ms": _r(percentile(firsts, 95)),
        "first_picture_max_ms": _r(max(firsts, default=None)),
        "first_age_max_ms": _r(max((j["first_age_ms"] for j in ok if j["first_age_ms"] is not None), default=None)),
        "forced_idrs": repeat.forced,
        "window_s": round(repeat.window_s, 2),
        "forced_per_s": round(repeat.forced / max(1.0, repeat.window_s), 2),
        "fanout_ms": repeat.fanout_ms,
        "relay_cpu_s": round(repeat.relay_cpu_s, 2),
        "loop_lag_ms": repeat.loop_lag_ms,
        "joiners_cpu_s": round(repeat.joiners_cpu_s, 2),
        "watchers": repeat.watchers,
        **(browser_summary(ok) if any(j["browser"] for j in ok) else {}),
    }


def browser_summary(ok: list[dict]) -> dict:
    """--probe chromium: the pages' own steps from their POSTs (medians, and the max), their first frames presented,
    their ICE and DTLS roles, and the checks on their selected pairs."""
    not_steps = ("clock_skew_ms", "offer_ahead_ms")
    steps = sorted({k for j in ok for k, v in j["browser"].items() if k.endswith("_ms") and k not in not_steps})
    values = lambda key: [j["browser"][key] for j in ok if j["browser"].get(key) is not None]  # noqa: E731
    presented = [j["presented_ms"] for j in ok if j["presented_ms"] is not None]
    return {
        "browser_steps_p50_max_ms": {k: [_r(percentile(values(k), 50)), _r(max(values(k)))] for k in steps},
        "presented_p50_p95_max_ms": [_r(percentile(presented, 50)), _r(percentile(presented, 95)), _r(max(presented))],
        "browser_roles": sorted(
            {f"ice {j['browser'].get('iceRole')}, dtls {j['browser'].get('dtlsRole')}" for j in ok}
        ),
        "browser_checks_p50_max": {
            k: [percentile(values(k), 50), max(values(k), default=None)]
            for k in ("requestsSent", "responsesReceived", "requestsReceived", "pairChanges")
        },
        "browser_hidden": sum(j["browser"].get("visibility") != "visible" for j in ok),
    }


def probe_list(text: str) -> list[str]:
    """``--probe``'s value: probes from ``PROBES``, comma-separated."""
    probes = text.split(",")
    if unknown := [p for p in probes if p not in PROBES]:
        raise argparse.ArgumentTypeError(f"unknown probe {', '.join(unknown)}; choose from {', '.join(PROBES)}")
    return probes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--joiners", type=int, default=30)
    ap.add_argument("--watchers", type=int, default=2)
    ap.add_argument("--per-worker", type=int, default=PEERS_PER_WORKER, help="joiners per worker process")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", type=float, default=5.0, help="seconds the watchers watch before the burst")
    ap.add_argument("--give-up", type=float, default=15.0, help="seconds a joiner has to connect with a picture")
    ap.add_argument("--hold", type=float, default=3.0, help="seconds the joiners watch before they leave")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds between repeats")
    ap.add_argument("--gop", type=float, default=1.0, help="the relay's [video] keyframe_interval, seconds")
    ap.add_argument(
        "--ice-addresses",
        default="127.0.0.1",
        help="comma-separated, 127.0.0.1 first: where the relay and the joiners gather ICE host candidates (with"
        " ::1 too, each joiner has two candidate pairs)",
    )
    ap.add_argument("--relay-dir", default="", help="run the relay from this checkout (default: this one)")
    ap.add_argument("--out", help="write <out>.json")
    ap.add_argument("--raw", action="store_true", help="<out>.json also has each joiner's steps (ms from its offer)")
    ap.add_argument(
        "--profile", metavar="PREFIX",
        help="py-spy the relay and the first joiners' worker over each burst (PREFIX-relay-<n>.txt,"
        " PREFIX-joiners-<n>.txt: raw stacks)",
    )  # fmt: skip
    ap.add_argument(
        "--probe", default="browser", type=probe_list, metavar="PROBE[,PROBE...]",
        help="browser (default): each joiner's offer made (ICE gathered) before the instant, so only the POSTs go"
        " out together; its ICE done as soon as its pair is nominated, not after aioice's 20 ms pacing wait"
        " (relay.webrtc.borrowed.PROMPT_ICE); its first keyframe kept and decoded after the burst, timed alone (its"
        " first picture: that keyframe whole plus its decode's own time). What a browser does on its own machine"
        " then takes none of the 2 cores the relay serves the others on. aiortc: the probe before 2026-11-30"
        " (offers made at the instant, aioice's ICE, each first picture decoded at once). chromium: headless"
        " Chromium pages with camrelay's player, --per-worker pages to a browser process, their offers made and"
        " their POSTs held to the instant (benchmarks/burstpages.py). Several, comma-separated: each repeat runs"
        " each in turn against the same relay (interleaved)",
    )  # fmt: skip
    ap.add_argument(
        "--probe-nice", type=int, default=0, metavar="N",
        help="the joiners' processes at niceness N (default 0): the relay and its encoder get the CPU first, the"
        " joiners what is left (their steps then include waiting for it)",
    )  # fmt: skip
    pin = ap.add_argument_group("pinned (--pin): is the probe the bottleneck?")
    pin.add_argument(
        "--pin", action="store_true", help="the relay on the system's cores; joiners, watchers and this on the others"
    )
    add_core_options(pin)
    pin.add_argument(
        "--source-apart", action="store_true",
        help="the relay's camera worker (its encoder) on the generator's cores: the system's do WebRTC alone",
    )  # fmt: skip
    add_stream_options(ap)
    args = ap.parse_args(argv)
    args.ice_addresses = args.ice_addresses.split(",")
    split = None
    if args.pin:
        split = split_or_exit(ap, args)
        os.sched_setaffinity(0, split.generator)  # this process, and the joiners and watchers it spawns
    elif args.source_apart or args.system_cores or args.generator_cores:
        ap.error("--source-apart, --system-cores and --generator-cores go with --pin")
    ctx = mp.get_context("spawn")
    relay = start_relay(args, split)
    repeats = []
    try:
        for i in range(args.repeats):
            for k, probe in enumerate(args.probe):
                if i or k:
                    time.sleep(args.settle)
                repeat = run_repeat(args, relay, ctx, probe)
                summary = {"probe": probe, "start_utc": time.strftime("%H:%M:%S", time.gmtime(repeat.started)),
                           "load": repeat.load, **summarise(repeat, args.joiners)}  # fmt: skip
                repeats.append({**summary, "joiners": repeat.joiners} if args.raw else summary)
                print(json.dumps(summary), flush=True)
    finally:
        stop_processes(relay.proc)
        Path(relay.loop_lag_file).unlink(missing_ok=True)
        Path(relay.join_trace_file).unlink(missing_ok=True)
    report = {**run_facts(" ".join(["python -m benchmarks.burst", *(argv or sys.argv[1:])])), "repeats": repeats}
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
