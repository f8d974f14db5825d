"""How late the event loop of a process runs a timer: for benchmarks.burst, put in the relay's PYTHONPATH (with
``jointrace``, beside it).

Active only where ``BENCH_LOOP_LAG_FILE`` names a file: every event loop that ``asyncio.run`` starts gets a
task that sleeps ``PERIOD`` and notes how much later than that it woke (what a frame due then would have waited
for the loop), and a thread writes ``<wall clock> <lateness ms>`` lines to the file every second. A process
that starts no event loop with ``asyncio.run`` (a camera worker that inherits the variable) writes nothing.
"""

import os

import jointrace  # noqa: F401 - where each joiner's time goes, when BENCH_JOIN_TRACE_FILE names a file

PATH = os.environ.get("BENCH_LOOP_LAG_FILE")
PERIOD = 0.005  # seconds: 200 wake-ups a second, a few hundredths of a percent of a core
WRITE_EVERY = 1.0  # seconds

if PATH:
    import asyncio
    import threading
    import time

    _samples: list[tuple[float, float]] = []
    _run = asyncio.runners.Runner.run

    def _run_with_probe(self, coro, *, context=None):
        async def probed():
            loop = asyncio.get_running_loop()

            async def probe():
                while True:
                    asked = loop.time()
                    await asyncio.sleep(PERIOD)
                    _samples.append((time.time(), (loop.time() - asked - PERIOD) * 1000))

            task = loop.create_task(probe())
            threading.Thread(target=_write, name="loop-lag", daemon=True).start()
            try:
                return await coro
            finally:
                task.cancel()

        return _run(self, probed(), context=context)

    def _write():
        written = 0
        open(PATH, "w").close()
        while True:
            time.sleep(WRITE_EVERY)
            new = _samples[written:]  # appended since: the writer holds the GIL for a second's worth, no more
            written += len(new)
            with open(PATH, "a") as out:
                out.writelines(f"{t:.3f} {ms:.2f}\n" for t, ms in new)

    asyncio.runners.Runner.run = _run_with_probe
