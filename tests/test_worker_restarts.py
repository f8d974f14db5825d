"""A worker killed 100 times: each time a new one takes over, and nothing leaks
in the relay (threads, file descriptors, child processes, tasks: the autouse
guards in conftest.py check them after the test)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil

from relay.backoff import Backoff, Retry
from relay.ipc import EncoderSettings
from relay.source import SourceSpec
from relay.stream import Stream

RESTARTS = 100


async def test_hundred_worker_restarts_leave_nothing_behind():
    # No backoff, so the test measures leaks, not patience; the schedule itself is tested in test_backoff.py.
    stream = Stream(
        "cam0",
        SourceSpec("test", "", 320, 240, 10.0),
        EncoderSettings(300_000, 10.0, 1.0, "libx264"),
        320,
        240,
        retry=Retry(Backoff(initial=0.001, cap=0.001, jitter=0.0)),
    )
    stream.start()
    me = psutil.Process()
    fds_after_first = None
    pids = set()
    try:
        encoded = 0
        for i in range(RESTARTS):
            deadline = time.monotonic() + 20
            # A new worker, and it has encoded a frame (it really runs).
            while stream.pid is None or stream.pid in pids or stream.stats.frames_encoded == encoded:
                assert time.monotonic() < deadline, f"restart {i}: no new worker"
                await asyncio.sleep(0.01)
            pid = stream.pid
            pids.add(pid)
            if fds_after_first is None:
                fds_after_first = me.num_fds()
            os.killpg(pid, signal.SIGKILL)
            while stream.pid == pid:
                await asyncio.sleep(0.005)
            encoded = stream.stats.frames_encoded
        assert stream.stats.worker_restarts >= RESTARTS
        assert len(pids) == RESTARTS
        assert me.num_fds() <= fds_after_first + 2  # the pipes of the worker running now, at most
        assert len([w for w in workers(me) if w.status() != psutil.STATUS_ZOMBIE]) <= 1
    finally:
        await stream.close()
    assert not workers(me), "a worker outlived close()"


def workers(me: psutil.Process) -> list[psutil.Process]:
    """This process's camera workers (other children, such as the multiprocessing resource tracker an
    earlier test started for its peers, live as long as the test run and are not this test's business)."""
    found = []
    for child in me.children(recursive=True):
        try:
            if "relay.camera.worker" in child.cmdline():
                found.append(child)
        except psutil.Error:  # gone meanwhile
            pass
    return found
