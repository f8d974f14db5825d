"""The small asyncio helpers: cancellation that neither leaks nor hides errors."""

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time

from relay.aio import cancel_and_wait, run_owned


async def until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_result_finished_after_cancellation_goes_to_its_orphan_handler():
    started, release, orphans = threading.Event(), threading.Event(), []

    def slow_open() -> str:
        started.set()
        release.wait(5)
        return "opened file"

    with concurrent.futures.ThreadPoolExecutor(1) as io:
        task = asyncio.ensure_future(run_owned(io, slow_open, on_orphan=orphans.append))
        await until(started.is_set)
        task.cancel()
        release.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await until(lambda: orphans)  # handed over on the executor, before it shuts down
    assert orphans == ["opened file"]


async def test_a_result_finished_after_its_executor_shut_down_still_goes_to_its_orphan_handler():
    # As a publisher's close does: cancel the open, then shut its executor down while the open still runs.
    started, release, orphans = threading.Event(), threading.Event(), []

    def slow_open() -> str:
        started.set()
        release.wait(5)
        return "opened connection"

    io = concurrent.futures.ThreadPoolExecutor(1)
    task = asyncio.ensure_future(run_owned(io, slow_open, on_orphan=orphans.append))
    await until(started.is_set)
    task.cancel()
    io.shutdown(wait=False)
    release.set()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await until(lambda: orphans)
    await asyncio.to_thread(io.shutdown)
    assert orphans == ["opened connection"]


async def test_cancel_and_wait_logs_a_task_that_had_failed(caplog):
    async def broken():
        raise OSError("disk gone")

    task = asyncio.ensure_future(broken())
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR):
        await cancel_and_wait(task)  # does not raise: the rest of a shutdown must go on
    assert "had failed" in caplog.text and "disk gone" in caplog.text
