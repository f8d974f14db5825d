"""Short churn soak: many viewer sessions opened and closed (a third without DELETE:
the client just closes its peer connection). Afterwards the relay holds no
sessions, and file descriptors, threads, tasks and the objects a session
makes (peer connections, transports, ICE connections, the relay's sessions,
tracks and hub subscriptions) are back where they were. The relay and the
aiortc clients share this process, so the numbers cover both sides. Memory
as the system sees it (RSS) is not judged here: the allocator keeps freed
pages as it likes, more so on a loaded machine; the 2,000-session churn
benchmark (benchmarks/churn.py, docs/benchmarks.md) measures it."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import aioice
import psutil
from aiortc import RTCDtlsTransport, RTCIceTransport, RTCPeerConnection

from relay.hub import Subscription
from relay.webrtc.rtpsend import HubTrack
from relay.webrtc.sessions import ViewerSession
from relay.webrtc.whepclient import WhepViewer

from .conftest import LEAK_SETTLE

WARMUP, SESSIONS, BATCH = 30, 150, 10


async def churn(relay, http, n: int) -> None:
    for start in range(0, n, BATCH):
        viewers = [WhepViewer(relay.whep(), http) for _ in range(min(BATCH, n - start))]
        await asyncio.gather(*(v.connect() for v in viewers))
        await asyncio.gather(*(v.read_frames(1) for v in viewers))
        await asyncio.gather(*(v.close(delete=(start + i) % 3 != 0) for i, v in enumerate(viewers)))


async def settle(relay, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while relay.relay.sessions.count():
        assert time.monotonic() < deadline, f"{relay.relay.sessions.count()} sessions never freed"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # closed peers let go of their threads and sockets
    gc.collect()


# What each session makes on one side or the other; every one of them must be let go.
SESSION_OBJECTS = (
    RTCPeerConnection, RTCDtlsTransport, RTCIceTransport, aioice.Connection, ViewerSession, HubTrack, Subscription,
)  # fmt: skip


def measure() -> dict[str, int]:
    me = psutil.Process()
    counts = dict.fromkeys((t.__name__ for t in SESSION_OBJECTS), 0)
    for obj in gc.get_objects():
        if isinstance(obj, SESSION_OBJECTS):
            counts[_kind(obj)] += 1
    return {
        "fds": me.num_fds(),
        "threads": threading.active_count(),
        "tasks": len(asyncio.all_tasks()),
        **counts,
    }


def _kind(obj: object) -> str:
    return next(t.__name__ for t in SESSION_OBJECTS if isinstance(obj, t))


def back(before: dict[str, int], after: dict[str, int]) -> bool:
    """Whether the process is back where it was: the same file descriptors, threads and tasks, give or take
    one or two, and not one more of the objects a session makes."""
    return (
        after["fds"] <= before["fds"] + 2
        and after["threads"] <= before["threads"] + 1
        and after["tasks"] <= before["tasks"] + 2
        and all(after[t.__name__] <= before[t.__name__] for t in SESSION_OBJECTS)
    )


async def test_churned_sessions_leave_nothing_behind(relay_server, http):
    await churn(relay_server, http, WARMUP)  # first use allocates caches, certificates, pools
    await settle(relay_server)
    before = measure()
    viewer = WhepViewer(relay_server.whep(), http)  # the count sees every kind of object a live session holds
    await viewer.connect()
    await viewer.read_frames(1)
    during = measure()
    await viewer.close()
    del viewer  # the test's own reference would hold its peer connection
    assert all(during[t.__name__] > before[t.__name__] for t in SESSION_OBJECTS), (before, during)
    await churn(relay_server, http, SESSIONS)
    await settle(relay_server)
    deadline = time.monotonic() + LEAK_SETTLE  # the last closed peers may still be letting go
    while not back(before, after := measure()):
        assert time.monotonic() < deadline, (before, after)
        await asyncio.sleep(0.1)
        gc.collect()
    assert relay_server.relay.sessions.count() == 0
    assert relay_server.relay.streams["cam0"].hub.subscribers == []
