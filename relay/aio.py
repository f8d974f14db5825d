"""Small asyncio helpers shared by the relay's long-running tasks.

No ``asyncio.wait_for`` in the relay: on Python 3.11 a cancellation that arrives as its awaitable completes is lost
(it returns the result, and the task goes on; fixed in 3.12), and a task that ignores its stop makes
``cancel_and_wait`` wait forever. ``async with asyncio.timeout(...)`` keeps it (tests/test_aio.py shows both).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancel ``task`` (if any) and wait until it has really finished.

    A task that had already died of an error is logged, not re-raised: one
    broken part must not stop the shutdown of the rest.
    """
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if asyncio.current_task() is not None and asyncio.current_task().cancelling():
            raise  # we are being cancelled ourselves
    except Exception:
        log.exception("task %s had failed", task.get_name())


async def read_pipe(pipe: asyncio.StreamReader, feed, handle, limit: int) -> None:
    """A child's messages: each read of ``pipe`` (at most ``limit`` bytes) through ``feed`` (a protocol's
    ``Reader.feed``: bytes in, whole messages out, raising for a corrupt stream), each message to ``handle``, until
    the pipe ends."""
    while data := await pipe.read(limit):
        for msg in feed(data):
            handle(msg)


class PipeMessages(asyncio.Protocol):
    """A child's messages as its pipe delivers them: each read through ``feed`` (a protocol's ``Reader.feed``: bytes
    in, whole messages out, raising for a corrupt stream) and each message to ``handle``, in the read's own callback.
    ``read_pipe`` over a ``StreamReader`` copied every read into the reader's buffer and out again, and woke its task
    for it: one more event-loop pass between a camera's unit and its viewers, at every unit of every camera.

    ``ended`` is done when the pipe ends (None), or with the exception ``feed`` or ``handle`` raised (the pipe is
    closed then: nothing more is read from a corrupt stream)."""

    def __init__(self, feed, handle) -> None:
        self._feed, self._handle = feed, handle
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self.ended.done():
            return
        try:
            for msg in self._feed(data):
                self._handle(msg)
        except Exception as exc:
            self.ended.set_exception(exc)
            if self._transport is not None:
                self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            if exc is None:
                self.ended.set_result(None)
            else:
                self.ended.set_exception(exc)


def signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    """Send ``sig`` to a child started with ``start_new_session=True`` and everything it
    started (its process group); on systems without process groups, to the child alone."""
    with contextlib.suppress(ProcessLookupError):
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, sig)
        elif sig == getattr(signal, "SIGKILL", None):
            proc.kill()
        else:
            proc.terminate()


async def run_owned(executor, fn, *args, on_orphan):
    """``fn(*args)`` on ``executor``; if we are cancelled while it runs, its result
    (a file, a connection) is handed to ``on_orphan`` on the same executor instead of leaking."""
    future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:

        def adopt(f: asyncio.Future) -> None:
            if not f.cancelled() and f.exception() is None:
                try:
                    executor.submit(on_orphan, f.result())
                except RuntimeError:  # the executor already shut down (its owner closed meanwhile): nothing runs there
                    # A thread of its own, never the event loop's: closing may block (an RTSP TEARDOWN to a
                    # server that does not answer waits for its timeout).
                    threading.Thread(target=on_orphan, args=(f.result(),), name="close-orphan").start()

        future.add_done_callback(adopt)
        raise
