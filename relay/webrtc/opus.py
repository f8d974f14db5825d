"""A stream's sound to a WebRTC viewer: Opus on the audio section its offer has, sent as the video is.

The stream's worker encodes Opus once (``relay.camera.audio``) and the stream
fans each packet out through its audio hub (``Stream.audio``, a ``PacketHub``
whose frames are one RTP payload each, made once for everyone). A viewer's
audio track is a ``HubTrack`` of that hub: its sender runs the same per-frame
send path as the video (``relay.webrtc.rtpsend``: SRTP in place, batched UDP,
live packets pushed from the hub with no task woken), one Opus frame per RTP
packet, its RTP clock the packets' 48 kHz pts. Sender reports of both tracks
map their RTP clocks onto the capture clock (``FrameSender``), so a browser
plays them in sync.
"""

from __future__ import annotations

from aiortc import RTCPeerConnection, RTCRtpCodecCapability, RTCRtpSender

from ..hub import PacketHub
from .rtpsend import HubTrack, attach_to_sender


class AudioTrack(HubTrack):
    """A viewer's audio: the stream's Opus packets, each stamped with its 48 kHz pts."""

    kind = "audio"


def opus_preferences() -> list[RTCRtpCodecCapability]:
    """Opus (48000/2), nothing else: what the worker encodes."""
    return [c for c in RTCRtpSender.getCapabilities("audio").codecs if c.mimeType.lower() == "audio/opus"]


def add_audio(pc: RTCPeerConnection, hub: PacketHub, name: str, batch: bool = True) -> AudioTrack:
    """A sendonly audio transceiver on ``pc`` sending ``hub``'s Opus; add it before the offer is applied, so
    aiortc matches it to the offer's audio section."""
    track = AudioTrack(hub, name)
    transceiver = pc.addTransceiver(track, direction="sendonly")
    transceiver.setCodecPreferences(opus_preferences())
    attach_to_sender(transceiver.sender, hub, batch)
    return track
