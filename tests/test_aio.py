"""The small asyncio helpers: cancellation that neither leaks nor hides errors."""

import asyncio
import concurrent.futures
import contextlib
import logging
import sys
import threading
import time
from pathlib import Path

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


async def _stops_lost(wait, tries: int = 200) -> int:
    """Of ``tries`` tasks each looping on ``wait()`` (a timed wait for something that completes at once), cancelled
    after 1 to 7 passes of the loop: how many were still running 20 passes after their cancellation."""
    lost = 0
    for k in range(tries):

        async def loop() -> None:
            while True:
                await wait()

        task = asyncio.create_task(loop())
        for _ in range(k % 7 + 1):
            await asyncio.sleep(0)
        task.cancel()
        for _ in range(20):
            await asyncio.sleep(0)
        if not task.done():
            lost += 1
            while not task.done():
                task.cancel()
                await asyncio.sleep(0)
    return lost


async def test_a_timed_wait_in_the_relay_never_loses_a_stop_where_wait_for_did():
    """``asyncio.wait_for`` on Python 3.11 returns the result of an awaitable that completes as its task is
    cancelled, and the task goes on: the RTSP publisher's drain was one, and a relay's close once waited for it
    until the test's own timeout (CI). The relay uses ``asyncio.timeout``, which keeps every stop, and no
    ``wait_for``."""

    async def with_wait_for() -> None:
        await asyncio.wait_for(asyncio.sleep(0), 1)

    async def with_timeout() -> None:
        async with asyncio.timeout(1):
            await asyncio.sleep(0)

    if sys.version_info < (3, 12):  # fixed in 3.12: there both keep it
        assert await _stops_lost(with_wait_for) > 0, "3.11's wait_for loses some (else this shows nothing)"
    assert await _stops_lost(with_timeout) == 0
    root = Path(__file__).resolve().parent.parent
    used = [
        f"{path.relative_to(root)}:{n}"
        for package in ("relay", "signalling")
        for path in sorted((root / package).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "asyncio.wait_for(" in line
    ]
    assert used == []
