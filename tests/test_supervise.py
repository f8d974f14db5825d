"""The supervised-child helper with real processes: restarted when they end, stopped politely then by force
with everything they started, always reaped, given only the environment a child may have."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys

import psutil

from relay import supervise
from relay.backoff import Backoff, Retry
from relay.supervise import Child

from .conftest import children_running

QUICK = Retry(Backoff(initial=0.01, cap=0.01, jitter=0.0))  # restarts at once: the test counts them
# Starts a grandchild in its own group (a shell pipeline, an FFmpeg helper), prints it and then ignores
# SIGTERM and its stdin closing: what only SIGKILL of the whole group stops.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(grandchild.pid, flush=True)
time.sleep(600)
"""


GONE_POLLS = 400  # 20 s of 50 ms polls: a liveness bound for a killed process to be reaped, never a timing goal


def _descendants() -> list[psutil.Process]:
    return children_running()


async def test_a_child_that_exits_is_started_again_until_stopped(caplog):
    runs = []

    async def run(proc):
        runs.append(proc.pid)
        await proc.wait()

    child = Child("test child", [sys.executable, "-c", "pass"], run=run, retry=QUICK)
    child.supervise()
    try:
        while len(runs) < 3:
            await asyncio.sleep(0.01)
    finally:
        await child.stop()
    assert len(set(runs)) == len(runs) and child.restarts >= 2 and child.proc is None
    assert "test child exited (code 0); restart 1 in" in caplog.text


async def test_stop_escalates_to_sigkill_of_the_whole_group(monkeypatch, caplog):
    monkeypatch.setattr(supervise, "STOP_TIMEOUT", 0.3)
    ended = []

    async def run(proc):
        await proc.wait()

    async def on_end(code):
        ended.append(code)

    child = Child(
        "stubborn",
        [sys.executable, "-c", STUBBORN],
        run=run,
        ended=on_end,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    proc = await child.spawn()
    grandchild = int(await proc.stdout.readline())
    assert grandchild in {p.pid for p in _descendants()}
    child.supervise()
    with caplog.at_level(logging.WARNING, logger="relay.supervise"):
        await child.stop()
    assert [r.getMessage() for r in caplog.records if r.name == "relay.supervise"] == [
        "stubborn did not stop; sent SIGTERM",
        "stubborn did not stop; sent SIGKILL",
    ]
    assert ended == [-9] and child.restarts == 0
    assert await _gone(grandchild), "the grandchild outlived its group's SIGKILL"


async def _gone(pid: int) -> bool:
    """Whether ``pid`` ends (or is a zombie) once killed. A SIGKILL takes effect when the killed process next
    runs, which on a loaded machine is not at once: its status may still read running just after the kill."""
    for _ in range(GONE_POLLS):
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_first_start_that_is_given_up_on_is_reaped_without_supervision():
    child = Child("once", [sys.executable, "-c", "import time; time.sleep(600)"])
    proc = await child.spawn()
    await child.stop()  # as mediamtx's start does when it never answers
    assert proc.returncode is not None and child.proc is None and not _descendants()


async def test_a_child_gets_only_the_environment_a_child_may_have(monkeypatch):
    monkeypatch.setenv("CAMRELAY_AUTH_TOKEN", "not-for-children")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    seen = []

    async def run(proc):
        seen.append(json.loads(await proc.stdout.read()))

    child = Child(
        "env",
        [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
        env={"CAMRELAY_WORKER_CONFIG": "{}"},
        run=run,
        stdout=asyncio.subprocess.PIPE,
    )
    child.supervise()
    try:
        while not seen:
            await asyncio.sleep(0.01)
    finally:
        await child.stop()
    env = seen[0]
    assert env["CAMRELAY_WORKER_CONFIG"] == "{}" and env["PATH"] == "/usr/bin:/bin"
    assert "CAMRELAY_AUTH_TOKEN" not in env


# A relay stand-in: supervises a sleeping child, prints its pid, and waits to be killed without cleaning up.
PARENT = """
import asyncio, sys
from relay.supervise import Child

async def main():
    child = Child("orphan-to-be", [sys.executable, "-c", "import time; time.sleep(600)"], run=lambda p: p.wait())
    child.supervise()
    while child.pid is None:
        await asyncio.sleep(0.01)
    print(child.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


async def test_a_child_dies_with_its_relay_even_when_the_relay_is_killed_and_cleans_nothing_up():
    """SIGKILL (or the OOM killer) gives the relay no chance to stop its children; the kernel's parent-death
    signal does it for them, so no orphaned mediamtx keeps the RTSP port from the relay started again."""
    parent = await asyncio.create_subprocess_exec(sys.executable, "-c", PARENT, stdout=asyncio.subprocess.PIPE)
    try:
        child = psutil.Process(int(await asyncio.wait_for(parent.stdout.readline(), 30)))
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE
        parent.kill()
        await parent.wait()
        gone, alive = await asyncio.to_thread(psutil.wait_procs, [child], 10)
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
    assert gone and not alive, "the child outlived its killed parent"


class _Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.done.set_result(None)


async def test_a_child_s_stdout_read_by_a_protocol_is_a_pipe_that_holds_a_keyframe_and_is_closed_when_reaped():
    """The child's stdout pipe holds ``PIPE_BYTES`` (a 1080p keyframe in one write; Linux's default is 64 KiB) where
    the system lets an unprivileged process ask that much (pipe-max-size), else the size a pipe has (what
    ``_enlarge`` promises); is read by a protocol made at each start, and is closed with the child."""
    import fcntl

    with open("/proc/sys/fs/pipe-max-size") as fh:
        allowed = supervise.PIPE_BYTES <= int(fh.read())
    read_end, write_end = os.pipe()
    own = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
    os.close(read_end)
    os.close(write_end)

    report = "import fcntl, os; os.write(1, str(fcntl.fcntl(1, fcntl.F_GETPIPE_SZ)).encode())"
    sizes: list[int] = []
    child: Child

    async def run(proc) -> None:
        await child.stdout.done
        sizes.append(int(child.stdout.data))
        await proc.wait()

    child = Child("test child", [sys.executable, "-c", report], run=run, retry=QUICK, stdout_protocol=_Collect)
    child.supervise()
    for _ in range(GONE_POLLS):
        if len(sizes) >= 2:
            break
        await asyncio.sleep(0.05)
    await child.stop()
    assert hasattr(fcntl, "F_GETPIPE_SZ")
    assert len(sizes) >= 2 and set(sizes) == {supervise.PIPE_BYTES if allowed else own}, (
        sizes
    )  # each start's pipe, a new protocol
    assert child._stdout_transport is None
