"""WebRTC viewers sharded over fan-out processes (``[webrtc] shards`` > 1): every core serves viewers.

The relay's one event loop used to packetize, encrypt and send for every
viewer of every stream: one core. With shards, each viewer's peer connection
lives in one of N processes (``python -m relay.webrtc.shard``), each with its
own event loop, ICE sockets and DTLS. The relay keeps what the user sees:
WHEP is checked here (access, limits, the offer) and handed to the
least-loaded shard, which answers; PATCH and DELETE go to the shard that holds
the session; the API's counts are the relay's. Each stream's hubs (video and
sound) get one subscriber per shard with viewers of it (``Feed``), which
writes each frame into that shard's pipe once, whatever its number of
viewers; its backlog is bounded and its drops counted by the hub's lag policy
like any subscriber's, the pipe's own buffer by ``FEED_HIGH_WATER``. A shard's
keyframe requests come back here and go to the worker through the stream's
hub, its share window and ``KeyframeGate``, as the relay's own viewers' did.

Each shard is a supervised child (``relay.supervise``: its own process group,
only ``relay.childenv``'s environment plus its ``ShardConfig``, restarted with
backoff, killed with the relay). One that dies takes only its own viewers:
their sessions end here (their DELETE gets 404, the counts drop), the pages
reconnect by themselves, and the other shards' viewers never notice.
``ViewerSessions`` in ``relay.webrtc.sessions`` is the same interface in one
process (``shards = 1``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import shardipc
from ..aio import cancel_and_wait, read_pipe, signal_group
from ..backoff import Retry
from ..config import IceServer, WebRTCConfig
from ..hub import EncodedFrame, HubClosed, PacketHub, Subscription
from ..ipc import ProtocolError
from ..logsafe import SECRET_FILTER, Throttled, redact
from ..supervise import Process, python_child
from .sessions import OfferRejected, SessionCounts, StreamViewers

log = logging.getLogger(__name__)
# A shard's log lines, whatever logger it says they came from (that name goes in the text): the relay's registry of
# loggers is not a shard's to grow.
shard_log = logging.getLogger("relay.webrtc.shard")

# Bytes of frames the relay holds for one shard's pipe before its feeds' frames wait in their hubs' backlogs
# (bounded by [video] max_lag, drops counted): about 2 s of a 2 Mbit/s stream, so a keyframe or a GC pause in the
# shard does not count as lag, while a shard that stops reading is past the lag limit within seconds.
FEED_HIGH_WATER = 512 * 1024
# Seconds a shard has to answer a request: an offer is answered once aiortc has gathered its candidates (a TURN
# server that does not answer holds it up to aioice's own timeouts, ~5 s a try); a shard that takes longer is
# stuck, and the viewer gets a 503 and retries.
REQUEST_TIMEOUT = 30.0
PIPE_LIMIT = 1 << 20  # the most one read of a shard's stdout takes
# A shard sends its figures every second (relay.webrtc.shard.STATS_INTERVAL); this long without a message from it,
# its event loop is stuck (or the process stopped): it is killed and restarted, its viewers reconnect elsewhere.
SHARD_STALL = 5.0
SHARD_STARTUP_GRACE = 20.0  # a fresh shard imports aiortc and PyAV first: seconds on a loaded Pi
WATCHDOG_PERIOD = 0.5
MAX_SHARDS = 64  # a Pi has 4 cores; more shards than this is a typo
# Log lines a shard may have the relay write a second (its sessions' lines when many viewers join at once fit); the
# rest are dropped and counted, so a shard that loops on an error cannot flood the relay's log.
LOG_LINES_PER_SECOND = 50
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{22}")  # a shard's session ids: secrets.token_urlsafe(16), as ViewerSessions'


def checked_stats(stats: shardipc.ShardStats, before: shardipc.ShardStats, named: set[str]) -> shardipc.ShardStats:
    """A shard's figures if they make sense (streams the relay named to it, counts that are whole, non-negative and
    never go down, at most ``REPORTED_DELAYS`` finite delays), else ``ProtocolError``: what a shard reports goes into
    the relay's own counters and the API, and one bad figure would poison them for good."""
    if not (_number(stats.cpu_seconds) and stats.cpu_seconds >= 0):
        raise ProtocolError(f"cpu_seconds {stats.cpu_seconds!r}")
    for name, figures in stats.streams.items():
        if name not in named:
            raise ProtocolError(f"figures of stream {name[:64]!r}, which it was never given")
        if not isinstance(figures, dict) or figures.keys() != shardipc.STATS_KEYS:
            raise ProtocolError(f"stream {name}: figures are not {sorted(shardipc.STATS_KEYS)}")
        old = before.streams.get(name, {})
        for key in (*shardipc.STATS_COUNTERS, *shardipc.STATS_GAUGES):
            value = figures[key]
            if type(value) is not int or value < 0:
                raise ProtocolError(f"stream {name}: {key} {value!r} is not a count")
            if key in shardipc.STATS_COUNTERS and value < old.get(key, 0):
                raise ProtocolError(f"stream {name}: {key} went down from {old[key]} to {value}")
        delays = figures["fanout_delays"]
        if not isinstance(delays, list) or len(delays) > shardipc.REPORTED_DELAYS:
            raise ProtocolError(f"stream {name}: fanout_delays is not a list of at most {shardipc.REPORTED_DELAYS}")
        if not all(_number(d) for d in delays):
            raise ProtocolError(f"stream {name}: fanout_delays holds something other than a finite number")
    return stats


def _number(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]


def shards_for(cores: int) -> int:
    """What ``[webrtc] shards = "auto"`` runs on a machine with ``cores`` cores.

    Two cores or fewer: 1, in the relay's process, as before shards: the camera workers' encoders, the relay's
    loop and the load need the second core, and two loops on two cores served fewer viewers than one
    (docs/benchmarks.md, "Fan-out shards"). More: one core for the relay and the camera workers, a shard on each
    of the others (a Pi 5: 3)."""
    return 1 if cores <= 2 else min(MAX_SHARDS, cores - 1)


class ShardUnavailable(Exception):
    """No shard is up to take a viewer (all restarting), or the one holding a session went away meanwhile."""


@dataclass(eq=False)
class RemoteSession:
    """A viewer's session held by a shard, as the relay knows it: enough for the limits, the API and WHEP."""

    id: str
    stream: str
    remote: str
    shard: int
    offer_sdp: str  # as the shard applied it: a trickled fragment's ICE credentials are checked against it
    created: float = field(default_factory=time.monotonic)
    connected_at: float | None = None
    candidates: int = 0  # remote candidates offered and trickled, as WHEP counts them (signalling.sdp.MAX_CANDIDATES)


class Feed:
    """One hub's frames to one shard: a subscriber of the hub that writes each frame into the shard's pipe.

    Not counted in the hub's ``delivered`` (the subscription's own count has them): that is frames handed to
    viewers, and the shard's viewers' come with its figures (``ShardedSessions.on_stats``).

    Live, frames are written as the hub publishes them (``Subscription.push``); while the pipe holds
    ``FEED_HIGH_WATER`` they wait in the subscription's backlog, where the lag policy bounds them."""

    def __init__(self, shard: ShardProcess, hub: PacketHub, kind: int, number: int) -> None:
        self.shard = shard
        self.hub = hub
        self.kind = kind
        self.number = number
        self.sub: Subscription = hub.subscribe(f"shard{shard.index}-{'video' if kind == shardipc.VIDEO else 'audio'}")
        self.sub.push = self._push
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{hub.stream} {self.sub.name}")

    def _push(self, frame: EncodedFrame) -> bool:
        if not self.shard.writable() or self.shard.buffered() >= FEED_HIGH_WATER:
            return False  # into the backlog: the feed's task writes it once the pipe drains (or the shard ends)
        self._write(frame)
        self.hub.delivered -= 1  # the hub counts it as taken (+1): the shard's figures count its viewers' takes
        return True

    def _write(self, frame: EncodedFrame) -> None:
        flags = (shardipc.FLAG_KEYFRAME if frame.keyframe else 0) | (shardipc.FLAG_CACHING if self.hub.caching else 0)
        self.shard.write(
            shardipc.pack(
                self.kind, frame.data, flags=flags, stream=self.number, pts=frame.pts,
                capture_time=frame.capture_time, published_at=frame.published_at,
            )
        )  # fmt: skip

    async def _run(self) -> None:
        try:
            while True:
                frame = await self.sub.get()
                self.hub.delivered -= 1  # as in _push: the stream's delivered is its viewers', not its feeds'
                self._write(frame)
                await self.shard.drain()
        except (HubClosed, ConnectionError, ShardUnavailable):
            pass

    async def close(self) -> None:
        self.sub.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class ShardProcess:
    """One fan-out process: its supervision, its pipe, its feeds and the requests waiting for its answers."""

    def __init__(self, pool: ShardedSessions, index: int, config: shardipc.ShardConfig, retry: Retry | None) -> None:
        self.pool = pool
        self.index = index
        self.child = python_child(
            f"shard={index}",
            "relay.webrtc.shard",
            (shardipc.SHARD_CONFIG_ENV, config.to_bytes().decode()),
            started=self._started,
            run=self._run,
            ended=self._ended,
            retry=retry,
            limit=PIPE_LIMIT,
        )
        self.up = False  # its process runs
        # It has spoken since it started (it sends its figures at once, once serving): before, it is still importing
        # aiortc and PyAV, and a viewer sent there would wait for it.
        self.ready = False
        self.feeds: dict[tuple[str, int], Feed] = {}
        self.named: set[str] = set()  # streams this process was told the number of
        self.stats = shardipc.ShardStats({}, 0.0)
        self.frames_dropped = 0  # by the relay's hubs for this shard's feeds, every process it ran
        self.stalls = 0  # times its watchdog killed it
        self._heard = 0.0  # monotonic time of its last message
        self._pending: dict[int, tuple[int, asyncio.Future[shardipc.Reply]]] = {}  # request -> its kind, its reply
        self._closing: list[Feed] = []
        self.clock = time.monotonic
        self._log_second = 0.0  # the second its log lines are counted in, and how many came in it
        self._log_lines = 0
        self._log_dropped = Throttled(log, interval=10.0)

    @property
    def pid(self) -> int | None:
        return self.child.pid

    def buffered(self) -> int:
        proc = self.child.proc
        if proc is None or proc.stdin is None:
            return 0
        return proc.stdin.transport.get_write_buffer_size()

    def writable(self) -> bool:
        proc = self.child.proc
        return self.up and proc is not None and proc.stdin is not None and not proc.stdin.is_closing()

    def write(self, data: bytes) -> None:
        if not self.writable():
            raise ShardUnavailable(f"shard {self.index} is not running")
        self.child.proc.stdin.write(data)  # type: ignore[union-attr]

    async def drain(self) -> None:
        proc = self.child.proc
        if proc is None or proc.stdin is None:
            raise ShardUnavailable(f"shard {self.index} is not running")
        await proc.stdin.drain()

    def feed(self, stream: str, hub: PacketHub, kind: int) -> None:
        """``hub``'s frames to this shard from now on, if they do not come already."""
        if (stream, kind) in self.feeds:
            return
        number = self.pool.number(stream)
        if stream not in self.named:
            self.write(shardipc.pack_json(shardipc.STREAM, shardipc.StreamName(number, stream)))
            self.named.add(stream)
        self.feeds[(stream, kind)] = Feed(self, hub, kind, number)

    async def unfeed(self, stream: str) -> None:
        """The stream closed: its feeds end."""
        for kind in (shardipc.VIDEO, shardipc.AUDIO):
            feed = self.feeds.pop((stream, kind), None)
            if feed is not None:
                self.frames_dropped += feed.sub.dropped
                await feed.close()

    async def request(self, kind: int, make: Callable[[int], object]) -> shardipc.Reply:
        """Send the request ``make(request number)`` and wait for its reply."""
        number = next(self.pool.requests)
        future: asyncio.Future[shardipc.Reply] = asyncio.get_running_loop().create_future()
        self._pending[number] = (kind, future)
        try:
            self.write(shardipc.pack_json(kind, make(number)))
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await future
        finally:
            self._pending.pop(number, None)

    def _started(self, proc: Process) -> None:
        assert proc.stdin is not None
        proc.stdin.transport.set_write_buffer_limits(high=FEED_HIGH_WATER)
        self.up = True
        self.ready = False
        self.named = set()
        self.stats = shardipc.ShardStats({}, 0.0)
        self._heard = time.monotonic() + SHARD_STARTUP_GRACE - SHARD_STALL
        log.info("shard=%d pid=%d started", self.index, proc.pid)

    async def _run(self, proc: Process) -> None:
        assert proc.stdout is not None
        watchdog = asyncio.get_running_loop().create_task(self._watchdog(proc))
        try:
            reader = shardipc.Reader(shardipc.MAX_SHARD_PAYLOAD)
            await read_pipe(proc.stdout, reader.feed, self._on_message, PIPE_LIMIT)
        except ProtocolError as exc:
            log.error("shard=%d broke the protocol (%s); restarting it", self.index, exc)
        finally:
            await cancel_and_wait(watchdog)

    async def _watchdog(self, proc: Process) -> None:
        """A shard that sends nothing (its figures come every second) for ``SHARD_STALL`` is stuck: killed, and
        restarted by its supervision like one that died."""
        while proc.returncode is None:
            await asyncio.sleep(WATCHDOG_PERIOD)
            silent = time.monotonic() - self._heard
            if silent > SHARD_STALL and proc.returncode is None:
                self.stalls += 1
                log.error("shard=%d sent nothing for %.1fs; killing it", self.index, silent)
                signal_group(proc, signal.SIGKILL)
                return

    def _on_message(self, msg: shardipc.Message) -> None:
        self._heard = time.monotonic()
        if not self.ready:
            self.ready = True
            log.info("shard=%d ready", self.index)
            self.pool.on_ready()
        try:
            self._handle(msg)
        except (ValueError, KeyError, TypeError) as exc:  # a body that is not its type's: the shard is broken
            raise ProtocolError(f"bad message {msg.kind}: {exc!r}"[:200]) from exc

    def _handle(self, msg: shardipc.Message) -> None:
        kind = msg.kind
        if kind == shardipc.REPLY:
            reply = shardipc.Reply.from_bytes(msg.payload)
            request, future = self._pending.get(reply.request, (0, None))
            if future is not None and not future.done():
                if request == shardipc.OFFER and reply.ok:
                    self.pool.claim(reply.session)
                future.set_result(reply)
        elif kind == shardipc.EVENT:
            self.pool.on_event(self, shardipc.SessionEvent.from_bytes(msg.payload))
        elif kind == shardipc.KEYFRAME:
            self.pool.on_keyframe_request(msg.stream, msg.flags)
        elif kind == shardipc.STATS:
            stats = checked_stats(shardipc.ShardStats.from_bytes(msg.payload), self.stats, self.named)
            self.pool.on_stats(self.stats, stats)
            self.stats = stats
        elif kind == shardipc.LOG:
            self._log(shardipc.LogLine.from_bytes(msg.payload))
        else:
            log.warning("shard=%d unexpected message type %d", self.index, kind)

    def _log(self, line: shardipc.LogLine) -> None:
        """A shard's log line, under ``shard_log`` (the shard's logger named in it), at a level from DEBUG to
        CRITICAL, at most ``LOG_LINES_PER_SECOND`` a second."""
        now = self.clock()
        if now - self._log_second >= 1.0:
            self._log_second, self._log_lines = now, 0
        self._log_lines += 1
        if self._log_lines > LOG_LINES_PER_SECOND:
            self._log_dropped.warn("shard=%d logs more than %d lines a second; the rest are dropped", self.index,
                                   LOG_LINES_PER_SECOND, now=now)  # fmt: skip
            return
        level = min(max(line.level, logging.DEBUG), logging.CRITICAL)
        text = redact(line.message[: shardipc.MAX_LOG_TEXT], SECRET_FILTER.secrets)
        shard_log.log(level, "[%s] %s", line.logger[:64], text)

    async def _ended(self, code: int | None) -> None:
        self.up = self.ready = False
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(ShardUnavailable(f"shard {self.index} ended"))
        for stream in {s for s, _ in self.feeds}:
            await self.unfeed(stream)
        self.pool.on_shard_ended(self, code)

    def figures(self) -> dict:
        """Its line of the API's ``shards``."""
        viewers = [s for s in self.pool.all_sessions() if s.shard == self.index]
        in_shard = sum(s["dropped"] + s["audio_dropped"] for s in self.stats.streams.values())
        return {
            "shard": self.index,
            "pid": self.pid,
            "up": self.ready,  # serving: started and heard from
            "restarts": self.child.restarts,
            "stalls": self.stalls,  # of those restarts, the ones its watchdog killed it for (stuck)
            "viewers": len(viewers),
            "viewers_connected": sum(1 for s in viewers if s.connected_at is not None),
            "cpu_seconds": self.stats.cpu_seconds,  # of the process running now
            "frames_dropped": {
                "pipe": self.frames_dropped + sum(f.sub.dropped for f in self.feeds.values()),
                "viewer_lag": in_shard,  # in the shard, by its viewers' backlogs (the process running now)
            },
        }


class ShardedSessions(SessionCounts):
    """Every WebRTC viewer of every stream, in fan-out shards: ``ViewerSessions``'s interface, for WHEP, the
    limits, the API and the streams' consumers."""

    def __init__(
        self,
        count: int,
        hub_for: Callable[[str], PacketHub],
        audio_for: Callable[[str], PacketHub | None],
        ice_servers: Callable[[], list[IceServer]],
        webrtc: WebRTCConfig,
        max_lag: float,
        log_level: str = "info",
        retry: Retry | None = None,
    ) -> None:
        self._hub_for = hub_for
        self._audio_for = audio_for
        self._ice_servers = ice_servers
        config = shardipc.ShardConfig(
            0, list(webrtc.ice_addresses), list(webrtc.additional_hosts), webrtc.connect_timeout, webrtc.batch_sends,
            list(webrtc.playout_delay or ()), max_lag, log_level, webrtc.c_send, webrtc.c_batch,
        )  # fmt: skip
        self.processes = [ShardProcess(self, i, dataclasses.replace(config, index=i), retry) for i in range(count)]
        self.requests = itertools.count(1)
        self._numbers: dict[str, int] = {}
        self._sessions: dict[str, RemoteSession] = {}
        self._creating: set[RemoteSession] = set()
        self._claimed: set[str] = set()  # session ids a shard answered with, until their offer's create stores them
        self._waiting: set[asyncio.Future[None]] = set()  # offers waiting for a shard to be ready

    def claim(self, session_id: str) -> None:
        """A shard answered an offer with ``session_id``: ``ProtocolError`` unless it is one a shard could have made
        (its URL's last part) and no other session's."""
        if not SESSION_ID.fullmatch(session_id):
            raise ProtocolError(f"session id {session_id[:64]!r} is not one a shard makes")
        if session_id in self._sessions or session_id in self._claimed:
            raise ProtocolError(f"session id {session_id[:8]} is another session's")
        self._claimed.add(session_id)

    async def start(self) -> None:
        for shard in self.processes:
            shard.child.supervise()
        log.info("webrtc shards=%d: viewers served by fan-out processes", len(self.processes))

    def number(self, stream: str) -> int:
        return self._numbers.setdefault(stream, len(self._numbers))

    def connected(self, stream: str | None = None) -> int:
        return sum(
            1 for s in self._sessions.values() if s.connected_at is not None and (stream is None or s.stream == stream)
        )

    def _least_loaded(self) -> ShardProcess:
        up = [shard for shard in self.processes if shard.ready and shard.writable()]
        if not up:
            raise ShardUnavailable("no fan-out shard is running (restarting)")
        load = {shard.index: 0 for shard in up}
        for s in self.all_sessions():
            if s.shard in load:
                load[s.shard] += 1
        return min(up, key=lambda shard: (load[shard.index], shard.index))

    async def _ready_shard(self) -> ShardProcess:
        """The least-loaded ready shard; while there is none (the relay starting, every shard restarting), the
        first to be ready, up to ``SHARD_STARTUP_GRACE``, else ``ShardUnavailable``."""
        try:
            async with asyncio.timeout(SHARD_STARTUP_GRACE):
                while True:
                    try:
                        return self._least_loaded()
                    except ShardUnavailable:
                        pass
                    waiter = asyncio.get_running_loop().create_future()
                    self._waiting.add(waiter)
                    try:
                        await waiter
                    finally:
                        self._waiting.discard(waiter)
        except TimeoutError:
            raise ShardUnavailable("no fan-out shard is ready (starting or restarting)") from None

    def on_ready(self) -> None:
        for waiter in self._waiting:
            if not waiter.done():
                waiter.set_result(None)

    async def create(
        self, stream: str, offer_sdp: str, remote: str, audio: PacketHub | None = None
    ) -> tuple[RemoteSession, str]:
        """The least-loaded shard answers the offer; ``OfferRejected`` for an offer it cannot take, else
        ``ShardUnavailable`` or ``TimeoutError`` (a 503)."""
        hub = self._hub_for(stream)
        shard = await self._ready_shard()
        placeholder = RemoteSession("", stream, remote, shard.index, offer_sdp)
        self._creating.add(placeholder)
        try:
            shard.feed(stream, hub, shardipc.VIDEO)
            if audio is not None:
                shard.feed(stream, audio, shardipc.AUDIO)
            servers = [[list(s.urls), s.username, s.credential] for s in self._ice_servers()]
            reply = await shard.request(
                shardipc.OFFER, lambda n: shardipc.Offer(n, stream, offer_sdp, remote, audio is not None, servers)
            )
        finally:
            self._creating.discard(placeholder)
        if not reply.ok:
            if reply.rejected:
                raise OfferRejected(reply.error)
            raise ShardUnavailable(f"shard {shard.index} could not set up the session: {reply.error}")
        self._claimed.discard(reply.session)
        session = RemoteSession(reply.session, stream, remote, shard.index, offer_sdp)
        self._sessions[session.id] = session
        log.info(
            "stream=%s session=%s remote=%s created viewers=%d shard=%d",
            stream, session.id[:8], remote, self.count(stream), shard.index,
        )  # fmt: skip
        return session, reply.sdp

    async def add_candidates(self, session: RemoteSession, sdpfrag: str) -> None:
        """Trickled candidates, to the shard that holds the session (``ViewerSessions.add_candidates``)."""
        shard = self.processes[session.shard]
        reply = await shard.request(shardipc.TRICKLE, lambda n: shardipc.Trickle(n, session.id, sdpfrag))
        if not reply.ok:
            if reply.rejected:
                raise OfferRejected(reply.error)
            raise ShardUnavailable(f"shard {shard.index}: {reply.error}")  # the session ended there meanwhile

    async def close(self, session_id: str, why: str) -> bool:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        log.info(
            "stream=%s session=%s closed (%s) viewers=%d shard=%d",
            session.stream, session_id[:8], why, self.count(session.stream), session.shard,
        )  # fmt: skip
        shard = self.processes[session.shard]
        if shard.up:
            try:
                await shard.request(shardipc.HANGUP, lambda n: shardipc.Hangup(n, session_id, why))
            except (ShardUnavailable, TimeoutError):
                pass  # it ended meanwhile: so did the session
        return True

    def for_stream(self, stream: str) -> StreamViewers:
        return StreamViewers(self, stream)  # type: ignore[arg-type]

    async def close_stream(self, stream: str, why: str) -> None:
        await asyncio.gather(*(self.close(s.id, why) for s in list(self._sessions.values()) if s.stream == stream))
        for shard in self.processes:
            await shard.unfeed(stream)

    async def close_all(self) -> None:
        await asyncio.gather(*(self.close(sid, "shutdown") for sid in list(self._sessions)))
        await asyncio.gather(*(shard.child.stop() for shard in self.processes))

    def on_event(self, shard: ShardProcess, event: shardipc.SessionEvent) -> None:
        session = self._sessions.get(event.session)
        if session is None or session.shard != shard.index:
            return  # closed here already (DELETE), or never answered
        if event.state == shardipc.CONNECTED:
            session.connected_at = time.monotonic()
        elif event.state == shardipc.CLOSED:
            del self._sessions[event.session]
            log.info(
                "stream=%s session=%s closed (%s) viewers=%d shard=%d",
                session.stream, session.id[:8], event.why, self.count(session.stream), shard.index,
            )  # fmt: skip

    def on_stats(self, before: shardipc.ShardStats, now: shardipc.ShardStats) -> None:
        """A shard's figures since its last: what its viewers took, dropped and resynced, and their fan-out delays,
        added to the stream's hubs, so the API's per-stream counts are every viewer's, as in one process."""
        for name, figures in now.streams.items():
            try:
                hub = self._hub_for(name)
            except KeyError:
                continue  # the stream closed meanwhile
            audio = self._audio_for(name)
            old = before.streams.get(name, {})
            hub.delivered += figures["delivered"] - old.get("delivered", 0)
            hub.batched += figures["batched"] - old.get("batched", 0)
            hub.dropped += figures["dropped"] - old.get("dropped", 0)
            hub.resyncs += figures["resyncs"] - old.get("resyncs", 0)
            hub.retransmits += figures["retransmits"] - old.get("retransmits", 0)
            hub.retransmits_refused += figures["retransmits_refused"] - old.get("retransmits_refused", 0)
            if audio is not None:
                audio.dropped += figures["audio_dropped"] - old.get("audio_dropped", 0)
            for seconds in figures["fanout_delays"]:
                hub.fanout_delay.add(seconds)

    def on_keyframe_request(self, number: int, flags: int) -> None:
        """A shard's ``KEYFRAME`` for the stream ``number``: laggards' and viewers' requests through the stream's
        gates here, so their limits hold across every shard; a join's as the relay's own joiners ask."""
        name = next((n for n, i in self._numbers.items() if i == number), None)
        if name is None:
            return
        try:
            hub = self._hub_for(name)
        except KeyError:
            return  # the stream closed meanwhile
        if flags & shardipc.FLAG_LAG:
            hub.keyframe_gate.ask(hub.clock())
        elif flags & shardipc.FLAG_VIEWER:
            hub.request_keyframe_for_viewer()
        else:
            hub.request_keyframe()

    def on_shard_ended(self, shard: ShardProcess, code: int | None) -> None:
        """Its viewers' sessions ended with it: out of the counts, their URLs 404; the other shards' go on."""
        gone = [s for s in self._sessions.values() if s.shard == shard.index]
        for s in gone:
            del self._sessions[s.id]
        if gone:
            log.warning(
                "shard=%d ended (code %s) with %d viewers; their sessions ended: %s",
                shard.index, code, len(gone), " ".join(f"stream={s.stream} session={s.id[:8]}" for s in gone[:10]),
            )  # fmt: skip

    def shards(self) -> list[dict]:
        """Per shard: pid, up, restarts, viewers, CPU seconds, frames dropped."""
        return [shard.figures() for shard in self.processes]


def cpu_count() -> int:
    """Cores this process may run on (its affinity: a pinned relay counts the cores it was given)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
