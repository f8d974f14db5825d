"""A lossy link on loopback, in user space (this machine has no netem); and what it costs, measured.

    python -m benchmarks.lossy --phase 10 --viewers 3 --out docs/results/lossy

``LossyLink`` sits between one WebRTC viewer and the relay. It owns two UDP
sockets on 127.0.0.1: ``viewer_side`` (the viewer is told the relay lives
there) and ``relay_side`` (the relay is told the viewer lives there). It
forwards every datagram, dropping a share of those that go to the viewer and
delaying each by a random jitter, so the viewer sees the media path of a bad
Wi-Fi link. The viewer's offer and the relay's answer are rewritten with
``rewrite_candidates`` so ICE runs through the link and nothing bypasses it.

Loss and jitter can change while it runs (``set_loss``); counters tell how
many datagrams went each way and how many were dropped.

Run as a module, it is the benchmark behind ``tests/test_lossy_viewer.py``
(which judges by frames, never by the clock): camrelay on loopback, one
viewer behind the link and ``--viewers`` clean ones, ``--phase`` seconds
each of a clean link, 5 % loss with 20 ms of jitter, and 20 % with 30 ms.
For each phase it reports, for the lossy viewer and for the clean ones, the
frames shown per second, the longest gap between two shown frames and the
pixel-clock latency (p50, p95): how often the lossy viewer's picture comes
back, and whether the others notice; and the stream's keyframes in the phase,
and of them those forced (the lossy viewer's PLIs: every viewer gets them).
``--relay-dir`` runs camrelay from another checkout, for an A/B.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class LinkCounters:
    to_viewer: int = 0
    to_relay: int = 0
    dropped: int = 0
    nacks: int = 0  # RTCP generic NACKs the viewer sent (RFC 4585), read from SRTCP's clear header
    plis: int = 0  # RTCP picture loss indications the viewer sent


RTPFB, PSFB = 205, 206  # RTCP feedback packet types
NACK_FMT, PLI_FMT = 1, 1


class _Side(asyncio.DatagramProtocol):
    def __init__(self, link: LossyLink, name: str) -> None:
        self.link, self.name = link, name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.link._received(self.name, data, addr)


class LossyLink:
    def __init__(self, loss: float = 0.0, jitter_ms: float = 0.0, seed: int = 1) -> None:
        self.loss, self.jitter_ms = loss, jitter_ms
        self.counters = LinkCounters()
        self._rng = random.Random(seed)
        self._viewer: _Side | None = None
        self._relay: _Side | None = None
        self.viewer_addr: tuple[str, int] | None = None  # learnt from the first datagram
        self.relay_addr: tuple[str, int] | None = None  # the relay's candidate, from its answer
        self._timers: set[asyncio.TimerHandle] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        _, self._viewer = await loop.create_datagram_endpoint(
            lambda: _Side(self, "viewer"), local_addr=("127.0.0.1", 0)
        )
        _, self._relay = await loop.create_datagram_endpoint(lambda: _Side(self, "relay"), local_addr=("127.0.0.1", 0))

    @property
    def viewer_side(self) -> int:
        assert self._viewer and self._viewer.transport
        return self._viewer.transport.get_extra_info("sockname")[1]

    @property
    def relay_side(self) -> int:
        assert self._relay and self._relay.transport
        return self._relay.transport.get_extra_info("sockname")[1]

    def rewrite(self, kind: str, sdp: str) -> str:
        """A ``WhepViewer``'s ``rewrite_sdp``: the offer and the answer name the link, so media goes through it."""
        if kind == "offer":  # the relay must send to the link, not to the viewer
            out, _ = rewrite_candidates(sdp, self.relay_side)
            return out
        out, relay_port = rewrite_candidates(sdp, self.viewer_side)  # the viewer must send to the link
        if relay_port is None:
            raise ValueError("the relay's answer has no loopback host candidate")
        self.relay_addr = ("127.0.0.1", relay_port)
        return out

    def set_loss(self, loss: float, jitter_ms: float | None = None) -> None:
        self.loss = loss
        if jitter_ms is not None:
            self.jitter_ms = jitter_ms

    def close(self) -> None:
        for t in self._timers:
            t.cancel()
        self._timers.clear()
        for side in (self._viewer, self._relay):
            if side and side.transport:
                side.transport.close()

    def _received(self, side: str, data: bytes, addr) -> None:
        if side == "viewer":  # from the viewer, on to the relay
            self.viewer_addr = addr
            if len(data) >= 8 and data[0] >> 6 == 2:  # RTP/RTCP version 2; SRTCP leaves the first header clear
                kind, fmt = data[1], data[0] & 0x1F
                self.counters.nacks += kind == RTPFB and fmt == NACK_FMT
                self.counters.plis += kind == PSFB and fmt == PLI_FMT
            if self.relay_addr and self._relay and self._relay.transport:
                self.counters.to_relay += 1
                self._relay.transport.sendto(data, self.relay_addr)
            return
        # From the relay, on to the viewer: the lossy direction (the media).
        if self.viewer_addr is None or not (self._viewer and self._viewer.transport):
            return
        if self._rng.random() < self.loss:
            self.counters.dropped += 1
            return
        self.counters.to_viewer += 1
        delay = self._rng.uniform(0, self.jitter_ms) / 1000 if self.jitter_ms else 0.0
        if delay <= 0:
            self._viewer.transport.sendto(data, self.viewer_addr)
            return
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def send() -> None:
            self._timers.discard(handle)
            if self._viewer and self._viewer.transport and not self._viewer.transport.is_closing():
                self._viewer.transport.sendto(data, self.viewer_addr)

        handle = loop.call_later(delay, send)
        self._timers.add(handle)


_CANDIDATE = re.compile(r"^(a=candidate:\S+ \d+ udp \d+) 127\.0\.0\.1 (\d+) (typ host.*)$", re.M | re.I)


def rewrite_candidates(sdp: str, port: int) -> tuple[str, int | None]:
    """Keep the SDP's first loopback UDP host candidate, pointed at ``port``; drop the others.

    Returns the new SDP and the port the candidate had, so that the only path is through the link.
    """
    out, original = [], None
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            m = _CANDIDATE.match(line)
            if m is None or original is not None:
                continue
            original = int(m.group(2))
            line = f"{m.group(1)} 127.0.0.1 {port} {m.group(3)}"
        out.append(line)
    return "\r\n".join(out) + "\r\n", original


# -- the benchmark ------------------------------------------------------------

PHASES = (("clean", 0.0, 0.0), ("5 % loss, 20 ms jitter", 0.05, 20.0), ("20 % loss, 30 ms jitter", 0.20, 30.0))


class Watch:
    """Reads a viewer's frames: when each came out of the decoder, and its pixel-clock latency."""

    def __init__(self, viewer) -> None:
        self.viewer = viewer
        self.arrivals: list[float] = []
        self.latency: list[tuple[float, float]] = []

    async def run(self, stop: asyncio.Event) -> None:
        from relay.webrtc.whepclient import sample

        while not stop.is_set():
            frame = await self.viewer.recv(timeout=10)
            now = time.monotonic()
            self.arrivals.append(now)
            s = sample(frame)
            if s.latency_ms is not None:
                self.latency.append((now, s.latency_ms))

    def phase(self, t0: float, t1: float) -> dict:
        from benchmarks.peers import percentile

        times = [t0, *(t for t in self.arrivals if t0 <= t < t1), t1]
        latency = [v for t, v in self.latency if t0 <= t < t1]
        return {
            "fps": (len(times) - 2) / (t1 - t0),
            "longest_gap_s": max(b - a for a, b in zip(times, times[1:], strict=False)),
            "latency_ms": {"p50": percentile(latency, 50), "p95": percentile(latency, 95)},
        }


async def measure(url: str, viewers: int, seconds: float) -> dict:
    import aiohttp

    from relay.webrtc.borrowed import restrict_host_addresses
    from relay.webrtc.whepclient import WhepViewer

    restrict_host_addresses(["127.0.0.1"])
    link = LossyLink()
    await link.start()
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as http:
        lossy = WhepViewer(url, http, rewrite_sdp=link.rewrite)
        clean = [WhepViewer(url, http) for _ in range(viewers)]
        try:
            await asyncio.gather(*(v.connect() for v in [lossy, *clean]))
            await asyncio.gather(*(v.read_frames(5) for v in [lossy, *clean]))
            watches = [Watch(v) for v in [lossy, *clean]]
            tasks = [asyncio.create_task(w.run(stop)) for w in watches]
            await asyncio.sleep(1.0)  # what the warm-up left queued is read before the first phase starts
            spans = []
            for name, loss, jitter in PHASES:
                link.set_loss(loss, jitter_ms=jitter)
                t0, before = time.monotonic(), await asyncio.to_thread(_keyframes, url)
                await asyncio.sleep(seconds)
                after = await asyncio.to_thread(_keyframes, url)
                spans.append((name, t0, time.monotonic(), [b - a for a, b in zip(before, after, strict=True)]))
            stop.set()
            await asyncio.gather(*tasks)
        finally:
            stop.set()
            await asyncio.gather(*(v.close() for v in [lossy, *clean]))
            link.close()
    out: dict = {"viewers": viewers, "phase_s": seconds, "link": asdict(link.counters), "phases": []}
    for name, t0, t1, (keyframes, forced) in spans:
        others = [w.phase(t0, t1) for w in watches[1:]]
        out["phases"].append(
            {
                "phase": name,
                "keyframes": keyframes,  # the stream's, every viewer's: its GOP's and those forced
                "keyframes_forced": forced,  # for the viewers' PLIs (and FIRs) here
                "lossy": watches[0].phase(t0, t1),
                "clean": {
                    "fps_min": min(o["fps"] for o in others),
                    "longest_gap_s": max(o["longest_gap_s"] for o in others),
                    "latency_ms": {"p50": max(o["latency_ms"]["p50"] or 0 for o in others)},
                },
            }
        )
    return out


def _keyframes(url: str) -> tuple[int, int]:
    """The stream's keyframes and forced keyframes so far, from the relay's API."""
    from benchmarks.load import relay_stream

    stream = relay_stream(url) or {}
    return stream.get("keyframes", 0), stream.get("keyframes_forced", 0)


def markdown(result: dict) -> str:
    ms = lambda v: "—" if v is None else f"{v:.0f}"  # noqa: E731
    rows = [
        "| link | lossy viewer: fps / longest gap / latency p50, p95 (ms) | clean viewers (worst): fps / longest gap"
        " / latency p50 (ms) | keyframes (forced) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for p in result["phases"]:
        lossy, clean = p["lossy"], p["clean"]
        rows.append(
            f"| {p['phase']} | {lossy['fps']:.1f} / {ms(lossy['longest_gap_s'] * 1000)} / "
            f"{ms(lossy['latency_ms']['p50'])}, {ms(lossy['latency_ms']['p95'])} | "
            f"{clean['fps_min']:.1f} / {ms(clean['longest_gap_s'] * 1000)} / {ms(clean['latency_ms']['p50'])} | "
            f"{p['keyframes']} ({p['keyframes_forced']}) |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.load import start_system
    from benchmarks.options import add_stream_options

    ap = argparse.ArgumentParser(description="One viewer on a lossy link beside clean ones: gaps and latency.")
    ap.add_argument("--phase", type=float, default=10.0, help="seconds per link setting (default 10)")
    ap.add_argument("--viewers", type=int, default=3, help="clean viewers beside the lossy one (default 3)")
    ap.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    ap.add_argument("--relay-dir", help="run camrelay from this checkout (an A/B against another version)")
    add_stream_options(ap, size="640x360", fps=30.0)
    args = ap.parse_args(argv)
    system = start_system("camrelay", args.size, args.fps, args.bitrate, tree=args.relay_dir)
    try:
        result = asyncio.run(measure(system.url, args.viewers, args.phase))
    finally:
        system.close()
    result.update(size=args.size, fps=args.fps, bitrate=args.bitrate, relay_dir=args.relay_dir)
    print(json.dumps(result), flush=True)
    print(markdown(result))
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
