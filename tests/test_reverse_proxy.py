"""HTTPS through a real nginx, configured by the very block docs/security.md gives.

Debian's nginx-light (``scripts/setup`` installs it) runs as a child of the
test with a throwaway self-signed certificate; the tests fail, never skip,
when it is missing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from benchmarks.chromium import chromium
from benchmarks.ports import free_port
from relay.config import AuthConfig
from relay.webrtc.whepclient import WhepViewer

from .conftest import make_config, start_relay

NGINX = "/usr/sbin/nginx"
SECURITY_MD = Path(__file__).parent.parent / "docs" / "security.md"
TOKEN = "proxy-test-token-0123456789abcdef"
START_TIMEOUT = 10.0  # seconds for nginx to accept connections


def documented_server_block() -> str:
    """The ```nginx block of docs/security.md, as a reader would copy it."""
    blocks = re.findall(r"```nginx\n(.*?)```", SECURITY_MD.read_text(), re.S)
    assert len(blocks) == 1, "docs/security.md should hold exactly one nginx block"
    return blocks[0]


def localize(block: str, port: int, relay_port: int, cert: Path, key: Path) -> str:
    """The documented block with this test's ports and certificate; each replacement must hit."""
    for pattern, replacement in (
        (r"listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;"),
        (r"server_name camera\.example\.org;", "server_name localhost;"),
        (r"ssl_certificate +\S+;", f"ssl_certificate {cert};"),
        (r"ssl_certificate_key +\S+;", f"ssl_certificate_key {key};"),
        (r"proxy_pass http://127\.0\.0\.1:8080;", f"proxy_pass http://127.0.0.1:{relay_port};"),
    ):
        block, n = re.subn(pattern, replacement, block)
        assert n == 1, f"docs/security.md's nginx block no longer has {pattern!r}"
    return block


@asynccontextmanager
async def nginx(tmp: Path, relay_port: int) -> AsyncIterator[int]:
    """A real nginx ending TLS on a free port, in front of the relay; yields its port."""
    assert shutil.which(NGINX) or os.access(NGINX, os.X_OK), (
        f"{NGINX} is missing: apt-get install nginx-light (scripts/setup does)"
    )
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    temp_paths = "\n".join(
        f"  {kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = tmp / "nginx.conf"
    conf.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"daemon off;\nworker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log warn;\n"
        + "events { worker_connections 256; }\n"
        + f"http {{\n  access_log off;\n{temp_paths}\n"
        + localize(documented_server_block(), port, relay_port, cert, key)
        + "}\n"
    )
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                break
            except OSError:
                assert proc.poll() is None, f"nginx exited: {proc.stderr.read().decode() if proc.stderr else ''}"
                assert time.monotonic() < deadline, "nginx did not start listening"
                await asyncio.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def https_session(source: str = "127.0.0.1") -> aiohttp.ClientSession:
    """A client that accepts the test's self-signed certificate, connecting from ``source``."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, local_addr=(source, 0)))


def proxied_config(tmp_path: Path, **kw):
    config = make_config(auth=AuthConfig(mode="token", token=TOKEN), state_dir=str(tmp_path / "state"), **kw)
    return dataclasses.replace(config, http=dataclasses.replace(config.http, trusted_proxies=("127.0.0.1",)))


async def test_behind_nginx_the_page_plays_over_https_and_the_cookie_is_secure(tmp_path):
    runner, relay = await start_relay(proxied_config(tmp_path))
    try:
        async with nginx(tmp_path, relay.relay.config.http.port) as port, https_session() as http:
            base = f"https://localhost:{port}"
            async with http.get(f"{base}/?token={TOKEN}", allow_redirects=False) as resp:
                assert resp.status == 200 and 'data-whep="/whep/cam0"' in await resp.text()
                cookie = resp.headers["Set-Cookie"]
            assert "Secure" in cookie.split("; ") and "HttpOnly" in cookie.split("; ")
            async with http.get(f"{base}/snapshot/cam0.jpg", headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                assert resp.status == 200 and (await resp.read())[:2] == b"\xff\xd8"
            viewer = WhepViewer(f"{base}/whep/cam0", http, headers={"Authorization": f"Bearer {TOKEN}"})
            try:
                await viewer.connect()
                assert viewer.location and viewer.location.startswith(f"{base}/whep/cam0/")
                frames = await viewer.read_frames(5)
                assert all(sample.latency_ms is not None for sample in viewer.stats.samples[-len(frames) :])
            finally:
                await viewer.close()  # its DELETE goes through nginx too
            assert relay.relay.sessions.count() == 0

            async with chromium() as browser:
                context = await browser.new_context(ignore_https_errors=True)
                page = await context.new_page()
                base = f"https://127.0.0.1:{port}"  # Chromium here resolves no names (benchmarks/chromium.py)
                await page.goto(f"{base}/view/cam0?token={TOKEN}")
                await page.wait_for_function(
                    "() => window.camrelayPlayer && window.camrelayPlayer.state === 'live'"
                    " && window.camrelayPlayer.stats.framesDecoded > 30",
                    timeout=30_000,
                )
                assert page.url == f"{base}/view/cam0"  # the token is off the address bar, kept in the cookie
                await context.close()
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("trusted", [True, False])
async def test_per_address_limits_see_the_client_behind_the_proxy(tmp_path, trusted):
    from .test_whep import CHROMIUM_OFFER

    config = proxied_config(tmp_path, session_rate=0.01, session_burst=1)
    if not trusted:
        config = dataclasses.replace(config, http=dataclasses.replace(config.http, trusted_proxies=()))
    runner, relay = await start_relay(config)
    offer = {"Content-Type": "application/sdp", "Authorization": f"Bearer {TOKEN}"}
    try:
        async with nginx(tmp_path, relay.relay.config.http.port) as port:
            answers = []
            for source in ("127.0.0.2", "127.0.0.2", "127.0.0.3"):
                async with https_session(source) as http:
                    async with http.post(
                        f"https://localhost:{port}/whep/cam0", data=CHROMIUM_OFFER, headers=offer
                    ) as resp:
                        answers.append((resp.status, (await resp.text()).strip()))
    finally:
        await runner.cleanup()
    if trusted:  # each client has its own burst; the refusal names the client, not nginx
        assert answers[0][0] == 201 and answers[2][0] == 201
        assert answers[1] == (429, "too many new sessions from 127.0.0.2; retry later")
    else:  # every client looks like nginx: the second client is refused for the first one's session
        assert [status for status, _ in answers] == [201, 429, 429]
        assert answers[2][1] == "too many new sessions from 127.0.0.1; retry later"


async def test_the_per_address_connection_cap_does_not_hold_every_viewer_behind_the_proxy(tmp_path):
    config = proxied_config(tmp_path)
    config = dataclasses.replace(config, http=dataclasses.replace(config.http, max_connections_per_address=2))
    runner, relay = await start_relay(config)
    try:
        async with nginx(tmp_path, relay.relay.config.http.port) as port:
            sessions = [https_session(f"127.0.0.{i}") for i in range(2, 6)]
            try:
                streams = [
                    await s.get(f"https://localhost:{port}/mjpeg/cam0", headers={"Authorization": f"Bearer {TOKEN}"})
                    for s in sessions
                ]
                # Four MJPEG viewers at once, each one upstream connection from nginx's one address.
                for resp in streams:
                    assert resp.status == 200
                    assert b"Content-Type: image/jpeg" in await resp.content.readuntil(b"\r\n\r\n")
                    resp.close()
            finally:
                await asyncio.gather(*(s.close() for s in sessions))
    finally:
        await runner.cleanup()
