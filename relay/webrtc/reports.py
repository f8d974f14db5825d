"""RTCP sender reports: every sender's of an event loop in one pass a second, instead of a task and a timer each.

aiortc's ``RTCRtpSender._run_rtcp`` is a task per sender that sleeps 0.5 to
1.5 s, builds its sender report and SDES as objects, serializes them and
sends them down three coroutines. On a relay with 64 viewers that cost
about 130 us of CPU a report (docs/benchmarks.md, "What one more viewer
costs besides its packets"): a report a second for each of a viewer's
senders (two with sound), some 7 % of what one more viewer costs, the
task's wake-up and the objects each time on a cold cache.

Here a camrelay sender's RTCP loop (``run_rtcp``, in place of aiortc's:
``relay.webrtc.rtpsend.install``) enrols the sender with its event loop's
``SenderReports`` and waits to be cancelled. Every ``REPORT_INTERVAL`` that
sends every enrolled sender's report in one callback, one after the other:
the sender report packed in place (``sender_report``; its counts read as
aiortc's loop reads them, so what the stream's C batch sent is in) and the
SDES chunk with its CNAME (serialized once, by aiortc), protected with the
sender's outgoing SRTP session and written as its RTP is (``send_run``:
through the socket's batcher). As aiortc's: the report's NTP time is kept
for the round-trip time the receiver reports give, nothing is sent while
DTLS or ICE is down, and an RTCP BYE goes out as the loop ends. A report
that fails is skipped (said at most once a ``REPORT_INTERVAL``), and the
others go out.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import weakref
from collections.abc import Callable

from aiortc import RTCRtpSender
from aiortc.rtp import RtcpSdesPacket, RtcpSourceInfo

from ..logsafe import Throttled
from . import borrowed

log = logging.getLogger(__name__)

# Seconds between a sender's reports: aiortc's mean (its loop waits 0.5 to 1.5 s, at random). RFC 3550 (6.2) gives
# the sender of a 2 Mbit/s stream far more RTCP bandwidth than one 52-byte report a second; browsers read a report
# to map the RTP clock onto the capture clock (lip sync) and need one soon after the start.
REPORT_INTERVAL = 1.0
SDES_CNAME = 1  # RFC 3550 6.5.1
RTCP_SR = 200
# An RTCP sender report with no report blocks (RFC 3550 6.4.1): version 2 and no count, SR, length 6 (in 32-bit words
# less one), the SSRC, the NTP time, the RTP timestamp, the packets and octets sent.
_SENDER_REPORT = struct.Struct("!BBHIIIIII")
_WORDS_LESS_ONE = _SENDER_REPORT.size // 4 - 1
_COUNT_MASK = 0xFFFFFFFF  # the counts wrap at 32 bits, as aiortc's report sends them


def sender_report(ssrc: int, ntp: int, timestamp: int, packets: int, octets: int) -> bytes:
    """The RTCP sender report (no report blocks) aiortc's loop would serialize for these fields."""
    return _SENDER_REPORT.pack(
        0x80, RTCP_SR, _WORDS_LESS_ONE, ssrc, ntp >> 32, ntp & 0xFFFFFFFF, timestamp,
        packets & _COUNT_MASK, octets & _COUNT_MASK,
    )  # fmt: skip


def sdes_chunk(ssrc: int, cname: str | None) -> bytes:
    """The SDES packet with ``cname`` that follows each report (none without a CNAME, as aiortc), serialized once."""
    if cname is None:
        return b""
    return bytes(RtcpSdesPacket(chunks=[RtcpSourceInfo(ssrc=ssrc, items=[(SDES_CNAME, cname.encode("utf8"))])]))


class _Enrolled:
    """One sender's reports: how they leave, its SDES, its DTLS socket (kept per transport)."""

    __slots__ = ("fields", "send_run", "sdes", "socket", "sent")

    def __init__(self, sender: RTCRtpSender, send_run: Callable) -> None:
        self.fields = borrowed.SenderFields(sender)
        self.send_run = send_run
        self.sdes: bytes | None = None  # made at its first report: aiortc sets the CNAME as the sender starts
        self.socket = borrowed.DtlsSocket(sender.transport)
        self.sent = 0  # reports sent

    def report(self) -> None:
        """Its report now; ``ConnectionError`` (nothing sent) while DTLS or ICE is down."""
        fields = self.fields
        dtls = fields.sender.transport
        if self.socket.dtls is not dtls:
            self.socket = borrowed.DtlsSocket(dtls)
        protocol, addr, session = self.socket.get()
        ntp, timestamp, packets, octets = fields.report_counts()
        ssrc = fields.ssrc
        if self.sdes is None:
            self.sdes = sdes_chunk(ssrc, fields.cname)
        data = session.protect_rtcp(sender_report(ssrc, ntp, timestamp, packets, octets) + self.sdes)
        fields.reported(ntp)
        self.send_run(protocol, data, len(data), addr)
        borrowed.count_dtls_sent(dtls, len(data), 1)
        self.sent += 1


class SenderReports:
    """The senders of one event loop whose reports go out together, every ``REPORT_INTERVAL``, in the order they
    enrolled; the timer runs while any is enrolled."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # not held: the loop keys this in _reports, weakly
        self._enrolled: dict[RTCRtpSender, _Enrolled] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._warnings = Throttled(log, REPORT_INTERVAL)
        self.passes = 0  # report passes run (one a REPORT_INTERVAL while any sender is enrolled)

    def __len__(self) -> int:
        return len(self._enrolled)

    def enrol(self, sender: RTCRtpSender, send_run: Callable) -> Callable[[], None]:
        """``sender`` reports with the others from the next pass on, until the returned release."""
        enrolled = self._enrolled[sender] = _Enrolled(sender, send_run)
        if self._timer is None:
            self._timer = self._loop().call_later(REPORT_INTERVAL, self._pass)

        def release() -> None:
            if self._enrolled.get(sender) is enrolled:
                del self._enrolled[sender]
            if not self._enrolled and self._timer is not None:
                self._timer.cancel()
                self._timer = None

        return release

    def sent(self, sender: RTCRtpSender) -> int:
        """Reports sent for ``sender`` while enrolled (0 if it is not)."""
        enrolled = self._enrolled.get(sender)
        return enrolled.sent if enrolled is not None else 0

    def _pass(self) -> None:
        self._timer = None
        self.passes += 1
        for sender, enrolled in list(self._enrolled.items()):
            try:
                enrolled.report()
            except ConnectionError:
                pass  # as aiortc's loop: no report while DTLS or ICE is down
            except Exception as exc:  # one sender's failure never holds back the others' reports
                self._warnings.warn("rtcp sender report failed, skipped: ssrc=%s %r", _ssrc_of(sender), exc)
        if self._enrolled:
            self._timer = self._loop().call_later(REPORT_INTERVAL, self._pass)


def _ssrc_of(sender: RTCRtpSender) -> int | None:
    """The sender's SSRC, for a log line."""
    try:
        return borrowed.SenderFields(sender).ssrc
    except Exception:  # a log line's detail: never a second failure
        return None


_reports: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SenderReports] = weakref.WeakKeyDictionary()


def reports_for(loop: asyncio.AbstractEventLoop) -> SenderReports:
    """The event loop's ``SenderReports``, made on first use."""
    reports = _reports.get(loop)
    if reports is None:
        reports = _reports[loop] = SenderReports(loop)
    return reports


def run_rtcp(send_run: Callable) -> Callable:
    """A sender's RTCP loop (``borrowed.replace_send_loop``'s ``run_rtcp``) whose reports leave through
    ``send_run`` with every other sender's of its event loop (``SenderReports``)."""

    async def _run_rtcp(self: RTCRtpSender) -> None:
        fields = borrowed.SenderFields(self)
        fields.rtcp_started()
        release = reports_for(asyncio.get_running_loop()).enrol(self, send_run)
        try:
            await asyncio.get_running_loop().create_future()  # until the sender stops (cancelled)
        except asyncio.CancelledError:
            pass
        finally:
            release()
        await fields.send_bye()
        fields.rtcp_exited()

    return _run_rtcp
