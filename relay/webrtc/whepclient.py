"""A WHEP viewer built on aiortc: used by the tests, the benchmarks and ``camrelay probe``.

It connects like a browser would (recvonly video, non-trickle offer, H.264
Constrained Baseline and High offered, as Chrome and Safari do), reads frames,
and can read the pixel clock from each one to measure glass-to-glass latency.
With ``audio=True`` it offers recvonly audio (Opus) too, as a browser's
player does, and reads the decoded sound (``recv_audio``).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin

import aiohttp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCIceTransportPolicy, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from ..camera import pixelclock

# aiortc offers H.264 as Baseline (42001f) and Constrained Baseline (42e01f) only, and matches an answer's
# codec on the profile; its decoder (FFmpeg's) decodes every profile. Offered as High in the first's place,
# as a browser offers it, and named back for aiortc in the answer, a camera's High H.264 passed through reaches
# it as it reaches a browser.
AIORTC_BASELINE = "42001f"
OFFERED_HIGH = "64001f"


def offer_high_profile(offer: str) -> str:
    """aiortc's offer with its Baseline H.264 payload type offered as High 3.1 (level asymmetry allowed)."""
    return offer.replace(f"profile-level-id={AIORTC_BASELINE}", f"profile-level-id={OFFERED_HIGH}")


def high_answer_for_aiortc(offer: str, answer: str) -> str:
    """The answer with the payload type offered as High named back as aiortc's Baseline."""
    high = re.findall(rf"^a=fmtp:(\d+) .*profile-level-id={OFFERED_HIGH}", offer, re.M)
    for pt in high:
        answer = re.sub(
            rf"^(a=fmtp:{pt} .*?profile-level-id=)[0-9A-Fa-f]{{6}}", rf"\g<1>{AIORTC_BASELINE}", answer, flags=re.M
        )
    return answer


_TRANSPORT = ("a=ice-ufrag:", "a=ice-pwd:", "a=fingerprint:", "a=setup:", "a=rtcp-mux")


def _sections(sdp: str) -> tuple[list[str], list[list[str]]]:
    lines = sdp.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("m=")] + [len(lines)]
    return lines[: starts[0]], [lines[a:b] for a, b in zip(starts, starts[1:], strict=False)]


def rejected_for_aiortc(offer: str, answer: str) -> str:
    """The answer with each m-section it rejected (port 0: a stream without sound, for an offer with audio) made
    one aiortc takes, inactive: bundled with the first one it accepted, with that one's ICE, DTLS and RTCP-mux lines
    and the offer's rtpmap of its format. aiortc refuses an answer section without them, where a browser takes the
    rejection as it is (RFC 8843 §7.3.3)."""
    head, sections = _sections(answer)
    served = next((sec for sec in sections if sec[0].split()[1] != "0"), None)
    if served is None:
        return answer
    transport = [line for line in served if line.startswith(_TRANSPORT)]
    offered = _sections(offer)[1]
    mids, out = [], []
    for index, section in enumerate(sections):
        if section[0].split()[1] == "0":
            mids += [line[len("a=mid:") :] for line in section if line.startswith("a=mid:")]
            formats = section[0].split()[3:]
            rtpmap = [line for line in offered[index] if line.startswith(tuple(f"a=rtpmap:{f} " for f in formats))]
            section = [section[0].replace(" 0 ", f" {served[0].split()[1]} ", 1), *transport, *section[1:], *rtpmap]
        out += section
    head = [f"{line} {' '.join(mids)}" if line.startswith("a=group:BUNDLE ") else line for line in head]
    return "\r\n".join(head + out) + "\r\n"


class WhepError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


@dataclass
class FrameSample:
    received: float  # wall clock when the decoded frame came out
    latency_ms: float | None  # from the pixel clock, when it reads


@dataclass
class ViewerStats:
    frames: int = 0
    first_frame_at: float | None = None
    connected_at: float | None = None
    samples: list[FrameSample] = field(default_factory=list)


class WhepViewer:
    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        headers: dict[str, str] | None = None,
        rewrite_sdp: Callable[[str, str], str] | None = None,
        ice_servers: list[RTCIceServer] | None = None,
        relay_only: bool = False,
        audio: bool = False,
    ) -> None:
        self.url = url
        self.audio = audio  # offer audio too (after the video, as camrelay's page would)
        # ("offer" | "answer", sdp) -> sdp: lets a test route the media through a proxy.
        self.rewrite_sdp = rewrite_sdp or (lambda kind, sdp: sdp)
        self.http = session
        self.headers = dict(headers or {})  # on every request: e.g. Authorization for a relay with auth on
        # ice_servers: e.g. from the relay's Link headers (relay.webrtc.ice.parse_links); relay_only: TURN or nothing,
        # as a browser's iceTransportPolicy "relay".
        policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=list(ice_servers or []), iceTransportPolicy=policy))
        self.location: str | None = None
        self.answer: str | None = None  # the relay's answer as it came
        self.track: MediaStreamTrack | None = None
        self.audio_track: MediaStreamTrack | None = None  # when the answer sends audio
        self.stats = ViewerStats()
        self.started = time.monotonic()
        self._track_ready = asyncio.Event()
        self._audio_ready = asyncio.Event()

    async def connect(self) -> None:
        """Offer (``make_offer``), POST it and apply the answer (``send_offer``)."""
        await self.send_offer(await self.make_offer())

    async def make_offer(self) -> str:
        """The offer, made and applied (ICE gathered), as it will be POSTed: a browser's work before its POST."""
        self.pc.addTransceiver("video", direction="recvonly")
        if self.audio:
            self.pc.addTransceiver("audio", direction="recvonly")

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self.audio_track = track
                self._audio_ready.set()
                return
            self.track = track
            self._track_ready.set()

        @self.pc.on("connectionstatechange")
        def on_state() -> None:
            if self.pc.connectionState == "connected" and self.stats.connected_at is None:
                self.stats.connected_at = time.monotonic()

        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.rewrite_sdp("offer", offer_high_profile(self.pc.localDescription.sdp))

    async def send_offer(self, offer: str) -> None:
        """POST ``offer`` (``make_offer``'s) and apply the relay's answer."""
        async with self.http.post(
            self.url, data=offer, headers={**self.headers, "Content-Type": "application/sdp"}
        ) as resp:
            body = await resp.text()
            if resp.status != 201:
                raise WhepError(resp.status, body.strip())
            self.location = urljoin(self.url, resp.headers["Location"])
        self.answer = body
        answer = high_answer_for_aiortc(offer, self.rewrite_sdp("answer", body))
        if self.audio:
            answer = rejected_for_aiortc(offer, answer)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

    async def _next(self, kind: str, timeout: float):
        """The next frame of the ``kind`` track, once the answer gave one."""
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that comes as the frame
        # does (it returns the frame), so a task reading frames in a loop could ignore its cancel and run on,
        # hanging whoever waits for it (a test's teardown did).
        async with asyncio.timeout(timeout):
            await (self._audio_ready if kind == "audio" else self._track_ready).wait()
        track = self.audio_track if kind == "audio" else self.track
        assert track is not None
        async with asyncio.timeout(timeout):
            return await track.recv()

    async def recv(self, timeout: float = 10.0) -> av.VideoFrame:
        frame = await self._next("video", timeout)
        now = time.monotonic()
        self.stats.frames += 1
        if self.stats.first_frame_at is None:
            self.stats.first_frame_at = now
        return frame

    async def recv_audio(self, timeout: float = 10.0) -> tuple[float, np.ndarray]:
        """The next decoded 20 ms of sound: (the wall clock when it came out, its first channel's samples)."""
        frame = await self._next("audio", timeout)
        received = time.time()
        channels = len(frame.layout.channels)
        return received, frame.to_ndarray().reshape(-1, channels)[:, 0]

    async def read_frames(self, count: int, timeout: float = 10.0, clock: bool = True) -> list[FrameSample]:
        out = []
        for _ in range(count):
            frame = await self.recv(timeout)
            out.append(sample(frame) if clock else FrameSample(time.time(), None))
        self.stats.samples.extend(out)
        return out

    async def close(self, delete: bool = True) -> None:
        if delete and self.location:
            try:
                async with self.http.delete(self.location, headers=self.headers) as resp:
                    await resp.read()
            except aiohttp.ClientError:
                pass
        await self.pc.close()


def luma(frame: av.VideoFrame, rows: int | None = None) -> np.ndarray:
    """The Y plane of a decoded frame (or its top ``rows``) as an (H, W) uint8 array, without copying."""
    if frame.format.name not in ("yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "gray"):
        frame = frame.reformat(format="yuv420p")
    plane = frame.planes[0]
    rows = frame.height if rows is None else min(rows, frame.height)
    data = np.frombuffer(plane, dtype=np.uint8, count=plane.line_size * rows)
    return data.reshape(rows, plane.line_size)[:, : frame.width]


def sample(frame: av.VideoFrame) -> FrameSample:
    now = time.time()
    band = frame.width // pixelclock.CELLS if frame.width >= pixelclock.MIN_WIDTH else frame.height
    t = pixelclock.read(luma(frame, band))
    return FrameSample(now, None if t is None else now * 1000 - t)


__all__ = ["WhepViewer", "WhepError", "FrameSample", "MediaStreamError", "luma", "sample"]
