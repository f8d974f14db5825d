"""camrelay's own RTSP client: the sans-io core (relay/rtspin.py), one fixture per bad case, the depacketizer
against real libx264 units packetized as aiortc does, and the client (relay/camera/rtspsource.py) against a
real mediamtx with Digest credentials and against a small RTSP camera of this test's that sends exactly
what it is told, when it is told (so hand-over order is judged by counts, never by a clock).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import fractions
import hashlib
import itertools
import json
import os
import queue
import random
import re
import shutil
import socket
import sysconfig
import threading
import time
import tracemalloc
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import av
import pytest

from benchmarks import rtspcams
from benchmarks.rtspcams import CameraServer, LiveCamera, server_config
from relay import h264, ipc, rtsp, rtspin
from relay.camera import rtspsource, worker
from relay.camera.capture import SourceError, UseDemuxer, open_source
from relay.camera.rtspsource import RtspSource
from relay.camera.testpattern import PatternRenderer
from relay.config import StreamConfig
from relay.h264 import ParameterSets
from relay.hub import EncodedFrame
from relay.ipc import EncoderSettings
from relay.rtspin import RtspError
from relay.source import parse_source_spec
from relay.webrtc import borrowed, rtpsend

from .conftest import EncodedFrames, make_config, start_relay

DEADLINE = 30.0  # seconds a test waits for what must happen: a deadline, not a measurement
PT = 96
CLOCK = 90_000


# -- real H.264: libx264 High, no B-frames, its parameter sets out of band as a camera's SDP has them


def encode_units(count: int = 12, gop: int = 6, size: tuple[int, int] = (320, 180)) -> tuple[list[bytes], list[bytes]]:
    """(``count`` access units as Annex B, the SPS and PPS given out of band)."""
    renderer = PatternRenderer(*size)
    cc = av.CodecContext.create("libx264", "w")
    cc.width, cc.height, cc.pix_fmt = *size, "yuv420p"
    cc.time_base = fractions.Fraction(1, 30)
    cc.flags |= av.codec.context.Flags.global_header
    cc.options = {"preset": "ultrafast", "profile": "baseline", "x264-params": f"keyint={gop}:bframes=0"}
    units = []
    for i in range(count):
        frame = av.VideoFrame.from_ndarray(renderer.planes(i), format="yuv420p")
        frame.pts = i
        units += [bytes(p) for p in cc.encode(frame)]
    units += [bytes(p) for p in cc.encode()]
    return units[:count], h264.extradata_parameter_sets(bytes(cc.extradata))


UNITS, SETS = encode_units()


def rtp(payload: bytes, seq: int, ts: int, marker: bool, pt: int = PT) -> bytes:
    return (
        bytes([0x80, (0x80 if marker else 0) | pt])
        + (seq % 65536).to_bytes(2, "big")
        + ts.to_bytes(4, "big")
        + (b"\x12\x34\x56\x78" + payload)
    )


def packets_of(units: list[bytes], first_seq: int = 65530, first_ts: int = 2**32 - 6000, markers: bool = True):
    """RTP packets of ``units`` (3000 ticks apart: 30 fps), sequence and timestamp wrapping on the way."""
    out, seq = [], first_seq
    for i, unit in enumerate(units):
        payloads = borrowed.packetize(unit)
        for j, payload in enumerate(payloads):
            out.append(rtp(payload, seq, (first_ts + 3000 * i) % 2**32, markers and j == len(payloads) - 1))
            seq += 1
    return out


def nals(data: bytes) -> list[bytes]:
    return h264.split_annexb(data)


# -- the depacketizer, with real units


def test_each_unit_is_handed_on_at_its_marker_packet_and_comes_out_whole():
    depacketizer = rtspin.H264Depacketizer(PT)
    packets = packets_of(UNITS)
    assert len(packets) > len(UNITS)  # the IDRs are fragmented (FU-A), the rest single NAL or STAP-A
    out, handed = [], []
    for i, packet in enumerate(packets):
        units = depacketizer.push(rtspin.parse_rtp(packet))
        if units:
            handed.append(i)
        out += units
    assert [nals(u.data) for u in out] == [nals(u) for u in UNITS]
    markers = [i for i, p in enumerate(packets) if p[1] & 0x80]
    assert handed == markers  # each at its last packet, not when the next one starts
    assert [u.pts - out[0].pts for u in out] == [3000 * i for i in range(len(UNITS))]  # unwrapped past 2**32
    assert [u.keyframe for u in out] == [h264.is_idr(u) for u in UNITS]
    assert (depacketizer.units, depacketizer.packets_lost, depacketizer.units_dropped) == (len(UNITS), 0, 0)


def test_a_camera_that_never_sets_the_marker_has_its_units_end_at_the_next_timestamp():
    depacketizer = rtspin.H264Depacketizer(PT)
    out = []
    for packet in packets_of(UNITS, markers=False):
        out += depacketizer.push(rtspin.parse_rtp(packet))
    assert [nals(u.data) for u in out] == [nals(u) for u in UNITS[:-1]]  # the last waits for a next


def test_a_camera_that_never_sets_the_marker_has_no_unit_after_a_loss_go_out_until_a_whole_idr():
    """The loss falls at a timestamp change, where a unit with no marker ends: it breaks the unit that starts
    there as well as the one that ends (which of them lost it cannot be told); the IDR missing its first
    slice went out as a keyframe."""
    p_slice, idr_first, idr_second = b"\x41\x80\x01\x02", b"\x65\x80\x03\x04", b"\x65\x40\x05\x06"
    sent = [(idr_first, 0), (idr_second, 0), (p_slice, 3000), (idr_first, 6000), (idr_second, 6000)]
    sent += [(p_slice, 9000), (idr_first, 12000), (idr_second, 12000), (p_slice, 15000)]
    lost = 3  # the first slice of the IDR at 6000
    depacketizer = rtspin.H264Depacketizer(PT)
    out = []
    for seq, (payload, ts) in enumerate(sent):
        if seq != lost:
            out += depacketizer.push(rtspin.parse_rtp(rtp(payload, seq, ts, False)))
    assert [(u.pts, u.keyframe, len(nals(u.data))) for u in out] == [(0, True, 2), (12000, True, 2)]
    assert (depacketizer.packets_lost, depacketizer.units_dropped) == (1, 3)


def test_a_lost_packet_drops_its_unit_and_those_after_it_up_to_the_next_idr():
    packets = packets_of(UNITS)
    second_idr = [i for i, u in enumerate(UNITS) if h264.is_idr(u)][1]
    lost = len(packets_of(UNITS[:2]))  # the first packet of the third unit (a P-frame)
    depacketizer = rtspin.H264Depacketizer(PT)
    out = []
    for i, packet in enumerate(packets):
        if i != lost:
            out += depacketizer.push(rtspin.parse_rtp(packet))
    assert [nals(u.data) for u in out] == [nals(u) for u in UNITS[:2] + UNITS[second_idr:]]
    assert depacketizer.packets_lost == 1
    lost_whole = len(borrowed.packetize(UNITS[2])) == 1  # then it was never seen, so not counted as dropped
    assert depacketizer.units_dropped == second_idr - 2 - lost_whole


@pytest.mark.parametrize(
    ("first_seq", "ssrc"),
    [(100, b"\x12\x34\x56\x78"), (40_000, b"\x12\x34\x56\x78"), (10_005, b"\x0b\xad\xca\xfe")],
    ids=["sequence-back", "sequence-ahead", "new-ssrc"],
)
def test_a_camera_that_restarts_its_stream_is_followed_from_its_first_idr(first_seq, ssrc):
    """RFC 3550 A.1: two packets in a row far from the last sequence number (or a new SSRC) are a camera that
    restarted its stream; before, a backward jump had every packet after it dropped as late, for ever."""
    depacketizer = rtspin.H264Depacketizer(PT)
    out = []
    for packet in packets_of(UNITS, first_seq=10_000):
        out += depacketizer.push(rtspin.parse_rtp(packet))
    assert len(out) == len(UNITS)
    stray = rtp(b"\x41\x9a", 30_000, 0, True)  # one packet far off, then the stream goes on: no restart
    last = 10_000 + len(packets_of(UNITS)) - 1
    for packet in [stray, *packets_of(UNITS[:1], first_seq=last + 1, first_ts=2**31)]:
        out += depacketizer.push(rtspin.parse_rtp(packet))
    assert (len(out), depacketizer.packets_dropped, depacketizer.resyncs) == (len(UNITS) + 1, 1, 0)
    restarted = [p[:8] + ssrc + p[12:] for p in packets_of(UNITS, first_seq=first_seq, first_ts=0)]
    for packet in restarted:
        out += depacketizer.push(rtspin.parse_rtp(packet))
    assert [nals(u.data) for u in out[len(UNITS) + 1 :]] == [nals(u) for u in UNITS]  # from its IDR, every one
    assert (depacketizer.resyncs, depacketizer.packets_dropped, depacketizer.packets_lost) == (1, 1, 0)


def test_a_reader_that_joins_inside_a_fragmented_unit_skips_its_rest_quietly():
    packets = packets_of(UNITS)
    fu_a_start = next(i for i, p in enumerate(packets) if p[12] & 0x1F == 28 and p[13] & 0x80)
    packets = packets[fu_a_start + 1 :]  # the IDR's FU-A start went before this reader joined
    depacketizer = rtspin.H264Depacketizer(PT)
    out = []
    for packet in packets:
        out += depacketizer.push(rtspin.parse_rtp(packet))
    assert [nals(u.data) for u in out] == [nals(u) for u in UNITS[1:]]


def test_a_unit_of_many_tiny_nal_units_is_refused_before_it_holds_more_memory_than_the_unit_cap(monkeypatch):
    monkeypatch.setattr(rtspin, "MAX_UNIT_BYTES", 1 << 20)
    stap_a = bytes([0x78]) + b"\x00\x02\x09\x10" * 1000  # 1000 two-byte NAL units (access unit delimiters)
    depacketizer = rtspin.H264Depacketizer(PT)
    depacketizer.push(rtspin.parse_rtp(rtp(b"\x41\x9a", 0, 0, True)))  # in sync with the stream
    packets = [rtspin.parse_rtp(rtp(stap_a, seq, 3000, False)) for seq in range(1, 200)]  # one unit, no marker
    tracemalloc.start()
    try:
        with pytest.raises(RtspError, match="^access unit over 1048576 bytes"):
            for packet in packets:
                depacketizer.push(packet)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * rtspin.MAX_UNIT_BYTES  # 2 bytes counted per NAL unit held 100 times the cap


# -- one fixture per bad case: plain values in, the exact error out

FU_A_MIDDLE = bytes([0x7C, 0x05]) + b"\x00" * 10  # FU-A, neither start nor end, of an IDR
STAP_A_OVERRUN = bytes([0x78, 0x00, 0x10]) + b"\x67\x42"  # says 16 bytes, holds 2


def interleaved(packets: list[bytes], channel: int = 0) -> bytes:
    return b"".join(b"$" + bytes([channel]) + len(p).to_bytes(2, "big") + p for p in packets)


def scenario_packets() -> dict[str, list[bytes]]:
    """Streams the depacketizer's tests above send, each as RTP packets in the order they arrive."""
    packets = packets_of(UNITS)
    lost = len(packets_of(UNITS[:2]))
    fu_a_start = next(i for i, p in enumerate(packets) if p[12] & 0x1F == 28 and p[13] & 0x80)
    last = 10_000 + len(packets) - 1
    restarted = [p[:8] + b"\x0b\xad\xca\xfe" + p[12:] for p in packets_of(UNITS, first_seq=100, first_ts=0)]
    return {
        "whole": packets,
        "no-marker": packets_of(UNITS, markers=False),
        "loss": packets[:lost] + packets[lost + 1 :],
        "joined-inside-fu-a": packets[fu_a_start + 1 :],
        "duplicate-and-late": packets[:5] + [packets[4], packets[2]] + packets[5:],
        "restart": packets_of(UNITS, first_seq=10_000)
        + [rtp(b"\x41\x9a", 30_000, 0, True), *packets_of(UNITS[:1], first_seq=last + 1, first_ts=2**31)]
        + restarted,
        "bad-packets": packets[:3] + [rtp(STAP_A_OVERRUN, 99, 0, True), rtp(b"\x41", 3, 0, False, pt=97)] + packets[3:],
        "fu-a-errors": packets[:2] + [rtp(FU_A_MIDDLE, 2, 3000, False)] + packets[3:],
    }


needs_c_take = pytest.mark.skipif(rtspin.C_TAKE is None, reason="relay._rtpin is not built here")
# push_frames' per-packet step: in C (relay/_rtpin.c, where it is built) and in Python, each judged alike.
STEPS = [pytest.param("c", marks=needs_c_take), "python"]


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("cut", [1, 7, 1500, 6000, 1 << 20], ids=lambda n: f"reads-of-{n}")
@pytest.mark.parametrize("name", list(scenario_packets()))
def test_a_playing_connections_bytes_give_the_units_and_counts_packet_by_packet_reading_gives(name, cut, step):
    """``Reader.feed_video`` (the RTP packets where they lie in what was read, most with no object each, taken in C
    or in Python) against ``Reader.feed``, ``parse_rtp`` and ``push`` one packet at a time: the same units, the
    same errors, the same counts of packets lost and dropped, units dropped and restarts, however the reads cut
    the bytes; RTCP and a keep-alive's answer in between are passed over."""
    packets = scenario_packets()[name]
    answer = b"RTSP/1.0 200 OK\r\nCSeq: 7\r\nContent-Length: 2\r\n\r\nok"
    wire = interleaved(packets[:3]) + rtcp_frame() + answer + interleaved(packets[3:]) + rtcp_frame()

    def counts(d: rtspin.H264Depacketizer) -> tuple[int, ...]:
        return (d.packets, d.units, d.packets_lost, d.units_dropped, d.packets_dropped, d.resyncs)

    one, one_units, one_errors, responses = rtspin.H264Depacketizer(PT), [], [], []
    for item in rtspin.Reader().feed(wire):
        if isinstance(item, rtspin.Response):
            responses.append(item)
        elif item.channel == 0:
            try:
                one_units += one.push(rtspin.parse_rtp(item.payload))
            except RtspError as exc:
                one_errors.append(str(exc))
    reader, many = rtspin.Reader(), rtspin.H264Depacketizer(PT)
    many.c_take = step == "c"
    played = rtspin.Played([], [], [])
    buffer = memoryview(bytearray(cut))  # read into again and again, as the client's socket reads are
    for start in range(0, len(wire), cut):
        chunk = wire[start : start + cut]
        buffer[: len(chunk)] = chunk
        got = reader.feed_video(buffer[: len(chunk)], 0, many)
        played.units += got.units
        played.responses += got.responses
        played.errors += got.errors
    reader.eof()
    assert [(u.data, u.pts, u.keyframe) for u in played.units] == [(u.data, u.pts, u.keyframe) for u in one_units]
    assert (played.errors, played.responses) == (one_errors, responses) and len(responses) == 1
    assert counts(many) == counts(one)
    assert one_units or name == "no-marker"
    # Each unit names its NAL units' types and places as the depacketizer took them: what a scan of its start codes
    # finds.
    assert all(u.kinds == tuple(h264.nal_types(u.data)) for u in played.units + one_units)
    assert all(u.starts == h264.nal_starts(u.data) for u in played.units + one_units)


def depacketizer_state(d: rtspin.H264Depacketizer) -> tuple:
    """All a depacketizer knows: its counts, the unit being gathered and where it is in the stream."""
    counts = (d.packets, d.units, d.packets_lost, d.units_dropped, d.packets_dropped, d.resyncs)
    gathered = (bytes(d._unit), tuple(d._kinds), tuple(d._starts), d._fu, d._size, d._keyframe, d._broken)
    return counts, gathered, (d._last_seq, d._last_ts, d._last_raw_ts, d._timestamp, d._wait_idr, d._synced)


def mangled(rng: random.Random, packets: list[bytes]) -> list[bytes]:
    """``packets`` as a bad network and a bad camera deliver them, at random: some lost, repeated or swapped, and
    some with a byte of the RTP header (version bits, marker, payload type, sequence, timestamp, SSRC) or of the
    payload's first two (the NAL type, an FU-A's start and end bits, a STAP-A's first size) changed."""
    out: list[bytes] = []
    for packet in packets:
        r = rng.random()
        if r < 0.03:
            continue
        changed = bytearray(packet)
        if r < 0.12:
            at = rng.choice([0, 1, 2, 3, 4, 7, 8, 11, 12, 13])
            changed[at] = rng.randrange(256) if rng.random() < 0.3 else changed[at] ^ 1 << rng.randrange(8)
        out.append(bytes(changed))
        if r > 0.98:
            out.append(bytes(changed))
        elif r > 0.96 and len(out) > 2:
            out[-1], out[-2] = out[-2], out[-1]
    return out


@needs_c_take
@pytest.mark.parametrize("cap", [rtspin.MAX_UNIT_BYTES, 2500], ids=["unit-cap", "small-unit-cap"])
def test_the_per_packet_step_in_c_leaves_the_depacketizer_as_the_python_step_does_whatever_the_packets(
    monkeypatch, cap
):
    """relay/_rtpin.c takes only what the Python step takes: 200 streams of real units (libx264, several slices a
    picture, STAP-A and FU-A) mangled at random, each read in random cuts with RTCP between, fed to one
    depacketizer taking in C and one in Python: after every read both handed on the same units and errors and
    hold the same state, byte for byte (with a small cap, units over it on the way too); and at each stream's end
    the units and counts that ``push``, one packet at a time, gives."""
    monkeypatch.setattr(rtspin, "MAX_UNIT_BYTES", cap)
    units = encode_headed_units(in_band=True)[0]
    rng = random.Random(14)
    seen = collections.Counter()
    for _ in range(200):
        packets = mangled(rng, packets_of(units * 2, first_seq=rng.randrange(65536), first_ts=rng.randrange(2**32)))
        wire = b"".join(interleaved([p]) + (rtcp_frame() if rng.random() < 0.05 else b"") for p in packets)
        readers, depacketizers = [rtspin.Reader(), rtspin.Reader()], [rtspin.H264Depacketizer(PT) for _ in "cp"]
        depacketizers[1].c_take = False
        pos, got, errors = 0, [], []
        while pos < len(wire):
            chunk = wire[pos : pos + rng.choice([1, 13, 700, 1500, 9000, 1 << 16])]
            pos += len(chunk)
            played = [r.feed_video(bytearray(chunk), 0, d) for r, d in zip(readers, depacketizers, strict=True)]
            c, python = ([(u.data, u.pts, u.keyframe, u.kinds, u.starts) for u in p.units] for p in played)
            assert c == python and played[0].errors == played[1].errors
            assert depacketizer_state(depacketizers[0]) == depacketizer_state(depacketizers[1])
            got, errors = got + c, errors + played[0].errors
        one, one_units, one_errors = rtspin.H264Depacketizer(PT), [], []
        for packet in packets:
            try:
                one_units += one.push(rtspin.parse_rtp(packet))
            except RtspError as exc:
                one_errors.append(str(exc))
        assert got == [(u.data, u.pts, u.keyframe, u.kinds, u.starts) for u in one_units] and errors == one_errors
        assert depacketizer_state(depacketizers[0])[0] == depacketizer_state(one)[0]
        seen.update(units=one.units, dropped=one.units_dropped, errors=len(one_errors), late=one.packets_dropped)
        seen.update(restarts=one.resyncs)
    assert all(seen[what] for what in ("units", "dropped", "errors", "late", "restarts")), seen  # all on the way


def test_a_camera_through_mediamtx_gives_the_same_units_read_in_c_in_python_and_packet_by_packet():
    """Real bytes: a live libx264 camera (ffmpeg's RTP packetizer) through mediamtx, read by camrelay's client; the
    reads it got, replayed as they were cut, give the same units and counts whichever way the packets are taken."""
    reads: list[bytes] = []
    with CameraServer() as server:
        camera = LiveCamera(server, "cam", 1280, 720, encoding=rtspcams.Encoding(bitrate="4M"))
        camera.start()
        source = RtspSource(camera.url, 1280, 720, 30, fallback=lambda: None)  # type: ignore[arg-type, return-value]
        receive = source._receive

        def recorded(deadline: float, silence: str) -> memoryview:
            data = receive(deadline, silence)
            reads.append(bytes(data))
            return data

        source._receive = recorded  # type: ignore[method-assign]
        try:
            source.open()
            # From PLAY's answer on: what the client read while playing. Frames that came in the read with the
            # answer (a test process held up there, on a loaded machine) were put aside by open() and are not
            # replayed: so the units read are many more than the replay needs.
            reads.clear()
            direct = [source.read_packet() for _ in range(90)]
            channel, pt = source._rtp_channel, source._depacketizer.payload_type  # type: ignore[union-attr]
        finally:
            source.close()
            camera.stop()
    assert sum(1 for u in direct if u.keyframe) >= 1

    def replayed(step: str) -> tuple[list[tuple], tuple]:
        reader, depacketizer = rtspin.Reader(), rtspin.H264Depacketizer(pt)
        depacketizer.c_take = step == "c"
        units = [u for data in reads for u in reader.feed_video(memoryview(data), channel, depacketizer).units]
        return [(u.data, u.pts, u.keyframe, u.kinds, u.starts) for u in units], depacketizer_state(depacketizer)[0]

    one = rtspin.H264Depacketizer(pt)
    one_units = []
    for item in rtspin.Reader().feed(b"".join(reads)):
        if isinstance(item, rtspin.Interleaved) and item.channel == channel:
            one_units += one.push(rtspin.parse_rtp(item.payload))
    expected = ([(u.data, u.pts, u.keyframe, u.kinds, u.starts) for u in one_units], depacketizer_state(one)[0])
    assert replayed("python") == expected
    if rtspin.C_TAKE is not None:
        assert replayed("c") == expected
    assert len(expected[0]) >= 40 and any(u[2] for u in expected[0]) and expected[1][3] == 0  # whole, none dropped
    assert all(u[3] == tuple(h264.nal_types(u[0])) and u[4] == h264.nal_starts(u[0]) for u in expected[0])


def test_the_per_packet_step_in_c_is_built_where_a_c_compiler_and_pythons_headers_are():
    """As the send path's (test_fastsend.py): a build broken on a machine that could build it shows here, and a
    module built from an older _rtpin.c is not used, and named."""
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not (shutil.which(os.environ.get("CC", "cc")) and os.path.exists(headers)):
        pytest.skip("no C compiler or no Python headers here: the Python step alone is expected")
    assert not rtspin.C_TAKE_STALE, "relay/_rtpin is older than _rtpin.c: run pip install -e . again"
    assert rtspin.C_TAKE is not None, "relay/_rtpin.c was not built: run pip install -e . and read its output"


def encode_headed_units(in_band: bool) -> tuple[list[bytes], list[bytes]]:
    """(units of libx264 in several slices a picture (asked for 4, x264 makes 2 at this size), each keyframe with
    an access unit delimiter and x264's SEI; with ``in_band``, SPS and PPS in front of each IDR, else only out of
    band (returned), as a camera's SDP has them)."""
    cc = av.CodecContext.create("libx264", "w")
    cc.width, cc.height, cc.pix_fmt = 640, 360, "yuv420p"
    cc.time_base = fractions.Fraction(1, 30)
    if not in_band:
        cc.flags |= av.codec.context.Flags.global_header
    cc.options = {"preset": "ultrafast", "x264-params": "keyint=4:bframes=0:slices=4:aud=1"}
    renderer, units = PatternRenderer(640, 360), []
    for i in range(8):
        frame = av.VideoFrame.from_ndarray(renderer.planes(i), format="yuv420p")
        frame.pts = i
        units += [bytes(p) for p in cc.encode(frame)]
    units += [bytes(p) for p in cc.encode()]
    return units, h264.extradata_parameter_sets(bytes(cc.extradata)) if not in_band else []


@pytest.mark.parametrize("in_band", [True, False], ids=["sets-in-band", "sets-out-of-band"])
def test_the_nal_units_places_the_depacketizer_gives_are_a_scans_and_survive_the_parameter_sets_put_in_front(
    in_band,
):
    """A camera's real units (a keyframe with a delimiter, SEI, SPS and PPS; several slices a picture), packetized as
    aiortc does (STAP-A, FU-A, single NAL units) and gathered again packet by packet and where they lie in the
    bytes read: each unit's ``starts`` are where a scan of its start codes finds its NAL units. Then
    ``ParameterSets.access_unit_at`` by them gives the unit ``access_unit`` gives by a scan, and its NAL units'
    places, also where the sets were put in front of an IDR that lacked them; ``h264.nals_at`` the NAL units
    ``split_annexb`` finds."""
    units, out_of_band = encode_headed_units(in_band)
    kinds = [h264.nal_types(u) for u in units]
    assert {h264.NAL_AUD, h264.NAL_SEI} <= set(kinds[0]) and (h264.NAL_SPS in kinds[0]) == in_band
    assert all(k.count(h264.NAL_IDR) + k.count(h264.NAL_SLICE) >= 2 for k in kinds), "slices: more than one a picture"
    packets = packets_of(units)
    one = rtspin.H264Depacketizer(PT)
    pushed = [u for p in packets for u in one.push(rtspin.parse_rtp(p))]
    played = rtspin.Reader().feed_video(memoryview(interleaved(packets)), 0, rtspin.H264Depacketizer(PT)).units
    assert [u.data for u in pushed] == [u.data for u in played]
    assert [nals(u.data) for u in pushed] == [nals(u) for u in units]  # x264's 3-byte start codes become 4-byte
    by_scan, by_places = ParameterSets(out_of_band), ParameterSets(out_of_band)
    for unit in pushed + played:
        assert unit.starts == h264.nal_starts(unit.data) and len(unit.starts) == len(h264.split_annexb(unit.data))
        assert [bytes(n) for n in h264.nals_at(unit.data, unit.starts)] == h264.split_annexb(unit.data)
        data, idr, starts = by_places.access_unit_at(unit.data, unit.kinds, unit.starts)
        assert (data, idr) == by_scan.access_unit(unit.data)
        assert starts == h264.nal_starts(data)
        assert [bytes(n) for n in h264.nals_at(data, starts)] == h264.split_annexb(data)
        if idr:
            assert h264.NAL_SPS in h264.nal_types(data) and (data != unit.data) == (not in_band)


def test_a_unit_whose_places_do_not_fit_it_is_packetized_by_a_scan_not_an_error_in_every_send_loop():
    """Places that do not fit their unit (the pipe refuses those it can tell; none at all once passed and ended
    every viewer's send loop): the viewers' payloads are made by a scan, the same as for a unit without places."""
    data = h264.START_CODE + b"\x09\x10" + h264.START_CODE + b"\x65" + bytes(range(1, 200)) * 20
    for places in ((), (2,), (4, len(data))):
        frame = EncodedFrame(data, 0, True, 0.0, nals=places)
        assert rtpsend.payloads_for(frame) == borrowed.packetize(data)
        with pytest.raises(h264.H264Error):
            rtsp.whole_nals(frame)  # the RTSP publisher then sends the viewers' payloads


def test_a_unit_with_its_nal_units_places_is_packetized_for_viewers_as_by_a_scan_and_whole_for_mediamtx():
    """The relay's side of the places: the viewers' RTP payloads made by them are the ones a scan makes (same
    bytes on the wire); a keyframe's SPS is found by them; and each NAL unit published whole to mediamtx (one
    packet, or FU-A past 64 KiB: a 150 kB slice here) is gathered back into the same unit by an RTSP reader's
    depacketizer."""
    units = [h264.join_annexb(nals(u)) for u in encode_headed_units(True)[0]]  # 4-byte start codes, as depacketized
    big = bytes([0x65]) + bytes(range(1, 256)) * 600  # an IDR slice of 153 kB: three FU-A fragments
    units.append(h264.START_CODE + b"\x09\x10" + h264.START_CODE + big)
    for data in units:
        frame = EncodedFrame(data, 0, h264.is_idr(data), 0.0, nals=h264.nal_starts(data))
        assert borrowed.packetize_nals(h264.nals_at(data, frame.nals)) == borrowed.packetize(data)
        assert h264.head_nals(data, frame.nals) == h264.head_nals(data)
        payloads = rtsp.whole_nals(frame)
        assert len(payloads) == (len(frame.nals) if len(data) < rtsp.WHOLE_NAL_MAX else len(frame.nals) + 2)
        assert max(map(len, payloads)) <= rtsp.WHOLE_NAL_MAX
        reader = rtspin.H264Depacketizer(PT)
        got = [
            u
            for i, p in enumerate(payloads)
            for u in reader.push(rtspin.parse_rtp(rtp(p, i, 0, i == len(payloads) - 1)))
        ]
        assert [u.data for u in got] == [data]


@pytest.mark.parametrize(
    ("packets", "error"),
    [
        ([rtp(b"\x67\x42", 1, 0, True, pt=97)], "RTP payload type 97, not the video's 96"),
        ([rtp(b"\x5c\x05" + b"\x00" * 4, 1, 0, True)], "FU-A fragment without its start (NAL type 5)"),
        ([rtp(bytes([0x7C, 0x85, 1]), 1, 0, False), rtp(bytes([0x7C, 0x85, 2]), 2, 0, False)], "FU-A start"),
        ([rtp(STAP_A_OVERRUN, 1, 0, True)], "STAP-A NAL unit of 16 bytes overruns its packet (2 left)"),
        ([rtp(b"\x78\x00", 1, 0, True)], "STAP-A size field cut off at byte 1 of 2"),
        ([rtp(b"\x7d\x00\x00", 1, 0, True)], "RTP H.264 FU-B (type 29) is interleaved mode only"),
        ([rtp(b"\x60", 1, 0, True)], "RTP H.264 NAL unit type 0 is undefined"),
        ([rtp(bytes([0x7C, 0x85, 1]), 1, 0, False), rtp(b"\x06\x05\x01\xaa", 2, 0, False)], "NAL unit (type 6) inside"),
        ([rtp(b"", 1, 0, True)], "empty RTP payload"),
    ],
)
def test_an_rtp_packet_that_cannot_be_depacketized_is_refused_exactly(packets, error):
    depacketizer = rtspin.H264Depacketizer(PT)
    depacketizer.push(rtspin.parse_rtp(rtp(b"\x41\x9a", 0, 0, True)))  # in sync with the stream
    with pytest.raises(RtspError) as caught:
        for packet in packets:
            depacketizer.push(rtspin.parse_rtp(packet))
    assert str(caught.value).startswith(error)


def test_a_nal_unit_inside_an_fu_a_breaks_the_unit_and_the_next_idr_comes_whole():
    """A camera that breaks RFC 6184 5.8 (an SEI between an IDR's fragments): that unit is dropped, not sent
    with the IDR cut in two and the SEI inside it; the next unit, an IDR, is whole. Expected units written out."""
    depacketizer = rtspin.H264Depacketizer(PT)
    depacketizer.push(rtspin.parse_rtp(rtp(b"\x41\x9a", 0, 0, True)))  # in sync with the stream
    packets = [
        rtp(bytes([0x7C, 0x85]) + b"A" * 10, 1, 3000, False),  # IDR's FU-A start
        rtp(b"\x06\x05\x01\xaa", 2, 3000, False),  # an SEI inside it
        rtp(bytes([0x7C, 0x45]) + b"B" * 10, 3, 3000, True),  # the FU-A's end, the marker
        rtp(bytes([0x7C, 0x85]) + b"C" * 10, 4, 6000, False),
        rtp(bytes([0x7C, 0x45]) + b"D" * 10, 5, 6000, True),
    ]
    units, errors = [], []
    for packet in packets:
        try:
            units += depacketizer.push(rtspin.parse_rtp(packet))
        except RtspError as exc:
            errors.append(str(exc))
    assert [(u.pts, u.keyframe, u.data) for u in units] == [
        (6000, True, b"\x00\x00\x00\x01\x65" + b"C" * 10 + b"D" * 10)
    ]
    assert errors == [
        "NAL unit (type 6) inside an FU-A, before its last fragment",
        "FU-A fragment without its start (NAL type 5)",
    ]
    assert depacketizer.units_dropped == 1


def test_the_unit_a_bad_packet_was_part_of_is_dropped():
    depacketizer = rtspin.H264Depacketizer(PT)
    depacketizer.push(rtspin.parse_rtp(rtp(b"\x41\x9a", 0, 0, True)))
    depacketizer.push(rtspin.parse_rtp(rtp(b"\x41\x9b", 1, 3000, False)))
    with pytest.raises(RtspError):
        depacketizer.push(rtspin.parse_rtp(rtp(STAP_A_OVERRUN, 2, 3000, True)))
    assert depacketizer.units_dropped == 1
    assert depacketizer.push(rtspin.parse_rtp(rtp(b"\x41\x9c", 3, 6000, True))) == []  # a P-frame: waits
    (unit,) = depacketizer.push(rtspin.parse_rtp(rtp(b"\x65\x88", 4, 9000, True)))
    assert unit.keyframe


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\x40" + b"\x00" * 11, "RTP version 1, not 2"),
        (b"\x80\x60\x00", "RTP packet of 3 bytes is shorter than its header"),
        (b"\x8f\x60" + b"\x00" * 10 + b"\x00" * 8, "RTP header of 72 bytes overruns its packet of 20"),
        (b"\x90\x60" + b"\x00" * 10 + b"\x00\x00", "RTP header extension overruns its packet"),
    ],
)
def test_an_rtp_header_that_cannot_be_read_is_refused_exactly(data, error):
    with pytest.raises(RtspError, match="^" + error):
        rtspin.parse_rtp(data)


def test_responses_and_interleaved_frames_come_out_however_the_bytes_are_cut():
    sdp = b"v=0\r\nm=video 0 RTP/AVP 96\r\n"
    stream = (
        b'RTSP/1.0 200 OK\r\nCSeq: 2\r\nContent-Length: %d\r\nWWW-Authenticate: Basic realm="a"\r\n'
        b" folded\r\n\r\n%s$\x00\x00\x03abc$\x01\x00\x00RTSP/1.0 401 Unauthorized\r\nCSeq: 3\r\n\r\n"
    ) % (len(sdp), sdp)
    whole = rtspin.Reader().feed(stream)
    reader, cut = rtspin.Reader(), []
    for i in range(len(stream)):
        cut += reader.feed(stream[i : i + 1])
    reader.eof()
    assert cut == whole
    assert [type(x).__name__ for x in whole] == ["Response", "Interleaved", "Interleaved", "Response"]
    assert (whole[0].status, whole[0].cseq, whole[0].body) == (200, 2, sdp)
    assert whole[0].header("www-authenticate") == 'Basic realm="a" folded'
    assert whole[1] == rtspin.Interleaved(0, b"abc") and whole[2] == rtspin.Interleaved(1, b"")
    assert (whole[3].status, whole[3].reason) == (401, "Unauthorized")


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"RTSP/1.0 OK\r\n\r\n", "bad status line 'RTSP/1.0 OK'"),
        (b"HTTP/1.1 200 OK\r\n\r\n", "expected a response or an interleaved frame, got b'HTTP/1.1 200 OK\\r'"),
        (b"RTSP/1.0 200 OK\r\nno colon\r\n\r\n", "bad header line 'no colon'"),
        (b"RTSP/1.0 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length '-1'"),
        ("RTSP/1.0 200 OK\r\nContent-Length: \u00b2\r\n\r\n".encode(), "bad Content-Length '\u00b2'"),
        (b"RTSP/1.0 200 OK\r\nContent-Length: 99999999\r\n\r\n", "response body of 99999999 bytes is over"),
        (b"RTSP/1.0 200 OK\r\n" + b"X: y\r\n" * 20000, "response head over 65536 bytes"),
        (b"RTSP/1.0 200 OK\r\n" + b"X: y\r\n" * 20000 + b"\r\n", "response head over 65536 bytes"),  # whole at once
        (b"RTSP/1.0 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", "bad Content-Length '99999"),
        (b"RTSP/1.0 200 OK\r\nContent-Length: 00000000001\r\n\r\n", "bad Content-Length '00000000001'"),
    ],
)
def test_what_is_not_an_rtsp_answer_is_refused_exactly(data, error):
    with pytest.raises(RtspError) as caught:
        rtspin.Reader().feed(data)
    assert str(caught.value).startswith(error)


def test_a_response_whose_body_comes_in_many_reads_has_its_head_parsed_once(monkeypatch):
    parsed = []

    def counted(head: bytes):
        parsed.append(head)
        return parse_response_head(head)

    parse_response_head = rtspin.parse_response_head
    monkeypatch.setattr(rtspin, "parse_response_head", counted)
    body = bytes(range(256)) * 40
    data = b"RTSP/1.0 200 OK\r\nCSeq: 2\r\nContent-Length: %d\r\n\r\n%s$\x00\x00\x01x" % (len(body), body)
    reader, out = rtspin.Reader(), []
    for i in range(0, len(data), 7):
        out += reader.feed(data[i : i + 7])
    assert [type(x).__name__ for x in out] == ["Response", "Interleaved"] and out[0].body == body
    assert len(parsed) == 1  # not once per read of its body


@pytest.mark.parametrize("value", ["\u00b2", "-1", "1.0", ""])
def test_a_cseq_that_is_not_ascii_digits_is_no_cseq(value):
    (response,) = rtspin.Reader().feed(f"RTSP/1.0 200 OK\r\nCSeq: {value}\r\n\r\n".encode())
    assert response.cseq is None


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"$\x00\x00\x10abc", "connection closed inside an interleaved frame (7 bytes of it)"),
        (b"RTSP/1.0 200 OK\r\nCSeq: 1\r\n", "connection closed inside a response (26 bytes of it)"),
        (b"RTSP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nab", "connection closed inside a response"),
    ],
)
def test_a_connection_that_ends_inside_a_message_is_an_error(data, error):
    reader = rtspin.Reader()
    assert reader.feed(data) == []
    with pytest.raises(RtspError, match="^" + error.replace("(", r"\(").replace(")", r"\)")):
        reader.eof()


# -- authentication


def test_digest_with_qop_auth_answers_as_rfc_2617_says():
    challenge = rtspin.parse_challenges(
        [
            'Digest realm="testrealm@host.com", qop="auth,auth-int", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", '
            'opaque="5ccc069c403ebaf9f0171e9517f40e41"'
        ]
    )
    value = rtspin.authorization(challenge, "GET", "/dir/index.html", "Mufasa", "Circle Of Life", "0a4f113b", 1)
    assert 'response="6629fae49393a05397450978507c4ef1"' in value  # RFC 2617 3.5's example
    assert 'qop=auth, nc=00000001, cnonce="0a4f113b"' in value and 'opaque="5ccc069c403ebaf9f0171e9517f40e41"' in value


def test_a_connections_requests_are_numbered_and_carry_its_session_and_credentials_once_challenged():
    requests = rtspin.Requests("camrelay", "admin", "pw")
    first = requests.make("DESCRIBE", "rtsp://cam/s", {"Accept": "application/sdp"}).decode()
    assert first.startswith("DESCRIBE rtsp://cam/s RTSP/1.0\r\nCSeq: 1\r\nUser-Agent: camrelay\r\n")
    assert "Authorization" not in first and "Session" not in first
    challenge = rtspin.Response(401, "Unauthorized", (("www-authenticate", 'Digest realm="r", nonce="n", qop="auth"'),))
    requests.challenged(challenge)
    requests.session = "8a7b"
    second, third = (requests.make("SETUP", "rtsp://cam/s/track1").decode() for _ in range(2))
    assert "CSeq: 2\r\n" in second and "CSeq: 3\r\n" in third and requests.cseq == 3
    assert "Session: 8a7b\r\n" in second
    assert 'username="admin"' in second and "nc=00000001" in second and "nc=00000002" in third
    assert "pw" not in second  # a digest, never the password
    body = requests.make("ANNOUNCE", "rtsp://cam/s", body=b"v=0\r\n")
    assert body.endswith(b"Content-Length: 5\r\n\r\nv=0\r\n")


@pytest.mark.parametrize(
    ("url", "wire"),
    [
        ("rtsp://admin:pw@cam:8554/s?x=1", "rtsp://cam:8554/s?x=1"),
        ("rtsp://admin@[fe80::1]/s", "rtsp://[fe80::1]/s"),
        ("rtsp://cam", "rtsp://cam/"),
    ],
)
def test_a_url_goes_on_the_wire_without_its_user_information(url, wire):
    assert rtspin.without_userinfo(url) == wire


def test_digest_without_qop_and_basic_answer_as_cameras_expect():
    digest = rtspin.parse_challenges(['Basic realm="cam"', 'Digest realm="cam", nonce="abc"'])
    value = rtspin.authorization(digest, "DESCRIBE", "rtsp://cam/x", "admin", "pw")
    ha1, ha2 = (hashlib.md5(s.encode()).hexdigest() for s in ("admin:cam:pw", "DESCRIBE:rtsp://cam/x"))
    assert f'response="{hashlib.md5(f"{ha1}:abc:{ha2}".encode()).hexdigest()}"' in value and "qop" not in value
    basic = rtspin.parse_challenges(['Basic realm="cam"'])
    assert (
        rtspin.authorization(basic, "DESCRIBE", "rtsp://cam/x", "admin", "pw")
        == "Basic " + base64.b64encode(b"admin:pw").decode()
    )


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ([], "401 without a WWW-Authenticate header: no way to authenticate"),
        (['Digest realm="a", nonce="n", algorithm=SHA-256'], "camera asks for authentication this client cannot"),
        (['Digest realm="a", nonce="n", qop="auth-int"'], "camera asks for authentication this client cannot"),
        (['Digest realm="a"'], "camera asks for authentication this client cannot answer: Digest without a nonce"),
        (["Bearer"], "camera asks for authentication this client cannot answer: 'bearer'"),
        (['Digest realm="a", nonce="n", qop'], "bad authentication parameters 'qop'"),
    ],
)
def test_a_challenge_that_cannot_be_answered_is_refused_exactly(values, error):
    with pytest.raises(RtspError) as caught:
        rtspin.parse_challenges(values)
    assert str(caught.value).startswith(error)


def test_digest_with_md5_is_chosen_over_sha256_and_basic():
    challenge = rtspin.parse_challenges(
        ['Digest realm="a", nonce="n", algorithm="SHA-256"', 'Digest realm="a", nonce="m", algorithm="MD5"', "Basic"]
    )
    assert (challenge.scheme, challenge.nonce) == ("digest", "m")


# -- the SDP


def sdp(*media: str, session: str = "") -> str:
    return "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=cam\r\nt=0 0\r\n" + session + "".join(media)


H264_MEDIA = (
    "m=video 0 RTP/AVP 96\r\na=control:trackID=0\r\na=rtpmap:96 H264/90000\r\n"
    "a=fmtp:96 packetization-mode=1; sprop-parameter-sets=Z0LAHtkDxWhAAAADAEAAAAwDxYuS,aMuMsg==\r\n"
)


def test_the_sdp_gives_codec_parameter_sets_and_control_url():
    video = rtspin.parse_sdp(sdp("m=audio 0 RTP/AVP 0\r\na=control:trackID=1\r\n", H264_MEDIA), "rtsp://cam/live")
    assert (video.codec, video.payload_type, video.clock_rate) == ("h264", 96, 90_000)
    assert video.control == "rtsp://cam/live/trackID=0"
    assert [h264.nal_type(n) for n in video.parameter_sets] == [7, 8]
    assert video.extradata.startswith(b"\x00\x00\x00\x01\x67")
    absolute = H264_MEDIA.replace("trackID=0", "rtsp://other/x/track1")
    assert rtspin.parse_sdp(sdp(absolute), "rtsp://cam/live/").control == "rtsp://other/x/track1"
    star = H264_MEDIA.replace("trackID=0", "*")
    assert rtspin.parse_sdp(sdp(star), "rtsp://cam/live/").control == "rtsp://cam/live/"


@pytest.mark.parametrize(
    ("media", "codec"),
    [
        ("m=video 0 RTP/AVP 96\r\na=rtpmap:96 H265/90000\r\n", "hevc"),
        ("m=video 0 RTP/AVP 26\r\n", "mjpeg"),
        ("m=video 0 RTP/AVP 97\r\na=rtpmap:97 MP4V-ES/90000\r\n", "mpeg4"),
    ],
)
def test_the_sdp_names_what_else_a_camera_sends(media, codec):
    assert rtspin.parse_sdp(sdp(media), "rtsp://cam/").codec == codec


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (sdp("m=audio 0 RTP/AVP 0\r\n"), "SDP has no video media"),
        (sdp("m=video 0 RTP/AVP 96\r\n"), "video payload type 96 has no rtpmap"),
        (sdp("m=video 0 RTP/AVP\r\n"), "bad SDP media line 'm=video 0 RTP/AVP'"),
        (sdp("m=video 0 RTP/AVP 96\r\na=rtpmap:96 H264/0\r\n"), "bad rtpmap clock rate 'H264/0'"),
        (sdp("m=video 0 RTP/AVP 96\r\na=rtpmap:96 H264/\u00b2\r\n"), "bad rtpmap clock rate 'H264/\u00b2'"),
        (sdp("m=video 0 RTP/AVP \u00b2\r\n"), "bad SDP media line 'm=video 0 RTP/AVP \u00b2'"),
        (sdp(H264_MEDIA.replace("packetization-mode=1", "packetization-mode=2")), "H.264 packetization-mode 2"),
        (sdp(H264_MEDIA.replace("aMuMsg==", "aMu*")), "sprop-parameter-sets value 1 is not base64"),
        ("v=0\r\ngarbage\r\n", "bad SDP line 'garbage'"),
    ],
)
def test_an_sdp_that_cannot_be_read_is_refused_exactly(text, error):
    with pytest.raises(RtspError) as caught:
        rtspin.parse_sdp(text, "rtsp://cam/")
    assert str(caught.value).startswith(error)


def test_control_characters_in_an_answers_head_are_shown_as_question_marks():
    """A bare LF (which splitting on CRLF leaves in a value), an escape or a NUL in a header value or the reason
    phrase: each a "?", so what a camera says cannot forge a log line or a status."""
    (answer,) = rtspin.Reader().feed(
        b"RTSP/1.0 302 Moved\x1b[2J\r\nLocation: rtsp://x/\nWARNING relay: FORGED\x00\r\nCSeq: 2\r\n\r\n"
    )
    assert answer.reason == "Moved?[2J" and answer.header("location") == "rtsp://x/?WARNING relay: FORGED?"
    assert rtspin.parse_response_head(b"RTSP/1.0 200 OK\r\nX: a\tb")[2] == (("x", "a\tb"),)  # a tab is no control


def test_a_control_url_that_cannot_be_joined_is_refused_exactly():
    with pytest.raises(RtspError, match="control URL 'trackID=1' against 'rtsp://\\[::1/' cannot be read"):
        rtspin.control_url("trackID=1", "rtsp://[::1/")


@pytest.mark.parametrize(
    ("value", "parsed"), [("12345678;timeout=60", ("12345678", 60)), ("abc", ("abc", 60)), ("x; timeout=5", ("x", 5))]
)
def test_the_session_header_gives_id_and_timeout(value, parsed):
    assert rtspin.parse_session(value) == parsed


@pytest.mark.parametrize(
    ("call", "value", "error"),
    [
        (rtspin.parse_session, "", "bad Session header ''"),
        (rtspin.parse_session, "x;timeout=soon", "bad Session timeout 'soon'"),
        (rtspin.parse_session, "x;timeout=\u00b2", "bad Session timeout '\u00b2'"),
        (rtspin.parse_session, "x;timeout=0", "bad Session timeout '0'"),
        (rtspin.parse_interleaved, "RTP/AVP;unicast;client_port=5000-5001", "camera did not agree to RTP over"),
        (rtspin.parse_interleaved, "RTP/AVP/TCP;interleaved=\u00b2", "camera did not agree to RTP over"),
        (rtspin.parse_interleaved, "RTP/AVP/TCP;interleaved=256-257", "interleaved channel 257 is over 255"),
        (rtspin.parse_interleaved, "RTP/AVP/TCP;interleaved=255", "interleaved channel 256 is over 255"),
        (rtspin.parse_interleaved, "RTP/AVP/TCP;interleaved=" + "9" * 5000, "camera did not agree to RTP over"),
        (rtspin.parse_session, "x;timeout=" + "9" * 400, "bad Session timeout '99999"),
    ],
)
def test_a_setup_answer_that_cannot_be_read_is_refused_exactly(call, value, error):
    with pytest.raises(RtspError) as caught:
        call(value)
    assert str(caught.value).startswith(error)


# -- a camera of this test's: it sends the units it is given, when it is given them


class TinyCamera:
    """An RTSP server on loopback for one H.264 track over TCP: answers OPTIONS, DESCRIBE (its ``sdp``),
    SETUP, PLAY, GET_PARAMETER and TEARDOWN; ``send(unit)`` sends one access unit as RTP (aiortc's
    packetizer), marker on its last packet. It counts connections and DESCRIBEs. ``before_answer[method]``
    runs before that method's answer goes out (one that never returns: a camera that never answers)."""

    def __init__(
        self, sets: list[bytes] = SETS, sdp_text: str | None = None, redirect: str = "", basic: bool = False
    ) -> None:
        sprop = ",".join(base64.b64encode(n).decode() for n in sets)
        self.sdp = sdp_text or sdp(H264_MEDIA.replace(H264_MEDIA.split("sprop-parameter-sets=")[1], sprop + "\r\n"))
        self.redirect = redirect
        self.basic = basic  # a DESCRIBE without Basic credentials gets 401
        self.refusal = b""  # a status line's code and reason to answer DESCRIBE with instead of 200 OK
        self.credentials: list[str] = []  # user:password of every Basic Authorization header it was sent
        self.connections = 0
        self.describes = 0
        self.methods: list[str] = []
        self.playing = asyncio.Event()
        self.closed = asyncio.Event()  # for a before_answer that waits until then: a camera that never answers
        self._writers: list[asyncio.StreamWriter] = []
        self.before_answer: dict[str, Callable[[], Awaitable[None]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._seq = 0
        self._ts = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> TinyCamera:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"rtsp://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/cam"

    async def close(self) -> None:
        self.closed.set()
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()

    async def send(self, unit: bytes, lose: bool = False) -> None:
        """``lose``: its first packet is "lost on the way" (its sequence number is used, nothing is sent)."""
        assert self._writer is not None
        payloads = borrowed.packetize(unit)
        for i, payload in enumerate(payloads):
            packet = rtp(payload, self._seq, self._ts, i == len(payloads) - 1)
            if not (lose and i == 0):
                self._writer.write(b"$\x00" + len(packet).to_bytes(2, "big") + packet)
            self._seq += 1
        self._ts += CLOCK // 30
        await self._writer.drain()

    async def send_audio(self, packet: bytes, channel: int = 2) -> None:
        """One RTP packet (or anything) on the sound's interleaved channel."""
        assert self._writer is not None
        self._writer.write(b"$" + bytes([channel]) + len(packet).to_bytes(2, "big") + packet)
        await self._writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.playing.clear()
        self._writer = writer
        self._writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, url, _ = head.split(b" ", 2)
                cseq = next(line.split(b":")[1].strip() for line in head.split(b"\r\n") if line.startswith(b"CSeq"))
                self.methods.append(method.decode())
                headers, body = b"", b""
                auth = [
                    line.split(b" ")[-1] for line in head.split(b"\r\n") if line.startswith(b"Authorization: Basic")
                ]
                self.credentials += [base64.b64decode(a).decode() for a in auth]
                if self.redirect and method == b"DESCRIBE":
                    status, headers = b"302 Found", b"Location: " + self.redirect.encode() + b"\r\n"
                    self.redirect = ""
                elif self.basic and method == b"DESCRIBE" and not auth:
                    status, headers = b"401 Unauthorized", b'WWW-Authenticate: Basic realm="cam"\r\n'
                elif self.refusal and method == b"DESCRIBE":
                    status = self.refusal
                else:
                    status = b"200 OK"
                if method == b"OPTIONS":
                    headers += b"Public: OPTIONS, DESCRIBE, SETUP, PLAY, GET_PARAMETER, TEARDOWN\r\n"
                elif method == b"DESCRIBE" and status == b"200 OK":
                    self.describes += 1
                    body = self.sdp.encode()
                    headers += b"Content-Type: application/sdp\r\nContent-Base: " + url + b"/\r\n"
                elif method == b"SETUP":  # the channels the client asked for, as cameras answer
                    asked = re.search(rb"interleaved=([0-9]+-[0-9]+)", head)
                    channels = asked.group(1) if asked else b"0-1"
                    headers += b"Session: 8a7b;timeout=60\r\nTransport: RTP/AVP/TCP;unicast;interleaved=" + channels
                    headers += b"\r\n"
                headers += b"Content-Length: %d\r\n" % len(body)
                if method.decode() in self.before_answer:
                    await self.before_answer[method.decode()]()
                writer.write(b"RTSP/1.0 " + status + b"\r\nCSeq: " + cseq + b"\r\n" + headers + b"\r\n" + body)
                await writer.drain()
                if method == b"PLAY":
                    self.playing.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def relay_config(url: str):
    return make_config((StreamConfig("cam0", parse_source_spec(url + "#mode=passthrough")),), fps=30)


async def until(predicate, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"{what} within {DEADLINE:g} s"
        await asyncio.sleep(0.01)


async def test_each_unit_reaches_the_relay_before_the_camera_sends_the_next():
    """In lockstep: the camera sends unit i only once the relay's hub has unit i - 1. FFmpeg's demuxer holds
    each unit until the next one starts, so this never got past the first."""
    camera = await TinyCamera().start()
    runner, running = await start_relay(relay_config(camera.url), wait=False)
    try:
        await until(camera.playing.is_set, "the relay plays the camera")
        with EncodedFrames(running.relay.streams["cam0"]) as frames:
            for i, unit in enumerate(UNITS):
                await camera.send(unit)
                await until(lambda i=i: len(frames.clocks) > i, f"unit {i} in the hub before unit {i + 1} is sent")
        st = running.relay.streams["cam0"].status().api()
        assert (st["mode"], st["source_reader"], st["encoders_running"]) == ("passthrough", "rtspin", 0)
    finally:
        await runner.cleanup()
        await camera.close()


async def test_frames_a_camera_lost_on_the_network_are_counted_in_the_api_and_metrics(http):
    """A packet of the third unit lost: it and the rest of its GOP cannot be decoded and are dropped, up to the
    next IDR; the API and /metrics say how many, as frames dropped for source_loss."""
    camera = await TinyCamera().start()
    runner, running = await start_relay(relay_config(camera.url), wait=False)
    try:
        await until(camera.playing.is_set, "the relay plays the camera")
        stream = running.relay.streams["cam0"]
        for i, unit in enumerate(UNITS):  # a GOP of 6: IDRs at 0 and 6
            await camera.send(unit, lose=i == 2)
        await until(lambda: stream.stats.frames_passed_through >= len(UNITS) - 4, "the units after the loss's GOP")
        await until(lambda: stream.status().api()["frames_dropped"]["source_loss"] > 0, "the loss in the status")
        api = stream.status().api()
        async with http.get(f"{running.base}/metrics") as r:
            metrics = await r.text()
    finally:
        await runner.cleanup()
        await camera.close()
    lost = api["frames_dropped"]["source_loss"]
    assert api["frames_passed_through"] == len(UNITS) - 4  # units 2 to 5 never reached a viewer
    assert lost in (3, 4)  # 3 to 5 dropped; 2 itself, lost, never came (what it was cannot be told)
    line = next(
        m for m in metrics.splitlines() if m.startswith("camrelay_stream_frames_dropped_total{") and "source_loss" in m
    )
    assert 'stream="cam0"' in line and line.endswith(f" {lost}"), line


async def test_a_camera_that_stops_sending_mid_stream_is_a_source_error_and_is_opened_again():
    camera = await TinyCamera().start()
    runner, running = await start_relay(relay_config(camera.url), wait=False)
    try:
        await until(camera.playing.is_set, "the relay plays the camera")
        for unit in UNITS[:3]:
            await camera.send(unit)
        stream = running.relay.streams["cam0"]
        await until(lambda: stream.stats.frames_passed_through >= 3, "three units passed through")
        # The camera now sends nothing and keeps its connection open.
        await until(lambda: stream.status().api()["source_errors"] >= 1, "a source error")
        await until(lambda: camera.describes >= 2, "the camera described again (a retry)")
    finally:
        await runner.cleanup()
        await camera.close()


async def test_close_from_another_thread_ends_a_blocked_read_and_a_silent_camera_times_out():
    camera = await TinyCamera().start()
    results: list[BaseException | None] = []

    def read(source: RtspSource) -> None:
        try:
            source.open()
            source.read_packet()
            results.append(None)
        except SourceError as exc:
            results.append(exc)
        finally:
            source.close()

    source = open_source(parse_source_spec(camera.url), 640, 360, 30, "cam0")
    assert isinstance(source, RtspSource)
    thread = threading.Thread(target=read, args=(source,))
    thread.start()
    await until(camera.playing.is_set, "the client plays the camera")
    source.close()  # as the worker's stall watch does, from its main thread
    await asyncio.to_thread(thread.join, DEADLINE)
    assert not thread.is_alive() and "closed" in str(results[0])
    await until(lambda: camera.methods[-1] == "TEARDOWN", "its own thread tore the session down")

    silent = open_source(parse_source_spec(camera.url), 640, 360, 30, "cam0")
    thread = threading.Thread(target=read, args=(silent,))
    thread.start()
    await asyncio.to_thread(thread.join, DEADLINE)
    assert "sent no video for 5 s" in str(results[1])
    await camera.close()


def rtcp_frame() -> bytes:
    """An RTCP sender report on the interleaved channel after the video's, as a camera sends every second."""
    report = bytes([0x80, 200, 0, 6]) + bytes(24)
    return b"$\x01" + len(report).to_bytes(2, "big") + report


class CaptureThread:
    """Calls made on one thread of its own, as the worker's capture thread makes them (a source is closed by
    the thread that opened it). A daemon: the client before these fixes could block in open() for ever."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, future = call
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the awaiting test, whatever it is
                    future.set_exception(exc)

    async def run(self, fn: Callable[[], object]) -> object:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, future))
        return await asyncio.wait_for(asyncio.wrap_future(future), DEADLINE)

    async def opened(self, source: RtspSource) -> BaseException | None:
        """The error ``source.open()`` raised (the source then closed), or None."""
        try:
            await self.run(source.open)
        except SourceError as exc:
            await self.run(source.close)
            return exc
        return None

    async def close(self, source: RtspSource) -> None:
        await self.run(source.close)
        self._calls.put(None)


@contextlib.asynccontextmanager
async def reading(
    camera: TinyCamera, url: str = "", *others: TinyCamera
) -> AsyncIterator[tuple[RtspSource, CaptureThread]]:
    """A client of ``camera`` (at ``url``: its own by default) and the thread it runs on; both, the camera and
    ``others``, closed after."""
    source, capture = open_source(parse_source_spec(url or camera.url), 640, 360, 30, "cam0"), CaptureThread()
    try:
        yield source, capture
    finally:
        await capture.close(source)
        for each in (camera, *others):
            await each.close()


async def open_error(camera: TinyCamera, url: str = "", *others: TinyCamera) -> str | None:
    """What the client's ``open()`` of ``camera`` (``url``, ``others``: as ``reading``) raised, if anything."""
    async with reading(camera, url, *others) as (source, capture):
        error = await capture.opened(source)
        return None if error is None else str(error)


async def test_frames_a_camera_sends_before_an_answer_are_held_aside_and_read_after_it_in_order():
    """The camera starts its stream before its PLAY answer leaves: the client took the first frame for the
    answer's, put it back, and took it again for ever (a core at 100 %, and close() could not stop it)."""
    camera = await TinyCamera().start()

    async def early_units() -> None:
        await camera.send(UNITS[0])
        await camera.send(UNITS[1])
        camera._writer.write(rtcp_frame())

    camera.before_answer["PLAY"] = early_units
    async with reading(camera) as (source, capture):
        assert await capture.opened(source) is None
        first = await capture.run(source.read_packet)
        second = await capture.run(source.read_packet)
        await camera.send(UNITS[2])
        third = await capture.run(source.read_packet)
        assert [nals(u.data) for u in (first, second, third)] == [nals(u) for u in UNITS[:3]]


async def test_a_camera_that_sends_rtp_instead_of_an_answer_is_refused_past_a_cap(monkeypatch):
    monkeypatch.setattr(rtspsource, "MAX_HELD_BYTES", 256 * 1024)
    camera = await TinyCamera().start()

    async def flood() -> None:  # interleaved frames, and never DESCRIBE's answer
        while True:
            camera._writer.write(b"$\x00\xfd\xe8" + bytes(65000))
            await camera._writer.drain()

    camera.before_answer["DESCRIBE"] = flood
    assert str(await open_error(camera)).endswith("sent over 262144 bytes of RTP and no answer to DESCRIBE")


async def test_an_answer_that_trickles_in_is_given_up_at_the_requests_deadline(monkeypatch):
    """A byte every so often, never a whole answer: each read's timeout started again at each byte."""
    monkeypatch.setattr(rtspsource, "CONNECT_TIMEOUT", 0.5)
    camera = await TinyCamera().start()

    async def trickle() -> None:
        camera._writer.write(b"RTSP/1.0 200 OK\r\nCSeq: 2\r\nX-Slow: ")
        while True:
            camera._writer.write(b"y")
            await camera._writer.drain()
            await asyncio.sleep(0.05)  # well inside the shortened timeout: only a total deadline ends it

    camera.before_answer["DESCRIBE"] = trickle
    assert str(await open_error(camera)).endswith("did not answer DESCRIBE within 0.5 s")


@pytest.mark.parametrize("kernel_timeouts", [True, False], ids=["SO_RCVTIMEO", "python-timeout"])
async def test_a_camera_that_sends_only_rtcp_is_a_source_error_after_the_io_timeout(monkeypatch, kernel_timeouts):
    """Its encoder hung, its RTSP server still sends a sender report every so often: no video is no camera
    (each report started the read's timeout again, and read_packet() waited for ever). The same with Python's
    own socket timeout, as a 32-bit build reads (``KERNEL_TIMEOUTS`` off)."""
    monkeypatch.setattr(rtspsource, "IO_TIMEOUT", 0.5)
    monkeypatch.setattr(rtspsource, "KERNEL_TIMEOUTS", kernel_timeouts)
    camera = await TinyCamera().start()

    async def reports() -> None:
        while True:
            camera._writer.write(rtcp_frame())
            await asyncio.sleep(0.05)  # well inside the shortened timeout: only video may extend it

    async with reading(camera) as (source, capture):
        assert await capture.opened(source) is None
        await camera.send(UNITS[0])
        assert h264.is_idr((await capture.run(source.read_packet)).data)
        sending = asyncio.create_task(reports())
        with pytest.raises(SourceError, match="sent no video for 0.5 s$"):
            await capture.run(source.read_packet)
        sending.cancel()


async def test_a_playing_cameras_reads_set_no_timeout_each(monkeypatch):
    """The socket's receive timeout was set before every read (a poll and an ioctl beside each recv): it is
    set for the connection and changed only near a deadline, which a read here never comes near. Counted on
    the socket itself, whichever way a timeout would be set."""
    monkeypatch.setattr(rtspsource, "IO_TIMEOUT", 1000.0)
    calls: list[str] = []

    class CountingSocket(socket.socket):
        def settimeout(self, value):
            calls.append("settimeout")
            super().settimeout(value)

        def setsockopt(self, *args):
            calls.append("setsockopt")
            super().setsockopt(*args)

    def create_connection(address, timeout):
        sock = CountingSocket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address)
        return sock

    monkeypatch.setattr(rtspsource.socket, "create_connection", create_connection)
    camera = await TinyCamera().start()
    async with reading(camera) as (source, capture):
        assert await capture.opened(source) is None
        opening = len(calls)
        assert opening > 0  # the counting socket is the one read
        for unit in UNITS:
            reading_one = asyncio.ensure_future(capture.run(source.read_packet))
            await camera.send(unit)
            assert nals((await reading_one).data) == nals(unit)
        assert len(calls) == opening  # none for the units' reads


async def test_open_gives_up_at_its_total_deadline_whatever_each_request_has(monkeypatch):
    monkeypatch.setattr(rtspsource, "CONNECT_TIMEOUT", 1000.0)  # each request would wait longer than the test
    monkeypatch.setattr(rtspsource, "OPEN_TIMEOUT", 0.5)
    camera = await TinyCamera().start()
    camera.before_answer["DESCRIBE"] = camera.closed.wait  # never answered
    assert str(await open_error(camera)).endswith("did not finish opening within 0.5 s (DESCRIBE)")


async def test_a_redirect_is_followed_once():
    camera = await TinyCamera().start()
    first = await TinyCamera(redirect=camera.url).start()
    source = open_source(parse_source_spec(first.url), 640, 360, 30, "cam0")

    def open_and_close() -> None:  # on one thread, as the capture thread does
        try:
            source.open()
        finally:
            source.close()

    try:
        await asyncio.to_thread(open_and_close)
        assert (first.describes, camera.describes, source.codec) == (0, 1, "h264")
        assert (source.width, source.height) == (320, 180)  # from the SDP's SPS
    finally:
        await camera.close()
        await first.close()


async def test_a_redirect_to_another_host_carries_the_cameras_password_only_if_its_url_has_its_own():
    for own in ("", "other:pw2@"):
        camera = await TinyCamera(basic=True).start()
        first = await TinyCamera(redirect=camera.url.replace("rtsp://", "rtsp://" + own)).start()
        error = await open_error(camera, first.url.replace("rtsp://", "rtsp://admin:s3cret@"), first)
        if own:
            assert error is None and set(camera.credentials) == {"other:pw2"}
        else:
            assert "wants credentials (401 to DESCRIBE) and the URL has none" in str(error)
            assert camera.credentials == []  # the password for the first camera never went to this one


async def test_a_redirect_to_a_url_that_cannot_be_read_is_a_source_error_with_the_url():
    camera = await TinyCamera().start()
    camera.redirect = "rtsp://127.0.0.1:99999/x"
    assert str(await open_error(camera)).endswith("redirects to a URL that cannot be read: 'rtsp://127.0.0.1:99999/x'")


async def test_a_cameras_refusal_is_quoted_printable_and_cut_to_its_limit():
    """The reason phrase becomes the stream's last_error, which viewers see: an escape sequence in it is not
    passed on, and a camera's 2 KiB of reason is quoted as 100 characters."""
    camera = await TinyCamera().start()
    camera.refusal = b"404 Not \x1b[2JFound " + b"x" * 2000
    error = await open_error(camera)
    assert error is not None and error.endswith("answered DESCRIBE with 404 Not ?[2JFound " + "x" * 86)


async def test_a_redirect_on_the_same_host_keeps_the_cameras_credentials():
    camera = await TinyCamera(basic=True).start()
    camera.redirect = camera.url + "/elsewhere"
    assert await open_error(camera, camera.url.replace("rtsp://", "rtsp://admin:s3cret@")) is None
    assert set(camera.credentials) == {"admin:s3cret"}


async def test_a_camera_that_sends_h265_or_an_unreadable_sdp_goes_to_ffmpegs_demuxer():
    for text, reason in [
        (sdp("m=video 0 RTP/AVP 96\r\na=rtpmap:96 H265/90000\r\n"), "it sends hevc"),
        (sdp("m=video 0 RTP/AVP 96\r\n"), "its DESCRIBE answer cannot be read here: video payload type 96"),
    ]:
        camera = await TinyCamera(sdp_text=text).start()
        source = open_source(parse_source_spec(camera.url), 640, 360, 30, "cam0")
        try:
            with pytest.raises(UseDemuxer) as caught:
                await asyncio.to_thread(source.open)
            assert caught.value.reason.startswith(reason)
            assert caught.value.fallback().reader == "ffmpeg"
        finally:
            source.close()
            await camera.close()


# -- the worker's pipeline in this process, reading a camera of this test's (its constants can be shortened)


@contextlib.asynccontextmanager
async def pipeline_of(camera: TinyCamera, emit: Callable[[bytes], None] = lambda _: None):
    """The worker's ``Pipeline`` passing ``camera`` through, started; stopped (and the camera closed) after."""
    spec = parse_source_spec(camera.url)
    pipeline = worker.Pipeline(
        "cam0",
        camera.url,
        lambda: open_source(spec, 640, 360, 30, "cam0"),
        EncoderSettings(1_000_000, 30, 2),
        emit,
        mode="passthrough",
    )
    pipeline.start()
    try:
        yield pipeline
    finally:
        await asyncio.to_thread(pipeline.stop)
        await camera.close()


async def run_until(pipeline: worker.Pipeline, predicate, what: str, camera: TinyCamera | None = None, units=()):
    """The worker's main thread's watch (``tick``), and ``camera`` sending ``units`` over and over while it
    plays, until ``predicate()``."""
    deadline = asyncio.get_running_loop().time() + DEADLINE
    cycle = itertools.cycle(units)
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"{what} within {DEADLINE:g} s"
        pipeline.tick()
        if camera is not None and units and camera.playing.is_set():
            for _ in range(6):
                with contextlib.suppress(ConnectionError):
                    await camera.send(next(cycle))
        await asyncio.sleep(worker.WATCH_INTERVAL)


@pytest.fixture
def no_slate(monkeypatch):
    """The worker's slate stays away (no encoder in this process), and it never exits for a stuck thread."""
    monkeypatch.setattr(worker, "SLATE_AFTER", 1000.0)
    monkeypatch.setattr(worker, "STUCK_EXIT", 1000.0)


async def test_a_source_stuck_opening_is_closed_by_the_workers_watch_and_opened_again(monkeypatch, no_slate, caplog):
    """The stall watch looked at live sources only: one stuck in open() or in the probe (a reader with no
    deadline of its own, as FFmpeg's demuxer is on a read) held the stream "starting" for ever."""
    monkeypatch.setattr(rtspsource, "OPEN_TIMEOUT", 1000.0)  # the client's own deadlines out of the way
    monkeypatch.setattr(rtspsource, "CONNECT_TIMEOUT", 1000.0)
    monkeypatch.setattr(worker, "OPEN_STALL", 0.5)
    camera = await TinyCamera().start()
    camera.before_answer["DESCRIBE"] = camera.closed.wait  # never answered
    async with pipeline_of(camera) as pipeline:
        await run_until(pipeline, lambda: camera.connections >= 2, "the source closed and opened again")
        st = pipeline.status()
        assert st.source_opens == 0 and st.source_errors >= 2  # the watch's, then the source's own "closed"
        assert "stream=cam0 source error: not open, or no packet while probing it, for" in caplog.text


async def test_a_probe_that_finds_no_sps_gives_up_past_its_byte_cap(monkeypatch, no_slate):
    """Up to 600 units of up to 16 MiB each were held while looking for an SPS."""
    monkeypatch.setattr(worker, "PROBE_MAX_BYTES", 20_000)
    camera = await TinyCamera(sets=[]).start()  # no SPS in the SDP, and none in band
    async with pipeline_of(camera) as pipeline:
        error = "sent over 20000 bytes before its SPS: it cannot be passed through"
        await run_until(pipeline, lambda: error in pipeline.status().last_error, "the probe's error", camera, UNITS)
        assert pipeline.status().source_opens >= 1


async def test_jpegs_of_keyframes_keep_their_interval_when_the_wall_clock_steps_back(monkeypatch, no_slate):
    """A recorder's snapshots (a JPEG of a keyframe at most every so often) were timed on the wall clock: one
    stepped back an hour (NTP) stopped them for an hour. The worker's wall clock is injected here."""
    jpegs: list[bytes] = []
    wall = types.SimpleNamespace(
        monotonic=time.monotonic, perf_counter=time.perf_counter, time=lambda: time.time() - 3600 * bool(jpegs)
    )
    monkeypatch.setattr(worker, "time", wall)

    def emit(data: bytes) -> None:
        if ipc.parse_header(data[: ipc.HEADER.size])[0] == ipc.JPEG:
            jpegs.append(data)

    camera = await TinyCamera().start()
    async with pipeline_of(camera, emit) as pipeline:
        pipeline.set_jpeg(True, every=0.05)
        await run_until(pipeline, lambda: len(jpegs) >= 3, "two JPEGs after the wall clock stepped back", camera, UNITS)


async def test_a_camera_that_never_sends_an_idr_gets_the_slate_and_says_why_until_it_does(monkeypatch):
    """Its units kept the slate away while no viewer could decode one: "live", no picture, no error."""
    monkeypatch.setattr(worker, "FIRST_IDR_WAIT", 0.5)
    monkeypatch.setattr(worker, "STUCK_EXIT", 1000.0)
    passed: list[bytes] = []  # the camera's own units, to the relay

    def emit(data: bytes) -> None:
        kind, flags, *_ = ipc.parse_header(data[: ipc.HEADER.size])
        if kind == ipc.UNIT and flags & ipc.FLAG_PASSTHROUGH:
            passed.append(data)

    camera = await TinyCamera().start()
    p_frames = [u for u in UNITS if not h264.is_idr(u)]
    async with pipeline_of(camera, emit) as pipeline:
        await run_until(pipeline, lambda: pipeline.status().state == "no_signal", "the slate", camera, p_frames)
        st = pipeline.status()
        assert st.last_error.endswith("sent no IDR for 0.5 s; the slate shows until one")
        assert (len(passed), st.source_errors) == (0, 1)
        await run_until(pipeline, lambda: pipeline.status().state == "live", "the camera's picture", camera, UNITS)
        assert passed


# -- a real camera server: mediamtx with a read user and Digest


@pytest.fixture
def digest_server(tmp_path, monkeypatch):
    """A ``CameraServer`` whose readers must give viewer / s3cr$t, by Digest only."""

    def config(rtsp_port: int, api_port: int, credentials: tuple[str, str] | None = None) -> str:
        c = json.loads(server_config(rtsp_port, api_port, credentials))
        c["rtspAuthMethods"] = ["digest"]
        c["authInternalUsers"][0]["permissions"] = [{"action": "publish"}, {"action": "api"}]
        c["authInternalUsers"].append({"user": "viewer", "pass": "s3cr$t", "permissions": [{"action": "read"}]})
        return json.dumps(c)

    monkeypatch.setattr(rtspcams, "server_config", config)
    with CameraServer(tmp_path) as server:
        yield server


def test_a_camera_behind_digest_is_read_and_a_wrong_password_is_refused_without_showing_it(digest_server):
    camera = LiveCamera(digest_server, "cam")
    camera.start()
    try:
        host = digest_server.url("cam").removeprefix("rtsp://")
        good = open_source(parse_source_spec(f"rtsp://viewer:s3cr%24t@{host}"), 640, 360, 30, "cam0")
        try:
            good.open()
            units = [good.read_packet() for _ in range(3)]
            assert good.codec == "h264" and all(u.data.startswith(b"\x00\x00\x00\x01") for u in units)
        finally:
            good.close()
        bad = open_source(parse_source_spec(f"rtsp://viewer:wr0ng-pw@{host}"), 640, 360, 30, "cam0")
        with pytest.raises(SourceError, match="refused the credentials") as caught:
            bad.open()
        bad.close()
        assert "wr0ng-pw" not in str(caught.value) and "viewer:***@" in str(caught.value)
    finally:
        camera.stop()


# -- a real camera through the relay: read by this client, and no codec library in the worker


def codec_libraries(pid: int) -> set[str]:
    """The FFmpeg libraries mapped into process ``pid`` (what ``import av`` loads)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {lib for lib in ("libavcodec", "libavformat", "libswscale") if lib in maps}


async def test_a_passed_through_camera_is_read_by_camrelays_client_and_its_worker_loads_no_codec(start_camera, http):
    camera = start_camera("cam0")
    runner, running = await start_relay(relay_config(camera.url))
    try:
        stream = running.relay.streams["cam0"]
        await until(lambda: stream.stats.frames_passed_through >= 30, "a second of the camera passed through")
        st = stream.status().api()
        assert (st["mode"], st["source_reader"], st["encoders_running"], st["frames_decoded"]) == (
            "passthrough",
            "rtspin",
            0,
            0,
        )
        assert stream.pid is not None and codec_libraries(stream.pid) == set()  # no PyAV: no slate, no JPEG
        async with http.get(running.base + "/snapshot/cam0.jpg") as resp:  # JPEGs on demand: decoding starts
            assert resp.status == 200 and (await resp.read()).startswith(b"\xff\xd8")
        assert "libavcodec" in codec_libraries(stream.pid)
    finally:
        await runner.cleanup()
