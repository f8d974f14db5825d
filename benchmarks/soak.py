"""Long soak: viewers watch for half an hour while the camera keeps failing; memory must stay flat.

    python -m benchmarks.soak --minutes 30 --viewers 20 --out docs/results/soak

Starts camrelay on loopback with a fault-injecting test pattern: the camera
"unplugs" every ``--fault-every`` seconds for ``--down`` seconds (the viewers
see the NO SIGNAL slate, then video again), and every ``--kill-every``
seconds the camera's worker process is killed with SIGKILL (the relay
restarts it). ``--viewers`` WebRTC peers (one of them a probe that decodes and
reads the pixel clock) stay connected throughout. Every ``--sample`` seconds
the relay's memory, file descriptors, threads, tasks and viewers are
recorded.

Writes ``<out>.json`` and ``<out>.png`` (memory over time, faults marked).
Exits 1 if a viewer lost its session, or the relay's memory grew more than
10 % between the first and the last ``SETTLED_MINUTES`` after warm-up.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import signal
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from benchmarks.load import start_system
from benchmarks.options import add_stream_options
from benchmarks.peers import PEERS_PER_WORKER, PeerPlan, percentile, run_worker
from benchmarks.resources import ResourceSeries, within

WARMUP_MINUTES = 3.0  # allocator and caches fill up first; growth is judged after this
SETTLED_MINUTES = 5.0  # average memory of the first and last this many minutes are compared
ALLOWED_GROWTH = 0.10


def stream_state(base: str) -> str:
    try:
        with urllib.request.urlopen(f"{base}/api/v1/streams", timeout=5) as r:
            return json.load(r)["streams"][0]["state"]
    except (OSError, KeyError, ValueError):
        return "unknown"


def kill_worker(relay: psutil.Process) -> bool:
    for child in relay.children():
        try:
            if "relay.camera.worker" in " ".join(child.cmdline()):
                child.send_signal(signal.SIGKILL)
                return True
        except psutil.Error:
            pass
    return False


def window_mean(series: ResourceSeries, start_min: float, end_min: float, what=None) -> float:
    """Mean of ``what`` (default: the relay's and its workers' memory, MiB) over samples in the window."""
    what = what or (lambda s: s.relay_rss_mb + s.workers_rss_mb)
    values = [what(s) for s in series.samples if start_min * 60 <= s.t < end_min * 60]
    return statistics.fmean(values) if values else 0.0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--viewers", type=int, default=20)
    ap.add_argument("--fault-every", type=float, default=180.0, help="seconds between camera unplugs")
    ap.add_argument("--down", type=float, default=5.0, help="seconds each unplug lasts")
    ap.add_argument("--kill-every", type=float, default=420.0, help="seconds between SIGKILLs of the camera worker")
    ap.add_argument("--sample", type=float, default=10.0, help="seconds between resource samples")
    add_stream_options(ap)
    ap.add_argument("--out", default="soak")
    args = ap.parse_args(argv)

    after = int(args.fault_every * args.fps)
    source = f"test:{args.size}@{args.fps:g}?fault=die&after={after}&down={args.down:g}"
    duration = args.minutes * 60
    system = start_system("camrelay", args.size, args.fps, args.bitrate, source=source)
    relay = system.serving()[0]
    base = f"http://127.0.0.1:{system.port}"
    series = ResourceSeries(base, relay.pid)
    ctx = mp.get_context("spawn")
    ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    light = args.viewers - 1
    plans = [
        PeerPlan("webrtc", system.url, min(PEERS_PER_WORKER, light - i), False, duration, args.fps, 10)
        for i in range(0, light, PEERS_PER_WORKER)
    ] + [PeerPlan("webrtc", system.url, 1, True, duration, args.fps)]
    procs = []
    try:
        for plan in plans:
            p = ctx.Process(target=run_worker, args=(plan, ready, start, results), daemon=True)
            p.start()
            procs.append(p)
            msg = ready.get(timeout=120)
            if msg[0] == "error":
                raise SystemExit(f"viewers did not connect: {msg[1]}")
        start.set()
        t0 = time.monotonic()
        next_kill = t0 + args.kill_every
        last_state = "live"
        while time.monotonic() - t0 < duration:
            s = series.sample()
            state = stream_state(base)
            if state != last_state:
                series.mark(state)
                last_state = state
            if time.monotonic() >= next_kill:
                if kill_worker(relay):
                    series.mark("worker killed")
                next_kill += args.kill_every
            print(
                f"t={s.t / 60:5.1f}min rss={s.relay_rss_mb:.0f}+{s.workers_rss_mb:.0f}MiB fds={s.open_fds}"
                f" tasks={s.tasks} threads={s.threads} viewers={s.viewers} state={state}",
                flush=True,
            )
            time.sleep(args.sample)
        peer_results = [r for _ in procs for r in results.get(timeout=120)]
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        system.close()

    minutes = series.samples[-1].t / 60
    early = window_mean(series, WARMUP_MINUTES, WARMUP_MINUTES + SETTLED_MINUTES)
    late = window_mean(series, minutes - SETTLED_MINUTES, minutes + 1)
    lat = [x for r in peer_results if r["probe"] for x in r["latencies_ms"]]
    last = series.samples[-1]
    fds_early, fds_late = (
        window_mean(series, a, b, lambda s: s.open_fds)
        for a, b in ((WARMUP_MINUTES, WARMUP_MINUTES + SETTLED_MINUTES), (minutes - SETTLED_MINUTES, minutes + 1))
    )
    checks = {
        "memory_flat": within(early, late, ALLOWED_GROWTH),
        "viewers_kept": all(not r["error"] for r in peer_results) and last.viewers == args.viewers,
        "fds_flat": within(fds_early, fds_late, ALLOWED_GROWTH),
    }
    fps = [r["fps"] for r in peer_results]
    frames = sum(r["frames"] + r["lost"] for r in peer_results)
    result = {
        "command": "python -m benchmarks.soak " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "minutes": minutes,
        "memory_mb": {"early_mean": early, "late_mean": late},
        "open_fds": {"early_mean": fds_early, "late_mean": fds_late},
        "viewer_fps": {"min": min(fps), "median": statistics.median(fps)},
        "frames_lost_pct": 100 * sum(r["lost"] for r in peer_results) / max(1, frames),
        "latency_ms": {"p50": percentile(lat, 50), "p95": percentile(lat, 95), "p99": percentile(lat, 99)},
        "errors": sorted({r["error"] for r in peer_results if r["error"]}),
        "checks": checks,
        **series.as_dict(),
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    title = f"soak: {args.viewers} viewers, camera unplugged every {args.fault_every:g} s ({result['date']})"
    series.plot(out.with_suffix(".png"), title)
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "events")}, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
