"""How many WebRTC viewers one relay carries, and what each one's latency is.

    python -m benchmarks.viewers --peers 1,10,20,30 --duration 20 --size 1280x720 --fps 30 --bitrate 2M

Starts a relay on loopback streaming the test pattern, then for each sweep
point connects N aiortc viewers from worker processes:

- light peers complete ICE/DTLS/SRTP and reassemble every frame but do not
  decode (a stand-in decoder counts frames), so a small machine can host many;
- probe peers (``--probes``, connected last, so they sit at the end of the
  relay's fan-out) decode every frame and read the pixel clock
  (shared/spec/test-pattern.md) for glass-to-glass latency.

Reports per point: probe latency p50/p95/p99, fps min/median across peers,
time from ICE connected to first frame, relay CPU (% of one core) and RSS,
and the load generator's own CPU, flagged when it is saturated. Writes JSON
and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field

import psutil

from benchmarks.ports import free_port

PEERS_PER_WORKER = 10  # aiortc peers per worker process: keeps each event loop responsive
WARMUP = 3.0  # seconds after every peer has a frame before measuring
GENERATOR_SATURATED = 0.85  # generator CPU above this share of all cores: its numbers are suspect


@dataclass
class PeerResult:
    probe: bool
    frames: int = 0
    fps: float = 0.0
    first_frame_ms: float | None = None  # from ICE connected to the first complete frame
    latencies_ms: list[float] = field(default_factory=list)
    error: str = ""


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# -- worker process ---------------------------------------------------------


class _Mark:
    """What a light peer's stand-in decoder hands the track instead of a picture."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


class _CountingDecoder:
    def decode(self, encoded_frame):
        return [_Mark(len(encoded_frame.data))]


def _worker(url: str, count: int, probe: bool, ready: mp.Queue, start: mp.Event, duration: float, results: mp.Queue):
    from relay.webrtc import restrict_host_addresses

    restrict_host_addresses(["127.0.0.1"])  # loopback only
    if not probe:
        import aiortc.rtcrtpreceiver

        aiortc.rtcrtpreceiver.get_decoder = lambda codec: _CountingDecoder()
    try:
        out = asyncio.run(_peers(url, count, probe, ready, start, duration))
    except Exception as exc:  # report, never hang the parent
        out = [asdict(PeerResult(probe, error=f"{type(exc).__name__}: {exc}"))]
        ready.put(("error", str(exc)))
    results.put(out)


async def _peers(url, count, probe, ready, start, duration):
    import aiohttp

    from relay.whepclient import WhepViewer, sample

    async with aiohttp.ClientSession() as http:
        viewers = [WhepViewer(url, http) for _ in range(count)]
        await asyncio.gather(*(v.connect() for v in viewers))
        results = [PeerResult(probe) for _ in viewers]
        await asyncio.gather(*(v.recv(timeout=20) for v in viewers))
        for v, r in zip(viewers, results, strict=True):
            if v.stats.connected_at is not None and v.stats.first_frame_at is not None:
                r.first_frame_ms = (v.stats.first_frame_at - v.stats.connected_at) * 1000
        ready.put(("ready", count))

        async def consume(v: WhepViewer, r: PeerResult):
            # Read continuously from the first frame on: frames a peer does not
            # take pile up in aiortc's track queue and would read as latency.
            t0 = end = None
            while end is None or time.monotonic() < end:
                try:
                    frame = await v.recv(timeout=5)
                except TimeoutError:
                    r.error = "no frame for 5 s"
                    break
                if end is None:
                    if not start.is_set():
                        continue
                    t0, end = time.monotonic(), time.monotonic() + duration
                r.frames += 1
                if probe:
                    s = sample(frame)
                    if s.latency_ms is not None:
                        r.latencies_ms.append(s.latency_ms)
            if t0 is not None:
                r.fps = r.frames / (time.monotonic() - t0)

        await asyncio.gather(*(consume(v, r) for v, r in zip(viewers, results, strict=True)))
        await asyncio.gather(*(v.close() for v in viewers))
        return [asdict(r) for r in results]


# -- controller ---------------------------------------------------------------


def start_relay(size: str, fps: float, bitrate: str, port: int, system: str = "camrelay") -> subprocess.Popen:
    if system == "mediarelay":
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.baselines.mediarelay",
            "--port",
            str(port),
            "--size",
            size,
            "--fps",
            f"{fps:g}",
        ]
        return _wait_up(subprocess.Popen(cmd), port)
    cmd = [
        sys.executable, "-m", "relay", "serve", "--source", f"cam0=test:{size}@{fps:g}", "--bitrate", bitrate,
        "--http-host", "127.0.0.1", "--http-port", str(port), "--ice-address", "127.0.0.1",
        "--encoder", "libx264", "--log-level", "warning", "--no-rtsp",
    ]  # fmt: skip
    return _wait_up(subprocess.Popen(cmd), port)


def _wait_up(proc: subprocess.Popen, port: int) -> subprocess.Popen:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/streams", timeout=2) as r:
                if json.load(r)["streams"][0]["frames_encoded"] > 0:
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("relay did not start")


def run_point(url: str, relay: psutil.Process, peers: int, probes: int, duration: float) -> dict:
    ctx = mp.get_context("spawn")
    ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    light = max(0, peers - probes)
    plan = [(min(PEERS_PER_WORKER, light - i), False) for i in range(0, light, PEERS_PER_WORKER)]
    plan.append((min(probes, peers), True))  # probes last: the end of the fan-out
    procs = []
    for count, probe in plan:
        p = ctx.Process(target=_worker, args=(url, count, probe, ready, start, duration, results), daemon=True)
        p.start()
        procs.append(p)
        msg = ready.get(timeout=120)  # one worker at a time: probes really do join last
        if msg[0] == "error":
            raise SystemExit(f"peers failed to connect: {msg[1]}")
    time.sleep(WARMUP)
    workers = [psutil.Process(p.pid) for p in procs]
    relay_procs = [relay, *relay.children(recursive=True)]  # the relay and its camera workers
    for proc in [*relay_procs, *workers]:
        proc.cpu_percent(None)
    t0 = time.monotonic()
    start.set()
    rss = []
    while time.monotonic() - t0 < duration:
        rss.append(sum(p.memory_info().rss for p in relay_procs))
        time.sleep(0.5)
    relay_main_cpu = relay.cpu_percent(None)
    relay_cpu = relay_main_cpu + sum(p.cpu_percent(None) for p in relay_procs[1:])
    gen_cpu = sum(w.cpu_percent(None) for w in workers)
    peer_results = [r for _ in procs for r in results.get(timeout=60)]
    for p in procs:
        p.join(30)
    fps = [r["fps"] for r in peer_results]
    lat = [x for r in peer_results if r["probe"] for x in r["latencies_ms"]]
    ttff = [r["first_frame_ms"] for r in peer_results if r["first_frame_ms"] is not None]
    cores = psutil.cpu_count()
    return {
        "peers": peers,
        "probes": min(probes, peers),
        "latency_ms": {
            "p50": percentile(lat, 50),
            "p95": percentile(lat, 95),
            "p99": percentile(lat, 99),
            "samples": len(lat),
        },
        "fps": {"min": min(fps), "median": statistics.median(fps)},
        "first_frame_ms": {"p50": percentile(ttff, 50), "max": max(ttff) if ttff else None},
        "relay_cpu_pct": relay_cpu,
        "relay_main_cpu_pct": relay_main_cpu,  # the event loop: signalling and every viewer's packets
        "relay_rss_mb": max(rss) / 2**20 if rss else None,
        "generator_cpu_pct": gen_cpu,
        "generator_saturated": gen_cpu + relay_cpu > GENERATOR_SATURATED * 100 * cores,
        "errors": [r["error"] for r in peer_results if r["error"]],
    }


def markdown(points: list[dict]) -> str:
    def f(v, d=0):
        return "—" if v is None else f"{v:.{d}f}"

    head = [
        "viewers", "latency p50 / p95 / p99 (ms)", "fps min / median", "first frame p50 / max (ms)",
        "relay CPU, all / event loop (% core)", "relay RSS (MiB)", "generator CPU (% core)",
    ]  # fmt: skip
    rows = ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    for p in points:
        lat, fps, ff = p["latency_ms"], p["fps"], p["first_frame_ms"]
        sat = " (saturated)" if p["generator_saturated"] else ""
        cells = [
            str(p["peers"]),
            f"{f(lat['p50'])} / {f(lat['p95'])} / {f(lat['p99'])}",
            f"{f(fps['min'], 1)} / {f(fps['median'], 1)}",
            f"{f(ff['p50'])} / {f(ff['max'])}",
            f"{f(p['relay_cpu_pct'])} / {f(p['relay_main_cpu_pct'])}",
            f(p["relay_rss_mb"]),
            f(p["generator_cpu_pct"]) + sat,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default="1,10,20,30", help="comma-separated sweep of viewer counts")
    ap.add_argument("--probes", type=int, default=2, help="decoding peers that read the pixel clock, per point")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds measured per point")
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--bitrate", default="2M")
    ap.add_argument("--target", help="WHEP URL of a running relay (default: start one on loopback)")
    ap.add_argument(
        "--system", choices=("camrelay", "mediarelay"), default="camrelay",
        help="what to start: camrelay, or the aiortc MediaRelay tutorial approach (benchmarks/baselines)",
    )  # fmt: skip
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)

    relay_proc = None
    if args.target:
        url = args.target
        relay = None
    else:
        port = free_port()
        relay_proc = start_relay(args.size, args.fps, args.bitrate, port, args.system)
        url = f"http://127.0.0.1:{port}/whep/cam0"
        relay = psutil.Process(relay_proc.pid)
    try:
        points = []
        for n in (int(x) for x in args.peers.split(",")):
            if relay is None:
                raise SystemExit("--target needs a relay pid to measure CPU; not supported yet")
            point = run_point(url, relay, n, args.probes, args.duration)
            print(json.dumps(point), flush=True)
            points.append(point)
    finally:
        if relay_proc is not None:
            relay_proc.terminate()
            relay_proc.wait(15)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores,"
        f" {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.platform()}",
        "command": "python -m benchmarks.viewers " + " ".join(argv if argv is not None else sys.argv[1:]),
        "size": args.size, "fps": args.fps, "bitrate": args.bitrate, "system": args.system,
    }  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "points": points}, fh, indent=2)
    print()
    print(markdown(points))
    return 0


if __name__ == "__main__":
    sys.exit(main())
