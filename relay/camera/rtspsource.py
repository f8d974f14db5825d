"""An RTSP camera read by camrelay's own client: RTP over the RTSP connection (TCP), H.264 only.

FFmpeg's RTSP demuxer runs its H.264 parser, which hands an access unit on
only when the next one starts: a frame time (33 ms at 30 fps) added to every
frame. RTP marks a unit's last packet (the marker bit); ``RtspSource`` hands
the unit on there (``relay.rtspin``, sans-io, does the protocol; this is the
blocking socket around it, used from the capture thread). It loads no codec:
a passed-through camera's worker never imports PyAV, unless someone wants
JPEGs, the slate shows, or the stream transcodes (``read`` decodes, lazily).

``open()`` sends OPTIONS and DESCRIBE (one redirect followed, one 401 answered
with the URL's credentials: Basic or Digest; after a redirect to another host
or port, only with the new URL's own), and raises ``UseDemuxer`` when
the camera sends anything but H.264 or a DESCRIBE answer it cannot read; then
SETUP (the video track, interleaved) and PLAY. While playing it sends
GET_PARAMETER (or OPTIONS) before the session's timeout. Each answer has
``CONNECT_TIMEOUT`` in all, ``open()`` ``OPEN_TIMEOUT``; no RTP packet of the
video for ``IO_TIMEOUT`` is a ``SourceError`` (RTCP alone does not keep a
camera alive), as FFmpeg's demuxer's I/O timeout is.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from .. import h264, rtpaudio, rtspin
from ..h264 import H264Error, ParameterSets
from ..logsafe import Throttled, reason_phrase, redact_text, redact_url
from ..rtspin import AccessUnit, Response, RtspError
from .cameraaudio import AudioTap, TapFrame, TrackFormat
from .capture import CapturedFrame, PacketSource, SourceClock, SourceError, UseDemuxer

if TYPE_CHECKING:
    import av

log = logging.getLogger(__name__)

DEFAULT_PORT = 554
CONNECT_TIMEOUT = 5.0  # seconds to connect, and for each request's answer, in all (a trickle does not extend it)
# Interleaved bytes a camera may send ahead of a request's answer (its stream starting before PLAY's answer
# leaves: a keyframe or two), each frame counted with HELD_FRAME_OVERHEAD; more is a camera that does not answer.
MAX_HELD_BYTES = 8 * 2**20
HELD_FRAME_OVERHEAD = 64  # bytes an Interleaved frame held costs beyond its payload (its objects' headers)
# Seconds open() may take in all (connect, OPTIONS, DESCRIBE, a redirect, a 401, SETUP, PLAY): each step had
# CONNECT_TIMEOUT, and a camera slow at each held it a minute. FFmpeg's demuxer has 10 s (capture.OPEN_TIMEOUT).
OPEN_TIMEOUT = 10.0
# Seconds without an RTP packet of the video from a playing camera before it counts as gone: the same as
# FFmpeg's "timeout" option of RTSP_INPUT (relay/camera/capture.py), so a camera that hangs mid-stream is a
# SourceError within 5 s. Video, not any byte: a camera whose encoder hung may send RTCP reports for ever.
IO_TIMEOUT = 5.0
RECV_BYTES = 256 * 1024  # one read takes what the socket holds: a 1080p I-frame is 100-300 KiB
# Seconds a blocked read waits at most before it looks at its deadline again (the kernel's receive timeout, set
# once for a connection, not before every read): any deadline is kept, lowered to it near its end.
WAKE_EVERY = 1.0
MIN_WAIT = 0.001  # the shortest receive timeout set: the kernel takes 0 for no timeout at all
KEEPALIVE_FRACTION = 0.5  # of the session's timeout: a keep-alive long before the camera drops the session
USER_AGENT = "camrelay"
MAX_REDIRECTS = 1
TEARDOWN_TIMEOUT = 0.5  # seconds a best-effort TEARDOWN may take to leave; its answer is not awaited
TIMEVAL = struct.Struct("@ll")  # struct timeval: seconds, microseconds, each a long where long is 64 bits
# The kernel's socket timeouts are set where that struct is sure (LP64: arm64 Pi OS, x86_64). A 32-bit build
# (whose time_t may be 64 bits: glibc's _TIME_BITS=64) uses Python's own timeout instead, a poll beside each
# read, never a wrongly sized struct.
KERNEL_TIMEOUTS = struct.calcsize("@l") == 8
LOG_EVERY = 10.0  # seconds between lines about a camera's bad packets or restarted streams (more are counted)
VIDEO_TRANSPORT = "RTP/AVP/TCP;unicast;interleaved=0-1"
# The sound's own channel pair on the same connection (RFC 2326 10.12): the camera may name others in its answer.
AUDIO_TRANSPORT = "RTP/AVP/TCP;unicast;interleaved=2-3"


def _origin(url: str) -> tuple[str, int]:
    """(host, port) of an rtsp:// URL: where its credentials may go."""
    parts = urlsplit(url)
    return (parts.hostname or "").lower(), parts.port or DEFAULT_PORT


def _set_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    """The kernel's receive or send timeout (``SO_RCVTIMEO``, ``SO_SNDTIMEO``) of a blocking socket: a read or
    send that waits longer fails with ``BlockingIOError`` (``TimeoutError`` where ``KERNEL_TIMEOUTS`` is off)."""
    if not KERNEL_TIMEOUTS:
        sock.settimeout(seconds)  # both ways, and TimeoutError rather than BlockingIOError: _receive takes both
        return
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, option, TIMEVAL.pack(whole, int((seconds - whole) * 1e6)))


class _Redirect(Exception):
    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


class RtspSource:
    """An RTSP camera over TCP, H.264: ``read_packet()`` gives each access unit (Annex B, RTP clock ticks)
    at its last packet. Same contract as ``PacketSource``; blocking, from the capture thread."""

    reader = "rtspin"

    def __init__(
        self,
        url: str,
        width: int,
        height: int,
        fps: float,
        *,
        fallback: Callable[[], PacketSource],
        audio: AudioTap | None = None,
    ) -> None:
        self.url = url
        self.width, self.height, self.fps = width, height, fps
        self.codec = ""  # FFmpeg's name for what the camera sends, from its SDP
        self.extradata = b""  # sprop-parameter-sets as Annex B
        self.time_base = 0.0  # seconds per RTP clock tick
        self._fallback = fallback
        parts = urlsplit(url)
        self._requests = rtspin.Requests(USER_AGENT, unquote(parts.username or ""), unquote(parts.password or ""))
        self._target = rtspin.without_userinfo(url)
        self._sock: socket.socket | None = None
        self._buffer = memoryview(bytearray(RECV_BYTES))  # each read's, kept for the source's life
        self._recv_timeout = 0.0  # seconds, the socket's receive timeout (SO_RCVTIMEO) now; 0: none set
        self._reader = rtspin.Reader()
        self._keepalive_every = float(rtspin.DEFAULT_SESSION_TIMEOUT) * KEEPALIVE_FRACTION
        self._keepalive_at = 0.0
        self._keepalive_method = "OPTIONS"
        self._rtp_channel = 0
        self._open_deadline = float("inf")  # monotonic, while open() runs
        self._video_deadline = float("inf")  # monotonic: a SourceError when no video has come by then
        self._video_silence = ""  # what that SourceError says
        self._depacketizer: rtspin.H264Depacketizer | None = None
        self._items: collections.deque[rtspin.Response | rtspin.Interleaved] = collections.deque()
        self._units: collections.deque[AccessUnit] = collections.deque()
        self._pending: collections.deque[AccessUnit] = collections.deque()  # read ahead while probing
        self._decoder = None  # an H.264 decoder, made by the first read() (transcoding)
        self._sets: ParameterSets | None = None
        self._frames: collections.deque[av.VideoFrame] = collections.deque()
        self._stop = threading.Event()
        self._owner: int | None = None
        self._bad_packets = Throttled(log, interval=LOG_EVERY)
        self._restarts = Throttled(log, interval=LOG_EVERY)
        self._resyncs = 0  # the depacketizer's, as last logged
        self._tap = audio  # where the camera's sound goes, when the stream wants it
        self._audio: rtpaudio.AudioDepacketizer | None = None  # once its track is set up
        self._audio_channel = -1
        self._rtcp_channels = (-1, -1)  # the video's and the sound's RTCP
        self._reports: list[rtpaudio.SenderReport | None] = [None, None]  # the latest of each, the video's first
        self._last_video_pts: int | None = None  # of the last unit handed on, unwrapped
        # The video's own mapping onto the capture clock, as the worker's passthrough keeps it: with the camera's
        # sender reports of both tracks, the sound is put on it (lip sync); without, it has its own (below).
        self.video_clock: SourceClock | None = None
        self._audio_format: TrackFormat | None = None
        self._audio_clock = SourceClock()  # the sound's RTP clock on the wall clock, anchored as the video's is
        self._audio_errors = Throttled(log, interval=LOG_EVERY)
        self._audio_dropped = 0  # the depacketizer's packets_dropped, as last logged

    @property
    def name(self) -> str:
        return redact_url(self.url)  # for errors and logs: never a camera's password

    @property
    def units_lost(self) -> int:
        """Access units dropped because the network lost some of their packets (or of those they need): the
        broken unit and the rest of its GOP, up to the next IDR."""
        return self._depacketizer.units_dropped if self._depacketizer is not None else 0

    @property
    def audio_packets_dropped(self) -> int:
        """RTP packets of the sound that could not be read (or came late), dropped: the video never waits on them."""
        return self._audio.packets_dropped if self._audio is not None else 0

    @property
    def audio_packets_lost(self) -> int:
        return self._audio.packets_lost if self._audio is not None else 0

    # -- opening

    def open(self) -> None:
        self._owner = threading.get_ident()
        self._open_deadline = time.monotonic() + OPEN_TIMEOUT
        try:
            self._open()
        finally:
            self._open_deadline = float("inf")
        self._video_deadline = time.monotonic() + IO_TIMEOUT
        self._video_silence = f"sent no video for {IO_TIMEOUT:g} s"  # read_packet's error: not formatted every unit

    def _open(self) -> None:
        for redirects in range(MAX_REDIRECTS + 1):
            self._connect()
            try:
                self._request("OPTIONS", self._target)
                describe = self._request("DESCRIBE", self._target, {"Accept": "application/sdp"})
                break
            except _Redirect as redirect:
                if redirects == MAX_REDIRECTS:
                    raise SourceError(f"{self.name} redirected more than {MAX_REDIRECTS} time(s)") from None
                self._redirect(redirect.location)
        base = describe.header("content-base") or describe.header("content-location") or self._target
        try:
            video = rtspin.parse_sdp(describe.body.decode("utf-8", errors="replace"), base)
        except RtspError as exc:
            self._close_socket()
            raise UseDemuxer(f"its DESCRIBE answer cannot be read here: {exc}", self._fallback) from None
        self.codec = video.codec
        if video.codec != "h264":
            self._close_socket()
            raise UseDemuxer(f"it sends {video.codec}, and camrelay's RTSP client reads H.264 only", self._fallback)
        self.extradata = video.extradata
        self.time_base = 1.0 / video.clock_rate
        sps = next((n for n in video.parameter_sets if h264.nal_type(n) == h264.NAL_SPS), None)
        if sps is not None:
            with contextlib.suppress(H264Error):  # the worker reads it again, and says what is wrong
                parsed = h264.parse_sps(sps)
                self.width, self.height = parsed.width, parsed.height
        setup = self._request("SETUP", video.control, {"Transport": VIDEO_TRANSPORT})
        try:
            self._requests.session, timeout = rtspin.parse_session(setup.header("session") or "")
            self._rtp_channel, video_rtcp = rtspin.parse_interleaved(setup.header("transport") or "")
        except RtspError as exc:
            raise SourceError(f"{self.name}: SETUP answer: {exc}") from None
        self._keepalive_every = timeout * KEEPALIVE_FRACTION
        self._depacketizer = rtspin.H264Depacketizer(video.payload_type)
        self._rtcp_channels, self._reports = (video_rtcp, -1), [None, None]
        if self._tap is not None:
            self._setup_audio(describe.body.decode("utf-8", errors="replace"), base)
            self._tap.opened(self._audio is not None)
        self._request("PLAY", base if base.startswith("rtsp://") else self._target, {"Range": "npt=0.000-"})
        self._keepalive_at = time.monotonic() + self._keepalive_every

    def _setup_audio(self, sdp: str, base: str) -> None:
        """SETUP the camera's sound beside its video, on a channel pair of its own; one it has not, or that cannot
        be read here, or that it refuses, leaves the video alone (one log line)."""
        try:
            track = rtpaudio.parse_sdp_audio(sdp, base)
        except RtspError as exc:
            log.info("%s: no sound: %s", self.name, exc)
            return
        try:
            setup = self._request("SETUP", track.control, {"Transport": AUDIO_TRANSPORT})
            channel, rtcp = rtspin.parse_interleaved(setup.header("transport") or "")
        except (SourceError, RtspError) as exc:
            why = redact_text(str(exc), self.url)
            log.warning("%s: its sound could not be set up, video alone: %s", self.name, why)
            return
        if channel == self._rtp_channel:
            log.warning("%s: its sound was given the video's channel %d, video alone", self.name, channel)
            return
        self._audio = rtpaudio.AudioDepacketizer(track)
        self._audio_channel = channel
        self._rtcp_channels = (self._rtcp_channels[0], rtcp)
        self._audio_format = TrackFormat(track.codec, track.clock_rate, track.channels, track.config)
        self._audio_dropped = 0
        log.info(
            "%s: sound %s %d Hz %d ch on channel %d", self.name, track.codec, track.clock_rate, track.channels, channel
        )

    def _audio_in(self, payload: bytes) -> None:
        """An RTP packet of the sound: its frames to the tap, stamped on the capture clock; a bad one counted."""
        audio, fmt, tap = self._audio, self._audio_format, self._tap
        assert audio is not None and fmt is not None and tap is not None
        now = time.time()
        for frame in audio.push(payload):
            when = self._on_video_clock(frame.pts, fmt.rate)
            if when is None:
                when = self._audio_clock.wall_time(frame.pts / fmt.rate, now)
            tap.put(TapFrame(fmt, frame.data, when, frame.samples))
        if audio.packets_dropped != self._audio_dropped:
            tap.packets_dropped += audio.packets_dropped - self._audio_dropped
            self._audio_dropped = audio.packets_dropped
            self._audio_errors.warn("%s: RTP packet of the sound dropped: %s", self.name, audio.last_error)

    def _on_video_clock(self, pts: int, rate: int) -> float | None:
        """When a sound frame at RTP time ``pts`` was captured, on the video's capture clock: through the camera's
        sender reports of both tracks, once it sent them and the video's mapping has started; else None."""
        video, audio = self._reports
        if video is None or audio is None or self.video_clock is None or self._last_video_pts is None:
            return None
        raw = rtpaudio.rtp_at(pts, rate, audio, video, round(1 / self.time_base))
        video_pts = self._last_video_pts + rtpaudio.signed32(raw - self._last_video_pts)
        return self.video_clock.map(video_pts * self.time_base)

    def _rtcp_in(self, channel: int, payload: bytes) -> None:
        report = rtpaudio.parse_sender_report(payload)
        if report is not None:
            self._reports[self._rtcp_channels.index(channel)] = report

    def _connect(self) -> None:
        self._close_socket()
        parts = urlsplit(self._target)
        timeout = min(CONNECT_TIMEOUT, self._open_deadline - time.monotonic())
        if timeout <= 0:
            raise SourceError(f"{self.name} did not finish opening within {OPEN_TIMEOUT:g} s")
        try:
            self._sock = socket.create_connection((parts.hostname, parts.port or DEFAULT_PORT), timeout)
        except OSError as exc:
            raise SourceError(f"cannot open {self.name}: {exc.strerror or exc}") from None
        self._sock.settimeout(None)  # blocking: the kernel's timeouts bound each read and send (_receive)
        _set_timeout(self._sock, socket.SO_SNDTIMEO, CONNECT_TIMEOUT)
        self._recv_timeout = 0.0  # none set yet
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = rtspin.Reader()

    def _request(self, method: str, url: str, headers: dict[str, str] | None = None) -> Response:
        """Send ``method`` and wait for its answer; a 401 is answered once with the URL's credentials. A 3xx
        to OPTIONS or DESCRIBE raises ``_Redirect`` (the caller starts again there); any other answer but
        200 is a ``SourceError``."""
        for attempt in range(2):
            self._send(method, url, headers)
            response = self._answer(method)
            if response.status == 401 and attempt == 0:
                if not self._requests.user:
                    raise SourceError(f"{self.name} wants credentials (401 to {method}) and the URL has none")
                try:
                    self._requests.challenged(response)
                except RtspError as exc:
                    raise SourceError(f"{self.name}: {exc}") from None
                continue
            break
        if response.status == 401:
            raise SourceError(f"{self.name} refused the credentials (401 to {method})")
        location = response.header("location")
        if method in ("OPTIONS", "DESCRIBE") and 300 <= response.status < 400 and location:
            raise _Redirect(location)
        if response.status != 200:
            reason = reason_phrase(response.reason)  # shown to viewers as the stream's last error
            raise SourceError(f"{self.name} answered {method} with {response.status} {reason}".rstrip())
        if method == "OPTIONS" and "GET_PARAMETER" in (response.header("public") or "").upper():
            self._keepalive_method = "GET_PARAMETER"
        return response

    def _redirect(self, location: str) -> None:
        try:
            target = urlsplit(location)
            target.port  # noqa: B018 (read for its ValueError: a port past 65535, or not a number)
        except ValueError:
            raise SourceError(f"{self.name} redirects to a URL that cannot be read: {redact_url(location)!r}") from None
        if target.scheme != "rtsp" or not target.hostname:
            raise SourceError(f"{self.name} redirects to a URL that is not rtsp://: {redact_url(location)}")
        r = self._requests
        if target.username:  # the new URL's own credentials
            r.user, r.password = unquote(target.username), unquote(target.password or "")
        elif _origin(location) != _origin(self._target):  # the camera's password is for the camera alone
            r.user, r.password = "", ""
        self._target = rtspin.without_userinfo(location)
        r.challenge = None
        log.info("%s redirects to %s", self.name, redact_url(location))

    def _send(self, method: str, url: str, headers: dict[str, str] | None = None) -> None:
        if self._sock is None:
            raise SourceError(f"{self.name} is not open")
        data = self._requests.make(method, url, headers)
        try:
            self._sock.sendall(data)  # within the socket's send timeout (CONNECT_TIMEOUT, TEARDOWN_TIMEOUT)
        except OSError as exc:
            raise SourceError(f"{self.name}: cannot send {method}: {exc.strerror or exc}") from None

    def _answer(self, method: str) -> Response:
        """The answer to the request just sent, within ``CONNECT_TIMEOUT``. Interleaved frames that come
        before it (up to ``MAX_HELD_BYTES``) are held aside and given back, in order, ahead of what follows."""
        deadline = time.monotonic() + CONNECT_TIMEOUT
        silence = f"did not answer {method} within {CONNECT_TIMEOUT:g} s"
        if self._open_deadline < deadline:
            deadline, silence = self._open_deadline, f"did not finish opening within {OPEN_TIMEOUT:g} s ({method})"
        held: list[rtspin.Interleaved] = []
        held_bytes = 0
        try:
            while True:
                item = self._next_item(deadline, silence)
                if isinstance(item, Response):
                    if item.cseq in (None, self._requests.cseq):
                        return item
                    continue  # the answer to an earlier request (a keep-alive's)
                held.append(item)
                held_bytes += len(item.payload) + HELD_FRAME_OVERHEAD
                if held_bytes > MAX_HELD_BYTES:
                    raise SourceError(f"{self.name} sent over {MAX_HELD_BYTES} bytes of RTP and no answer to {method}")
        finally:
            self._items.extendleft(reversed(held))

    # -- reading

    def _next_item(self, deadline: float, silence: str) -> rtspin.Response | rtspin.Interleaved:
        """The next response or interleaved frame; ``SourceError`` saying the camera ``silence`` when there is
        none by ``deadline`` (monotonic)."""
        while not self._items:
            data = self._receive(deadline, silence)
            try:
                self._items.extend(self._reader.feed(data))
            except RtspError as exc:
                raise SourceError(f"{self.name}: {redact_text(str(exc), self.url)}") from None
        return self._items.popleft()

    def _receive(self, deadline: float, silence: str) -> memoryview:
        """What the camera sent next, read into the connection's buffer (good until the next read); ``SourceError``
        saying the camera ``silence`` when nothing came by ``deadline`` (monotonic), or when it closed.

        The socket blocks, with the kernel's receive timeout (``SO_RCVTIMEO``) set once and lowered only to end
        a wait at its deadline: a timeout set before every read cost a ``poll`` and an ``ioctl`` beside each."""
        while True:
            sock = self._sock
            if self._stop.is_set() or sock is None:
                raise SourceError(f"{self.name} closed")
            left = deadline - time.monotonic()
            if left <= 0:
                raise SourceError(f"{self.name} {silence}")
            wait = max(MIN_WAIT, min(left, WAKE_EVERY))
            try:
                if self._recv_timeout > left or self._recv_timeout < wait / 2:
                    self._recv_timeout = wait
                    _set_timeout(sock, socket.SO_RCVTIMEO, wait)
                size = sock.recv_into(self._buffer)
            except (BlockingIOError, TimeoutError):  # the receive timeout: the deadline is looked at again
                continue
            except OSError as exc:
                if self._stop.is_set():
                    raise SourceError(f"{self.name} closed") from None
                raise SourceError(f"{self.name} stopped delivering frames: {exc.strerror or exc}") from None
            if size:
                return self._buffer[:size]
            if self._stop.is_set():
                raise SourceError(f"{self.name} closed")
            try:
                self._reader.eof()
            except RtspError as exc:
                raise SourceError(f"{self.name}: {redact_text(str(exc), self.url)}") from None
            raise SourceError(f"{self.name} closed the connection")

    def read_packet(self) -> AccessUnit:
        """The next access unit, handed on at its last RTP packet."""
        if self._stop.is_set():
            raise SourceError(f"{self.name} closed")
        if self._pending:
            unit = self._pending.popleft()
            self._last_video_pts = unit.pts
            return unit
        depacketizer = self._depacketizer
        if depacketizer is None or self._sock is None:
            raise SourceError(f"{self.name} is not open")
        silence = self._video_silence
        while not self._units:
            if time.monotonic() >= self._keepalive_at:
                self._keepalive_at = time.monotonic() + self._keepalive_every
                self._send(self._keepalive_method, self._target)  # its answer is read, and dropped, below
            packets = depacketizer.packets
            if self._items:  # frames that came before an answer while opening, held aside: in order, first
                played = self._held(self._items.popleft(), depacketizer)
            else:
                data = self._receive(self._video_deadline, silence)
                try:
                    played = self._reader.feed_video(data, self._rtp_channel, depacketizer, self._audio is not None)
                except RtspError as exc:
                    raise SourceError(f"{self.name}: {redact_text(str(exc), self.url)}") from None
            if depacketizer.packets != packets:  # the video's (RTCP alone, a keep-alive's answer: not a camera)
                self._video_deadline = time.monotonic() + IO_TIMEOUT
            for frame in played.others:
                if frame.channel == self._audio_channel:
                    self._audio_in(frame.payload)
                elif frame.channel in self._rtcp_channels:
                    self._rtcp_in(frame.channel, frame.payload)
            self._units.extend(played.units)
            for error in played.errors:
                self._bad_packets.warn("%s: RTP packet dropped: %s", self.name, error)
            if depacketizer.resyncs != self._resyncs:
                self._resyncs = depacketizer.resyncs
                self._restarts.warn("%s restarted its RTP stream (new SSRC or sequence); from its next IDR", self.name)
        unit = self._units.popleft()
        self._last_video_pts = unit.pts
        return unit

    def _held(self, item: Response | rtspin.Interleaved, depacketizer: rtspin.H264Depacketizer) -> rtspin.Played:
        """A frame held aside while opening, as ``feed_video`` would have taken it."""
        played = rtspin.Played([], [], [])
        if isinstance(item, rtspin.Interleaved) and item.channel == self._audio_channel and self._audio is not None:
            self._audio_in(item.payload)
        elif isinstance(item, rtspin.Interleaved) and item.channel == self._rtp_channel:
            try:
                played.units += depacketizer.push(rtspin.parse_rtp(item.payload))
            except RtspError as exc:
                played.errors.append(str(exc))
        return played

    def unread(self, units: list[AccessUnit]) -> None:
        """Units read ahead (to decide passthrough or not) that the next reads give back first."""
        self._pending.extendleft(reversed(units))

    def read(self) -> CapturedFrame:
        """The next decoded picture (transcoding): the decoder is made, and PyAV imported, at the first."""
        import av

        if self._decoder is None:
            self._decoder = av.CodecContext.create("h264", "r")
            self._decoder.flags |= av.codec.context.Flags.low_delay
            self._sets = ParameterSets(h264.extradata_parameter_sets(self.extradata) if self.extradata else [])
        assert self._sets is not None
        while not self._frames:
            unit = self.read_packet()
            try:
                data, _ = self._sets.access_unit(unit.data)  # the SDP's parameter sets before each IDR
                self._frames.extend(self._decoder.decode(av.Packet(data)))
            except (H264Error, av.FFmpegError) as exc:
                log.debug("%s: undecodable unit: %s", self.name, exc)
        picture = self._frames.popleft()
        picture.pts = None
        return CapturedFrame(time.time(), picture=picture)

    # -- closing

    def close(self) -> None:
        """From the thread that reads it: TEARDOWN (best effort) and closed. From any other (a stalled camera,
        the worker stopping): its socket is shut for reading, which ends a read at once; its own thread closes it."""
        self._stop.set()
        sock = self._sock
        if sock is None:
            return
        if self._owner not in (None, threading.get_ident()):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)  # the read ends at once; TEARDOWN can still go out
            return
        if self._requests.session:
            with contextlib.suppress(OSError, SourceError):
                _set_timeout(sock, socket.SO_SNDTIMEO, TEARDOWN_TIMEOUT)
                self._send("TEARDOWN", self._target)
            self._requests.session = ""
        self._close_socket()
        self._decoder = None
        self._frames.clear()

    def _close_socket(self) -> None:
        self._items.clear()  # what the connection held, frames held aside included
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
