"""The relay: every stream and every viewer, with one start and one close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from . import devices
from .config import Config, StreamConfig
from .devices import Device
from .discovery import Discovery, StreamNames, device_key
from .hub import PacketHub
from .ipc import EncoderSettings
from .logsafe import redact_url
from .record import Recorder, Retention
from .rtsp import (
    EVERY_INTERFACE,
    LOOPBACK_PUBLISH_TRANSPORT,
    REMOTE_PUBLISH_TRANSPORT,
    Mediamtx,
    MediamtxSettings,
    RtspPublisher,
    check_ports_free,
    find_mediamtx,
    local_host,
)
from .source import SourceSpec
from .stream import Stream
from .telemetry import Snapshot, StreamSample, Telemetry, ThermalGuard
from .webrtc import ice
from .webrtc.sessions import ViewerSessions, process_patches
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
    test pattern on cam0."""

    def __init__(self, config: Config, list_devices: Callable[[], list[Device]] = devices.list_devices) -> None:
        self.config = config
        self.streams: dict[str, Stream] = {}
        w = config.webrtc
        self.sessions = ViewerSessions(
            self.hub_for,
            lambda: ice.for_relay(w),
            w.connect_timeout,
            additional_hosts=w.additional_hosts,
            batch=w.batch_sends,
        )
        self.state_dir = Path(config.state_dir) if config.state_dir else default_state_dir()
        self.mediamtx: Mediamtx | None = None
        self.publishers: dict[str, RtspPublisher] = {}
        self.whip_publishers: list[WhipPublisher] = []  # one per [[whip]] entry whose stream exists
        self.recorders: dict[str, Recorder] = {}
        rc = config.record
        self.recordings_root = Path(rc.root) if rc.root else self.state_dir / "recordings"
        self.telemetry = Telemetry(self._stream_samples, self._process_ids, config.telemetry.log_interval)
        self.thermal_guards: dict[str, ThermalGuard] = {}
        if config.telemetry.thermal_limit:
            self.telemetry.on_sample.append(self._thermal_check)
        self._last_counts: dict[str, tuple[float, int, int, int]] = {}
        self._publish: tuple[str, asyncio.Event | None, str] | None = None  # base URL, ready, transport
        self.automatic = not config.streams
        self.discovery: Discovery | None = None
        self._patches = contextlib.ExitStack()  # aioice's process-wide patches, held while this relay runs
        if self.automatic:
            self.names = StreamNames(self.state_dir / "stream-names.json")
            self.discovery = Discovery(list_devices, self._camera_found, config.devices.discover_interval)

    def _make_stream(self, sc: StreamConfig) -> Stream:
        v = self.config.video
        fps = sc.source.fps or v.fps
        settings = EncoderSettings(v.bitrate, fps, v.keyframe_interval, v.encoder)
        return Stream(sc.name, sc.source, settings, v.width, v.height, self.config.log_level)

    def hub_for(self, name: str) -> PacketHub:
        stream = self.streams.get(name)
        if stream is None:
            raise UnknownStream(name)
        return stream.hub

    async def start(self) -> None:
        w = self.config.webrtc
        self._patches.enter_context(process_patches(w.ice_addresses, w.batch_sends))
        ice.log_settings(w)
        try:
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
            for sc in initial:
                await self.add_stream(sc)
            for entry in self.config.whip:
                if entry.stream not in self.streams:
                    log.warning("stream=%s does not exist (yet); WHIP publishing starts when it does", entry.stream)
            if self.discovery is not None and self.config.devices.discover:
                self.discovery.start()
            self.telemetry.start()
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
        if sc.name in self.streams:
            raise ValueError(f"stream {sc.name} exists")
        stream = self._make_stream(sc)
        self.streams[sc.name] = stream
        stream.start()
        log.info("stream=%s source=%s started", stream.name, stream.spec)
        if self._publish is not None:
            base, ready, transport = self._publish
            publisher = RtspPublisher(
                stream.hub, f"{base}/{sc.name}", stream.width, stream.height, stream.fps, ready, transport
            )
            self.publishers[sc.name] = publisher
            publisher.start()
        w = self.config.webrtc
        for entry in self.config.whip:
            if entry.stream == sc.name:
                whip = WhipPublisher(
                    stream.hub, entry.url, entry.bearer_token, lambda: ice.for_relay(w), w.connect_timeout,
                    batch=w.batch_sends,
                )  # fmt: skip
                self.whip_publishers.append(whip)
                whip.start()
        rc = self.config.record
        if rc.enabled:
            recorder = Recorder(
                sc.name, stream.hub, stream.jpegs, self.recordings_root, lambda: (stream.width, stream.height),
                stream.fps, rc.segment, rc.snapshot_interval, Retention(rc.max_size, rc.max_age),
            )  # fmt: skip
            self.recorders[sc.name] = recorder
            recorder.start()
        return stream

    async def _start_rtsp(self, names: list[str]) -> None:
        r = self.config.rtsp
        if not r.enabled:
            return
        if r.publish_url:
            self._publish = (r.publish_url, None, REMOTE_PUBLISH_TRANSPORT)
            return
        binary = find_mediamtx(r.mediamtx)
        settings = MediamtxSettings(r.host, r.port, r.rtp_port, r.rtcp_port, r.user, r.password, self.config.log_level)
        check_ports_free(settings)
        self.mediamtx = Mediamtx(binary, settings, names, self.state_dir)
        await self.mediamtx.start()
        self._publish = (self.mediamtx.publisher_base, self.mediamtx.ready, LOOPBACK_PUBLISH_TRANSPORT)

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
                log.warning(
                    "stream=%s thermal: soc=%.1fC limit=%.0fC; encoding at most %g fps",
                    name,
                    snapshot.temperature,
                    limit,
                    fps,
                )
                stream.set_max_fps(0 if fps >= guard.full_fps else fps)

    def _process_ids(self) -> dict[str, int | None]:
        pids: dict[str, int | None] = {"relay": os.getpid()}
        for name, stream in self.streams.items():
            pids[f"worker-{name}"] = stream.pid
        pids["mediamtx"] = self.mediamtx.pid if self.mediamtx else None
        return pids

    def _stream_samples(self) -> list[StreamSample]:
        """Per-stream rates since the previous sample."""
        now = time.monotonic()
        out = []
        for name, stream in self.streams.items():
            st = stream.stats
            t0, captured0, encoded0, bytes0 = self._last_counts.get(
                name, (now, st.frames_captured, st.frames_encoded, st.bytes_encoded)
            )
            dt = now - t0
            self._last_counts[name] = (now, st.frames_captured, st.frames_encoded, st.bytes_encoded)
            out.append(
                StreamSample(
                    name=name,
                    state=stream.state,
                    viewers=self.sessions.connected(name),
                    capture_fps=(st.frames_captured - captured0) / dt if dt > 0 else 0.0,
                    encoded_fps=(st.frames_encoded - encoded0) / dt if dt > 0 else 0.0,
                    bitrate_bps=(st.bytes_encoded - bytes0) * 8 / dt if dt > 0 else 0.0,
                    encode_ms=st.encode_ms,
                    keyframes_forced=st.keyframes_forced,
                    frames_dropped={
                        "encoder_busy": st.frames_dropped_encoder_busy,
                        "corrupt": st.frames_dropped_corrupt,
                        "viewer_lag": stream.hub.dropped,
                        "thermal": st.frames_dropped_thermal,
                    },
                    restarts=st.worker_restarts,
                    source_errors=st.source_errors,
                )
            )
        return out

    async def close(self) -> None:
        """Stop everything; a part that fails to stop is logged and the rest still stop."""

        async def step(what: str, coro) -> None:
            try:
                await coro
            except Exception:
                log.exception("error while stopping %s", what)

        if self.discovery is not None:
            await step("discovery", self.discovery.close())
        await step("telemetry", self.telemetry.close())
        for name, recorder in self.recorders.items():
            await step(f"recorder {name}", recorder.close())
        for name, publisher in self.publishers.items():
            await step(f"rtsp publisher {name}", publisher.close())
        # At once: each may wait DELETE_TIMEOUT for a server that is gone.
        await asyncio.gather(*(step(f"whip publisher {w.stream}", w.close()) for w in self.whip_publishers))
        await step("viewers", self.sessions.close_all())
        # All at once: each may take its stop timeout, and systemd's TimeoutStopSec is for all of them.
        await asyncio.gather(*(step(f"stream {n}", s.close()) for n, s in self.streams.items()))
        if self.mediamtx is not None:
            await step("mediamtx", self.mediamtx.close())
        self._patches.close()
        log.info("relay stopped")

    def describe(self, stream: Stream) -> dict:
        st = stream.stats
        return {
            "name": stream.name,
            "source": str(stream.spec),
            "width": stream.width,
            "height": stream.height,
            "fps": stream.fps,
            "codec": "H264",
            "encoder": stream.encoder_name,
            "encoders_running": stream.encoders_running,
            "state": stream.state,
            "viewers": self.sessions.count(stream.name),
            "viewers_connected": self.sessions.connected(stream.name),
            # Over the last ~10 s: capture to the hub (per frame), the hub to each viewer's sender.
            "pipeline_delay_ms": stream.hub.pipeline_delay.percentiles_ms(),
            "fanout_delay_ms": stream.hub.fanout_delay.percentiles_ms(),
            "frames_captured": st.frames_captured,
            "frames_encoded": st.frames_encoded,
            "frames_dropped": {
                "encoder_busy": st.frames_dropped_encoder_busy,
                "corrupt": st.frames_dropped_corrupt,
                "viewer_lag": stream.hub.dropped,
            },
            "keyframes": st.keyframes,
            "keyframes_forced": st.keyframes_forced,
            "encode_ms": round(st.encode_ms, 2),
            "worker_restarts": st.worker_restarts,
            "rtsp_path": f"/{stream.name}" if self.config.rtsp.enabled else None,
            "rtsp_live_alias": stream.name == next(iter(self.streams)) and self.config.rtsp.enabled,
            "rtsp_published": self.publishers[stream.name].published if stream.name in self.publishers else 0,
            "whip": [w.describe() for w in self.whip_publishers if w.stream == stream.name],
            "frames_slate": st.frames_slate,
            "source_errors": st.source_errors,
            "worker_stalls": st.worker_stalls,
            "last_error": st.last_error,
        }

    def whip_metrics(self) -> list[tuple[str, str, str, dict[str, str], float]]:
        """WHIP publishers for /metrics, one label set each (the URL without its path)."""
        out = []
        for i, w in enumerate(self.whip_publishers):
            labels = {"stream": w.stream, "whip": str(i), "url": w.shown_url}
            out += [
                ("camrelay_whip_up", "gauge", "1 while publishing over WHIP.", labels, int(w.state == "publishing")),
                ("camrelay_whip_sessions_total", "counter", "WHIP sessions that connected.", labels, w.sessions),
                ("camrelay_whip_errors_total", "counter", "WHIP sessions refused, failed or lost.", labels, w.errors),
                ("camrelay_whip_sent_bytes_total", "counter", "RTP payload bytes sent.", labels, w.bytes_sent),
            ]
        return out
