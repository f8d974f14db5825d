"""The packet hub with plain frames: bounded queues, keyframe resync, no slow-down."""

import asyncio
import logging

import pytest

from relay.hub import DEFAULT_QUEUE_FRAMES, EncodedFrame, HubClosed, PacketHub


class Requests:
    def __init__(self):
        self.count = 0

    def __call__(self):
        self.count += 1


def frame(n: int, key: bool = False) -> EncodedFrame:
    return EncodedFrame(data=bytes([n % 256]), pts=n * 3000, keyframe=key, capture_time=float(n))


def gop(start: int, length: int = 5):
    return [frame(start + i, key=(i == 0)) for i in range(length)]


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
    assert req.count == 2 + 1  # two joins, one resync
    got_slow = [slow.get_nowait().pts for _ in range(len(slow))]
    assert got_slow == [f.pts for f in gop(10, 4)]
    assert hub.dropped == 10


async def test_never_more_than_the_bound_is_queued():
    hub = PacketHub("cam0", Requests())
    sub = hub.subscribe("stuck")
    for i in range(300):
        hub.publish(frame(i, key=(i % 30 == 0)))
        assert len(sub) <= DEFAULT_QUEUE_FRAMES


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
