"""RTCP sender reports sent for every sender of an event loop in one pass a second (``relay.webrtc.reports``): the
bytes aiortc's own loop would send, every real aiortc viewer's reports in the same passes with the counts of what
the stream's C batch sent, the round-trip time the answers give, a BYE and nothing left behind as the senders stop,
and one sender's failing report skipped, said once, while the others go out."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref

import pytest
from aiortc.rtp import RtcpSdesPacket, RtcpSenderInfo, RtcpSourceInfo, RtcpSrPacket

from relay.hub import PacketHub
from relay.webrtc import borrowed, reports
from relay.webrtc.rtpsend import payloads_for

from .test_batchsend import PICTURES, _connect, _publish, _received_all, held  # noqa: F401 (held: a fixture)

DEADLINE = 20.0  # seconds for what a test waits on: a guard, not a measurement


@pytest.mark.parametrize(
    ("ntp", "timestamp", "packets", "octets"),
    [(0, 0, 0, 0), (0xE9A1_2B3C_4D5E_6F70, 0xFFFF_FFFF, 12_345, 9_876_543), (1 << 63, 7, (1 << 32) + 5, (1 << 40) + 9)],
)
def test_a_report_is_the_bytes_aiortcs_loop_serializes_for_the_same_fields(ntp, timestamp, packets, octets):
    ssrc, cname = 0x1234_5678, "{5c8e7a9e-camrelay}"
    theirs = bytes(
        RtcpSrPacket(
            ssrc=ssrc,
            sender_info=RtcpSenderInfo(
                ntp_timestamp=ntp, rtp_timestamp=timestamp, packet_count=packets & 0xFFFFFFFF,
                octet_count=octets & 0xFFFFFFFF,
            ),
        )
    ) + bytes(RtcpSdesPacket(chunks=[RtcpSourceInfo(ssrc=ssrc, items=[(1, cname.encode())])]))  # fmt: skip
    assert reports.sender_report(ssrc, ntp, timestamp, packets, octets) + reports.sdes_chunk(ssrc, cname) == theirs
    assert reports.sdes_chunk(ssrc, None) == b""  # no CNAME: the report alone, as aiortc


def _senders(pairs):
    return [r.getTransceivers()[0].sender for r, _ in pairs]


async def _reported(pairs, times: int) -> None:
    book = reports.reports_for(asyncio.get_running_loop())
    deadline = time.monotonic() + DEADLINE
    while min(book.sent(s) for s in _senders(pairs)) < times:
        assert time.monotonic() < deadline, [book.sent(s) for s in _senders(pairs)]
        await asyncio.sleep(0.05)


async def test_every_viewers_reports_go_out_in_the_same_passes_count_the_batch_and_give_a_round_trip_time(held):  # noqa: F811
    """Three real aiortc viewers of a stream sent to in the C batch: their senders' reports leave together, one
    pass a second, the same number each; each viewer's view of them counts every packet and byte the stream sent
    it; the viewers' receiver reports answer them, so each sender knows its round-trip time (the report's NTP
    time was kept); and once the viewers are gone, no sender is left enrolled and no timer runs."""
    hub = PacketHub("cam0", lambda: None)
    pairs = await _connect(hub, 3)
    book = reports.reports_for(asyncio.get_running_loop())
    try:
        frames = await _publish(hub, pairs, PICTURES[:6], pts0=90_000 * 1_700_000_000)
        packets = sum(len(payloads_for(f)) for f in frames)
        octets = sum(sum(map(len, payloads_for(f))) for f in frames)
        await _received_all(pairs, packets)
        passes = book.passes
        await _reported(pairs, 3)
        sent = [book.sent(s) for s in _senders(pairs)]
        assert max(sent) - min(sent) <= 1 and book.passes - passes <= max(sent), (sent, book.passes - passes)
        for (_, viewer), sender in zip(pairs, _senders(pairs), strict=True):
            deadline = time.monotonic() + DEADLINE
            while True:  # the viewer's view of the reports, and the sender's of the viewer's answers
                theirs = await viewer.getTransceivers()[0].receiver.getStats()
                remote = [s for s in theirs.values() if s.type == "remote-outbound-rtp"]
                ours = await sender.getStats()
                answers = [s for s in ours.values() if s.type == "remote-inbound-rtp"]
                if remote and remote[0].packetsSent == packets and answers and answers[0].roundTripTime is not None:
                    break
                assert time.monotonic() < deadline, (remote, answers)
                await asyncio.sleep(0.1)
            assert remote[0].bytesSent == octets
            assert 0 <= answers[0].roundTripTime < DEADLINE
    finally:
        for relay, viewer in pairs:
            await relay.close()
            await viewer.close()
    assert len(book) == 0 and book._timer is None


async def test_a_report_that_fails_is_skipped_and_said_once_while_the_others_go_out(held, monkeypatch, caplog):  # noqa: F811
    hub = PacketHub("cam0", lambda: None)
    pairs = await _connect(hub, 3)
    book = reports.reports_for(asyncio.get_running_loop())
    failing = {id(s) for s in _senders(pairs)[:2]}
    report = reports._Enrolled.report

    def fails_for_two(self) -> None:
        if id(self.fields.sender) in failing:
            raise MemoryError
        report(self)

    monkeypatch.setattr(reports._Enrolled, "report", fails_for_two)
    try:
        with caplog.at_level(logging.WARNING, logger="relay.webrtc.reports"):
            passes = book.passes
            deadline = time.monotonic() + DEADLINE
            while book.passes - passes < 2:
                assert time.monotonic() < deadline, "no report pass"
                await asyncio.sleep(0.05)
        senders = _senders(pairs)
        assert [book.sent(s) for s in senders[:2]] == [0, 0] and book.sent(senders[2]) >= 2
        ssrc = borrowed.SenderFields(senders[0]).ssrc
        lines = [r.getMessage() for r in caplog.records if "rtcp sender report failed" in r.getMessage()]
        assert lines[0] == f"rtcp sender report failed, skipped: ssrc={ssrc} MemoryError()"
        assert len(lines) <= book.passes - passes  # at most one a pass: the second sender's is counted, not said
    finally:
        for relay, viewer in pairs:
            await relay.close()
            await viewer.close()


# -- a viewer's RTCP read as it arrives (``borrowed.read_rtcp_at_once``)


async def test_a_viewers_receiver_reports_are_read_as_they_come_and_its_feedback_still_reaches_aiortc(
    held,  # noqa: F811
    monkeypatch,
):
    """Two real aiortc viewers: their receiver reports reach the relay's senders (each knows its round-trip time and
    the loss its viewer reports) without aiortc's DTLS task handling any of them, and the transport counts each
    datagram received; a PLI (feedback, which aiortc's handler may answer by sending) still goes to aiortc's own
    handler and asks the stream for a keyframe; a PLI from the viewer's address that is not SRTCP (fails its
    authentication) is dropped before aiortc's handler, and the session goes on."""
    import aiortc
    from aiortc.rtp import RTCP_PSFB_PLI, RtcpPacket, RtcpPsfbPacket, RtcpRrPacket

    def of(kind, ssrc=None):  # the datagrams aiortc's handler got holding such a packet (from that SSRC)
        return [d for d in handled for p in RtcpPacket.parse(d) if isinstance(p, kind) and ssrc in (None, p.ssrc)]

    asked = []
    hub = PacketHub("cam0", lambda: asked.append(time.monotonic()))
    handled: list[bytes] = []  # what aiortc's handler got on the relay's side
    relay_side: set[int] = set()
    handle = aiortc.RTCDtlsTransport._handle_rtcp_data

    async def spy(self, data: bytes) -> None:
        if id(self) in relay_side:
            handled.append(data)
        await handle(self, data)

    monkeypatch.setattr(aiortc.RTCDtlsTransport, "_handle_rtcp_data", spy)
    release = borrowed.WATCH_ICE.hold()  # as a relay's process holds it (sessions.process_patches)
    pairs = await _connect(hub, 2)
    try:
        ours = _senders(pairs)
        relay_side.update(id(s.transport) for s in ours)
        await _publish(hub, pairs, PICTURES[:4])
        received = [s.transport._RTCDtlsTransport__rx_packets for s in ours]
        deadline = time.monotonic() + DEADLINE
        while True:  # aiortc's viewers report once their receivers have had packets and a sender report
            answers = [[s for s in (await o.getStats()).values() if s.type == "remote-inbound-rtp"] for o in ours]
            if all(a and a[0].roundTripTime is not None for a in answers):
                break
            assert time.monotonic() < deadline, answers
            await asyncio.sleep(0.1)
        assert of(RtcpRrPacket) == [], "a receiver report went through aiortc's DTLS task"  # (a REMB may have)
        assert all(a[0].packetsLost == 0 for a in answers)
        assert [s.transport._RTCDtlsTransport__rx_packets for s in ours] > received  # counted as aiortc counts
        keyframes = len(asked)
        viewer_dtls = pairs[0][1].getTransceivers()[0].receiver.transport
        pli = RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=1234, media_ssrc=borrowed.SenderFields(ours[0]).ssrc)
        await viewer_dtls._send_rtp(bytes(pli))
        deadline = time.monotonic() + DEADLINE
        while len(asked) == keyframes:
            assert time.monotonic() < deadline, "the PLI asked for no keyframe"
            await asyncio.sleep(0.02)
        assert len(of(RtcpPsfbPacket, 1234)) == 1  # the PLI, through aiortc's handler
        conn = viewer_dtls.transport._connection
        plain = RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=999, media_ssrc=pli.media_ssrc)
        await conn.send(bytes(plain))  # not SRTCP: dropped; then a real one, handled after it (the socket's order)
        await viewer_dtls._send_rtp(bytes(pli))
        deadline = time.monotonic() + DEADLINE
        while len(of(RtcpPsfbPacket, 1234)) < 2:
            assert time.monotonic() < deadline, "the second PLI never reached aiortc's handler"
            await asyncio.sleep(0.02)
        assert of(RtcpPsfbPacket, 999) == [] and pairs[0][0].connectionState == "connected"
    finally:
        for relay, viewer in pairs:
            await relay.close()
            await viewer.close()
        release()


async def test_a_viewers_report_that_aiortc_fails_on_is_dropped_and_said_not_raised(held, monkeypatch, caplog):  # noqa: F811
    """aiortc's handler raising on a receiver report read at once: the report is dropped and said (at most once a
    second for the process), nothing reaches aioice's datagram callback, and the viewer stays connected."""
    import aiortc

    async def fails(self, packet) -> None:
        raise ValueError("bad report")

    release = borrowed.WATCH_ICE.hold()
    hub = PacketHub("cam0", lambda: None)
    pairs = await _connect(hub, 1)
    try:
        await _publish(hub, pairs, PICTURES[:3])  # a viewer reports on what it received
        monkeypatch.setattr(aiortc.RTCRtpSender, "_handle_rtcp_packet", fails)
        throttled = borrowed.Throttled(borrowed.log, borrowed.RTCP_WARNING_INTERVAL)
        monkeypatch.setattr(borrowed, "_rtcp_failed", throttled)
        with caplog.at_level(logging.WARNING, logger="relay.webrtc.borrowed"):
            deadline = time.monotonic() + DEADLINE
            while not any("not handled" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "no report came"
                await asyncio.sleep(0.05)
        lines = [r.getMessage() for r in caplog.records if "not handled" in r.getMessage()]
        assert lines == ["rtcp report from a viewer not handled, dropped: ValueError('bad report')"]
        assert pairs[0][0].connectionState == "connected"
    finally:
        for relay, viewer in pairs:
            await relay.close()
            await viewer.close()
        release()


class _Connection:
    """An aioice connection's stand-in: where ``read_rtcp_at_once`` notes its DTLS transport."""


class _FeedbackDtls:
    """A connected DTLS transport's stand-in with a real receiving SRTP session, whose aiortc handler of feedback
    raises ``exc`` (as its sender's retransmission does when the ICE pair went down meanwhile)."""

    def __init__(self, rx, exc: BaseException) -> None:
        self._state = borrowed._DTLS_CONNECTED
        self._rx_srtp = rx
        self.__dict__[borrowed._DTLS_RX_BYTES] = 0
        self.__dict__[borrowed._DTLS_RX_PACKETS] = 0
        self.exc = exc

    async def _handle_rtcp_data(self, data: bytes) -> None:
        raise self.exc


async def test_feedback_whose_handling_fails_is_said_once_or_not_at_all_never_an_unretrieved_exception(caplog):
    """Feedback (a NACK) is handled by aiortc in a task of its own: a ConnectionError there (the viewer's connection
    went down meanwhile) ends it quietly, as in aiortc's DTLS task; anything else is said, once a second; the loop
    never reports an exception no one retrieved."""
    import gc

    import pylibsrtp
    from aiortc.rtp import RTCP_RTPFB_NACK, RtcpRtpfbPacket

    key = bytes(range(30))
    tx = pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND))
    rx = pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND))
    loop = asyncio.get_running_loop()
    unretrieved: list[str] = []
    loop.set_exception_handler(lambda _, context: unretrieved.append(context["message"]))
    caplog.set_level(logging.WARNING, logger="relay.webrtc.borrowed")
    try:
        for exc in (ConnectionError("Cannot send data, not connected"), RuntimeError("aiortc's own")):
            dtls, conn = _FeedbackDtls(rx, exc), _Connection()
            conn.__dict__[borrowed._RTCP_FAST] = weakref.ref(dtls)
            nack = bytes(RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=1, media_ssrc=2, lost=[5]))
            assert borrowed._rtcp_now(conn, tx.protect_rtcp(nack))  # taken: handed to aiortc in a task
            for _ in range(3):
                await asyncio.sleep(0)
            del dtls
            gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert unretrieved == []
    said = [r.getMessage() for r in caplog.records if "feedback" in r.getMessage()]
    assert len(said) == 1 and "aiortc's own" in said[0]


class _Router:
    """A DTLS transport's RTP router's stand-in: the packets routed, to nobody."""

    def __init__(self) -> None:
        self.routed: list = []

    def route_rtcp(self, packet) -> set:
        self.routed.append(packet)
        return set()


class _RecordingDtls(_FeedbackDtls):
    """As ``_FeedbackDtls``, its aiortc handler recording the datagrams it is handed, and a router."""

    def __init__(self, rx) -> None:
        super().__init__(rx, RuntimeError("unused"))
        self._rtp_router = _Router()
        self.handled: list[bytes] = []

    async def _handle_rtcp_data(self, data: bytes) -> None:
        self.handled.append(data)


async def test_a_viewers_remb_is_dropped_where_it_is_read_and_what_comes_with_it_handled_as_without_it():
    """A REMB (a viewer's estimate of its link's bit rate, which the relay's senders have no encoder to give) is
    dropped at once: alone, nothing is routed and no task made for aiortc's handler; with a receiver report (the
    compound a browser sends), the report is routed at once as alone; with a NACK, aiortc's handler gets the whole
    datagram, as before. Each is counted received."""
    import pylibsrtp
    from aiortc.rtp import (
        RTCP_PSFB_APP,
        RTCP_RTPFB_NACK,
        RtcpPsfbPacket,
        RtcpReceiverInfo,
        RtcpRrPacket,
        RtcpRtpfbPacket,
        pack_remb_fci,
    )

    key = bytes(range(30))
    tx = pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND))
    rx = pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND))
    dtls, conn = _RecordingDtls(rx), _Connection()
    conn.__dict__[borrowed._RTCP_FAST] = weakref.ref(dtls)
    remb = bytes(RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=1, media_ssrc=0, fci=pack_remb_fci(300_000, [2])))
    block = RtcpReceiverInfo(ssrc=2, fraction_lost=0, packets_lost=0, highest_sequence=9, jitter=0, lsr=0, dlsr=0)
    report = bytes(RtcpRrPacket(ssrc=1, reports=[block]))
    nack = bytes(RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=1, media_ssrc=2, lost=[5]))
    assert borrowed._rtcp_now(conn, tx.protect_rtcp(remb))
    assert borrowed._rtcp_now(conn, tx.protect_rtcp(report + remb))
    assert borrowed._rtcp_now(conn, tx.protect_rtcp(nack + remb))
    await asyncio.sleep(0)
    assert [type(p) for p in dtls._rtp_router.routed] == [RtcpRrPacket]  # the report alone, at once
    assert dtls.handled == [nack + remb]  # the feedback to aiortc's handler, whole
    assert dtls.__dict__[borrowed._DTLS_RX_PACKETS] == 3


def test_a_closed_event_loops_reports_are_let_go():
    """Each event loop's ``SenderReports`` is kept while the loop is (a test suite makes hundreds of loops)."""
    import gc

    loop = asyncio.new_event_loop()
    reports.reports_for(loop)
    gone = weakref.ref(loop)
    loop.close()
    del loop
    gc.collect()
    assert gone() is None
