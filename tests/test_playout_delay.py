"""The playout-delay RTP header extension: negotiated when a viewer offers it, carried in every video packet."""

from __future__ import annotations

import asyncio
import re

import pytest
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket, unpack_header_extensions

from relay.config import ConfigError, load
from relay.webrtc import playout
from relay.webrtc.borrowed import divert_decrypted_rtp
from relay.webrtc.playout import RtpHeaderError, add_elements, offered_id
from relay.webrtc.sessions import UNUSED_EXTENSIONS
from relay.webrtc.whepclient import WhepViewer

from .conftest import RunningRelay
from .test_whep import CHROMIUM_OFFER

PACKETS = 200  # video packets looked at per viewer: several frames, a keyframe's fragments among them
EXTMAP = re.compile(r"^a=extmap:(\d+)(?:/\w+)? (\S+)", re.M)


def test_the_value_is_min_and_max_in_10_ms_units():
    assert playout.value(0, 0) == b"\x00\x00\x00"
    assert playout.value(0, 100) == bytes([0x00, 0x00, 0x0A])
    assert playout.value(100, 500) == bytes([0x00, 0xA0, 0x32])
    assert playout.value(40950, 40950) == b"\xff\xff\xff"
    for low, high in ((0, 0), (0, 100), (10, 500), (40950, 40950)):
        assert playout.read(playout.value(low, high)) == (low, high)


@pytest.mark.parametrize("low, high", [(0, 5), (20, 10), (0, 40960), (-10, 0)])
def test_a_value_the_extension_cannot_carry_is_refused(low, high):
    with pytest.raises(ValueError, match="not one the extension carries"):
        playout.value(low, high)


def _header(extensions: bool = True, csrcs: int = 0) -> bytes:
    """A header as aiortc's sender makes one (mid and abs-send-time, or none), no payload."""
    packet = RtpPacket(payload_type=96, sequence_number=1234, timestamp=5678)
    packet.ssrc = 0x11223344
    packet.csrc = list(range(1, csrcs + 1))
    ids = HeaderExtensionsMap()
    if extensions:
        ids.configure(
            RTCRtpParameters(
                headerExtensions=[
                    RTCRtpHeaderExtensionParameters(id=9, uri="urn:ietf:params:rtp-hdrext:sdes:mid"),
                    RTCRtpHeaderExtensionParameters(
                        id=2, uri="http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
                    ),
                ]
            )
        )
        packet.extensions.mid = "0"
        packet.extensions.abs_send_time = 0x123456
    return packet.serialize(ids)


def _elements(data: bytes) -> list[tuple[int, bytes]]:
    """The header extension elements of an RTP packet, read here from its bytes (RFC 3550 5.3.1, RFC 8285)."""
    assert data[0] & 0x10, "no header extension"
    start = 12 + 4 * (data[0] & 0x0F)
    profile, words = int.from_bytes(data[start : start + 2], "big"), int.from_bytes(data[start + 2 : start + 4], "big")
    return list(unpack_header_extensions(profile, data[start + 4 : start + 4 + 4 * words]))


def test_the_element_joins_the_header_extension_aiortc_made():
    header = _header()
    out = add_elements(header, ((5, playout.value(0, 100)),))
    # The rest of the header is unchanged, and a payload after it still parses as the payload.
    packet = RtpPacket.parse(out + b"payload")
    assert (packet.payload_type, packet.sequence_number, packet.timestamp, packet.ssrc) == (96, 1234, 5678, 0x11223344)
    assert packet.payload == b"payload"
    assert _elements(out + b"payload") == [(9, b"0"), (2, b"\x12\x34\x56"), (5, b"\x00\x00\x0a")]
    assert len(out) % 4 == 0


def test_a_header_without_extensions_gains_one_after_its_csrcs():
    out = add_elements(_header(extensions=False, csrcs=2), ((5, playout.value(0, 0)),))
    packet = RtpPacket.parse(out + b"x")
    assert packet.csrc == [1, 2] and packet.payload == b"x"
    assert _elements(out) == [(5, b"\x00\x00\x00")]


def test_an_id_past_14_takes_the_two_byte_form():
    out = add_elements(_header(), ((20, playout.value(0, 0)),))
    assert out[12:14] == b"\x10\x00"  # RFC 8285's two-byte profile
    assert _elements(out) == [(9, b"0"), (2, b"\x12\x34\x56"), (20, b"\x00\x00\x00")]


@pytest.mark.parametrize(
    "header, why",
    [
        (b"\x80\x60\x00", "not an RTP version 2 header"),
        (b"\x40" + bytes(11), "not an RTP version 2 header"),
        (b"\x90" + bytes(11) + b"\xbe\xde", "header extension cut short"),
        (b"\x90" + bytes(11) + b"\xbe\xde\x00\x02" + bytes(4), "its extension says"),
    ],
)
def test_a_header_that_is_not_one_is_refused(header, why):
    with pytest.raises(RtpHeaderError, match=why):
        add_elements(header, ((5, b"\x00\x00\x00"),))


def test_the_offered_id_is_the_video_sections():
    assert offered_id(CHROMIUM_OFFER, "0") == 5
    assert offered_id(CHROMIUM_OFFER, "1") is None  # no such section
    without = "\n".join(line for line in CHROMIUM_OFFER.splitlines() if playout.URI not in line)
    assert offered_id(without, "0") is None
    two = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:a\r\na=extmap:3 " + playout.URI + "\r\n"
    two += "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=extmap:12/recvonly " + playout.URI + "\r\na=mid:v\r\n"
    assert offered_id(two, "v") == 12 and offered_id(two, "a") == 3


@pytest.mark.parametrize(
    "text, expected",
    [("0,0", (0, 0)), ("0,100", (0, 100)), (" 10 , 500 ", (10, 500)), ("off", None), ("OFF", None), ("none", None)],
)
def test_the_setting_reads_min_and_max_in_ms_or_off(text, expected):
    assert load(f'[webrtc]\nplayout_delay = "{text}"\n').webrtc.playout_delay == expected
    assert load(None, {"CAMRELAY_WEBRTC_PLAYOUT_DELAY": text}).webrtc.playout_delay == expected


@pytest.mark.parametrize(
    "value, why",
    [
        ('"5,10"', "multiples of 10 ms"),
        ('"100,0"', "min <= max"),
        ('"0,50000"', "max <= 40950"),
        ('"0"', 'expected "off" or "MIN,MAX"'),
        ('"0,1,2"', 'expected "off" or "MIN,MAX"'),
        ('"-10,0"', 'expected "off" or "MIN,MAX"'),
        ('"fast"', 'expected "off" or "MIN,MAX"'),
        ("0", 'expected "off" or "MIN,MAX"'),
        ("true", 'expected "off" or "MIN,MAX"'),
    ],
)
def test_a_bad_setting_is_refused_naming_the_key(value, why):
    with pytest.raises(ConfigError, match=r"webrtc\.playout_delay: .*" + re.escape(why)):
        load(f"[webrtc]\nplayout_delay = {value}\n")


def offering_playout_delay(kind: str, sdp: str, ext_id: int = 5) -> str:
    """aiortc's offer with the playout-delay extension on its video section, as Chromium offers it."""
    if kind != "offer":
        return sdp
    return re.sub(r"^(a=mid:.*)$", rf"\1\r\na=extmap:{ext_id} {playout.URI}", sdp, count=1, flags=re.M)


class Packets:
    """Every decrypted RTP packet the viewers of this process receive, by their DTLS transport."""

    def __init__(self) -> None:
        self.by_transport: dict[object, list[bytes]] = {}
        self._release = divert_decrypted_rtp(
            lambda transport, data: self.by_transport.setdefault(transport, []).append(data)
        )

    def of(self, viewer: WhepViewer) -> list[bytes]:
        transport = viewer.pc.getTransceivers()[0].receiver.transport
        return self.by_transport.get(transport, [])

    async def wait(self, viewer: WhepViewer, count: int, timeout: float = 20.0) -> list[bytes]:
        async with asyncio.timeout(timeout):
            while len(self.of(viewer)) < count:
                await asyncio.sleep(0.02)
        return self.of(viewer)

    def close(self) -> None:
        self._release()


def extmaps(answer: str) -> dict[str, int]:
    return {uri: int(number) for number, uri in EXTMAP.findall(answer)}


@pytest.mark.relay_config(playout_delay=(0, 100))
async def test_a_viewer_that_offers_playout_delay_gets_it_in_every_packet_and_one_that_does_not_never(
    relay_server: RunningRelay, http
):
    packets = Packets()
    offered = WhepViewer(relay_server.whep(), http, rewrite_sdp=offering_playout_delay)
    plain = WhepViewer(relay_server.whep(), http)
    try:
        await asyncio.gather(offered.connect(), plain.connect())
        assert extmaps(offered.answer).get(playout.URI) == 5, offered.answer
        assert UNUSED_EXTENSIONS.isdisjoint(
            extmaps(offered.answer)
        )  # trimmed (sessions.UNUSED_EXTENSIONS), playout-delay kept
        assert playout.URI not in plain.answer
        for data in await packets.wait(offered, PACKETS):
            elements = dict(_elements(data))
            assert 5 in elements and playout.read(elements[5]) == (0, 100), elements
        answered = set(extmaps(plain.answer).values())
        for data in await packets.wait(plain, PACKETS):
            ids = {i for i, _ in _elements(data)}
            assert ids <= answered and 5 not in ids, (ids, answered)
    finally:
        packets.close()
        await asyncio.gather(offered.close(), plain.close())


@pytest.mark.relay_config(playout_delay=None)
async def test_with_the_setting_off_an_offer_of_playout_delay_is_not_taken(relay_server: RunningRelay, http):
    packets = Packets()
    viewer = WhepViewer(relay_server.whep(), http, rewrite_sdp=offering_playout_delay)
    try:
        await viewer.connect()
        assert playout.URI not in viewer.answer
        for data in await packets.wait(viewer, PACKETS):
            assert 5 not in {i for i, _ in _elements(data)}
    finally:
        packets.close()
        await viewer.close()
