"""A fan-out shard: a process of its own that serves some of the relay's WebRTC viewers (``[webrtc] shards``).

``python -m relay.webrtc.shard``, started and supervised by the relay
(``relay.webrtc.shards``). It has its own event loop, ICE sockets and DTLS;
each stream its viewers watch has a ``PacketHub`` here (and one for its sound),
fed from the relay's pipe on stdin, once per shard, and the session code runs
against it as it does in the relay (``ViewerSessions``, ``HubTrack``, the send
path, catch-up from the GOP cache, the lag policy). What it cannot decide
alone goes back on stdout (``relay.shardipc``): the answers to the relay's
requests, sessions connected and closed, keyframe requests (the relay asks
the worker, through its share window and ``KeyframeGate``), its figures once
a second and its log lines. Its stdin closed (the relay stopping it, or gone):
it ends every session and exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time

from aiortc import RTCIceServer

from .. import ipc, shardipc
from ..aio import read_pipe
from ..hub import DelayWindow, EncodedFrame, PacketHub
from ..lag import KeyframeGate
from ..logsafe import ForwardingHandler
from ..stream import AUDIO_QUEUE_FRAMES
from .sessions import OfferRejected, ViewerSession, ViewerSessions, process_patches

log = logging.getLogger("relay.webrtc.shard")  # not __name__: this module runs as __main__

READ_LIMIT = 1 << 20  # the most one read of the pipe takes (frames of every stream, the relay's requests)
STATS_INTERVAL = 1.0  # seconds between the figures sent to the relay: the API's refresh
REPORTED_DELAYS = shardipc.REPORTED_DELAYS


class Output:
    """The shard's stdout: whole messages, written from the event loop and, for log lines, any thread.

    Blocking writes: the relay reads this pipe all the time, and what goes here is small (answers, events,
    figures, log lines); never a frame."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self.broken = False

    def send(self, data: bytes) -> None:
        with self._lock:
            if self.broken:
                return
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError:
                self.broken = True  # the relay is gone: stdin ends too, and with it this process


class ReportedDelays(DelayWindow):
    """A hub's fan-out delays (each frame's publish in the relay to its send here, per viewer), also kept since the
    last report for the relay's own window (``take``): at most ``REPORTED_DELAYS`` a report, the first ones."""

    def __init__(self) -> None:
        super().__init__()
        self._fresh: list[float] = []

    def add(self, seconds: float) -> None:
        super().add(seconds)
        if len(self._fresh) < REPORTED_DELAYS:
            self._fresh.append(round(seconds, 5))

    def extend(self, seconds: list[float]) -> None:
        """A batch's delays (``rtpsend.push_batch``: one a viewer sent to), kept as ``add`` keeps each."""
        super().extend(seconds)
        room = REPORTED_DELAYS - len(self._fresh)
        if room > 0:
            self._fresh.extend(round(s, 5) for s in seconds[:room])

    def take(self) -> list[float]:
        fresh, self._fresh = self._fresh, []
        return fresh


class Shard:
    """The viewers' sessions of this shard and the hubs that feed them."""

    def __init__(self, config: shardipc.ShardConfig, out: Output) -> None:
        self.config = config
        self.out = out
        self.names: dict[int, str] = {}  # stream number -> name (shardipc.STREAM)
        self.hubs: dict[str, PacketHub] = {}
        self.audio: dict[str, PacketHub] = {}
        self.caching: dict[str, bool] = {}  # as the relay's latest frame of each stream says
        delay = tuple(config.playout_delay) if config.playout_delay else None
        self.sessions = ViewerSessions(
            self.hub_for,
            connect_timeout=config.connect_timeout,
            additional_hosts=tuple(config.additional_hosts),
            batch=config.batch_sends,
            playout_delay=delay,  # type: ignore[arg-type]
            on_change=self._changed,
        )
        self._numbers: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def hub_for(self, name: str) -> PacketHub:
        hub = self.hubs.get(name)
        if hub is None:
            hub = PacketHub(
                name,
                lambda: self._ask_keyframe(name, 0),
                cached_start=lambda: self.caching.get(name, False),
                max_lag=self.config.max_lag,
                share_window=ipc.KEYFRAME_MIN_INTERVAL,
            )
            # Laggards' and viewers' (PLI, FIR) requests go to the relay marked as such: its own gates decide (one a
            # second, all shards). A viewer's each goes up (a gate of no interval): the relay counts them.
            hub.keyframe_gate = KeyframeGate(lambda: self._ask_keyframe(name, shardipc.FLAG_LAG))
            hub.viewer_keyframe_gate = KeyframeGate(lambda: self._ask_keyframe(name, shardipc.FLAG_VIEWER), 0.0)
            hub.fanout_delay = ReportedDelays()  # its viewers' delays go to the relay's window too
            self.hubs[name] = hub
        return hub

    def audio_for(self, name: str) -> PacketHub:
        hub = self.audio.get(name)
        if hub is None:
            hub = self.audio[name] = PacketHub(name, lambda: None, max_frames=AUDIO_QUEUE_FRAMES)
        return hub

    def _ask_keyframe(self, name: str, flags: int) -> None:
        number = self._numbers.get(name)
        if number is not None:
            self.out.send(shardipc.pack(shardipc.KEYFRAME, b"", flags=flags, stream=number))

    def _changed(self, session: ViewerSession, state: str, why: str) -> None:
        self.out.send(shardipc.pack_json(shardipc.EVENT, shardipc.SessionEvent(session.id, state, why)))

    def on_message(self, msg: shardipc.Message) -> None:
        try:
            self._handle(msg)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("shard=%d bad message %d from the relay: %r", self.config.index, msg.kind, exc)

    def _handle(self, msg: shardipc.Message) -> None:
        kind = msg.kind
        if kind in (shardipc.VIDEO, shardipc.AUDIO):
            name = self.names.get(msg.stream)
            if name is None:
                return  # before its STREAM: the relay names each stream before its first frame
            keyframe = bool(msg.flags & shardipc.FLAG_KEYFRAME)
            if kind == shardipc.VIDEO:
                self.caching[name] = bool(msg.flags & shardipc.FLAG_CACHING)
                frame = EncodedFrame(msg.payload, msg.pts, keyframe, msg.capture_time)
                self.hub_for(name).publish(frame, now=msg.published_at)
            else:
                frame = EncodedFrame(msg.payload, msg.pts, True, msg.capture_time, payloads=[msg.payload])
                self.audio_for(name).publish(frame, now=msg.published_at)
        elif kind == shardipc.STREAM:
            named = shardipc.StreamName.from_bytes(msg.payload)
            self.names[named.number] = named.name
            self._numbers[named.name] = named.number
        elif kind == shardipc.OFFER:
            self._spawn(self._offer(shardipc.Offer.from_bytes(msg.payload)))
        elif kind == shardipc.TRICKLE:
            self._spawn(self._trickle(shardipc.Trickle.from_bytes(msg.payload)))
        elif kind == shardipc.HANGUP:
            self._spawn(self._hangup(shardipc.Hangup.from_bytes(msg.payload)))
        else:
            log.warning("shard=%d unexpected message type %d from the relay", self.config.index, kind)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _reply(self, reply: shardipc.Reply) -> None:
        self.out.send(shardipc.pack_json(shardipc.REPLY, reply))

    def _failed(self, request: int, what: str, exc: Exception) -> None:
        """Any error of a request is answered (else the relay would wait ``REQUEST_TIMEOUT`` for it, then 503): one
        line, no traceback (a viewer may repeat it), the error's type to the relay."""
        log.error("shard=%d could not %s: %s: %s", self.config.index, what, type(exc).__name__, str(exc)[:200])
        self._reply(shardipc.Reply(request, False, error=type(exc).__name__))

    async def _offer(self, offer: shardipc.Offer) -> None:
        try:
            servers = [
                RTCIceServer(urls=list(u), username=n or None, credential=c or None) for u, n, c in offer.ice_servers
            ]
            audio = self.audio_for(offer.stream) if offer.audio else None
            session, answer = await self.sessions.create(offer.stream, offer.sdp, offer.remote, audio, servers)
        except OfferRejected as exc:
            self._reply(shardipc.Reply(offer.request, False, error=str(exc), rejected=True))
            return
        except Exception as exc:  # ICE could not bind, DTLS setup failed, bad ICE servers: the relay answers 503
            self._failed(offer.request, f"set up a viewer session of stream={offer.stream}", exc)
            return
        self._reply(shardipc.Reply(offer.request, True, session=session.id, sdp=answer))

    async def _trickle(self, trickle: shardipc.Trickle) -> None:
        session = self.sessions.get(trickle.session)
        if session is None:
            self._reply(shardipc.Reply(trickle.request, False, error="no such session"))
            return
        try:
            await self.sessions.add_candidates(session, trickle.sdpfrag)
        except OfferRejected as exc:
            self._reply(shardipc.Reply(trickle.request, False, error=str(exc), rejected=True))
            return
        except Exception as exc:
            self._failed(trickle.request, f"add candidates to session={trickle.session[:8]}", exc)
            return
        self._reply(shardipc.Reply(trickle.request, True, session=session.id))

    async def _hangup(self, hangup: shardipc.Hangup) -> None:
        try:
            closed = await self.sessions.close(hangup.session, hangup.why)
        except Exception as exc:
            self._failed(hangup.request, f"close session={hangup.session[:8]}", exc)
            return
        self._reply(shardipc.Reply(hangup.request, closed, session=hangup.session))

    def stats(self) -> shardipc.ShardStats:
        streams = {}
        for name, hub in self.hubs.items():
            audio = self.audio.get(name)
            streams[name] = {
                "viewers": self.sessions.count(name),
                "connected": self.sessions.connected(name),
                "delivered": hub.delivered,
                "batched": hub.batched,
                "dropped": hub.dropped,
                "resyncs": hub.resyncs,
                "audio_dropped": audio.dropped if audio is not None else 0,
                # NACKs answered (video and sound), and refused: the relay adds them to the stream's video hub
                "retransmits": sum(h.retransmits for h in (hub, audio) if h is not None),
                "retransmits_refused": sum(h.retransmits_refused for h in (hub, audio) if h is not None),
                "fanout_delays": hub.fanout_delay.take(),  # type: ignore[attr-defined]
            }
        times = os.times()
        return shardipc.ShardStats(streams, round(times.user + times.system, 3))

    async def report(self) -> None:
        while True:  # the first at once: the relay sends it viewers once it has heard from it
            self.out.send(shardipc.pack_json(shardipc.STATS, self.stats()))
            await asyncio.sleep(STATS_INTERVAL)

    async def close(self) -> None:
        await self.sessions.close_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for hub in (*self.hubs.values(), *self.audio.values()):
            hub.close()


async def serve(config: shardipc.ShardConfig, out: Output) -> None:
    """Until stdin ends: the relay's frames and requests in, answers and events out."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    shard = Shard(config, out)
    delay = tuple(config.playout_delay) if config.playout_delay else None
    log.info(
        "shard=%d pid=%d serving: ice_addresses=%s playout_delay=%s",
        config.index, os.getpid(), ",".join(config.ice_addresses) or "all", delay,
    )  # fmt: skip
    with process_patches(tuple(config.ice_addresses), config.batch_sends, config.c_send, config.c_batch):
        reporting = loop.create_task(shard.report())
        try:
            await read_pipe(reader, shardipc.Reader().feed, shard.on_message, READ_LIMIT)
        except ipc.ProtocolError as exc:
            log.error("shard=%d the relay's pipe is corrupt (%s); ending", config.index, exc)
        finally:
            reporting.cancel()
            await asyncio.gather(reporting, return_exceptions=True)
            await shard.close()
            log.info("shard=%d stopped", config.index)


def main() -> int:
    config = shardipc.ShardConfig.from_bytes(os.environ.pop(shardipc.SHARD_CONFIG_ENV))
    out = Output(os.dup(1))
    os.dup2(2, 1)  # anything that prints goes to stderr, never into the relay's pipe
    root = logging.getLogger()
    root.handlers[:] = [
        ForwardingHandler(
            lambda level, name, msg: out.send(
                shardipc.pack_json(shardipc.LOG, shardipc.LogLine(level, name, msg[: shardipc.MAX_LOG_TEXT]))
            )
        )
    ]
    root.setLevel(config.log_level.upper())
    logging.getLogger("aioice").setLevel(logging.WARNING)
    logging.getLogger("aiortc").setLevel(logging.WARNING)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the relay decides when we stop (stdin closed, then SIGTERM)
    started = time.monotonic()
    asyncio.run(serve(config, out))
    log.debug("shard=%d ran %.0fs", config.index, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
