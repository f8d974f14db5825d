"""One stream: a camera's worker process feeding a packet hub, and the consumers it feeds.

    worker process (capture -> the camera's H.264 passed through, or decode once -> encode once;
                    its sound, when it has one -> Opus, encoded once)
        --pipe--> Stream (event loop) --> PacketHub --> viewers, publishers, recorders
                                      --> PacketHub (audio) --> viewers that take audio
                                      --> JpegFeed  --> snapshots, MJPEG, the recorder's snapshots

The codecs run in their own process because PyAV and numpy hold the GIL for a
whole decode or render, which would stall the event loop and every viewer's
packets (measured: 40-60 ms stalls with them on a thread). The Stream
supervises the process: if it dies it is restarted with backoff, and the hub,
with every subscriber on it, stays — the producer is swapped, the consumers
are kept. Each consumer (an edge's use of the stream: ``Consumer``) starts
and closes with it, and its stats are part of the stream's status.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import signal
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from . import h264, ipc
from .aio import PipeMessages, cancel_and_wait, signal_group
from .backoff import CAMERA_RESTARTS, Restarts, Retry
from .hub import EncodedFrame, PacketHub
from .ipc import EncoderSettings
from .lag import DEFAULT_MAX_LAG
from .logsafe import SECRET_FILTER, redact, url_passwords
from .mjpeg import JpegFeed
from .source import SourceSpec, shares_worker
from .status import ConsumerStats, Metric, StreamStatus
from .supervise import Process, python_child

log = logging.getLogger(__name__)

# A worker sends a frame (the slate, if its camera is gone) at the stream's rate; this long without one from any
# of its cameras means the process itself is stuck: kill it. (A camera of a shared worker that alone goes silent
# is started afresh by the worker's own watch, with the same bound.)
WORKER_STALL = ipc.OUTPUT_STALL
WORKER_STARTUP_GRACE = ipc.OUTPUT_STARTUP_GRACE  # a fresh worker imports PyAV and opens its source first
WATCHDOG_PERIOD = 0.5
# A camera passed through has no encoder to slow, and skipping its frames is not sound: with no B-frames every
# picture is a reference (x264, IP cameras), so a skipped one breaks each viewer's picture until the next IDR,
# seconds away; and relaying it costs ~1 % of a core (docs/benchmarks.md). The guard's limit waits for the slate.
NOTHING_TO_SHED = "nothing: passed through (no encoder to slow; every frame is a reference)"
WORKER_MODULE = "relay.camera.worker"  # what a camera worker process runs (python -m)
# A shared worker process that dies again within this many seconds of its last death (on ``Worker.clock``) is split
# in two, its cameras bisected between two processes: a camera that crashes its process (a decoder's segfault, an
# abort in a library) is alone after a few more deaths (log2 of the cameras), the others in processes it is no longer
# in; a process that dies once in a long while (a one-off) keeps its cameras together. The camera restarts' stable
# minute (backoff.CAMERA_RESTARTS): a process that ran that long without dying is taken as sound.
SPLIT_WITHIN = CAMERA_RESTARTS.stable_after


class Consumer(Protocol):
    """What a stream feeds: one edge's use of it (its WebRTC viewers, the RTSP publisher, a WHIP publisher, the
    recorder, the JPEG feed). Started with the stream, closed with it; its stats are in the stream's status."""

    def start(self) -> None: ...

    async def close(self) -> None: ...

    def stats(self) -> ConsumerStats: ...


C = TypeVar("C")
# Opus packets a viewer's audio may have queued (1 s of 20 ms ones): a camera's sound can come in bursts (ffmpeg's
# RTP muxer bundles up to 700 ms of AAC in a packet, and its interleaving holds a third of a second back each
# GOP), which the video's 8 frames dropped whole; a viewer's jitter buffer plays a burst out.
AUDIO_QUEUE_FRAMES = 50
# What a worker's STATUS says of its sound besides the counters (ipc.WORKER_COUNTERS): shown in the API as it is.
AUDIO_STATUS = (
    "audio", "audio_state", "audio_codec", "audio_channels", "audio_bitrate", "audio_encode_ms", "audio_last_error",
)  # fmt: skip


@dataclass(slots=True)
class StreamStats(ipc.Counters):
    """A stream's counters over every worker it has run (the encoded frames as the relay received them)."""

    worker_restarts: int = 0  # its worker process's (every camera of a shared one counts it)
    worker_stalls: int = 0
    worker_moves: int = 0  # left a shared worker for a process of its own (it needed a transcode or the demuxer)
    worker_splits: int = 0  # its shared worker kept dying and was split in two (SPLIT_WITHIN), this camera in a half
    frames_passed_through: int = 0  # the camera's own access units, neither decoded nor encoded
    # Keyframe requests (joins, PLI, FIR) while the source is passed through: a camera cannot be asked for one.
    keyframe_requests_ignored: int = 0


class Stream:
    """One camera's pipeline. ``start()`` on the event loop, ``await close()`` to stop."""

    def __init__(
        self,
        name: str,
        spec: SourceSpec,
        settings: EncoderSettings,
        width: int,
        height: int,
        log_level: str = "info",
        retry: Retry | None = None,
        join: str = "auto",
        mode: str = "auto",
        audio: str = "",
        max_lag: float = DEFAULT_MAX_LAG,
    ) -> None:
        self.name = name
        self.spec = spec
        self.audio_source = audio  # what its worker captures sound from (relay.source.audio_source); "" none
        self.join = join  # config video.join: "auto", "cached_gop" or "keyframe" (join_mode resolves "auto")
        self.stats = StreamStats()
        self.state = "new"
        self.width = spec.width or width
        self.height = spec.height or height
        self.fps = spec.fps or settings.fps
        self.encoder_name = ""
        self.encoders_running = 0
        self.mode = ""  # passthrough or transcode, as the worker decided for its source; "" before
        self.mode_reason = ""
        self.codec = ""  # what the source sends (h264, hevc, mjpeg, test pattern)
        self.profile = ""  # the source's H.264 profile, level and size, when it sends H.264
        self.reader = ""  # what reads the source in the worker: rtspin, ffmpeg, test pattern
        self.sps: h264.Sps | None = None  # of the H.264 the hub carries now: what SDP answers describe
        self._sps_bytes = b""
        self._slate = False
        self.jpegs = JpegFeed(self.set_jpeg)  # the camera's JPEGs, while anyone wants them
        self.hub = PacketHub(
            name,
            self.request_keyframe,
            cached_start=self.starts_from_cache,
            max_lag=max_lag,
            share_window=ipc.KEYFRAME_MIN_INTERVAL,
        )
        # Its sound, fanned out as the video is (a bounded queue per subscriber, counted drops). Every Opus packet
        # decodes on its own: each is a "keyframe" to the hub, so a subscriber starts, and after a lag resumes, at
        # the next packet; there is no keyframe to ask for and no GOP to keep.
        self.audio = PacketHub(name, lambda: None, max_frames=AUDIO_QUEUE_FRAMES)
        self._audio_status: dict[str, object] = {}  # the worker's latest word on its sound (ipc.WorkerStatus.audio*)
        self.consumers: list[Consumer] = [self.jpegs]
        self._started: list[Consumer] = []
        SECRET_FILTER.secrets.update(url_passwords(spec.target))  # the camera's: hidden in every log line and status
        self.worker_config = ipc.WorkerConfig(
            name,
            spec.unredacted(),
            width,
            height,
            settings.fps,
            settings.bitrate,
            settings.keyframe_interval,
            settings.encoder,
            log_level,
            spec.mode or mode,
            audio,
        )
        # Its worker process: one of its own, unless the relay puts it in a shared one (``Worker``) before start.
        self.retry = retry
        self.worker = Worker([self], retry)
        self.camera = 0  # its index in its worker
        self.closing = False
        self._want_jpeg: float | None = None
        self._max_fps = 0
        self._base_counts = StreamStats()  # counters of workers that have exited
        self.last_unit = 0.0  # monotonic: its worker's last unit of it (the watchdog's)
        self._rates = (0.0, 0.0, 0.0)  # captured and encoded frames a second, bits a second
        self._rates_from: tuple[float, int, int, int] | None = None  # when, frames captured, encoded, bytes

    @property
    def has_audio(self) -> bool:
        """The stream carries sound: WebRTC answers send its Opus to offers that take audio (from the start, so a
        viewer hears the sound from when it comes, even if its source is late or retrying), unless its worker said
        its camera or file, as opened, has none."""
        return bool(self.audio_source) and self._audio_status.get("audio_state") != "none"

    @property
    def passthrough(self) -> bool:
        """True while the hub carries the camera's own H.264 (no slate showing): no keyframe can be forced."""
        return self.mode == "passthrough" and not self._slate

    @property
    def join_mode(self) -> str:
        """How a subscriber that joins (or falls behind) gets its first picture: "cached_gop" (at once, from the
        hub's GOP cache) or "keyframe" (a forced IDR): ``join``, with "auto" decided by ``passthrough``."""
        if self.join == "auto":
            return "cached_gop" if self.passthrough else "keyframe"
        return self.join

    def starts_from_cache(self) -> bool:
        return self.join_mode == "cached_gop"

    @property
    def pid(self) -> int | None:
        """The worker process's pid while one runs (shared with the worker's other cameras, if any)."""
        return self.worker.pid

    def add(self, consumer: Consumer) -> None:
        """Before ``start()``: ``consumer`` starts with the stream and closes with it."""
        self.consumers.append(consumer)

    def consumers_of(self, kind: type[C]) -> list[C]:
        return [c for c in self.consumers if isinstance(c, kind)]

    def start(self) -> None:
        """The worker, then each consumer in turn; one that fails to start raises (``close()`` stops the rest)."""
        self.state = "starting"
        self.worker.start(self)
        for consumer in self.consumers:
            consumer.start()
            self._started.append(consumer)

    async def close(self) -> None:
        """Its consumers (those that started, all at once), then its worker."""
        self.closing = True
        await asyncio.gather(*(self._close(c) for c in self._started))
        await self.worker.release(self)
        self.hub.close()
        self.audio.close()
        self.encoders_running = 0
        self.state = "closed"

    async def _close(self, consumer: Consumer) -> None:
        try:
            await consumer.close()
        except Exception:
            log.exception("stream=%s error while stopping %s", self.name, type(consumer).__name__)

    def sample_rates(self, now: float) -> None:
        """Frame and bit rates since the previous call (``now``, monotonic): the telemetry's interval."""
        st = self.stats
        counts = (st.frames_captured, st.frames_encoded, st.bytes_encoded)
        if self._rates_from is not None and now > self._rates_from[0]:
            t0, *before = self._rates_from
            captured, encoded, sent = ((n - n0) / (now - t0) for n, n0 in zip(counts, before, strict=True))
            self._rates = (captured, encoded, sent * 8)
        self._rates_from = (now, *counts)

    def status(self) -> StreamStatus:
        st = self.stats
        consumers = [c.stats() for c in self.consumers] + [
            self._join_stats(), self._fanout_stats(), self._thermal_stats(), self._audio_stats(),
        ]  # fmt: skip
        capture_fps, encoded_fps, bitrate_bps = self._rates
        return StreamStatus(
            name=self.name,
            state=self.state,
            viewers=sum(c.viewers for c in consumers),
            capture_fps=capture_fps,
            encoded_fps=encoded_fps,
            bitrate_bps=bitrate_bps,
            encode_ms=st.encode_ms,
            keyframes_forced=st.keyframes_forced,
            frames_dropped={
                "encoder_busy": st.frames_dropped_encoder_busy,
                "corrupt": st.frames_dropped_corrupt,
                "viewer_lag": self.hub.dropped,
                "thermal": st.frames_dropped_thermal,
                "source_loss": st.frames_dropped_source_loss,
            },
            worker_restarts=st.worker_restarts,
            camera_restarts=st.camera_restarts,
            worker_moves=st.worker_moves,
            worker_splits=st.worker_splits,
            source_errors=st.source_errors,
            source=str(self.spec),
            width=self.width,
            height=self.height,
            fps=self.fps,
            encoder=self.encoder_name,
            encoders_running=self.encoders_running,
            mode=self.mode,
            mode_reason=self.mode_reason,
            codec=self.codec,
            profile=self.profile,
            reader=self.reader,
            profile_level_id=self.sps.profile_level_id if self.sps else "",
            frames_passed_through=st.frames_passed_through,
            frames_decoded=st.frames_decoded,
            keyframe_requests_ignored=st.keyframe_requests_ignored,
            frames_captured=st.frames_captured,
            frames_encoded=st.frames_encoded,
            keyframes=st.keyframes,
            frames_slate=st.frames_slate,
            worker_stalls=st.worker_stalls,
            last_error=st.last_error,
            pipeline_delay_ms=self.hub.pipeline_delay.percentiles_ms(),
            fanout_delay_ms=self.hub.fanout_delay.percentiles_ms(),
            consumers=consumers,
        )

    def _join_stats(self) -> ConsumerStats:
        """How joiners start, and the GOP cache they start from."""
        hub, labels = self.hub, {"stream": self.name}
        gop = hub.gop
        cache = {
            "frames": len(gop.frames), "bytes": gop.bytes, "starts": hub.cache_starts, "overflows": gop.overflows,
        }  # fmt: skip
        keyframes = {
            "requests": hub.keyframe_requests, "merged": hub.keyframe_requests_merged, "shared": hub.keyframe_shares,
            # viewers' PLI and FIR: received, and let through their gate (hub.VIEWER_KEYFRAME_INTERVAL): asked of the
            # encoder, or merged with a keyframe already on its way (then counted in "merged" too)
            "viewers": hub.viewer_keyframe_gate.asked, "viewers_sent": hub.viewer_keyframe_gate.sent,
        }  # fmt: skip
        return ConsumerStats(
            {"join": self.join_mode, "gop_cache": cache, "keyframe_requests": keyframes},
            (
                Metric("camrelay_stream_gop_cache_bytes", "gauge", "Bytes of the current GOP held for joiners.",
                       gop.bytes, labels),
                Metric("camrelay_stream_gop_cache_starts_total", "counter",
                       "Subscribers started from the GOP cache (joins and resyncs).", hub.cache_starts, labels),
                Metric("camrelay_stream_gop_cache_overflows_total", "counter",
                       "GOPs that outgrew the cache (joiners waited for a keyframe).", gop.overflows, labels),
                Metric("camrelay_stream_keyframe_requests_total", "counter",
                       "Keyframes asked of the encoder (joins, PLI, FIR).", hub.keyframe_requests,
                       labels),
                Metric("camrelay_stream_keyframe_requests_merged_total", "counter",
                       "Keyframe requests not sent: one asked for was on its way.", hub.keyframe_requests_merged,
                       labels),
                Metric("camrelay_stream_viewer_keyframe_requests_total", "counter",
                       "Viewers' PLI and FIR received (at most one a second goes on to the encoder).",
                       hub.viewer_keyframe_gate.asked, labels),
                Metric("camrelay_stream_keyframe_shares_total", "counter",
                       "Joiners started from a keyframe of the last 0.5 s instead of asking for one.",
                       hub.keyframe_shares, labels),
            ),
        )  # fmt: skip

    def _audio_stats(self) -> ConsumerStats:
        """Its sound: the source and its state, the Opus encoder, frames captured and sent on, and dropped."""
        st, a, labels = self.stats, self._audio_status, {"stream": self.name}
        dropped = {"overrun": st.audio_frames_dropped_overrun, "viewer_lag": self.audio.dropped}
        api = {
            "source": a.get("audio", "") or self.audio_source,
            "state": a.get("audio_state", "starting") if self.audio_source else "off",
            "codec": a.get("audio_codec", ""),
            "channels": a.get("audio_channels", 0),
            "bitrate": a.get("audio_bitrate", 0),
            "encode_ms": round(float(a.get("audio_encode_ms", 0.0)), 2),  # type: ignore[arg-type]
            "frames_captured": st.audio_frames_captured,
            "frames": st.audio_frames_encoded,
            "frames_dropped": dropped,
            "source_errors": st.audio_source_errors,
            "restarts": st.audio_restarts,  # its thread hung, the sound started afresh in the worker (video untouched)
            "packets_dropped": st.audio_packets_dropped,  # a camera's sound: RTP packets unreadable or late
            "last_error": a.get("audio_last_error", ""),
            "cpu_seconds": round(st.audio_cpu_seconds, 3),  # the worker's audio thread: capture and encode
            "pipeline_delay_ms": self.audio.pipeline_delay.percentiles_ms(),
            "fanout_delay_ms": self.audio.fanout_delay.percentiles_ms(),
        }
        return ConsumerStats(
            {"audio": api},
            (
                Metric("camrelay_stream_audio_frames_total", "counter", "Opus frames (20 ms) from the worker.",
                       st.audio_frames_encoded, labels),
                Metric("camrelay_stream_audio_source_errors_total", "counter", "Audio source failures.",
                       st.audio_source_errors, labels),
                Metric("camrelay_stream_audio_restarts_total", "counter",
                       "Times the sound's thread hung and the sound was started afresh (the video untouched).",
                       st.audio_restarts, labels),
                Metric("camrelay_stream_audio_cpu_seconds_total", "counter",
                       "CPU time of the worker's audio thread (capture, Opus encode).",
                       round(st.audio_cpu_seconds, 3), labels),
                *(Metric("camrelay_stream_audio_frames_dropped_total", "counter", "Audio frames dropped, by reason.",
                         n, {**labels, "reason": reason}) for reason, n in dropped.items()),
            ),
        )  # fmt: skip

    def _fanout_stats(self) -> ConsumerStats:
        """The hub's fan-out: frames handed to subscribers, subscribers that fell behind, keyframes asked for them."""
        hub, gate, labels = self.hub, self.hub.keyframe_gate, {"stream": self.name}
        lagging = sum(1 for sub in hub.subscribers if sub.lagging)
        hubs = (hub, self.audio)
        retransmits = sum(h.retransmits for h in hubs)
        refused = sum(h.retransmits_refused for h in hubs)
        fanout = {
            # of delivered: handed over in the stream's one call a frame for its live viewers (the rest alone)
            "delivered": hub.delivered, "batched": hub.batched, "resyncs": hub.resyncs, "lagging": lagging,
            "keyframe_requests": gate.sent, "keyframe_requests_coalesced": gate.asked - gate.sent,
            # packets its WebRTC peers' NACKs had sent again (video and sound: viewers, a WHIP publisher's server),
            # and those refused past a peer's budget
            "retransmits": retransmits, "retransmits_refused": refused,
        }  # fmt: skip
        return ConsumerStats(
            {"fanout": fanout},
            (
                Metric("camrelay_stream_fanout_delivered_total", "counter",
                       "Frames handed to subscribers (viewers, publishers, the recorder), once per subscriber.",
                       hub.delivered, labels),
                Metric("camrelay_stream_fanout_batched_total", "counter",
                       "Of the frames delivered, those sent in one call a frame for every live viewer.", hub.batched,
                       labels),
                Metric("camrelay_stream_fanout_resyncs_total", "counter",
                       "Times a subscriber fell past its lag limit (skipped to a keyframe).", hub.resyncs, labels),
                Metric("camrelay_stream_fanout_lagging", "gauge",
                       "Subscribers past their lag limit that have not caught up yet.", lagging, labels),
                Metric("camrelay_stream_fanout_keyframe_requests_total", "counter",
                       "Keyframes asked of the encoder for subscribers that fell behind.", gate.sent, labels),
                Metric("camrelay_stream_fanout_keyframe_requests_coalesced_total", "counter",
                       "Laggards' keyframe requests served by one already asked (at most one a second).",
                       gate.asked - gate.sent, labels),
                Metric("camrelay_stream_fanout_retransmits_total", "counter",
                       "Packets sent again for WebRTC peers' NACKs (viewers, a WHIP publisher's server).",
                       retransmits, labels),
                Metric("camrelay_stream_fanout_retransmits_refused_total", "counter",
                       "Packets peers' NACKs asked for past their resend budget, not sent again.", refused, labels),
            ),
        )  # fmt: skip

    @property
    def thermal_sheds(self) -> str:
        """What the thermal guard's limit (``set_max_fps``) takes off this stream now: "" while there is none."""
        if not self._max_fps:
            return ""
        return NOTHING_TO_SHED if self.passthrough else "frames"

    def _thermal_stats(self) -> ConsumerStats:
        return ConsumerStats({"thermal": {"max_fps": self._max_fps, "sheds": self.thermal_sheds}})

    def request_keyframe(self) -> None:
        """From the event loop; the worker rate-limits forced IDRs. A passed-through camera cannot be asked for
        one: the request is counted, and the subscriber waits for the camera's next keyframe."""
        if self.passthrough:
            self.stats.keyframe_requests_ignored += 1
            return
        self._command(ipc.CMD_KEYFRAME)

    def set_max_fps(self, fps: float) -> None:
        """Encode at most ``fps`` frames a second (0: all); kept across worker restarts."""
        self._max_fps = int(min(255, max(0, fps)))
        self._command(ipc.CMD_MAX_FPS + bytes([self._max_fps]))

    def set_jpeg(self, demand: float | None) -> None:
        """JPEGs of every frame (0), of keyframes at most every ``demand`` seconds, or none (None)."""
        self._want_jpeg = demand
        self._command(jpeg_command(demand))

    def _command(self, cmd: bytes) -> None:
        self.worker.command(self.camera, cmd)

    def worker_started(self) -> None:
        """A worker process started with this camera in it: what it must be told again."""
        if self._want_jpeg is not None:
            self._command(jpeg_command(self._want_jpeg))
        if self._max_fps:
            self._command(ipc.CMD_MAX_FPS + bytes([self._max_fps]))
        self.request_keyframe()  # viewers kept across a restart need a fresh IDR
        self.last_unit = time.monotonic() + WORKER_STARTUP_GRACE - WORKER_STALL

    def worker_ended(self) -> None:
        """Its worker process ended (it is restarted, unless the stream closes)."""
        self._fold_counts()
        if not self.closing:
            self.stats.worker_restarts += 1
            self.encoders_running = 0
            self.state = "restarting"

    def moved(self) -> None:
        """It left its shared worker for a process of its own: that one's counters start from the shared one's."""
        self._fold_counts()
        self.stats.worker_moves += 1
        self.encoders_running = 0
        self.state = "starting"

    def on_message(self, msg: ipc.Message) -> None:
        """One message of its worker's about this camera."""
        if msg.kind == ipc.UNIT:
            self._on_unit(msg)
        elif msg.kind == ipc.AUDIO:
            self.stats.audio_frames_encoded += 1
            self.audio.publish(EncodedFrame(msg.payload, msg.pts, True, msg.capture_time, payloads=[msg.payload]))
        elif msg.kind == ipc.JPEG:
            self.jpegs.publish(msg.payload, msg.capture_time)
        elif msg.kind == ipc.STATUS:
            try:
                status = ipc.WorkerStatus.from_json(msg.payload)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("stream=%s bad status from worker: %r", self.name, exc)
                return
            self._on_status(status)

    def _on_unit(self, msg: ipc.Message) -> None:
        self.last_unit = time.monotonic()
        st = self.stats
        st.frames_encoded += 1
        st.bytes_encoded += len(msg.payload)
        st.frames_passed_through += msg.passthrough
        if msg.keyframe:
            st.keyframes += 1
            st.keyframes_forced += msg.forced
            self._read_sps(msg.payload, msg.nals)
        self.hub.publish(EncodedFrame(msg.payload, msg.pts, msg.keyframe, msg.capture_time, nals=msg.nals))

    def _read_sps(self, unit: bytes, nals: tuple[int, ...] | None) -> None:
        """The SPS in front of a keyframe (before its first slice: a 1080p keyframe, 100-300 KiB, is not split
        for it; found by its NAL units' places where the worker gave them, ``nals``), parsed when it differs from
        the last one."""
        try:
            found = next((n for n in h264.head_nals(unit, nals) if h264.nal_type(n) == h264.NAL_SPS), b"")
            if found and found != self._sps_bytes:
                self._sps_bytes = found
                self.sps = h264.parse_sps(found)
                log.info("stream=%s sends H.264 %s (%s)", self.name, self.sps.describe(), self.sps.profile_level_id)
        except h264.H264Error as exc:
            log.warning("stream=%s keyframe with an unreadable SPS: %s", self.name, exc)

    def _on_status(self, s: ipc.WorkerStatus) -> None:
        base, st = self._base_counts, self.stats
        encode_starts = st.encode_starts
        for key in ipc.WORKER_COUNTERS:  # a counter never goes back, whatever a worker says (its bug, lost counts)
            setattr(st, key, max(getattr(st, key), getattr(base, key) + getattr(s, key)))
        if st.encode_starts > encode_starts:  # its first picture waits for PyAV's import and x264's open: a grace
            self.last_unit = max(self.last_unit, time.monotonic() + WORKER_STARTUP_GRACE - WORKER_STALL)
        st.encode_ms = s.encode_ms
        st.last_error = redact(s.last_error, SECRET_FILTER.secrets)  # shown to every viewer in the API
        self.state = s.state
        self.width, self.height, self.fps = s.width or self.width, s.height or self.height, s.fps or self.fps
        self.encoder_name = s.encoder
        self.encoders_running = s.encoders_running
        self.mode, self.mode_reason, self.codec, self.profile = s.mode, s.mode_reason, s.codec, s.profile
        self.reader = s.reader
        self._slate = s.slate
        self._audio_status = {key: getattr(s, key) for key in AUDIO_STATUS}
        self._audio_status["audio_last_error"] = redact(s.audio_last_error, SECRET_FILTER.secrets)
        if s.own_process and self.worker.shared:
            self.worker.move_out(self, s.own_process)

    def _fold_counts(self) -> None:
        """A worker ended: keep its counters as the base for the next one."""
        for key in ipc.WORKER_COUNTERS:
            setattr(self._base_counts, key, getattr(self.stats, key))


# Logger names a worker's lines are logged under (each a logger kept for good): its modules' few, as many as that
# twice over; past it, whatever else a worker names is logged as its camera code's.
MAX_WORKER_LOGGERS = 64
WORKER_LOGGER = "relay.camera.worker"
_worker_loggers: set[str] = set()


def _worker_logger(name: str) -> str:
    """The logger a worker's line named ``name`` goes to: its own while few names have come."""
    if name in _worker_loggers or len(_worker_loggers) < MAX_WORKER_LOGGERS:
        _worker_loggers.add(name)
        return name
    return WORKER_LOGGER


class Worker:
    """One camera worker process (``python -m relay.camera.worker``) for one stream, or several RTSP cameras
    that share it (``[video] cameras_per_worker``, ``share_workers``): started with its first stream, stopped
    with its last, restarted with backoff when it dies (every camera in it restarts: their hubs and subscribers
    are kept). Its pipe carries every camera's messages, each naming its camera (``ipc.Message.camera``), and
    its stdin every camera's commands. A camera that hangs or goes silent is the worker's business (each camera has
    its own stall watch, slate and output watch there); the relay's watchdog kills the process when no camera of it
    sent a frame for ``WORKER_STALL`` (every camera sends the slate when its own is gone), that is when the process
    is stuck. A failure to handle one camera's message restarts that camera alone (``ipc.CMD_RESTART``), again and
    again with a growing wait (``backoff.CAMERA_RESTARTS`` on ``clock``: a bug that hits every frame is not a restart
    every few seconds for ever); a camera that turns out to need a process of its own (its status's
    ``own_process``) moves to one (``move_out``). A shared process that dies again within ``SPLIT_WITHIN`` of its
    last death (on ``clock``) is split in two (``_split``), until the camera that crashes it is alone."""

    def __init__(self, streams: list[Stream], retry: Retry | None = None) -> None:
        self.streams = streams  # by camera index in the process; a stream that moved out keeps its slot till then
        for camera, stream in enumerate(streams):
            stream.worker, stream.camera = self, camera
        self.name = _worker_name(streams)
        self._child = python_child(
            self.name,
            WORKER_MODULE,
            (ipc.WORKER_CONFIG_ENV, ipc.configs_to_json([s.worker_config for s in streams])),
            started=self._started,
            run=self._run,
            ended=self._ended,
            retry=retry,
            stdout_protocol=lambda: PipeMessages(ipc.Reader().feed, self._on_message),
        )
        self._open: set[str] = set()  # its streams started and not closed (or moved out)
        self._supervised = False
        self._restarts: dict[str, Restarts] = {}  # per stream: its messages' handling failed, its restarts asked
        self.clock = time.monotonic  # the restarts' schedule's, and its jitter (the tests' own)
        self.rng: random.Random | None = None
        self._stopping: asyncio.Task[None] | None = None  # the process stopped once every stream moved out
        self._died_at: float | None = None  # on ``clock``: its process's last death (an end it was not asked for)
        self._killing = False  # the relay kills its process (its watchdog, a corrupt pipe): not another's SIGKILL
        # Its process sent a picture since it started (it came up); one the watchdog killed before that (slower to
        # start than WORKER_STARTUP_GRACE: many cameras on a Pi at boot) is no crashing camera, its kill no death
        # toward a split (``_ended``): splits are for good.
        self._up = False
        self._killed_unborn = False

    @property
    def pid(self) -> int | None:
        return self._child.pid

    @property
    def shared(self) -> bool:
        """The process runs several cameras (its cameras neither transcode nor use FFmpeg's demuxer there)."""
        return len(self.streams) > 1

    def members(self) -> list[Stream]:
        """Its streams still in it (not moved out), by camera index."""
        return [s for s in self.streams if s.worker is self]

    def start(self, stream: Stream) -> None:
        """A stream of it starts: the process, with the first."""
        self._open.add(stream.name)
        if not self._supervised:
            self._supervised = True
            self._child.supervise()

    async def release(self, stream: Stream) -> None:
        """A stream of it closed: the process stops with the last (the others' cameras go on meanwhile)."""
        self._open.discard(stream.name)
        if not self._open:
            await self._child.stop()

    def move_out(self, stream: Stream, reason: str) -> None:
        """``stream``'s camera needs a process of its own (it stopped in this one): it gets one, its hub and
        viewers kept as on any restart; this process goes on with the others (and is stopped if none is left)."""
        if stream.worker is not self:
            return
        log.info("stream=%s moves to a worker process of its own: %s", stream.name, reason)
        started = stream.name in self._open
        self._open.discard(stream.name)
        stream.moved()
        solo = Worker([stream], stream.retry)  # its own backoff, as the worker it had before it was grouped
        if started:
            solo.start(stream)
        self._stop_if_unused()

    def _stop_if_unused(self) -> None:
        """Its process stopped once none of its streams is open here (all moved out, or split off)."""
        if self._supervised and not self._open and self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._child.stop())

    def command(self, camera: int, cmd: bytes) -> None:
        proc = self._child.proc
        if proc is not None and proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.write(ipc.command(camera, cmd))

    def _started(self, proc: Process) -> None:
        self._up = False
        for stream in self.members():
            stream.worker_started()

    async def _run(self, proc: Process) -> None:
        watchdog = asyncio.get_running_loop().create_task(self._watchdog(proc))
        try:
            pipe = self._child.stdout
            assert isinstance(pipe, PipeMessages)
            await self._until_corrupt(pipe.ended)
        finally:
            await cancel_and_wait(watchdog)

    async def _ended(self, code: int | None) -> None:
        members = self.members()
        for stream in members:
            stream.worker_ended()
        # A SIGKILL the relay did not send is the OOM killer's (or an admin's): no camera's doing, and a split, more
        # processes, would only take more memory. Every other end it was not asked for is its own: a crash, an
        # abort, an exit, the relay's kill of a process that hung or wrote garbage.
        others = code == -signal.SIGKILL and not self._killing
        unborn, self._killing, self._killed_unborn = self._killed_unborn, False, False
        # Streams closing (the relay stops them, or itself): no new process for them, nor one left without them.
        closing = any(s.closing for s in members)
        if not self._child.stopping and not others and not closing and not unborn:
            now = self.clock()
            if len(members) > 1 and self._died_at is not None and now - self._died_at < SPLIT_WITHIN:
                self._split(members, code, now)
                members = self.members()
                self._stop_if_unused()
            self._died_at = now
        if members and len(members) < len(self.streams):  # the next process runs only those still here
            self.streams = members
            self.name = self._child.name = _worker_name(members)
            for camera, stream in enumerate(members):
                stream.camera = camera
            self._child.env[ipc.WORKER_CONFIG_ENV] = ipc.configs_to_json([s.worker_config for s in members])

    def _split(self, members: list[Stream], code: int | None, now: float) -> None:
        """Its process died again at ``now``, soon after it died before (``SPLIT_WITHIN``): the second half of its
        cameras moves to a new worker process, started at once, the first half stays for this one's restart (after
        its backoff). Halves that die again are split again, so the camera that crashes them ends up alone; one log
        line says which cameras went where, and which are alone now. Never more processes than cameras."""
        half = len(members) // 2
        stay, leave = members[:half], members[half:]
        alone = [group[0].name for group in (stay, leave) if len(group) == 1]
        halves = (",".join(s.name for s in group) for group in (stay, leave))
        log.warning(
            "%s died again %.1fs after its last death (code %s); split in two worker processes: %s and %s%s",
            self.name, now - (self._died_at or now), code, *halves,
            f"; isolated: {' '.join(f'stream={name}' for name in alone)}" if alone else "",
        )  # fmt: skip
        for stream in members:
            stream.stats.worker_splits += 1
        other = Worker(leave, leave[0].retry)
        other.clock, other.rng, other._died_at = self.clock, self.rng, now  # it died with this one
        for stream in leave:
            restarts = self._restarts.pop(stream.name, None)  # the relay's schedule for it goes with it
            if restarts is not None:
                other._restarts[stream.name] = restarts
            if stream.name in self._open:
                self._open.discard(stream.name)
                other.start(stream)

    async def _until_corrupt(self, reading: Awaitable[None]) -> None:
        try:
            await reading
        except ipc.ProtocolError as exc:
            self._killing = True  # by the supervisor, as it ends the run
            log.error("%s pipe is corrupt (%s); restarting the worker", self.name, exc)

    def _on_message(self, msg: ipc.Message) -> None:
        if msg.camera >= len(self.streams):
            raise ipc.ProtocolError(f"a message for camera {msg.camera}; the worker has {len(self.streams)}")
        if msg.kind == ipc.UNIT:
            self._up = True
        if msg.kind == ipc.LOG:  # the process's, whichever camera it is about (the line names its stream)
            self._on_log(msg)
            return
        stream = self.streams[msg.camera]
        if stream.closing or stream.worker is not self:
            return
        try:
            stream.on_message(msg)
        except Exception as exc:  # one camera's message, not the process's other cameras' restart
            self._restart_camera(stream, exc)

    def _restart_camera(self, stream: Stream, exc: Exception) -> None:
        """Handling a message of ``stream``'s failed with ``exc``: its camera restarted in the worker, unless the
        last restart was too recent (then the failure is counted into the next restart's line)."""
        restarts = self._restarts.setdefault(stream.name, Restarts(CAMERA_RESTARTS, self.rng))
        now = self.clock()
        if not restarts.failed(now):
            return
        first, waiting = restarts.first, restarts.waiting
        delay = restarts.restarted(now)
        more = f" ({waiting} more failures since the last restart)" if waiting else ""
        # One line a restart (the schedule spaces them), the traceback with the first of a run of them only.
        log.warning(
            "stream=%s its worker's message could not be handled (%s: %s)%s; restarting the camera: restart %d, "
            "the next no sooner than %.1fs after it",
            stream.name, type(exc).__name__, exc, more, restarts.restarts, delay, exc_info=exc if first else None,
        )  # fmt: skip
        self.command(stream.camera, ipc.CMD_RESTART)

    def _on_log(self, msg: ipc.Message) -> None:
        try:
            record = msg.json()
            name, level, message = record["logger"], record["level"], record["message"]
            if not (isinstance(name, str) and type(level) is int and isinstance(message, str)):
                raise TypeError("a field of the wrong type")
            message = redact(message, SECRET_FILTER.secrets)  # the worker's own, checked
            logging.getLogger(_worker_logger(name)).log(level, "%s", message)
        except (ValueError, KeyError, TypeError):
            log.error("%s bad log record", self.name)

    async def _watchdog(self, proc: Process) -> None:
        while proc.returncode is None:
            await asyncio.sleep(WATCHDOG_PERIOD)
            members = self.members()
            if not members:
                return
            silent = time.monotonic() - max(s.last_unit for s in members)
            if silent > WORKER_STALL and proc.returncode is None:
                for stream in members:
                    stream.stats.worker_stalls += 1
                since = "" if self._up else " since it started (not counted toward a split)"
                log.error("%s sent nothing for %.1fs%s; killing it", self.name, silent, since)
                self._killing, self._killed_unborn = True, not self._up
                signal_group(proc, signal.SIGKILL)
                return


def _worker_name(streams: list[Stream]) -> str:
    """What a worker's log lines start with: ``stream=cam0 worker``, ``streams=cam0,cam1 worker``."""
    names = [s.name for s in streams]
    return f"stream={names[0]} worker" if len(names) == 1 else f"streams={','.join(names)} worker"


def share_workers(streams: list[Stream], per_worker: int) -> list[Worker]:
    """Before they start: the streams that may share a worker (``relay.source.shares_worker``), in order,
    ``per_worker`` to a process (fewer where their configs would pass ``ipc.MAX_CONFIG_ENV``); the others keep
    one each."""
    if per_worker <= 1:
        return []
    groups: list[list[Stream]] = []
    size = 0  # of the last group's configs, as configs_to_json writes them
    for stream in streams:
        if not shares_worker(stream.spec, stream.worker_config.mode):
            continue
        more = len(stream.worker_config.to_json()) + 1
        if groups and len(groups[-1]) < per_worker and size + more <= ipc.MAX_CONFIG_ENV:
            groups[-1].append(stream)
            size += more
        else:
            groups.append([stream])
            size = 1 + more
    return [Worker(group, group[0].retry) for group in groups if len(group) > 1]


def jpeg_command(demand: float | None) -> bytes:
    """The worker's command for a JPEG demand (``JpegFeed``): off, every frame, or keyframes every so often."""
    if demand is None:
        return ipc.CMD_JPEG_OFF
    if not demand:
        return ipc.CMD_JPEG_ON
    return ipc.CMD_JPEG_KEYFRAMES + bytes([min(255, max(1, math.ceil(demand)))])
