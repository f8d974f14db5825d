"""The load benchmark's light peer (benchmarks/lightpeer.py): its header counting, case by case, and a live
relay whose every frame it counts, once, from the RTP headers alone."""

from __future__ import annotations

import ast
import asyncio
import inspect
import itertools
from pathlib import Path

import aiortc
import pytest
from aioice import Connection

from benchmarks import borrowed as bench_borrowed
from benchmarks.lightpeer import LightPeer, ReportFigures, RtpCounter, RtpCounts
from benchmarks.peers import frames_missing
from relay.webrtc import borrowed

from .conftest import TEST_FPS
from .test_passthrough_out import until

ROOT = Path(__file__).resolve().parent.parent
TICKS = 3000  # RTP ticks of one frame at 30 fps
FPS = 30.0


def rtp(seq: int, ts: int, marker: bool = False, ssrc: int = 0x1234, payload: bytes = b"\x00" * 20) -> bytes:
    """An RTP packet as SRTP carries it: the header in the clear (payload type 102), then what would be
    ciphertext."""
    return (
        bytes((0x80, (0x80 if marker else 0) | 102))
        + (seq & 0xFFFF).to_bytes(2, "big")
        + (ts & 0xFFFFFFFF).to_bytes(4, "big")
        + ssrc.to_bytes(4, "big")
        + payload
    )


def frames(first_seq: int, first_ts: int, count: int, per_frame: int = 3) -> list[bytes]:
    """``count`` frames of ``per_frame`` packets each, the last with the marker, in order."""
    return [
        rtp(first_seq + f * per_frame + i, first_ts + f * TICKS, i == per_frame - 1)
        for f in range(count)
        for i in range(per_frame)
    ]


def fed(packets: list[bytes]) -> RtpCounter:
    counter = RtpCounter(FPS)
    for p in packets:
        assert counter.take(p)
    return counter


def test_frames_in_order_are_counted_once_each_by_their_markers():
    c = fed(frames(100, 5000, 10))
    assert c.counts() == RtpCounts(frames=10, packets=30, bytes=30 * 32)


def test_sequence_and_rtp_time_wrap_around_without_loss():
    c = fed(frames(65530, 2**32 - 4 * TICKS, 8))
    assert (c.frames, c.frames_lost, c.packets_lost) == (8, 0, 0)
    assert c.report().highest_sequence == 65536 + (65530 + 24 - 1 - 65536)  # one cycle in the upper 16 bits


def test_a_frame_the_relay_skipped_is_missing_in_rtp_time_not_in_sequence():
    # Frames 0 and 1, then 3 and 4: frame 2 never sent, and the sender numbers only the packets it sends.
    packets = frames(0, 0, 2) + [rtp(6 + i, 3 * TICKS + (i // 3) * TICKS, i % 3 == 2) for i in range(6)]
    c = fed(packets)
    assert (c.frames, c.frames_lost, c.packets_lost) == (4, 1, 0)


def test_a_packet_lost_inside_a_frame_loses_that_frame():
    packets = frames(0, 0, 4)
    del packets[4]  # the middle packet of frame 1
    c = fed(packets)
    assert (c.frames, c.frames_lost, c.packets_lost) == (3, 1, 1)


def test_a_lost_marker_packet_loses_its_frame_when_the_next_one_starts():
    packets = frames(0, 0, 4)
    del packets[5]  # frame 1's last packet, with its marker
    c = fed(packets)
    assert (c.frames, c.frames_lost, c.packets_lost) == (3, 1, 1)


def test_a_lost_first_packet_right_after_a_complete_frame_loses_the_next_frame():
    packets = frames(0, 0, 4)
    del packets[6]  # frame 2's first packet
    c = fed(packets)
    assert (c.frames, c.frames_lost, c.packets_lost) == (3, 1, 1)


def test_a_whole_frame_lost_on_the_way_counts_once():
    packets = frames(0, 0, 4)
    del packets[3:6]  # all of frame 1: its packets and its RTP time are missing
    c = fed(packets)
    assert (c.frames, c.frames_lost, c.packets_lost) == (3, 1, 3)


def test_late_repeated_and_foreign_packets_are_counted_apart_and_change_nothing_else():
    packets = frames(0, 0, 3)
    c = fed([*packets[:4], packets[1], rtp(9, 0, ssrc=0x9999), *packets[4:]])
    assert (c.frames, c.frames_lost, c.packets, c.packets_lost) == (3, 0, 9, 0)
    assert (c.late, c.foreign) == (1, 1)


@pytest.mark.parametrize(
    "datagram",
    [
        pytest.param(b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"\x00" * 12, id="stun-binding-request"),
        pytest.param(b"\x16\xfe\xfd" + b"\x00" * 20, id="dtls-handshake"),
        pytest.param(b"\x80\xc8\x00\x06" + b"\x00" * 24, id="srtcp-sender-report"),
        pytest.param(b"\x81\xc9\x00\x07" + b"\x00" * 28, id="srtcp-receiver-report"),
        pytest.param(b"", id="empty"),
    ],
)
def test_what_is_not_rtp_goes_on_to_aioice_and_aiortc(datagram):
    c = RtpCounter(FPS)
    assert not c.take(datagram)
    assert c.counts() == RtpCounts()


def test_an_rtp_datagram_too_short_for_its_header_is_taken_and_counted_malformed():
    c = RtpCounter(FPS)
    assert c.take(b"\x80\x66\x00\x01\x00")
    assert c.counts() == RtpCounts(malformed=1)


def test_receiver_reports_give_the_fraction_lost_since_the_previous_one():
    c = RtpCounter(FPS)
    assert c.report() is None  # nothing to report on before the first packet
    packets = frames(10, 0, 4)  # 12 packets, 10-21
    for p in packets[:8]:
        c.take(p)
    for p in packets[10:]:  # 18 and 19 lost
        c.take(p)
    assert c.report() == ReportFigures(0x1234, fraction_lost=(2 << 8) // 12, packets_lost=2, highest_sequence=21)
    for p in frames(22, 4 * TICKS, 1):
        c.take(p)
    assert c.report() == ReportFigures(0x1234, fraction_lost=0, packets_lost=2, highest_sequence=24)


def test_a_window_is_the_difference_of_two_counts():
    c = RtpCounter(FPS)
    packets = frames(0, 0, 6)
    for p in packets[:9]:
        c.take(p)
    before = c.counts()
    for p in packets[9:]:
        c.take(p)
    assert c.counts().minus(before) == RtpCounts(frames=3, packets=9, bytes=9 * 32)


# -- the borrowed internals


def _private_reads(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("_")} - {"__dict__"}


def test_the_benchmarks_borrow_seven_names_that_the_installed_aiortc_and_aioice_have():
    """benchmarks/borrowed.py is written for the versions relay.webrtc.borrowed checks (pyproject's bounds); the
    private names it reads (the light peer's three, the lip-sync probe's tap of decrypted RTP and RTCP, the join
    trace's check list completed, the RTCP cost benchmark's SRTP session) are there in what is installed."""
    assert bench_borrowed.WRITTEN_FOR is borrowed.WRITTEN_FOR
    assert _private_reads(ROOT / "benchmarks" / "borrowed.py") == {
        "_connection", "_protocols", "_send_rtp", "_handle_rtp_data", "_handle_rtcp_data",
        "_check_list_maybe_complete", "_tx_srtp",
    }  # fmt: skip
    assert "self._tx_srtp" in inspect.getsource(aiortc.RTCDtlsTransport.__init__)
    assert callable(Connection._check_list_maybe_complete)
    transport = aiortc.RTCIceTransport(aiortc.RTCIceGatherer())
    assert isinstance(transport._connection, Connection)
    assert isinstance(Connection(ice_controlling=True)._protocols, list)
    assert asyncio.iscoroutinefunction(aiortc.RTCDtlsTransport._send_rtp)
    assert asyncio.iscoroutinefunction(aiortc.RTCDtlsTransport._handle_rtp_data)
    assert asyncio.iscoroutinefunction(aiortc.RTCDtlsTransport._handle_rtcp_data)


# -- live


# Frames a peer may get from a shared keyframe's catch-up before its live ones: the share window's frames
# (ipc.KEYFRAME_MIN_INTERVAL at TEST_FPS), those published while it caught up, and as many again for a busy loop.
CAUGHT_UP_FRAMES = TEST_FPS


def _run_of(encoded: list[int], received: list[int]) -> int | None:
    """Where ``received`` (RTP timestamps, a random origin added) are, in order, a run of the ``encoded`` frames
    (their pts) with none left out: the index of the first, or None."""
    steps = [(t - received[0]) % 2**32 for t in received]
    for k in range(len(encoded) - len(received) + 1):
        if [(p - encoded[k]) % 2**32 for p in encoded[k : k + len(received)]] == steps:
            return k
    return None


async def test_light_peers_count_every_frame_the_relay_encodes_from_the_headers_alone(relay_server, http):
    """Three light peers on a real relay: each counts, from RTP headers it never decrypts, exactly the run of
    frames the relay encoded while it watched (matched by their timestamps), loses none on loopback (what it
    counts lost are the source's own gaps), sends receiver reports, and stays a connected viewer in the API."""
    stream = relay_server.relay.streams["cam0"]
    tap = stream.hub.subscribe("test-tap", max_frames=10_000)  # every frame encoded from now on
    stamps: list[list[int]] = [[], [], []]
    peers = [LightPeer(relay_server.whep("cam0"), http, TEST_FPS, s) for s in stamps]
    try:
        await asyncio.gather(*(p.connect() for p in peers))
        await until(
            lambda: all(p.counter.frames >= 2 * TEST_FPS for p in peers), "two seconds of frames each", timeout=20.0
        )
        await until(lambda: all(p.reports for p in peers), "a receiver report from each", timeout=20.0)
        async with http.get(relay_server.base + "/api/v1/streams") as resp:
            (cam,) = (await resp.json())["streams"]
        counted = [p.counter.counts() for p in peers]
    finally:
        await asyncio.gather(*(p.close() for p in peers))
        encoded = []
        while (frame := tap.get_nowait()) is not None:
            encoded.append(frame.pts)
        tap.close()
    assert cam["viewers_connected"] == 3
    for c, s in zip(counted, stamps, strict=True):
        assert (c.packets_lost, c.late, c.foreign, c.malformed) == (0, 0, 0, 0), c
        assert c.frames <= cam["frames_encoded"]
        # A peer that joins within the share window of a keyframe starts from it, its cached frames restamped onto
        # the live clock as they catch up (relay/webrtc/catchup.py): from its live frames on, its timestamps are
        # the frames' own.
        # The frame begun when it was counted is in: its gap, if any, was counted then.
        live = s[CAUGHT_UP_FRAMES : c.frames + 1]
        k = _run_of(encoded, live)
        assert k is not None, "the frames counted are not a run of the frames encoded"
        # Frames lost: none on the way. Live, only gaps in the source's own time (a test pattern that fell behind
        # on a busy machine skips frames), which the relay never had to send; in a catch-up, each frame carries
        # the live clock as it leaves, so a send loop that woke late on a busy machine shows as a gap there.
        run = encoded[k : k + len(live)]
        caught_up = s[: CAUGHT_UP_FRAMES + 1]
        gaps = sum(frames_missing(a, b, TEST_FPS) for stamps in (caught_up, run) for a, b in itertools.pairwise(stamps))
        assert c.frames_lost == gaps, c


async def test_a_light_peer_offering_audio_counts_the_opus_packets_apart_from_the_video(relay_server, http):
    """A light peer offering audio too (``benchmarks.load --audio``): the stream's Opus packets are counted on a
    counter of their own, each a complete frame, none lost on loopback and every one a packet the stream
    published, none taken for video; its receiver reports (a block for each track) keep it a connected viewer."""
    stream = relay_server.relay.streams["cam0"]
    tap = stream.audio.subscribe("test-tap-audio", max_frames=10_000)  # every packet published from now on
    peer = LightPeer(relay_server.whep("cam0"), http, TEST_FPS, audio=True)
    try:
        await peer.connect()
        assert peer.audio is not None
        await until(
            lambda: peer.audio.packets >= 100 and peer.counter.frames >= TEST_FPS and peer.reports >= 2,
            "two seconds of sound, a second of video and two receiver reports",
            timeout=20.0,
        )
        async with http.get(relay_server.base + "/api/v1/streams") as resp:
            (cam,) = (await resp.json())["streams"]
        sound, video = peer.audio.counts(), peer.counter.counts()
    finally:
        await peer.close()
        published = 0
        while tap.get_nowait() is not None:
            published += 1
        tap.close()
    assert cam["viewers_connected"] == 1
    assert (sound.packets_lost, sound.late, sound.foreign, sound.malformed) == (0, 0, 0, 0), sound
    assert sound.frames == sound.packets <= published  # each Opus packet a frame of its own, marker set
    assert (video.packets_lost, video.foreign) == (0, 0), video  # no Opus packet counted as video


def test_the_join_cost_steps_name_what_aiortc_and_the_relay_define():
    """benchmarks.joincost wraps each of borrowed.JOIN_STEPS where it is looked up: each must be there, a function."""
    import importlib
    import inspect

    from benchmarks.borrowed import JOIN_STEPS

    for _label, module, path in JOIN_STEPS:
        owner = importlib.import_module(module)
        for name in path.split("."):
            owner = inspect.getattr_static(owner, name)
        assert inspect.isfunction(owner), (module, path)
