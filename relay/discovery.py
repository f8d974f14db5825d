"""Automatic mode: every MJPEG camera becomes a stream, with a name that sticks.

A camera is known by its physical port (``/dev/v4l/by-path``; by-id, then the
node, where there is no such link), and its stream name is remembered in the
state directory, so a camera plugged back in keeps its name and its URLs. A
camera that disappears keeps its stream, which shows the no-signal slate until
the camera is back (its worker keeps retrying the same path).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from .aio import cancel_and_wait
from .config import is_stream_name
from .devices import Device

log = logging.getLogger(__name__)

DISCOVERY_INTERVAL = 2.0  # seconds between looks at sysfs: a new camera streams within a few seconds


def device_key(device: Device) -> str:
    """What identifies a camera across re-plugs: the port it is plugged into."""
    return device.by_path or device.by_id or device.node


class StreamNames:
    """Stable ``camN`` names for device keys, persisted as JSON (written to a temp name, then renamed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._names: dict[str, str] = {}
        try:
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):  # a name a damaged file gives (../x) would name a recordings directory
                self._names = {str(k): v for k, v in loaded.items() if is_stream_name(v)}
        except (OSError, ValueError):
            pass  # first run, or a damaged file: names start over

    def name_for(self, key: str, taken: set[str]) -> str:
        """The remembered name for ``key``, or the lowest free ``camN``."""
        name = self._names.get(key)
        if name is None or name in taken:  # new, or its old name went to a configured stream
            used = taken | set(self._names.values())
            numbers = {int(m.group(1)) for n in used if (m := re.fullmatch(r"cam(\d+)", n))}
            n = 0
            while n in numbers:
                n += 1
            name = f"cam{n}"
            self._names[key] = name
            self._save()
        return name

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._names, indent=2, sort_keys=True) + "\n")
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("cannot save stream names to %s: %s", self.path, exc.strerror)


class Discovery:
    """Looks for cameras every ``interval`` seconds and reports each new one once."""

    def __init__(
        self,
        list_devices: Callable[[], list[Device]],
        on_found: Callable[[Device], Awaitable[None]],
        interval: float = DISCOVERY_INTERVAL,
    ) -> None:
        self._list = list_devices
        self._on_found = on_found
        self.interval = interval
        self.seen: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def scan(self) -> list[Device]:
        """One look (off the event loop: opening a USB device can take a while); the new devices."""
        try:
            devices = await asyncio.to_thread(self._list)
        except OSError as exc:
            log.warning("device discovery failed: %s", exc)
            return []
        new = [d for d in devices if device_key(d) not in self.seen]
        for device in new:
            self.seen.add(device_key(device))
            await self._on_found(device)
        return new

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="discovery")

    async def close(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.scan()
