"""A subscriber that falls behind (relay/lag.py, relay/hub.py): late frames within the lag limit, whole GOPs
skipped past it, one resync per fall, and at most one keyframe a second asked for every laggard together.

Judged by counts: frames fed to the hub by the test, subscribers that read slowly by construction (they read
when the test says), and the keyframe gate's clock injected."""

from __future__ import annotations

import logging

from relay.hub import VIEWER_KEYFRAME_INTERVAL, EncodedFrame, PacketHub
from relay.lag import LAG_KEYFRAME_INTERVAL, Backlog, KeyframeGate, LagLimit

FPS = 30
TICK = 90_000 // FPS  # pts ticks a frame


class Clock:
    """The hub's clock, moved by the test: a frame's time per frame published (``Feed``)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Requests:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def frame(n: int, gop: int = FPS, size: int = 1000) -> EncodedFrame:
    """Frame ``n`` of a 30 fps stream with a keyframe every ``gop`` frames."""
    return EncodedFrame(bytes(size), n * TICK, n % gop == 0, capture_time=n / FPS)


class Feed:
    """A camera into ``hub``: frame after frame, the clock a frame's time on each."""

    def __init__(self, hub: PacketHub, clock: Clock, gop: int = FPS) -> None:
        self.hub, self.clock, self.gop = hub, clock, gop
        self.n = 0

    def publish(self, count: int = 1) -> None:
        for _ in range(count):
            self.clock.now += 1 / FPS
            self.hub.publish(frame(self.n, self.gop))
            self.n += 1


def read_all(sub) -> list[int]:
    """Every frame it has to read, now: their numbers."""
    out = []
    while (f := sub.get_nowait()) is not None:
        out.append(f.pts // TICK)
    return out


def hub_and_feed(gop: int = FPS, max_lag: float | None = 1.0) -> tuple[PacketHub, Feed, Requests]:
    clock, requests = Clock(), Requests()
    hub = PacketHub("cam0", requests, max_lag=max_lag, clock=clock)
    return hub, Feed(hub, clock, gop), requests


# -- the backlog and the gate, sans-io


def test_a_backlog_skips_to_the_oldest_keyframe_from_which_the_rest_fits():
    limit = LagLimit(seconds=1.0)
    backlog = Backlog()
    for n in range(40):  # keyframes at 0 and 30: 40 frames span 1.3 s
        backlog.append(frame(n))
    assert not backlog.fits(limit, frame(40))
    assert backlog.skip_to_keyframe(limit, frame(40)) == 30  # from 30 on (30..40) fits; 0 was its first frame
    assert [f.pts // TICK for f in backlog] == list(range(30, 40)) and backlog.bytes == 10 * 1000


def test_a_backlog_with_no_keyframe_to_skip_to_skips_nothing_unless_the_frame_coming_is_one():
    limit = LagLimit(seconds=1.0)
    backlog = Backlog()
    for n in range(31):  # a keyframe at its head only
        backlog.append(frame(n, gop=300))
    assert backlog.skip_to_keyframe(limit, frame(31, gop=300)) is None and len(backlog) == 31
    assert backlog.skip_to_keyframe(limit, frame(300, gop=300)) == 31 and len(backlog) == 0  # it starts a GOP


def test_a_backlog_is_bounded_in_bytes_and_frames_too():
    backlog = Backlog()
    backlog.append(frame(0, size=600))
    assert not backlog.fits(LagLimit(seconds=None, bytes=1000), frame(1, size=500))
    assert backlog.fits(LagLimit(seconds=None, bytes=1100), frame(1, size=500))
    assert not backlog.fits(LagLimit.frames_only(1), frame(1))


def test_the_gate_asks_once_for_every_laggard_until_a_keyframe_comes_and_at_most_once_an_interval():
    sent = Requests()
    gate = KeyframeGate(sent, interval=1.0)
    gate.ask(10.0)
    gate.ask(10.1)  # a second laggard before the keyframe: the one asked serves it
    gate.tick(10.2)
    gate.keyframe()
    assert (sent.count, gate.asked) == (1, 2)
    gate.ask(10.5)  # a new laggard within the interval: held
    gate.tick(10.9)
    assert sent.count == 1
    gate.tick(11.0)  # the interval is over and no keyframe came: asked now
    assert sent.count == 2
    gate.ask(11.2)
    gate.keyframe()  # the encoder's own keyframe came first: nothing more to ask
    gate.tick(12.5)
    assert (sent.count, gate.sent, gate.asked) == (2, 2, 4)


# -- in the hub


async def test_a_viewer_moderately_behind_gets_every_frame_late_and_no_resync():
    hub, feed, requests = hub_and_feed()
    sub = hub.subscribe("viewer")
    feed.publish(1)
    assert read_all(sub) == [0]
    feed.publish(20)  # two thirds of a second without reading (the 8-frame rule resynced it at 9)
    assert read_all(sub) == list(range(1, 21))
    assert (sub.resyncs, sub.dropped, hub.resyncs, hub.dropped) == (0, 0, 0, 0)
    assert requests.count == 1  # its join only


async def test_a_viewer_that_reads_in_bursts_never_resyncs():
    """A reader whose turn comes every 12 frames (a busy event loop) gets them all, each burst."""
    hub, feed, requests = hub_and_feed()
    sub = hub.subscribe("viewer")
    got = []
    for _ in range(30):
        feed.publish(12)
        got += read_all(sub)
    assert got == list(range(360)) and (sub.resyncs, sub.dropped, requests.count) == (0, 0, 1)


async def test_a_viewer_far_behind_skips_whole_gops_once_and_then_gets_every_frame():
    hub, feed, requests = hub_and_feed(gop=FPS)
    sub, other = hub.subscribe("slow"), hub.subscribe("fast")
    feed.publish(1)
    read_all(sub)
    fast = read_all(other)
    for _ in range(75):  # 2.5 s without reading: past its limit twice, with keyframes at 30 and 60 held
        feed.publish()
        fast += read_all(other)
    late = read_all(sub)
    assert late == list(range(60, 76))  # from the keyframe it held on, nothing missing
    assert (sub.resyncs, sub.dropped, hub.resyncs) == (1, 59, 1)  # one fall: 1..59, lost as two GOPs
    for _ in range(300):  # then it keeps up: no more resyncs, every frame
        feed.publish()
        late += read_all(sub)
        fast += read_all(other)
    assert late == list(range(60, 376)) and sub.resyncs == 1
    assert fast == list(range(376)) and (other.resyncs, other.dropped) == (0, 0)
    # The two joins ask once (the second joins while the keyframe the first asked for is on its way); skipping to
    # a keyframe it holds asks for none.
    assert (requests.count, hub.keyframe_requests_merged) == (1, 1)


async def test_a_viewer_far_behind_with_no_keyframe_held_waits_for_the_next_and_asks_for_it_once():
    hub, feed, requests = hub_and_feed(gop=300)  # an IP camera's 10 s GOP
    sub = hub.subscribe("viewer")
    feed.publish(1)
    assert read_all(sub) == [0]
    feed.publish(32)  # 1..31 fit its second of lag; 32 does not, and none of them is a keyframe
    assert (sub.resyncs, sub.dropped, sub.waiting_keyframe, len(sub)) == (1, 32, True, 0)
    assert (requests.count, hub.lag_keyframe_requests) == (2, 1)  # its join, and one for its fall
    feed.publish(300 - feed.n)  # the encoder does not answer (a camera passed through): it waits, asks no more
    assert (sub.resyncs, sub.dropped, requests.count) == (1, 299, 2)
    feed.publish(5)  # the camera's own keyframe at 300
    assert read_all(sub) == list(range(300, 305)) and sub.resyncs == 1


async def test_many_lagging_viewers_cause_at_most_one_keyframe_request_a_second():
    """20 viewers that each read every 7th frame's time, with a lag limit of 4 frames: each falls behind over and
    over with no keyframe held, and waits for one. The encoder makes one at the next frame whenever asked."""
    clock, asked_at = Clock(), []
    hub = PacketHub("cam0", lambda: asked_at.append(clock.now), max_lag=0.1, clock=clock)
    subs = [hub.subscribe(f"viewer-{i}") for i in range(20)]
    asked_at.clear()  # the joins' requests: not the laggards'
    for n in range(10 * FPS):
        clock.now += 1 / FPS
        forced = bool(asked_at) and asked_at[-1] == clock.now - 1 / FPS  # asked during the frame before
        hub.publish(EncodedFrame(bytes(1000), n * TICK, n == 0 or forced, n / FPS))
        for i, sub in enumerate(subs):
            if (n + i) % 7 == 0:
                read_all(sub)
    assert sum(s.resyncs for s in subs) > 5 * 20  # each fell behind and waited for a keyframe, again and again
    assert hub.keyframe_gate.asked > 10 * len(asked_at)  # asked for by each of them, each time: 20 a second
    assert 9 <= len(asked_at) <= 10  # one keyframe a second for all of them
    assert all(b - a >= LAG_KEYFRAME_INTERVAL - 1e-9 for a, b in zip(asked_at, asked_at[1:], strict=False))


async def test_a_viewer_sending_pli_after_pli_gets_one_keyframe_at_once_then_at_most_one_a_second():
    """A viewer on a lossy link (or whose socket overflows) sends a PLI at every frame for 10 s. The first reaches
    the encoder at once; after it, at most one a second (VIEWER_KEYFRAME_INTERVAL): the shared encoder's stream,
    which every viewer gets, is not made of keyframes. The encoder makes one at the next frame whenever asked."""
    clock, asked_at = Clock(), []
    hub = PacketHub("cam0", lambda: asked_at.append(clock.now), clock=clock)
    sub = hub.subscribe("viewer")
    hub.publish(EncodedFrame(bytes(1000), 0, True, 0.0))  # its join's keyframe
    read_all(sub)
    asked_at.clear()
    first_pli = clock.now
    for n in range(1, 10 * FPS + 1):
        hub.request_keyframe_for_viewer()
        clock.now += 1 / FPS
        forced = bool(asked_at) and asked_at[-1] == clock.now - 1 / FPS  # asked during the frame before
        hub.publish(EncodedFrame(bytes(1000), n * TICK, forced, n / FPS))
        read_all(sub)
    assert asked_at[0] == first_pli  # the first PLI is not held
    assert hub.viewer_keyframe_gate.asked == 10 * FPS
    assert (
        10 <= len(asked_at) <= 11
    )  # one a second (each PLI to the encoder: 300 here, 20 with the worker's own 0.5 s limit)
    assert all(b - a >= VIEWER_KEYFRAME_INTERVAL - 1e-9 for a, b in zip(asked_at, asked_at[1:], strict=False))
    assert (sub.resyncs, sub.dropped) == (0, 0)


async def test_a_viewers_pli_held_is_served_by_the_cameras_own_keyframe():
    """A PLI held (another went out less than a second before) asks for nothing more when the stream's own
    keyframe comes first: it serves the viewer."""
    clock, requests = Clock(), Requests()
    hub = PacketHub("cam0", requests, clock=clock)
    hub.request_keyframe_for_viewer()  # at once
    hub.publish(EncodedFrame(bytes(1000), 0, True, 0.0))  # the keyframe it asked for
    clock.now += 0.2
    hub.request_keyframe_for_viewer()  # within the second: held
    assert requests.count == 1
    clock.now += 0.3
    hub.publish(EncodedFrame(bytes(1000), TICK, True, 0.5))  # the camera's own keyframe (its GOP)
    for n in range(2, 2 * FPS):  # past the second, no keyframe asked: the held PLI was served
        clock.now += 1 / FPS
        hub.publish(EncodedFrame(bytes(1000), n * TICK, False, n / FPS))
    assert (requests.count, hub.viewer_keyframe_gate.asked, hub.viewer_keyframe_gate.sent) == (1, 2, 1)


async def test_a_consumer_that_sizes_its_own_queue_keeps_it():
    """The recorder's 90 frames (three seconds of a slow SD card): no time bound of the hub's."""
    hub, feed, _ = hub_and_feed()
    recorder = hub.subscribe("record-cam0", max_frames=90)
    feed.publish(80)
    assert read_all(recorder) == list(range(80)) and recorder.resyncs == 0


async def test_a_fall_is_warned_once_a_second_with_what_it_lost(caplog):
    hub, feed, _ = hub_and_feed()
    hub.subscribe("stuck")
    with caplog.at_level(logging.WARNING, logger="relay.hub"):
        feed.publish(200)
    warnings = [r.getMessage() for r in caplog.records if "lagging" in r.getMessage()]
    assert len(warnings) == 1  # the clock in the warning is the wall clock: 200 frames fed in far less than 1 s
    assert "stream=cam0 subscriber=stuck lagging: dropped=" in warnings[0]
    assert "skipped 30 frames to a keyframe it holds" in warnings[0]
