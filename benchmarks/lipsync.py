"""Audio latency and lip sync of the test pattern's sound, as aiortc plays it and as camrelay delivers it.

    python -m benchmarks.lipsync --duration 30

camrelay (``camrelay serve``, a test pattern with its sound) is watched and
heard by one viewer at a time, for ``--duration`` seconds each:

- ``aiortc``: a ``WhepViewer`` offering audio and video, as a program would
  play it: each decoded frame's pixel clock, each decoded 20 ms of sound read
  per the spec (``benchmarks.bursts``). aiortc's receivers add their own wait
  (its audio jitter buffer hands a packet on once 4 more have come: 80 ms;
  its video one a frame at the next frame's first packet) and do no lip sync.
- ``delivered``: ``AvProbe``, the same offer with its decrypted RTP read here
  (``benchmarks.borrowed.tap_decrypted``): each access unit decoded at its
  marker bit, each Opus packet as it arrives. What the relay delivers, and
  the RTCP sender reports: each one's mapping of RTP time to the capture clock
  is checked against the pixel clock (video) and the bursts' onsets (audio),
  which is what a browser's lip sync relies on.

For each: audio latency (p50, p95), the video latency of the frames received
within 100 ms of each onset (p50, p95), lip sync (audio minus video: median,
p5 and p95, and its drift over the run by a fitted line). Then, interleaved
over ``--rounds`` rounds: ``--viewers`` viewers that decode nothing offering
audio and video, then the same number offering video alone (the relay's CPU:
what sending the sound costs per viewer); and camrelay with its sound beside
camrelay with ``--no-audio``, both at once over the same window (a
``delivered`` viewer each, the same offer): the video latency (median of each
arm), and the CPU of the camera's worker (capture, H.264, and the sound's
capture and one Opus encode; its audio thread's own CPU time, as the worker
counts it) and of the relay, % of one core.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import av
import numpy as np
import psutil
from aiortc.rtp import RtcpPacket, RtcpSrPacket

from benchmarks.borrowed import tap_decrypted
from benchmarks.bursts import WINDOW, BurstReader, Onset, drift_ms, lip_sync
from benchmarks.markerprobe import answer_payload_type
from benchmarks.options import add_stream_options, benchmark_parser, run_facts
from benchmarks.passthrough import api, worker_of
from benchmarks.peers import percentile
from benchmarks.ports import free_port
from relay.camera.testsound import AMPLITUDE, RATE
from relay.rtspin import H264Depacketizer, RtspError, parse_rtp
from relay.webrtc.rtpsend import NTP_UNIX_OFFSET
from relay.webrtc.whepclient import WhepViewer, sample

VIDEO_CLOCK = 90_000  # RTP ticks a second, H.264
RTP_WRAP = 2**32
# A burst's first sample, to the sample: the first decoded one above this share of the tone's amplitude within a
# window of where the spec's 10 ms windows found it. With the 5 ms fade in, that is 0.5 to 0.8 ms into the burst.
ONSET_LEVEL = 0.1
SOUND_KEPT = 2 * RATE  # samples of decoded sound kept to place an onset: a burst is reported 100 ms after it starts
SETTLE = 5.0  # seconds after the first frame before measuring: the worker's imports and first GOP done
START_TIMEOUT = 60.0  # seconds for camrelay's first frame


def _unix(ntp: int) -> float:
    return (ntp >> 32) - NTP_UNIX_OFFSET + (ntp & 0xFFFFFFFF) / 2**32


def captured_at(timestamp: int, report: tuple[int, int], clock: int) -> float:
    """The capture time (Unix seconds) a sender report ``(ntp, rtp timestamp)`` gives an RTP ``timestamp``."""
    ntp, at = report
    ticks = (timestamp - at) % RTP_WRAP
    if ticks >= RTP_WRAP // 2:
        ticks -= RTP_WRAP
    return _unix(ntp) + ticks / clock


def opus_payload_type(answer: str) -> int | None:
    """The Opus payload type of a WHEP answer's audio section, None when it rejected the audio."""
    for line in answer.splitlines():
        if line.startswith("m=audio "):
            if line.split()[1] == "0":
                return None
        elif line.startswith("a=rtpmap:") and " opus/48000/2" in line.lower():
            return int(line.split(":")[1].split()[0])
    return None


@dataclass
class Heard:
    """What one listener heard and saw: burst onsets, and each video frame's (received, latency ms)."""

    onsets: list[Onset] = field(default_factory=list)
    video: list[tuple[float, float]] = field(default_factory=list)
    # Sender reports checked (AvProbe): the capture clock each gives, less the one in the media (ms).
    video_report_error_ms: list[float] = field(default_factory=list)
    audio_report_error_ms: list[float] = field(default_factory=list)
    packets_lost: int = 0

    def summary(self) -> dict:
        synced = lip_sync(self.onsets, self.video)
        lips = [s.lip_sync_ms for s in synced]
        out = {
            "bursts": len(self.onsets),
            "bursts_slipped": sum(o.slipped for o in self.onsets),
            "audio_latency_ms": _percentiles([o.latency_ms for o in self.onsets]),
            "video_latency_ms": _percentiles([s.video_ms for s in synced]),
            "video_frames": len(self.video),
            "lip_sync_ms": {
                "p5": _round(percentile(lips, 5)),
                "median": _round(percentile(lips, 50)),
                "p95": _round(percentile(lips, 95)),
                "drift": _round(drift_ms([s.received for s in synced], lips)),
                "onsets": len(lips),
            },
        }
        if self.video_report_error_ms or self.audio_report_error_ms:
            out["sender_report_error_ms"] = {
                "video": _percentiles(self.video_report_error_ms, (0, 50, 100)),
                "audio": _percentiles(self.audio_report_error_ms, (0, 50, 100)),
            }
            out["packets_lost"] = self.packets_lost
        return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _percentiles(values: list[float], ps: tuple[int, ...] = (50, 95)) -> dict:
    return {**{f"p{p}": _round(percentile(values, p)) for p in ps}, "n": len(values)}


class AvProbe:
    """A WHEP viewer offering audio and video whose decrypted RTP is read here, not by aiortc's receivers: each
    H.264 access unit decoded at its marker bit (its picture's pixel clock read), each Opus packet decoded as it
    comes (its bursts read), and the sender reports checked against both."""

    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.viewer = WhepViewer(url, http, audio=True)
        self.heard = Heard()
        self.measuring = False
        self.pictures = 0  # decoded, measuring or not: the stream plays
        self._bursts = BurstReader()
        self._sound: collections.deque[tuple[int, int, np.ndarray]] = collections.deque()  # (index, ts, samples)
        self._reports: dict[int, tuple[int, int]] = {}  # ssrc -> the latest sender report's (ntp, rtp timestamp)
        self._kinds: dict[int, str] = {}  # ssrc -> "video" or "audio", as its RTP says
        self._depacketizer: H264Depacketizer | None = None
        self._opus: int | None = None
        self._video = av.CodecContext.create("h264", "r")
        self._video.flags |= av.codec.context.Flags.low_delay
        self._video.thread_type = "SLICE"  # frame threads hold frames; slices do not
        self._audio = av.CodecContext.create("libopus", "r")
        self._audio.sample_rate, self._audio.layout, self._audio.format = RATE, "mono", "s16"
        self._release = lambda: None

    async def connect(self) -> None:
        await self.viewer.connect()
        assert self.viewer.answer is not None
        self._depacketizer = H264Depacketizer(answer_payload_type(self.viewer.answer))
        self._opus = opus_payload_type(self.viewer.answer)
        self._release = tap_decrypted(self.viewer.pc, self._rtp, self._rtcp)

    async def close(self) -> None:
        self._release()
        await self.viewer.close()

    def _rtp(self, data: bytes) -> None:
        try:
            packet = parse_rtp(data)
        except RtspError:
            return
        now = time.time()
        assert self._depacketizer is not None
        if packet.payload_type == self._depacketizer.payload_type:
            self._kinds[packet.ssrc] = "video"
            try:
                units = self._depacketizer.push(packet)
            except RtspError:
                return
            for unit in units:
                self._picture(unit.data, unit.pts % RTP_WRAP, packet.ssrc)
        elif packet.payload_type == self._opus:
            self._kinds[packet.ssrc] = "audio"
            for frame in self._audio.decode(av.Packet(packet.payload)):
                self._sound_came(now, packet.timestamp, packet.ssrc, frame.to_ndarray().reshape(-1))

    def _picture(self, data: bytes, timestamp: int, ssrc: int) -> None:
        try:
            pictures = self._video.decode(av.Packet(data))
        except av.FFmpegError:
            return
        self.pictures += len(pictures)
        for picture in pictures:
            s = sample(picture)
            if s.latency_ms is None or not self.measuring:
                continue
            self.heard.video.append((s.received, s.latency_ms))
            report = self._reports.get(ssrc)
            if report is not None:
                captured_ms = s.received * 1000 - s.latency_ms  # its pixel clock
                self.heard.video_report_error_ms.append(
                    captured_at(timestamp, report, VIDEO_CLOCK) * 1000 - captured_ms
                )

    def _sound_came(self, now: float, timestamp: int, ssrc: int, samples: np.ndarray) -> None:
        self._sound.append((self._bursts.samples, timestamp, samples))
        while self._sound and self._bursts.samples - self._sound[0][0] > SOUND_KEPT:
            self._sound.popleft()
        for onset in self._bursts.feed(now, samples):
            if not self.measuring:
                continue
            self.heard.onsets.append(onset)
            report = self._reports.get(ssrc)
            at = self._first_sample_timestamp(onset)
            if report is not None and at is not None:
                self.heard.audio_report_error_ms.append((captured_at(at, report, RATE) - onset.k) * 1000)

    def _first_sample_timestamp(self, onset: Onset) -> int | None:
        """The RTP timestamp of the burst's first loud sample, near where the windows found it."""
        for index, timestamp, samples in self._sound:
            loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > ONSET_LEVEL * AMPLITUDE)
            loud = loud[(index + loud >= onset.sample - WINDOW) & (index + loud < onset.sample + WINDOW)]
            if len(loud):
                return (timestamp + int(loud[0])) % RTP_WRAP
        return None

    def _rtcp(self, data: bytes) -> None:
        try:
            packets = RtcpPacket.parse(data)
        except ValueError:
            return
        for packet in packets:
            if isinstance(packet, RtcpSrPacket):
                self._reports[packet.ssrc] = (packet.sender_info.ntp_timestamp, packet.sender_info.rtp_timestamp)

    @property
    def packets_lost(self) -> int:
        return self._depacketizer.packets_lost if self._depacketizer is not None else 0


async def listen_with_aiortc(url: str, http: aiohttp.ClientSession, duration: float) -> Heard:
    """A stock aiortc viewer offering audio and video, for ``duration`` seconds."""
    viewer = WhepViewer(url, http, audio=True)
    heard, bursts = Heard(), BurstReader()

    async def watch() -> None:
        while True:
            for s in await viewer.read_frames(1):
                if s.latency_ms is not None:
                    heard.video.append((s.received, s.latency_ms))

    async def listen() -> None:
        while True:
            heard.onsets.extend(bursts.feed(*await viewer.recv_audio()))

    try:
        await viewer.connect()
        await viewer.read_frames(1)
        tasks = [asyncio.create_task(watch()), asyncio.create_task(listen())]
        await asyncio.sleep(duration)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await viewer.close()
    return heard


async def listen_delivered(url: str, http: aiohttp.ClientSession, duration: float) -> Heard:
    """``AvProbe`` for ``duration`` seconds, from its first picture on."""
    probe = AvProbe(url, http)
    try:
        await probe.connect()
        deadline = time.monotonic() + START_TIMEOUT
        while not probe.pictures:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no picture within {START_TIMEOUT:g} s")
            await asyncio.sleep(0.05)
        probe.measuring = True
        await asyncio.sleep(duration)
        probe.measuring = False
        probe.heard.packets_lost = probe.packets_lost
    finally:
        await probe.close()
    return probe.heard


class Camrelay:
    """``camrelay serve`` with one test-pattern stream, with its sound or without, in a process of its own."""

    def __init__(self, args, audio: bool, state_dir: str) -> None:
        self.port = free_port()
        cmd = [
            sys.executable, "-m", "relay", "serve", "--no-rtsp", "--auth", "none", "--http-host", "127.0.0.1",
            "--http-port", str(self.port), "--ice-address", "127.0.0.1", "--encoder", "libx264",
            "--log-level", "warning", "--size", args.size, "--fps", str(args.fps), "--bitrate", args.bitrate,
            "--source", f"cam0=test:{args.size}@{args.fps:g}",
        ]  # fmt: skip
        if not audio:
            cmd.append("--no-audio")
        self.audio = audio
        self.proc = subprocess.Popen(cmd, env=dict(os.environ, CAMRELAY_STATE_DIR=state_dir))
        self.url = f"http://127.0.0.1:{self.port}/whep/cam0"

    def wait_live(self, settle: float = SETTLE) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if api(self.port)["frames_encoded"] > 0:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("camrelay sent no frame")
            time.sleep(0.5)
        time.sleep(settle)

    def cpu_times(self) -> tuple[float, float]:
        """CPU seconds so far of the camera's worker, and of the relay process."""
        relay = psutil.Process(self.proc.pid)
        w, r = worker_of(relay).cpu_times(), relay.cpu_times()
        return w.user + w.system, r.user + r.system

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


async def measure_pair(args, state_dir: str, http: aiohttp.ClientSession) -> list[dict]:
    """One round of the A/B: camrelay with its sound and camrelay without, side by side over the same window (a
    shared machine's load falls on both alike), a ``delivered`` viewer of each, their CPU meanwhile."""
    relays = [Camrelay(args, audio, tempfile.mkdtemp(dir=state_dir)) for audio in (True, False)]
    try:
        await asyncio.gather(*(asyncio.to_thread(relay.wait_live, args.settle) for relay in relays))
        return list(await asyncio.gather(*(_arm(relay, args.ab_duration, http) for relay in relays)))
    finally:
        for relay in relays:
            relay.close()


async def _arm(relay: Camrelay, seconds: float, http: aiohttp.ClientSession) -> dict:
    (w0, r0), a0, t0 = relay.cpu_times(), api(relay.port)["audio"]["cpu_seconds"], time.monotonic()
    heard = await listen_delivered(relay.url, http, seconds)
    (w1, r1), elapsed = relay.cpu_times(), time.monotonic() - t0
    sound = api(relay.port)["audio"]
    return {
        "audio": relay.audio,
        "video_latency_ms": _percentiles([latency for _, latency in heard.video]),
        "bursts": len(heard.onsets),
        "worker_cpu_pct": round(100 * (w1 - w0) / elapsed, 2),
        "relay_cpu_pct": round(100 * (r1 - r0) / elapsed, 2),
        # The worker's own count of its audio thread's CPU time (the status comes once a second: over about the
        # same window).
        "audio_thread_cpu_pct": round(100 * (sound["cpu_seconds"] - a0) / elapsed, 2),
        "audio_encode_ms": sound["encode_ms"],
    }


async def viewers_cost(relay: Camrelay, http: aiohttp.ClientSession, count: int, audio: bool, seconds: float) -> dict:
    """The relay's CPU (% of a core) with ``count`` viewers that offer audio (or not) and decode nothing (their
    decrypted RTP counted and dropped: ``tap_decrypted``), over ``seconds``."""
    viewers = [WhepViewer(relay.url, http, audio=audio) for _ in range(count)]
    packets, releases = [0], []

    def took(data: bytes) -> None:
        packets[0] += 1

    try:
        for viewer in viewers:
            await viewer.connect()
            releases.append(tap_decrypted(viewer.pc, took, lambda data: None))
        await asyncio.sleep(2.0)  # every one connected and sent to
        (_, r0), p0, t0 = relay.cpu_times(), packets[0], time.monotonic()
        await asyncio.sleep(seconds)
        (_, r1), elapsed = relay.cpu_times(), time.monotonic() - t0
        return {
            "audio": audio,
            "viewers": count,
            "relay_cpu_pct": round(100 * (r1 - r0) / elapsed, 2),
            "packets_per_viewer_s": round((packets[0] - p0) / elapsed / count, 1),
        }
    finally:
        for release in releases:
            release()
        await asyncio.gather(*(v.close() for v in viewers))


async def run(args) -> dict:
    results: dict = {**run_facts(" ".join(["python -m benchmarks.lipsync", *sys.argv[1:]]))}
    results.update(size=args.size, fps=args.fps, bitrate=args.bitrate, duration=args.duration)
    with tempfile.TemporaryDirectory(prefix="camrelay-lipsync-") as state_dir:
        async with aiohttp.ClientSession() as http:
            relay = Camrelay(args, True, state_dir)
            try:
                await asyncio.to_thread(relay.wait_live, args.settle)
                for name in args.listeners.split(","):
                    listen = {"aiortc": listen_with_aiortc, "delivered": listen_delivered}[name]
                    results[name] = (await listen(relay.url, http, args.duration)).summary()
                    print(name, json.dumps(results[name]), flush=True)
                results["audio_api"] = api(relay.port)["audio"]
                loads = []
                for _ in range(args.rounds if args.viewers else 0):
                    for audio in (True, False):
                        loads.append(await viewers_cost(relay, http, args.viewers, audio, args.ab_duration))
                        print("viewers", json.dumps(loads[-1]), flush=True)
                results["per_viewer"] = {"arms": loads}
                if loads:
                    cpu = {a: percentile([x["relay_cpu_pct"] for x in loads if x["audio"] == a], 50) for a in (1, 0)}
                    results["per_viewer"]["audio_cpu_pct_per_viewer"] = round((cpu[1] - cpu[0]) / args.viewers, 3)
            finally:
                relay.close()
            arms = []
            for _ in range(args.rounds):
                for arm in await measure_pair(args, state_dir, http):
                    arms.append(arm)
                    print("arm", json.dumps(arm), flush=True)
    results["ab"] = {"arms": arms}
    for audio, label in ((True, "with_audio"), (False, "without_audio")):
        mine = [a for a in arms if a["audio"] == audio]
        results["ab"][label] = {
            "video_latency_p50_ms": _round(percentile([a["video_latency_ms"]["p50"] for a in mine], 50)),
            "video_latency_p95_ms": _round(percentile([a["video_latency_ms"]["p95"] for a in mine], 50)),
            "worker_cpu_pct": _round(percentile([a["worker_cpu_pct"] for a in mine], 50)),
            "relay_cpu_pct": _round(percentile([a["relay_cpu_pct"] for a in mine], 50)),
            "audio_thread_cpu_pct": _round(percentile([a["audio_thread_cpu_pct"] for a in mine], 50)),
        }
    # Each round's two arms ran over the same window: the difference within a round, with sound less without.
    pairs = list(zip(arms[::2], arms[1::2], strict=True))
    for p in ("p50", "p95"):
        differences = [a["video_latency_ms"][p] - b["video_latency_ms"][p] for a, b in pairs]
        results["ab"][f"video_latency_{p}_difference_ms"] = _round(percentile(differences, 50))
    return results


def main() -> None:
    ap = benchmark_parser("python -m benchmarks.lipsync", __doc__)
    add_stream_options(ap, size="1280x720")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds each listener listens (default 30)")
    ap.add_argument("--listeners", default="aiortc,delivered", help="which listen, in order (default both)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the A/B, each with and without sound (0: none)")
    ap.add_argument("--ab-duration", type=float, default=20.0, help="seconds measured per arm of the A/B")
    ap.add_argument(
        "--viewers", type=int, default=10, help="viewers for the relay's cost of audio per viewer (0: none)"
    )
    ap.add_argument("--settle", type=float, default=SETTLE, help=f"seconds after the first frame (default {SETTLE:g})")
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    args = ap.parse_args()
    results = asyncio.run(run(args))
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
