"""What a running relay holds, over time: memory, file descriptors, threads, tasks, viewers.

Read from the relay's own status API (its fds, threads and asyncio tasks) and
psutil (resident memory of the relay and its camera workers), so it works for
any camrelay on this machine. Used by the churn and soak benchmarks.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil


@dataclass
class Sample:
    t: float  # seconds since the series started
    relay_rss_mb: float  # the relay process
    workers_rss_mb: float  # its camera worker processes
    open_fds: int
    threads: int
    tasks: int
    viewers: int
    cpu_pct: float  # relay and workers, % of one core since the last sample


class ResourceSeries:
    def __init__(self, base_url: str, pid: int) -> None:
        self.base_url = base_url
        self.proc = psutil.Process(pid)
        self.samples: list[Sample] = []
        self.events: list[tuple[float, str]] = []  # (t, what happened), for the plot
        self.t0 = time.monotonic()
        self._cpu: dict[int, psutil.Process] = {}

    def mark(self, what: str) -> None:
        self.events.append((time.monotonic() - self.t0, what))

    def sample(self) -> Sample:
        with urllib.request.urlopen(f"{self.base_url}/api/v1/status", timeout=10) as r:
            status = json.load(r)
        own = status["relay"]
        viewers = sum(s.get("viewers", 0) for s in status["streams"])
        procs = [self.proc, *self.proc.children(recursive=True)]
        rss = {p.pid: rss_of(p) for p in procs}
        cpu = 0.0
        for p in procs:
            known = self._cpu.setdefault(p.pid, p)
            try:
                cpu += known.cpu_percent(None)
            except psutil.Error:
                pass
        s = Sample(
            t=time.monotonic() - self.t0,
            relay_rss_mb=rss[self.proc.pid] / 2**20,
            workers_rss_mb=sum(v for k, v in rss.items() if k != self.proc.pid) / 2**20,
            open_fds=own["open_fds"] or 0,
            threads=own["threads"],
            tasks=own["asyncio_tasks"],
            viewers=viewers,
            cpu_pct=cpu,
        )
        self.samples.append(s)
        return s

    def as_dict(self) -> dict:
        return {"samples": [asdict(s) for s in self.samples], "events": self.events}

    def plot(self, path: Path, title: str) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        minutes = [s.t / 60 for s in self.samples]
        fig, (mem, other) = plt.subplots(2, 1, figsize=(9, 6), dpi=100, sharex=True)
        mem.plot(minutes, [s.relay_rss_mb for s in self.samples], label="relay process")
        mem.plot(minutes, [s.workers_rss_mb for s in self.samples], label="camera worker")
        mem.set_ylabel("resident memory (MiB)")
        mem.set_ylim(bottom=0)
        mem.legend(loc="lower right")
        mem.grid(True, alpha=0.3)
        mem.set_title(title)
        other.plot(minutes, [s.open_fds for s in self.samples], label="open fds")
        other.plot(minutes, [s.tasks for s in self.samples], label="asyncio tasks")
        other.plot(minutes, [s.viewers for s in self.samples], label="viewers")
        other.set_ylabel("count")
        other.set_xlabel("minutes")
        other.set_ylim(bottom=0)
        other.legend(loc="lower right")
        other.grid(True, alpha=0.3)
        for t, what in self.events:
            for ax in (mem, other):
                ax.axvline(t / 60, color="grey", alpha=0.3, linewidth=0.8)
            mem.annotate(what, (t / 60, 0), rotation=90, fontsize=6, va="bottom", color="grey")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path


def process_tree(proc: psutil.Process | None) -> list[psutil.Process]:
    """``proc`` and every process below it; [] once it is gone."""
    if proc is None:
        return []
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_of(procs: list[psutil.Process]) -> float:
    """The CPU ``procs`` used since the last call for each (``cpu_percent``), in % of one core, summed."""
    total = 0.0
    for p in procs:
        try:
            total += p.cpu_percent(None)
        except psutil.NoSuchProcess:
            pass
    return total


def rss_sum(procs: list[psutil.Process]) -> int:
    """Resident bytes of ``procs`` together."""
    return sum(rss_of(p) for p in procs)


def rss_of(p: psutil.Process) -> int:
    """Resident bytes of ``p``; 0 once it is gone."""
    try:
        return p.memory_info().rss
    except psutil.Error:
        return 0


def within(before: float, after: float, share: float) -> bool:
    """``after`` is no more than ``share`` above ``before`` (10 % is 0.10)."""
    return after <= before * (1 + share)


def udp_drops() -> dict[str, int] | None:
    """The kernel's count of UDP datagrams dropped for a full socket buffer, machine-wide (``/proc/net/snmp``):
    ``rcvbuf`` (a receiver did not read in time), ``sndbuf``. None where it cannot be read (not Linux)."""
    try:
        lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")]
        names, values = lines[0], lines[1]
        row = dict(zip(names[1:], map(int, values[1:]), strict=True))
        return {"rcvbuf": row["RcvbufErrors"], "sndbuf": row["SndbufErrors"]}
    except (OSError, IndexError, KeyError, ValueError):
        return None
