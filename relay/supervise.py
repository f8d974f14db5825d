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
        **popen: object,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env or {}  # besides what childenv passes
        self.restarts = 0
        self.proc: Process | None = None
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
        self.proc = await asyncio.create_subprocess_exec(
            *_dies_with_parent(self.argv), env=child_env(os.environ, **self.env), start_new_session=True,
            **self._popen,
        )  # fmt: skip
        self._started(self.proc)
        return self.proc

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
    limit: int,
) -> Child:
    """A camrelay process (``python -m module``: a camera worker, a fan-out shard) that speaks over its stdin and
    stdout (``limit``: the longest line its stdout reader takes). ``config``, (variable, value), goes in its
    environment, not its argv: any local user can read argv (ps), and a camera's URL holds its password;
    /proc/<pid>/environ is readable by us only."""
    return Child(
        name,
        [sys.executable, "-m", module],
        env=dict([config]),
        started=started,
        run=run,
        ended=ended,
        retry=retry,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=limit,
    )


async def _exited(proc: Process) -> bool:
    try:
        await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        return True
    except TimeoutError:
        return False


def _dies_with_parent(argv: list[str]) -> list[str]:
    """``argv`` run so that it dies with this process (``DIE_WITH_PARENT``), where the system can."""
    setpriv = shutil.which(DIE_WITH_PARENT[0])
    if setpriv is None or not sys.platform.startswith("linux"):
        return argv
    return [setpriv, *DIE_WITH_PARENT[1:], *argv]
