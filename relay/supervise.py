"""A child process kept running: the camera workers and mediamtx.

``Child`` starts its program in a session (and process group) of its own,
with only the environment a child may have (``relay.childenv``), and runs it:
``run(proc)`` for as long as the process is of use, then the group is killed
if it lives on, the process is reaped, and after a backoff (``relay.backoff``)
it starts again, until ``stop()``: the polite stop (its stdin closed, when it
has one), then SIGTERM, then SIGKILL of the group, each given
``STOP_TIMEOUT``. Whatever it started goes with it: nothing is left running,
and nothing unreaped.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

from .aio import cancel_and_wait, signal_group
from .backoff import Retry
from .childenv import child_env

log = logging.getLogger(__name__)

STOP_TIMEOUT = 5.0  # seconds a child gets to stop after each way of asking: stdin closed, SIGTERM, SIGKILL
# A child dies with the relay, even when the relay dies by SIGKILL or the OOM killer and stops nothing: the
# kernel sends it this signal when its parent goes (Linux's parent-death signal, set by util-linux's
# setpriv, which every Debian has, before it execs the program). Without it an orphaned mediamtx kept the
# RTSP port, and the relay started again could never have its own mediamtx answer there.
DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "KILL", "--")

# A child's stdout pipe read by a protocol holds this much (Linux's F_SETPIPE_SZ; its default is 64 KiB, and an
# unprivileged process may ask up to /proc/sys/fs/pipe-max-size, 1 MiB by default): a 1080p keyframe (100-300 KiB;
# 230 kB in the tests' clip) mostly goes in one write, not in 64 KiB pieces, each a wait for the relay to read the
# last (a wake-up of both processes, and of the cameras sharing the worker, whose units queue behind it); one larger
# takes one more wait, once a GOP. No more: what the pipe holds is video gone stale when the relay falls behind, and
# the worker's writes wait (its threads see the relay is slow) only once it is full: 256 KiB is 2 s of a 1 Mbit/s
# camera (0.5 s at 4 Mbit/s), 1 MiB was 8 s.
PIPE_BYTES = 1 << 18

Process = asyncio.subprocess.Process


async def _nothing(proc: Process) -> None:
    return None


class Child:
    """One supervised child process; ``name`` starts its log lines (``stream=cam0 worker``, ``mediamtx``).

    - ``started(proc)``: right after each start (before ``run``);
    - ``run(proc)``: while it is of use; returning (or failing) ends it;
    - ``ended(code)``: once it is reaped, before any restart.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        run: Callable[[Process], Awaitable[None]] = _nothing,
        started: Callable[[Process], None] = lambda proc: None,
        ended: Callable[[int | None], Awaitable[None]] = _nothing,
        retry: Retry | None = None,
        stdout_protocol: Callable[[], asyncio.Protocol] | None = None,
        **popen: object,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env or {}  # besides what childenv passes
        self.restarts = 0
        self.proc: Process | None = None
        # With ``stdout_protocol``, the child's stdout is a pipe read by a protocol it makes at each start
        # (``stdout``, its transport closed once the child is reaped), not ``proc.stdout``'s StreamReader.
        self.stdout: asyncio.Protocol | None = None
        self._stdout_protocol = stdout_protocol
        self._stdout_transport: asyncio.BaseTransport | None = None
        self._run = run
        self._started = started
        self._ended = ended
        self._retry = retry or Retry()
        self._popen = popen
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def stopping(self) -> bool:
        """``stop()`` was called: a process that ends now was asked to, it did not die."""
        return self._closing

    async def spawn(self) -> Process:
        """Start the program now (its own session, its own process group)."""
        if self._stdout_protocol is None:
            self.proc = await self._exec(**self._popen)
        else:
            read_end, write_end = os.pipe()
            _enlarge(write_end, PIPE_BYTES)
            try:
                self.proc = await self._exec(stdout=write_end, **self._popen)
            except BaseException:
                os.close(read_end)
                raise
            finally:
                os.close(write_end)  # the child's now: the pipe ends when it (and whatever it started) has gone
            pipe = os.fdopen(read_end, "rb", buffering=0)
            try:
                loop = asyncio.get_running_loop()
                self._stdout_transport, self.stdout = await loop.connect_read_pipe(self._stdout_protocol, pipe)
            except BaseException:
                pipe.close()
                raise  # the process goes with its supervision's reaping (nobody would read it)
        self._started(self.proc)
        return self.proc

    async def _exec(self, **popen: object) -> Process:
        return await asyncio.create_subprocess_exec(
            *_dies_with_parent(self.argv), env=child_env(os.environ, **self.env), start_new_session=True, **popen
        )

    def supervise(self) -> None:
        """Run it (the one ``spawn`` started, else a new one), and again whenever it ends, until ``stop()``."""
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name=self.name)

    async def stop(self) -> None:
        self._closing = True
        if self.proc is not None:
            await self.stop_process(self.proc)
        await cancel_and_wait(self._task)
        await self._reap()  # one that no supervision ran (a first start that failed)

    async def stop_process(self, proc: Process) -> None:
        """Ask it to stop: its stdin closed (a camera worker ends then), then SIGTERM, then SIGKILL of its group."""
        asked = False
        if proc.stdin is not None:
            proc.stdin.close()
            asked = True
            if await _exited(proc):
                return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.returncode is not None:
                return
            if asked:
                log.warning("%s did not stop; sent %s", self.name, signal.Signals(sig).name)
            signal_group(proc, sig)
            asked = True
            if await _exited(proc):
                return

    async def _supervise(self) -> None:
        while not self._closing:
            started = time.monotonic()
            try:
                await self._run(self.proc or await self.spawn())
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # the program could not be started: gone, not executable, out of processes
                log.error("%s could not be started: %s", self.name, exc)
            except Exception:
                log.exception("%s failed", self.name)
            finally:
                code = await self._reap()
            if self._closing:
                return
            self.restarts += 1
            self._retry.ran(time.monotonic() - started)
            delay = self._retry.next_delay()
            log.warning("%s exited (code %s); restart %d in %.1fs", self.name, code, self.restarts, delay)
            await asyncio.sleep(delay)

    async def _reap(self) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None and not self._closing:  # its run gave up on it (a corrupt pipe): nobody reads it
            signal_group(proc, signal.SIGKILL)
        code = await proc.wait()
        self.proc = None
        if self._stdout_transport is not None:  # its pipe, if a process it started still holds it open
            self._stdout_transport.close()
            self._stdout_transport = None
        await self._ended(code)
        return code


def python_child(
    name: str,
    module: str,
    config: tuple[str, str],
    *,
    started: Callable[[Process], None],
    run: Callable[[Process], Awaitable[None]],
    ended: Callable[[int | None], Awaitable[None]],
    retry: Retry | None,
    limit: int = 0,
    stdout_protocol: Callable[[], asyncio.Protocol] | None = None,
) -> Child:
    """A camrelay process (``python -m module``: a camera worker, a fan-out shard) that speaks over its stdin and
    stdout: its stdout read by ``proc.stdout`` (``limit``: the longest line that reader takes), or by a
    ``stdout_protocol`` made at each start (``Child.stdout``). ``config``, (variable, value), goes in its
    environment, not its argv: any local user can read argv (ps), and a camera's URL holds its password;
    /proc/<pid>/environ is readable by us only."""
    out: dict = {"stdout": asyncio.subprocess.PIPE, "limit": limit}
    if stdout_protocol is not None:
        out = {"stdout_protocol": stdout_protocol}
    return Child(
        name,
        [sys.executable, "-m", module],
        env=dict([config]),
        started=started,
        run=run,
        ended=ended,
        retry=retry,
        stdin=asyncio.subprocess.PIPE,
        **out,
    )


async def _exited(proc: Process) -> bool:
    try:
        async with asyncio.timeout(STOP_TIMEOUT):  # not wait_for: on 3.11 it can lose a cancellation (relay.aio)
            await proc.wait()
        return True
    except TimeoutError:
        return False


def _enlarge(pipe: int, size: int) -> None:
    """The pipe ``pipe`` made to hold ``size`` bytes where the system lets us; as it was where not."""
    if not hasattr(fcntl, "F_SETPIPE_SZ"):
        return
    try:
        fcntl.fcntl(pipe, fcntl.F_SETPIPE_SZ, size)
    except OSError as exc:  # over pipe-max-size, or the user's pipe pages used up (pipe-user-pages-soft)
        log.debug("pipe left at its size (%d bytes asked): %s", size, exc)


def _dies_with_parent(argv: list[str]) -> list[str]:
    """``argv`` run so that it dies with this process (``DIE_WITH_PARENT``), where the system can."""
    setpriv = shutil.which(DIE_WITH_PARENT[0])
    if setpriv is None or not sys.platform.startswith("linux"):
        return argv
    return [setpriv, *DIE_WITH_PARENT[1:], *argv]
