"""Pins the two aiortc internals camrelay relies on, so an aiortc upgrade that
moves them fails here by name instead of silently encoding per viewer or
ignoring PLI."""

import pytest
from aiortc import RTCPeerConnection, RTCRtpSender
from aiortc.rtcrtpsender import RTCRtpSender as SenderClass

from relay.hub import EncodedFrame, PacketHub
from relay.webrtc import borrowed
from relay.webrtc.rtpsend import (
    HubTrack,
    OutgoingFrame,
    SharedPacker,
    attach_to_sender,
    h264_preferences,
    payloads_for,
)


class Counter:
    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1


async def test_sender_has_the_private_encoder_slot_and_keyframe_hook():
    pc = RTCPeerConnection()
    try:
        keyframes = Counter()
        hub = PacketHub("cam0", keyframes)
        transceiver = pc.addTransceiver(HubTrack(hub, "t"), direction="sendonly")
        sender = transceiver.sender
        assert hasattr(sender, "_RTCRtpSender__encoder"), "aiortc renamed RTCRtpSender.__encoder"
        assert callable(getattr(SenderClass, "_send_keyframe", None)), "aiortc renamed RTCRtpSender._send_keyframe"
        attach_to_sender(sender, hub)
        assert isinstance(sender._RTCRtpSender__encoder, SharedPacker)
        before = keyframes.n
        sender._send_keyframe()  # what aiortc calls on PLI and FIR
        assert keyframes.n == before + 1
        hub.close()
    finally:
        await pc.close()


def test_rtcp_handler_still_routes_pli_and_fir_to_send_keyframe():
    import inspect

    source = inspect.getsource(SenderClass._handle_rtcp_packet)
    assert "RTCP_PSFB_PLI" in source and "RTCP_PSFB_FIR" in source and "_send_keyframe()" in source


def test_sender_packs_non_frames_with_its_encoder():
    import inspect

    source = inspect.getsource(SenderClass._next_encoded_frame)
    assert "self.__encoder.pack(data)" in source and "if self.__encoder is None" in source


def test_attach_refuses_a_sender_without_the_hooks():
    class Bare:
        pass

    with pytest.raises(RuntimeError, match="internals changed"):
        attach_to_sender(Bare(), PacketHub("cam0", Counter()))  # type: ignore[arg-type]


def test_payloads_are_computed_once_per_frame():
    nal = b"\x00\x00\x00\x01\x65" + bytes(5000)  # an IDR slice larger than one packet
    frame = EncodedFrame(nal, 9000, True, 0.0)
    first = payloads_for(frame)
    assert len(first) > 1  # FU-A fragments
    assert payloads_for(frame) is first
    payloads, ts = SharedPacker().pack(OutgoingFrame(frame, 12345))  # the timestamp is the viewer's
    assert payloads is first and ts == 12345


def test_preferences_are_h264_mode_1_then_rtx():
    prefs = h264_preferences()
    mimes = [c.mimeType.lower() for c in prefs]
    assert mimes[0] == "video/h264" and set(mimes) <= {"video/h264", "video/rtx"}
    assert prefs[0].parameters["profile-level-id"] == "42e01f"
    assert all(c.parameters.get("packetization-mode") in ("1", 1) for c in prefs if c.mimeType.lower() == "video/h264")
    assert RTCRtpSender.getCapabilities("video")  # still a public API


def test_aioice_internals_the_relay_reads_are_still_there():
    """relay.webrtc.udpbatch and the liveness watch lean on these; an aioice upgrade that moves them fails here."""
    import inspect

    import aioice.ice

    assert "self.transport.sendto(data, addr)" in inspect.getsource(aioice.ice.StunProtocol.send_data)
    assert "self.receiver" in inspect.getsource(aioice.ice.StunProtocol.datagram_received)
    assert "self._nominated" in inspect.getsource(aioice.ice.Connection.sendto)
    assert "remote_addr" in inspect.getsource(aioice.ice.CandidatePair)


def test_the_payload_types_an_answer_keeps_are_aiortcs_one_list_and_the_patch_widens_it():
    """An answer to an offer whose H.264 is on 41 (Chromium's lower dynamic range) keeps 41 while a relay holds
    OFFERED_PAYLOAD_TYPES, and aiortc's own 96-127 rule is back after; an aiortc that stops reading
    ``rtp.DYNAMIC_PAYLOAD_TYPES`` in find_common_codecs fails here."""
    import aiortc.rtcpeerconnection as pc
    from aiortc import RTCRtpCodecParameters

    def offered(pt: int) -> RTCRtpCodecParameters:
        params = {"packetization-mode": "1", "profile-level-id": "f4001f", "level-asymmetry-allowed": "1"}
        return RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=pt, parameters=params)

    local = [offered(101)]  # the relay's own numbering of the same codec
    release = borrowed.OFFERED_PAYLOAD_TYPES.hold()
    try:
        assert [c.payloadType for c in pc.find_common_codecs(local, [offered(41)])] == [41]
        assert [c.payloadType for c in pc.find_common_codecs(local, [offered(70)])] == [101]  # 64-95: never
    finally:
        release()
    assert [c.payloadType for c in pc.find_common_codecs(local, [offered(41)])] == [101]


async def test_sender_fields_the_fast_send_path_uses_are_still_there():
    from relay.webrtc import rtpsend

    pc = RTCPeerConnection()
    try:
        hub = PacketHub("cam0", Counter())
        sender = pc.addTransceiver(HubTrack(hub, "t"), direction="sendonly").sender
        rtpsend.install(sender)  # raises if aiortc renamed one of rtpsend.FIELDS
        assert sender._run_rtp.__func__ is rtpsend._run_rtp and sender._retransmit.__func__ is rtpsend._retransmit
        assert "self._run_rtp(" in __import__("inspect").getsource(SenderClass.send)  # started through the instance
        hub.close()
    finally:
        await pc.close()
