"""Pins the two aiortc internals camrelay relies on, so an aiortc upgrade that
moves them fails here by name instead of silently encoding per viewer or
ignoring PLI."""

import asyncio

import pytest
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.rtcrtpsender import RTCRtpSender as SenderClass

from relay.hub import EncodedFrame, PacketHub
from relay.webrtc import borrowed
from relay.webrtc.rtpsend import (
    HubTrack,
    OutgoingFrame,
    SharedPacker,
    attach_to_sender,
    h264_preferences,
    payloads_for,
)


class Counter:
    def __init__(self):
        self.n = 0

    def __call__(self):
        self.n += 1


async def test_sender_has_the_private_encoder_slot_and_keyframe_hook():
    pc = RTCPeerConnection()
    try:
        keyframes = Counter()
        hub = PacketHub("cam0", keyframes)
        transceiver = pc.addTransceiver(HubTrack(hub, "t"), direction="sendonly")
        sender = transceiver.sender
        assert hasattr(sender, "_RTCRtpSender__encoder"), "aiortc renamed RTCRtpSender.__encoder"
        assert callable(getattr(SenderClass, "_send_keyframe", None)), "aiortc renamed RTCRtpSender._send_keyframe"
        attach_to_sender(sender, hub)
        assert isinstance(sender._RTCRtpSender__encoder, SharedPacker)
        before = keyframes.n
        sender._send_keyframe()  # what aiortc calls on PLI and FIR
        assert keyframes.n == before + 1
        hub.close()
    finally:
        await pc.close()


def test_rtcp_handler_still_routes_pli_and_fir_to_send_keyframe():
    import inspect

    source = inspect.getsource(SenderClass._handle_rtcp_packet)
    assert "RTCP_PSFB_PLI" in source and "RTCP_PSFB_FIR" in source and "_send_keyframe()" in source


def test_sender_packs_non_frames_with_its_encoder():
    import inspect

    source = inspect.getsource(SenderClass._next_encoded_frame)
    assert "self.__encoder.pack(data)" in source and "if self.__encoder is None" in source


def test_attach_refuses_a_sender_without_the_hooks():
    class Bare:
        pass

    with pytest.raises(RuntimeError, match="internals changed"):
        attach_to_sender(Bare(), PacketHub("cam0", Counter()))  # type: ignore[arg-type]


def test_payloads_are_computed_once_per_frame():
    nal = b"\x00\x00\x00\x01\x65" + bytes(5000)  # an IDR slice larger than one packet
    frame = EncodedFrame(nal, 9000, True, 0.0)
    first = payloads_for(frame)
    assert len(first) > 1  # FU-A fragments
    assert payloads_for(frame) is first
    payloads, ts = SharedPacker().pack(OutgoingFrame(frame, 12345))  # the timestamp is the viewer's
    assert payloads is first and ts == 12345


def test_preferences_are_h264_mode_1_then_rtx():
    prefs = h264_preferences()
    mimes = [c.mimeType.lower() for c in prefs]
    assert mimes[0] == "video/h264" and set(mimes) <= {"video/h264", "video/rtx"}
    assert prefs[0].parameters["profile-level-id"] == "42e01f"
    assert all(c.parameters.get("packetization-mode") in ("1", 1) for c in prefs if c.mimeType.lower() == "video/h264")
    assert RTCRtpSender.getCapabilities("video")  # still a public API


def test_aioice_internals_the_relay_reads_are_still_there():
    """relay.webrtc.udpbatch and the liveness watch lean on these; an aioice upgrade that moves them fails here."""
    import inspect

    import aioice.ice

    assert "self.transport.sendto(data, addr)" in inspect.getsource(aioice.ice.StunProtocol.send_data)
    assert "self.receiver" in inspect.getsource(aioice.ice.StunProtocol.datagram_received)
    assert "self._nominated" in inspect.getsource(aioice.ice.Connection.sendto)
    assert "remote_addr" in inspect.getsource(aioice.ice.CandidatePair)
    # borrowed.CLOSE_ALL_BOUND: a connection that has begun to close says so first; a protocol knows its connection
    assert inspect.getsource(aioice.ice.Connection.close).index("self._closing = True") < inspect.getsource(
        aioice.ice.Connection.close
    ).index("for protocol in self._protocols")
    assert "self.receiver = receiver" in inspect.getsource(aioice.ice.StunProtocol.__init__)


def test_the_payload_types_an_answer_keeps_are_aiortcs_one_list_and_the_patch_widens_it():
    """An answer to an offer whose H.264 is on 41 (Chromium's lower dynamic range) keeps 41 while a relay holds
    OFFERED_PAYLOAD_TYPES, and aiortc's own 96-127 rule is back after; an aiortc that stops reading
    ``rtp.DYNAMIC_PAYLOAD_TYPES`` in find_common_codecs fails here."""
    import aiortc.rtcpeerconnection as pc
    from aiortc import RTCRtpCodecParameters

    def offered(pt: int) -> RTCRtpCodecParameters:
        params = {"packetization-mode": "1", "profile-level-id": "f4001f", "level-asymmetry-allowed": "1"}
        return RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=pt, parameters=params)

    local = [offered(101)]  # the relay's own numbering of the same codec
    release = borrowed.OFFERED_PAYLOAD_TYPES.hold()
    try:
        assert [c.payloadType for c in pc.find_common_codecs(local, [offered(41)])] == [41]
        assert [c.payloadType for c in pc.find_common_codecs(local, [offered(70)])] == [101]  # 64-95: never
    finally:
        release()
    assert [c.payloadType for c in pc.find_common_codecs(local, [offered(41)])] == [101]


async def test_sender_fields_the_fast_send_path_uses_are_still_there():
    from relay.webrtc import rtpsend

    pc = RTCPeerConnection()
    try:
        hub = PacketHub("cam0", Counter())
        sender = pc.addTransceiver(HubTrack(hub, "t"), direction="sendonly").sender
        rtpsend.install(sender)  # raises if aiortc renamed one of rtpsend.FIELDS
        assert sender._run_rtp.__func__ is rtpsend._run_rtp and sender._retransmit.__func__ is rtpsend._retransmit
        assert "self._run_rtp(" in __import__("inspect").getsource(SenderClass.send)  # started through the instance
        hub.close()
    finally:
        await pc.close()


def _srtp_pair():
    """An outgoing and an incoming pylibsrtp session sharing one key, as two ends of a DTLS-SRTP transport."""
    from pylibsrtp import Policy, Session

    key = bytes(range(30))
    tx = Session(
        Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND, srtp_profile=Policy.SRTP_PROFILE_AES128_CM_SHA1_80)
    )
    rx = Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND, srtp_profile=Policy.SRTP_PROFILE_AES128_CM_SHA1_80))
    return tx, rx


def test_a_frame_protected_in_place_is_what_pylibsrtp_protects_packet_by_packet():
    """borrowed.SrtpFrameWriter calls pylibsrtp's C binding directly: the same bytes as Session.protect, runs of
    equal-size packets joined, and the receiver's session takes each one."""
    from aiortc.rtp import RtpPacket

    from relay.webrtc.rtpsend import send_frame

    frame = EncodedFrame(
        b"\x00\x00\x00\x01\x67" + bytes(20) + b"\x00\x00\x00\x01\x65" + bytes(range(256)) * 20, 0, True, 0.0
    )
    payloads = payloads_for(frame)
    header = RtpPacket(payload_type=96, sequence_number=0, timestamp=1234).serialize()
    expected_tx, _ = _srtp_pair()
    expected = []
    for i, payload in enumerate(payloads):
        packet = RtpPacket(
            payload_type=96, marker=int(i == len(payloads) - 1), sequence_number=65530 + i, timestamp=1234
        )
        packet.payload = payload
        expected.append(expected_tx.protect(packet.serialize()))

    tx, rx = _srtp_pair()
    runs = []
    sent = send_frame(
        borrowed.SrtpFrameWriter(),
        tx,
        header,
        payloads,
        65530,
        lambda p, d, s, a: runs.append((bytes(d), s, a)),
        None,
        "to",
    )
    datagrams = [d[i : i + s] for d, s, _ in runs for i in range(0, len(d), s)]
    assert datagrams == expected and sent == sum(map(len, expected))
    assert len(runs) < len(payloads) and all(a == "to" for *_, a in runs)  # runs, not a write per packet
    assert [rx.unprotect(d) for d in datagrams][-1][1] & 0x80  # the marker on the last


def test_the_c_send_path_finds_pylibsrtps_own_srtp_protect_and_a_sessions_srtp_t():
    """The C send path (relay/webrtc/_fastsend.c) calls libsrtp through pylibsrtp's compiled binding, never a
    second libsrtp: ``srtp_protect`` with libsrtp 2's signature, which its C calls through a pointer, and a
    session's ``srtp_t`` in ``Session._srtp``. Checked whether or not the extension is built here."""
    from pylibsrtp._binding import ffi

    assert ffi.typeof(borrowed.srtp_lib.srtp_protect).cname == borrowed.SRTP_PROTECT_TYPE
    assert ffi.sizeof("srtp_err_status_t") == 4 and borrowed._SRTP_PROTECT != 0
    tx, _ = _srtp_pair()
    assert ffi.typeof(tx._srtp[0]).cname == "struct srtp_ctx_t_ *" and tx._srtp[0] != ffi.NULL
    setattr(tx, borrowed._SRTP_T, 1)  # a session keeps its srtp_t's number for the C path (no __slots__)


def test_a_frame_larger_than_the_writers_buffer_goes_through_it_in_parts():
    from aiortc.rtp import RtpPacket

    from relay.webrtc.rtpsend import send_frame

    payloads = [bytes([i]) * 1200 for i in range(100)]  # 120 kB: more than FRAME_BUFFER_BYTES
    header = RtpPacket(payload_type=96, sequence_number=0, timestamp=1).serialize()
    tx, rx = _srtp_pair()
    runs = []
    send_frame(
        borrowed.SrtpFrameWriter(), tx, header, payloads, 7, lambda p, d, s, a: runs.append((bytes(d), s)), None, ()
    )
    got = [rx.unprotect(d[i : i + s]) for d, s in runs for i in range(0, len(d), s)]
    assert [RtpPacket.parse(g).payload for g in got] == payloads
    assert [RtpPacket.parse(g).sequence_number for g in got] == list(range(7, 107))


@pytest.mark.parametrize(
    "sizes",
    [
        [30, 1200, 1200, 1200, 500],  # STAP-A, then a NAL unit's FU-As: full-size but the last
        [1200] * 70,  # over the kernel's 64 segments a write
        [1300, 1200, 1200, 1300, 1300, 40],  # a longer one ends a run; a shorter one ends it after it
        [1200] * 60 + [700] + [1200] * 60,  # over the writer's buffer: it empties it and goes on
        [900],
    ],
)
def test_a_frames_runs_are_what_gso_runs_makes_of_its_packets(sizes):
    """The writer works out its runs as it protects (no second pass): they are ``udpbatch.gso_runs``' runs of the
    protected datagrams, but where its buffer fills, where a run may end early."""
    from aiortc.rtp import RtpPacket

    from relay.webrtc.rtpsend import send_frame
    from relay.webrtc.udpbatch import gso_runs

    payloads = [bytes([i % 256]) * n for i, n in enumerate(sizes)]
    header = RtpPacket(payload_type=96, sequence_number=0, timestamp=1).serialize()
    tx, rx = _srtp_pair()
    runs = []
    sent = send_frame(
        borrowed.SrtpFrameWriter(), tx, header, payloads, 0, lambda p, d, s, a: runs.append((bytes(d), s)), None, ()
    )
    datagrams = [d[i : i + s] for d, s in runs for i in range(0, len(d), s)]
    assert [RtpPacket.parse(rx.unprotect(d)).payload for d in datagrams] == payloads
    assert sent == sum(map(len, datagrams))
    each = [[len(d[i : i + s]) for i in range(0, len(d), s)] for d, s in runs]
    assert all(gso_runs(run) == [len(run)] for run in each)  # each one run a segmented write can carry
    if sent < borrowed.FRAME_BUFFER_BYTES - borrowed.SRTP_TRAILER_ROOM:  # the whole frame in the buffer at once
        assert list(map(len, each)) == gso_runs([len(d) for d in datagrams])


def test_the_ntp_clock_is_aiortcs_to_the_microsecond():
    import datetime

    from aiortc.clock import datetime_to_ntp

    from relay.webrtc.rtpsend import ntp_at

    for unix_ns in (0, 1_700_000_000_123_456_789, 1_800_000_000_999_999_000):
        when = datetime.datetime.fromtimestamp(unix_ns // 1000 / 1e6, datetime.UTC)
        assert ntp_at(unix_ns) == datetime_to_ntp(when)


def test_a_nacked_packet_is_found_in_the_frames_sent_across_the_sequence_wrap():
    from relay.webrtc.rtpsend import SentFrames

    sent = SentFrames(packets=10)
    sent.add(65530, 100, [b"a", b"b", b"c"], 96)
    sent.add(65533, 200, [b"d", b"e", b"f", b"g", b"h"], 96)  # 65533 .. 1
    assert sent.find(65531) == (100, False, b"b", 96)
    assert sent.find(0) == (200, False, b"g", 96) and sent.find(1) == (200, True, b"h", 96)
    assert sent.find(2) is None and sent.find(65529) is None
    sent.add(2, 300, [b"i"] * 8, 96)  # the first frame is no longer within the last 10 packets
    assert (
        sent.find(65530) is None
        and sent.find(65534) == (200, False, b"e", 96)
        and sent.find(9) == (300, True, b"i", 96)
    )


@pytest.mark.skipif(not borrowed.C_SEND_BUILT, reason="relay.webrtc._fastsend is not built here")
def test_a_lanes_nack_history_finds_what_sent_frames_finds():
    """A C lane keeps the frames a NACK may name as ``SentFrames`` does (at least the last ``RTP_HISTORY_SIZE``
    packets, one entry a frame): random frames across several sequence wraps, every number looked up in both
    after each frame gives the same answer; a number from the network out of range is simply not found."""
    import random

    from aiortc.rtp import RTP_HISTORY_SIZE

    from relay.webrtc.rtpsend import SentFrames

    rng = random.Random(15)
    lane = borrowed.new_lane(0, 0, 90_000, RTP_HISTORY_SIZE)
    lane.set_header(bytes([0x80, 96]) + bytes(10), None)
    sent, sequence = SentFrames(), 65_000
    for _ in range(300):
        payloads = [rng.randbytes(3) for _ in range(rng.choice((1, 1, 2, 5, 40, 90)))]
        timestamp = rng.randrange(1 << 32)
        sent.add(sequence, timestamp, payloads, 96)
        lane.remember(sequence, timestamp, payloads)
        sequence = (sequence + len(payloads)) & 0xFFFF
        for n in rng.sample(range(65536), 200) + [(sequence - k) & 0xFFFF for k in range(1, 140)]:
            assert lane.find(n) == sent.find(n), n
    assert lane.find(-1) is None and lane.find(65536) is None and lane.find(1 << 70) is None


async def test_aiortcs_counts_are_read_through_a_lanes_sync_while_held():
    """``borrowed.SYNCED_COUNTS``: aiortc's sender and DTLS transport keep their counts as instance fields, which a
    descriptor on each class reads after the owners' sync callables ran (what a C lane counted, brought in when
    aiortc builds a sender report or its stats); gone again once released."""
    release = borrowed.SYNCED_COUNTS.hold()
    pc = RTCPeerConnection()
    try:
        sender = pc.addTransceiver("video", direction="sendonly").sender
        pending = [(123, 456, 1000, 3)]

        def sync() -> None:
            while pending:
                ntp, timestamp, octets, packets = pending.pop()
                borrowed.SenderFields(sender).count(ntp, timestamp, octets, packets)
                borrowed.count_dtls_sent(sender.transport, octets + 30, packets)

        unsync = borrowed.sync_counts(sender, sync)
        stats = await sender.getStats()
        out = next(s for s in stats.values() if s.type == "outbound-rtp")
        assert (out.packetsSent, out.bytesSent) == (3, 1000) and not pending
        transport = next(s for s in sender.transport._get_stats().values() if s.type == "transport")
        assert (transport.packetsSent, transport.bytesSent) == (3, 1030)
        unsync()
        pending.append((0, 0, 1, 1))  # no longer synced
        stats = await sender.getStats()
        assert next(s for s in stats.values() if s.type == "outbound-rtp").packetsSent == 3
    finally:
        await pc.close()
        release()
    assert not borrowed.SYNCED_COUNTS.installed and "_RTCRtpSender__packet_count" not in vars(RTCRtpSender)


@pytest.mark.parametrize(
    "unit",
    [
        b"\x00\x00\x00\x01\x65\x88\x00\x00\x01",  # a start code at the very end (a camera's stray bytes)
        b"\x00\x00\x01\x00\x00\x01\x65\x88",  # two start codes in a row
    ],
    ids=["trailing-start-code", "empty-nal-between"],
)
def test_packetize_leaves_empty_nal_units_out(unit):
    """aiortc's STAP-A packer raised IndexError on an empty NAL unit, out of the hub's publish (a pushed
    viewer) or a viewer's send loop; what is in the unit is sent, the empty piece left out."""
    assert borrowed.packetize(unit) == [b"\x65\x88"]


def test_an_answer_is_made_from_the_transceivers_header_extensions():
    """``borrowed.answer_extension`` appends to the list aiortc answers from and hands its sender."""
    import inspect

    from aiortc.rtcpeerconnection import RTCPeerConnection as PeerConnection

    source = inspect.getsource(PeerConnection)
    assert "headerExtensions=transceiver._headerExtensions" in source, "aiortc answers from elsewhere now"
    assert "transceiver._headerExtensions = find_common_header_extensions(" in source


def test_answer_extension_refuses_a_transceiver_without_the_list():
    class Bare:
        pass

    with pytest.raises(RuntimeError, match="_headerExtensions changed"):
        borrowed.answer_extension(Bare(), 5, "urn:x")  # type: ignore[arg-type]


def test_a_peer_connection_takes_its_certificate_from_its_modules_name_and_dtls_its_context_from_it():
    """``borrowed.SHARED_CERTIFICATE`` replaces ``aiortc.rtcpeerconnection.RTCCertificate``; its instances
    keep their OpenSSL context."""
    import inspect

    import aiortc.rtcdtlstransport
    import aiortc.rtcpeerconnection

    assert "RTCCertificate.generateCertificate()" in inspect.getsource(aiortc.rtcpeerconnection.RTCPeerConnection)
    assert "._create_ssl_context(" in inspect.getsource(aiortc.rtcdtlstransport.RTCDtlsTransport)


def test_a_receivers_bandwidth_estimator_is_made_on_its_first_packet_and_estimates_as_aiortcs():
    """``borrowed.LAZY_BITRATE_ESTIMATOR`` replaces the name aiortc's receivers make theirs from: a relay's
    sessions, which never receive video, make none; one that does gets aiortc's, packet for packet."""
    import inspect
    import unittest.mock

    import aiortc.rate
    import aiortc.rtcrtpreceiver

    assert "RemoteBitrateEstimator()" in inspect.getsource(aiortc.rtcrtpreceiver.RTCRtpReceiver)
    release = borrowed.LAZY_BITRATE_ESTIMATOR.hold()
    try:
        with unittest.mock.patch.object(
            aiortc.rate, "RemoteBitrateEstimator", wraps=aiortc.rate.RemoteBitrateEstimator
        ) as made:
            lazy = aiortc.rtcrtpreceiver.RemoteBitrateEstimator()
            assert made.call_count == 0  # a receiver that never gets a packet makes none
            reference = aiortc.rate.RemoteBitrateEstimator()
            packets = [
                {"abs_send_time": (i * 33 * 262) & 0xFFFFFF, "arrival_time_ms": 1000 + i * 33,
                 "payload_size": 1200, "ssrc": 7}
                for i in range(200)
            ]  # fmt: skip
            assert [lazy.add(**p) for p in packets] == [reference.add(**p) for p in packets]
            assert made.call_count == 2  # the reference, and the lazy one's at its first packet
    finally:
        release()
    assert aiortc.rtcrtpreceiver.RemoteBitrateEstimator is aiortc.rate.RemoteBitrateEstimator  # released


async def test_a_send_before_dtls_is_up_is_a_connection_error_naming_it():
    """``borrowed.DtlsSocket`` (kept per sender, asked once per frame) refuses while the transport is not
    connected, as ``dtls_socket`` always did; the send loop and the push take that as "not yet"."""
    pc = RTCPeerConnection()
    try:
        dtls = pc.addTransceiver("video", direction="sendonly").sender.transport
        with pytest.raises(ConnectionError, match="DTLS not connected"):
            borrowed.DtlsSocket(dtls).get()
        with pytest.raises(ConnectionError, match="DTLS not connected"):
            borrowed.dtls_socket(dtls)
    finally:
        await pc.close()


async def _answer_tasks(offer_with: list[str]) -> tuple[int, list[str]]:
    """How many asyncio tasks an aiortc peer makes to answer an offer whose candidates are ``offer_with`` (its
    remote description set, its answer made and set: each task a pass of the event loop, or two, to start and
    finish), and the remote candidates its ICE connection then has."""
    offerer, answerer = RTCPeerConnection(), RTCPeerConnection()
    loop = asyncio.get_running_loop()
    factory = loop.get_task_factory()
    try:
        offerer.addTransceiver("video", direction="recvonly")
        await offerer.setLocalDescription(await offerer.createOffer())
        lines = [line for line in offerer.localDescription.sdp.splitlines() if not line.startswith("a=candidate:")]
        at = next(i for i, line in enumerate(lines) if line.startswith("a=mid:"))
        offer = "\r\n".join(lines[: at + 1] + offer_with + lines[at + 1 :]) + "\r\n"  # its candidates: these
        answerer.addTransceiver("video", direction="sendonly")
        tasks = [0]

        def counted(loop, coro, **kwargs):
            tasks[0] += 1
            return asyncio.Task(coro, loop=loop, **kwargs)

        loop.set_task_factory(counted)
        await answerer.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await answerer.setLocalDescription(await answerer.createAnswer())
        loop.set_task_factory(factory)
        transport = answerer.getTransceivers()[0].receiver.transport.transport
        return tasks[0], [f"{c.ip} {c.port}" for c in transport.getRemoteCandidates()]
    finally:
        loop.set_task_factory(factory)
        await asyncio.gather(offerer.close(), answerer.close())


async def test_an_answer_makes_fewer_tasks_with_its_gathering_and_candidates_in_turn():
    """``borrowed.GATHER_IN_TURN`` and ``CANDIDATES_IN_TURN`` (held by every relay): the same answer, its remote
    candidates the same and in the same order, with fewer tasks, so in fewer passes of the event loop (offers
    answered one at a time each wait for another's passes). An aiortc that no longer gathers or adds candidates
    where they hook in fails here: the counts come out equal."""
    two = [
        "a=candidate:1 1 udp 2130706431 127.0.0.1 40001 typ host",
        "a=candidate:2 1 udp 2130706175 ::1 40002 typ host",
    ]
    loopback = borrowed.restrict_host_addresses(["127.0.0.1"])  # as a relay binds: no address looked up
    try:
        plain, plain_candidates = await _answer_tasks(two)
        held = [borrowed.GATHER_IN_TURN.hold(), borrowed.CANDIDATES_IN_TURN.hold()]
        try:
            in_turn, in_turn_candidates = await _answer_tasks(two)
        finally:
            for release in held:
                release()
    finally:
        loopback()
    assert in_turn_candidates == plain_candidates == ["127.0.0.1 40001", "::1 40002"]
    assert in_turn < plain, (in_turn, plain)
    assert not borrowed.GATHER_IN_TURN.installed and not borrowed.CANDIDATES_IN_TURN.installed


async def _connect_a_pair() -> list[str]:
    """An aiortc offerer and answerer on loopback, the answer applied: the ICE states each went through once both
    are connected (ICE, DTLS)."""
    offerer, answerer = RTCPeerConnection(), RTCPeerConnection()
    states: list[str] = []
    both = asyncio.Event()

    def seen(pc: RTCPeerConnection) -> None:
        states.append(pc.iceConnectionState)
        if offerer.connectionState == answerer.connectionState == "connected":
            both.set()

    try:
        for pc in (offerer, answerer):
            pc.on("connectionstatechange", lambda pc=pc: seen(pc))
        offerer.addTransceiver("video", direction="recvonly")
        await offerer.setLocalDescription(await offerer.createOffer())
        await answerer.setRemoteDescription(offerer.localDescription)
        await answerer.setLocalDescription(await answerer.createAnswer())
        await offerer.setRemoteDescription(answerer.localDescription)
        async with asyncio.timeout(20):  # a hang guard: connected in milliseconds when the hook works
            await both.wait()
        return states
    finally:
        await asyncio.gather(offerer.close(), answerer.close())


async def test_ice_is_done_when_its_pair_is_nominated_not_after_aioices_pacing_wait(monkeypatch):
    """``borrowed.PROMPT_ICE`` (held by every relay): aioice's ``connect`` waits its check pacing (20 ms) before it
    looks at its check list, and aiortc starts DTLS only after; held, that wait ends when the check list is done.
    Here the wait is a minute: both ends connect (ICE, then DTLS) at once, so it ended when their pair was
    nominated. An aioice whose connect no longer sleeps through the module's asyncio, or no longer completes its
    check list where the hook listens, hangs here for the minute and fails; one whose pacing is no longer the
    literal the hook knows sleeps its own wait, and no wait is counted as ended by the hook."""
    monkeypatch.setattr(borrowed, "PACING_WAIT_FOR_TESTS", 60.0)
    ended = borrowed.prompt_waits_ended
    loopback = borrowed.restrict_host_addresses(["127.0.0.1"])
    held = borrowed.PROMPT_ICE.hold()
    try:
        assert borrowed.PROMPT_ICE.installed
        states = await _connect_a_pair()
    finally:
        held()
        loopback()
    assert "completed" in states
    assert borrowed.prompt_waits_ended > ended  # the hook, not aioice's own sleep, ended a wait
    assert not borrowed.PROMPT_ICE.installed
    assert await _connect_a_pair()  # released: aioice's own connect again


@pytest.mark.skipif(not borrowed.C_SEND_BUILT, reason="relay.webrtc._fastsend is not built here")
async def test_a_bound_lane_is_taken_only_while_dtls_the_pair_the_session_and_the_sender_are_as_bound():
    """``borrowed.bind_lane``'s guards, on a real viewer's sender whose lane the batch took: the lane is declined
    (``ready()`` false, and ``send_batch`` sends nothing) while the sender is disabled, DTLS is not connected, the
    outgoing SRTP session is another, ICE nominated another pair, or the pair's asyncio transport is closing or
    holds datagrams queued (read as its fields, which its ``is_closing()`` and ``get_write_buffer_size()``
    return: pinned here); and taken again once each is as it was."""
    from aiortc.rtcdtlstransport import State

    from relay.hub import PacketHub
    from relay.webrtc import rtpsend, udpbatch

    from .test_batchsend import PICTURES, _connect, _publish

    releases = [udpbatch.PATCH.hold(), borrowed.SYNCED_COUNTS.hold(), rtpsend.use_c_send(True, True)]
    hub = PacketHub("cam0", lambda: None)
    pairs = await _connect(hub, 1)
    try:
        await _publish(hub, pairs, PICTURES[:4])
        sender = pairs[0][0].getTransceivers()[0].sender
        lane, dtls = rtpsend.lane_of(sender), sender.transport
        assert lane.frames > 0 and lane.ready()
        nominated = dtls.transport._connection._nominated
        other_session = _srtp_pair()[0]
        transport = nominated[1].protocol.transport
        assert borrowed.transport_guards(transport) is not None  # asyncio's own: read as guards, not asked

        def declined() -> bool:
            frames = lane.frames
            result = borrowed.send_batch(borrowed.SrtpFrameWriter(), [lane], [b"x" * 100], 10**9, 0.0, 64, 60_000)
            return not lane.ready() and result[0] == [0] and lane.frames == frames

        for owner, key, changed in [
            (sender.__dict__, "_enabled", False),
            (dtls.__dict__, "_state", State.CLOSED),
            (dtls.__dict__, "_tx_srtp", other_session),
            (nominated, 1, object()),
            (transport.__dict__, "_closing", True),
            (transport.__dict__, "_buffer_size", 1),
        ]:
            was = owner[key]
            owner[key] = changed
            try:
                assert transport.is_closing() is transport.__dict__["_closing"]
                assert transport.get_write_buffer_size() == transport.__dict__["_buffer_size"]
                assert declined(), key
            finally:
                owner[key] = was
            assert lane.ready(), key
    finally:
        for relay, viewer in pairs:
            await relay.close()
            await viewer.close()
        for release in reversed(releases):
            release()


def test_an_answer_is_made_from_the_transceivers_negotiated_lists_which_answer_without_trims():
    """``borrowed.answer_without`` trims the transceiver's negotiated header extensions and each codec's feedback
    between the offer and the answer: aiortc makes both lists anew for each offer (its codecs deep copies, so its
    own table is untouched) and makes the answer, and its sender's parameters, from them."""
    import inspect

    import aiortc.codecs
    import aiortc.rtcpeerconnection as pcmod

    common = inspect.getsource(pcmod.find_common_codecs)
    assert "copy.deepcopy(codec)" in common and "codec.rtcpFeedback = list(" in common
    source = inspect.getsource(pcmod)
    assert "transceiver._headerExtensions = find_common_header_extensions(" in source
    assert "transceiver._codecs = common" in source
    assert "codecs=transceiver._codecs" in source and "headerExtensions=transceiver._headerExtensions" in source
    remb = [c for c in aiortc.codecs.CODECS["video"] if any(f.type == "goog-remb" for f in c.rtcpFeedback)]
    assert remb  # aiortc offers it: the relay's answers are what leave it out


def test_aiortc_internals_a_viewers_rtcp_read_at_once_leans_on_are_still_there():
    """``borrowed.read_rtcp_at_once`` does what aiortc's DTLS task does with an SRTCP datagram (counts it, unprotects
    it with ``_rx_srtp``, parses it, routes each packet through ``_rtp_router``) and runs a sender's handling of a
    report to its end at once: an aiortc that moves these, or whose report handling starts to wait, fails here."""
    import inspect

    from aiortc import RTCDtlsTransport, RTCIceTransport, RTCRtpSender

    recv = inspect.getsource(RTCDtlsTransport._recv_next)
    assert "self.__rx_bytes += len(data)" in recv and "self.__rx_packets += 1" in recv
    assert "self._rx_srtp.unprotect_rtcp(data)" in recv and "await self._handle_rtcp_data(data)" in recv
    handle = inspect.getsource(RTCDtlsTransport._handle_rtcp_data)
    assert "RtcpPacket.parse(data)" in handle and "self._rtp_router.route_rtcp(packet)" in handle
    handler = inspect.getsource(RTCRtpSender._handle_rtcp_packet)
    reports = handler.split("elif isinstance(packet, RtcpRtpfbPacket)")[0]
    assert "isinstance(packet, (RtcpRrPacket, RtcpSrPacket))" in reports and "await" not in reports
    # A REMB is dropped where it is read: aiortc's sender only hands it to an encoder's target_bitrate, which the
    # relay's senders (its shared packer) have none of.
    remb = handler.split("packet.fmt == RTCP_PSFB_APP")[1]
    assert "self.__encoder.target_bitrate = bitrate" in remb and "elif" not in remb
    assert not hasattr(SharedPacker(), "target_bitrate")
    assert "self._connection = " in inspect.getsource(RTCIceTransport)
