"""The relay's own CPU per joiner of a burst, step by step: CPU counts, valid on a busy machine.

    python -m benchmarks.joincost --joiners 30 --rounds 6
    python -m benchmarks.joincost --relay-dir /tmp/camrelay-main --rounds 6   # another checkout's relay, same driver

Runs a real relay in this process (``relay.service.Relay`` and its HTTP app on 127.0.0.1, the test pattern
through its camera worker, as ``camrelay serve`` starts it, ``gc.freeze()`` included) and, per round, ``--joiners``
aiortc WHEP viewers in worker processes (``benchmarks.burst``'s joiners as ``--probe browser`` makes them: offers
made beforehand, POSTed at one instant, first keyframes kept and decoded after). The relay's event-loop thread is
measured from just before the POSTs to every session connected and ``SEND_TAIL`` more (each joiner's first frames
sent): its CPU (``time.thread_time``), less what the loop spends in the same time with nobody joining (measured
just before), over the joiners: ``loop_us_per_joiner``. Rounds alternate plain and profiled (``cProfile`` with the
thread's CPU clock): the profiled ones say where that CPU goes, the cumulative CPU of each step per joiner
(``STEPS``: the HTTP request, the offer's checks, aiortc's answer, ICE, DTLS, the session's set-up, the first
frames). Profiled figures carry the profiler's own cost (Python calls cost more under it): read the shares from
them and the totals from the plain rounds. With ``--relay-dir``, that checkout's ``relay`` and ``signalling`` are
imported instead of this one's (the joiners are this checkout's): an A/B of the relay's own work with one driver."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import multiprocessing as mp
import os
import pstats
import socket
import statistics
import sys
import time
from pathlib import Path

JOIN_TIMEOUT = 20.0  # seconds for every joiner to connect
SEND_TAIL = 0.1  # seconds measured after the last session connected: each joiner's first frames sent
IDLE_WINDOW = 1.0  # seconds of the loop's CPU with nobody joining, just before a round: its rate is subtracted
LEAD = 1.0  # seconds from telling the joiners' workers the instant to it
HOLD = 0.5  # seconds the joiners stay after their first keyframe
SETTLE = 1.5  # seconds between rounds (the sessions closed, their sockets gone)
# Steps: a name and the functions whose cumulative CPU it is (file's tail, function); a step may hold others
# (the offer's handler holds the answer). The first found of a step's functions is taken.
STEPS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("HTTP: request read, routed, middlewares, answered (whole)", (("aiohttp/web_protocol.py", "_handle_request"),)),
    ("  WHEP offer handler (whole)", (("signalling/whep.py", "whep_offer"),)),
    ("    offer checks (check_offer)", (("signalling/sdp.py", "check_offer"),)),
    ("    candidates kept (usable_candidates)", (("signalling/sdp.py", "usable_candidates"),)),
    ("    sections served (served_only)", (("signalling/sdp.py", "served_only"),)),
    ("    H.264 fitted (fit_h264 + offer_for_aiortc)", (("signalling/sdp.py", "fit_h264"),)),
    ("    offer_for_aiortc", (("signalling/sdp.py", "offer_for_aiortc"),)),
    ("    session made (ViewerSessions.create, whole)", (("relay/webrtc/sessions.py", "create"),)),
    ("      RTCPeerConnection()", (("aiortc/rtcpeerconnection.py", "__init__"),)),
    ("      addTransceiver", (("aiortc/rtcpeerconnection.py", "addTransceiver"),)),
    ("      setRemoteDescription", (("aiortc/rtcpeerconnection.py", "setRemoteDescription"),)),
    ("      createAnswer", (("aiortc/rtcpeerconnection.py", "createAnswer"),)),
    ("      setLocalDescription", (("aiortc/rtcpeerconnection.py", "setLocalDescription"),)),
    ("        ICE gathering", (("aiortc/rtcicetransport.py", "gather"),)),
    ("        SDP parsed (aiortc)", (("aiortc/sdp.py", "parse"),)),
    ("        SDP written (aiortc)", (("aiortc/sdp.py", "__str__"),)),
    ("    answer made whole (answer_all)", (("signalling/sdp.py", "answer_all"),)),
    ("    answer's profile (H264Fit.answer)", (("signalling/sdp.py", "answer"),)),
    ("    Link headers", (("signalling/whep.py", "_add_ice_links"),)),
    ("ICE: datagrams in (STUN)", (("aioice/ice.py", "datagram_received"), ("aioice/ice.py", "request_received"))),
    ("ICE: checks (aioice check_start)", (("aioice/ice.py", "check_start"),)),
    ("ICE: connect (whole)", (("aioice/ice.py", "connect"),)),
    ("DTLS: transport start (handshake, SRTP keys)", (("aiortc/rtcdtlstransport.py", "start"),)),
    ("DTLS: OpenSSL handshake steps", (("OpenSSL/SSL.py", "do_handshake"),)),
    ("session connected (_on_state)", (("relay/webrtc/sessions.py", "_on_state"),)),
    ("hub subscribed", (("relay/hub.py", "subscribe"),)),
    ("frames published to viewers (hub publish)", (("relay/hub.py", "publish"),)),
)


# Timed rounds: these functions wrapped to add up the loop thread's CPU spent in them (a coroutine's steps only,
# not its waits), nested ones counted in their callers too: (label, module, attribute path). Few calls each, so
# the timing costs next to nothing, unlike the profiler's.
TIMED: tuple[tuple[str, str, str], ...] = (
    ("TCP connections accepted", "asyncio.selector_events", "BaseSelectorEventLoop._accept_connection2"),
    ("HTTP bytes in (RequestHandler.data_received: parsing)", "aiohttp.web_protocol", "RequestHandler.data_received"),
    ("HTTP request handled (whole)", "aiohttp.web_protocol", "RequestHandler._handle_request"),
    ("  WHEP offer handler (whole)", "signalling.whep", "whep_offer"),
    ("    limits checked (_check_pending)", "signalling.whep", "_check_pending"),
    ("    limits checked (_check_viewer_limits)", "signalling.whep", "_check_viewer_limits"),
    ("    offer checks (check_offer)", "signalling.whep", "check_offer"),
    ("    candidates kept (usable_candidates)", "signalling.whep", "usable_candidates"),
    ("    sections served (served_only)", "signalling.whep", "served_only"),
    ("    H.264 fitted (fit_h264)", "signalling.whep", "fit_h264"),
    ("    offer for aiortc (H264Fit.offer_for_aiortc)", "signalling.sdp", "H264Fit.offer_for_aiortc"),
    ("    session made (ViewerSessions.create, whole)", "relay.webrtc.sessions", "ViewerSessions.create"),
    ("      RTCPeerConnection()", "aiortc.rtcpeerconnection", "RTCPeerConnection.__init__"),
    ("      addTransceiver", "aiortc.rtcpeerconnection", "RTCPeerConnection.addTransceiver"),
    ("      setRemoteDescription", "aiortc.rtcpeerconnection", "RTCPeerConnection.setRemoteDescription"),
    ("      createAnswer", "aiortc.rtcpeerconnection", "RTCPeerConnection.createAnswer"),
    ("      setLocalDescription", "aiortc.rtcpeerconnection", "RTCPeerConnection.setLocalDescription"),
    ("        SDP parsed by aiortc (SessionDescription.parse)", "aiortc.sdp", "SessionDescription.parse"),
    ("        SDP written by aiortc (SessionDescription.__str__)", "aiortc.sdp", "SessionDescription.__str__"),
    ("        ICE gathered (RTCIceGatherer.gather)", "aiortc.rtcicetransport", "RTCIceGatherer.gather"),
    ("      the send path attached (attach_to_sender)", "relay.webrtc.sessions", "attach_to_sender"),
    ("      additional host candidates (ice.with_additional_hosts)", "relay.webrtc.ice", "with_additional_hosts"),
    ("    answer made whole (answer_all)", "signalling.whep", "answer_all"),
    ("    answer's profile (H264Fit.answer)", "signalling.sdp", "H264Fit.answer"),
    ("UDP datagrams read (every socket's)", "asyncio.selector_events", "_SelectorDatagramTransport._read_ready"),
    ("ICE: STUN requests in (Connection.request_received)", "aioice.ice", "Connection.request_received"),
    ("ICE: DTLS datagrams in (Connection.data_received)", "aioice.ice", "Connection.data_received"),
    ("ICE: connect (Connection.connect)", "aioice.ice", "Connection.connect"),
    ("ICE: a check (Connection.check_start)", "aioice.ice", "Connection.check_start"),
    ("session connected (ViewerSessions._on_state)", "relay.webrtc.sessions", "ViewerSessions._on_state"),
    ("hub subscribed (PacketHub.subscribe)", "relay.hub", "PacketHub.subscribe"),
    ("frames published (PacketHub.publish)", "relay.hub", "PacketHub.publish"),
    ("HTTP responses written (Response.write_eof)", "aiohttp.web_response", "StreamResponse.write_eof"),
)


class _Clock:
    """CPU of the loop's thread, added up per label by the wrappers ``timed`` puts in place."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.on = False

    def add(self, label: str, spent: float, call: bool = True) -> None:
        if self.on:
            self.seconds[label] = self.seconds.get(label, 0.0) + spent
            if call:
                self.calls[label] = self.calls.get(label, 0) + 1


class _TimedSteps:
    """An awaitable that runs a coroutine, adding up the CPU of each of its steps (``send``/``throw``) as it
    goes, not its waits: a loop that never ends within the window (a sender's) counts too."""

    __slots__ = ("_coro", "_label", "_clock")

    def __init__(self, coro, label: str, clock: _Clock) -> None:
        self._coro, self._label, self._clock = coro, label, clock

    def __await__(self):
        it, clock, label = self._coro.__await__(), self._clock, self._label
        cpu, value, error, first = time.thread_time, None, None, True
        while True:
            began = cpu()
            try:
                yielded = it.send(value) if error is None else it.throw(error)
            except StopIteration as stop:
                clock.add(label, cpu() - began, first)
                return stop.value
            except BaseException:
                clock.add(label, cpu() - began, first)
                raise
            clock.add(label, cpu() - began, first)
            first = False
            try:
                value, error = (yield yielded), None
            except BaseException as exc:  # noqa: BLE001 - handed to the coroutine, as await would
                value, error = None, exc


def timed(clock: _Clock) -> list[tuple[object, str, object]]:
    """``TIMED``'s functions wrapped, and ``benchmarks.borrowed.JOIN_STEPS`` (aiortc's private ones; those found);
    returns what to put back."""
    import importlib
    import inspect

    from benchmarks.borrowed import JOIN_STEPS  # here: after --relay-dir is on the path (it imports the relay)

    undo = []
    for label, module_name, path in (*TIMED, *JOIN_STEPS):
        try:
            owner = importlib.import_module(module_name)
            *parents, name = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            original = inspect.getattr_static(owner, name)
        except (ImportError, AttributeError):  # another checkout's (--relay-dir), or a dependency's renamed name
            print(f"joincost: {module_name}.{path} not found: step {label!r} not timed", file=sys.stderr)
            continue
        function = original.__func__ if isinstance(original, classmethod | staticmethod) else original
        if inspect.iscoroutinefunction(function):

            async def wrapper(*a, _f=function, _label=label, **k):
                return await _TimedSteps(_f(*a, **k), _label, clock)

        else:

            def wrapper(*a, _f=function, _label=label, **k):
                began = time.thread_time()
                try:
                    return _f(*a, **k)
                finally:
                    clock.add(_label, time.thread_time() - began)

        wrapper.__name__ = getattr(function, "__name__", name)
        if isinstance(original, classmethod):
            wrapper = classmethod(wrapper)
        elif isinstance(original, staticmethod):
            wrapper = staticmethod(wrapper)
        setattr(owner, name, wrapper)
        undo.append((owner, name, original))
    return undo


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from benchmarks.options import add_stream_options, benchmark_parser

    ap = benchmark_parser("python -m benchmarks.joincost", __doc__)
    ap.add_argument("--joiners", type=int, default=30)
    ap.add_argument("--per-worker", type=int, default=10, help="joiners per worker process")
    ap.add_argument("--rounds", type=int, default=6, help="rounds (default 6)")
    ap.add_argument("--cprofile", action="store_true", help="every second round under cProfile too (its top list)")
    ap.add_argument("--relay-dir", help="import the relay from this checkout (default: this one)")
    ap.add_argument("--pstats", metavar="PREFIX", help="--cprofile: each profiled round's stats to PREFIX-<n>.pstats")
    ap.add_argument("--top", type=int, default=25, help="functions listed by their own CPU (profiled rounds)")
    ap.add_argument("--out", help="write <out>.json")
    add_stream_options(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.relay_dir:
        sys.path.insert(0, str(Path(args.relay_dir).resolve()))  # its relay and signalling, until imported
    result = asyncio.run(run(args))
    print(json.dumps(result["summary"], indent=1))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    return 0


async def run(args: argparse.Namespace) -> dict:
    from benchmarks.load import CAMRELAY_LOAD_ENV, camrelay_command
    from benchmarks.options import run_facts
    from benchmarks.ports import free_port
    from relay.cli import build_parser, load_config
    from relay.service import Relay
    from signalling.app import make_app
    from signalling.server import make_runner, start_site

    if args.relay_dir:  # imported from there; the joiners' workers (this module among them) are this tree's
        sys.path.remove(str(Path(args.relay_dir).resolve()))
    port = free_port()
    flags = build_parser().parse_args(camrelay_command(args.size, args.fps, args.bitrate, port)[3:])
    config = load_config(flags, {**os.environ, **CAMRELAY_LOAD_ENV})
    clock = _Clock()
    undo = timed(clock)  # before the app is made: its routes take the handler as it is then
    relay = Relay(config)
    runner = make_runner(make_app(relay), config.http)
    await runner.setup()
    await start_site(runner, socket.create_server(("127.0.0.1", port)))
    gc.freeze()  # as camrelay serve does after its start
    rounds: list[dict] = []
    try:
        stream = relay.streams["cam0"]
        while stream.stats.frames_encoded == 0:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        ctx = mp.get_context("spawn")
        for n in range(args.rounds):
            url = f"http://127.0.0.1:{port}/whep/cam0"
            rounds.append(await one_round(args, relay, url, ctx, clock, profiled=args.cprofile and n % 2 == 1))
            print(json.dumps({k: v for k, v in rounds[-1].items() if k not in ("steps", "top")}), flush=True)
            await asyncio.sleep(SETTLE)
    finally:
        await runner.cleanup()
        for owner, name, original in undo:
            setattr(owner, name, original)
    return {
        **run_facts("python -m benchmarks.joincost " + " ".join(sys.argv[1:])),
        "relay": str(Path(sys.modules["relay"].__file__).parent.parent),
        "summary": summarise(rounds),
        "rounds": rounds,
    }


async def one_round(args: argparse.Namespace, relay, url: str, ctx, clock: _Clock, profiled: bool) -> dict:
    from benchmarks.burst import JoinPlan, join_worker

    loop = asyncio.get_running_loop()
    ready, at, results = ctx.Queue(), ctx.Value("d", 0.0), ctx.Queue()
    workers = []
    for first in range(0, args.joiners, args.per_worker):
        plan = JoinPlan(url, min(args.per_worker, args.joiners - first), JOIN_TIMEOUT, HOLD, ("127.0.0.1",),
                        True, True, True)  # fmt: skip
        workers.append(ctx.Process(target=join_worker, args=(plan, ready, at, results), daemon=True))
    for p in workers:
        p.start()
    for _ in workers:
        if await loop.run_in_executor(None, ready.get, True, 60.0) != "ready":
            raise SystemExit("a joiners' worker could not start")
    # The loop's CPU with nobody joining: the encoder's frames in, published to no one.
    idle = time.thread_time()
    await asyncio.sleep(IDLE_WINDOW)
    idle_rate = (time.thread_time() - idle) / IDLE_WINDOW
    sessions = relay.sessions
    before = set(s.id for s in sessions.all_sessions())
    gc_before = gc.get_stats()
    at.value = time.time() + LEAD
    await asyncio.sleep(max(0.0, at.value - time.time() - 0.05))
    profile = cProfile.Profile(time.thread_time) if profiled else None
    clock.seconds.clear()
    clock.calls.clear()
    clock.on = True
    started, cpu = time.monotonic(), time.thread_time()
    if profile:
        profile.enable()
    deadline = started + JOIN_TIMEOUT
    while time.monotonic() < deadline:
        mine = [s for s in sessions.all_sessions() if s.id not in before]
        if len(mine) >= args.joiners and all(s.connected_at is not None for s in mine):
            break
        await asyncio.sleep(0.002)
    await asyncio.sleep(SEND_TAIL)
    if profile:
        profile.disable()
    cpu, window = time.thread_time() - cpu, time.monotonic() - started
    clock.on = False
    gc_after = gc.get_stats()
    joined = [s for s in sessions.all_sessions() if s.id not in before]
    connected = sum(1 for s in joined if s.connected_at is not None)
    out: list = []
    for _ in workers:
        got, _cpu = await loop.run_in_executor(None, results.get, True, JOIN_TIMEOUT + 60)
        out.extend(got)
    for p in workers:
        await loop.run_in_executor(None, p.join, 10)
    own = cpu - idle_rate * window
    row = {
        "profiled": profiled,
        "load": os.getloadavg()[0],
        "connected": connected,
        "pictures": sum(1 for j in out if j.get("first_picture_ms") is not None),
        "window_ms": round(window * 1000, 1),
        "loop_cpu_ms": round(cpu * 1000, 1),
        "idle_rate": round(idle_rate, 4),
        "loop_us_per_joiner": round(own / args.joiners * 1e6),
        "collections": [a["collections"] - b["collections"] for a, b in zip(gc_after, gc_before, strict=True)],
        "timed_us_per_joiner": {label: round(spent / args.joiners * 1e6) for label, spent in clock.seconds.items()},
        "timed_calls": dict(clock.calls),
    }
    if profile:
        stats = pstats.Stats(profile)
        if args.pstats:
            profile.dump_stats(f"{args.pstats}-{round(time.time())}.pstats")
        row["steps"] = steps_of(stats, args.joiners)
        row["top"] = top_of(stats, args.joiners, args.top)
        row["profiled_total_us_per_joiner"] = round(stats.total_tt / args.joiners * 1e6)
    return row


def _find(stats: pstats.Stats, tail: str, name: str):
    for (file, _line, func), value in stats.stats.items():
        if func == name and file.replace("\\", "/").endswith(tail):
            return value
    return None


def steps_of(stats: pstats.Stats, joiners: int) -> dict[str, dict]:
    """Each step's cumulative CPU (µs per joiner) and calls, as ``STEPS`` names them; absent steps left out."""
    out = {}
    for label, candidates in STEPS:
        for tail, name in candidates:
            value = _find(stats, tail, name)
            if value is not None:
                _cc, calls, _tt, ct, _callers = value
                out[label] = {"us_per_joiner": round(ct / joiners * 1e6), "calls": calls}
                break
    return out


def top_of(stats: pstats.Stats, joiners: int, count: int) -> list[dict]:
    """The functions with the most CPU of their own (µs per joiner), and their cumulative CPU."""
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:count]
    return [
        {
            "function": f"{Path(file).name}:{line} {func}" if file != "~" else func,
            "own_us": round(tt / joiners * 1e6),
            "cumulative_us": round(ct / joiners * 1e6),
            "calls": calls,
        }
        for (file, line, func), (_cc, calls, tt, ct, _callers) in rows
    ]


def summarise(rounds: list[dict]) -> dict:
    plain = [r["loop_us_per_joiner"] for r in rounds if not r["profiled"]]
    timed_steps: dict[str, list[int]] = {}
    for r in rounds:
        if not r["profiled"]:
            for label, us in r["timed_us_per_joiner"].items():
                timed_steps.setdefault(label, []).append(us)
    profiled = [r for r in rounds if r["profiled"]]
    steps: dict[str, list[int]] = {}
    for r in profiled:
        for label, step in r["steps"].items():
            steps.setdefault(label, []).append(step["us_per_joiner"])
    return {
        "connected": [r["connected"] for r in rounds],
        "loop_us_per_joiner_plain": plain,
        "loop_us_per_joiner_plain_median": statistics.median(plain) if plain else None,
        "timed_us_per_joiner_median": {label: statistics.median(v) for label, v in timed_steps.items()},
        "profiled_total_us_per_joiner": [r["profiled_total_us_per_joiner"] for r in profiled],
        "profiled_steps_us_per_joiner_median": {label: statistics.median(v) for label, v in steps.items()},
    }


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
