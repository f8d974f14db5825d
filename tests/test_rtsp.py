"""RTSP for NVR software: the generated mediamtx config, and real readers against a real mediamtx."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import time

import av
import psutil
import pytest

from benchmarks.ports import free_port, free_rtp_pair
from relay.config import load
from relay.rtsp import (
    Mediamtx,
    MediamtxSettings,
    RtspError,
    check_ports_free,
    find_mediamtx,
    password_hash,
    render_config,
    rtsp_status,
)
from relay.webrtc.whepclient import WhepViewer

from .conftest import EncodedFrames, frame_clock

SETTINGS = MediamtxSettings("", 8554, 8000, 8001)
# rtsp.password takes any printable ASCII; mediamtx refuses these characters in a plain password (not in a hash).
ODD_PASSWORD = "pa55~w|rd,\\"
SECRET = "pub-Secret_0123456789"


# -- the generated configuration (pure) -----------------------------------


PUBLISHER = {"user": "camrelay", "pass": SECRET, "ips": [], "permissions": [{"action": "publish"}, {"action": "read"}]}


def test_config_serves_rtsp_on_udp_and_tcp_with_everything_else_off():
    c = json.loads(render_config(SETTINGS, ["cam0", "door"], SECRET))
    assert (c["rtsp"], c["rtspAddress"], c["rtspTransports"]) == (True, ":8554", ["udp", "tcp"])
    assert (c["rtpAddress"], c["rtcpAddress"]) == (":8000", ":8001")
    for protocol in ("api", "rtmp", "hls", "webrtc", "srt", "moq", "playback", "metrics", "pprof"):
        assert c[protocol] is False, protocol
    assert "apiAddress" not in c
    assert c["paths"]["cam0"] == {"source": "publisher"} and c["paths"]["door"] == {"source": "publisher"}
    # The first stream, also at /live: mediamtx pulls it as camrelay.
    assert c["paths"]["live"]["source"] == f"rtsp://camrelay:{SECRET}@127.0.0.1:8554/cam0"


def test_without_credentials_anyone_reads_and_only_camrelay_publishes():
    users = json.loads(render_config(SETTINGS, ["cam0"], SECRET))["authInternalUsers"]
    assert users == [PUBLISHER, {"user": "any", "pass": "", "ips": [], "permissions": [{"action": "read"}]}]


def test_with_credentials_no_anonymous_reader_and_the_password_only_as_its_hash():
    s = MediamtxSettings("127.0.0.1", 8554, 8000, 8001, user="nvr", password="s3cret/pw")
    text = render_config(s, ["cam0"], SECRET)
    c = json.loads(text)
    reader = {"user": "nvr", "pass": password_hash("s3cret/pw"), "ips": [], "permissions": [{"action": "read"}]}
    assert c["authInternalUsers"] == [PUBLISHER, reader]
    assert "s3cret" not in text
    assert c["paths"]["live"]["source"] == f"rtsp://camrelay:{SECRET}@127.0.0.1:8554/cam0"
    assert c["rtspAddress"] == "127.0.0.1:8554"


def test_password_hash_is_the_one_mediamtx_checks():
    # echo -n 's3cret/pw' | openssl dgst -binary -sha256 | base64
    assert password_hash("s3cret/pw") == "sha256:vkPWSd6xh64kOs/VX026DIu7Ybai2kf7EGEMblvaEPE="


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"RTSP/1.0 200 OK\r\n", 200),
        (b"RTSP/1.0 401 Unauthorized\r\n", 401),
        (b"RTSP/1.0 200\r\n", 200),
        (b"HTTP/1.1 200 OK\r\n", None),
        (b"RTSP/1.0 20 OK\r\n", None),
        (b"RTSP/1.0 200 OK\r\nCSeq: 1\r\n", None),
        (b"", None),
        (b"\xff\xfe garbage", None),
    ],
)
def test_rtsp_status_line(line, status):
    assert rtsp_status(line) == status


def test_an_old_config_with_api_port_still_loads():
    assert load("[rtsp]\napi_port = 9997\n").rtsp.port == 8554


def test_missing_binary_is_one_clear_error(tmp_path):
    with pytest.raises(RtspError) as info:
        find_mediamtx(str(tmp_path / "nope"))
    assert str(info.value) == f"rtsp.mediamtx: {tmp_path / 'nope'} is not an executable file"


def test_taken_port_is_one_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rtp = free_rtp_pair()
        with pytest.raises(RtspError) as info:
            check_ports_free(MediamtxSettings("127.0.0.1", port, rtp, rtp + 1))
    assert str(info.value) == (
        f"rtsp.port: port {port} is taken (Address already in use); is another mediamtx or camrelay running?"
        " Stop it, or choose another rtsp.port"
    )


# -- real mediamtx, real readers ------------------------------------------


def read_rtsp(url: str, frames: int, transport: str = "tcp") -> list[int | None]:
    """Decode ``frames`` frames from an RTSP URL; the capture time (ms) each one's pixel clock shows, None where it
    does not read."""
    out: list[int | None] = []
    with av.open(url, options={"rtsp_transport": transport, "fflags": "nobuffer"}, timeout=10) as container:
        for frame in container.decode(video=0):
            out.append(frame_clock(frame))
            if len(out) >= frames:
                break
    return out


def rtsp_url(relay, path: str, auth: str = "") -> str:
    return f"rtsp://{auth}127.0.0.1:{relay.relay.config.rtsp.port}/{path}"


async def wait_published(relay, stream: str = "cam0", timeout: float = 10) -> None:
    publisher = relay.relay.publishers[stream]
    start = publisher.published
    deadline = time.monotonic() + timeout
    while publisher.published < start + 5:
        assert time.monotonic() < deadline, "nothing published to mediamtx"
        await asyncio.sleep(0.05)


@pytest.mark.relay_config(rtsp=True)
@pytest.mark.parametrize(("path", "transport"), [("cam0", "tcp"), ("cam0", "udp"), ("live", "tcp")])
async def test_reader_decodes_frames_with_a_valid_pixel_clock(relay_server, path, transport):
    await wait_published(relay_server)
    with EncodedFrames(relay_server.relay.streams["cam0"]) as encoded:
        clocks = await asyncio.to_thread(read_rtsp, rtsp_url(relay_server, path), 20, transport)
        assert len(clocks) == 20
        assert None not in clocks, "every frame's pixel clock reads valid"
        # Each shows the capture time of a frame the relay encoded (mediamtx passes them on as they are), in order.
        assert set(clocks) <= set(encoded.clocks) and clocks == sorted(set(clocks)), clocks


@pytest.mark.relay_config(rtsp=True)
async def test_five_rtsp_readers_and_five_webrtc_viewers_share_one_encoder(relay_server, http):
    await wait_published(relay_server)
    viewers = [WhepViewer(relay_server.whep(), http) for _ in range(5)]
    try:
        await asyncio.gather(*(v.connect() for v in viewers))
        readers = [
            asyncio.to_thread(read_rtsp, rtsp_url(relay_server, "cam0"), 15, t) for t in ("tcp", "udp") * 2 + ("tcp",)
        ]
        results = await asyncio.gather(*readers, *(v.read_frames(15) for v in viewers))
        for clocks in results[:5]:
            assert len(clocks) == 15 and None not in clocks
        for samples in results[5:]:
            assert all(s.latency_ms is not None for s in samples)
        async with http.get(relay_server.base + "/api/v1/streams") as resp:
            cam = (await resp.json())["streams"][0]
        assert cam["encoders_running"] == 1 and cam["viewers_connected"] == 5
    finally:
        await asyncio.gather(*(v.close() for v in viewers))


@pytest.mark.relay_config(rtsp=True)
async def test_mediamtx_killed_is_restarted_and_webrtc_viewers_never_notice(relay_server, http):
    relay = relay_server.relay
    await wait_published(relay_server)
    viewer = WhepViewer(relay_server.whep(), http)
    try:
        await viewer.connect()
        await viewer.read_frames(10)
        stats = relay.streams["cam0"].stats
        old_pid = relay.mediamtx.pid
        encoded_before = stats.frames_encoded
        got = 0
        os.killpg(old_pid, signal.SIGKILL)  # what the OOM killer or a crash does
        # Keep reading the WebRTC viewer right through the outage and restart.
        deadline = time.monotonic() + 20
        while not (relay.mediamtx.ready.is_set() and relay.mediamtx.pid != old_pid):
            assert time.monotonic() < deadline, "mediamtx was not restarted"
            await viewer.read_frames(1, clock=False)
            got += 1
        encoded = stats.frames_encoded - encoded_before
        assert got >= encoded - 3, f"viewer got {got} of {encoded} frames while mediamtx restarted"
        assert relay.mediamtx.restarts == 1
        assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
        # A reader that reconnects gets video again once the publisher is back.
        await wait_published(relay_server)
        assert relay.publishers["cam0"].sessions >= 2
        assert None not in await asyncio.to_thread(read_rtsp, rtsp_url(relay_server, "cam0"), 10)
    finally:
        await viewer.close()


@pytest.mark.relay_config(rtsp=True, rtsp_user="nvr", rtsp_password=ODD_PASSWORD)
async def test_credentials_are_required_when_set(relay_server):
    await wait_published(relay_server)
    for path in ("cam0", "live"):
        with pytest.raises(av.error.FFmpegError) as info:
            await asyncio.to_thread(read_rtsp, rtsp_url(relay_server, path), 1)
        assert "401" in str(info.value)
    with pytest.raises(av.error.FFmpegError):
        await asyncio.to_thread(read_rtsp, rtsp_url(relay_server, "cam0", "nvr:wrong@"), 1)
    login = f"nvr:{ODD_PASSWORD}@"
    for path in ("cam0", "live"):
        assert None not in await asyncio.to_thread(read_rtsp, rtsp_url(relay_server, path, login), 5)


@pytest.mark.relay_config(rtsp=True)
async def test_shutdown_leaves_no_mediamtx_and_the_api_shows_the_url(relay_server, http):
    async with http.get(relay_server.base + "/api/v1/rtsp") as resp:
        info = await resp.json()
    pid = info["mediamtx_pid"]
    assert info["enabled"] and info["mediamtx_ready"] and psutil.pid_exists(pid)
    port = relay_server.relay.config.rtsp.port
    async with http.get(relay_server.base + "/api/v1/streams") as resp:
        cam = (await resp.json())["streams"][0]
    assert cam["rtsp_url"].startswith("rtsp://") and cam["rtsp_url"].endswith(f":{port}/cam0")
    async with http.get(relay_server.base + "/view/cam0") as resp:
        assert f":{port}/cam0</code>" in await resp.text()
    for publisher in relay_server.relay.publishers.values():
        await publisher.close()  # else one may be mid-reconnect to the stopped server when the test ends
    await relay_server.relay.mediamtx.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.relay_config(rtsp=True, allowed_hosts=("camrelay.example",))
async def test_rtsp_urls_name_the_one_address_rtsp_listens_on(relay_server, http):
    # RTSP listens on 127.0.0.1 only (conftest); the page was reached by another name, which would not work.
    port = relay_server.relay.config.rtsp.port
    expected = f"rtsp://127.0.0.1:{port}/cam0"
    headers = {"Host": f"camrelay.example:{relay_server.relay.config.http.port}"}
    async with http.get(relay_server.base + "/api/v1/streams", headers=headers) as resp:
        assert (await resp.json())["streams"][0]["rtsp_url"] == expected
    async with http.get(relay_server.base + "/api/v1/rtsp", headers=headers) as resp:
        assert (await resp.json())["streams"]["cam0"]["url"] == expected
    async with http.get(relay_server.base + "/view/cam0", headers=headers) as resp:
        assert f'<code id="rtsp-url">{expected}</code>' in await resp.text()


async def test_readiness_is_taken_only_from_mediamtxs_own_port(tmp_path, monkeypatch):
    """A program another user put on the RTSP port while mediamtx was not listening answers OPTIONS like mediamtx;
    camrelay must not take it for mediamtx (it would send it the publish credential)."""
    monkeypatch.setattr("relay.rtsp.READY_TIMEOUT", 2.0)  # a deadline: the stand-in never listens
    heard: list[bytes] = []

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"RTSP/1.0 200 OK\r\nCSeq: 1\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(impostor, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stand_in = tmp_path / "mediamtx"  # a mediamtx that has not bound its port yet
    stand_in.write_text("#!/bin/sh\nexec sleep 60\n")
    stand_in.chmod(0o755)
    rtp = free_rtp_pair()
    mtx = Mediamtx(str(stand_in), MediamtxSettings("127.0.0.1", port, rtp, rtp + 1), ["cam0"], tmp_path)
    try:
        with pytest.raises(RtspError, match="mediamtx did not start"):
            await mtx.start()
    finally:
        await mtx.close()
        server.close()
        await server.wait_closed()
    assert heard == []


async def test_publish_url_publishes_to_a_users_own_server_and_runs_no_mediamtx(tmp_path):
    from relay.config import RtspConfig

    from .conftest import make_config, start_relay

    rtp = free_rtp_pair()
    theirs = Mediamtx(find_mediamtx(""), MediamtxSettings("127.0.0.1", free_port(), rtp, rtp + 1), ["cam0"], tmp_path)
    await theirs.start()
    try:
        base = f"rtsp://127.0.0.1:{theirs.settings.port}"
        config = dataclasses.replace(make_config(), rtsp=RtspConfig(publish_url=theirs.publisher_base))
        runner, relay = await start_relay(config)
        try:
            assert relay.relay.mediamtx is None
            await wait_published(relay)
            assert None not in await asyncio.to_thread(read_rtsp, f"{base}/cam0", 10)
            # Shown to people without its password.
            assert (
                relay.relay.rtsp_url("cam0", "ignored") == f"rtsp://camrelay:***@127.0.0.1:{theirs.settings.port}/cam0"
            )
        finally:
            await runner.cleanup()
    finally:
        await theirs.close()


# -- camrelay's publisher: what it says and sends, sans-io, read back by camrelay's own RTSP client core


def test_announce_describes_the_stream_with_its_own_parameter_sets():
    from relay import h264, rtspin
    from relay.rtsp import PUBLISH_TRACK, announce_sdp

    from .test_rtspin import SETS

    sdp = announce_sdp(h264.join_annexb(SETS), 30.0).decode()
    video = rtspin.parse_sdp(sdp, "rtsp://127.0.0.1:8554/cam0")
    assert (video.codec, video.payload_type, video.clock_rate) == ("h264", 96, 90000)
    assert list(video.parameter_sets) == SETS
    assert video.fmtp["profile-level-id"] == SETS[0][1:4].hex()
    assert video.fmtp["packetization-mode"] == "1"
    assert video.control == f"rtsp://127.0.0.1:8554/cam0/{PUBLISH_TRACK}"


@pytest.mark.parametrize("which", ["none", "sps only", "pps only"])
def test_announce_without_an_sps_and_a_pps_is_refused_exactly(which):
    from relay import h264, mux
    from relay.rtsp import announce_sdp

    from .test_rtspin import SETS

    sets = {"none": [], "sps only": SETS[:1], "pps only": SETS[1:]}[which]
    with pytest.raises(mux.NoParameterSets, match="no SPS and PPS"):
        announce_sdp(h264.join_annexb(sets), 30.0)


def test_published_rtp_comes_back_as_the_same_access_units_however_the_bytes_are_cut():
    from relay import h264, rtspin
    from relay.hub import EncodedFrame
    from relay.rtsp import PUBLISH_PAYLOAD_TYPE, RtpFramer
    from relay.webrtc.rtpsend import payloads_for

    from .test_rtspin import UNITS

    framer = RtpFramer(channel=0, ssrc=0x1234, sequence=65533)  # wraps on the way
    frames = [EncodedFrame(unit, 3000 * i, i % 6 == 0, 0.0) for i, unit in enumerate(UNITS)]
    wire = b"".join(framer.frame(payloads_for(f), f.pts + 2**32 - 4000) for f in frames)  # the timestamp wraps
    reader, depacketizer, units, handed = rtspin.Reader(), rtspin.H264Depacketizer(PUBLISH_PAYLOAD_TYPE), [], []
    for start in range(0, len(wire), 977):  # cut anywhere, as TCP may
        for item in reader.feed(wire[start : start + 977]):
            assert isinstance(item, rtspin.Interleaved) and item.channel == 0
            packet = rtspin.parse_rtp(item.payload)
            assert packet.ssrc == 0x1234
            units += depacketizer.push(packet)
            handed.append(packet.marker)
    assert [h264.split_annexb(u.data) for u in units] == [h264.split_annexb(u) for u in UNITS]
    assert handed.count(True) == len(UNITS) and handed[-1]  # each unit's last packet, and only it, marked
    assert [u.pts - units[0].pts for u in units] == [f.pts for f in frames]
    assert depacketizer.packets == sum(len(f.payloads or []) for f in frames)
    assert depacketizer.packets_lost == 0  # the sequence numbers run on through the wrap
