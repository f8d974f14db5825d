"""Short churn soak: many viewer sessions opened and closed (a third without DELETE:
the client just closes its peer connection). Afterwards the relay holds no
sessions, and file descriptors, threads, tasks and memory are back where they
were. The relay and the aiortc clients share this process, so the numbers
cover both sides. (The 2,000-session soak of issue 7 belongs in benchmarks/.)"""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import psutil

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


def measure() -> dict[str, int]:
    me = psutil.Process()
    return {
        "fds": me.num_fds(),
        "threads": threading.active_count(),
        "tasks": len(asyncio.all_tasks()),
        "rss": me.memory_info().rss,
    }


def back(before: dict[str, int], after: dict[str, int]) -> bool:
    """Whether the process is back where it was: the same file descriptors, threads and tasks, give or take
    one or two, and within 10 % of its memory."""
    return (
        after["fds"] <= before["fds"] + 2
        and after["threads"] <= before["threads"] + 1
        and after["tasks"] <= before["tasks"] + 2
        and after["rss"] <= before["rss"] * 1.10
    )


async def test_churned_sessions_leave_nothing_behind(relay_server, http):
    await churn(relay_server, http, WARMUP)  # first use allocates caches, certificates, pools
    await settle(relay_server)
    before = measure()
    await churn(relay_server, http, SESSIONS)
    await settle(relay_server)
    deadline = time.monotonic() + LEAK_SETTLE  # the last closed peers may still be letting go
    while not back(before, after := measure()):
        assert time.monotonic() < deadline, (before, after)
        await asyncio.sleep(0.1)
        gc.collect()
    assert relay_server.relay.sessions.count() == 0
    assert relay_server.relay.streams["cam0"].hub.subscribers == []
