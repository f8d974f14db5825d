"""The relay: every stream and every viewer, with one start and one close."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil

from . import alsa, devices
from .config import Config, StreamConfig
from .devices import Device
from .discovery import Discovery, StreamNames, device_key
from .hub import PacketHub
from .ipc import EncoderSettings
from .logsafe import redact_url
from .record import Recorder, Retention
from .rtsp import (
    EVERY_INTERFACE,
    Mediamtx,
    MediamtxSettings,
    RtspPublisher,
    check_ports_free,
    find_mediamtx,
    local_host,
)
from .source import SourceSpec, audio_source
from .status import StreamStatus
from .stream import Consumer, Stream, share_workers
from .telemetry import Snapshot, Telemetry, ThermalGuard
from .webrtc import ice
from .webrtc.sessions import ViewerSessions, process_patches
from .webrtc.shards import ShardedSessions, cpu_count, shards_for
from .webrtc.whip import WhipPublisher

log = logging.getLogger(__name__)


class UnknownStream(KeyError):
    pass


def _interface_addresses() -> list[tuple[int, str]]:
    return [
        (a.family, a.address.split("%", 1)[0])  # an IPv6 link-local address without its %interface
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family in (socket.AF_INET, socket.AF_INET6)
    ]


def lan_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback: what another machine can reach it at."""
    return [a for family, a in _interface_addresses() if family == socket.AF_INET and not a.startswith("127.")]


def host_addresses() -> list[str]:
    """Every IPv4 and IPv6 address of this machine, loopback included: what a request's Host may name."""
    return [a for _, a in _interface_addresses()]


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "camrelay"


DEFAULT_TEST_STREAM = "cam0"


class Relay:
    """Every stream and every viewer. Streams come from the config; without any
    configured, from the cameras found (and found later: hot-plug), else the
    test pattern on cam0. Each stream owns its consumers (``_consumers``: the
    one place that says which edges a stream feeds)."""

    def __init__(self, config: Config, list_devices: Callable[[], list[Device]] = devices.list_devices) -> None:
        self.config = config
        self.streams: dict[str, Stream] = {}
        w = config.webrtc
        self.shards = w.shards or shards_for(cpu_count())  # "auto" (0): from the cores this process may use
        self.sessions: ViewerSessions | ShardedSessions
        if self.shards > 1:
            self.sessions = ShardedSessions(
                self.shards,
                self.hub_for,
                self.audio_hub_for,
                lambda: ice.for_viewer(w),
                w,
                config.video.max_lag,
                config.log_level,
            )
        else:
            self.sessions = ViewerSessions(
                self.hub_for,
                lambda: ice.for_relay(w),
                w.connect_timeout,
                additional_hosts=w.additional_hosts,
                batch=w.batch_sends,
                playout_delay=w.playout_delay,
            )
        self.state_dir = Path(config.state_dir) if config.state_dir else default_state_dir()
        self.mediamtx: Mediamtx | None = None
        rc = config.record
        self.recordings_root = Path(rc.root) if rc.root else self.state_dir / "recordings"
        self.telemetry = Telemetry(self._sample_streams, self._process_ids, config.telemetry.log_interval)
        self.thermal_guards: dict[str, ThermalGuard] = {}
        if config.telemetry.thermal_limit:
            self.telemetry.on_sample.append(self._thermal_check)
        self._publish: tuple[str, asyncio.Event | None] | None = None  # base URL, ready
        self.automatic = not config.streams
        self.discovery: Discovery | None = None
        # What start() started, closed by close() in reverse: a failed start unwinds exactly what it began.
        self._running = contextlib.AsyncExitStack()
        if self.automatic:
            self.names = StreamNames(self.state_dir / "stream-names.json")
            self.discovery = Discovery(list_devices, self._camera_found, config.devices.discover_interval)

    # Views of the streams' consumers, by edge.
    @property
    def publishers(self) -> dict[str, RtspPublisher]:
        return {name: p for name, s in self.streams.items() for p in s.consumers_of(RtspPublisher)}

    @property
    def whip_publishers(self) -> list[WhipPublisher]:
        return [w for s in self.streams.values() for w in s.consumers_of(WhipPublisher)]

    @property
    def recorders(self) -> dict[str, Recorder]:
        return {name: r for name, s in self.streams.items() for r in s.consumers_of(Recorder)}

    def _make_stream(self, sc: StreamConfig) -> Stream:
        v = self.config.video
        fps = sc.source.fps or v.fps
        settings = EncoderSettings(v.bitrate, fps, v.keyframe_interval, v.encoder)
        paired = alsa.sound_for(sc.source.target) if sc.source.kind == "v4l2" else ""  # a few sysfs reads
        audio = audio_source(sc.source, self.config.audio.enabled, paired)
        return Stream(
            sc.name, sc.source, settings, v.width, v.height, self.config.log_level, join=v.join, mode=v.mode,
            audio=audio, max_lag=v.max_lag,
        )  # fmt: skip

    def _consumers(self, stream: Stream) -> list[Consumer]:
        """The edges ``stream`` feeds, besides its JPEG feed: add a new edge here."""
        out: list[Consumer] = [self.sessions.for_stream(stream.name)]
        if self._publish is not None:
            base, ready = self._publish
            live_alias = not any(s.consumers_of(RtspPublisher) for s in self.streams.values())  # the first: /live
            out.append(
                RtspPublisher(
                    stream.hub, f"{base}/{stream.name}", stream.fps, ready,
                    live_alias=live_alias, audio=stream.audio if stream.has_audio else None,
                )
            )  # fmt: skip
        w = self.config.webrtc
        out += [
            WhipPublisher(
                stream.hub, entry.url, entry.bearer_token, lambda: ice.for_relay(w), w.connect_timeout,
                batch=w.batch_sends, index=i, sps=lambda: stream.sps,
            )
            for i, entry in enumerate(self.config.whip)
            if entry.stream == stream.name
        ]  # fmt: skip
        rc = self.config.record
        if rc.enabled:
            out.append(
                Recorder(
                    stream.name, stream.hub, stream.jpegs, self.recordings_root,
                    stream.fps, rc.segment, rc.snapshot_interval,
                    Retention(rc.max_size, rc.max_age), audio=stream.audio if stream.has_audio else None,
                )
            )  # fmt: skip
        return out

    def hub_for(self, name: str) -> PacketHub:
        stream = self.streams.get(name)
        if stream is None:
            raise UnknownStream(name)
        return stream.hub

    def audio_hub_for(self, name: str) -> PacketHub | None:
        """The stream's audio hub; None once it is gone."""
        stream = self.streams.get(name)
        return stream.audio if stream is not None else None

    async def start(self) -> None:
        w = self.config.webrtc
        running = self._running
        try:
            running.enter_context(process_patches(w.ice_addresses, w.batch_sends, w.c_send, w.c_batch))
            ice.log_settings(w)
            running.push_async_callback(_stop, "viewers", self.sessions.close_all)
            await self.sessions.start()
            initial = list(self.config.streams)
            if self.automatic:
                assert self.discovery is not None
                found = await asyncio.to_thread(self.discovery._list)
                for device in found:
                    self.discovery.seen.add(device_key(device))
                    initial.append(self._camera_stream(device, {s.name for s in initial}))
                if not initial:
                    initial.append(StreamConfig(DEFAULT_TEST_STREAM, SourceSpec("test", "")))
                    log.info("stream=%s no camera found; streaming the test pattern", DEFAULT_TEST_STREAM)
            # RTSP first: a taken port stops us before any camera is opened.
            await self._start_rtsp([s.name for s in initial])
            # All at once: each may take its stop timeout, and systemd's TimeoutStopSec is for all of them.
            running.push_async_callback(self._close_streams)
            streams = [self._prepare_stream(sc) for sc in initial]
            for worker in share_workers(streams, self.config.video.cameras_per_worker):
                log.info("%s: %d cameras share one worker process", worker.name, len(worker.streams))
            for stream in streams:
                self._start_stream(stream)
            for entry in self.config.whip:
                if entry.stream not in self.streams:
                    log.warning("stream=%s does not exist (yet); WHIP publishing starts when it does", entry.stream)
            if self.discovery is not None and self.config.devices.discover:
                self.discovery.start()
                running.push_async_callback(_stop, "discovery", self.discovery.close)
            self.telemetry.start()
            running.push_async_callback(_stop, "telemetry", self.telemetry.close)
        except BaseException:
            await self.close()  # aiohttp runs no cleanup for a start that failed
            raise

    def _camera_stream(self, device: Device, taken: set[str]) -> StreamConfig:
        name = self.names.name_for(device_key(device), taken | set(self.streams))
        log.info("stream=%s found camera %s (%s)", name, device.path, device.name)
        return StreamConfig(name, SourceSpec("v4l2", device.path))

    async def _camera_found(self, device: Device) -> None:
        """Hot-plug: a camera that was not there at start becomes a new stream."""
        await self.add_stream(self._camera_stream(device, set()))

    async def add_stream(self, sc: StreamConfig) -> Stream:
        stream = self._prepare_stream(sc)
        self._start_stream(stream)
        return stream

    def _prepare_stream(self, sc: StreamConfig) -> Stream:
        """The stream with its consumers, in ``streams`` (close() stops what of it started), not started yet."""
        if sc.name in self.streams:
            raise ValueError(f"stream {sc.name} exists")
        stream = self._make_stream(sc)
        for consumer in self._consumers(stream):
            stream.add(consumer)
        self.streams[sc.name] = stream
        return stream

    def _start_stream(self, stream: Stream) -> None:
        stream.start()
        log.info("stream=%s source=%s audio=%s started", stream.name, stream.spec, stream.audio_source or "none")

    async def _close_streams(self) -> None:
        await asyncio.gather(*(_stop(f"stream {n}", s.close) for n, s in self.streams.items()))

    async def _start_rtsp(self, names: list[str]) -> None:
        r = self.config.rtsp
        if not r.enabled:
            return
        if r.publish_url:
            self._publish = (r.publish_url, None)
            return
        binary = find_mediamtx(r.mediamtx)
        settings = MediamtxSettings(
            r.host, r.port, r.rtp_port, r.rtcp_port, r.user, r.password, self.config.log_level, r.mediamtx_threads
        )
        check_ports_free(settings)
        self.mediamtx = Mediamtx(binary, settings, names, self.state_dir)
        self._running.push_async_callback(_stop, "mediamtx", self.mediamtx.close)
        await self.mediamtx.start()
        self._publish = (self.mediamtx.publisher_base, self.mediamtx.ready)

    def rtsp_url(self, name: str, host: str) -> str | None:
        """Where NVR software reads ``name``; ``host`` is how the client reached us, used when RTSP listens on
        every interface (else the one address it listens on)."""
        r = self.config.rtsp
        if not r.enabled or name not in self.streams:
            return None
        if r.publish_url:
            return redact_url(f"{r.publish_url}/{name}")  # shown to people: never the password
        if r.host not in EVERY_INTERFACE:
            host = local_host(r.host)
        return f"rtsp://{host}:{r.port}/{name}"

    def _thermal_check(self, snapshot: Snapshot) -> None:
        limit = self.config.telemetry.thermal_limit
        for name, stream in self.streams.items():
            guard = self.thermal_guards.setdefault(name, ThermalGuard(limit, stream.fps))
            fps = guard.update(snapshot.temperature)
            if fps is not None:
                stream.set_max_fps(0 if fps >= guard.full_fps else fps)
                sheds = stream.thermal_sheds
                what = f"sheds {sheds}" if sheds and sheds != "frames" else f"encoding at most {fps:g} fps"
                log.warning("stream=%s thermal: soc=%.1fC limit=%.0fC; %s", name, snapshot.temperature, limit, what)

    def _process_ids(self) -> dict[str, int | None]:
        pids: dict[str, int | None] = {"relay": os.getpid()}
        for name, stream in self.streams.items():
            if stream is stream.worker.members()[0]:  # a worker shared by several cameras is named once, by its first
                pids[f"worker-{name}"] = stream.pid
        pids["mediamtx"] = self.mediamtx.pid if self.mediamtx else None
        for shard in self.sessions.shards():
            pids[f"shard-{shard['shard']}"] = shard["pid"]
        return pids

    def stream_statuses(self) -> list[StreamStatus]:
        return [stream.status() for stream in self.streams.values()]

    def snapshot(self) -> Snapshot:
        """The relay as of now: the machine as last sampled, every stream as it is (rates as last sampled)."""
        return dataclasses.replace(self.telemetry.latest, streams=self.stream_statuses())

    def _sample_streams(self) -> list[StreamStatus]:
        """For the telemetry: each stream's rates since its previous sample, and its status."""
        now = time.monotonic()
        for stream in self.streams.values():
            stream.sample_rates(now)
        return self.stream_statuses()

    async def close(self) -> None:
        """Stop what start() started, in reverse; a part that fails to stop is logged and the rest still stop."""
        await self._running.aclose()
        log.info("relay stopped")


async def _stop(what: str, close: Callable[[], Awaitable[None]]) -> None:
    try:
        await close()
    except Exception:
        log.exception("error while stopping %s", what)
