"""One viewer on a bad link (5 %, then 20 % of the relay's datagrams dropped, plus
jitter, by a user-space proxy on loopback): its picture keeps coming back (NACK
retransmissions, PLI -> keyframe), and the other viewers do not notice."""

from __future__ import annotations

import asyncio
import time

from benchmarks.lossy import LossyLink, rewrite_candidates
from relay.webrtc.rtpsend import RETRANSMITS
from relay.webrtc.whepclient import WhepViewer

PHASE = 6.0  # seconds per loss setting
WINDOW = 2.0  # the lossy viewer must show a new picture in every window this long


def through(link: LossyLink):
    def rewrite(kind: str, sdp: str) -> str:
        if kind == "offer":  # the relay must send to the link, not to the viewer
            out, _ = rewrite_candidates(sdp, link.relay_side)
            return out
        out, relay_port = rewrite_candidates(sdp, link.viewer_side)  # the viewer must send to the link
        assert relay_port is not None, "the relay's answer has no loopback host candidate"
        link.relay_addr = ("127.0.0.1", relay_port)
        return out

    return rewrite


class Watch:
    """Reads a viewer's frames until stopped: arrival times, RTP timestamp gaps, pixel-clock latency."""

    def __init__(self, viewer: WhepViewer) -> None:
        self.viewer = viewer
        self.arrivals: list[float] = []
        self.pts: list[int] = []
        self.latency: list[tuple[float, float]] = []
        self.error: BaseException | None = None

    async def run(self, stop: asyncio.Event) -> None:
        from relay.webrtc.whepclient import sample

        try:
            while not stop.is_set():
                frame = await self.viewer.recv(timeout=10)
                now = time.monotonic()
                self.arrivals.append(now)
                self.pts.append(frame.pts)
                s = sample(frame)
                if s.latency_ms is not None:
                    self.latency.append((now, s.latency_ms))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def frames_between(self, t0: float, t1: float) -> int:
        return sum(1 for t in self.arrivals if t0 <= t < t1)

    def longest_gap(self, t0: float, t1: float) -> float:
        times = [t0, *(t for t in self.arrivals if t0 <= t < t1), t1]
        return max(b - a for a, b in zip(times, times[1:], strict=False))

    def median_latency(self, t0: float, t1: float) -> float:
        values = sorted(v for t, v in self.latency if t0 <= t < t1)
        return values[len(values) // 2]


async def test_a_lossy_viewer_recovers_and_the_others_do_not_notice(relay_server, http):
    link = LossyLink(loss=0.0, jitter_ms=0.0)
    await link.start()
    lossy = WhepViewer(relay_server.whep(), http, rewrite_sdp=through(link))
    others = [WhepViewer(relay_server.whep(), http) for _ in range(3)]
    stop = asyncio.Event()
    try:
        await asyncio.gather(lossy.connect(), *(v.connect() for v in others))
        await asyncio.gather(*(v.read_frames(5) for v in [lossy, *others]))
        # The relay's sender for the lossy viewer: the one whose retransmissions we expect.
        lossy_sender = next(
            s.pc.getTransceivers()[0].sender
            for s in relay_server.relay.sessions._sessions.values()
            if s.pc.remoteDescription and f" {link.relay_side} typ host" in s.pc.remoteDescription.sdp
        )
        assert link.counters.to_viewer > 0 and link.counters.to_relay > 0  # the media really goes through the link
        watches = [Watch(v) for v in [lossy, *others]]
        tasks = [asyncio.create_task(w.run(stop)) for w in watches]
        stream = relay_server.relay.streams["cam0"]
        t_clean = time.monotonic()
        await asyncio.sleep(PHASE)
        forced_before = stream.stats.keyframes_forced
        t_5 = time.monotonic()
        link.set_loss(0.05, jitter_ms=20)
        await asyncio.sleep(PHASE)
        t_20 = time.monotonic()
        link.set_loss(0.20, jitter_ms=30)
        await asyncio.sleep(PHASE)
        t_end = time.monotonic()
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        await asyncio.gather(*(v.close() for v in [lossy, *others]))
        link.close()

    lossy_w, *other_ws = watches
    for w in watches:
        assert w.error is None, repr(w.error)
    assert link.counters.dropped > 0
    # The lossy viewer's picture keeps coming back: a new frame in every window, at both loss rates.
    for t0, t1 in ((t_5, t_20), (t_20, t_end)):
        assert lossy_w.longest_gap(t0, t1) < WINDOW, (t0, t1, lossy_w.longest_gap(t0, t1))
        assert lossy_w.frames_between(t0, t1) > 0.3 * 30 * PHASE
    # Recovering took retransmissions the viewer asked for (NACK), not just luck.
    assert link.counters.nacks > 0
    assert lossy_sender.__dict__.get(RETRANSMITS, 0) > 0  # and the relay answered them
    print(f"link: {link.counters}; keyframes forced during loss: {stream.stats.keyframes_forced - forced_before}")
    # The others saw nothing: every frame, at the source's rate, no later than on the clean link.
    for w in other_ws:
        clean = w.frames_between(t_clean, t_5)
        for t0, t1 in ((t_5, t_20), (t_20, t_end)):
            assert w.frames_between(t0, t1) >= 0.9 * clean, (clean, w.frames_between(t0, t1))
            assert w.longest_gap(t0, t1) < 0.25
            assert w.median_latency(t0, t1) < w.median_latency(t_clean, t_5) + 15
        steps = {b - a for a, b in zip(w.pts, w.pts[1:], strict=False)}
        assert max(steps) < 2.5 * 90_000 / 30, "another viewer lost frames"
