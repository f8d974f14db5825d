"""Where a relay's event loop spends its CPU, by callback: what one more viewer costs, part by part.

    BENCH_LOOPCOST=/tmp/lc PYTHONPATH=$PWD/benchmarks/loopcost_site \\
        python -m benchmarks.load --pin --source-apart --systems camrelay --peers 1,64 --duration 20 --probes 0 \\
        --no-plots --out /tmp/lc-load
    python -m benchmarks.loopcost /tmp/lc-load.json /tmp/lc

With ``BENCH_LOOPCOST`` set, every ``relay serve`` started with
``benchmarks/loopcost_site`` on its ``PYTHONPATH`` (its ``sitecustomize``; an absolute path: a
``--base-tree`` relay starts in its own tree)
times each event-loop callback with ``time.process_time`` (a task's step by
its coroutine, any other callback by its function; the selector's wait as
``select``) and writes the totals once a second to ``<prefix>-<pid>.jsonl``.
It imports nothing of the relay, so a ``--base-tree`` relay runs its own
code. The report takes each point's measured window from the load
benchmark's JSON (``window``: wall clock) and the relay's process from its
``serving_pids``, and gives each callback's CPU at each point and its
slope per added viewer (between the first and the last point), largest
first. The timing adds a few microseconds to every callback: compare shares,
and take CPU figures from runs without it.
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.events
import json
import os
import selectors
import threading
import time
from collections import Counter
from pathlib import Path

# The path prefix of the snapshots; set, a relay's loop is timed. Not CAMRELAY_*: the relay refuses settings it does
# not know.
ENV = "BENCH_LOOPCOST"
SNAPSHOT_INTERVAL = 1.0  # seconds between a relay's snapshots: a measured window holds ten or more
SELECT = "select"


def _key(handle: asyncio.events.Handle) -> str:
    callback = handle._callback
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return "task:" + getattr(coro, "__qualname__", type(coro).__name__)
    if isinstance(owner, asyncio.Future):
        return "future callback"
    return getattr(callback, "__qualname__", getattr(getattr(callback, "func", None), "__qualname__", "callback"))


def install(prefix: str) -> None:
    """Time this process's event-loop callbacks and selector waits; snapshots to ``<prefix>-<pid>.jsonl``."""
    seconds: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    clock = time.process_time
    run = asyncio.events.Handle._run

    def timed_run(self: asyncio.events.Handle) -> None:
        started = clock()
        try:
            run(self)
        finally:
            key = _key(self)
            seconds[key] += clock() - started
            calls[key] += 1

    select = selectors.DefaultSelector.select

    def timed_select(self, timeout=None):
        started = clock()
        try:
            return select(self, timeout)
        finally:
            seconds[SELECT] += clock() - started
            calls[SELECT] += 1

    asyncio.events.Handle._run = timed_run  # type: ignore[method-assign]
    selectors.DefaultSelector.select = timed_select  # type: ignore[method-assign]
    path = Path(f"{prefix}-{os.getpid()}.jsonl")

    def write() -> None:
        while True:
            time.sleep(SNAPSHOT_INTERVAL)
            line = {"t": time.time(), "cpu": clock(), "callbacks": {k: [seconds[k], calls[k]] for k in list(seconds)}}
            with path.open("a") as f:
                f.write(json.dumps(line) + "\n")

    threading.Thread(target=write, name="loopcost", daemon=True).start()


def _window(snapshots: list[dict], start: float, end: float) -> dict | None:
    """The totals between the first snapshot at or after ``start`` and the last at or before ``end``."""
    inside = [s for s in snapshots if start <= s["t"] <= end]
    if len(inside) < 2:
        return None
    a, b = inside[0], inside[-1]
    span = b["t"] - a["t"]
    keys = set(a["callbacks"]) | set(b["callbacks"])
    zero = [0.0, 0]
    return {
        "seconds": span,
        "cpu": (b["cpu"] - a["cpu"]) / span,
        "callbacks": {
            k: ((b["callbacks"].get(k, zero)[0] - a["callbacks"].get(k, zero)[0]) / span,
                (b["callbacks"].get(k, zero)[1] - a["callbacks"].get(k, zero)[1]) / span)
            for k in keys
        },
    }  # fmt: skip


def report(load_json: Path, prefix: str, system: str = "camrelay", top: int = 15) -> list[str]:
    """Lines of the table: each callback's share of a core at the first and last point of ``system``'s sweep and
    its slope per added viewer."""
    run = json.loads(load_json.read_text())["runs"][system]
    windows = []
    for point in (run[0], run[-1]):
        pid = point["serving_pids"][0]
        snapshots = [json.loads(line) for line in Path(f"{prefix}-{pid}.jsonl").read_text().splitlines() if line]
        window = _window(snapshots, *point["window"])
        if window is None:
            raise SystemExit(f"{prefix}-{pid}.jsonl: no two snapshots inside the {point['peers']}-viewer window")
        windows.append((point["peers"], window))
    (n0, w0), (n1, w1) = windows
    added = n1 - n0
    slope = (w1["cpu"] - w0["cpu"]) / added
    lines = [
        f"{system}: {100 * w0['cpu']:.2f} % of a core at {n0} viewers, {100 * w1['cpu']:.2f} % at {n1}: "
        f"{100 * slope:.4f} % per added viewer",
        "| callback | % of a core per added viewer | share of it | calls a second at the last point | us a call |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    rows = []
    for key in set(w0["callbacks"]) | set(w1["callbacks"]):
        s0, _ = w0["callbacks"].get(key, (0.0, 0.0))
        s1, c1 = w1["callbacks"].get(key, (0.0, 0.0))
        rows.append(((s1 - s0) / added, key, c1, s1 / c1 * 1e6 if c1 else 0.0))
    for per, key, c1, us in sorted(rows, reverse=True)[:top]:
        lines.append(f"| {key} | {100 * per:.4f} | {100 * per / slope:.1f} % | {c1:.0f} | {us:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.loopcost", description=__doc__.split("\n\n")[0])
    ap.add_argument("load_json", type=Path, help="the load benchmark's JSON (its --out, .json)")
    ap.add_argument("prefix", help=f"the snapshots' path prefix ({ENV})")
    ap.add_argument("--system", default="camrelay", help="which of the run's systems (default camrelay)")
    ap.add_argument("--top", type=int, default=15, help="callbacks shown, largest per-viewer cost first")
    args = ap.parse_args(argv)
    print("\n".join(report(args.load_json, args.prefix, args.system, args.top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
