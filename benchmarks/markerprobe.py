"""Latency readers that hold no frame of their own: each access unit is decoded at its last RTP packet.

aiortc's jitter buffer hands a frame on when a packet of the next timestamp
arrives, and FFmpeg's H.264 parser (its RTSP demuxer) when the next unit
starts: both add up to a frame interval, differently from frame to frame, so a
p95 read through them says as much about the reader as about the relay. These
two readers decode every unit at the packet that carries the marker bit:

- ``run_marker_probe``: a real WebRTC viewer (``WhepViewer``: ICE, DTLS, SRTP)
  whose decrypted RTP is taken before aiortc's receiver
  (``divert_decrypted_rtp``), parsed and reassembled by camrelay's own
  ``relay.rtspin`` (``parse_rtp``, ``H264Depacketizer``, payload type from the
  answer). No NACK or PLI is sent: on loopback nothing should be lost, and
  what is (``packets_lost``, ``units_dropped``, ``lost``) is counted and
  reported, not hidden.
- ``read_marked``: the camera read from its own RTSP server by camrelay's own
  RTSP client (``RtspSource``, which hands each unit on at its marker bit).

Both decode with the same ``MarkerDecoder`` (PyAV, ``low_delay``, slice
threads: no frame held) and read the pixel clock as ``whepclient.sample``
does: latency = wall clock after the decode - the capture time drawn in the
picture. Each is a worker process's entry point with ``benchmarks.peers``'s
protocol (``ready``, ``start``, ``results``), so ``benchmarks.cameras`` runs
them beside its viewers; each hands in a ``MarkerReading`` as a dict.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import re
import time
from dataclasses import asdict, dataclass, field

from benchmarks.peers import CONNECT_TIMEOUT, frames_missing
from relay.h264 import H264Error, ParameterSets, extradata_parameter_sets
from relay.rtspin import AccessUnit, H264Depacketizer, RtspError, parse_rtp

START_POLL = 0.01  # seconds between looks at the parent's start event (as benchmarks.peers waits for it)
_RTPMAP_H264 = re.compile(r"^a=rtpmap:(\d+) H264/90000", re.I | re.M)


@dataclass
class MarkerReading:
    """What one marker-bit reader counted in the measurement window."""

    url: str
    kind: str  # "webrtc" (through a system) or "rtsp" (the camera's own server)
    probe: bool = True  # listed with a run's viewers: the one that reads the clock
    units: int = 0  # access units handed on by the depacketizer (at their marker bit) and decoded
    marked: int = 0  # RTP packets with the marker bit (WebRTC only: the RTSP client keeps its packets)
    frames: int = 0  # pictures decoded
    held: int = 0  # units whose decode gave no picture at once: the decoder held one
    late: int = 0  # pictures that came out of a later unit's decode (not the unit just decoded: held, handed on late)
    undecodable: int = 0  # units the decoder refused
    unread: int = 0  # pictures whose pixel clock did not read
    lost: int = 0  # frames missing, by gaps in the units' RTP time
    packets_lost: int = 0  # by sequence gaps (WebRTC: the depacketizer's count)
    units_dropped: int = 0  # broken by a loss, or after one before the next IDR (WebRTC: the depacketizer's)
    other_packets: int = 0  # RTP packets of another payload type (RTX): not video
    fps: float = 0.0  # pictures a second
    latencies_ms: list[float] = field(default_factory=list)
    clocks: list[int] = field(default_factory=list)  # each latency's picture's pixel clock (ms): pairs readers
    error: str = ""


class MarkerDecoder:
    """Access units decoded the moment they are whole, their pictures' pixel clocks read and counted.

    Units before the first IDR are skipped (a reader that joins mid-GOP has nothing to decode them against).
    Counting happens only while ``measuring``; decoding always, so the decoder's state is the stream's.
    """

    def __init__(self, reading: MarkerReading, fps: float, out_of_band: list[bytes] | tuple[bytes, ...] = ()) -> None:
        import av

        from relay.webrtc.whepclient import sample

        self._av, self._sample = av, sample
        self._decoder = av.CodecContext.create("h264", "r")
        self._decoder.flags |= av.codec.context.Flags.low_delay
        self._decoder.thread_type = "SLICE"  # frame threads hold frames; slices do not
        self._sets = ParameterSets(out_of_band)
        self._keyed = False
        self._last_pts: int | None = None
        self.reading = reading
        self.fps = fps
        self.measuring = False
        self.pictures = 0  # decoded since the start, window or not: the reader is receiving

    def unit(self, unit: AccessUnit) -> None:
        if not self._keyed and not unit.keyframe:
            return
        self._keyed = True
        r, measuring = self.reading, self.measuring
        if measuring:
            r.units += 1
            if self._last_pts is not None:
                r.lost += frames_missing(self._last_pts, unit.pts, self.fps)
        self._last_pts = unit.pts
        try:
            data, _ = self._sets.access_unit(unit.data)
            packet = self._av.Packet(data)
            packet.pts = unit.pts  # each picture says which unit it came from
            pictures = self._decoder.decode(packet)
        except (H264Error, self._av.FFmpegError):
            r.undecodable += measuring
            return
        self.pictures += len(pictures)
        if not measuring:
            return
        r.held += not pictures
        r.late += sum(picture.pts != unit.pts for picture in pictures)
        for picture in pictures:
            s = self._sample(picture)  # the wall clock right after the decode, the capture time drawn in the picture
            r.frames += 1
            if s.latency_ms is None:
                r.unread += 1
            else:
                r.latencies_ms.append(s.latency_ms)
                r.clocks.append(round(s.received * 1000 - s.latency_ms))


def answer_payload_type(answer: str) -> int:
    """The H.264 payload type a WHEP answer chose (its first ``a=rtpmap:<pt> H264/90000``)."""
    match = _RTPMAP_H264.search(answer)
    if match is None:
        raise ValueError("the answer has no H.264 payload type")
    return int(match.group(1))


def _report(ready: mp.Queue, reading: MarkerReading, announced: bool, exc: Exception) -> None:
    """``exc`` in the reading, and on ``ready`` when the parent still waits for this reader."""
    reading.error = f"{type(exc).__name__}: {exc}"
    if not announced:
        ready.put(("error", f"{reading.kind} marker reader: {reading.error}"))


# -- through a system: WebRTC --------------------------------------------------------------------------------


def run_marker_probe(url: str, duration: float, fps: float, ready: mp.Queue, start: mp.Event, results: mp.Queue):
    """Worker process: one marker-bit WebRTC viewer of ``url`` (WHEP), measured for ``duration`` s from ``start``."""
    reading = MarkerReading(url, "webrtc")
    announced = [False]
    try:
        asyncio.run(_webrtc(reading, duration, fps, ready, start, announced))
    except Exception as exc:  # report, never hang the parent
        _report(ready, reading, announced[0], exc)
    results.put(asdict(reading))


async def _webrtc(
    reading: MarkerReading, duration: float, fps: float, ready: mp.Queue, start: mp.Event, announced: list[bool]
) -> None:
    import aiohttp

    from relay.webrtc.borrowed import divert_decrypted_rtp, restrict_host_addresses
    from relay.webrtc.whepclient import WhepViewer

    decoder = MarkerDecoder(reading, fps)
    mine: dict[str, object] = {}  # "transport", "depacketizer": set once the answer names the payload type

    def on_rtp(transport, data: bytes) -> None:
        depacketizer = mine.get("depacketizer")
        if depacketizer is None or transport is not mine["transport"]:
            return  # before the answer was read: the depacketizer syncs at the next unit, the decoder at an IDR
        assert isinstance(depacketizer, H264Depacketizer)
        try:
            packet = parse_rtp(data)
        except RtspError:
            reading.undecodable += decoder.measuring
            return
        if packet.payload_type != depacketizer.payload_type:
            reading.other_packets += decoder.measuring
            return
        reading.marked += decoder.measuring and packet.marker
        try:
            units = depacketizer.push(packet)
        except RtspError:
            return  # its unit is dropped and counted by the depacketizer
        for unit in units:
            decoder.unit(unit)

    release = [divert_decrypted_rtp(on_rtp), restrict_host_addresses(["127.0.0.1"])]
    try:
        async with aiohttp.ClientSession() as http:
            viewer = WhepViewer(reading.url, http)
            try:
                await viewer.connect()
                assert viewer.answer is not None
                depacketizer = H264Depacketizer(answer_payload_type(viewer.answer))
                mine["transport"] = viewer.pc.getTransceivers()[0].receiver.transport
                mine["depacketizer"] = depacketizer
                deadline = time.monotonic() + CONNECT_TIMEOUT
                while not decoder.pictures:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no picture within {CONNECT_TIMEOUT:g} s")
                    await asyncio.sleep(START_POLL)
                ready.put(("ready", 1))
                announced[0] = True
                while not start.is_set():
                    await asyncio.sleep(START_POLL)
                lost, dropped = depacketizer.packets_lost, depacketizer.units_dropped
                decoder.measuring, t0 = True, time.monotonic()
                await asyncio.sleep(duration)
                decoder.measuring = False
                reading.fps = reading.frames / (time.monotonic() - t0)
                reading.packets_lost = depacketizer.packets_lost - lost
                reading.units_dropped = depacketizer.units_dropped - dropped
                if viewer.pc.connectionState != "connected":
                    reading.error = f"connection {viewer.pc.connectionState}"
            finally:
                await viewer.close()
    finally:
        for undo in release:
            undo()


# -- the camera direct: RTSP -----------------------------------------------------------------------------------


def _no_fallback():
    raise RuntimeError("the marker-bit reader reads H.264 with camrelay's RTSP client only")


def read_marked(url: str, duration: float, fps: float, ready: mp.Queue, start: mp.Event, results: mp.Queue) -> None:
    """Worker process: the camera at ``url`` read by camrelay's RTSP client, each unit decoded at its marker
    bit, measured for ``duration`` s from ``start``."""
    from relay.camera.capture import SourceError
    from relay.camera.rtspsource import RtspSource

    reading = MarkerReading(url, "rtsp")
    announced, t0 = False, None
    source = RtspSource(url, 0, 0, fps, fallback=_no_fallback)
    try:
        source.open()
        decoder = MarkerDecoder(reading, fps, extradata_parameter_sets(source.extradata))
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while t0 is None or time.monotonic() - t0 < duration:
            decoder.unit(source.read_packet())
            if not announced:
                if decoder.pictures:
                    ready.put(("ready", 1))
                    announced = True
                elif time.monotonic() > deadline:
                    raise TimeoutError(f"no picture within {CONNECT_TIMEOUT:g} s")
            elif t0 is None and start.is_set():
                decoder.measuring, t0 = True, time.monotonic()
        decoder.measuring = False
        reading.fps = reading.frames / (time.monotonic() - t0)
    except (SourceError, H264Error, OSError, TimeoutError) as exc:
        _report(ready, reading, announced, exc)
    finally:
        source.close()
    results.put(asdict(reading))
