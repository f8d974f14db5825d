"""Batched, segmented UDP sends: the grouping rule with plain values, then a real relay sending that way."""

from __future__ import annotations

import asyncio

from relay.hub import EncodedFrame
from relay.webrtc import borrowed
from relay.webrtc.rtpsend import payloads_for
from relay.webrtc.udpbatch import MAX_SEGMENTS, batcher_of, runs
from relay.webrtc.whepclient import WhepViewer

from .conftest import session_of

A, B = ("127.0.0.1", 1000), ("127.0.0.1", 2000)


def sizes(groups):
    return [([len(d) for d in g], addr) for g, addr in groups]


def test_equal_datagrams_to_one_address_are_one_run_and_the_last_may_be_shorter():
    dgrams = [(b"x" * 1200, A)] * 5 + [(b"y" * 300, A)]
    assert sizes(runs(dgrams)) == [([1200] * 5 + [300], A)]


def test_nothing_follows_a_short_datagram_and_a_longer_one_starts_a_new_run():
    dgrams = [(b"x" * 100, A), (b"x" * 1200, A), (b"x" * 1200, A), (b"x" * 50, A), (b"x" * 50, A)]
    assert sizes(runs(dgrams)) == [([100], A), ([1200, 1200, 50], A), ([50], A)]


def test_another_address_starts_a_new_run():
    dgrams = [(b"x" * 10, A), (b"x" * 10, B), (b"x" * 10, A)]
    assert sizes(runs(dgrams)) == [([10], A), ([10], B), ([10], A)]


def test_runs_respect_the_kernels_segment_and_size_limits():
    many = [(b"x" * 100, A)] * (MAX_SEGMENTS + 1)
    assert [len(g) for g, _ in runs(many)] == [MAX_SEGMENTS, 1]
    big = [(b"x" * 1400, A)] * 60  # 84,000 bytes: more than one IP datagram may carry
    assert all(sum(map(len, g)) <= 60_000 for g, _ in runs(big)) and sum(len(g) for g, _ in runs(big)) == 60


def test_fragments_are_full_size_but_the_last_and_reassemble_to_the_nal_unit():
    nal = bytes([0x65]) + bytes(range(256)) * 40  # an IDR slice of 10,241 bytes
    frags = payloads_for(EncodedFrame(b"\x00\x00\x00\x01" + nal, 0, True, 0.0))  # one NAL unit, Annex B
    assert len({len(f) for f in frags[:-1]}) == 1 and len(frags[-1]) <= len(frags[0])
    assert frags[0][1] & 0x80 and frags[-1][1] & 0x40 and not any(f[1] & 0xC0 for f in frags[1:-1])
    assert all(f[0] == (0x65 & 0xE0) | 28 and f[1] & 0x1F == 5 for f in frags)
    assert bytes([(frags[0][0] & 0xE0) | (frags[0][1] & 0x1F)]) + b"".join(f[2:] for f in frags) == nal


async def test_a_relay_sends_each_viewers_frame_in_a_few_system_calls(relay_server, http):
    viewers = [WhepViewer(relay_server.whep(), http) for _ in range(2)]
    await asyncio.gather(*(v.connect() for v in viewers))
    frames = await asyncio.gather(*(v.read_frames(30) for v in viewers))
    assert all(s.latency_ms is not None for f in frames for s in f)  # every frame decoded, pixel clock read
    batchers = []
    for viewer in viewers:
        session = session_of(relay_server, viewer)
        assert session.track.pushed > 0  # live frames went out from the hub's publish, no task woken for them
        dtls = session.pc.getTransceivers()[0].sender.transport
        batchers.append(batcher_of(borrowed.nominated_pair(dtls).protocol))
    await asyncio.gather(*(v.close() for v in viewers))
    assert len(batchers) == 2 and all(b is not None for b in batchers)
    for b in batchers:
        # Keyframes at 640x360 are several datagrams; each run leaves in one call.
        assert b.syscalls < 0.8 * b.datagrams, (b.syscalls, b.datagrams)


class _Sink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def datagram_received(self, data, addr) -> None:
        self.got.append(data)


class _Sending(asyncio.DatagramProtocol):
    """A socket's protocol as aioice's is to the batcher: it keeps its transport (and has a ``__dict__``)."""

    def connection_made(self, transport) -> None:
        self.transport = transport


async def _pair():
    loop = asyncio.get_running_loop()
    rx, sink = await loop.create_datagram_endpoint(_Sink, local_addr=("127.0.0.1", 0))
    tx, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
    return tx, rx, sink, rx.get_extra_info("sockname")


async def _until(predicate, timeout=2.0):
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def test_what_was_sent_before_close_still_leaves():
    from relay.webrtc.udpbatch import Batcher

    tx, rx, sink, addr = await _pair()
    try:
        b = Batcher(tx)
        b.send(b"close-notify", addr)  # queued for the end of this pass ...
        tx.close()  # ... and the transport closed before that
        await _until(lambda: sink.got == [b"close-notify"])
    finally:
        rx.close()


async def test_every_socket_sent_to_in_a_pass_is_flushed_at_its_end_even_when_one_fails():
    """One callback flushes every batcher of the pass, in the order they got their first datagram; one whose
    flush fails is reported to the loop's exception handler, and the others' datagrams leave all the same."""
    from relay.webrtc.udpbatch import Batcher

    loop = asyncio.get_running_loop()
    failures = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: failures.append(context["message"]))
    pairs = [await _pair() for _ in range(3)]
    try:
        batchers = [Batcher(tx) for tx, *_ in pairs]

        def broken() -> None:
            raise RuntimeError("broken")

        batchers[1].flush = broken  # type: ignore[method-assign]
        for i, (b, (_, _, _, addr)) in enumerate(zip(batchers, pairs, strict=True)):
            b.send(bytes([i]) * 10, addr)
            b.send(bytes([i]) * 20, addr)
        await _until(lambda: all(len(pairs[i][2].got) == 2 for i in (0, 2)))
        assert [pairs[i][2].got for i in (0, 2)] == [[bytes([i]) * 10, bytes([i]) * 20] for i in (0, 2)]
        assert failures == ["udp batch flush failed"] and pairs[1][2].got == []
    finally:
        loop.set_exception_handler(previous)
        for tx, rx, _, _ in pairs:
            tx.close()
            rx.close()


async def test_a_route_that_refuses_segmentation_falls_back_alone(monkeypatch):
    import errno

    from relay.webrtc import udpbatch

    def refuse(sock, data, segment, addr):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(udpbatch, "_sendmsg_gso", refuse)
    tx, rx, sink, addr = await _pair()
    try:
        b = udpbatch.Batcher(tx)
        for i in range(5):
            b.send(bytes([i]) * 100, addr)
        await _until(lambda: len(sink.got) == 5)
        assert sink.got == [bytes([i]) * 100 for i in range(5)]  # all of them, in order
        assert b.gso is False and udpbatch.gso_everywhere()  # only this socket gave up GSO
    finally:
        tx.close()
        rx.close()


def test_a_transport_without_a_socket_is_sent_to_directly():
    from relay.webrtc.udpbatch import send_now, send_run_at_once

    class TurnLike:  # aioice's TURN transport: sendto, no socket, no write buffer
        def __init__(self) -> None:
            self.sent: list[tuple[bytes, tuple]] = []

        def sendto(self, data, addr) -> None:
            self.sent.append((data, addr))

        def get_extra_info(self, name, default=None):
            return default

    class Proto:
        pass

    proto = Proto()
    proto.transport = TurnLike()
    send_now(proto, b"dtls", A)  # no running loop needed: nothing is deferred
    assert proto.transport.sent == [(b"dtls", A)] and batcher_of(proto) is None

    # A frame's run comes as a view of the sender's buffer, which the next viewer's frame overwrites at once;
    # a TURN transport sends later, from a task: it is handed copies.
    buffer = bytearray(b"a" * 100 + b"b" * 40)
    send_run_at_once(proto, memoryview(buffer), 100, A)
    buffer[:] = bytes(140)
    assert proto.transport.sent[1:] == [(b"a" * 100, A), (b"b" * 40, A)]


def test_runs_of_sizes_are_the_same_runs_as_of_datagrams():
    from relay.webrtc.udpbatch import gso_runs

    assert gso_runs([1200] * 5 + [300]) == [6]
    assert gso_runs([100, 1200, 1200, 50, 1200]) == [1, 3, 1]
    assert gso_runs([1200] * 70) == [50, 20]  # 60,000 bytes a write at most
    assert gso_runs([100] * (MAX_SEGMENTS + 1)) == [MAX_SEGMENTS, 1]
    assert gso_runs([]) == []


async def test_a_frames_run_leaves_at_once_after_what_its_socket_already_held():
    """A viewer's frame is written when it is protected, not at the end of the pass: its datagrams are in the
    receiver's socket before the event loop runs again, after what the batcher held for that socket (never
    reordered), in one segmented write."""
    import socket

    from relay.webrtc.udpbatch import send_now, send_run_at_once

    loop = asyncio.get_running_loop()
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tx, protocol = await loop.create_datagram_endpoint(_Sending, local_addr=("127.0.0.1", 0))
    try:
        addr = rx.getsockname()
        send_now(protocol, b"rtcp", addr)  # held for the end of the pass ...
        send_run_at_once(protocol, b"a" * 100 + b"b" * 100 + b"c" * 40, 100, addr)  # ... a frame, three datagrams
        got = []
        while True:  # no await since the send: what is here was written synchronously
            try:
                got.append(rx.recv(2048))
            except BlockingIOError:
                break
        assert got == [b"rtcp", b"a" * 100, b"b" * 100, b"c" * 40]
        batcher = batcher_of(protocol)
        assert (
            batcher is not None and batcher.datagrams == 4 and batcher.syscalls <= 2
        )  # the frame's three in one call where GSO works
        assert batcher.pending == []
    finally:
        tx.close()
        rx.close()


async def test_a_frames_run_that_fails_to_be_written_is_reported_not_raised_into_the_sender(monkeypatch):
    """A write that fails in a way the batcher does not expect is reported as the pass's flush reports one (the
    loop's exception handler), never raised into the viewer's sender, whose send loop it would end for good."""
    from relay.webrtc import udpbatch
    from relay.webrtc.udpbatch import send_run_at_once

    loop = asyncio.get_running_loop()
    reported = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    tx, protocol = await loop.create_datagram_endpoint(_Sending, local_addr=("127.0.0.1", 0))

    def broken(self, *args):
        raise RuntimeError("the socket went away underneath")

    monkeypatch.setattr(udpbatch.Batcher, "_write", broken)
    try:
        send_run_at_once(protocol, b"a" * 100, 100, ("127.0.0.1", 9))  # returns: nothing raised
        send_run_at_once(protocol, b"b" * 100, 100, ("127.0.0.1", 9))  # and the next frame is tried, and reported
    finally:
        tx.close()
        loop.set_exception_handler(previous)
    assert [(c["message"], str(c["exception"])) for c in reported] == [
        ("udp batch flush failed", "the socket went away underneath")
    ] * 2
