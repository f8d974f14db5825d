"""Odd requests and secrets: no 500s, no passwords where people can see them."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time

import psutil
import pytest

from relay.config import AuthConfig, StreamConfig
from relay.source import parse_source_spec
from relay.webrtc.whepclient import WhepError, WhepViewer

from .conftest import make_config, start_relay

SECRET = "s3cr3t-pw"


@pytest.mark.relay_config(allowed_hosts=("*",))  # past the Host check, to the pages that show the host name
async def test_malformed_host_header_is_not_a_500(relay_server, http):
    for path in ("/api/v1/streams", "/api/v1/status", "/view/cam0"):
        async with http.get(relay_server.base + path, headers={"Host": "a:b:c"}) as resp:
            assert resp.status == 200, path


async def test_malformed_host_header_is_refused_by_default(relay_server, http):
    async with http.get(relay_server.base + "/api/v1/streams", headers={"Host": "a:b:c"}) as resp:
        assert resp.status == 403
        assert await resp.text() == "403: Host header 'a:b:c' is not a host name or address\n"


async def test_nul_byte_in_a_recording_path_is_a_404(tmp_path, http):
    config = make_config()
    config = dataclasses.replace(config, record=dataclasses.replace(config.record, enabled=True, root=str(tmp_path)))
    runner, relay = await start_relay(config)
    try:
        async with http.get(relay.base + "/recordings/cam0/a%00b.mp4") as resp:
            assert resp.status == 404
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("where", ["api", "argv", "log"])
async def test_an_rtsp_cameras_password_never_shows(http, caplog, where):
    url = f"rtsp://admin:{SECRET}@127.0.0.1:9/stream"  # nothing listens there: the worker keeps failing
    config = make_config(
        (StreamConfig("cam0", parse_source_spec("test:")), StreamConfig("ipcam", parse_source_spec(url)))
    )
    runner, relay = await start_relay(config)
    try:
        ipcam = relay.relay.streams["ipcam"]
        deadline = time.monotonic() + 15
        while ipcam.stats.source_errors < 1:
            assert time.monotonic() < deadline, "the camera was never tried"
            await asyncio.sleep(0.1)
        if where == "api":
            for path in ("/api/v1/streams", "/api/v1/status"):
                async with http.get(relay.base + path) as resp:
                    text = await resp.text()
                assert SECRET not in text and "admin:***@127.0.0.1" in text
        elif where == "argv":
            cmdline = " ".join(psutil.Process(ipcam.pid).cmdline())
            assert "relay.camera.worker" in cmdline and SECRET not in cmdline
        else:
            assert "ipcam" in caplog.text and SECRET not in caplog.text
    finally:
        await runner.cleanup()


def extmap_id(new_id: int):
    """A ``rewrite_sdp`` for WhepViewer: the offer's first header extension gets ``new_id``."""

    def rewrite(kind: str, sdp: str) -> str:
        if kind != "offer":
            return sdp
        return re.sub(r"a=extmap:\d+", f"a=extmap:{new_id}", sdp, count=1)

    return rewrite


async def test_an_offer_number_out_of_range_is_a_400_not_a_dead_viewer(relay_server, http, caplog):
    # aiortc took extmap id 256, answered 201, then asserted on every packet it tried to send.
    viewer = WhepViewer(relay_server.whep(), http, rewrite_sdp=extmap_id(256))
    try:
        with pytest.raises(WhepError) as info:
            await viewer.connect()
        assert info.value.status == 400
        assert re.fullmatch(r"malformed offer: line \d+: a=extmap id 256 is outside 1\.\.255", info.value.reason)
    finally:
        await viewer.close()
    assert relay_server.relay.sessions.count() == 0
    # The largest id the two-byte header form carries works end to end.
    viewer = WhepViewer(relay_server.whep(), http, rewrite_sdp=extmap_id(255))
    try:
        await viewer.connect()
        await viewer.read_frames(3)
    finally:
        await viewer.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.relay_config(auth=AuthConfig(mode="token", token="t0ken-for-the-tests-0123456789abcdef"))
async def test_options_tells_nothing_about_which_streams_exist(relay_server, http):
    answers = []
    for path in ("/whep/cam0", "/whep/nope", "/whep/cam0/nosuchsession", "/whep/nope/x"):
        async with http.options(relay_server.base + path) as resp:
            headers = {k: v for k, v in resp.headers.items() if k not in ("Date", "Server")}
            answers.append((resp.status, headers, await resp.read()))
    assert answers[0][0] == 204
    assert all(answer == answers[0] for answer in answers)


async def test_a_body_that_trickles_in_is_cut_off_with_a_408(relay_server, monkeypatch):
    import signalling.whep

    monkeypatch.setattr(signalling.whep, "BODY_TIMEOUT", 0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay_server.relay.config.http.port)
    try:
        writer.write(
            b"POST /whep/cam0 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/sdp\r\n"
            b"Content-Length: 5000\r\n\r\nv=0\r\n"  # the head in full, then 5 bytes of 5000, then nothing
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), 30)
    finally:
        writer.close()
        await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert answer.endswith(b"\r\n\r\noffer not received within 0.5s\n")
    assert relay_server.relay.sessions.count() == 0


async def test_a_client_that_vanishes_mid_body_leaves_no_traceback(relay_server, http, caplog):
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", relay_server.relay.config.http.port)
        writer.write(
            b"POST /whep/cam0 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/sdp\r\n"
            b"Content-Length: 5000\r\n\r\nv=0\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.2)  # the handler is reading the body now
        writer.transport.abort()  # a reset, mid-body
    async with http.get(relay_server.base + "/healthz") as resp:  # after the resets, in the relay's own order
        assert resp.status == 200
    assert relay_server.relay.sessions.count() == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
