"""One system call per viewer per frame: datagrams sent in one event-loop step leave together.

aiortc sends each RTP packet with its own ``sendto``: a 720p keyframe is ~40
packets, so 30 viewers make ~1,200 system calls in a row, and on loopback or a
busy box each one can wake a receiver and hand it the CPU mid fan-out (a
profile of the relay at 30 viewers put half of its busy time in ``sendto``).

``Batcher`` collects what one socket sends during one pass of the event loop
and, at the end of that pass, writes runs of equal-size datagrams to the same
address with a single ``sendmsg`` using UDP generic segmentation offload
(``UDP_SEGMENT``, Linux 4.18+): the kernel cuts the buffer back into the same
datagrams. Paired with a packetizer that makes every fragment of a frame the
same size but the last (``relay.webrtc.rtpsend.payloads_for``), a frame is one or two
system calls per viewer. Where GSO is missing or refused, it sends datagram
by datagram as before, and says so once.

RTP does not wait for the end of the pass: a viewer's frame leaves a GSO run
at a time through ``send_run_at_once`` (``relay.webrtc.rtpsend``, which
protects a frame's packets side by side in one buffer) as soon as it is
protected, so viewer k's packets are on their way while viewer k+1's are
protected, instead of every viewer's waiting for the last viewer's to be
protected (at 64 viewers, the first would wait for the whole fan-out, about
4 ms at p95); what the socket's batcher already holds goes first. aioice's own data sends
(DTLS, RTCP) through ``PATCH``, process-wide on aioice's socket protocol
(``relay.webrtc.borrowed``), held while a relay with ``[webrtc] batch_sends`` on
runs. With it off, datagrams leave one system call each (``send_direct``).
"""

from __future__ import annotations

import array
import asyncio
import errno
import logging
import socket
import struct
import sys
import weakref

from . import borrowed

log = logging.getLogger(__name__)

UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # from linux/udp.h; older Pythons lack the name
SOL_UDP = getattr(socket, "SOL_UDP", 17)
MAX_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS
MAX_GSO_BYTES = 60_000  # stays under the 64 KiB an IP datagram may carry, headers included
_SEGMENT = struct.Struct("=H")  # UDP_SEGMENT's value: the size of each datagram but the last
# errnos that mean "this kernel does not do UDP GSO at all": fall back for good, process-wide.
GSO_UNSUPPORTED = {errno.ENOPROTOOPT, errno.EOPNOTSUPP}
# ... and "not on this route" (MTU below the segment size, IPsec, a device without
# checksum offload): that socket falls back, the others keep GSO.
GSO_REFUSED_HERE = {errno.EINVAL, errno.EIO, errno.EMSGSIZE}

_ATTR = "_camrelay_batcher"
_state = {"gso": sys.platform == "linux"}


def gso_everywhere() -> bool:
    """Whether this process still tries GSO on every socket (False once the kernel said it has none)."""
    return _state["gso"]


def gso_runs(sizes: list[int]) -> list[int]:
    """How many of ``sizes`` (datagrams in order, to one address) each GSO run takes: equal sizes, the last may
    be smaller, within the kernel's segment and byte limits."""
    counts: list[int] = []
    count = size = total = last = 0
    for n in sizes:
        if count and n <= size and last == size and count < MAX_SEGMENTS and total + n <= MAX_GSO_BYTES:
            count += 1
            total += n
            last = n
            continue
        if count:
            counts.append(count)
        count, size, total, last = 1, n, n, n
    if count:
        counts.append(count)
    return counts


def runs(datagrams: list[tuple[bytes, tuple]]) -> list[tuple[list[bytes], tuple]]:
    """Split datagrams, in order, into GSO runs: same address, equal sizes, the last may be smaller."""
    out: list[tuple[list[bytes], tuple]] = []
    i = 0
    while i < len(datagrams):
        addr = datagrams[i][1]
        j = i + 1
        while j < len(datagrams) and datagrams[j][1] == addr:
            j += 1
        same = [data for data, _ in datagrams[i:j]]
        k = 0
        for count in gso_runs([len(d) for d in same]):
            out.append((same[k : k + count], addr))
            k += count
        i = j
    return out


class Batcher:
    """What one datagram transport sends in one event-loop pass, written at the end of the pass."""

    def __init__(self, transport: asyncio.DatagramTransport) -> None:
        self.transport = transport
        # (data, addr, segment): one datagram (segment 0), or a run of datagrams of ``segment`` bytes (the last
        # may be shorter) joined already (``write_run``, while something was held)
        self.pending: list[tuple[bytes, tuple, int]] = []
        self.idle = True  # holds nothing (``pending`` empty): a C lane's guard (``lane_guards``)
        self._syscalls = 0
        self._datagrams = 0
        self.dropped = 0  # refused by the kernel (no route, not permitted): UDP, so gone
        self.gso = True  # False once this socket's route refused GSO (others may still take it)
        self._c_frames = 0  # frames sent through the C call (``c_route``; what C could not write went to ``write_run``)
        # What the C lanes on this socket wrote themselves (``rtpsend.push_batch``): datagrams, system calls and
        # frames, added in place from C (``borrowed.bind_lane``), counted in the totals below.
        self.c_written = array.array("q", [0, 0, 0])
        self._c_socket: tuple[int, int] | None = None  # (fd, family) of the transport's socket, for ``c_route``
        # A socket object on the transport's fd, made once (one a send was a tenth of the relay's time at 10
        # viewers); never closed by us: detached when this batcher goes, the fd stays asyncio's.
        self._sock: socket.socket | None = None
        self._fileno = -1  # _sock's descriptor, compared with the transport's before each write

    @property
    def datagrams(self) -> int:
        return self._datagrams + self.c_written[0]

    @property
    def syscalls(self) -> int:
        return self._syscalls + self.c_written[1]

    @property
    def c_frames(self) -> int:
        return self._c_frames + self.c_written[2]

    def send(self, data: bytes, addr: tuple) -> None:
        if not self.pending:
            _enlist(self)
            self.idle = False
        self.pending.append((data, addr, 0))

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        self.idle = True
        t = self.transport
        raw = t.get_extra_info("socket")
        if t.is_closing():
            # asyncio would still send what it was handed before close(); so do we
            # (a DTLS close_notify, an RTCP BYE), straight to the socket if it is open.
            if raw is not None and raw.fileno() >= 0:
                for data, addr in _datagrams(batch):
                    self._raw_send(raw, data, 0, addr)
            return
        if len(batch) == 1 and batch[0][2]:  # the usual pass: one viewer's frame, one run (or one Opus packet)
            data, addr, segment = batch[0]
            groups = [(data, segment, -(-len(data) // segment), addr)]
        else:
            groups = _groups(batch)
        for data, segment, count, addr in groups:
            self._write(raw, data, segment, count, addr)

    def write_run(self, data: bytes | memoryview, segment: int, addr: tuple, blocked: bool = False) -> None:
        """A run of datagrams of ``segment`` bytes (the last may be shorter) joined in ``data``, written now:
        after what the batcher holds (never reordered), else straight to the socket. ``data`` may be a view of
        the sender's buffer: what is kept is copied. ``blocked``: C's write of it just met a full socket buffer,
        so it goes to asyncio's queue without another segmented try (which would fail alike)."""
        # A failure is reported as the pass's flush reports one (``_flush_pass``), never raised into the sender:
        # its send loop would end, and the viewer's video with it.
        try:
            if self.pending or self.transport.is_closing():
                self.pending.append((bytes(data), addr, segment))  # still enlisted for the pass: a no-op there then
                self.flush()
                return
            self._write(None, data, segment, -(-len(data) // segment), addr, blocked)  # the transport is open
        except Exception as exc:
            _report(asyncio.get_running_loop(), exc)

    def c_route(self) -> tuple[int, int, bool] | None:
        """(socket descriptor, address family, segmented writes allowed) while a run written now may go straight
        to the socket from C (``borrowed.SrtpFrameWriter.send_frame``): this batcher holds nothing, nor asyncio's
        buffer, and the transport is open (so its descriptor is). None: through ``write_run`` then."""
        t = self.transport
        if self.pending or t.is_closing() or t.get_write_buffer_size():
            return None
        found = self._c_socket
        if found is None:
            sock = t.get_extra_info("socket")
            found = self._c_socket = (sock.fileno(), int(sock.family))
        return found[0], found[1], self.gso and _state["gso"]

    def written_from_c(self, datagrams: int, syscalls: int, frame: bool = True) -> None:
        """A frame's runs C wrote itself, counted as ``_write`` counts its own (its fallback's are counted there);
        ``frame``: it went through whole (else C wrote part of it before a failure)."""
        self._datagrams += datagrams
        self._syscalls += syscalls
        self._c_frames += frame

    def lane_guards(self, gso: bool) -> tuple:
        """What must still hold for a C lane bound now (``c_route``, segmented writes ``gso``) to write on this
        socket: this batcher holds nothing, and segmentation is as it was (``borrowed.bind_lane``'s guards)."""
        return (self.__dict__, "idle", True), (self.__dict__, "gso", self.gso), (_state, "gso", _state["gso"])

    def _write(self, raw, data: bytes, segment: int, count: int, addr: tuple, blocked: bool = False) -> None:
        """One GSO run of ``count`` datagrams to ``addr``: one segmented write where it can, else one at a time;
        ``blocked``: the socket's buffer was full a moment ago (C's write), so to asyncio's queue at once."""
        t = self.transport
        self._datagrams += count
        # Straight to the socket only while asyncio holds nothing queued for it: never reorder.
        if count > 1 and not blocked and self.gso and _state["gso"] and not t.get_write_buffer_size():
            done = self._raw_send(raw, data, segment, addr)
            if done is not None:
                self._syscalls += 1
                if not done:
                    self.dropped += count
                return
        for i in range(0, len(data), segment):
            t.sendto(data[i : i + segment], addr)  # asyncio queues on EAGAIN and reports errors to the protocol
        self._syscalls += count

    def _raw_send(self, raw, data: bytes, segment: int, addr: tuple) -> bool | None:
        """``data`` to ``addr`` on the socket itself (``raw``, the transport's; None while the transport is open:
        the socket object made at the first write serves, its descriptor the transport's while it is open): one
        datagram (``segment`` 0), or a segmented write of ``segment``-byte datagrams. True: sent. False: the kernel
        refused it for good (dropped). None: use asyncio's path instead."""
        sock = self._sock
        if raw is None and sock is None:
            raw = self.transport.get_extra_info("socket")
        if raw is not None and (sock is None or self._fileno != raw.fileno()):
            if sock is not None:
                sock.detach()
            sock = self._sock = socket.socket(raw.family, raw.type, raw.proto, fileno=raw.fileno())
            self._fileno = sock.fileno()
            sock.settimeout(0.0)  # never block the loop, whatever the process's default timeout
            weakref.finalize(self, sock.detach)  # never closes asyncio's fd, whenever this batcher goes
        try:
            if segment:
                _sendmsg_gso(sock, data, segment, addr)
            else:
                sock.sendto(data, addr)
            return True
        except (BlockingIOError, InterruptedError):
            return None  # asyncio's path queues them and waits for the socket
        except OSError as exc:
            if exc.errno in GSO_UNSUPPORTED:
                _state["gso"] = False
                log.info("udp segmentation offload unsupported (%s); sending datagram by datagram", exc)
                return None
            if exc.errno in GSO_REFUSED_HERE:
                self.gso = False  # this route (MTU, IPsec, device) will not take it; others may
                return None
            return False


# Per event loop, the batchers with datagrams waiting in its current pass, in the order they got their first: one
# callback at the end of the pass flushes them all, where a callback each was one more handle per viewer per frame.
_waiting: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[Batcher]] = weakref.WeakKeyDictionary()


def _enlist(batcher: Batcher) -> None:
    """``batcher`` is flushed at the end of this event-loop pass (it has just got its first datagram of it)."""
    loop = asyncio.get_running_loop()
    batchers = _waiting.get(loop)
    if batchers is None:
        batchers = _waiting[loop] = []
    if not batchers:
        loop.call_soon(_flush_pass, loop, batchers)
    batchers.append(batcher)


def _flush_pass(loop: asyncio.AbstractEventLoop, batchers: list[Batcher]) -> None:
    """Every batcher enlisted in the pass, in order; one that fails is reported as a callback's failure would be,
    and the others are flushed all the same."""
    _waiting[loop] = []  # a send from here on (a failure's handler) starts the next pass's list
    for batcher in batchers:
        try:
            batcher.flush()
        except Exception as exc:
            _report(loop, exc)


def _report(loop: asyncio.AbstractEventLoop, exc: Exception) -> None:
    """A batcher's write that failed, reported as a callback's failure would be (one place: the pass's flush and a
    frame written at once say it alike)."""
    loop.call_exception_handler({"message": "udp batch flush failed", "exception": exc})


def _groups(batch: list[tuple[bytes, tuple, int]]) -> list[tuple[bytes, int, int, tuple]]:
    """A batcher's pending sends as GSO runs, in order: (joined datagrams, segment size, datagrams, address).
    Single datagrams are grouped here (``runs``); runs made by the sender (``write_run``) stay as they are."""
    out: list[tuple[bytes, int, int, tuple]] = []
    singles: list[tuple[bytes, tuple]] = []

    def group_singles() -> None:
        out.extend((b"".join(g), len(g[0]), len(g), a) for g, a in runs(singles))
        singles.clear()

    for data, addr, segment in batch:
        if not segment:
            singles.append((data, addr))
            continue
        group_singles()
        out.append((data, segment, -(-len(data) // segment), addr))
    group_singles()
    return out


def _datagrams(batch: list[tuple[bytes, tuple, int]]) -> list[tuple[bytes, tuple]]:
    """A batcher's pending sends one datagram at a time."""
    return [
        (data[i : i + segment], addr) if segment else (data, addr)
        for data, addr, segment in batch
        for i in (range(0, len(data), segment) if segment else (0,))
    ]


def _sendmsg_gso(sock: socket.socket, data: bytes, segment: int, addr: tuple) -> None:
    sock.sendmsg([data], [(SOL_UDP, UDP_SEGMENT, _SEGMENT.pack(segment))], 0, addr)


def _batchable(transport) -> bool:
    """An asyncio datagram transport over a real socket (not, say, aioice's TURN relay transport).

    Duck-typed: asyncio's selector datagram transport does not subclass DatagramTransport on every Python.
    """
    return (
        hasattr(transport, "get_write_buffer_size")
        and hasattr(transport, "is_closing")
        and transport.get_extra_info("socket") is not None
    )


def send_now(protocol: asyncio.DatagramProtocol, data: bytes, addr: tuple) -> None:
    """Queue a datagram on ``protocol``'s socket for the end of this event-loop pass."""
    batcher = batcher_for(protocol)
    if batcher is None:
        protocol.transport.sendto(data, addr)
    else:
        batcher.send(data, addr)


def batcher_for(protocol: asyncio.DatagramProtocol) -> Batcher | None:
    """``protocol``'s batcher, made on its first send; None for a transport without a socket of its own (a TURN
    allocation: it has its own framing), sent to directly."""
    batcher = protocol.__dict__.get(_ATTR)
    if batcher is None or batcher.transport is not protocol.transport:
        if not _batchable(protocol.transport):
            return None
        batcher = Batcher(protocol.transport)
        setattr(protocol, _ATTR, batcher)
    return batcher


def send_run_at_once(protocol: asyncio.DatagramProtocol, data: bytes | memoryview, segment: int, addr: tuple) -> None:
    """A run of datagrams of ``segment`` bytes (the last may be shorter; ``gso_runs`` says what a run may hold),
    joined in ``data``, written now in one segmented write, after anything ``protocol``'s batcher already holds
    (never reordered): one viewer's frame is on its way while the next viewer's is protected, instead of every
    viewer's waiting for the last one's at the end of the pass. ``data`` may be a view of a buffer the caller
    reuses: nothing keeps it past the call (what has to wait is copied)."""
    batcher = batcher_for(protocol)
    if batcher is None:
        send_run_direct(protocol, data, segment, addr)
    else:
        batcher.write_run(data, segment, addr)


def send_direct(protocol: asyncio.DatagramProtocol, data: bytes, addr: tuple) -> None:
    """One datagram, one system call: as aioice sends, for the batcher's A/B (``[webrtc] batch_sends = false``)."""
    protocol.transport.sendto(data, addr)


def send_run_direct(protocol: asyncio.DatagramProtocol, data: bytes | memoryview, segment: int, addr: tuple) -> None:
    """A joined run of datagrams, one system call each (``send_direct``); each a copy of its part of ``data``
    (a TURN transport sends later, from a task of its own)."""
    for i in range(0, len(data), segment):
        protocol.transport.sendto(bytes(data[i : i + segment]), addr)


PATCH = borrowed.send_data_patch(send_now)  # aioice's own data sends, batched while held


def batcher_of(protocol: asyncio.DatagramProtocol) -> Batcher | None:
    return protocol.__dict__.get(_ATTR)
