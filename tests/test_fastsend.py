"""The C send path (relay/webrtc/_fastsend.c, ``borrowed.SrtpFrameWriter.send_frame``) against the Python path
it stands in for (``protect_frame`` and the batcher's writes): the same SRTP datagrams byte for byte, in the same
runs, on a real socket; the same counts, backlog and order when the socket's buffer fills (a real one: a network
namespace whose loopback is shaped with ``tc``, so the kernel holds what it cannot send yet); and a real viewer
decoding frames sent through it. Without the extension built, the C-specific tests are skipped (the Python path's
are in test_aiortc_hooks.py and test_udpbatch.py), and the viewer's test runs on the Python path alone."""

from __future__ import annotations

import array
import asyncio
import dataclasses
import os
import pathlib
import random
import shutil
import socket
import subprocess
import sys
import sysconfig
import textwrap

import pytest
from aiortc.rtp import RtpPacket

from relay.webrtc import borrowed, rtpsend, udpbatch
from relay.webrtc.rtpsend import send_frame
from relay.webrtc.udpbatch import MAX_GSO_BYTES, MAX_SEGMENTS, batcher_of, send_run_at_once
from relay.webrtc.whepclient import WhepViewer

from .conftest import make_config, session_of, start_relay
from .netns import loopback_namespace
from .test_aiortc_hooks import _srtp_pair
from .test_udpbatch import _Sending, _Sink

needs_c = pytest.mark.skipif(not borrowed.C_SEND_BUILT, reason="relay.webrtc._fastsend is not built here")
TAG = 10  # bytes: AES128_CM_SHA1_80's authentication tag, after each protected packet
HEADER = RtpPacket(payload_type=96, sequence_number=0, timestamp=1234).serialize()  # 12 bytes, no extensions
ROOM = borrowed.FRAME_BUFFER_BYTES - borrowed.SRTP_TRAILER_ROOM - len(HEADER)  # the largest payload that fits
RCVBUF = 8 << 20  # a receiving socket's buffer: every datagram of a test's frame held until it is read
SO_RCVBUFFORCE = 33  # root may size a socket's buffer past net.core.rmem_max


def _python_path(tx, payloads, sequence):
    """The Python path's datagrams and runs (``protect_frame``) for one frame."""
    runs = []
    sent = borrowed.SrtpFrameWriter().protect_frame(
        tx, HEADER, payloads, sequence, lambda data, segment: runs.append((bytes(data), segment)),
        MAX_SEGMENTS, MAX_GSO_BYTES,
    )  # fmt: skip
    datagrams = [d[i : i + s] for d, s in runs for i in range(0, len(d), s)]
    assert sent == sum(map(len, datagrams))
    return datagrams, runs


def received_on(rx: socket.socket) -> list[bytes]:
    """Every datagram waiting on the non-blocking socket ``rx``, in order."""
    got = []
    while True:
        try:
            got.append(rx.recv(1 << 16))
        except BlockingIOError:
            return got


class _Wire:
    """A sending socket and a receiving one on loopback, as the relay's and a viewer's."""

    def __init__(self) -> None:
        self.rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        self.rx.bind(("127.0.0.1", 0))
        self.rx.setblocking(False)
        self.tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tx.bind(("127.0.0.1", 0))
        self.tx.setblocking(False)
        self.addr = self.rx.getsockname()

    def received(self) -> list[bytes]:
        return received_on(self.rx)

    def close(self) -> None:
        self.rx.close()
        self.tx.close()


@pytest.fixture
def wire():
    w = _Wire()
    yield w
    w.close()


def _c_path(wire, tx, payloads, sequence, gso=True, emit=None):
    fell = []
    done = borrowed.SrtpFrameWriter().send_frame(
        tx, HEADER, payloads, sequence, wire.tx.fileno(), socket.AF_INET, wire.addr, gso,
        emit or (lambda data, segment, *_: fell.append((bytes(data), segment))), MAX_SEGMENTS, MAX_GSO_BYTES,
    )  # fmt: skip
    return done, fell


SIZES = {
    "STAP-A, then full-size FU-As and a short last": [30, 1200, 1200, 1200, 500],
    "the kernel's 64 segments a write, exactly": [100] * MAX_SEGMENTS,
    "one over 64 segments": [100] * (MAX_SEGMENTS + 1),
    # 12 + 1178 + 10 = 1200 bytes protected: 50 of them are MAX_GSO_BYTES exactly
    "60,000 bytes a write, exactly": [1178] * 50,
    "60,000 bytes and one more datagram": [1178] * 51,
    "a byte over 60,000": [1179] * 50,
    "a longer datagram ends a run, a shorter one ends it after it": [1300, 1200, 1200, 1300, 1300, 40],
    "more than the writer's buffer: it empties it and goes on": [1200] * 60 + [700] + [1200] * 60,
    "one datagram": [900],
}


@needs_c
@pytest.mark.parametrize("gso", [True, False], ids=["segmented", "a write a datagram"])
@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
def test_the_c_path_sends_the_datagrams_the_python_path_makes_in_its_runs(wire, sizes, gso):
    """Byte for byte what the Python path protects (two sessions with the same key), numbered across the
    sequence wrap, the marker on the last packet alone; one write a run (``gso_runs``' rule, as the Python path's
    runs), or one a datagram with segmentation off; every run written by C, none handed back."""
    payloads = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    sequence = 65536 - len(payloads) // 2 - 1  # wraps in the middle of the frame
    python_tx, _ = _srtp_pair()
    expected, runs = _python_path(python_tx, payloads, sequence)

    c_tx, rx = _srtp_pair()
    done, fell = _c_path(wire, c_tx, payloads, sequence, gso)
    got = wire.received()
    assert got == expected and fell == []
    assert done == (sum(map(len, expected)), len(payloads), len(runs) if gso else len(payloads))
    packets = [RtpPacket.parse(rx.unprotect(d)) for d in got]
    assert [p.sequence_number for p in packets] == [(sequence + i) & 0xFFFF for i in range(len(payloads))]
    assert [p.marker for p in packets] == [0] * (len(payloads) - 1) + [1]
    assert [p.payload for p in packets] == payloads


@needs_c
def test_random_frames_are_the_same_datagrams_on_both_paths(wire):
    """Frames of random packet counts and sizes (a fixed seed): byte for byte the Python path's, frame after
    frame on one pair of sessions."""
    rng = random.Random(17)
    python_tx, _ = _srtp_pair()
    c_tx, _ = _srtp_pair()
    sequence = rng.randrange(65536)
    for _ in range(40):
        payloads = [rng.randbytes(rng.choice((rng.randint(1, 1400), 1188))) for _ in range(rng.randint(1, 130))]
        expected, runs = _python_path(python_tx, payloads, sequence)
        done, fell = _c_path(wire, c_tx, payloads, sequence)
        assert wire.received() == expected and fell == [] and done[1:] == (len(payloads), len(runs))
        sequence = (sequence + len(payloads)) & 0xFFFF


@needs_c
def test_frames_sent_by_c_and_by_python_share_one_sessions_state(wire):
    """C protects with pylibsrtp's own session (its srtp_t), as aiortc's RTCP and retransmissions do: frames sent
    by either path, one after the other, across the sequence wrap and its rollover counter, all decrypt in turn
    with the receiving session."""
    tx, rx = _srtp_pair()
    sequence, expected = 65530, []
    for frame in range(6):
        payloads = [bytes([frame]) * 1100] * 4
        if frame % 2:
            borrowed.SrtpFrameWriter().protect_frame(
                tx, HEADER, payloads, sequence, lambda data, segment: wire.tx.sendto(bytes(data), wire.addr), 1, 1
            )  # one datagram a run
        else:
            _c_path(wire, tx, payloads, sequence)
        expected += payloads
        sequence = (sequence + len(payloads)) & 0xFFFF
    packets = [RtpPacket.parse(rx.unprotect(d)) for d in wire.received()]
    assert [p.payload for p in packets] == expected
    assert [p.sequence_number for p in packets] == [(65530 + i) & 0xFFFF for i in range(24)]


@needs_c
def test_a_payload_too_large_for_the_buffer_is_refused_before_anything_is_sent(wire):
    """The largest payload the writer's buffer takes (with libsrtp's trailer room after it) is sent as the Python
    path sends it; one byte more fails the frame with a ValueError before anything is written or protected."""
    tx, _ = _srtp_pair()
    expected, _ = _python_path(_srtp_pair()[0], [b"w" * ROOM], 0)
    done, _ = _c_path(wire, tx, [b"w" * ROOM], 0)
    assert wire.received() == expected and done == (len(expected[0]), 1, 1)
    tx, _ = _srtp_pair()
    with pytest.raises(ValueError, match="does not fit"):
        _c_path(wire, tx, [b"x" * 1200, b"y" * (ROOM + 1)], 0)
    assert wire.received() == []
    # nothing was protected either: the session goes on as a fresh one with the same key
    expected, _ = _python_path(_srtp_pair()[0], [b"z" * 1200], 0)
    _c_path(wire, tx, [b"z" * 1200], 0)
    assert wire.received() == expected


def test_the_python_path_refuses_a_payload_too_large_for_its_buffer_as_c_does():
    """A payload that alone does not fit the Python path's buffer with its SRTP tag (libsrtp would write the tag
    past its end) fails the frame with a ValueError, first in a frame or after a full buffer has left, before it
    is protected; the largest that fits is sent whole."""
    tx, rx = _srtp_pair()
    sent = []

    def emit(data, segment):
        sent.append(bytes(data))

    writer = borrowed.SrtpFrameWriter()
    for payloads in ([b"y" * (ROOM + 1)], [b"x" * 1200, b"y" * (ROOM + 1)]):
        with pytest.raises(ValueError, match="does not fit"):
            writer.protect_frame(tx, HEADER, payloads, 0, emit, 1, 1 << 16)
    assert [len(RtpPacket.parse(rx.unprotect(d)).payload) for d in sent] == [1200]  # the first frame's first alone
    sent.clear()
    writer.protect_frame(tx, HEADER, [b"w" * ROOM], 1, emit, 1, 1 << 16)
    assert len(sent) == 1 and len(sent[0]) > len(HEADER) + ROOM  # with its tag (past pylibsrtp's unprotect)


@needs_c
def test_what_c_does_not_take_it_leaves_to_the_python_path_untouched(wire):
    """An address given by name, a payload that is not bytes: None, and nothing protected or sent."""
    tx, _ = _srtp_pair()
    done = borrowed.SrtpFrameWriter().send_frame(
        tx, HEADER, [b"a" * 100], 0, wire.tx.fileno(), socket.AF_INET, ("localhost", wire.addr[1]), True,
        lambda data, segment, *_: None, MAX_SEGMENTS, MAX_GSO_BYTES,
    )  # fmt: skip
    assert done is None
    done, _ = _c_path(wire, tx, [b"a" * 100, bytearray(b"b" * 100)], 0)
    assert done is None and wire.received() == []
    expected, _ = _python_path(_srtp_pair()[0], [b"c" * 100], 0)
    _c_path(wire, tx, [b"c" * 100], 0)
    assert wire.received() == expected


@needs_c
def test_a_send_c_cannot_make_goes_to_the_fallback_from_that_datagram_on(wire):
    """A write that fails (here: a descriptor that is not a socket, ENOTSOCK): its run and every one after go to the
    fallback, in order, whole; C counts none of them."""
    tx, _ = _srtp_pair()
    payloads = [b"p" * 1200] * 3 + [b"q" * 100] * 2
    expected, runs = _python_path(_srtp_pair()[0], payloads, 0)
    read_end, write_end = os.pipe()
    fell = []
    try:
        done = borrowed.SrtpFrameWriter().send_frame(
            tx, HEADER, payloads, 0, write_end, socket.AF_INET, wire.addr, True,
            lambda data, segment, *_: fell.append((bytes(data), segment)), MAX_SEGMENTS, MAX_GSO_BYTES,
        )  # fmt: skip
    finally:
        os.close(read_end)
        os.close(write_end)
    assert fell == runs and done == (sum(map(len, expected)), 0, 0)


@needs_c
@pytest.mark.parametrize("error", [KeyError, KeyboardInterrupt], ids=["an Exception", "a BaseException"])
def test_what_the_fallback_raises_comes_out_of_the_c_call_as_it_was_raised(wire, error):
    """The fallback's own exception, not a SystemError with it lost (C released its view of the buffer while the
    exception was pending: CPython then raised SystemError, and the clean-up wiped both), so Ctrl-C is Ctrl-C."""
    tx, _ = _srtp_pair()
    read_end, write_end = os.pipe()  # not a socket: the first write fails and the fallback is called

    def fallback(data, segment, blocked):
        raise error("the fallback's own")

    try:
        with pytest.raises(error, match="the fallback's own"):
            borrowed.SrtpFrameWriter().send_frame(
                tx, HEADER, [b"p" * 1200] * 3, 0, write_end, socket.AF_INET, wire.addr, True, fallback,
                MAX_SEGMENTS, MAX_GSO_BYTES,
            )  # fmt: skip
    finally:
        os.close(read_end)
        os.close(write_end)


def test_the_c_send_path_is_built_where_a_c_compiler_and_pythons_headers_are():
    """scripts/setup's pip install builds it quietly and goes on without it where the build fails (optional): so a
    build broken on a machine that could build it shows here, not as every C test skipped. A module built from an
    older _fastsend.c (the source changed since the last pip install -e .) is not used, and is named here too."""
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not (shutil.which(os.environ.get("CC", "cc")) and os.path.exists(headers)):
        pytest.skip("no C compiler or no Python headers here: the Python path alone is expected")
    assert not borrowed.C_SEND_STALE, "relay/webrtc/_fastsend is older than _fastsend.c: run pip install -e . again"
    assert borrowed.C_SEND_BUILT, "relay/webrtc/_fastsend.c was not built: run pip install -e . and read its output"


# -- a socket whose buffer fills: the kernel holds what a shaped loopback cannot send yet

SHAPED_RATE = "4mbit"  # what the namespace's loopback sends a second: far less than a frame's burst
SNDBUF = 4096  # the sending socket's buffer (the kernel doubles it): full after a datagram run or two
FRAMES, PACKETS = 4, 100  # frames of 100 packets: three runs each (MAX_GSO_BYTES), so a frame backs up mid-way
DRAIN = 30.0  # seconds for everything queued to arrive: a guard, not a measurement


@pytest.fixture
def shaped_loopback():
    """A network namespace whose loopback sends at ``SHAPED_RATE``, this thread inside it."""
    with loopback_namespace("cr-csend", "tbf", "rate", SHAPED_RATE, "burst", "16kb", "limit", "8mb"):
        yield


async def _send_until_backed_up(c_send: bool, monkeypatch) -> tuple:
    """FRAMES frames through ``rtpsend.send_frame`` and the batcher, as a viewer's sender sends them, to a
    receiver behind the shaped loopback; what the batcher counted and whether the socket was backed up after
    them, and every datagram received once it drained."""
    monkeypatch.setattr(rtpsend, "C_SEND", c_send)
    loop = asyncio.get_running_loop()
    rx_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx_sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    rx_sock.bind(("127.0.0.1", 0))
    tx_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
    tx_sock.bind(("127.0.0.1", 0))
    rx, sink = await loop.create_datagram_endpoint(_Sink, sock=rx_sock)
    tx, protocol = await loop.create_datagram_endpoint(_Sending, sock=tx_sock)
    try:
        session, receiver = _srtp_pair()
        writer, addr = borrowed.SrtpFrameWriter(), rx_sock.getsockname()
        sequence = 65400  # wraps within the frames
        for frame in range(FRAMES):
            payloads = [bytes([frame, i]) * 600 for i in range(PACKETS)]
            send_frame(writer, session, HEADER, payloads, sequence, send_run_at_once, protocol, addr)
            sequence = (sequence + PACKETS) & 0xFFFF
        batcher = batcher_of(protocol)
        backed_up = bool(rtpsend._backlog(protocol))
        counts = (batcher.datagrams, batcher.dropped, batcher.c_frames)
        for _ in range(int(DRAIN / 0.05)):
            if len(sink.got) >= FRAMES * PACKETS and not tx.get_write_buffer_size():
                break
            await asyncio.sleep(0.05)
        packets = [RtpPacket.parse(receiver.unprotect(d)) for d in sink.got]
        return backed_up, counts, [(p.sequence_number, p.marker, p.payload) for p in packets]
    finally:
        tx.close()
        rx.close()


@needs_c
@pytest.mark.parametrize("gso", [True, False], ids=["segmented", "a write a datagram"])
async def test_a_socket_that_backs_up_under_the_c_path_behaves_as_under_the_python_path(
    shaped_loopback, monkeypatch, gso
):
    """The socket's buffer fills mid-frame: what C could not write goes to the batcher's writer, which queues it
    in asyncio's transport, and the frames after it go through the Python path while it holds any (never
    reordered); the socket is backed up for the sender (``FrameSender.backed_up``) as under the Python path, the
    batcher counts the same datagrams and drops none, and once the link drains the receiver has every packet, in
    order, across the sequence wrap, the marker on each frame's last."""
    if not gso:
        monkeypatch.setitem(udpbatch._state, "gso", False)
    python = await _send_until_backed_up(False, monkeypatch)
    c = await _send_until_backed_up(True, monkeypatch)
    assert python[0] is True and c[0] is True
    assert python[1] == (FRAMES * PACKETS, 0, 0)
    assert c[1][:2] == (FRAMES * PACKETS, 0) and 1 <= c[1][2] < FRAMES  # C until the socket backed up, then Python
    expected = [
        ((65400 + f * PACKETS + i) & 0xFFFF, int(i == PACKETS - 1), bytes([f, i]) * 600)
        for f in range(FRAMES)
        for i in range(PACKETS)
    ]
    assert python[2] == expected and c[2] == expected


@needs_c
async def test_a_write_that_meets_a_full_socket_buffer_is_queued_without_being_tried_again(
    shaped_loopback, monkeypatch
):
    """C's segmented write meets a full socket buffer (EAGAIN): its run goes to asyncio's queue through the batcher's
    writer with no second segmented try on the socket (it failed alike: two or three system calls wasted a run),
    and every packet still arrives, in order."""
    tried = []
    raw_send = udpbatch.Batcher._raw_send

    def counted(self, raw, data, segment, addr):
        tried.append(segment)
        return raw_send(self, raw, data, segment, addr)

    monkeypatch.setattr(udpbatch.Batcher, "_raw_send", counted)
    backed_up, counts, packets = await _send_until_backed_up(True, monkeypatch)
    assert backed_up and counts[:2] == (FRAMES * PACKETS, 0) and counts[2] >= 1
    assert tried == [] and len(packets) == FRAMES * PACKETS


@pytest.mark.parametrize(
    "c_send,c_batch", [(True, True), (True, False), (False, False)], ids=["C batch", "C per viewer", "Python path"]
)
async def test_a_viewer_decodes_the_frames_the_relay_sends(http, c_send, c_batch):
    """A real aiortc viewer of a real relay decodes every frame it reads, its pixel clock valid, through each path
    (``[webrtc] c_send``, ``c_batch``): with the batch on, live frames went out in the stream's one C call a frame
    (its lane's, counted in the batcher's ``c_written``); with the C path on alone, one C call a viewer-frame; with
    it off, none did; in runs (fewer writes than datagrams) every way."""
    if c_send and not borrowed.C_SEND_BUILT:
        pytest.skip("relay.webrtc._fastsend is not built here")
    config = make_config()
    config = dataclasses.replace(config, webrtc=dataclasses.replace(config.webrtc, c_send=c_send, c_batch=c_batch))
    runner, relay = await start_relay(config)
    try:
        assert rtpsend.C_SEND is c_send and rtpsend.C_BATCH is c_batch
        viewer = WhepViewer(relay.whep(), http)
        await viewer.connect()
        try:
            frames = await viewer.read_frames(30)
            assert len(frames) == 30 and all(s.latency_ms is not None for s in frames)
            sender = session_of(relay, viewer).pc.getTransceivers()[0].sender
            batcher = batcher_of(borrowed.nominated_pair(sender.transport).protocol)
            lane = rtpsend.lane_of(sender)
        finally:
            await viewer.close()
    finally:
        await runner.cleanup()
    assert rtpsend.C_SEND is borrowed.C_SEND_BUILT and rtpsend.C_BATCH is borrowed.C_SEND_BUILT  # the relay's gone
    assert batcher is not None and batcher.syscalls < batcher.datagrams
    assert (batcher.c_written[2] > 0) is c_batch and (lane is not None and lane.frames > 0) is c_batch
    alone = batcher.c_frames - batcher.c_written[2]  # one C call a viewer-frame (the batch's: its first frames)
    assert (alone > 0) is c_send and (not c_batch or batcher.c_written[2] > alone)


# -- a lane's memory safety: what Python code run during a call may do, and indices from its caller

_LANE_SETUP = """
import array, socket, sys
from relay.webrtc import borrowed
from tests.test_aiortc_hooks import _srtp_pair

session, _ = _srtp_pair()
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.bind(("127.0.0.1", 0))
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
tx.bind(("127.0.0.1", 0))
HEADER = bytes([0x80, 96]) + bytes(18)  # 20 bytes: room for an extension's 3 after the fixed 12

class Open:
    def is_closing(self):
        return False

    def get_write_buffer_size(self):
        return 0

def bound(transport, guards=(), at=None):
    lane = borrowed.new_lane(0, 0, 90000, 0)
    lane.set_header(HEADER, at)
    assert borrowed.route_lane(
        lane, session, tx.fileno(), socket.AF_INET, rx.getsockname(), False, transport, lambda *a: None, guards,
        array.array("q", [0, 0, 0]),
    )
    return lane

def batch(lanes):
    return borrowed.send_batch(borrowed.SrtpFrameWriter(), lanes, [b"x" * 100], 3000, 0.0, 64, 60000)
"""


def _survives(code: str) -> str:
    """``code`` run after ``_LANE_SETUP`` in a Python of its own (a crash fails the test, not pytest): its output."""
    done = subprocess.run(
        [sys.executable, "-c", _LANE_SETUP + textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
        cwd=pathlib.Path(__file__).parent.parent,
    )  # fmt: skip
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    return done.stdout


@needs_c
def test_an_abs_send_time_index_outside_the_header_is_refused_whatever_its_size():
    """``set_header``'s abs-send-time index: the last 3 bytes of the header at most, and an index near
    ``sys.maxsize`` refused too (``at + 3`` overflowed and passed, and send_batch wrote far outside its stack
    buffer). Whatever the lane was given, send_batch writes within the header."""
    out = _survives("""
        for at in (sys.maxsize - 1, sys.maxsize, len(HEADER) - 2, 11, -5):
            lane = borrowed.new_lane(0, 0, 90000, 0)
            try:
                lane.set_header(HEADER, at)
            except ValueError:
                continue
            lane = bound(Open(), at=None)
            lane.set_header(HEADER, at)
            batch([lane])
            print("accepted", at)
        declined, failed, delays = batch([bound(Open(), at=len(HEADER) - 3)])  # the last 3 bytes: taken
        print("sent", declined, failed, len(delays))
    """)
    assert out.split("\n")[:-1] == ["sent [] [] 1"]


@needs_c
def test_a_guard_is_read_again_whenever_its_dict_changed_and_one_held_by_equality_every_time():
    """A guard that held by identity is not looked up again while its dict is unchanged (its version tag, Python
    3.11), but any change to the dict, a key set back to the same value included, has it read again; one that holds
    through ``__eq__`` is asked every time (its answer may change while the dict does not)."""
    out = _survives("""
        marker, other = object(), object()

        class Flips:
            equal = True

            def __eq__(self, value):
                return Flips.equal

        same, by_eq = {"state": marker, "n": 0}, {"state": Flips()}
        lane = bound(Open(), ((same, "state", marker), (by_eq, "state", object())))
        seen = [lane.ready(), lane.ready()]  # held, then held unread
        same["state"] = other
        seen.append(lane.ready())
        same["state"] = marker
        seen.append(lane.ready())
        same["n"] = 1  # another key: read again, still held
        seen.append(lane.ready())
        Flips.equal = False  # the dict unchanged, its value's answer not
        seen.append(lane.ready())
        Flips.equal = True
        seen.append(lane.ready())
        print(seen, batch([lane])[:2])
    """)
    assert out.split("\n")[:-1] == ["[True, True, False, True, True, False, True] ([], [])"]


@needs_c
def test_a_guard_whose_equality_rebinds_the_lane_leaves_no_version_for_the_new_guards():
    """A guard's ``__eq__`` is Python and may rebind the lane mid-check: the versions the rest of that check noted
    were of the old guards' dicts and, kept, made the new guards hold unread (a lane sent to whose new guard never
    held)."""
    out = _survives("""
        marker, other = object(), object()
        d = {"state": marker}
        rebind = []

        class Rebinds:
            def __eq__(self, value):
                if rebind:
                    assert borrowed.route_lane(
                        lane, session, tx.fileno(), socket.AF_INET, rx.getsockname(), False, Open(),
                        lambda *a: None, rebind.pop(), array.array("q", [0, 0, 0]),
                    )
                return True

        e = {"k": Rebinds()}
        lane = bound(Open(), ((e, "k", object()), (d, "state", marker)))
        rebind.append(((e, "k", e["k"]), (d, "state", other)))  # the new guards want `other`: never there
        first = lane.ready()
        fresh = bound(Open(), ((e, "k", e["k"]), (d, "state", other)))
        print(lane.ready(), lane.ready(), fresh.ready(), batch([lane])[0], batch([fresh])[0])
    """)
    assert out.split("\n")[:-1] == ["False False False [0] [0]"]


@needs_c
def test_a_fallback_that_unbinds_its_lane_mid_frame_leaves_the_session_alive_until_the_frame_is_done():
    """send_batch holds a lane's session and fallback only from the fallback's first call on (not per viewer-packet):
    a fallback that unbinds the lane, letting go of the last other reference to the session, mid-frame (three runs
    of growing sizes, each written as the next packet is protected: the third protected after the fallback's first
    call), does not free the srtp_t in use; the frame is the lane's, every run fell back in order."""
    out = _survives("""
        import gc, os

        r, w = os.pipe()  # not a socket: every write fails, and goes to the fallback
        own, _ = _srtp_pair()
        lane = borrowed.new_lane(0, 0, 90000, 0)
        lane.set_header(HEADER, None)
        fell = []

        def fallback(data, segment, blocked):
            fell.append(len(data))
            lane.unbind()

        assert borrowed.route_lane(
            lane, own, w, socket.AF_INET, rx.getsockname(), False, Open(), fallback, (), array.array("q", [0, 0, 0])
        )
        del own
        gc.collect()
        declined, failed, delays = borrowed.send_batch(
            borrowed.SrtpFrameWriter(), [lane], [b"a" * 100, b"b" * 200, b"c" * 300], 3000, 0.0, 64, 60000
        )
        gc.collect()
        print(fell, declined, failed, len(delays), lane.bound, lane.frames, lane.sequence)
    """)
    tag = 10  # HMAC-SHA1-80's, the test sessions' profile
    sizes = [20 + n + tag for n in (100, 200, 300)]  # the 20-byte header, each payload, the tag
    assert out.split("\n")[:-1] == [f"{sizes} [] [] 1 False 1 3"]


@needs_c
def test_a_lane_made_without_its_init_is_declined_not_a_crash():
    """``Lane.__new__`` alone leaves a lane with no RTP clock: bound and given a header, send_batch declines it (it
    divided by its clock rate and the process died of SIGFPE)."""
    out = _survives("""
        lane = type(borrowed.new_lane(0, 0, 90000, 0)).__new__(type(borrowed.new_lane(0, 0, 90000, 0)))
        lane.set_header(HEADER, None)
        assert borrowed.route_lane(
            lane, session, tx.fileno(), socket.AF_INET, rx.getsockname(), False, Open(), lambda *a: None, (),
            array.array("q", [0, 0, 0]),
        )
        declined, failed, delays = batch([lane])
        print(lane.ready(), declined, failed, list(delays))
    """)
    assert out.split("\n")[:-1] == ["False [0] [] []"]


@needs_c
@pytest.mark.parametrize("where", ["is_closing", "get_write_buffer_size", "guard"])
def test_a_lane_unbound_by_the_python_it_runs_to_check_itself_is_declined_not_a_crash(where):
    """A lane's readiness runs Python (a guard's comparison, the transport's ``is_closing`` and
    ``get_write_buffer_size``) that may unbind the lane, letting go of its guards and transport while they are in
    use: the lane is then not ready, and send_batch declines it."""
    out = _survives(f"""
        where = {where!r}

        class Unbinding(Open):
            lane = None

            def is_closing(self):
                if where == "is_closing":
                    self.lane.unbind()
                return False

            def get_write_buffer_size(self):
                if where == "get_write_buffer_size":
                    self.lane.unbind()
                return 0

        class Value:
            def __init__(self, fields, holder):
                self.fields, self.holder = fields, holder

            def __eq__(self, other):
                self.fields.clear()  # the value compared goes too
                self.holder.lane.unbind()
                return True

        def attempt(check):
            holder, fields = Unbinding(), {{}}
            fields["state"] = Value(fields, holder)
            guards = ((fields, "state", object()),) if where == "guard" else ()
            lane = holder.lane = bound(holder, guards)
            del holder, fields  # the lane's references are the only ones left
            return check(lane)

        print(attempt(lambda lane: (lane.ready(), lane.bound)))
        print(attempt(lambda lane: batch([lane])[:2]))
    """)
    assert out.split("\n")[:-1] == ["(False, False)", "([0], [])"]


@needs_c
def test_an_interrupt_raised_by_a_guard_is_raised_from_the_batch_and_an_error_declines_the_lane():
    """A guard whose comparison raises: an error (a value that cannot be compared) declines the lane, and the
    per-viewer path finds out why; KeyboardInterrupt is not swallowed."""

    class Raising:
        def __init__(self, exc):
            self.exc = exc

        def __eq__(self, other):
            raise self.exc

    wire, (tx, _) = _Wire(), _srtp_pair()
    try:

        def lane_with(value):
            lane = borrowed.new_lane(0, 0, 90000, 0)
            lane.set_header(HEADER, None)
            guards = (({"state": value}, "state", object()),)
            assert borrowed.route_lane(
                lane, tx, wire.tx.fileno(), socket.AF_INET, wire.addr, False, _Open(), lambda *a: None, guards,
                array.array("q", [0, 0, 0]),
            )  # fmt: skip
            return lane

        def batch(lanes):
            return borrowed.send_batch(borrowed.SrtpFrameWriter(), lanes, [b"x" * 100], 3000, 0.0, 64, 60000)

        assert batch([lane_with(Raising(ValueError("no"))), lane_with(Raising(ValueError("no")))])[0] == [0, 1]
        with pytest.raises(KeyboardInterrupt):
            batch([lane_with(Raising(KeyboardInterrupt()))])
    finally:
        wire.close()


class _Open:
    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0
