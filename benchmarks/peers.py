"""Synthetic viewers for the load benchmark, run in worker processes.

Two kinds, both reporting the same ``PeerResult``:

- WebRTC (WHEP) peers built on aiortc. Light peers (``webrtc``) complete ICE,
  DTLS and SRTP and reassemble every frame, but a stand-in decoder only counts
  it. Lighter ones (``webrtc-rtp``, ``benchmarks/lightpeer.py``) count frames
  and losses from the RTP headers and decrypt no media: one core holds
  hundreds. Probe peers decode every frame and read the pixel clock
  (shared/spec/test-pattern.md) for glass-to-glass latency.
- MJPEG-over-HTTP peers. Light ones read every JPEG; probes also decode each
  one and read its pixel clock.

Every peer counts frames, bytes, frames lost (gaps in the RTP timestamps for
WebRTC; frames the source made that never arrived for MJPEG) and the time from
connected to its first complete frame.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import struct
import time
from dataclasses import asdict, dataclass, field

PEERS_PER_WORKER = 10  # aiortc peers per worker process: keeps each event loop responsive
CONNECT_TIMEOUT = 20.0  # seconds for a peer to connect and get its first frame
FRAME_TIMEOUT = 5.0  # seconds without a frame before a peer gives up
RTP_CLOCK = 90_000  # H.264's RTP clock rate
RTP_TIMESTAMPS = 2**32  # RTP timestamps wrap around here
DISCONTINUITY = 10.0  # seconds: a larger jump between two frames' timestamps is a new timeline, not loss


@dataclass
class PeerResult:
    probe: bool
    url: str = ""  # what it watched
    frames: int = 0
    bytes: int = 0
    lost: int = 0
    fps: float = 0.0
    first_frame_ms: float | None = None  # from connected to the first complete frame
    latencies_ms: list[float] = field(default_factory=list)
    error: str = ""
    packets_lost: int = 0  # sequence gaps (light peers only)
    audio_packets: int = 0  # Opus packets received (light peers offering audio only)
    audio_packets_lost: int = 0  # their sequence gaps
    cores: list[int] = field(default_factory=list)  # the CPUs its worker process ran on, as read back
    # Probes only: where each decoded frame's latency went (``ArrivalTrace``), ms after its capture
    trace: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class PeerPlan:
    """One worker process's share of a sweep point."""

    kind: str  # "webrtc", "webrtc-rtp" (light peers counting RTP headers, benchmarks/lightpeer.py) or "mjpeg"
    url: str
    count: int
    probe: bool
    duration: float
    fps: float  # the source's rate, to count MJPEG frames that never arrived
    light_nice: int = 0  # niceness of light peers' processes (0: same priority as probes)
    light_idle: bool = False  # light peers' processes at SCHED_IDLE: run only when nothing else on their cores wants to
    urls: tuple[str, ...] = ()  # WebRTC: one peer for each (streams of a relay with many); else count on url
    cores: tuple[int, ...] = ()  # the CPUs this worker runs on (os.sched_setaffinity); () leaves it as inherited
    audio: bool = False  # light peers offer audio too, and count its packets
    joined_after: int = 0  # viewers of the point that joined before this worker's (their worker processes earlier)

    @property
    def targets(self) -> tuple[str, ...]:
        """What each of this worker's peers watches."""
        return self.urls or (self.url,) * self.count


def frames_missing(previous_ts: int, ts: int, fps: float, clock: int = RTP_CLOCK) -> int:
    """Frames missing between two frames received one after the other, from their RTP timestamps (``clock`` Hz:
    H.264's 90 kHz unless told, 32 bits, wrapping). A jump back, or forward by more than ``DISCONTINUITY``
    seconds, is a new timeline (a restarted source), not loss."""
    delta = (ts - previous_ts) % RTP_TIMESTAMPS
    if delta > DISCONTINUITY * clock:
        return 0
    return max(0, round(delta * fps / clock) - 1)


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


TRACE_FRAMES = 300  # frames' arrivals a probe keeps: ten seconds at 30 fps, far more than a frame waits
OFFSET_FRAMES = 5  # decoded frames whose pts must all fall on timestamps seen, to fix the offset between them
RTP_MASK = 0xFFFFFFFF
_RTP_HEADER = struct.Struct("!BBHI")  # first byte, marker and payload type, sequence, timestamp


class ArrivalTrace:
    """When each RTP timestamp's packets reached a probe's socket (sans-io: datagrams and clock in, per-frame
    arrivals out), to split a decoded frame's latency: capture to its first packet, to its last (the marker),
    to the first packet of the frame after it (aiortc's jitter buffer hands a frame on only then), to decoded."""

    def __init__(self, keep: int = TRACE_FRAMES) -> None:
        self.keep = keep
        # RTP timestamp: [first arrival, last arrival, packets, bytes]; in arrival order
        self.frames: dict[int, list[float]] = {}
        self.split: dict[str, list[float]] = {
            "first_packet": [], "last_packet": [], "next_frame": [], "decoded": [], "packets": [], "bytes": [],
        }  # fmt: skip
        self.offset: int | None = None  # RTP timestamp less aiortc's pts, once found
        self._waiting: list[tuple[int, float, float]] = []  # decoded frames before the offset was found

    def seen(self, data: bytes, now: float) -> None:
        """One datagram at ``now`` (seconds, the wall clock); anything not video RTP is ignored."""
        if len(data) < _RTP_HEADER.size or not 128 <= data[0] < 192 or 192 <= data[1] < 224:
            return
        timestamp = _RTP_HEADER.unpack_from(data)[3]
        entry = self.frames.get(timestamp)
        if entry is None:
            self.frames[timestamp] = [now, now, 1, len(data)]
            if len(self.frames) > self.keep:
                del self.frames[next(iter(self.frames))]
            return
        entry[1] = now
        entry[2] += 1
        entry[3] += len(data)

    def decoded(self, pts: int, now: float, latency_ms: float) -> None:
        """A frame decoded at ``now`` with the pixel clock's ``latency_ms``: its arrivals, as ms after capture.
        aiortc's receiver counts ``pts`` from its first frame's RTP timestamp, so the first ``OFFSET_FRAMES``
        decoded frames find the offset that puts every one of them on a timestamp seen (frame intervals vary
        from frame to frame: one offset fits)."""
        if self.offset is None:
            self._waiting.append((pts, now, latency_ms))
            if len(self._waiting) < OFFSET_FRAMES:
                return
            fits = {
                (t - self._waiting[0][0]) & RTP_MASK
                for t in self.frames
                if all((t - self._waiting[0][0] + p) & RTP_MASK in self.frames for p, _, _ in self._waiting)
            }
            waiting, self._waiting = self._waiting, []
            if len(fits) != 1:
                return  # none or ambiguous: try the next frames
            self.offset = fits.pop()
            for args in waiting:
                self.decoded(*args)
            return
        timestamp = (pts + self.offset) & RTP_MASK
        entry = self.frames.get(timestamp)
        if entry is None:
            return
        stamps = list(self.frames)
        at = stamps.index(timestamp)
        if at + 1 >= len(stamps):
            return
        captured = now - latency_ms / 1000
        after = self.frames[stamps[at + 1]]
        for name, value in (
            ("first_packet", (entry[0] - captured) * 1000),
            ("last_packet", (entry[1] - captured) * 1000),
            ("next_frame", (after[0] - captured) * 1000),
            ("decoded", latency_ms),
            ("packets", entry[2]),
            ("bytes", entry[3]),
        ):
            self.split[name].append(value)


def run_worker(plan: PeerPlan, ready: mp.Queue, start: mp.Event, results: mp.Queue) -> None:
    """Entry point of a worker process: connect, report ready, measure once ``start`` is set."""
    if plan.cores:
        os.sched_setaffinity(0, plan.cores)  # before any thread starts: they all inherit it
    if not plan.probe and plan.light_nice:
        # Light peers are the load; probes are the measurement. Every peer wakes at
        # the same instant (a frame arrives for all), and a probe queued behind 30
        # light peers' work would measure the generator's own CPU, not the relay.
        os.nice(plan.light_nice)
    if not plan.probe and plan.light_idle:
        # Niceness only weighs the share: a light peer already running keeps the core for the rest of its slice
        # when a probe or the system's source wakes (Linux's EEVDF runs it "to parity"). A SCHED_IDLE task is
        # preempted at once by any other that wakes, and still gets every cycle nobody else wants.
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    try:
        if plan.kind == "webrtc":
            out = asyncio.run(_webrtc_peers(plan, ready, start))
        elif plan.kind == "webrtc-rtp":
            from benchmarks.lightpeer import light_peers

            out = asyncio.run(light_peers(plan, ready, start))
        else:
            out = asyncio.run(_mjpeg_peers(plan, ready, start))
    except Exception as exc:  # report, never hang the parent
        ready.put(("error", f"{type(exc).__name__}: {exc}"))
        out = [asdict(PeerResult(plan.probe, error=f"{type(exc).__name__}: {exc}"))]
    cores = sorted(os.sched_getaffinity(0))
    results.put([{**r, "cores": cores, "joined_after": plan.joined_after} for r in out])


# -- WebRTC -------------------------------------------------------------------


class _Mark:
    """What a light peer's stand-in decoder hands the track instead of a picture."""

    __slots__ = ("pts", "size")

    def __init__(self, size: int, pts: int) -> None:
        self.size = size
        self.pts = pts


class _CountingDecoder:
    """Counts each reassembled frame's bytes; decodes it too when ``inner`` is a real decoder."""

    def __init__(self, inner=None) -> None:
        self.inner = inner
        self.bytes = 0

    def decode(self, encoded_frame):
        self.bytes += len(encoded_frame.data)
        if self.inner is None:
            return [_Mark(len(encoded_frame.data), encoded_frame.timestamp)]
        return self.inner.decode(encoded_frame)


def _install_decoders(probe: bool) -> list[_CountingDecoder]:
    import aiortc.rtcrtpreceiver

    real = aiortc.rtcrtpreceiver.get_decoder
    made: list[_CountingDecoder] = []

    def get_decoder(codec):
        d = _CountingDecoder(real(codec) if probe else None)
        made.append(d)
        return d

    aiortc.rtcrtpreceiver.get_decoder = get_decoder
    return made


async def _webrtc_peers(plan: PeerPlan, ready: mp.Queue, start: mp.Event) -> list[dict]:
    import aiohttp

    from relay.webrtc.borrowed import restrict_host_addresses
    from relay.webrtc.whepclient import WhepViewer, sample

    restrict_host_addresses(["127.0.0.1"])  # loopback only
    decoders = _install_decoders(plan.probe)
    async with aiohttp.ClientSession() as http:
        viewers = [WhepViewer(url, http) for url in plan.targets]
        await asyncio.gather(*(v.connect() for v in viewers))
        results = [PeerResult(plan.probe, url) for url in plan.targets]
        await asyncio.gather(*(v.recv(timeout=CONNECT_TIMEOUT) for v in viewers))
        for v, r in zip(viewers, results, strict=True):
            if v.stats.connected_at is not None and v.stats.first_frame_at is not None:
                r.first_frame_ms = (v.stats.first_frame_at - v.stats.connected_at) * 1000
        traces: dict[int, ArrivalTrace] = {}
        releases = []
        if plan.probe:
            from benchmarks.borrowed import observe_rtp

            for v in viewers:
                trace = traces[id(v)] = ArrivalTrace()
                releases.append(observe_rtp(v.pc, lambda data, trace=trace: trace.seen(data, time.time())))
        ready.put(("ready", len(viewers)))

        async def consume(v: WhepViewer, r: PeerResult) -> None:
            # Read continuously from the first frame on: frames a peer does not
            # take pile up in aiortc's track queue and would read as latency.
            t0 = end = last_ts = None
            while end is None or time.monotonic() < end:
                try:
                    frame = await v.recv(timeout=FRAME_TIMEOUT)
                except TimeoutError:
                    r.error = f"no frame for {FRAME_TIMEOUT:g} s"
                    break
                if end is None:
                    if not start.is_set():
                        continue
                    t0, end = time.monotonic(), time.monotonic() + plan.duration
                r.frames += 1
                if last_ts is not None:
                    r.lost += frames_missing(last_ts, frame.pts, plan.fps)
                last_ts = frame.pts
                if plan.probe:
                    s = sample(frame)
                    if s.latency_ms is not None:
                        r.latencies_ms.append(s.latency_ms)
                        traces[id(v)].decoded(frame.pts, s.received, s.latency_ms)
            if t0 is not None:
                r.fps = r.frames / (time.monotonic() - t0)
            if id(v) in traces:
                r.trace = traces[id(v)].split

        bytes_before = [0] * len(decoders)

        async def mark_start() -> None:
            while not start.is_set():
                await asyncio.sleep(0.01)
            bytes_before[:] = [d.bytes for d in decoders]

        marker = asyncio.create_task(mark_start())
        await asyncio.gather(*(consume(v, r) for v, r in zip(viewers, results, strict=True)))
        await marker
        # One decoder per viewer, made in connection order.
        for r, d, b in zip(results, decoders, bytes_before, strict=False):
            r.bytes = d.bytes - b
        for release in releases:
            release()
        await asyncio.gather(*(v.close() for v in viewers))
        return [asdict(r) for r in results]


# -- MJPEG over HTTP ----------------------------------------------------------


async def _mjpeg_peers(plan: PeerPlan, ready: mp.Queue, start: mp.Event) -> list[dict]:
    conns = await asyncio.gather(*(_mjpeg_connect(plan.url) for _ in range(plan.count)))
    results = [PeerResult(plan.probe) for _ in conns]
    for (_, _, first_ms), r in zip(conns, results, strict=True):
        r.first_frame_ms = first_ms
    ready.put(("ready", plan.count))
    try:
        await asyncio.gather(*(_mjpeg_read(c, r, plan, start) for c, r in zip(conns, results, strict=True)))
    finally:
        for _, writer, _ in conns:
            writer.close()
    return [asdict(r) for r in results]


async def _mjpeg_connect(url: str):
    from urllib.parse import urlsplit

    u = urlsplit(url)
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(u.hostname, u.port, limit=1 << 22)
    writer.write(f"GET {u.path} HTTP/1.0\r\nHost: {u.netloc}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CONNECT_TIMEOUT)
    if not head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
        raise ConnectionError(head.split(b"\r\n")[0].decode(errors="replace"))
    await asyncio.wait_for(_mjpeg_frame(reader), CONNECT_TIMEOUT)
    return reader, writer, (time.monotonic() - t0) * 1000


async def _mjpeg_frame(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    while not head.lstrip().startswith(b"--"):  # the blank line after the previous part
        head = await reader.readuntil(b"\r\n\r\n")
    length = next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
    return await reader.readexactly(int(length.split(b":")[1]))


async def _mjpeg_read(conn, r: PeerResult, plan: PeerPlan, start: mp.Event) -> None:
    import av

    from relay.webrtc.whepclient import sample

    reader, _, _ = conn
    decoder = av.CodecContext.create("mjpeg", "r") if plan.probe else None
    t0 = end = None
    try:
        while end is None or time.monotonic() < end:
            jpeg = await asyncio.wait_for(_mjpeg_frame(reader), FRAME_TIMEOUT)
            if end is None:
                if not start.is_set():
                    continue
                t0, end = time.monotonic(), time.monotonic() + plan.duration
            r.frames += 1
            r.bytes += len(jpeg)
            if decoder is not None:
                # Read after decoding, as the WebRTC probes do: glass to decoded picture.
                s = sample(decoder.decode(av.Packet(jpeg))[0])
                if s.latency_ms is not None:
                    r.latencies_ms.append(s.latency_ms)
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
        r.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if t0 is not None:
        elapsed = time.monotonic() - t0
        r.fps = r.frames / elapsed
        r.lost = max(0, round(elapsed * plan.fps) - r.frames)
