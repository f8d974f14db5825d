"""Recording: the hub's H.264 remuxed into fragmented MP4 segments, and JPEG snapshots.

No re-encode: segments carry the packets every viewer gets; snapshots are the
camera's own JPEGs. Files are crash-safe: a segment is written as
``<time>.mp4.part`` in fragments (a power cut loses at most the fragment being
written) and renamed to ``.mp4`` when complete; snapshots and the
``latest_video.mp4`` / ``latest_image.jpg`` links are written to a temp name
and renamed. A full disk pauses recording (live streaming carries on) until
space returns. The recorder is one more hub subscriber: a slow disk makes it
skip to the next keyframe, never delays viewers.

Layout: ``<root>/<stream>/<YYYY-MM-DD>/<YYYYMMDDTHHMMSS.mmmZ>.mp4`` and
``<root>/<stream>/<YYYY-MM-DD>/snapshots/<...>.jpg``, all times UTC.
"""

from __future__ import annotations

import asyncio
import calendar
import concurrent.futures
import contextlib
import errno
import fractions
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av

from .aio import cancel_and_wait, run_owned
from .hub import EncodedFrame, HubClosed, PacketHub
from .mjpeg import JpegFeed
from .rtsp import parameter_sets

log = logging.getLogger(__name__)

TIME_BASE = fractions.Fraction(1, 90_000)
# Fragment at every keyframe and at least every second: a cut-off file plays to within a second of the cut.
MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"
FRAGMENT_MICROSECONDS = "1000000"
# Three seconds of frames may wait for a slow SD card before the recorder skips to the next keyframe.
RECORD_QUEUE_FRAMES = 90
DISK_RETRY_INTERVAL = 5.0  # seconds between checks for free space after ENOSPC
RESUME_FREE_BYTES = 64 * 2**20  # resume recording with this much free: a few segments, not one packet
PART = ".part"
LATEST_VIDEO = "latest_video.mp4"
LATEST_IMAGE = "latest_image.jpg"


def utc_name(t: float) -> str:
    """``20261122T023812.345Z``: sorts in time order, safe in every filesystem."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def parse_utc_name(name: str) -> float | None:
    stem = name.split(".mp4")[0].split(".jpg")[0]
    try:
        base, millis = stem.rstrip("Z").split(".")
        return calendar.timegm(time.strptime(base, "%Y%m%dT%H%M%S")) + int(millis) / 1000
    except ValueError:
        return None


def day_dir(root: Path, stream: str, t: float) -> Path:
    return root / stream / time.strftime("%Y-%m-%d", time.gmtime(t))


def point_link(link: Path, target: Path) -> None:
    """Make ``link`` a symlink to ``target`` atomically: a new link under a temp name, then rename."""
    tmp = link.with_name(link.name + ".new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(target, link.parent))
    tmp.replace(link)


@dataclass(frozen=True, slots=True)
class Retention:
    max_bytes: int  # per stream; 0: no limit
    max_age: float  # seconds; 0: no limit


def files_to_delete(files: list[tuple[Path, float, int]], retention: Retention, now: float) -> list[Path]:
    """Oldest first, until the rest fit: ``files`` are (path, time, size). Pure."""
    doomed = []
    ordered = sorted(files, key=lambda f: f[1])
    total = sum(size for _, _, size in ordered)
    for path, t, size in ordered:
        too_old = retention.max_age and now - t > retention.max_age
        too_big = retention.max_bytes and total > retention.max_bytes
        if not (too_old or too_big):
            break
        doomed.append(path)
        total -= size
    return doomed


class Segment:
    """One fragmented MP4 being written; blocking, used from a worker thread."""

    def __init__(self, path: Path, first: EncodedFrame, size: tuple[int, int], fps: float) -> None:
        self.path = path
        self.part = path.with_name(path.name + PART)
        self.start = first.capture_time
        self.base = first.pts
        self.frames = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(
            str(self.part),
            "w",
            format="mp4",
            # flush_packets: every packet reaches the file at once, not when a 32 KiB buffer fills.
            options={"movflags": MOVFLAGS, "frag_duration": FRAGMENT_MICROSECONDS, "flush_packets": "1"},
        )
        try:
            stream = self._container.add_stream("h264", rate=fractions.Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = size
            stream.time_base = TIME_BASE
            extradata = parameter_sets(first.data)
            if extradata:
                stream.codec_context.extradata = extradata
            self._container.start_encoding()
        except BaseException:
            self.abort()
            raise

    def write(self, frame: EncodedFrame) -> None:
        packet = av.Packet(frame.data)
        packet.stream = self._container.streams.video[0]
        packet.time_base = TIME_BASE
        packet.pts = packet.dts = frame.pts - self.base
        packet.is_keyframe = frame.keyframe
        self._container.mux(packet)
        self.frames += 1

    def finish(self) -> Path | None:
        """Close and rename complete; a segment that never got a frame is removed instead."""
        self._container.close()
        if self.frames == 0:
            self.part.unlink(missing_ok=True)
            return None
        self.part.replace(self.path)
        return self.path

    def abort(self) -> None:
        """Close what can be closed; the .part stays and plays up to its last fragment."""
        with contextlib.suppress(Exception):
            self._container.close()


class Recorder:
    """Records one stream: segments from its hub, snapshots from its JPEG feed."""

    def __init__(
        self,
        name: str,
        hub: PacketHub,
        jpegs: JpegFeed,
        root: Path,
        size: Callable[[], tuple[int, int]],
        fps: float,
        segment_seconds: float,
        snapshot_interval: float,
        retention: Retention,
    ) -> None:
        self.name = name
        self.hub = hub
        self.jpegs = jpegs
        self.root = root
        self.size = size
        self.fps = fps
        self.segment_seconds = segment_seconds
        self.snapshot_interval = snapshot_interval
        self.retention = retention
        self.segments_written = 0
        self.snapshots_written = 0
        self.deleted = 0
        self.paused = False  # the disk is full
        self.pauses = 0
        self.open_segment = Segment  # replaced in tests to inject disk errors
        self._tasks: list[asyncio.Task[None]] = []
        # One thread for all of this recorder's file work, so a close can never
        # overlap a write still running after its task was cancelled.
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"record-{name}")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    @property
    def dir(self) -> Path:
        return self.root / self.name

    def start(self) -> None:
        self.recover()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._record(), name=f"record-{self.name}"))
        if self.snapshot_interval:
            self._tasks.append(loop.create_task(self._snapshots(), name=f"snapshots-{self.name}"))

    async def close(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)
        await asyncio.to_thread(self._io.shutdown)

    def recover(self) -> None:
        """Segments cut off by a crash or power loss: rename them complete (they play to their last fragment)."""
        for part in self.dir.glob(f"*/*.mp4{PART}"):
            part.replace(part.with_name(part.name[: -len(PART)]))
            log.warning("stream=%s recovered %s cut off by a crash", self.name, part.name)

    async def _record(self) -> None:
        while True:
            sub = self.hub.subscribe(f"record-{self.name}", max_frames=RECORD_QUEUE_FRAMES)
            segment: Segment | None = None
            try:
                while True:
                    frame = await sub.get()
                    if (
                        segment is not None
                        and frame.keyframe
                        and frame.capture_time - segment.start >= self.segment_seconds
                    ):
                        done, segment = segment, None
                        await self._finish(done)
                    if segment is None:
                        if not frame.keyframe:
                            continue
                        path = day_dir(self.root, self.name, frame.capture_time) / f"{utc_name(frame.capture_time)}.mp4"
                        segment = await run_owned(
                            self._io, self.open_segment, path, frame, self.size(), self.fps, on_orphan=Segment.finish
                        )
                    await self._run(segment.write, frame)
            except HubClosed:
                return
            except (OSError, av.FFmpegError) as exc:
                sub.close()  # no queue filling up (and forcing keyframes) while we wait
                if segment is not None:
                    await self._run(segment.abort)  # its .part plays up to the last fragment
                    segment = None
                if _is_disk_full(exc):
                    await self._wait_for_space(exc)
                else:
                    log.error("stream=%s recording failed: %s; starting a new segment", self.name, exc)
                    await asyncio.sleep(1.0)
            finally:
                sub.close()
                if segment is not None:  # shutting down: the segment so far is a complete file
                    with contextlib.suppress(Exception):
                        await self._run(segment.finish)

    async def _finish(self, segment: Segment) -> None:
        path = await self._run(segment.finish)
        if path is None:
            return
        self.segments_written += 1
        await self._run(point_link, self.dir / LATEST_VIDEO, path)
        await self._run(self._enforce_retention)

    async def _wait_for_space(self, exc: BaseException) -> None:
        self.paused = True
        self.pauses += 1
        log.error("stream=%s disk full (%s): recording paused; live streaming carries on", self.name, exc)
        while True:
            await asyncio.sleep(DISK_RETRY_INTERVAL)
            try:
                await self._run(self._enforce_retention)
            except OSError as exc:
                log.warning("stream=%s retention could not delete: %s", self.name, exc)
            if await self._run(self._space_left) >= RESUME_FREE_BYTES:
                break
        self.paused = False
        log.warning("stream=%s disk has space again: recording resumes", self.name)

    def _space_left(self) -> int:
        try:
            st = os.statvfs(self.root)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    async def _snapshots(self) -> None:
        self.jpegs.acquire()
        try:
            version = 0
            while True:
                await asyncio.sleep(self.snapshot_interval)
                jpeg = self.jpegs.latest
                if jpeg is None or jpeg.version == version or self.paused:
                    continue
                version = jpeg.version
                try:
                    await self._run(self._write_snapshot, jpeg.data, jpeg.capture_time)
                except OSError as exc:
                    if _is_disk_full(exc):
                        await self._wait_for_space(exc)
                    else:
                        log.error("stream=%s snapshot failed: %s", self.name, exc)
        finally:
            self.jpegs.release()

    def _write_snapshot(self, data: bytes, t: float) -> None:
        folder = day_dir(self.root, self.name, t) / "snapshots"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{utc_name(t)}.jpg"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        self.snapshots_written += 1
        point_link(self.dir / LATEST_IMAGE, path)

    def listing(self) -> tuple[list[tuple[Path, float, int]], list[tuple[Path, float, int]]]:
        """(segments, snapshots) on disk as (path, start time, size), oldest first."""
        segments, snapshots = [], []
        for path in self.dir.glob("*/*.mp4"):
            t = parse_utc_name(path.name)
            with contextlib.suppress(OSError):
                if t is not None:
                    segments.append((path, t, path.stat().st_size))
        for path in self.dir.glob("*/snapshots/*.jpg"):
            t = parse_utc_name(path.name)
            with contextlib.suppress(OSError):
                if t is not None:
                    snapshots.append((path, t, path.stat().st_size))
        return sorted(segments, key=lambda f: f[1]), sorted(snapshots, key=lambda f: f[1])

    def _enforce_retention(self) -> None:
        segments, snapshots = self.listing()
        parts = []  # segments cut off by a full disk count too
        for path in self.dir.glob(f"*/*.mp4{PART}"):
            t = parse_utc_name(path.name)
            with contextlib.suppress(OSError):
                if t is not None:
                    parts.append((path, t, path.stat().st_size))
        for path in files_to_delete(segments + snapshots + parts, self.retention, time.time()):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                self.deleted += 1
        for day in self.dir.glob("*"):
            with contextlib.suppress(OSError):
                if day.is_dir() and not day.is_symlink():
                    snaps = day / "snapshots"
                    if snaps.is_dir() and not any(snaps.iterdir()):
                        snaps.rmdir()
                    if not any(day.iterdir()):
                        day.rmdir()


def _is_disk_full(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
