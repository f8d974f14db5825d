"""Recording: the hub's H.264 remuxed into fragmented MP4 segments, and JPEG snapshots.

No re-encode: segments carry the packets every viewer gets; snapshots are the
camera's own JPEGs. Files are crash-safe: a segment is written as
``<time>.mp4.part`` in fragments (a power cut loses at most the fragment being
written) and renamed to ``.mp4`` when complete; snapshots and the
``latest_video.mp4`` / ``latest_image.jpg`` links are written to a temp name
and renamed. A full disk pauses recording (live streaming carries on) until
space returns. The recorder is one more hub subscriber: a slow disk makes it
skip to the next keyframe, never delays viewers. A stream with sound has its
Opus packets in the segments too (MP4's ``Opus`` sample entry and ``dOps``),
muxed as they are, their times counted from the audio captured with the
segment's first picture.

Layout: ``<root>/<stream>/<YYYY-MM-DD>/<YYYYMMDDTHHMMSS.mmmZ>.mp4`` and
``<root>/<stream>/<YYYY-MM-DD>/snapshots/<...>.jpg``, all times UTC.
"""

from __future__ import annotations

import asyncio
import calendar
import concurrent.futures
import contextlib
import errno
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import av

from . import mux
from .aio import cancel_and_wait, run_owned
from .h264 import parameter_sets
from .hub import EncodedFrame, HubClosed, PacketHub
from .mjpeg import JpegFeed
from .status import ConsumerStats, Metric

log = logging.getLogger(__name__)

# Fragment at every keyframe and at least every second: a cut-off file plays to within a second of the cut. The
# moov waits for the first fragment (delay_moov), so it knows where each track starts: a segment's sound starts up
# to an Opus frame (20 ms) after its first picture, and without it the muxer would put both at 0.
MOVFLAGS = "frag_keyframe+empty_moov+delay_moov+default_base_moof"
FRAGMENT_MICROSECONDS = "1000000"
# Three seconds of frames may wait for a slow SD card before the recorder skips to the next keyframe.
RECORD_QUEUE_FRAMES = 90
DISK_RETRY_INTERVAL = 5.0  # seconds between checks for free space after ENOSPC
# Seconds between retention passes (each reads the stream's whole tree: about 20 us a file, and 1 s snapshots make
# 86,400 files a day): after a finished segment once this long has passed, never on the write path. Files past the
# limits are deleted up to this late.
RETENTION_EVERY = 60.0
# A recording that fails for another reason than a full disk (a card gone read-only, an I/O error): the next try
# after this, doubling to FAILED_RETRY_MAX, so a broken disk is not a keyframe forced for every viewer each second.
FAILED_RETRY_FIRST = 1.0
FAILED_RETRY_MAX = 60.0
RESUME_FREE_BYTES = 64 * 2**20  # resume recording with this much free: a few segments, not one packet
PART = ".part"
LATEST_VIDEO = "latest_video.mp4"
LATEST_IMAGE = "latest_image.jpg"
# Recordings are as private as the token file: the service's group may read
# them (a backup job, a Samba share), other local accounts may not.
DIR_MODE = 0o750
FILE_MODE = 0o640


def utc_name(t: float) -> str:
    """``20261122T023812.345Z``: sorts in time order, safe in every filesystem."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


UTC_NAME = re.compile(r"([0-9]{4})([0-9]{2})([0-9]{2})T([0-9]{2})([0-9]{2})([0-9]{2})\.([0-9]{3})Z")


def parse_utc_name(name: str) -> float | None:
    """The time ``utc_name`` gave ``name`` (its suffixes aside), or None. Read digit by digit, not by strptime
    (retention reads every file's name: 20 us a name by strptime)."""
    match = UTC_NAME.match(name)
    if match is None:
        return None
    year, month, day, hour, minute, second, millis = map(int, match.groups())
    if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1] and hour < 24 and minute < 60
            and second <= 61):  # fmt: skip
        return None
    return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)) + millis / 1000


def day_dir(root: Path, stream: str, t: float) -> Path:
    return root / stream / time.strftime("%Y-%m-%d", time.gmtime(t))


def make_private_dirs(path: Path) -> None:
    """``path`` and every missing parent, each created ``DIR_MODE`` (``mkdir(parents=True)`` ignores the mode)."""
    if path.is_dir():
        return
    make_private_dirs(path.parent)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=DIR_MODE)
        path.chmod(DIR_MODE)  # mkdir's mode is filtered by the umask; this is the mode meant


def create_private(path: Path) -> None:
    """An empty file of ``FILE_MODE``; a writer that opens it later (FFmpeg, with O_TRUNC) keeps the mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)


def has_fragment(path: Path) -> bool:
    """Whether a fragmented MP4 holds a movie fragment (a ``moof`` box) at its top level: at least one frame.

    A segment cut off before its first fragment is only ``ftyp`` and an empty
    ``moov``: it plays nothing and is not worth keeping.
    """
    try:
        with path.open("rb") as fh:
            while header := fh.read(8):
                if len(header) < 8:
                    return False
                size, kind = int.from_bytes(header[:4], "big"), header[4:]
                if kind == b"moof":
                    return True
                if size == 1:  # a 64-bit size follows
                    size = int.from_bytes(fh.read(8), "big") - 8
                elif size == 0:  # the box runs to the end of the file
                    return False
                if size < 8:
                    return False  # not an MP4 box: a torn or foreign file
                fh.seek(size - 8, os.SEEK_CUR)
    except OSError:
        return False
    return False


@dataclass(frozen=True, slots=True)
class Files:
    """What one stream's recording directory holds, each as (path, start time, size), oldest first."""

    segments: list[tuple[Path, float, int]]
    snapshots: list[tuple[Path, float, int]]
    parts: list[tuple[Path, float, int]]  # segments being written, or cut off by a crash


def scan(stream_dir: Path) -> Files:
    """The recording files under ``stream_dir``, never following a symlink out of it.

    Only real day directories and regular files with recording names count: a
    symlinked day directory (or file) pointing elsewhere is neither listed,
    nor recovered, nor deleted by retention.
    """
    found: dict[str, list[tuple[Path, float, int]]] = {"segments": [], "snapshots": [], "parts": []}

    def take(folder: Path, suffix: str, into: str) -> None:
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            for entry in entries:
                if not (entry.name.endswith(suffix) and entry.is_file(follow_symlinks=False)):
                    continue
                t = parse_utc_name(entry.name)
                with contextlib.suppress(OSError):
                    if t is not None:
                        found[into].append((Path(entry.path), t, entry.stat(follow_symlinks=False).st_size))

    with contextlib.suppress(OSError), os.scandir(stream_dir) as days:
        for day in days:
            if not day.is_dir(follow_symlinks=False):
                continue
            take(Path(day.path), ".mp4", "segments")
            take(Path(day.path), ".mp4" + PART, "parts")
            snaps = Path(day.path) / "snapshots"
            if snaps.is_dir() and not snaps.is_symlink():
                take(snaps, ".jpg", "snapshots")
    return Files(*(sorted(found[k], key=lambda f: f[1]) for k in ("segments", "snapshots", "parts")))


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

    def __init__(self, path: Path, first: EncodedFrame, fps: float, audio_channels: int = 0) -> None:
        self.path = path
        self.first = first
        self.audio_base: int | None = None  # the audio pts its timeline starts at, from the first packet
        self.audio_frames = 0
        self._open = True
        self.part = path.with_name(path.name + PART)
        self.start = first.capture_time
        self.base = first.pts
        self.parameter_sets = parameter_sets(first.data)  # a keyframe with others starts the next segment
        self.frames = 0
        make_private_dirs(path.parent)
        create_private(self.part)
        try:
            self._container = av.open(
                str(self.part),
                "w",
                format="mp4",
                # flush_packets: every packet reaches the file at once, not when a 32 KiB buffer fills.
                options={"movflags": MOVFLAGS, "frag_duration": FRAGMENT_MICROSECONDS, "flush_packets": "1"},
            )
            try:
                mux.add_h264_stream(self._container, first, fps)  # the avcC: the stream's own SPS and PPS
                if audio_channels:
                    mux.add_opus_stream(self._container, audio_channels)
                self._container.start_encoding()
            except BaseException:
                self.abort()
                raise
        except BaseException:  # nothing of it can play: no empty .part left behind at each retry
            with contextlib.suppress(OSError):
                self.part.unlink()
            raise

    def write(self, frame: EncodedFrame) -> None:
        mux.write(self._container, frame, self.base)
        self.frames += 1

    @property
    def has_audio(self) -> bool:
        return bool(self._container.streams.audio)

    def write_audio(self, packet: EncodedFrame) -> None:
        """Mux one Opus packet; those captured before the segment's first picture, or come after it closed (the
        audio's task runs beside the video's), are left out."""
        if not self._open:
            return
        if self.audio_base is None:
            self.audio_base = mux.audio_base(packet, self.first)
        if packet.pts < self.audio_base:
            return
        mux.write(self._container, packet, self.audio_base, audio=True)
        self.audio_frames += 1

    def finish(self) -> Path | None:
        """Close and rename complete; a segment that never got a frame is removed instead."""
        self._open = False
        self._container.close()
        if self.frames == 0:
            self.part.unlink(missing_ok=True)
            return None
        self.part.replace(self.path)
        return self.path

    def abort(self) -> None:
        """Close what can be closed; the .part stays and plays up to its last fragment."""
        self._open = False
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
        fps: float,
        segment_seconds: float,
        snapshot_interval: float,
        retention: Retention,
        audio: PacketHub | None = None,
    ) -> None:
        self.name = name
        self.hub = hub
        self.audio = audio  # the stream's Opus, when it has sound
        self.audio_channels = 0  # of the latest Opus packet: what a new segment's audio track is made for
        self.audio_dropped = 0  # Opus packets the muxer refused
        self._segment: Segment | None = None  # the one being written, for the audio's task
        self.jpegs = jpegs
        self.root = root
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
        self.retention_passes = 0
        self._listing: asyncio.Future | None = None  # the listing being read for requests (shared_listing)
        self.failures = 0  # segments that failed for another reason than a full disk
        self._retained_at = float("-inf")  # monotonic, the last pass's start
        self._retaining: asyncio.Task[None] | None = None
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
        make_private_dirs(self.dir)
        if self.dir.stat().st_mode & 0o027:  # made by an older camrelay, or by hand: keep others out
            self.dir.chmod(DIR_MODE)
            log.warning("stream=%s %s was open to other users; made it %o", self.name, self.dir, DIR_MODE)
        self.recover()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._record(), name=f"record-{self.name}"))
        if self.audio is not None:
            self._tasks.append(loop.create_task(self._record_audio(), name=f"record-audio-{self.name}"))
        if self.snapshot_interval:
            self._tasks.append(loop.create_task(self._snapshots(), name=f"snapshots-{self.name}"))

    async def close(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)
        if self._retaining is not None:
            await cancel_and_wait(self._retaining)  # a pass under way in its thread ends on its own
        await asyncio.to_thread(self._io.shutdown)

    def stats(self) -> ConsumerStats:
        labels = {"stream": self.name}
        return ConsumerStats(
            {
                "recording": {
                    "paused": self.paused,
                    "segments": self.segments_written,
                    "snapshots": self.snapshots_written,
                    "deleted": self.deleted,
                    "disk_full": self.pauses,
                }
            },
            (
                Metric(
                    "camrelay_recording_paused",
                    "gauge",
                    "1 while recording is paused for a full disk.",
                    int(self.paused),
                    labels,
                ),
                Metric(
                    "camrelay_recording_segments_total",
                    "counter",
                    "MP4 segments completed.",
                    self.segments_written,
                    labels,
                ),
                Metric(
                    "camrelay_recording_snapshots_total",
                    "counter",
                    "JPEG snapshots written.",
                    self.snapshots_written,
                    labels,
                ),
                Metric(
                    "camrelay_recording_deleted_total", "counter", "Files deleted by retention.", self.deleted, labels
                ),
                Metric(
                    "camrelay_recording_disk_full_total", "counter", "Times the disk filled up.", self.pauses, labels
                ),
            ),
        )

    def recover(self) -> None:
        """Segments cut off by a crash or power loss: renamed complete (they play to their last
        fragment), or removed when the cut came before their first fragment (nothing to play)."""
        for part, _, _ in scan(self.dir).parts:
            if has_fragment(part):
                part.replace(part.with_name(part.name[: -len(PART)]))
                log.warning("stream=%s recovered %s cut off by a crash", self.name, part.name)
            else:
                part.unlink(missing_ok=True)
                log.warning("stream=%s removed %s: cut off by a crash before its first frame", self.name, part.name)

    async def _record(self) -> None:
        retry = FAILED_RETRY_FIRST  # after a failure that is not a full disk: doubling, reset by a finished segment
        failures = 0  # since the last line said so
        while True:
            sub = self.hub.subscribe(f"record-{self.name}", max_frames=RECORD_QUEUE_FRAMES)
            segment: Segment | None = None
            try:
                while True:
                    frame = await sub.get()
                    if segment is not None and frame.keyframe and self._cut_before(segment, frame):
                        done, segment = segment, None
                        await self._finish(done)
                        retry = FAILED_RETRY_FIRST
                    if segment is None:
                        if not frame.keyframe:
                            continue
                        path = day_dir(self.root, self.name, frame.capture_time) / f"{utc_name(frame.capture_time)}.mp4"
                        segment = await run_owned(
                            self._io, self.open_segment, path, frame, self.fps, self.audio_channels,
                            on_orphan=Segment.finish,
                        )  # fmt: skip
                    self._segment = segment
                    await self._run(segment.write, frame)
            except HubClosed:
                return
            except (OSError, av.FFmpegError, mux.NoParameterSets) as exc:
                sub.close()  # no queue filling up (and forcing keyframes) while we wait
                if segment is not None:
                    await self._run(segment.abort)  # its .part plays up to the last fragment
                    segment = None
                if _is_disk_full(exc):
                    await self._wait_for_space(exc)
                else:
                    self.failures += 1
                    failures += 1
                    if retry == FAILED_RETRY_FIRST or retry >= FAILED_RETRY_MAX:  # a run's first, then at the cap
                        more = f" ({failures - 1} more since the last line)" if failures > 1 else ""
                        log.error("stream=%s recording failed: %s%s; trying again in %.0fs", self.name, exc, more,
                                  retry)  # fmt: skip
                        failures = 0
                    await asyncio.sleep(retry)
                    retry = min(FAILED_RETRY_MAX, retry * 2)
            finally:
                sub.close()
                if segment is not None:  # shutting down: the segment so far is a complete file
                    with contextlib.suppress(Exception):
                        await self._run(segment.finish)

    async def _record_audio(self) -> None:
        """The stream's Opus packets into the segment being written, through the same file thread as its video. A
        segment opened before the first packet came has no audio track; the next one has."""
        assert self.audio is not None
        sub = self.audio.subscribe(f"record-audio-{self.name}", max_frames=RECORD_QUEUE_FRAMES)
        try:
            while True:
                packet = await sub.get()
                self.audio_channels = mux.opus_channels(packet.data)
                segment = self._segment
                if segment is None or not segment.has_audio:
                    continue
                try:
                    await self._run(segment.write_audio, packet)
                except (OSError, av.FFmpegError) as exc:  # the video's task meets a full disk and deals with it
                    self.audio_dropped += 1
                    if self.audio_dropped == 1:
                        log.warning("stream=%s recording audio failed: %s; its packets are dropped", self.name, exc)
        except HubClosed:
            return
        finally:
            sub.close()

    def _cut_before(self, segment: Segment, keyframe: EncodedFrame) -> bool:
        """Whether ``keyframe`` starts a new segment: the segment is long enough, or the stream's parameter sets
        changed (a camera's new size or profile: an MP4's avcC describes one)."""
        if keyframe.capture_time - segment.start >= self.segment_seconds:
            return True
        sets = parameter_sets(keyframe.data)
        if sets is not None and sets != segment.parameter_sets:
            log.info("stream=%s new parameter sets: starting a new segment", self.name)
            return True
        return False

    async def _finish(self, segment: Segment) -> None:
        path = await self._run(segment.finish)
        if path is None:
            return
        self.segments_written += 1
        await self._run(point_link, self.dir / LATEST_VIDEO, path)
        self._retain_soon()

    def _retain_soon(self) -> None:
        """A retention pass in a thread of its own, if limits are set and one is due (``RETENTION_EVERY``): the
        segments and snapshots go on being written meanwhile."""
        if not (self.retention.max_bytes or self.retention.max_age):
            return  # keeps everything: no pass reads the tree
        if self._retaining is not None and not self._retaining.done():
            return
        now = time.monotonic()
        if now - self._retained_at < RETENTION_EVERY:
            return
        self._retained_at = now
        self._retaining = asyncio.get_running_loop().create_task(self._retain(), name=f"retention-{self.name}")

    async def _retain(self) -> None:
        try:
            await asyncio.to_thread(self.enforce_retention)
        except OSError as exc:
            log.warning("stream=%s retention could not delete: %s", self.name, exc)
        self.retention_passes += 1

    async def _wait_for_space(self, exc: BaseException) -> None:
        self.paused = True
        self.pauses += 1
        log.error("stream=%s disk full (%s): recording paused; live streaming carries on", self.name, exc)
        while True:
            await asyncio.sleep(DISK_RETRY_INTERVAL)
            try:
                await self._run(self.enforce_retention)
            except OSError as exc:
                log.warning("stream=%s retention could not delete: %s", self.name, exc)
            if await self._run(self.space_left) >= RESUME_FREE_BYTES:
                break
        self.paused = False
        log.warning("stream=%s disk has space again: recording resumes", self.name)

    def space_left(self) -> int:
        try:
            st = os.statvfs(self.root)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    async def _snapshots(self) -> None:
        self.jpegs.acquire(self.snapshot_interval)  # keyframes will do: a camera passed through decodes only them
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
            self.jpegs.release(self.snapshot_interval)

    def _write_snapshot(self, data: bytes, t: float) -> None:
        folder = day_dir(self.root, self.name, t) / "snapshots"
        make_private_dirs(folder)
        path = folder / f"{utc_name(t)}.jpg"
        tmp = path.with_name(path.name + ".tmp")
        create_private(tmp)
        tmp.write_bytes(data)
        tmp.replace(path)
        self.snapshots_written += 1
        point_link(self.dir / LATEST_IMAGE, path)

    def listing(self) -> tuple[list[tuple[Path, float, int]], list[tuple[Path, float, int]]]:
        """(segments, snapshots) on disk as (path, start time, size), oldest first."""
        files = scan(self.dir)
        return files.segments, files.snapshots

    async def shared_listing(self) -> tuple[list[tuple[Path, float, int]], list[tuple[Path, float, int]]]:
        """``listing()`` in a thread, one at a time: requests that come while one is read get that one (each reads
        the whole tree; a viewer asking in a loop costs one read at a time, not one each)."""
        if self._listing is None or self._listing.done():
            self._listing = asyncio.ensure_future(asyncio.to_thread(self.listing))
        return await asyncio.shield(self._listing)

    def enforce_retention(self) -> None:
        files = scan(self.dir)  # segments cut off by a full disk (parts) count too
        for path in files_to_delete(files.segments + files.snapshots + files.parts, self.retention, time.time()):
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
