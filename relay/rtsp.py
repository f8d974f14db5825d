"""RTSP for NVR software: a supervised mediamtx, fed with the hub's H.264.

camrelay writes the mediamtx configuration itself (``render_config``, pure),
runs mediamtx in its own session and process group, restarts it with backoff
if it dies, and publishes every stream to it over RTSP/TCP from PyAV. Each
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
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import av
import psutil

from . import mux
from .aio import cancel_and_wait, run_owned
from .auth import write_private
from .backoff import Backoff, Retry
from .hub import EncodedFrame, HubClosed, PacketHub
from .logsafe import SECRET_FILTER, redact_text, redact_url
from .status import ConsumerStats
from .supervise import Child, Process

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
# RTP transport when publishing to our own mediamtx on loopback: UDP. Over TCP,
# FFmpeg's RTSP muxer leaves Nagle on (and offers no way to turn it off), so a
# small P-frame waits for the delayed ACK of the one before and reaches readers
# 40 ms late; measured p95 90 ms over TCP against 50 ms over UDP
# (benchmarks/rtsp_latency.py). Loopback UDP loses nothing. An external server
# (rtsp.publish_url) gets TCP, which crosses firewalls and lossy links.
LOOPBACK_PUBLISH_TRANSPORT = "udp"
# RTP packets mediamtx can forward as they are (it re-packs anything over 1440
# bytes; FFmpeg's default is 1460), with room for a tunnel's headers.
PUBLISH_PACKET_SIZE = 1400
REMOTE_PUBLISH_TRANSPORT = "tcp"
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
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), port), PROBE_TIMEOUT)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(f"OPTIONS rtsp://{host}:{port}/ RTSP/1.0\r\nCSeq: 1\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), PROBE_TIMEOUT)
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


class RtspPublisher:
    """Publishes one stream's hub to an RTSP server (mediamtx)."""

    def __init__(
        self,
        hub: PacketHub,
        url: str,
        fps: float,
        ready: asyncio.Event | None = None,
        transport: str = REMOTE_PUBLISH_TRANSPORT,
        live_alias: bool = False,
    ):
        self.hub = hub
        self.live_alias = live_alias  # the stream mediamtx also serves at /live
        self.url = url
        self.transport = transport
        self.fps = fps
        self.published = 0
        self.sessions = 0  # how many times a publish session was opened
        self.errors = 0
        self._ready = ready
        self._retry = Retry(Backoff(initial=PUBLISH_RETRY_DELAY, cap=PUBLISH_RETRY_CAP))
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # One thread for the muxer: a close never overlaps a write still running after a cancel.
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"rtsp-{hub.stream}")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"rtsp-publish-{self.hub.stream}")

    async def close(self) -> None:
        self._closing = True
        await cancel_and_wait(self._task)
        await asyncio.to_thread(self._io.shutdown)

    def stats(self) -> ConsumerStats:
        return ConsumerStats(
            {"rtsp_path": f"/{self.hub.stream}", "rtsp_live_alias": self.live_alias, "rtsp_published": self.published}
        )

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def _run(self) -> None:
        while not self._closing:
            if self._ready is not None:
                await self._ready.wait()
            sub = self.hub.subscribe(f"rtsp-{self.hub.stream}")
            try:
                await self._publish(sub)
            except HubClosed:
                return
            except (av.FFmpegError, OSError, mux.NoParameterSets) as exc:
                self.errors += 1
                log.warning(
                    "stream=%s rtsp publish to %s failed: %s; republishing",
                    self.hub.stream,
                    redact_url(self.url),
                    redact_text(str(exc), self.url),
                )
            finally:
                sub.close()
            await asyncio.sleep(self._retry.next_delay())

    async def _publish(self, sub) -> None:
        first = await sub.get()  # a new subscriber starts at a keyframe
        container = await run_owned(self._io, self._open, first, on_orphan=_close_quietly)
        try:
            self.sessions += 1
            log.info("stream=%s publishing rtsp to %s", self.hub.stream, redact_url(self.url))
            self._retry.attempt = 0
            base = first.pts
            frame = first
            while True:
                await self._call(mux.write, container, frame, base)
                self.published += 1
                frame = await sub.get()
        finally:
            await self._call(_close_quietly, container)

    def _open(self, first: EncodedFrame):
        options = {"rtsp_transport": self.transport, "pkt_size": str(PUBLISH_PACKET_SIZE)}
        container = av.open(self.url, "w", format="rtsp", options=options, timeout=5)
        try:
            mux.add_h264_stream(container, first, self.fps)  # the SDP's sprop-parameter-sets: the stream's own
            container.start_encoding()
        except BaseException:
            _close_quietly(container)
            raise
        return container


def _close_quietly(container) -> None:
    with contextlib.suppress(Exception):
        container.close()
