"""How the box and every stream are doing: CPU, memory, temperature, throttling, frame rates.

The readers of ``/sys`` take their root as a parameter (tests build a fake
tree with real files); the throttling decoder and the Prometheus writer are
pure. ``Telemetry`` samples on the event loop without blocking it: psutil's
CPU percent is non-blocking between calls, and sysfs reads are a few bytes.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .aio import cancel_and_wait
from .status import Metric, StreamStatus

log = logging.getLogger(__name__)

SAMPLE_INTERVAL = 5.0  # seconds between samples; rates are averaged over it
# The Pi firmware's throttling word (vcgencmd get_throttled): bit -> name.
THROTTLE_BITS = {
    0: "under_voltage",
    1: "arm_frequency_capped",
    2: "throttled",
    3: "soft_temperature_limit",
    16: "under_voltage_occurred",
    17: "arm_frequency_capped_occurred",
    18: "throttled_occurred",
    19: "soft_temperature_limit_occurred",
}
PI_THROTTLED_SYSFS = "devices/platform/soc/soc:firmware/get_throttled"


@dataclass(frozen=True, slots=True)
class ThermalZone:
    name: str  # thermal_zone0
    type: str  # cpu-thermal, x86_pkg_temp, ...
    celsius: float


def read_thermal(sys_root: Path = Path("/sys")) -> list[ThermalZone]:
    """Every thermal zone that reads; the rest are skipped."""
    zones = []
    base = sys_root / "class" / "thermal"
    if not base.is_dir():
        return zones
    for zone in sorted(base.glob("thermal_zone*"), key=lambda p: int(p.name[12:] or 0)):
        try:
            millis = int((zone / "temp").read_text().strip())
            kind = (zone / "type").read_text().strip() if (zone / "type").exists() else zone.name
        except (OSError, ValueError):
            continue  # some zones refuse reads while their sensor sleeps
        zones.append(ThermalZone(zone.name, kind, millis / 1000))
    return zones


def decode_throttled(value: int) -> dict[str, bool]:
    """The Pi's throttling word as named flags."""
    return {name: bool(value >> bit & 1) for bit, name in THROTTLE_BITS.items()}


def read_throttled(sys_root: Path = Path("/sys"), vcgencmd: str | None = None) -> int | None:
    """The throttling word from sysfs (Pi kernels), else ``vcgencmd``; None where neither exists."""
    path = sys_root / PI_THROTTLED_SYSFS
    try:
        return int(path.read_text().strip(), 16)
    except (OSError, ValueError):
        pass
    vcgencmd = vcgencmd if vcgencmd is not None else shutil.which("vcgencmd")
    if not vcgencmd:
        return None
    try:
        out = subprocess.run([vcgencmd, "get_throttled"], capture_output=True, text=True, timeout=2).stdout
        return int(out.strip().split("=", 1)[1], 16)  # throttled=0x50005
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None


@dataclass
class Snapshot:
    time: float = field(default_factory=time.time)
    cpu_percent: float = 0.0  # whole machine, 0..100
    cpu_count: int = 1
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    memory_total: int = 0
    memory_available: int = 0
    rss: dict[str, int] = field(default_factory=dict)  # relay, workers, mediamtx
    # The relay process's own resources: flat over weeks, or something leaks.
    open_fds: int | None = None
    threads: int = 0
    tasks: int = 0
    thermal: list[ThermalZone] = field(default_factory=list)
    throttled: dict[str, bool] | None = None
    streams: list[StreamStatus] = field(default_factory=list)

    @property
    def temperature(self) -> float | None:
        """The SoC's temperature: the CPU zone where named, else the hottest."""
        for zone in self.thermal:
            if "cpu" in zone.type or "soc" in zone.type:
                return zone.celsius
        return max((z.celsius for z in self.thermal), default=None)

    def as_dict(self) -> dict:
        return {
            "time": self.time,
            "system": {
                "cpu_percent": self.cpu_percent,
                "cpu_count": self.cpu_count,
                "load": list(self.load),
                "memory_total_bytes": self.memory_total,
                "memory_available_bytes": self.memory_available,
                "temperature_celsius": self.temperature,
                "thermal_zones": [{"zone": z.name, "type": z.type, "celsius": z.celsius} for z in self.thermal],
                "throttled": self.throttled,
            },
            "processes": {name: {"rss_bytes": rss} for name, rss in self.rss.items()},
            "relay": {"open_fds": self.open_fds, "threads": self.threads, "asyncio_tasks": self.tasks},
            "streams": [s.api() for s in self.streams],
        }

    def log_line(self) -> str:
        """One line a person reads at a glance."""
        temp = f"{self.temperature:.1f}C" if self.temperature is not None else "n/a"
        parts = [
            f"cpu={self.cpu_percent:.0f}%",
            f"load={self.load[0]:.2f}",
            f"mem_free={self.memory_available / 2**20:.0f}MiB",
            f"temp={temp}",
            f"rss={sum(self.rss.values()) / 2**20:.0f}MiB",
        ]
        if self.throttled and any(v for k, v in self.throttled.items() if not k.endswith("_occurred")):
            parts.append(
                "THROTTLED=" + ",".join(k for k, v in self.throttled.items() if v and not k.endswith("_occurred"))
            )
        parts += [s.log_part() for s in self.streams]
        return "status " + " ".join(parts)


def prometheus(snapshot: Snapshot, extra: Iterable[Metric] = ()) -> str:
    """The snapshot, its streams' metrics (``StreamStatus.metrics``) and ``extra`` in Prometheus' text format."""
    metrics: dict[str, tuple[str, str, list[tuple[dict[str, str], float]]]] = {}

    def add(name: str, kind: str, help_: str, value: float | None, **labels: str) -> None:
        if value is None:
            return
        metrics.setdefault(name, (kind, help_, []))[2].append((labels, float(value)))

    s = snapshot
    add("camrelay_cpu_usage_ratio", "gauge", "Whole-machine CPU use, 0 to 1.", s.cpu_percent / 100)
    add("camrelay_cpu_cores", "gauge", "CPU cores.", s.cpu_count)
    for i, minutes in enumerate(("1", "5", "15")):
        add("camrelay_load_average", "gauge", "System load average.", s.load[i], period=f"{minutes}m")
    add("camrelay_memory_total_bytes", "gauge", "Memory in all.", s.memory_total)
    add("camrelay_memory_available_bytes", "gauge", "Memory available.", s.memory_available)
    for proc, rss in s.rss.items():
        add("camrelay_process_resident_memory_bytes", "gauge", "Resident memory per process.", rss, process=proc)
    add("camrelay_open_fds", "gauge", "File descriptors the relay process holds.", s.open_fds)
    add("camrelay_threads", "gauge", "Threads in the relay process.", s.threads)
    add("camrelay_asyncio_tasks", "gauge", "asyncio tasks in the relay process.", s.tasks)
    for zone in s.thermal:
        add(
            "camrelay_temperature_celsius",
            "gauge",
            "Thermal zone temperature.",
            zone.celsius,
            zone=zone.name,
            type=zone.type,
        )
    if s.throttled is not None:
        for flag, on in s.throttled.items():
            add("camrelay_throttled", "gauge", "Raspberry Pi throttling flags (1 = set).", int(on), flag=flag)
    for m in [*(m for st in s.streams for m in st.metrics()), *extra]:
        add(m.name, m.kind, m.help, m.value, **m.labels)
    lines = []
    for name, (kind, help_, samples) in metrics.items():
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            number = str(int(value)) if value.is_integer() else repr(value)  # exact: no %g rounding
            lines.append(f"{name}{{{label_text}}} {number}" if label_text else f"{name} {number}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@dataclass
class ThermalGuard:
    """Steps a stream's frame rate down while the SoC is above ``limit`` and back up once it has cooled."""

    limit: float  # degrees Celsius
    full_fps: float
    min_fps: float = 5.0  # below this a camera stream is a slide show
    factor: float = 0.75  # each step: a quarter fewer frames
    hysteresis: float = 5.0  # cool this far below the limit before stepping back up
    current: float = 0.0

    def __post_init__(self) -> None:
        self.current = self.current or self.full_fps

    def update(self, celsius: float | None) -> float | None:
        """The new frame rate when it should change, else None."""
        if celsius is None:
            return None
        if celsius > self.limit and self.current > self.min_fps:
            self.current = max(self.min_fps, round(self.current * self.factor))
            return self.current
        if celsius < self.limit - self.hysteresis and self.current < self.full_fps:
            self.current = min(self.full_fps, round(self.current / self.factor))
            return self.current
        return None


class Telemetry:
    """Samples every ``SAMPLE_INTERVAL``; logs a status line every ``log_interval``."""

    def __init__(
        self,
        streams: Callable[[], list[StreamStatus]],
        processes: Callable[[], dict[str, int | None]],
        log_interval: float = 30.0,
        sys_root: Path = Path("/sys"),
    ) -> None:
        self._streams = streams
        self._processes = processes
        self.log_interval = log_interval
        self.sys_root = sys_root
        self.latest = Snapshot()
        self.on_sample: list[Callable[[Snapshot], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._procs: dict[int, psutil.Process] = {}
        psutil.cpu_percent(None)  # prime: the next call measures from here

    def start(self) -> None:
        self.latest = self.sample()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="telemetry")

    async def close(self) -> None:
        await cancel_and_wait(self._task)

    def sample(self) -> Snapshot:
        vm = psutil.virtual_memory()
        rss = {}
        pids = self._processes()
        for gone in set(self._procs) - set(pids.values()):  # restarted workers: forget the old pids
            del self._procs[gone]
        for name, pid in pids.items():
            if pid is None:
                continue
            try:
                proc = self._procs.get(pid) or self._procs.setdefault(pid, psutil.Process(pid))
                rss[name] = proc.memory_info().rss
            except psutil.Error:
                self._procs.pop(pid, None)
        throttled = read_throttled(self.sys_root, vcgencmd="")  # vcgencmd is a subprocess: see _run
        return Snapshot(
            cpu_percent=psutil.cpu_percent(None),
            cpu_count=psutil.cpu_count() or 1,
            load=psutil.getloadavg(),  # emulated where the OS has none
            memory_total=vm.total,
            memory_available=vm.available,
            rss=rss,
            open_fds=_open_fds(),
            threads=threading.active_count(),
            tasks=_task_count(),
            thermal=read_thermal(self.sys_root),
            throttled=decode_throttled(throttled) if throttled is not None else None,
            streams=self._streams(),
        )

    async def _run(self) -> None:
        last_log = time.monotonic()
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            snapshot = self.sample()
            if snapshot.throttled is None and shutil.which("vcgencmd"):
                value = await asyncio.to_thread(read_throttled, self.sys_root)
                snapshot.throttled = decode_throttled(value) if value is not None else None
            self.latest = snapshot
            for callback in self.on_sample:
                callback(snapshot)
            if time.monotonic() - last_log >= self.log_interval:
                last_log = time.monotonic()
                log.info("%s", snapshot.log_line())


def _open_fds() -> int | None:
    try:
        return psutil.Process().num_fds()
    except (AttributeError, psutil.Error):  # num_fds is POSIX only
        return None


def _task_count() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # sampled outside a running loop (tests, start-up)
        return 0
