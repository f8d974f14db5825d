"""Churn soak: thousands of viewer sessions opened and closed; the relay must end where it started.

    python -m benchmarks.churn --sessions 2000 --out docs/results/churn

Starts camrelay on loopback (test pattern, 640x360 at 15 fps so the clients
are cheap), warms it up, then opens ``--sessions`` WHEP sessions in rounds of
``--round`` from short-lived client processes. Every session receives a
frame; two in three then close properly (DELETE and a DTLS close), and the
third vanishes: its process exits without a word, as a phone leaving Wi-Fi
does, and only the relay's consent deadline can free it. At the end, once the
relay holds no sessions, its resident memory, open file descriptors, threads
and asyncio tasks must be within 10 % of where they were after the warm-up.
Writes ``<out>.json`` and ``<out>.png`` (resources over time) and exits 1 if
anything stayed behind.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

from benchmarks.load import start_system
from benchmarks.options import add_stream_options
from benchmarks.resources import ResourceSeries, within

SETTLE_TIMEOUT = 60.0  # seconds for vanished sessions to be freed (the consent deadline is ~12 s)
SAMPLE_EVERY = 2.0  # seconds between resource samples
ALLOWED_GROWTH = 0.10  # the bound: within 10 % of the start


def _client_round(url: str, n: int) -> None:
    """One client process: n sessions, a frame each, 2 in 3 closed properly, then vanish."""
    import asyncio

    import aiohttp

    from benchmarks.peers import _install_decoders
    from relay.webrtc.borrowed import restrict_host_addresses
    from relay.webrtc.whepclient import WhepViewer

    restrict_host_addresses(["127.0.0.1"])
    _install_decoders(probe=False)  # reassemble, do not decode: cheap clients

    async def go() -> None:
        async with aiohttp.ClientSession() as http:
            viewers = [WhepViewer(url, http) for _ in range(n)]
            await asyncio.gather(*(v.connect() for v in viewers))
            await asyncio.gather(*(v.recv(timeout=20) for v in viewers))
            await asyncio.gather(*(v.close() for i, v in enumerate(viewers) if i % 3 != 2))

    try:
        asyncio.run(go())
    except Exception as exc:  # noqa: BLE001 - reported through the exit code
        print(f"churn round failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(3)
    os._exit(0)  # the remaining third vanish: no DELETE, no DTLS close, sockets just gone


def settle(series: ResourceSeries) -> float:
    start = time.monotonic()
    while series.sample().viewers:
        if time.monotonic() - start > SETTLE_TIMEOUT:
            raise SystemExit(f"sessions still held {SETTLE_TIMEOUT:g} s after the last round")
        time.sleep(SAMPLE_EVERY)
    time.sleep(5.0)  # let closing tasks finish
    series.sample()
    return time.monotonic() - start


def run_rounds(url: str, total: int, per_round: int, series: ResourceSeries) -> tuple[int, int]:
    ctx = mp.get_context("fork")  # this process has no threads or loop; forking skips re-importing aiortc
    done = failed = 0
    last_sample = 0.0
    while done < total:
        n = min(per_round, total - done)
        p = ctx.Process(target=_client_round, args=(url, n))
        p.start()
        p.join(120)
        if p.is_alive():
            p.kill()
            p.join()
        failed += p.exitcode != 0
        done += n
        if time.monotonic() - last_sample > SAMPLE_EVERY:
            series.sample()
            last_sample = time.monotonic()
    return done, failed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m benchmarks.churn", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--round", type=int, default=30, help="sessions per client process")
    ap.add_argument(
        "--warmup", type=int, default=500,
        help="sessions before the starting measurement: enough to reach the same peak (caches, allocator)",
    )  # fmt: skip
    add_stream_options(ap, size="640x360", fps=15.0, bitrate=False)
    ap.add_argument("--out", default="churn")
    args = ap.parse_args(argv)

    import aiohttp  # noqa: F401 - loaded once here, inherited by every forked client
    import aiortc  # noqa: F401

    system = start_system("camrelay", args.size, args.fps, "500k")
    try:
        series = ResourceSeries(f"http://127.0.0.1:{system.port}", system.serving()[0].pid)
        series.sample()
        series.mark("warm-up")
        run_rounds(system.url, args.warmup, args.round, series)
        settle(series)
        before = series.samples[-1]
        series.mark("churn")
        t0 = time.monotonic()
        done, failed = run_rounds(system.url, args.sessions, args.round, series)
        elapsed = time.monotonic() - t0
        series.mark("settled")
        settled_in = settle(series)
        after = series.samples[-1]
        peak = max(series.samples, key=lambda s: s.viewers)
    finally:
        system.close()

    checks = {
        "relay_rss": within(before.relay_rss_mb, after.relay_rss_mb, ALLOWED_GROWTH),
        "open_fds": within(before.open_fds, after.open_fds, ALLOWED_GROWTH),
        "threads": within(before.threads, after.threads, ALLOWED_GROWTH),
        "tasks": within(before.tasks, after.tasks, ALLOWED_GROWTH),
        "no_sessions_left": after.viewers == 0,
        "rounds_ok": failed == 0,
    }
    result = {
        "command": "python -m benchmarks.churn " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "sessions": done,
        "vanished": sum(1 for i in range(done) if (i % args.round) % 3 == 2),
        "failed_rounds": failed,
        "seconds": elapsed,
        "sessions_per_second": done / elapsed,
        "peak_viewers": peak.viewers,
        "settled_in_s": settled_in,
        "before": before.__dict__,
        "after": after.__dict__,
        "checks": checks,
        **series.as_dict(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    series.plot(out.with_suffix(".png"), f"churn: {done} sessions, a third vanishing ({result['date']})")
    for key in ("relay_rss_mb", "open_fds", "threads", "tasks"):
        print(f"{key}: {getattr(before, key):.1f} -> {getattr(after, key):.1f}")
    print(f"{done} sessions in {elapsed:.0f} s, {failed} failed rounds, peak {peak.viewers} held, settled in"
          f" {settled_in:.0f} s; checks: {checks}")  # fmt: skip
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
