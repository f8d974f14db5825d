"""The HTTP server, bounded: what ``camrelay serve`` and the tests both run.

- **Header timeout.** A connection that has not sent a whole request head
  within ``http.header_timeout`` of connecting, or of its previous response,
  is closed: idle keep-alive connections and slowloris clients alike. This is
  aiohttp's own ``keepalive_timeout``, whose clock starts at connect and which
  only closes a connection waiting for its next request, so a response in
  progress (MJPEG, a download) is never cut.
- **Connection caps** (``ConnectionGuard``): one client address may hold
  ``http.max_connections_per_address`` (a trusted reverse proxy, which carries
  every client behind it, is not capped alone); a newcomer over that is closed at once.
  All clients together may hold ``http.max_connections`` (and never more than
  half the fd limit); at the cap the connection idle the longest makes room,
  so sockets that never send a request cannot lock a real viewer out. Only
  when every connection is busy is a newcomer refused.
- **Stalled responses.** A response in progress is never cut for taking long,
  but one whose unsent bytes have not moved for ``WRITE_STALL`` goes to a
  client that stopped reading: that connection is closed.
- **Quiet logs.** Malformed requests (a header line over 8190 bytes, a bad
  request line) and the event loop's own errors (``socket.accept()`` out of
  file descriptors) are one line a second with a count, never a traceback
  flood, and never the request's bytes (a token may be in them).
"""

from __future__ import annotations

import asyncio
import logging
import re
import resource
import socket
import sys
from collections import Counter, OrderedDict

try:  # Linux and the BSDs; elsewhere only asyncio's own buffer is checked
    import fcntl
    import termios
except ImportError:  # pragma: no cover
    fcntl = termios = None  # type: ignore[assignment]

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from relay.config import HttpConfig, parse_networks
from relay.logsafe import Throttled

from .forwarded import is_in

log = logging.getLogger(__name__)

# Half the fd limit at most for HTTP connections: the other half is for each
# WebRTC viewer's UDP socket(s), the camera workers' pipes, mediamtx's,
# recordings, and the up to ACCEPT_BACKLOG sockets one accept burst can hold
# before the ones it evicts are closed.
FD_SHARE = 2
ACCEPT_BACKLOG = 128  # aiohttp's default: connections the kernel queues before we accept them
SIOCOUTQ = getattr(termios, "TIOCOUTQ", None) if termios is not None else None  # bytes a socket has not sent yet
# A response in progress is never cut for taking long (MJPEG runs for hours), but one whose unsent
# bytes have not moved for this long goes to a client that stopped reading (or that pipelines
# requests and never reads the answers): it is closed, or it would hold its slot for ever.
WRITE_STALL = 30.0
SWEEP_INTERVAL = 5.0  # seconds between looks at the connections with a request in progress
# Seconds aiohttp goes on reading (and dropping) the rest of a body it answered without reading
# (413, 408, 401), so the client gets the answer rather than a reset; its default, 10 s, let a
# client trickling a refused body hold its connection that much longer.
LINGERING_TIME = 2.0
AIOHTTP_REQUEST_ERROR = "Error handling request from %s"  # aiohttp.server's message for a request it cannot parse
REASON = re.compile(r"[A-Za-z][A-Za-z0-9 ]{0,79}")  # a parse error's words, up to the quoted bytes of the request


def fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_fd_limit() -> None:
    """The soft fd limit up to the hard one (systemd's soft default is 1024), logged once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("fd limit stays at %d: cannot raise it to %d: %s", soft, hard, exc)
        return
    log.info("fd limit raised from %d to %d", soft, hard)


class ConnectionGuard:
    """Caps connections per client address and in all, making room from the idle ones.

    ``protocol()`` wraps each accepted connection's aiohttp protocol; ``middleware``
    marks a connection busy from the start of a request until its response is
    written (the request's task ends).
    """

    def __init__(self, limit: int, per_address: int, proxies: tuple = ()) -> None:
        self.limit = limit
        self.per_address = per_address
        self.proxies = proxies  # trusted reverse proxies: every client behind one shares its address
        self.open: dict[asyncio.BaseTransport, str] = {}  # transport -> client address
        self.per_client: Counter[str] = Counter()
        # The tasks of the requests in progress on a connection (pipelined ones overlap).
        self.busy: dict[asyncio.BaseTransport, set[asyncio.Task]] = {}
        self.idle: OrderedDict[asyncio.BaseTransport, None] = OrderedDict()  # idle the longest first
        self.over_address = Throttled(log)
        self.full = Throttled(log)
        self.evicted = Throttled(log)
        self.stalled = Throttled(log)
        self._unsent: dict[asyncio.BaseTransport, tuple[int, float]] = {}  # busy: (unsent bytes, since when)
        self._sweeper: asyncio.TimerHandle | None = None

    def protocol(self, factory) -> asyncio.Protocol:
        return _Guarded(self, factory)

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) else "?"
        if self.per_client[address] >= self.per_address and not is_in(address, self.proxies):
            self.over_address.warn("http refused connection from %s: per-address cap %d", address, self.per_address)
            return False
        if len(self.open) >= self.limit:
            if not self.idle:
                self.full.warn("http refused connection from %s: all %d connections busy", address, self.limit)
                return False
            # The longest idle, and among those one that has sent all of its last response, if any has.
            oldest = next((t for t in self.idle if not t.get_write_buffer_size()), None) or next(iter(self.idle))
            self.evicted.warn(
                "http closed idle connection from %s for one from %s: %d connections open",
                self.open[oldest],
                address,
                self.limit,
            )
            self.forget(oldest)
            oldest.abort()  # at once: a client that reads nothing must not keep the fd in a lingering close
        self.open[transport] = address
        self.per_client[address] += 1
        self.idle[transport] = None
        return True

    def start_sweeping(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep, loop)

    def stop_sweeping(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self.close_stalled(loop.time())
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep, loop)

    def close_stalled(self, now: float) -> None:
        """Close each busy connection whose unsent bytes have not moved for ``WRITE_STALL``."""
        for transport in list(self.busy):
            unsent = unsent_bytes(transport, transport.get_extra_info("socket"))
            seen = self._unsent.get(transport)
            if unsent == 0 or seen is None or seen[0] != unsent:
                self._unsent[transport] = (unsent, now)  # moving (or nothing to send): the clock starts again
            elif now - seen[1] >= WRITE_STALL:
                self.stalled.warn(
                    "http closed connection from %s: %d bytes unread for %.0fs",
                    self.open[transport],
                    unsent,
                    WRITE_STALL,
                )
                self._end(transport, self.busy[transport])

    def _end(self, transport: asyncio.BaseTransport, tasks: set[asyncio.Task]) -> None:
        """Cancel a connection's requests, then close it.

        Not the other way round: a transport aborted in the middle of a
        sendfile (aiohttp serves files so) leaves asyncio a stale selector
        entry, and the next connection given that fd number never reads.
        """
        self.forget(transport)
        left = set(tasks)

        def one_done(task: asyncio.Task) -> None:
            left.discard(task)
            if not left:
                transport.abort()

        for task in tasks:
            task.add_done_callback(one_done)
            task.cancel()

    def forget(self, transport: asyncio.BaseTransport) -> None:
        address = self.open.pop(transport, None)
        if address is None:
            return
        self.idle.pop(transport, None)
        self.busy.pop(transport, None)
        self._unsent.pop(transport, None)
        self.per_client[address] -= 1
        if not self.per_client[address]:
            del self.per_client[address]

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        transport = request.transport
        if transport in self.open:
            self.idle.pop(transport, None)
            # aiohttp runs each request in a task of its own that ends once the response is written.
            task = asyncio.current_task()
            self.busy.setdefault(transport, set()).add(task)
            task.add_done_callback(lambda _: self._done(transport, task))
        return await handler(request)

    def _done(self, transport: asyncio.BaseTransport, task: asyncio.Task) -> None:
        if transport not in self.busy:
            return  # closed meanwhile
        self.busy[transport].discard(task)
        if not self.busy[transport]:
            del self.busy[transport]
            self._unsent.pop(transport, None)
            self.idle[transport] = None  # the most recently idle: the last to make room


class _Guarded(asyncio.Protocol):
    """An accepted connection: admitted by the guard, then aiohttp's protocol; refused ones never reach aiohttp."""

    def __init__(self, guard: ConnectionGuard, factory) -> None:
        self.guard = guard
        self.factory = factory
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.guard.admit(transport):
            transport.abort()
            return
        self.transport = transport
        self.inner = self.factory()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None:
            self.guard.forget(self.transport)
            self.inner.connection_lost(exc)


GUARD = web.AppKey("connection_guard", ConnectionGuard)


class GuardedSite(web.BaseSite):
    """aiohttp's SockSite, with every accepted connection passed through the app's ``ConnectionGuard``."""

    __slots__ = ("_sock",)

    def __init__(self, runner: web.AppRunner, sock: socket.socket) -> None:
        super().__init__(runner, backlog=ACCEPT_BACKLOG)
        self._sock = sock

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        guard, server = self._runner.app[GUARD], self._runner.server
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: guard.protocol(server), sock=self._sock, backlog=self._backlog)
        guard.start_sweeping(loop)

    async def stop(self) -> None:
        self._runner.app[GUARD].stop_sweeping()
        await super().stop()


class RequestErrors(logging.Filter):
    """On aiohttp.server: a request it cannot parse becomes one throttled line, without traceback or bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.throttled = Throttled(log)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.msg != AIOHTTP_REQUEST_ERROR or not isinstance(exc, HttpProcessingError):
            return True  # a handler's bug (500): its traceback is needed, and SecretFilter redacts it
        if record.levelno < logging.WARNING:
            return True  # aiohttp's debug line for non-HTTP bytes (TLS to this port): seen only when asked for
        reason = REASON.match(exc.message or "")
        self.throttled.warn(
            "http bad request from %s: %s%s",
            record.args[0] if record.args else "?",
            type(exc).__name__,
            f": {reason.group(0).strip()}" if reason else "",
        )
        return False


REQUEST_ERRORS = RequestErrors()


def make_runner(app: web.Application, http: HttpConfig) -> web.AppRunner:
    """``app``'s runner with the bounds above; start it with ``start_site``."""
    fds = fd_limit()
    limit = min(http.max_connections, fds // FD_SHARE)
    app[GUARD] = guard = ConnectionGuard(limit, http.max_connections_per_address, parse_networks(http.trusted_proxies))
    app.middlewares.insert(0, guard.middleware)  # outermost: busy from the first middleware on
    logging.getLogger("aiohttp.server").addFilter(REQUEST_ERRORS)
    log.info(
        "http: at most %d connections (%d per address; fd limit %d), request headers due within %gs",
        limit,
        http.max_connections_per_address,
        fds,
        http.header_timeout,
    )
    return web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        keepalive_timeout=http.header_timeout,
        lingering_time=LINGERING_TIME,
    )


async def start_site(runner: web.AppRunner, sock: socket.socket) -> None:
    """Serve ``runner``'s app on the listening ``sock`` (which it then owns)."""
    await GuardedSite(runner, sock).start()


class LoopErrors:
    """The event loop's exception handler: one line a second at most, with a count, no traceback flood.

    ``socket.accept() out of system resource`` (out of fds) comes in thousands
    a second, each with a traceback that says nothing new. Other loop errors
    (a task's unretrieved exception) keep their traceback, once a second.
    """

    def __init__(self) -> None:
        self.accept = Throttled(log)
        self.other = Throttled(log)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        message = context.get("message", "event loop error")
        exc = context.get("exception")
        if message.startswith("socket.accept()"):
            self.accept.warn("http %s: %s", message, exc)
        else:
            what = exc if exc is not None else context.get("task", context.get("future", context.get("handle")))
            self.other.warn("event loop: %s: %r", message, what, exc_info=exc)


def throttle_loop_errors(loop: asyncio.AbstractEventLoop) -> None:
    loop.set_exception_handler(LoopErrors())


def unsent_bytes(transport, sock) -> int:
    """What is still waiting to reach a client: asyncio's buffer plus the kernel's send queue.

    A client that reads slowly shows up here long before the socket is full, so
    it gets the newest frame once it has taken the last one, instead of the
    kernel's buffers filling with seconds of old frames.
    """
    pending = transport.get_write_buffer_size() if transport is not None else 0
    if sock is not None and SIOCOUTQ is not None:
        try:
            buf = fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0")
            pending += int.from_bytes(buf, sys.byteorder)
        except (OSError, ValueError):  # the client is gone: the next write says so
            pass
    return pending
