"""Baseline: the common aiortc tutorial approach, for comparison with camrelay.

One source track shared through aiortc's ``MediaRelay``; every viewer's
sender encodes the decoded frames itself (one libx264 encoder per viewer).
To keep the comparison about the architecture, not the encoder settings,
each viewer's encoder is camrelay's (ultrafast, zerolatency, constrained
baseline, same bitrate and keyframe interval) instead of aiortc's default
(libx264 "medium" preset, 1 Mbit/s, which would cost even more per viewer).
Same source work as camrelay's worker (render the test pattern, encode it to
JPEG, decode it: what a USB MJPEG camera costs), done on a thread as aiortc's
MediaPlayer does; same WHEP endpoint, so the same benchmark peers connect.

    python -m benchmarks.baselines.mediarelay --port 8090 --size 1280x720 --fps 30 --bitrate 2M
"""

from __future__ import annotations

import asyncio
import fractions
import threading
import time

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.codecs import h264
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamTrack

from benchmarks.baselines import arguments
from relay.camera.encode import EncoderSettings, H264Encoder, JpegDecoder
from relay.camera.testpattern import PatternRenderer
from relay.config import parse_bitrate
from relay.source import parse_size
from relay.webrtc.borrowed import restrict_host_addresses

TIME_BASE = fractions.Fraction(1, 90_000)
KEYFRAME_INTERVAL = 1.0  # seconds: camrelay's default


def use_camrelay_encoder(bitrate: int, fps: float) -> None:
    """Every aiortc H.264 sender encodes with camrelay's encoder settings (one encoder per viewer)."""

    class ViewerEncoder(h264.H264Encoder):
        def __init__(self) -> None:
            super().__init__()
            self._x264 = H264Encoder(EncoderSettings(bitrate, fps, KEYFRAME_INTERVAL, "libx264"))

        def _encode_frame(self, frame, force_keyframe):
            for data, _, _ in self._x264.encode(frame, frame.pts, force_keyframe):
                yield from self._split_bitstream(data)

    import aiortc.rtcrtpsender

    real = aiortc.rtcrtpsender.get_encoder
    aiortc.rtcrtpsender.get_encoder = lambda codec: (
        ViewerEncoder() if codec.mimeType.lower() == "video/h264" else real(codec)
    )


class CameraTrack(MediaStreamTrack):
    """Decoded frames of the test pattern, produced on a thread at the camera's rate."""

    kind = "video"

    def __init__(self, width: int, height: int, fps: float, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(width, height, fps, loop), daemon=True)
        self._thread.start()

    def _run(self, width, height, fps, loop) -> None:
        renderer, decoder = PatternRenderer(width, height), JpegDecoder()
        t0, n = time.monotonic(), 0
        while not self._stop.is_set():
            n += 1
            delay = t0 + n / fps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = time.time()
            frame = decoder.decode(renderer.jpeg(int(now * 1000)))
            frame.pts, frame.time_base = int(now * 90_000), TIME_BASE
            loop.call_soon_threadsafe(self._offer, frame)

    def _offer(self, frame) -> None:
        if self._queue.full():
            self._queue.get_nowait()  # keep the newest, like a camera
        self._queue.put_nowait(frame)

    async def recv(self):
        return await self._queue.get()

    def stop(self) -> None:
        super().stop()
        self._stop.set()


async def main(port: int, width: int, height: int, fps: float, bitrate: int) -> None:
    restrict_host_addresses(["127.0.0.1"])
    use_camrelay_encoder(bitrate, fps)
    loop = asyncio.get_running_loop()
    camera = CameraTrack(width, height, fps, loop)
    relay = MediaRelay()
    pcs: dict[str, RTCPeerConnection] = {}

    async def whep(request: web.Request) -> web.Response:
        offer = await request.text()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        sid = str(id(pc))
        pcs[sid] = pc
        transceiver = pc.addTransceiver(relay.subscribe(camera), direction="sendonly")
        h264 = [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == "video/H264"]
        transceiver.setCodecPreferences(h264)
        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return web.Response(
            status=201,
            text=pc.localDescription.sdp,
            content_type="application/sdp",
            headers={"Location": f"/whep/cam0/{sid}"},
        )

    async def delete(request: web.Request) -> web.Response:
        pc = pcs.pop(request.match_info["sid"], None)
        if pc is not None:
            await pc.close()
        return web.Response(status=200)

    async def streams(request: web.Request) -> web.Response:
        return web.json_response({"streams": [{"name": "cam0", "frames_encoded": 1}]})

    app = web.Application()
    app.router.add_post("/whep/cam0", whep)
    app.router.add_delete("/whep/cam0/{sid}", delete)
    app.router.add_get("/api/v1/streams", streams)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    ap = arguments(__doc__)
    args = ap.parse_args()
    w, h = parse_size(args.size)
    asyncio.run(main(args.port, w, h, args.fps, parse_bitrate(args.bitrate)))
