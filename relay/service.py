"""The relay: every stream and every viewer, with one start and one close."""

from __future__ import annotations

import logging

from aiortc import RTCIceServer

from .config import Config, StreamConfig
from .encode import EncoderSettings
from .hub import PacketHub
from .stream import Stream
from .webrtc import ViewerSessions, restrict_host_addresses

log = logging.getLogger(__name__)


class UnknownStream(KeyError):
    pass


class Relay:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.streams: dict[str, Stream] = {}
        w = config.webrtc
        ice = [
            RTCIceServer(urls=url, username=w.ice_username or None, credential=w.ice_credential or None)
            for url in w.ice_servers
        ]
        self.sessions = ViewerSessions(self.hub_for, ice, w.connect_timeout)
        for sc in config.streams:
            self.streams[sc.name] = self._make_stream(sc)

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
        restrict_host_addresses(list(self.config.webrtc.ice_addresses) or None)
        for stream in self.streams.values():
            stream.start()
            log.info("stream=%s source=%s started encoder=%s", stream.name, stream.spec, stream.encoder_name)

    async def close(self) -> None:
        await self.sessions.close_all()
        for stream in self.streams.values():
            await stream.close()
        restrict_host_addresses(None)
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
            "source_errors": st.source_errors,
            "last_error": st.last_error,
        }
