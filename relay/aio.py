"""Small asyncio helpers shared by the relay's long-running tasks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancel ``task`` (if any) and wait until it has really finished."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


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
