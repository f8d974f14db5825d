"""A STUN server on loopback (RFC 8489 Binding requests only) for tests that hand viewers an ICE server.

The relay gathers with the ICE servers it hands its viewers, and one that never
answers would hold every answer for aioice's STUN timeout: this one answers, and
notes who asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aioice import stun


class StunServer(asyncio.DatagramProtocol):
    def __init__(self, answering: asyncio.Event | None = None) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.clients: set[tuple[str, int]] = set()  # the addresses Binding requests came from
        # Answers only once this is set (a slow server; its clients retransmit meanwhile); None: at once.
        self.answering = answering

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            request = stun.parse_message(data)
        except ValueError:
            return
        if request.message_method != stun.Method.BINDING or request.message_class != stun.Class.REQUEST:
            return
        self.clients.add(addr)
        if self.answering is not None and not self.answering.is_set():
            return
        response = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE, transaction_id=request.transaction_id)
        response.attributes["XOR-MAPPED-ADDRESS"] = addr
        response.add_fingerprint()
        assert self.transport is not None
        self.transport.sendto(bytes(response), addr)


@asynccontextmanager
async def stun_server(
    host: str = "127.0.0.1", answering: asyncio.Event | None = None
) -> AsyncIterator[tuple[StunServer, str]]:
    """A running server and its ``stun:`` URL; ``answering``: see ``StunServer``."""
    transport, server = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: StunServer(answering), local_addr=(host, 0)
    )
    try:
        yield server, f"stun:{host}:{transport.get_extra_info('sockname')[1]}"
    finally:
        transport.close()
