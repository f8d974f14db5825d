"""Admission limits with plain values, and as a client meets them."""

import asyncio
import time

import aiohttp
import pytest

from relay.webrtc.whepclient import WhepViewer
from signalling.limits import MAX_TRACKED_ADDRESSES, RateLimiter, TokenBucket


def test_bucket_allows_a_burst_then_the_rate():
    b = TokenBucket(rate=2.0, burst=3.0)
    assert [b.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(100.0) == pytest.approx(0.5)  # one token takes half a second at 2/s
    assert b.take(100.5) == 0.0
    assert b.take(110.0) == 0.0 and b.tokens == pytest.approx(2.0)  # refilled, capped at the burst


def test_limiter_is_per_address_and_bounded():
    rl = RateLimiter(rate=1.0, burst=1.0)
    assert rl.check("10.0.0.1", 0.0) == 0.0
    assert rl.check("10.0.0.1", 0.0) == pytest.approx(1.0)
    assert rl.check("10.0.0.2", 0.0) == 0.0
    for i in range(MAX_TRACKED_ADDRESSES + 5):
        rl.check(f"a{i}", 1.0)
    assert len(rl.buckets) == MAX_TRACKED_ADDRESSES


# A burst of 2, then one more every 100 s: however slow this machine, none comes back while the test runs.
@pytest.mark.relay_config(session_rate=0.01, session_burst=2)
async def test_too_many_new_sessions_from_one_address_get_429(relay_server, http):
    viewers = [WhepViewer(relay_server.whep(), http) for _ in range(3)]
    try:
        await viewers[0].connect()
        await viewers[1].connect()
        await viewers[0].read_frames(1)  # connected before closing (aioice leaks a task otherwise)
        await viewers[1].read_frames(1)
        async with http.post(relay_server.whep(), data="v=0\r\n", headers={"Content-Type": "application/sdp"}) as resp:
            assert resp.status == 429
            assert 0 < int(resp.headers["Retry-After"]) <= 100
            assert (await resp.text()).strip() == "too many new sessions from 127.0.0.1; retry later"
    finally:
        for v in viewers:
            await v.close()


@pytest.mark.relay_config(max_pending=1, connect_timeout=2.0)
async def test_sessions_that_never_connect_are_capped(relay_server, http):
    from .test_whep import CHROMIUM_OFFER  # mDNS-only candidates: these never connect here

    async with http.post(relay_server.whep(), data=CHROMIUM_OFFER, headers={"Content-Type": "application/sdp"}) as resp:
        assert resp.status == 201
    async with http.post(relay_server.whep(), data=CHROMIUM_OFFER, headers={"Content-Type": "application/sdp"}) as resp:
        assert resp.status == 503
        assert (await resp.text()).strip() == "too many sessions still connecting (1); retry later"
    deadline = time.monotonic() + 10
    while relay_server.relay.sessions.count():
        assert time.monotonic() < deadline
        await __import__("asyncio").sleep(0.1)


@pytest.mark.relay_config(max_pending=32, max_pending_per_address=4)
async def test_one_viewer_with_several_addresses_cannot_hold_every_pending_session(relay_server, http):
    from .test_whep import CHROMIUM_OFFER  # mDNS-only candidates: these never connect here

    addresses = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    clients = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(a, 0))) for a in addresses]
    try:

        async def offer(client: aiohttp.ClientSession) -> tuple[int, str]:
            async with client.post(
                relay_server.whep(), data=CHROMIUM_OFFER, headers={"Content-Type": "application/sdp"}
            ) as resp:
                return resp.status, (await resp.text()).strip()

        # All at once: the caps hold while earlier offers are still being answered, not only after.
        answers = await asyncio.gather(*(offer(client) for client in clients for _ in range(6)))
        for i, address in enumerate(addresses):
            mine = answers[i * 6 : i * 6 + 6]
            assert sorted(status for status, _ in mine) == [201] * 4 + [429] * 2, address
            assert {text for status, text in mine if status == 429} == {
                f"too many sessions from {address} still connecting (4); retry later"
            }
        assert relay_server.relay.sessions.pending() == 16
        # Everyone else still gets in.
        viewer = WhepViewer(relay_server.whep(), http)
        try:
            await viewer.connect()
            await viewer.read_frames(3)
        finally:
            await viewer.close()
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def test_throttled_warnings_are_counted_not_lost(caplog):
    import logging

    from relay.logsafe import Throttled

    t = Throttled(logging.getLogger("test.throttle"), interval=1.0)
    with caplog.at_level(logging.WARNING):
        assert t.warn("refused %s", "a", now=0.0)
        assert not t.warn("refused %s", "b", now=0.5)
        assert not t.warn("refused %s", "c", now=0.9)
        assert t.warn("refused %s", "d", now=1.2)
    assert [r.getMessage() for r in caplog.records] == ["refused a", "refused d (and 2 more like it)"]
