"""The packet hub with plain frames: bounded queues, keyframe resync, no slow-down."""

import asyncio
import logging

import pytest

from relay.hub import Bitrate, EncodedFrame, GopCache, HubClosed, PacketHub
from relay.lag import DEFAULT_MAX_LAG


class Requests:
    def __init__(self):
        self.count = 0

    def __call__(self):
        self.count += 1


def frame(n: int, key: bool = False) -> EncodedFrame:
    return EncodedFrame(data=bytes([n % 256]), pts=n * 3000, keyframe=key, capture_time=float(n))


def gop(start: int, length: int = 5):
    return [frame(start + i, key=(i == 0)) for i in range(length)]


FPS = 30  # frame() is 30 fps: pts 3000 apart
LAG_FRAMES = round(DEFAULT_MAX_LAG * FPS) + 1  # the most a backlog of the default lag limit holds at 30 fps


async def test_new_subscriber_starts_at_a_keyframe_and_asks_for_one():
    req = Requests()
    hub = PacketHub("cam0", req)
    sub = hub.subscribe("viewer")
    assert req.count == 1
    for f in [frame(1), frame(2), *gop(3)]:
        hub.publish(f)
    first = await sub.get()
    assert first.keyframe and first.pts == 3 * 3000
    assert [(await sub.get()).pts for _ in range(4)] == [4 * 3000, 5 * 3000, 6 * 3000, 7 * 3000]


async def test_lagging_subscriber_drops_backlog_and_resumes_at_next_keyframe():
    req = Requests()
    hub = PacketHub("cam0", req, max_frames=4)
    slow = hub.subscribe("slow")
    fast = hub.subscribe("fast")
    got_fast = []
    frames = gop(0, 10) + gop(10, 4)
    for f in frames:
        hub.publish(f)
        got_fast.append((await fast.get()).pts)
    # The fast subscriber saw everything, in order.
    assert got_fast == [f.pts for f in frames]
    # The slow one never read: its 4 queued frames were dropped when frame 4
    # overflowed the queue, frames 4..9 were skipped, and it resumed exactly at
    # the keyframe of the next GOP.
    assert slow.dropped == 4 + 6 and slow.resyncs == 1
    # Asked of the encoder: one for both joins (the second came while the first's was on its way), one resync.
    assert req.count == 1 + 1 and hub.keyframe_requests_merged == 1
    got_slow = [slow.get_nowait().pts for _ in range(len(slow))]
    assert got_slow == [f.pts for f in gop(10, 4)]
    assert hub.dropped == 10


async def test_never_more_than_the_bound_is_queued():
    hub = PacketHub("cam0", Requests())
    sub = hub.subscribe("stuck")
    for i in range(300):
        hub.publish(frame(i, key=(i % 30 == 0)))
        assert len(sub) <= LAG_FRAMES


async def test_drop_warning_at_most_once_a_second(caplog):
    hub = PacketHub("cam0", Requests(), max_frames=1)
    hub.subscribe("stuck")
    with caplog.at_level(logging.WARNING, logger="relay.hub"):
        for i in range(200):
            hub.publish(frame(i, key=True))
    warnings = [r for r in caplog.records if "lagging" in r.message]
    assert len(warnings) == 1
    assert "stream=cam0 subscriber=stuck" in warnings[0].message


async def test_close_wakes_waiters_and_refuses_new_subscribers():
    hub = PacketHub("cam0", Requests())
    sub = hub.subscribe("viewer")
    waiter = asyncio.ensure_future(sub.get())
    await asyncio.sleep(0)
    hub.close()
    with pytest.raises(HubClosed):
        await waiter
    with pytest.raises(HubClosed):
        hub.subscribe("late")
    assert hub.subscribers == []


async def test_unsubscribe_removes_only_that_subscriber():
    hub = PacketHub("cam0", Requests())
    a, b = hub.subscribe("a"), hub.subscribe("b")
    a.close()
    hub.publish(frame(0, key=True))
    assert hub.subscribers == [b]
    assert (await b.get()).keyframe


# -- the GOP cache: instant start for streams that cannot force a keyframe


def sized(n: int, size: int, key: bool = False) -> EncodedFrame:
    return EncodedFrame(data=bytes(size), pts=n * 3000, keyframe=key, capture_time=float(n))


def test_the_cache_holds_the_current_gop_from_its_keyframe():
    cache = GopCache(max_frames=10, max_bytes=1000)
    assert cache.add(sized(0, 10)) == GopCache.SKIPPED  # no keyframe yet: nothing a joiner could decode
    assert (cache.frames, cache.usable) == ([], False)
    first = [sized(1, 100, key=True), sized(2, 10), sized(3, 20)]
    assert [cache.add(f) for f in first] == [GopCache.RESET, GopCache.ADDED, GopCache.ADDED]
    assert cache.frames == first and cache.bytes == 130 and cache.usable
    held = cache.frames
    second = sized(4, 90, key=True)
    assert cache.add(second) == GopCache.RESET
    assert cache.frames == [second] and cache.bytes == 90
    assert held == first, "a reader of the old GOP keeps it: a new keyframe starts a new list"


def test_over_a_cap_the_cache_empties_until_the_next_keyframe():
    by_frames = GopCache(max_frames=3, max_bytes=1000)
    events = [by_frames.add(f) for f in (sized(0, 10, key=True), sized(1, 10), sized(2, 10), sized(3, 10))]
    assert events == [GopCache.RESET, GopCache.ADDED, GopCache.ADDED, GopCache.OVERFLOW]
    assert (by_frames.frames, by_frames.bytes, by_frames.usable, by_frames.overflows) == ([], 0, False, 1)
    assert by_frames.add(sized(4, 10)) == GopCache.SKIPPED
    assert by_frames.add(sized(5, 10, key=True)) == GopCache.RESET and len(by_frames.frames) == 1

    by_bytes = GopCache(max_frames=100, max_bytes=100)
    assert [by_bytes.add(f) for f in (sized(0, 60, key=True), sized(1, 40))] == [GopCache.RESET, GopCache.ADDED]
    assert by_bytes.bytes == 100  # exactly the cap fits
    assert by_bytes.add(sized(2, 1)) == GopCache.OVERFLOW and by_bytes.frames == []
    assert by_bytes.add(sized(3, 101, key=True)) == GopCache.OVERFLOW  # a keyframe alone over the cap
    assert (by_bytes.usable, by_bytes.overflows) == (False, 2)


def test_bitrate_over_the_latest_window_of_video():
    rate = Bitrate(window=2.0)
    rate.add(0, 1000)
    assert rate.bps() == 0.0  # one frame: how long it lasts is not known yet
    rate.add(3000, 1000)
    assert rate.bps() == 2000 * 8 / (2 / 30)  # each frame lasts till the next: 1/30 s
    for n in range(2, 61):  # 2 s at 30 fps, 1000 bytes each, a 31000-byte keyframe at 1 s
        rate.add(n * 3000, 31_000 if n == 30 else 1000)
    # The window keeps the frames of the latest 2 s (pts 0..180000): 61 frames, 91000 bytes, 61/30 s of video.
    assert rate.bps() == 91_000 * 8 * 90_000 * 60 / (180_000 * 61)
    rate.add(61 * 3000, 1000)  # frame 0 falls out of the window
    assert rate.bps() == 91_000 * 8 * 90_000 * 60 / (180_000 * 61)


async def test_a_joiner_starts_at_once_from_the_cached_gop_then_goes_on_live():
    req = Requests()
    hub = PacketHub("cam0", req, cached_start=lambda: True)
    frames = [frame(0), *gop(1, 5)]  # a frame from before any keyframe, then a GOP
    for f in frames:
        hub.publish(f)
    sub = hub.subscribe("viewer")
    assert req.count == 0, "nothing forced: the cache has the GOP"
    assert (sub.replaying, sub.behind, sub.cache_starts, hub.cache_starts) == (True, 5, 1, 1)
    got = [(await sub.get()).pts for _ in range(3)]
    more = [frame(6), frame(7)]  # published while it reads the cache: they join the cache
    for f in more:
        hub.publish(f)
    got += [(await sub.get()).pts for _ in range(4)]
    assert not sub.replaying and len(sub) == 0, "caught up: the next frame comes live"
    hub.publish(frame(8))
    assert len(sub) == 1
    got.append((await sub.get()).pts)
    # From the GOP's keyframe to the live frame: each frame once, none missing.
    assert got == [n * 3000 for n in range(1, 9)]
    assert (sub.dropped, sub.resyncs, hub.dropped) == (0, 0, 0)


async def test_with_no_usable_cache_a_joiner_waits_for_a_keyframe_and_asks_for_one():
    req = Requests()
    hub = PacketHub("cam0", req, cached_start=lambda: True, gop=GopCache(max_frames=3))
    for f in gop(0, 4):  # over the cap: emptied
        hub.publish(f)
    sub = hub.subscribe("viewer")
    assert req.count == 1 and not sub.replaying and sub.waiting_keyframe
    hub.publish(frame(4))
    hub.publish(frame(5, key=True))
    assert [sub.get_nowait().pts] == [5 * 3000] and sub.get_nowait() is None


async def test_without_cached_start_the_hub_keeps_no_cache():
    hub = PacketHub("cam0", Requests())
    for f in gop(0, 5):
        hub.publish(f)
    assert hub.gop.frames == [] and not hub.caching


async def test_a_lagging_subscriber_reads_on_from_the_cache_and_loses_nothing():
    req = Requests()
    hub = PacketHub("cam0", req, max_frames=4, cached_start=lambda: True)
    slow = hub.subscribe("slow")  # before any frame: waits for the first keyframe, as usual
    frames = gop(0, 10)
    for f in frames:
        hub.publish(f)
    # Its queue filled at frame 4; instead of dropping frames 0..3 it reads them, and what came after, from the
    # cache: no keyframe asked for, nothing lost.
    assert (slow.resyncs, slow.dropped, slow.replaying, slow.behind) == (1, 0, True, 10)
    assert req.count == 1  # its join only
    assert [slow.get_nowait().pts for _ in range(10)] == [f.pts for f in frames]
    assert slow.get_nowait() is None and not slow.replaying


async def test_a_lagging_subscriber_loses_only_the_frames_of_an_earlier_gop():
    hub = PacketHub("cam0", Requests(), max_frames=4, cached_start=lambda: True)
    slow = hub.subscribe("slow")
    read = []
    for f in gop(0, 7):
        hub.publish(f)
        if f.pts < 4 * 3000:  # it reads frames 0..3, then stops
            read.append(slow.get_nowait().pts)
    assert read == [0, 3000, 6000, 9000]
    for f in gop(7, 3):  # frames 4, 5, 6 of the old GOP queued, with the new GOP's keyframe 7; 8 overflows
        hub.publish(f)
    assert (slow.resyncs, slow.dropped, hub.dropped) == (1, 3, 3)  # 4, 5, 6: before the cache's keyframe
    assert [slow.get_nowait().pts for _ in range(3)] == [7 * 3000, 8 * 3000, 9 * 3000]


async def test_a_new_keyframe_while_replaying_keeps_the_rest_if_it_fits_else_moves_on():
    hub = PacketHub("cam0", Requests(), max_frames=4, cached_start=lambda: True)
    for f in gop(0, 3):
        hub.publish(f)
    fits = hub.subscribe("fits")  # 3 frames to read: they fit its queue with the keyframe coming
    hub.publish(frame(3))
    assert fits.get_nowait().pts == 0
    big = hub.subscribe("big", max_frames=2)  # 4 frames to read: they do not
    hub.publish(frame(4, key=True))
    assert not fits.replaying and [fits.get_nowait().pts for _ in range(4)] == [3000, 6000, 9000, 12000]
    assert big.replaying and (big.dropped, big.resyncs) == (4, 0)  # the old GOP, skipped for the new one
    assert big.get_nowait().pts == 12000 and big.get_nowait() is None


async def test_a_replaying_subscriber_falls_back_to_a_keyframe_when_the_cache_goes_over_its_cap():
    req = Requests()
    hub = PacketHub("cam0", req, max_frames=2, cached_start=lambda: True, gop=GopCache(max_frames=5))
    for f in gop(0, 3):
        hub.publish(f)
    sub = hub.subscribe("viewer")
    hub.publish(frame(3))
    hub.publish(frame(4))
    hub.publish(frame(5))  # the sixth frame of the GOP: over the cap
    assert hub.gop.frames == [] and not sub.replaying and sub.waiting_keyframe
    assert (sub.dropped, sub.resyncs, req.count) == (6, 1, 1)  # the 5 it had yet to read, and the sixth
    hub.publish(frame(6, key=True))
    assert sub.get_nowait().pts == 6 * 3000


async def test_a_stuck_subscriber_holds_no_more_than_the_cache():
    hub = PacketHub("cam0", Requests(), cached_start=lambda: True, gop=GopCache(max_frames=50))
    sub = hub.subscribe("stuck")
    for i in range(300):
        hub.publish(frame(i, key=(i % 60 == 0)))
        assert len(sub) <= LAG_FRAMES and len(hub.gop.frames) <= 50


async def _publish_apart(hub, frames):
    """Each frame published in an event-loop pass of its own, as a camera's frames come."""
    for f in frames:
        hub.publish(f)
        await asyncio.sleep(0)


async def _waiting_reader(sub):
    """A reader parked in ``get`` (as a viewer's send loop is between frames): its task, not yet done."""
    task = asyncio.ensure_future(sub.get())
    await asyncio.sleep(0)
    return task


async def test_a_reader_waiting_live_is_pushed_each_frame_and_not_woken():
    hub = PacketHub("cam0", Requests())
    sub = hub.subscribe("viewer")
    pushed = []
    sub.push = lambda f: pushed.append(f.pts) or True
    reader = await _waiting_reader(sub)
    # not a keyframe: the new subscriber waits for one, nothing is pushed; then a GOP, a frame an event-loop pass
    await _publish_apart(hub, [frame(1), *gop(2)])
    assert pushed == [f.pts for f in gop(2)] and not reader.done() and len(sub) == 0
    assert sub.delivered == 5
    sub.push = lambda f: False  # declined (a backed-up socket): queued and the reader woken, as without push
    await _publish_apart(hub, [frame(7)])
    hub.publish(frame(8))
    assert (await reader).pts == 7 * 3000 and len(sub) == 1
    sub.close()


async def test_nothing_is_pushed_while_frames_are_queued_or_the_cache_is_read():
    hub = PacketHub("cam0", Requests(), cached_start=lambda: True)
    for f in gop(0):
        hub.publish(f)
    sub = hub.subscribe("joiner")  # reads the cached GOP first
    pushed = []
    sub.push = lambda f: pushed.append(f.pts) or True
    reader = await _waiting_reader(sub)
    hub.publish(frame(5))  # joins the cache: read from there
    assert [(await reader).pts] + [(await sub.get()).pts for _ in range(5)] == [n * 3000 for n in range(6)]
    assert not pushed and not sub.replaying
    hub.publish(frame(6))  # nobody waits in get: queued
    assert not pushed and len(sub) == 1
    assert (await sub.get()).pts == 6 * 3000
    reader = await _waiting_reader(sub)
    hub.publish(frame(7))  # live and waiting: pushed
    assert pushed == [7 * 3000] and not reader.done()
    sub.close()
    with pytest.raises(HubClosed):
        await reader


async def test_frames_published_in_one_pass_are_pushed_the_first_only_and_a_long_burst_resyncs():
    hub = PacketHub("cam0", Requests(), cached_start=lambda: True)
    sub = hub.subscribe("viewer")
    pushed = []
    sub.push = lambda f: pushed.append(f.pts) or True
    reader = await _waiting_reader(sub)
    burst = gop(0, LAG_FRAMES + 2)  # in one pass, as after an event-loop stall longer than the lag limit
    for f in burst:
        hub.publish(f)
    assert pushed == [0] and sub.resyncs == 1 and sub.replaying  # the rest overflowed the queue: from the cache
    got = [(await reader).pts] + [(await sub.get()).pts for _ in range(len(burst) - 2)]
    assert [0, *got] == [f.pts for f in burst]  # nothing lost, nothing twice
    reader = await _waiting_reader(sub)
    hub.publish(frame(20))  # a new pass, live and waiting: pushed
    assert pushed == [0, 20 * 3000] and not reader.done()
    sub.close()


async def test_a_push_that_raises_never_reaches_the_publish_nor_the_other_subscribers(caplog):
    """A subscriber's push failing (a packetizer meeting a malformed unit) is logged once and that subscriber
    reads through its queue from then on: the publish goes on to the others, and the camera's pipe reader with
    it, instead of the exception killing the worker."""
    hub = PacketHub("cam0", Requests())
    failing, other = hub.subscribe("viewer"), hub.subscribe("recorder")

    def boom(f):
        raise IndexError("index out of range")

    failing.push = boom
    reader = await _waiting_reader(failing)
    await _publish_apart(hub, [frame(0, key=True)])  # raises nothing
    assert (await reader).pts == 0 and failing.push is None  # queued for it instead, and its reader woken
    assert len(other) == 1  # the subscriber after it got the frame too
    assert [r.getMessage() for r in caplog.records if "push failed" in r.getMessage()] == [
        "stream=cam0 subscriber=viewer push failed, queueing instead: IndexError('index out of range')"
    ]
    await _publish_apart(hub, [frame(1)])
    assert len(failing) == 1 and len(other) == 2


WINDOW = 0.5  # a stream's share window: the encoder's limit on forced IDRs (relay.ipc.KEYFRAME_MIN_INTERVAL)


async def test_joiners_within_the_window_of_a_keyframe_share_it_and_read_on_from_it():
    import time

    req = Requests()
    hub = PacketHub("cam0", req, share_window=WINDOW)  # a stream that forces keyframes for joiners
    first = hub.subscribe("first")  # nothing to share yet: asks
    assert (req.count, hub.keyframe_requests) == (1, 1)
    now = time.time()
    for f in gop(10, 4):  # the keyframe asked for, and three frames after it, all just now
        hub.publish(f, now=now)
    later = [hub.subscribe(f"later{i}") for i in range(5)]  # within the window: no request, each from the keyframe
    assert (req.count, hub.keyframe_shares, hub.cache_starts) == (1, 5, 5)
    for sub in (first, *later):
        assert [(await sub.get()).pts for _ in range(4)] == [f.pts for f in gop(10, 4)]
    hub.publish(frame(14), now=now)
    assert [(await sub.get()).pts for sub in later] == [14 * 3000] * 5  # caught up: live
    # A keyframe older than the window is not shared: the encoder may force another at once.
    stale = PacketHub("cam1", req, share_window=WINDOW)
    stale.publish(frame(20, key=True), now=time.time() - 2 * WINDOW)
    stale.subscribe("late")
    assert (req.count, stale.keyframe_shares) == (2, 0)


def test_a_keyframe_asked_for_is_asked_once_until_a_keyframe_comes():
    req = Requests()
    hub = PacketHub("cam0", req, share_window=WINDOW)
    subs = [hub.subscribe(f"joiner{i}") for i in range(10)]  # together, before any keyframe
    assert (req.count, hub.keyframe_requests, hub.keyframe_requests_merged) == (1, 1, 9)
    hub.request_keyframe()  # a PLI meanwhile: the keyframe on its way answers it too
    assert req.count == 1
    hub.publish(frame(1, key=True))  # it came: every joiner starts there
    assert all(sub.get_nowait().keyframe for sub in subs)
    hub.request_keyframe()  # a later PLI asks anew
    assert (req.count, hub.keyframe_requests) == (2, 2)


def test_a_joiners_keyframe_is_asked_for_at_its_offer_and_shared_when_it_subscribes():
    """Asked when the offer comes, the keyframe is published while ICE and DTLS connect; the joiner, once
    connected, starts from it, shared, and asks for none."""
    import time

    req = Requests()
    hub = PacketHub("cam0", req, share_window=WINDOW)
    now = time.time()
    hub.publish(frame(1, key=True), now=now - 2 * WINDOW)  # a stale keyframe: not shareable
    assert hub.expect_joiner(lead=0.25, now=now)  # its offer came: asked ahead
    assert (req.count, hub.keyframe_requests, hub.keyframe_requests_ahead) == (1, 1, 1)
    assert not hub.expect_joiner(lead=0.25, now=now)  # a second joiner meanwhile: the one on its way serves it
    assert req.count == 1
    for f in gop(10, 3):  # the keyframe asked for, then two frames, published while they connect
        hub.publish(f, now=now + 0.05)
    joiners = [hub.subscribe(f"joiner{i}") for i in range(2)]  # connected: both share it
    assert (req.count, hub.keyframe_shares) == (1, 2)
    assert all(j.get_nowait().pts == frame(10).pts for j in joiners)  # from the keyframe asked for


def test_no_keyframe_is_asked_ahead_when_the_latest_is_still_shareable_by_the_time_the_joiner_connects():
    import time

    req = Requests()
    hub = PacketHub("cam0", req, share_window=WINDOW)
    now = time.time()
    hub.publish(frame(1, key=True), now=now - 0.1)  # shareable for 0.4 s more
    assert not hub.expect_joiner(lead=0.25, now=now)
    assert hub.expect_joiner(lead=0.45, now=now)  # not by then: asked ahead
    assert req.count == 1
    # Streams that start joiners from their GOP, or share nothing, ask nothing ahead.
    cached = PacketHub("cam1", req, cached_start=lambda: True, share_window=WINDOW)
    plain = PacketHub("cam2", req)
    assert not cached.expect_joiner(now=now) and not plain.expect_joiner(now=now)
    assert req.count == 1


def test_without_a_share_window_every_join_asks():
    req = Requests()
    hub = PacketHub("cam0", req)
    hub.publish(frame(1, key=True))
    hub.subscribe("a")
    assert (req.count, hub.keyframe_shares) == (1, 0) and hub.gop.frames == []  # nothing kept


async def test_a_joiner_sharing_a_keyframe_goes_on_from_the_next_one_if_it_comes_while_it_catches_up():
    import time

    req = Requests()
    hub = PacketHub("cam0", req, share_window=WINDOW, max_frames=8, max_lag=None)  # a backlog of 8 frames at most
    now = time.time()
    for f in gop(0, 6):
        hub.publish(f, now=now)
    sub = hub.subscribe("joiner")  # shares keyframe 0: six frames behind
    assert [(await sub.get()).pts for _ in range(2)] == [0, 3000]
    # The next GOP while it is still four frames behind in the first (half its queue): queued, those four and
    # this GOP's eight would overflow its queue before it read them, and force a keyframe for it.
    for f in gop(6, 8):
        hub.publish(f, now=now)
    got = [(await sub.get()).pts for _ in range(8)]
    assert got == [f.pts for f in gop(6, 8)]  # on from the new keyframe, every frame of it
    assert (sub.dropped, sub.resyncs, req.count) == (4, 0, 0), "no keyframe is forced for it: the new one is there"


# -- the batch push: the subscribers push would be handed a frame, and that have a lane, in one call


async def test_the_batch_takes_the_live_waiting_subscribers_with_a_lane_and_the_rest_are_offered_their_own_way():
    """``batch_push`` is handed exactly the subscribers ``push`` would take the frame now and that have a lane: not
    one without a lane, one reading the cache, one waiting for a keyframe, one whose reader is not waiting. Those it
    declines are offered the frame as usual (pushed alone here); each frame is counted delivered once per
    subscriber that took it, by the batch or by its own push."""
    use_cache = [True]
    hub = PacketHub("cam0", Requests(), cached_start=lambda: use_cache[0])
    pushed: dict[str, list[int]] = {}
    subs = {}

    def join(name: str):
        sub = subs[name] = hub.subscribe(name)
        sub.push = lambda f: pushed.setdefault(name, []).append(f.pts) or True
        sub.lane = None if name == "no-lane" else object()
        return sub

    for name in ("batched", "declined", "no-lane", "not-waiting"):
        join(name)
    readers = [await _waiting_reader(subs[n]) for n in ("batched", "declined", "no-lane")]
    await _publish_apart(hub, [frame(0, key=True)])  # no batch yet: each pushed its keyframe, one queued
    assert len(subs["not-waiting"]) == 1
    use_cache[0] = False
    join("keyframe-waiter")  # waits for the next keyframe
    use_cache[0] = True
    join("replaying")  # reads the cached GOP first
    assert subs["replaying"].replaying and subs["keyframe-waiter"].waiting_keyframe
    readers += [await _waiting_reader(subs[n]) for n in ("keyframe-waiter", "replaying")]
    calls: list[list[str]] = []

    def batch_push(f, batch):
        calls.append([s.name for s in batch])
        return [i for i, s in enumerate(batch) if s.name == "declined"]  # it declines one

    hub.batch_push = batch_push
    pushed.clear()
    before = hub.delivered
    await _publish_apart(hub, [frame(1)])
    assert calls == [["batched", "declined"]]
    assert pushed == {"declined": [3000], "no-lane": [3000]}  # declined: pushed its own way
    assert len(subs["not-waiting"]) == 2 and subs["keyframe-waiter"].waiting_keyframe
    assert [subs[n].delivered for n in ("batched", "declined", "no-lane")] == [2, 2, 2]
    assert hub.delivered - before == 3
    assert not any(r.done() for r in readers[:4]) and readers[4].done()  # the cache's reader woken, to read there
    for sub in subs.values():
        sub.close()


def _lanes(hub, names):
    """Live subscribers with lanes (past their first keyframe), each push declining (a backed-up socket), and a
    batch push that records its calls (frame number, subscribers) and declines those in the set it returns."""
    subs = {n: hub.subscribe(n) for n in names}
    for sub in subs.values():
        sub.push = lambda f: False
        sub.lane = object()
        sub.waiting_keyframe = False
    calls: list[tuple[int, list[str]]] = []
    refuse: set[str] = set()

    def batch_push(f, batch):
        calls.append((f.pts // 3000, [s.name for s in batch]))
        return [i for i, s in enumerate(batch) if s.name in refuse]

    hub.batch_push = batch_push
    return subs, calls, refuse


async def test_frames_queued_for_waiting_readers_with_lanes_go_through_the_batch_first_oldest_first():
    """A loop that fell behind: frames queued for viewers whose readers have not run yet are sent in the batch, one
    call per frame for every viewer that queued it, before the frame being published, instead of a task a viewer
    sending each alone; one the batch declines keeps its queue, the new frame behind it, for its own reader."""
    hub = PacketHub("cam0", Requests())
    subs, calls, refuse = _lanes(hub, "abcd")
    readers = {n: await _waiting_reader(s) for n, s in subs.items()}
    refuse |= {"a", "b", "d"}  # backed up: declined by the batch and by push, so queued, and their readers woken
    hub.publish(frame(1))
    refuse -= {"a", "b"}
    hub.publish(frame(2))  # in the same pass: their readers have not run
    assert calls == [(1, ["a", "b", "c", "d"]), (1, ["a", "b", "d"]), (2, ["c", "a", "b"])]
    assert [len(subs[n]) for n in "abcd"] == [0, 0, 0, 2]
    assert [subs[n].delivered for n in "abcd"] == [2, 2, 2, 0] and hub.batched == hub.delivered == 6
    await asyncio.sleep(0)
    assert not any(readers[n].done() for n in "abc")  # woken for frame 1, found nothing left: waiting again
    assert (await readers["d"]).pts == 3000 and (await subs["d"].get()).pts == 6000
    for sub in subs.values():
        sub.close()


async def test_a_pass_of_frames_goes_in_the_batch_while_it_would_fit_the_queue_and_a_longer_burst_resyncs():
    """Frames published in one pass (the loop was held) go in the batch while the burst after the pass's first
    would fit the viewer's queue (its lag limit); from there on they queue as without lanes, and a burst that
    outgrows the queue too resyncs from the cache: every frame once, in order."""
    hub = PacketHub("cam0", Requests(), cached_start=lambda: True)
    subs, calls, _ = _lanes(hub, ["viewer"])
    sub = subs["viewer"]
    reader = await _waiting_reader(sub)
    burst = gop(0, 2 * LAG_FRAMES + 3)  # one pass: the first, two queues' worth, and the frame that overflows
    for f in burst:
        hub.publish(f)
    batched = [n for n, _ in calls]
    assert batched == list(range(LAG_FRAMES + 1))  # the first, and the burst after it while it fits the queue
    assert sub.resyncs == 1 and sub.replaying and sub.dropped == 0
    got = [(await reader).pts] + [(await sub.get()).pts for _ in range(len(burst) - len(batched) - 1)]
    assert [n * 3000 for n in batched] + got == [f.pts for f in burst]  # nothing lost, nothing twice
    reader = await _waiting_reader(sub)
    hub.publish(frame(len(burst)))  # a new pass, live and waiting: in the batch again
    assert calls[-1] == (len(burst), ["viewer"]) and not reader.done()
    sub.close()


async def test_a_batch_push_that_raises_offers_each_its_frame_and_is_said_once_a_second(caplog):
    """A ``batch_push`` raising never reaches the publish: every subscriber of the batch is offered the frame its
    own way, and the warning is said at most once a second however many frames fail."""
    hub = PacketHub("cam0", Requests())

    def failing(f, subs):
        raise MemoryError

    hub.batch_push = failing
    subs = [hub.subscribe(f"viewer{i}") for i in range(2)]
    pushed: list[tuple[int, int]] = []
    for i, sub in enumerate(subs):
        sub.push = lambda f, i=i: pushed.append((i, f.pts)) or True
        sub.lane = object()
    readers = [await _waiting_reader(s) for s in subs]
    with caplog.at_level(logging.WARNING, logger="relay.hub"):
        await _publish_apart(hub, [frame(0, key=True)])  # a new subscriber's first: the keyframe
        for n in (1, 2, 3):
            await _publish_apart(hub, [frame(n)])
    assert pushed == [(i, n * 3000) for n in range(4) for i in range(2)]
    assert [s.delivered for s in subs] == [4, 4] and hub.delivered == 8
    lines = [r.getMessage() for r in caplog.records if "batch push failed" in r.getMessage()]
    assert lines == ["stream=cam0 viewers=2 batch push failed, each offered its own way: MemoryError()"]
    assert not any(r.done() for r in readers)
    for sub in subs:
        sub.close()


def test_the_delay_window_keeps_the_latest_delays_added_one_by_one_and_a_batchs_array_as_it_is():
    """``DelayWindow``: a batch's delays (an ``array('d')`` from the C call, one a viewer) are kept without a float
    object each, single delays in arrays of its own (never appended to a caller's array); it keeps at least its size
    of the latest and lets the oldest go an array at a time; the percentiles are over everything it keeps."""
    import array

    from relay.hub import DELAY_CHUNK, DelayWindow

    window = DelayWindow(size=1000)
    batch = array.array("d", [0.5] * 60)
    window.extend(batch)
    window.add(0.25)
    assert list(batch) == [0.5] * 60 and len(window) == 61  # the batch's array untouched by the add
    assert window.percentiles_ms() == {"p50": 500.0, "p95": 500.0, "p99": 500.0}
    for _ in range(40):
        window.extend(array.array("d", [0.001] * 60))
    window.extend([0.002, 0.002])  # a list is copied
    assert 1000 <= len(window) < 1000 + DELAY_CHUNK
    assert window.percentiles_ms() == {"p50": 1.0, "p95": 1.0, "p99": 1.0}  # the first batch went with its array
    assert DelayWindow().percentiles_ms() == {"p50": None, "p95": None, "p99": None}
