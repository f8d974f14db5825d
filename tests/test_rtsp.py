"""RTSP for NVR software: the generated mediamtx config, and real readers against a real mediamtx."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import threading
import time

import av
import psutil
import pytest

from benchmarks.bursts import BurstReader, Onset, consecutive, file_sync_ms
from benchmarks.ports import free_port, free_rtp_pair
from relay.camera.testsound import RATE
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
LIP_SYNC_GOAL_MS = 40  # issue 15: sound and picture within this of each other


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


@dataclasses.dataclass
class Heard:
    """What a reader of a file or stream with both tracks got: its streams, the bursts' onsets (on the file's
    timeline, with their tone) and each video frame's (time, pixel clock ms)."""

    codecs: list[str]
    onsets: list[tuple[float, Onset]]
    video: list[tuple[float, int]]


def read_sound_and_picture(url: str, bursts: int, options: dict[str, str] | None = None) -> Heard:
    """Decode both tracks of ``url`` (an RTSP URL or an MP4) until ``bursts`` onsets in a row are heard, or it
    ends; with PyAV, as ffmpeg-based NVRs read it."""
    reader, onsets, video = BurstReader(), [], []
    start: float | None = None  # the timeline's time of the first audio sample
    with av.open(url, options=options or {}, timeout=10) as container:
        codecs = [s.codec_context.name for s in container.streams]
        for frame in container.decode(*container.streams):
            if frame.time is None:
                continue
            if isinstance(frame, av.AudioFrame):
                start = frame.time if start is None else start
                for onset in reader.feed(frame.time, frame.to_ndarray()[0].astype(float) * 32767):
                    onsets.append((start + onset.sample / RATE, onset))
                if len(consecutive([o for _, o in onsets])) >= bursts:
                    break
            elif (clock := frame_clock(frame)) is not None:
                video.append((frame.time, clock))
    return Heard(codecs, onsets, video)


@pytest.mark.relay_config(rtsp=True)
async def test_a_reader_gets_the_sound_beside_the_picture_and_hears_the_bursts_in_sync(relay_server):
    await wait_published(relay_server)
    url = rtsp_url(relay_server, "cam0")
    probe = await asyncio.create_subprocess_exec(
        "ffprobe", "-v", "error", "-rtsp_transport", "tcp", "-show_entries", "stream=codec_type,codec_name",
        "-of", "json", url, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(probe.communicate(), 30)
    streams = json.loads(out)["streams"]
    assert [(s["codec_type"], s["codec_name"]) for s in streams] == [("video", "h264"), ("audio", "opus")]
    heard = await asyncio.to_thread(read_sound_and_picture, url, 3, {"rtsp_transport": "tcp"})
    assert heard.codecs == ["h264", "opus"]
    run = consecutive([o for _, o in heard.onsets])
    assert len(run) >= 3, [(o.k, round(o.hz)) for _, o in heard.onsets]
    # Each burst sits within the lip-sync goal of where the picture says its second starts. (mediamtx
    # stamps what it passes on by arrival, and a 20 ms Opus frame leaves the worker once its last sample is in:
    # readers hear the sound about 20 ms late; docs/nvr.md.)
    sync = [file_sync_ms(t, heard.video) for t, o in heard.onsets if o in run]
    assert all(s is not None and abs(s) <= LIP_SYNC_GOAL_MS for s in sync), sync
    assert relay_server.relay.publishers["cam0"].stats().api["rtsp_audio_published"] > 0


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


# -- camrelay's publisher against servers that misbehave: it never gives up, never leaks a socket


class FakeRtspServer:
    """A threaded RTSP server on loopback that takes publishers: answers ANNOUNCE, SETUP and RECORD (with
    ``transport`` and ``session`` as given, and the CSeq as ``cseq(n)`` makes it), then, per ``after_record``:
    "read" (reads and records every request, dropping RTP), or "stall" (never reads again)."""

    def __init__(self, after_record="read", transport="interleaved=0-1", session="77", cseq=str) -> None:
        self.after_record, self.transport, self.session, self.cseq = after_record, transport, session, cseq
        self.methods: list[str] = []
        self.records = 0
        self._stalled = threading.Event()  # set at close
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def close(self) -> None:
        self._stalled.set()
        for s in [self._sock, *self._conns]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked on it
            s.close()
        for thread in self._threads:
            thread.join()

    def established(self) -> int:
        """Connections to this server still open at the publisher's end (the relay runs in this process)."""
        mine = psutil.Process().net_connections("tcp")
        return sum(1 for c in mine if c.raddr and c.raddr.port == self.port and c.status == psutil.CONN_ESTABLISHED)

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self._sock.accept()
                self._conns.append(conn)
                self._threads.append(threading.Thread(target=self._serve, args=(conn,), daemon=True))
                self._threads[-1].start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        buf = b""
        with contextlib.suppress(OSError):
            while True:
                while b"$" == buf[:1]:  # RTP: dropped
                    if len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[2:4], "big"):
                        break
                    buf = buf[4 + int.from_bytes(buf[2:4], "big") :]
                if buf[:1] != b"$" and b"\r\n\r\n" in buf:
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    text = head.decode(errors="replace")
                    length = int(re.search(r"(?im)^content-length: *(\d+)", text).group(1)) if "ength:" in text else 0
                    while len(buf) < length:
                        buf += conn.recv(65536)
                    buf = buf[length:]
                    method = text.split(" ", 1)[0]
                    number = int(re.search(r"(?im)^cseq: *(\d+)", text).group(1))
                    self.methods.append(method)
                    headers = [f"CSeq: {self.cseq(number)}", f"Session: {self.session}"]
                    if method == "SETUP":
                        headers.append(f"Transport: RTP/AVP/TCP;unicast;{self.transport};mode=record")
                    conn.sendall(("RTSP/1.0 200 OK\r\n" + "\r\n".join(headers) + "\r\n\r\n").encode())
                    if method == "RECORD":
                        self.records += 1
                        if self.after_record == "stall":
                            self._stalled.wait()  # never reads again: the connection stays open
                            return
                    continue
                data = conn.recv(65536)
                if not data:
                    return
                buf += data


async def feed_hub(hub, stop: asyncio.Event, extra: int = 0) -> None:
    """Real H.264 into ``hub`` at 100 frames a second (``extra`` bytes of padding after each, as a big
    camera's would be), keyframes with their parameter sets every sixth."""
    from relay import h264
    from relay.hub import EncodedFrame

    from .test_rtspin import SETS, UNITS

    i = 0
    while not stop.is_set():
        unit = UNITS[i % 6] if i % 6 else h264.join_annexb(SETS) + UNITS[0]
        hub.publish(EncodedFrame(unit + b"\x00" * extra, 3000 * i, i % 6 == 0, time.time()))
        i += 1
        await asyncio.sleep(0.01)


async def publishing_to(server: FakeRtspServer, until, extra: int = 0):
    from relay.hub import PacketHub
    from relay.rtsp import RtspPublisher

    hub = PacketHub("cam0", lambda: None)
    publisher = RtspPublisher(hub, f"rtsp://camrelay:pw@127.0.0.1:{server.port}/cam0", 30.0)
    stop = asyncio.Event()
    feeding = asyncio.create_task(feed_hub(hub, stop, extra))
    publisher.start()
    try:
        deadline = time.monotonic() + 60
        while not until(publisher):
            assert time.monotonic() < deadline, f"errors={publisher.errors} sessions={publisher.sessions}"
            assert not publisher._task.done(), publisher._task  # never given up
            await asyncio.sleep(0.05)
        return publisher
    finally:
        stop.set()
        await feeding
        await publisher.close()


async def test_live_frames_are_written_as_the_hub_publishes_them():
    """The publisher waits for frames like a viewer's send loop: the hub hands each live one to it (no task
    woken per frame), and every frame published reaches the server's socket either way."""
    server = FakeRtspServer()
    try:
        publisher = await publishing_to(server, lambda p: p.published >= 60)
    finally:
        server.close()
    assert publisher.errors == 0 and publisher.sessions == 1
    assert 0 < publisher.pushed < publisher.published  # the session's first frame goes through the loop


async def test_a_server_that_stops_reading_is_left_and_its_socket_closed_every_time(monkeypatch):
    import relay.rtsp

    monkeypatch.setattr(relay.rtsp, "PUBLISH_STALL", 0.3)
    monkeypatch.setattr(relay.rtsp, "PUBLISH_RETRY_DELAY", 0.05)
    server = FakeRtspServer(after_record="stall")
    try:
        seen = []

        def three_stalls(p) -> bool:
            seen.append(server.established())
            return p.errors >= 3

        publisher = await publishing_to(server, three_stalls, extra=200_000)
        assert publisher.sessions >= 3 and server.records >= 3
        assert max(seen) <= 1  # one connection at a time: each stalled one was dropped, its buffer with it
        await asyncio.sleep(0)  # the last one closed with the publisher
        assert server.established() == 0
    finally:
        server.close()


@pytest.mark.parametrize(
    "server",
    [
        dict(session=";timeout=\u00b2"),  # no session id, and a timeout that is "digits" to str.isdigit only
        dict(transport="interleaved=256-257"),  # a channel no interleaved frame can carry
    ],
    ids=["session", "channel-256"],
)
async def test_a_server_that_answers_nonsense_is_retried_not_given_up(server, caplog):
    server = FakeRtspServer(**server)
    try:
        publisher = await publishing_to(server, lambda p: p.errors >= 2)
    finally:
        server.close()
    assert publisher.published == 0
    lines = [r for r in caplog.records if "rtsp publish to" in r.getMessage()]
    assert len(lines) >= 2 and all("republishing" in r.getMessage() and r.exc_info is None for r in lines)
    assert "pw" not in caplog.text  # the credential never shown


async def test_the_publisher_keeps_its_session_alive_before_the_servers_timeout(monkeypatch):
    import relay.rtsp

    monkeypatch.setattr(relay.rtsp, "PUBLISH_KEEPALIVE_FRACTION", 0.01)  # of the session's 60 s: 0.6 s
    server = FakeRtspServer(session="77;timeout=60")
    try:
        await publishing_to(server, lambda p: server.methods.count("OPTIONS") >= 2)
    finally:
        server.close()
    assert server.methods[:3] == ["ANNOUNCE", "SETUP", "RECORD"]
    assert server.records == 1  # one session, kept


def test_announce_with_sound_adds_an_opus_track_and_sender_reports_pair_rtp_with_capture_time():
    from relay import h264
    from relay.rtsp import INTERLEAVED, PUBLISH_AUDIO_TRACK, SENDER_REPORT, RtpFramer, announce_sdp

    from .test_rtspin import SETS

    sdp = announce_sdp(h264.join_annexb(SETS), 30.0, audio=True).decode().splitlines()
    audio = sdp[sdp.index("m=audio 0 RTP/AVP 97") :]
    assert audio == ["m=audio 0 RTP/AVP 97", "a=rtpmap:97 opus/48000/2", f"a=control:{PUBLISH_AUDIO_TRACK}"]
    assert "m=audio" not in announce_sdp(h264.join_annexb(SETS), 30.0).decode()

    framer = RtpFramer(2, 0x1234, 7, 97, 48_000)
    first = framer.frame([b"x" * 10], 960, capture_time=1_700_000_000.25)
    dollar, channel, length = INTERLEAVED.unpack_from(first)
    assert (dollar, channel, length) == (b"$", 3, SENDER_REPORT.size)  # RTCP on the channel after the RTP's
    _, pt, _, ssrc, ntp_s, ntp_frac, rtp_ts, packets, octets = SENDER_REPORT.unpack_from(first, INTERLEAVED.size)
    assert (pt, ssrc, rtp_ts, packets, octets) == (200, 0x1234, 960, 0, 0)
    assert ntp_s - 2_208_988_800 + ntp_frac / 2**32 == pytest.approx(1_700_000_000.25, abs=1e-6)
    # The next report waits a second of capture time; the frames in between go alone.
    assert INTERLEAVED.unpack_from(framer.frame([b"y"], 1920, capture_time=1_700_000_000.27))[1] == 2
    assert INTERLEAVED.unpack_from(framer.frame([b"z"], 48960, capture_time=1_700_000_001.25))[1] == 3
