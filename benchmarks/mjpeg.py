"""MJPEG over HTTP with many clients, one of them slow: newest-frame latency per client.

    python -m benchmarks.mjpeg --clients 1,20 --duration 15 --size 1280x720 --fps 30

Starts a relay on loopback with the test pattern; for each point, N HTTP
clients read ``/mjpeg/cam0`` at once, plus (with ``--slow``) one client behind
a slow link (a 4 KiB receive buffer and a 0.2 s pause after every frame).
Each client reads the pixel clock (shared/spec/test-pattern.md) from every
``--sample``-th JPEG it receives and reports latency p50/p95 and frames/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time

import av
import psutil

from benchmarks.load import start_system
from benchmarks.options import add_stream_options
from benchmarks.peers import percentile
from relay.camera import pixelclock

SLOW_BUFFER = 4096  # bytes: far less than a frame, so the bytes wait on the relay's side
SLOW_PAUSE = 0.2  # seconds after each frame


def clock_ms(jpeg: bytes, decoder: av.CodecContext) -> int | None:
    frame = decoder.decode(av.Packet(jpeg))[0]
    return pixelclock.read(frame.to_ndarray(format="gray"))


async def client(port: int, duration: float, sample: int, slow: bool) -> dict:
    sock = socket.socket()
    if slow:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_BUFFER)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=SLOW_BUFFER if slow else 1 << 20)
    decoder = av.CodecContext.create("mjpeg", "r")
    latencies, frames = [], 0
    try:
        writer.write(b"GET /mjpeg/cam0 HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        start = time.monotonic()
        while time.monotonic() - start < duration:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
            jpeg = await reader.readexactly(length)
            arrived = time.time()
            frames += 1
            if frames % sample == 0 or slow:
                t = clock_ms(jpeg, decoder)
                if t is not None:
                    latencies.append(arrived * 1000 - t)
            if slow:
                await asyncio.sleep(SLOW_PAUSE)
        fps = frames / (time.monotonic() - start)
    finally:
        writer.close()
        await writer.wait_closed()
    return {"slow": slow, "fps": fps, "latencies": latencies}


CLIENTS_PER_PROCESS = 4  # so the load generator's own event loops are not the bottleneck


def _run_clients(port: int, n: int, duration: float, sample: int, slow: bool) -> list[dict]:
    async def go():
        return await asyncio.gather(*(client(port, duration, sample, slow) for _ in range(n)))

    return asyncio.run(go())


def point(port: int, n: int, duration: float, sample: int, slow: bool) -> tuple[dict, float]:
    import concurrent.futures
    import multiprocessing as mp

    groups = [min(CLIENTS_PER_PROCESS, n - i) for i in range(0, n, CLIENTS_PER_PROCESS)]
    jobs = [(g, False) for g in groups] + ([(1, True)] if slow else [])
    with concurrent.futures.ProcessPoolExecutor(len(jobs), mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_run_clients, port, g, duration, sample, is_slow) for g, is_slow in jobs]
        time.sleep(1.0)
        workers = [psutil.Process(pid) for pid in pool._processes]  # noqa: SLF001 - their CPU, for the report
        for w in workers:
            w.cpu_percent(None)
        time.sleep(max(0.0, duration - 2.0))
        generator_cpu = sum(w.cpu_percent(None) for w in workers)
        results = [r for f in futures for r in f.result()]
    fast = [r for r in results if not r["slow"]]
    lat = [x for r in fast for x in r["latencies"]]
    out = {
        "clients": n,
        "slow_client": slow,
        "latency_ms": {"p50": percentile(lat, 50), "p95": percentile(lat, 95), "samples": len(lat)},
        "fps": {"min": min(r["fps"] for r in fast), "median": sorted(r["fps"] for r in fast)[len(fast) // 2]},
        "generator_cpu_pct": generator_cpu,
    }
    if slow:
        s = [r for r in results if r["slow"]][0]["latencies"]
        out["slow_latency_ms"] = {"p50": percentile(s, 50), "max": max(s) if s else None, "last": s[-1] if s else None}
    return out, generator_cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,20")
    ap.add_argument("--duration", type=float, default=15.0)
    add_stream_options(ap, bitrate=False)
    ap.add_argument("--sample", type=int, default=3, help="read the pixel clock of every Nth frame per fast client")
    ap.add_argument("--no-slow", dest="slow", action="store_false", help="no slow client")
    ap.add_argument(
        "--system", choices=("camrelay", "seed_mjpeg"), default="camrelay",
        help="camrelay, or the seed system's threaded MJPEG server (benchmarks/baselines)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    system = start_system(args.system, args.size, args.fps, "2M")
    try:
        for n in (int(x) for x in args.clients.split(",")):
            procs = system.serving() + system.source()
            for p in procs:
                p.cpu_percent(None)
            result, _ = point(system.port, n, args.duration, args.sample, args.slow and n > 1)
            result["relay_cpu_pct"] = sum(p.cpu_percent(None) for p in procs)
            result["system"] = args.system
            print(json.dumps(result), flush=True)
    finally:
        system.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
