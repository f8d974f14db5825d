"""Throwaway diagnostics (scratch tree only): loop iterations, GC pauses, run delay."""

import gc
import os
import threading
import time

_log = open(f"/tmp/s15/diag/out-{os.getpid()}.log", "w", buffering=1)
_gc_t = [0.0]


def _gccb(phase, info):
    if phase == "start":
        _gc_t[0] = time.perf_counter()
    else:
        d = (time.perf_counter() - _gc_t[0]) * 1000
        if d > 1:
            _log.write(
                f"gc gen={info['generation']} ms={d:.1f} collected={info['collected']} t={time.monotonic():.3f}\n"
            )


gc.callbacks.append(_gccb)


def install(loop):
    orig = loop._run_once

    def run_once():
        t0 = time.perf_counter()
        n = len(loop._ready)
        orig()
        d = (time.perf_counter() - t0) * 1000
        if d > 5:
            _log.write(f"iter ms={d:.1f} ready={n} t={time.monotonic():.3f}\n")

    loop._run_once = run_once

    def sched():
        prev = None
        while True:
            with open("/proc/self/schedstat") as f:
                run, wait, n = map(int, f.read().split())
            if prev:
                _log.write(
                    f"sched run_ms={(run - prev[0]) / 1e6:.1f} wait_ms={(wait - prev[1]) / 1e6:.1f}"
                    f" slices={n - prev[2]} t={time.monotonic():.3f}\n"
                )
            prev = (run, wait, n)
            time.sleep(1)

    threading.Thread(target=sched, daemon=True).start()
