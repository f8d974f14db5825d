"""RTSP for NVR software: a supervised mediamtx, fed with the hub's H.264.

camrelay writes the mediamtx configuration itself (``render_config``, pure),
runs mediamtx in its own session and process group, restarts it with backoff
if it dies, and publishes every stream to it over RTSP/TCP (``RtspPublisher``:
ANNOUNCE, SETUP, RECORD and RTP interleaved on the connection, with the RTP
payloads the WebRTC viewers get; no muxer, no thread). Each
publisher is one more hub subscriber: when it lags it skips to the next
keyframe like any viewer, and it never delays the viewers.

mediamtx is camrelay's private part: its control API is off, and only camrelay
can publish, with a credential made anew at every start that lives in the
relay process and the 0600 config file alone. Other accounts on the machine
get what any RTSP reader gets: the streams, with the read credentials when
they are set.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import psutil

from . import h264, mux, rtspin
from .aio import cancel_and_wait
from .auth import write_private
from .backoff import Backoff, Retry
from .hub import EncodedFrame, HubClosed, PacketHub
from .logsafe import SECRET_FILTER, redact_text, redact_url
from .status import ConsumerStats
from .supervise import Child, Process
from .webrtc.rtpsend import payloads_for

log = logging.getLogger(__name__)
mtx_log = logging.getLogger("mediamtx")

LIVE_PATH = "live"  # the first stream is also at rtsp://host:port/live
READY_TIMEOUT = 10.0  # seconds mediamtx gets to answer on its RTSP port after starting
READY_POLL = 0.05  # seconds between looks while it starts
PROBE_TIMEOUT = 1.0  # seconds for one OPTIONS request to be answered
# camrelay's own mediamtx user: publishes every stream, and reads the first for /live.
PUBLISHER_USER = "camrelay"
PUBLISHER_SECRET_BYTES = 32  # 256 random bits; token_urlsafe's alphabet is one mediamtx takes as a plain password
# Reconnect pacing for a publisher whose mediamtx went away (it is restarted meanwhile).
PUBLISH_RETRY_DELAY = 0.5
PUBLISH_RETRY_CAP = 10.0  # a server that refuses us is asked again at most this far apart
# Publishing is RTP over the RTSP connection (TCP, interleaved), to our own mediamtx and to any other server
# alike, with Nagle off so each frame leaves at once. (FFmpeg's RTSP muxer, used before, leaves Nagle on over
# TCP, so camrelay published over UDP on loopback, where mediamtx logged "RTP packets lost" whenever the
# machine was busy: docs/benchmarks.md, "Many cameras".)
PUBLISH_PAYLOAD_TYPE = 96
# RTP packets mediamtx can forward as they are (it re-packs anything over 1440 bytes; FFmpeg's default is
# 1460), with room for a tunnel's headers: what a camera publishing through FFmpeg is told (the test cameras).
# camrelay's own packets are the WebRTC viewers' (about 1200 bytes), well within it.
PUBLISH_PACKET_SIZE = 1400
PUBLISH_TRACK = "trackID=0"  # the video track's control URL, relative to the stream's
# A stream with sound publishes its Opus as it is (RFC 7587), the packets the WebRTC viewers get: mediamtx passes
# Opus on, and ffmpeg (Frigate, go2rtc's ffmpeg source) and PyAV read and record it. opus/48000/2 whatever the
# channels: RFC 7587's only rtpmap; each packet's TOC byte says mono or stereo and decoders follow it.
PUBLISH_AUDIO_PAYLOAD_TYPE = 97
PUBLISH_AUDIO_TRACK = "trackID=1"
OPUS_CLOCK = mux.OPUS_CLOCK  # Opus's RTP clock: the audio hub's pts
VIDEO_CLOCK = 90_000
# RTCP sender reports map each track's RTP clock onto the capture clock, so readers (ffmpeg, through mediamtx's
# own reports built from ours) put sound and picture in sync; one a second per track, as WebRTC's FrameSender does.
SENDER_REPORT_INTERVAL = 1.0  # seconds of capture time
NTP_EPOCH = 2_208_988_800  # seconds from 1900 (NTP) to 1970 (Unix)
SENDER_REPORT = struct.Struct("!BBHIIIIII")  # V=2 RC=0, PT=200, length, SSRC, NTP s, NTP frac, RTP ts, packets, octets
RTSP_DEFAULT_PORT = 554
PUBLISH_USER_AGENT = "camrelay"
PUBLISH_REQUEST_TIMEOUT = 5.0  # seconds to connect, and for each answer to ANNOUNCE, SETUP and RECORD
PUBLISH_CLOSE_TIMEOUT = 1.0  # seconds a closing connection may take; TEARDOWN's answer is not awaited
# Bytes queued for the server before the publisher waits: a few 1080p keyframes (100-300 KiB each), so a
# keyframe never waits on its own, and a server that stops reading is noticed within PUBLISH_STALL.
PUBLISH_WRITE_BUFFER = 2 * 2**20
PUBLISH_STALL = 5.0  # seconds a server may take nothing before the session ends and is opened again
PUBLISH_KEEPALIVE_FRACTION = 0.5  # of the session's timeout: an OPTIONS long before a server would drop us
PUBLISH_READ_BYTES = 64 * 1024  # what the server sends back: answers and RTCP receiver reports
INTERLEAVED = struct.Struct("!cBH")  # "$", channel, length (RFC 2326 10.12)
RTP = struct.Struct("!BBHII")  # version and flags, marker and payload type, sequence, timestamp, SSRC
# The largest RTP payload an interleaved frame holds (its length is 16 bits, the RTP header in it): a NAL unit up to
# this goes to mediamtx whole, in one packet (``whole_nals``).
WHOLE_NAL_MAX = 0xFFFF - RTP.size
EVERY_INTERFACE = ("", "0.0.0.0")  # rtsp.host values that mean "listen on every interface"
REPO_BIN = Path(__file__).resolve().parent.parent / "bin" / "mediamtx"
# An RTSP response's status line: "RTSP/1.0 200 OK".
RTSP_STATUS = re.compile(rb"RTSP/1\.0 (\d{3})(?: [^\r\n]*)?\r?\n?")


class RtspError(Exception):
    """mediamtx cannot run as configured; ``str()`` says what to do."""


@dataclass(frozen=True, slots=True)
class MediamtxSettings:
    host: str  # "" or "0.0.0.0": every interface
    port: int
    rtp_port: int
    rtcp_port: int
    user: str = ""
    password: str = ""
    log_level: str = "info"
    threads: int = 0  # GOMAXPROCS (``[rtsp] mediamtx_threads``); 0: Go's default, one per core


def render_config(settings: MediamtxSettings, streams: list[str], publisher_secret: str) -> str:
    """mediamtx's configuration for these streams. JSON, which is YAML, so no YAML writer is needed.

    Two users, and no other permission: camrelay (``PUBLISHER_USER`` with ``publisher_secret``) publishes and
    reads; readers read, with ``settings.user`` and the password's hash when set, else anyone.
    """
    host = "" if settings.host in EVERY_INTERFACE else settings.host
    reader = {"user": "any", "pass": ""}
    if settings.user:
        reader = {"user": settings.user, "pass": password_hash(settings.password)}
    users = [
        {"user": PUBLISHER_USER, "pass": publisher_secret, "ips": [],
         "permissions": [{"action": "publish"}, {"action": "read"}]},
        {**reader, "ips": [], "permissions": [{"action": "read"}]},
    ]  # fmt: skip
    paths: dict[str, dict] = {name: {"source": "publisher"} for name in streams}
    paths["all_others"] = {"source": "publisher"}  # streams added later (a camera plugged in)
    if streams:
        # mediamtx pulls the first stream as camrelay: the readers' password is in no path.
        source = f"{publisher_base(settings, publisher_secret)}/{streams[0]}"
        paths[LIVE_PATH] = {"source": source, "sourceOnDemand": True}
    config = {
        "logLevel": {"debug": "debug", "info": "info", "warning": "warn", "error": "error"}[settings.log_level],
        "logDestinations": ["stdout"],
        "readTimeout": "10s",
        "writeTimeout": "10s",
        "authMethod": "internal",
        "authInternalUsers": users,
        "api": False,  # it could run commands; camrelay takes readiness from the RTSP port instead
        "metrics": False,
        "pprof": False,
        "playback": False,
        "rtsp": True,
        "rtspTransports": ["udp", "tcp"],
        "rtspEncryption": "no",
        "rtspAddress": f"{host}:{settings.port}",
        "rtpAddress": f"{host}:{settings.rtp_port}",
        "rtcpAddress": f"{host}:{settings.rtcp_port}",
        "rtspAuthMethods": ["basic"],
        "rtmp": False,
        "hls": False,
        "webrtc": False,
        "srt": False,
        "moq": False,
        "pathDefaults": {"source": "publisher", "overridePublisher": True},
        "paths": paths,
    }
    return json.dumps(config, indent=2) + "\n"


def password_hash(password: str) -> str:
    """``password`` as mediamtx checks it without keeping it (``sha256:`` and base64), whatever characters it has."""
    return "sha256:" + base64.b64encode(hashlib.sha256(password.encode()).digest()).decode()


def publisher_base(settings: MediamtxSettings, secret: str) -> str:
    """``rtsp://camrelay:<secret>@host:port``, where camrelay publishes (add ``/<stream>``); never to be logged."""
    return f"rtsp://{PUBLISHER_USER}:{secret}@{local_host(settings.host)}:{settings.port}"


def rtsp_status(line: bytes) -> int | None:
    """The status code of an RTSP response's first line (``RTSP/1.0 200 OK`` -> 200); None when it is not one."""
    match = RTSP_STATUS.fullmatch(line)
    return int(match[1]) if match else None


async def rtsp_answers(host: str, port: int) -> bool:
    """Whether an RTSP server at ``host`` (as in a URL) and ``port`` answers ``OPTIONS`` with 200."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):  # not wait_for: on 3.11 it can lose a cancellation (relay.aio)
            reader, writer = await asyncio.open_connection(host.strip("[]"), port)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(f"OPTIONS rtsp://{host}:{port}/ RTSP/1.0\r\nCSeq: 1\r\n\r\n".encode())
        async with asyncio.timeout(PROBE_TIMEOUT):
            line = await reader.readline()
    except (OSError, TimeoutError, ValueError):  # ValueError: a "line" longer than the reader's limit
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return rtsp_status(line) == 200


def local_host(host: str) -> str:
    """Where this machine reaches its own mediamtx: loopback, unless RTSP listens on one address only."""
    if host in EVERY_INTERFACE:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def find_mediamtx(configured: str) -> str:
    """The mediamtx binary: the configured path, else bin/mediamtx, else PATH."""
    if configured:
        if os.access(configured, os.X_OK):
            return configured
        raise RtspError(f"rtsp.mediamtx: {configured} is not an executable file")
    if os.access(REPO_BIN, os.X_OK):
        return str(REPO_BIN)
    found = shutil.which("mediamtx")
    if found:
        return found
    raise RtspError(
        "rtsp.mediamtx: mediamtx not found in bin/ or on PATH; run scripts/install-mediamtx,"
        " or set rtsp.enabled = false"
    )


def check_ports_free(settings: MediamtxSettings) -> None:
    """One clear error for a taken port, before mediamtx says it less clearly."""
    host = "" if settings.host in EVERY_INTERFACE else settings.host
    for key, port, kind in (
        ("rtsp.port", settings.port, socket.SOCK_STREAM),
        ("rtsp.rtp_port", settings.rtp_port, socket.SOCK_DGRAM),
        ("rtsp.rtcp_port", settings.rtcp_port, socket.SOCK_DGRAM),
    ):
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                raise RtspError(
                    f"{key}: port {port} is taken ({os.strerror(exc.errno or 0)}); is another mediamtx or"
                    f" camrelay running? Stop it, or choose another {key}"
                ) from None


class Mediamtx:
    """Runs and supervises one mediamtx process."""

    def __init__(self, binary: str, settings: MediamtxSettings, streams: list[str], state_dir: Path) -> None:
        self.binary = binary
        self.settings = settings
        self.streams = streams
        self.config_path = state_dir / "mediamtx.yml"
        self._secret = secrets.token_urlsafe(PUBLISHER_SECRET_BYTES)  # only camrelay publishes; new every start
        SECRET_FILTER.secrets.add(self._secret)
        self.ready = asyncio.Event()  # set while mediamtx is up and answering
        self._child = Child(
            "mediamtx",
            [binary, str(self.config_path)],
            env={"GOMAXPROCS": str(settings.threads)} if settings.threads else {},
            started=self._started,
            run=self._run,
            ended=self._ended,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            cwd=state_dir,
        )
        self._reader: asyncio.Task[None] | None = None
        self._last_lines: list[str] = []

    @property
    def pid(self) -> int | None:
        return self._child.pid

    @property
    def restarts(self) -> int:
        return self._child.restarts

    @property
    def publisher_base(self) -> str:
        """Where camrelay publishes, with its credential: ``rtsp://camrelay:<secret>@host:port``."""
        return publisher_base(self.settings, self._secret)

    async def start(self) -> None:
        """Write the config, start mediamtx, and wait until it answers on its RTSP port; raises ``RtspError``."""
        # 0600: it holds camrelay's publish credential and the read password's hash.
        write_private(self.config_path, render_config(self.settings, self.streams, self._secret))
        proc = await self._child.spawn()
        if not await self._wait_ready():
            code = proc.returncode
            last = self._last_lines[-1] if self._last_lines else "no output"
            await self._child.stop()
            raise RtspError(f"rtsp: mediamtx did not start (exit {code}): {last}")
        self.ready.set()
        log.info("mediamtx pid=%d serving rtsp on port %d", self.pid, self.settings.port)
        self._child.supervise()

    async def close(self) -> None:
        await self._child.stop()
        self.ready.clear()
        SECRET_FILTER.secrets.discard(self._secret)

    def _started(self, proc: Process) -> None:
        self._reader = asyncio.get_running_loop().create_task(self._pump_log(proc.stdout))

    async def _run(self, proc: Process) -> None:
        """Until it exits; one started again must answer first, else it is stopped (and started once more)."""
        if not self.ready.is_set():
            if not await self._wait_ready():
                log.error("mediamtx did not answer after restart %d; stopping it to try again", self.restarts)
                await self._child.stop_process(proc)
                return
            self.ready.set()
            log.info("mediamtx pid=%d back up after restart %d", self.pid, self.restarts)
        await proc.wait()

    async def _ended(self, code: int | None) -> None:
        self.ready.clear()
        await self._reader

    async def _pump_log(self, stream: asyncio.StreamReader | None) -> None:
        assert stream is not None
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            self._last_lines = (self._last_lines + [text])[-20:]
            level = logging.INFO
            if " ERR " in text:
                level = logging.ERROR
            elif " WAR " in text:
                level = logging.WARNING
            elif " DEB " in text:
                level = logging.DEBUG
            mtx_log.log(level, "%s", text.split(" ", 2)[-1] if text[:4].isdigit() else text)

    async def _wait_ready(self) -> bool:
        """True once this mediamtx listens on the RTSP port and answers there; False if it exits or takes too long."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            proc = self._child.proc
            if proc is None or proc.returncode is not None:
                return False
            if self._listens() and await rtsp_answers(local_host(self.settings.host), self.settings.port):
                return True
            await asyncio.sleep(READY_POLL)
        return False

    def _listens(self) -> bool:
        """Whether the RTSP port is this mediamtx's. A program another user put on it while mediamtx was
        down would answer OPTIONS too, and must never be sent the publish credential."""
        try:
            sockets = psutil.Process(self.pid).net_connections("tcp")
        except psutil.Error:
            return False
        return any(s.status == psutil.CONN_LISTEN and s.laddr.port == self.settings.port for s in sockets)


class PublishError(Exception):
    """The RTSP server refused or dropped a publish session, or never answered."""


def announce_sdp(sets: bytes, fps: float, audio: bool = False) -> bytes:
    """ANNOUNCE's SDP for a stream whose parameter sets (Annex B SPS and PPS) are ``sets``: one H.264 track,
    ``sprop-parameter-sets`` and ``profile-level-id`` from the stream's own SPS, so readers are told what
    they will get; with ``audio``, an Opus track beside it. ``NoParameterSets`` when there is no SPS and PPS to
    describe it with."""
    nals = h264.split_annexb(sets)
    sps = next((n for n in nals if h264.nal_type(n) == 7), None)
    pps = next((n for n in nals if h264.nal_type(n) == 8), None)
    if sps is None or pps is None or len(sps) < 4:
        raise mux.NoParameterSets("the stream's first keyframe has no SPS and PPS")
    sprop = ",".join(base64.b64encode(n).decode() for n in (sps, pps))
    lines = [
        "v=0",
        "o=- 0 0 IN IP4 127.0.0.1",
        "s=camrelay",
        "c=IN IP4 0.0.0.0",
        "t=0 0",
        f"m=video 0 RTP/AVP {PUBLISH_PAYLOAD_TYPE}",
        f"a=rtpmap:{PUBLISH_PAYLOAD_TYPE} H264/90000",
        f"a=fmtp:{PUBLISH_PAYLOAD_TYPE} packetization-mode=1; profile-level-id={sps[1:4].hex()};"
        f" sprop-parameter-sets={sprop}",
        f"a=framerate:{fps:g}",
        f"a=control:{PUBLISH_TRACK}",
    ]
    if audio:
        lines += [
            f"m=audio 0 RTP/AVP {PUBLISH_AUDIO_PAYLOAD_TYPE}",
            f"a=rtpmap:{PUBLISH_AUDIO_PAYLOAD_TYPE} opus/{OPUS_CLOCK}/2",
            f"a=control:{PUBLISH_AUDIO_TRACK}",
        ]
    return ("\r\n".join(lines) + "\r\n").encode()


def whole_nals(frame: EncodedFrame) -> list[bytes | memoryview]:
    """RTP payloads of a unit whose NAL units' places its worker gave (``EncodedFrame.nals``): each NAL unit whole in
    one (RFC 6184 single NAL unit packets; views of the unit), in FU-A fragments past ``WHOLE_NAL_MAX``. In the
    viewers' 1.1 kB payloads a 1080p unit of 17 kB was 16 packets, which mediamtx read in 4 KiB pieces, and
    the relay framed one by one; whole, it is one or two. Found by scanning, the NAL units cost the relay what
    mediamtx saved (docs/benchmarks.md, "Tried and dropped: each NAL unit published whole")."""
    assert frame.nals is not None
    out: list[bytes | memoryview] = []
    step = WHOLE_NAL_MAX - 2  # a fragment's bytes of the NAL unit: its FU indicator and header before them
    for nal in h264.nals_at(frame.data, frame.nals):
        if len(nal) <= WHOLE_NAL_MAX:
            out.append(nal)
            continue
        indicator, kind = nal[0] & 0xE0 | rtspin.NAL_FU_A, nal[0] & 0x1F
        for at in range(1, len(nal), step):  # the NAL unit's header byte is in the indicator and header
            flags = (0x80 if at == 1 else 0) | (0x40 if at + step >= len(nal) else 0)
            out.append(bytes((indicator, flags | kind)) + nal[at : at + step])
    return out


class RtpFramer:
    """A publish session's RTP of one track over the RTSP connection (RFC 2326 10.12): each frame's RTP payloads
    as one run of interleaved frames, with this track's SSRC, sequence numbers and timestamps; and its RTCP sender
    reports on the next channel, each pairing a frame's RTP timestamp with its capture time."""

    def __init__(
        self, channel: int, ssrc: int, sequence: int, payload_type: int = PUBLISH_PAYLOAD_TYPE, clock: int = VIDEO_CLOCK
    ) -> None:
        self.channel, self.ssrc, self.sequence = channel, ssrc, sequence
        self.payload_type, self.clock = payload_type, clock
        self.packets = self.octets = 0  # sent, as sender reports count them
        self._reported_at: float | None = None  # capture time of the last sender report

    def frame(self, payloads: Sequence[bytes | memoryview], timestamp: int, capture_time: float | None = None) -> bytes:
        """The frame's RTP, preceded by a sender report when one is due (``capture_time`` given)."""
        out = []
        if capture_time is not None and (
            self._reported_at is None or capture_time - self._reported_at >= SENDER_REPORT_INTERVAL
        ):
            self._reported_at = capture_time
            out.append(self.sender_report(timestamp, capture_time))
        last = len(payloads) - 1
        for i, payload in enumerate(payloads):
            marker = 0x80 if i == last else 0
            out.append(INTERLEAVED.pack(b"$", self.channel, RTP.size + len(payload)))
            out.append(RTP.pack(0x80, marker | self.payload_type, self.sequence, timestamp & 0xFFFFFFFF, self.ssrc))
            out.append(payload)
            self.sequence = (self.sequence + 1) & 0xFFFF
            self.packets += 1
            self.octets += len(payload)
        return b"".join(out)

    def sender_report(self, timestamp: int, capture_time: float) -> bytes:
        """An RTCP SR (RFC 3550 6.4.1) saying RTP ``timestamp`` stands for wall-clock ``capture_time``."""
        ntp = capture_time + NTP_EPOCH
        seconds = int(ntp)
        fraction = int((ntp - seconds) * 2**32) & 0xFFFFFFFF
        report = SENDER_REPORT.pack(
            0x80, 200, SENDER_REPORT.size // 4 - 1, self.ssrc, seconds & 0xFFFFFFFF, fraction,
            timestamp & 0xFFFFFFFF, self.packets & 0xFFFFFFFF, self.octets & 0xFFFFFFFF,
        )  # fmt: skip
        return INTERLEAVED.pack(b"$", self.channel + 1, len(report)) + report


class RtspPublisher:
    """Publishes one stream's hub to an RTSP server (mediamtx): ANNOUNCE, SETUP and RECORD, then RTP over the
    same TCP connection (no Nagle: each frame leaves at once), packetized once for viewers and publisher alike.
    With an ``audio`` hub (a stream with sound), its Opus packets go as a second track on the same connection."""

    def __init__(
        self,
        hub: PacketHub,
        url: str,
        fps: float,
        ready: asyncio.Event | None = None,
        live_alias: bool = False,
        audio: PacketHub | None = None,
    ):
        self.hub = hub
        self.audio = audio
        self.audio_published = 0  # Opus packets written
        self.live_alias = live_alias  # the stream mediamtx also serves at /live
        self.url = url
        self.fps = fps
        self.published = 0
        self.pushed = 0  # of them, written as the hub published them (``Subscription.push``), no task woken
        self.sessions = 0  # how many times a publish session was opened
        self.errors = 0
        self._ready = ready
        self._retry = Retry(Backoff(initial=PUBLISH_RETRY_DELAY, cap=PUBLISH_RETRY_CAP))
        self._task: asyncio.Task[None] | None = None
        self._audio_task: asyncio.Task[None] | None = None  # the session's audio, when the stream has sound
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"rtsp-publish-{self.hub.stream}")

    async def close(self) -> None:
        self._closing = True
        await cancel_and_wait(self._task)

    def stats(self) -> ConsumerStats:
        return ConsumerStats(
            {
                "rtsp_path": f"/{self.hub.stream}",
                "rtsp_live_alias": self.live_alias,
                "rtsp_published": self.published,
                "rtsp_audio_published": self.audio_published,
            }
        )

    async def _run(self) -> None:
        while not self._closing:
            if self._ready is not None:
                await self._ready.wait()
            sub = self.hub.subscribe(f"rtsp-{self.hub.stream}")
            started = time.monotonic()
            try:
                await self._publish(sub)
            except HubClosed:
                return
            except Exception as exc:  # whatever a server sends or does, the next session is tried: never given up
                self.errors += 1
                reason = redact_text(str(exc) or type(exc).__name__, self.url)
                expected = isinstance(exc, (OSError, PublishError, rtspin.RtspError, mux.NoParameterSets))
                log.warning(
                    "stream=%s rtsp publish to %s failed: %s%s; republishing",
                    self.hub.stream,
                    redact_url(self.url),
                    "" if expected else f"{type(exc).__name__}: ",
                    reason,
                )
            finally:
                sub.close()
            self._retry.ran(time.monotonic() - started)  # a session that lasted resets the backoff; one cut short not
            await asyncio.sleep(self._retry.next_delay())

    async def _publish(self, sub) -> None:
        """One session, from the subscription's first frame (a keyframe) on. New parameter sets (a camera's
        new size) go in-band in front of their IDR, as the stream has them: mediamtx passes them on and its
        readers follow without a new session (tests/test_passthrough_out.py)."""
        first = await sub.get()
        sets = h264.parameter_sets(first.data) or b""
        sdp = announce_sdp(sets, self.fps, audio=self.audio is not None)
        async with _Connection(self.url) as conn:
            await conn.request("ANNOUNCE", conn.target, {"Content-Type": "application/sdp"}, sdp)
            channel = await conn.setup(PUBLISH_TRACK, 0)
            audio_channel = await conn.setup(PUBLISH_AUDIO_TRACK, 2) if self.audio is not None else None
            await conn.request("RECORD", conn.target)
            self.sessions += 1
            log.info(
                "stream=%s publishing rtsp to %s audio=%s",
                self.hub.stream, redact_url(self.url), "opus" if audio_channel is not None else "none",
            )  # fmt: skip
            framer = RtpFramer(channel, secrets.randbits(32), secrets.randbits(16))
            base, frame = first.pts, first
            if audio_channel is not None:
                assert self.audio is not None
                self._audio_task = asyncio.get_running_loop().create_task(
                    self._publish_audio(conn, audio_channel, first), name=f"rtsp-audio-{self.hub.stream}"
                )

            def write(frame: EncodedFrame) -> None:
                payloads = None
                if frame.nals is not None:
                    with contextlib.suppress(h264.H264Error):  # places that do not fit it: the viewers' payloads
                        payloads = whole_nals(frame)
                if payloads is None:
                    payloads = payloads_for(frame)
                conn.write(framer.frame(payloads, frame.pts - base, frame.capture_time))
                self.published += 1
                conn.keep_alive()

            def push(frame: EncodedFrame) -> bool:
                """The hub's synchronous delivery while this loop waits for a frame (``Subscription.push``):
                written there and then, no task woken. False while anything is unsent (the loop's drain and its
                stall deadline deal with a slow server) or once the connection failed (the loop meets it)."""
                if conn.backed_up():  # includes a failed connection, so the write below cannot fail on it
                    return False
                write(frame)
                self.pushed += 1
                return True

            sub.push = push
            try:
                while True:
                    write(frame)
                    await conn.drain()
                    frame = await sub.get()
            finally:
                await cancel_and_wait(self._audio_task)

    async def _publish_audio(self, conn: _Connection, channel: int, first: EncodedFrame) -> None:
        """The audio hub's Opus packets as the session's second track, for as long as the session lasts, their RTP
        timestamps counted from the audio captured with the session's first video frame. A failed connection ends
        it quietly: the video's loop meets the failure and opens the next session."""
        assert self.audio is not None
        framer = RtpFramer(channel, secrets.randbits(32), secrets.randbits(16), PUBLISH_AUDIO_PAYLOAD_TYPE, OPUS_CLOCK)
        sub = self.audio.subscribe(f"rtsp-audio-{self.hub.stream}")
        base: int | None = None
        try:
            while True:
                packet = await sub.get()
                if base is None:
                    base = mux.audio_base(packet, first)
                conn.write(framer.frame(payloads_for(packet), packet.pts - base, packet.capture_time))
                self.audio_published += 1
        except (HubClosed, PublishError):
            return
        finally:
            sub.close()


class _Connection:
    """One RTSP client connection to the server published to: requests answered in order (a 401 answered once
    with the URL's credentials, Basic or Digest), and the server's own frames read and dropped meanwhile (its
    RTCP receiver reports), so its writes never back up."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "rtsp" or not parts.hostname:
            raise PublishError(f"not an rtsp:// URL: {redact_url(url)}")
        self._host, self._port = parts.hostname, parts.port or RTSP_DEFAULT_PORT
        self._requests = rtspin.Requests(
            PUBLISH_USER_AGENT, unquote(parts.username or ""), unquote(parts.password or "")
        )
        self.target = rtspin.without_userinfo(url)  # no credentials on the wire
        self._reader = rtspin.Reader()
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._answers: asyncio.Queue[rtspin.Response] = asyncio.Queue()
        self._failed: BaseException | None = None
        self._waiting = False  # a request waits for its answer
        self._keepalive_every = rtspin.DEFAULT_SESSION_TIMEOUT * PUBLISH_KEEPALIVE_FRACTION
        self._keepalive_at = 0.0

    async def __aenter__(self) -> _Connection:
        async with asyncio.timeout(PUBLISH_REQUEST_TIMEOUT):  # not wait_for (relay.aio)
            stream, self._writer = await asyncio.open_connection(self._host, self._port)
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._writer.transport.set_write_buffer_limits(high=PUBLISH_WRITE_BUFFER)
        self._read_task = asyncio.get_running_loop().create_task(self._read(stream), name="rtsp-publish-read")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        writer = self._writer
        try:
            await cancel_and_wait(self._read_task)
        finally:  # also when we are cancelled: the socket never outlives its session
            if writer is not None:
                # A server that stopped reading leaves our buffer full: a close would wait to send it, forever.
                clean = exc_type in (None, asyncio.CancelledError) and not writer.transport.get_write_buffer_size()
                if clean and self._requests.session and not writer.is_closing():
                    with contextlib.suppress(Exception):  # best effort: the server ends the session on close anyway
                        self._send("TEARDOWN", self.target)
                if clean:
                    writer.close()
                else:
                    writer.transport.abort()
        if writer is not None:
            try:
                async with asyncio.timeout(PUBLISH_CLOSE_TIMEOUT):
                    await writer.wait_closed()
            except Exception:  # closing is best effort; what matters is that the socket goes
                writer.transport.abort()

    async def request(
        self, method: str, url: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> rtspin.Response:
        for attempt in range(2):
            self._send(method, url, headers, body)
            answer = await self._answer()
            if answer.status == 401 and attempt == 0 and self._requests.user:
                self._requests.challenged(answer)
                continue
            break
        if answer.status != 200:
            raise PublishError(f"{method} answered {answer.status} {answer.reason}".rstrip())
        session = answer.header("session")
        if session and not self._requests.session:
            self._requests.session, timeout = rtspin.parse_session(session)
            self._keepalive_every = timeout * PUBLISH_KEEPALIVE_FRACTION
            self._keepalive_at = time.monotonic() + self._keepalive_every
        return answer

    async def setup(self, track: str, channel: int) -> int:
        """SETUP of one announced track for recording, interleaved on ``channel`` (RTCP on the next); the channel
        the server chose."""
        setup = await self.request(
            "SETUP",
            f"{self.target}/{track}",
            {"Transport": f"RTP/AVP/TCP;unicast;interleaved={channel}-{channel + 1};mode=record"},
        )
        return rtspin.parse_interleaved(setup.header("transport") or "")[0]

    def write(self, data: bytes) -> None:
        if self._failed is not None:
            raise PublishError(f"connection lost: {self._failed}")
        assert self._writer is not None
        self._writer.write(data)

    def backed_up(self) -> bool:
        """Anything written is still unsent, or the connection failed."""
        return self._failed is not None or self._writer is None or self._writer.transport.get_write_buffer_size() > 0

    async def drain(self) -> None:
        """Waits only when the server is ``PUBLISH_WRITE_BUFFER`` bytes behind; a server that takes nothing
        for ``PUBLISH_STALL`` seconds ends the session (the hub drops for this publisher meanwhile)."""
        assert self._writer is not None
        if self._writer.transport.get_write_buffer_size() <= PUBLISH_WRITE_BUFFER:
            return  # below the high-water mark: nothing to wait for (and no timer task made each frame)
        try:
            # not wait_for: on 3.11 a stop (cancellation) that came as the drain ended was lost, and the session
            # went on publishing; the relay's close then waited for it forever (relay.aio)
            async with asyncio.timeout(PUBLISH_STALL):
                await self._writer.drain()
        except TimeoutError:
            raise PublishError(f"the server took nothing for {PUBLISH_STALL:g} s") from None

    def keep_alive(self) -> None:
        """An OPTIONS before the session's timeout runs out (servers other than mediamtx may want one); its
        answer is read and dropped."""
        now = time.monotonic()
        if now >= self._keepalive_at:
            self._keepalive_at = now + self._keepalive_every
            self._send("OPTIONS", self.target)

    def _send(self, method: str, url: str, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self.write(self._requests.make(method, url, headers, body))

    async def _answer(self) -> rtspin.Response:
        self._waiting = True
        try:
            while True:
                get = asyncio.ensure_future(self._answers.get())
                try:
                    done, _ = await asyncio.wait(
                        {get, self._read_task}, timeout=PUBLISH_REQUEST_TIMEOUT, return_when="FIRST_COMPLETED"
                    )
                finally:
                    get.cancel()
                if get not in done:
                    if self._failed is not None:
                        raise PublishError(f"connection lost: {self._failed}")
                    raise PublishError(f"no answer in {PUBLISH_REQUEST_TIMEOUT:g} s")
                answer = get.result()
                if answer.cseq in (None, self._requests.cseq):
                    return answer
        finally:
            self._waiting = False

    async def _read(self, stream: asyncio.StreamReader) -> None:
        try:
            while data := await stream.read(PUBLISH_READ_BYTES):
                for item in self._reader.feed(data):
                    if isinstance(item, rtspin.Response) and self._waiting:  # a keep-alive's answer: dropped
                        self._answers.put_nowait(item)
            self._reader.eof()
            self._failed = PublishError("the server closed the connection")
        except (OSError, rtspin.RtspError) as exc:
            self._failed = exc
