"""Many viewers joining at once: every one connects, from an address ICE did not nominate too."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import re
import socket
import unittest.mock

import aioice
import aiortc.rtcdtlstransport
import aiortc.rtcpeerconnection
import pytest
from aioice.ice import CandidatePair

from relay.config import IceServer
from relay.hub import JOIN_LEAD
from relay.ipc import KEYFRAME_MIN_INTERVAL
from relay.webrtc import borrowed
from relay.webrtc.whepclient import WhepViewer

from .conftest import EncodedFrames, RunningRelay, capture_ms, make_config, start_relay
from .stun import stun_server

FRAMES = 5  # each joiner's first pictures: decoded, each a frame the relay encoded

DTLS = b"\x17\xfe\xfd"  # what a DTLS record starts with: not STUN (RFC 7983)


async def _connected_pair() -> tuple[aioice.Connection, aioice.Connection]:
    """A relay's end (controlled, as for a WHEP answer) and a viewer's (controlling), each with a host
    candidate on 127.0.0.1 and on ::1, connected."""
    relay_end, viewer = aioice.Connection(ice_controlling=False), aioice.Connection(ice_controlling=True)
    await asyncio.gather(relay_end.gather_candidates(), viewer.gather_candidates())
    for near, far in ((relay_end, viewer), (viewer, relay_end)):
        for candidate in far.local_candidates:
            await near.add_remote_candidate(candidate)
        await near.add_remote_candidate(None)
        near.remote_username, near.remote_password = far.local_username, far.local_password
    await asyncio.gather(relay_end.connect(), viewer.connect())
    return relay_end, viewer


async def test_data_from_a_viewers_pair_the_relay_did_not_nominate_is_taken_and_a_strangers_is_not():
    """With two candidate pairs (IPv4 and IPv6, two interfaces) the two ends can settle on different pairs:
    aioice nominates aggressively. The viewer's DTLS then comes from the remote end of a pair the relay did not
    nominate; dropping it as a stranger's left one session in a 30-viewer burst never connected."""
    held = [borrowed.WATCH_ICE.hold(), borrowed.restrict_host_addresses(["127.0.0.1", "::1"])]
    relay_end, viewer = await _connected_pair()
    stranger = None
    try:
        nominated = relay_end._nominated[1]
        # The viewer's other pair: its candidate and the relay's of the other address family.
        mine = next(p for p in viewer._protocols if p.local_candidate.host != nominated.remote_addr[0])
        theirs = next(c for c in relay_end.local_candidates if c.host == mine.local_candidate.host)
        other = CandidatePair(mine, next(c for c in viewer.remote_candidates if c.host == theirs.host))
        # An authenticated check on it, as a viewer that settled there sends; no nomination: the relay keeps
        # the pair it nominated, whatever its own checks do meanwhile.
        await mine.request(
            viewer.build_request(other, nominate=False), other.remote_addr, viewer.remote_password.encode()
        )
        assert relay_end._nominated[1] is nominated
        to = other.remote_addr
        stranger = socket.socket(socket.AF_INET6 if ":" in to[0] else socket.AF_INET, socket.SOCK_DGRAM)
        stranger.sendto(DTLS + b" from a stranger", to)  # first: dropped, so the viewer's is the next taken
        mine.transport.sendto(DTLS + b" from the viewer", to)
        async with asyncio.timeout(10):
            assert await relay_end.recv() == DTLS + b" from the viewer"
    finally:
        if stranger is not None:
            stranger.close()
        await asyncio.gather(relay_end.close(), viewer.close())
        for release in held:
            release()


JOINERS = 10
# A subscriber's line as it joins (relay/hub.py): how it gets its first keyframe.
JOINED = re.compile(r"stream=cam0 subscriber=(\S+) (shares the keyframe|waits for the keyframe|asks for a keyframe)")


def windows_needed(times: list[float], window: float) -> int:
    """How many windows of ``window`` seconds, each starting at a time not yet covered, cover ``times``: the most
    keyframes a stream should force for joiners at those times, one per window."""
    count, end = 0, float("-inf")
    for t in sorted(times):
        if t > end:
            count, end = count + 1, t + window
    return count


@pytest.mark.relay_config(keyframe_interval=60.0)  # no regular keyframe during the test: every one is forced
async def test_viewers_joining_at_once_all_decode_from_keyframes_forced_at_most_one_a_window(
    relay_server: RunningRelay, http, caplog
):
    caplog.set_level(logging.INFO, logger="relay.hub")
    stream = relay_server.relay.streams["cam0"]
    viewers = [WhepViewer(relay_server.whep(), http) for _ in range(JOINERS)]
    try:
        with EncodedFrames(stream) as encoded:
            await asyncio.gather(*(v.connect() for v in viewers))
            reads = await asyncio.gather(*(v.read_frames(FRAMES) for v in viewers))
            keyframes, clocks = encoded.keyframes, encoded.clocks
    finally:
        await asyncio.gather(*(v.close() for v in viewers))
    joins = [(r.created, m[1], m[2]) for r in caplog.records if (m := JOINED.search(r.getMessage()))]
    assert len(joins) == JOINERS + 1, joins  # the viewers and the test's tap, each once
    for samples in reads:
        shown = [capture_ms(s) for s in samples]
        assert None not in shown and set(shown) <= set(clocks)
        assert shown[0] in keyframes, "a joiner's first picture is not a keyframe the relay encoded"
    # Every keyframe of the test was forced for a join (the GOP is 60 s): at most one per window of joins.
    bound = windows_needed([t for t, _, _ in joins], KEYFRAME_MIN_INTERVAL)
    assert len(keyframes) <= bound, (sorted(keyframes), joins)
    asked = [name for _, name, how in joins if how == "asks for a keyframe"]
    assert len(asked) <= bound, joins
    # They were answered with one DTLS certificate: none was made for each of them.
    fingerprints = {re.search(r"^a=fingerprint:sha-256 (\S+)", v.answer, re.M)[1] for v in viewers}
    assert len(fingerprints) == 1, fingerprints


async def _keyframe_requests(http, relay: RunningRelay) -> dict:
    async with http.get(relay.base + "/api/v1/streams") as resp:
        return (await resp.json())["streams"][0]["keyframe_requests"]


@pytest.mark.relay_config(keyframe_interval=60.0)  # no regular keyframe during the test: every one is forced
async def test_a_joiners_keyframe_is_asked_for_when_its_offer_comes_before_it_connects(
    relay_server: RunningRelay, http
):
    """The IDR is encoded while the viewer's answer is made and ICE and DTLS connect, not after: its offer asks
    for it."""
    stream = relay_server.relay.streams["cam0"]
    with EncodedFrames(stream) as encoded:
        # The tap's keyframe (the only one so far) ages out of the share window, and of the lead an offer
        # looks ahead by, by the frames captured after it (a second's more for its way to the hub).
        clocks = await encoded.wait(round((KEYFRAME_MIN_INTERVAL + JOIN_LEAD + 1.0) * stream.fps) + 1)
        assert encoded.keyframes == {clocks[0]}  # the tap starts at a keyframe: the only one yet
        assert clocks[-1] - clocks[0] >= (KEYFRAME_MIN_INTERVAL + JOIN_LEAD) * 1000
        before = await _keyframe_requests(http, relay_server)
        viewer = WhepViewer(relay_server.whep(), http)
        apply, answered, go = viewer.pc.setRemoteDescription, asyncio.Event(), asyncio.Event()

        async def held(description):  # the viewer cannot connect before it has the answer
            answered.set()
            await go.wait()
            await apply(description)

        viewer.pc.setRemoteDescription = held
        connecting = asyncio.create_task(viewer.connect())
        try:
            async with asyncio.timeout(30):
                await answered.wait()
                while len(encoded.keyframes) < 2:  # the one its offer asked for, published while it waits
                    await asyncio.sleep(0.01)
            asked = await _keyframe_requests(http, relay_server)
            assert asked["requests"] == before["requests"] + 1 and viewer.pc.connectionState != "connected"
            ahead = max(encoded.keyframes)
            go.set()
            await connecting
            first_picture = capture_ms((await viewer.read_frames(1))[0])
        finally:
            go.set()
            await viewer.close()
        after = await _keyframe_requests(http, relay_server)
        keyframes = encoded.keyframes
    # It starts from that keyframe, or (connected too late to share it, on a slow machine) from one it asked
    # for then: never from before its offer.
    assert first_picture in keyframes and first_picture >= ahead
    if first_picture == ahead:
        assert (after["requests"], after["shared"]) == (asked["requests"], asked["shared"] + 1)


def test_the_shared_certificate_is_renewed_a_day_before_it_expires():
    held = borrowed.SHARED_CERTIFICATE.hold()
    try:
        first = aiortc.rtcpeerconnection.RTCCertificate.generateCertificate()
        assert aiortc.rtcpeerconnection.RTCCertificate.generateCertificate() is first
        profiles = aiortc.rtcdtlstransport.SRTP_PROFILES
        contexts = first._create_ssl_context(profiles), first._create_ssl_context(list(profiles))
        assert contexts[0] is contexts[1]  # one OpenSSL context per certificate, not one per DTLS transport
        soon = datetime.datetime.now(tz=datetime.UTC) + borrowed.CERTIFICATE_RENEW / 2
        with unittest.mock.patch.object(type(first), "expires", new=soon):
            renewed = aiortc.rtcpeerconnection.RTCCertificate.generateCertificate()
        assert renewed is not first and renewed.getFingerprints() != first.getFingerprints()
    finally:
        held()
    assert aiortc.rtcpeerconnection.RTCCertificate is aiortc.RTCCertificate  # released: aiortc's own again


async def test_a_started_relay_has_made_its_dtls_certificate_and_context(http, monkeypatch):
    """Its first viewer's answer and handshake make no certificate and no OpenSSL context: the relay made them as
    it started (a process's first of each costs ~5 ms, on the loop where the first viewers join)."""
    monkeypatch.setattr(borrowed._SharedCertificate, "_current", None)  # as in a process that made none yet
    runner, running = await start_relay(make_config())
    try:
        with (
            unittest.mock.patch.object(
                aiortc.rtcdtlstransport.RTCCertificate,
                "_create_ssl_context",
                autospec=True,
                side_effect=aiortc.rtcdtlstransport.RTCCertificate._create_ssl_context,
            ) as contexts,
            unittest.mock.patch.object(
                aiortc.rtcdtlstransport, "generate_certificate", wraps=aiortc.rtcdtlstransport.generate_certificate
            ) as certificates,
        ):
            viewer = WhepViewer(running.whep(), http)  # in this process: it shares the relay's certificate
            try:
                await viewer.connect()
                await viewer.recv(timeout=10)
            finally:
                await viewer.close()
        assert (contexts.call_count, certificates.call_count) == (0, 0)
    finally:
        await runner.cleanup()


async def test_offers_gather_at_once_while_a_stun_server_keeps_them_waiting(http):
    """A slow STUN server holds every answer (the relay gathers with the ICE servers it hands its viewers), and
    must not hold them one after the other: offers that come together are answered together."""
    answering = asyncio.Event()
    offers = 4
    async with stun_server(answering=answering) as (server, url):
        config = make_config()
        config = dataclasses.replace(
            config, webrtc=dataclasses.replace(config.webrtc, ice_servers=(IceServer((url,)),))
        )
        runner, relay = await start_relay(config)
        viewers = [WhepViewer(relay.whep(), http) for _ in range(offers)]
        try:
            connecting = [asyncio.create_task(v.connect()) for v in viewers]
            async with asyncio.timeout(30):
                while len(server.clients) < offers:  # each session gathers from a socket of its own
                    await asyncio.sleep(0.01)
            assert not any(task.done() for task in connecting), "an answer came before its gathering was done"
            answering.set()
            await asyncio.gather(*connecting)
            await asyncio.gather(*(v.read_frames(1) for v in viewers))
        finally:
            await asyncio.gather(*(v.close() for v in viewers))
            await runner.cleanup()
