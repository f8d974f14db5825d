"""Which cores the system under test runs on, and which the load generator: ``os.sched_setaffinity``.

On Linux an affinity belongs to a thread (``sched_setaffinity(pid)`` sets the
thread whose id is ``pid``), and a new thread or process inherits its
creator's. So the system is started from a thread pinned to its cores
(``thread_on``): the relay, its camera worker, its mediamtx and every thread
they make later are born there. ``pin_tree`` then sets every thread of every
process already running under a root (an already running ``--target``, or a
thread that slipped by) and reads each back.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import psutil

PIN_PASSES = 3  # times over a tree's threads: one that starts while we set the others is caught on the next


@dataclass(frozen=True)
class Split:
    """The system's cores and the generator's, disjoint and both non-empty."""

    system: tuple[int, ...]
    generator: tuple[int, ...]


def parse_cores(text: str, what: str) -> tuple[int, ...]:
    """``"0"``, ``"0,2"``, ``"2-3"`` as sorted CPU numbers; ValueError naming ``what`` otherwise."""
    cores: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        if not (lo.isdigit() and (not dash or hi.isdigit())):
            raise ValueError(f"{what}: {text!r} is not a list of CPUs like 0 or 0,2 or 2-3")
        first, last = int(lo), int(hi) if dash else int(lo)
        if last < first:
            raise ValueError(f"{what}: {part!r} counts down")
        cores.update(range(first, last + 1))
    return tuple(sorted(cores))


def split_cores(system: str = "", generator: str = "", available: set[int] | None = None) -> Split:
    """The split asked for, or by default the first half of the CPUs this process may use for the system (at
    least one) and the rest for the generator: on 2 cores, 0 and 1. ValueError naming the option at fault."""
    available = set(os.sched_getaffinity(0) if available is None else available)
    ordered = sorted(available)
    if len(ordered) < 2:
        raise ValueError(f"--pin needs at least 2 CPUs to split; this process may use {ordered}")
    sys_cores = parse_cores(system, "--system-cores") if system else tuple(ordered[: max(1, len(ordered) // 2)])
    gen_cores = (
        parse_cores(generator, "--generator-cores") if generator else tuple(c for c in ordered if c not in sys_cores)
    )
    for what, cores in (("--system-cores", sys_cores), ("--generator-cores", gen_cores)):
        if not cores:
            raise ValueError(f"{what}: no CPU left for it")
        if not set(cores) <= available:
            raise ValueError(f"{what}: {sorted(set(cores) - available)} not among the usable CPUs {ordered}")
    if set(sys_cores) & set(gen_cores):
        raise ValueError(f"--system-cores and --generator-cores share {sorted(set(sys_cores) & set(gen_cores))}")
    return Split(sys_cores, gen_cores)


def add_core_options(group: argparse._ArgumentGroup) -> None:
    """``--system-cores`` and ``--generator-cores``, for a benchmark's ``--pin``."""
    group.add_argument("--system-cores", default="", metavar="CPUS", help="e.g. 0 or 0-1 (default: the first half)")
    group.add_argument("--generator-cores", default="", metavar="CPUS", help="e.g. 1 or 2-3 (default: the rest)")


def split_or_exit(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Split:
    """``split_cores`` of ``args``' core options; a usage error naming the option at fault otherwise."""
    try:
        return split_cores(args.system_cores, args.generator_cores)
    except ValueError as exc:
        ap.error(str(exc))
        raise  # not reached: ap.error exits


@contextlib.contextmanager
def thread_on(cores: tuple[int, ...]) -> Iterator[None]:
    """The calling thread on ``cores`` while the block runs (what it starts inherits them), then back."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def pin_process(pid: int, cores: tuple[int, ...]) -> None:
    """Every thread of ``pid`` on ``cores`` (threads that end meanwhile are skipped)."""
    for _ in range(PIN_PASSES):
        for tid in _threads(pid):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, cores)


def affinity(pid: int) -> list[int]:
    """The CPUs any thread of ``pid`` may run on, as read back (the union over its threads)."""
    found: set[int] = set()
    for tid in _threads(pid):
        with contextlib.suppress(ProcessLookupError):
            found |= os.sched_getaffinity(tid)
    return sorted(found)


def pin_tree(procs: list[psutil.Process], cores: tuple[int, ...]) -> list[dict]:
    """Every thread of every process of ``procs`` on ``cores``; each process's pid, name and CPUs read back."""
    out = []
    for proc in procs:
        pin_process(proc.pid, cores)
        with contextlib.suppress(psutil.NoSuchProcess):
            out.append({"pid": proc.pid, "name": proc.name(), "cores": affinity(proc.pid)})
    return out
