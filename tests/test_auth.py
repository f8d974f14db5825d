"""Access control: the viewer token, HTTP Basic, Host and Origin checks, and secrets kept out of sight."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import socket
import threading
import time
import types
from pathlib import Path

import aiohttp
import pytest

from relay.auth import (
    TOKEN_FILE,
    check_host,
    check_origin,
    hash_password,
    load_or_create_token,
    parse_hash,
    verify_password,
    write_private,
)
from relay.cli import announce, warn_if_exposed
from relay.config import AuthConfig, ConfigError, load, secrets_in_file
from relay.logsafe import SHOWS_SECRET, SecretFilter, redact
from relay.webrtc.whepclient import WhepError, WhepViewer
from signalling.access import ACCESS, AUTH_FAILURE_BURST, FAILURE_DELAY
from signalling.common import RELAY

from .conftest import make_config, start_relay

TOKEN = "t0ken-for-the-tests-0123456789abcdef"
PASSWORD = "correct horse battery"
RTSP_PASSWORD = "nvr-s3cret"
CLEAN_HASH = hash_password("x")  # a well-formed hash to break one part of at a time
N_R_P_SALT = CLEAN_HASH.rsplit("$", 1)[0]

# Every GET the relay serves that needs credentials (the recordings ones need [record] enabled).
PROTECTED = [
    "/",
    "/view/cam0",
    "/recordings/cam0",
    "/recordings/cam0/latest_image.jpg",
    "/snapshot/cam0.jpg",
    "/mjpeg/cam0",
    "/api/v1/streams",
    "/api/v1/rtsp",
    "/api/v1/status",
    "/api/v1/recordings/cam0",
    "/metrics",
]


# -- password hashes


def test_a_hash_verifies_its_password_only():
    encoded = hash_password(PASSWORD)
    assert encoded.startswith("scrypt$16384$8$1$") and PASSWORD not in encoded
    assert verify_password(PASSWORD, encoded)
    assert not verify_password(PASSWORD + " ", encoded)
    assert not verify_password("", encoded)
    assert hash_password(PASSWORD) != encoded  # a new salt each time


HELP = "make one with `camrelay hash-password`"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (PASSWORD, f"is not a password hash (scrypt$N$r$p$salt$key); {HELP}"),
        ("bcrypt" + CLEAN_HASH.removeprefix("scrypt"), f"is not a password hash (scrypt$N$r$p$salt$key); {HELP}"),
        (CLEAN_HASH + "$more", f"is not a password hash (scrypt$N$r$p$salt$key); {HELP}"),
        (CLEAN_HASH.replace("$16384$", "$lots$"), f"has scrypt parameters that are not whole numbers; {HELP}"),
        (
            CLEAN_HASH.replace("$16384$", "$1000$"),
            "has scrypt parameters out of range (N a power of 2 up to 1048576, r 1..32, p 1..16)",
        ),
        (
            CLEAN_HASH.replace("$16384$", "$2097152$"),
            "has scrypt parameters out of range (N a power of 2 up to 1048576, r 1..32, p 1..16)",
        ),
        (
            CLEAN_HASH.replace("$8$1$", "$0$1$"),
            "has scrypt parameters out of range (N a power of 2 up to 1048576, r 1..32, p 1..16)",
        ),
        (N_R_P_SALT + "$not*base64", f"has a salt or key that is not base64; {HELP}"),
        ("scrypt$16384$8$1$c2FsdA$" + CLEAN_HASH.rsplit("$", 1)[1], f"has a salt or key that is too short; {HELP}"),
        (N_R_P_SALT + "$a2V5", f"has a salt or key that is too short; {HELP}"),
    ],
)
def test_bad_hashes_say_what_is_wrong_without_quoting_them(text, message):
    with pytest.raises(ValueError) as info:
        parse_hash(text)
    assert str(info.value) == message


# -- Host and Origin

ALLOWED = {"localhost", "127.0.0.1", "::1", "cam.example.org", "192.168.1.10", "fe80::1"}


@pytest.mark.parametrize(
    "host", ["127.0.0.1:8080", "localhost", "CAM.example.org", "cam.example.org.:80", "[::1]:8080", "[fe80::1]"]
)
def test_our_own_names_pass_the_host_check(host):
    assert check_host(host, ALLOWED) is None


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        (None, "the request has no Host header"),
        ("", "the request has no Host header"),
        ("evil.example:8080", "Host 'evil.example' is not a name of this relay; add it to http.allowed_hosts"),
        ("cam.example.org.evil.example", "Host 'cam.example.org.evil.example' is not a name of this relay;"
         " add it to http.allowed_hosts"),
        ("[::2]:8080", "Host '::2' is not a name of this relay; add it to http.allowed_hosts"),
        ("a:b:c", "Host header 'a:b:c' is not a host name or address"),
        ("user@127.0.0.1", "Host header 'user@127.0.0.1' is not a host name or address"),
        ("127.0.0.1:port", "Host header '127.0.0.1:port' is not a host name or address"),
        ("127.0.0.1/x", "Host header '127.0.0.1/x' is not a host name or address"),
    ],
)  # fmt: skip
def test_other_hosts_are_refused_with_the_reason(host, reason):
    assert check_host(host, ALLOWED) == reason


def test_a_star_lets_any_host_through():
    assert check_host("anything.example", {"*"}) is None and check_host("a:b:c", {"*"}) is None


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        (None, "127.0.0.1:8080", ()),  # not a browser: ffmpeg, an NVR, aiortc
        ("http://127.0.0.1:8080", "127.0.0.1:8080", ()),
        ("http://cam.example.org", "cam.example.org", ()),
        ("https://cam.example.org", "cam.example.org", ()),  # a TLS reverse proxy in front
        ("http://cam.example.org", "cam.example.org:80", ()),
        ("https://dashboard.example.org", "127.0.0.1:8080", ("https://dashboard.example.org",)),
        ("https://anyone.example", "127.0.0.1:8080", ("*",)),
    ],
)
def test_same_origin_and_configured_origins_pass(origin, host, allowed):
    assert check_origin(origin, host, allowed) is None


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("https://evil.example", "127.0.0.1:8080"),
        ("http://127.0.0.1:9999", "127.0.0.1:8080"),  # another service on this machine
        ("http://127.0.0.1", "127.0.0.1:8080"),
        ("null", "127.0.0.1:8080"),  # a sandboxed frame or a file: page
        ("ftp://127.0.0.1:8080", "127.0.0.1:8080"),
        ("http://127.0.0.1:8080", None),
    ],
)
def test_cross_site_origins_are_refused_with_the_reason(origin, host):
    reason = f"cross-site request from Origin {origin!r} refused; allow it in http.cors_origins"
    assert check_origin(origin, host, ("https://dashboard.example.org",)) == reason


# -- the token file


def test_the_token_is_made_once_kept_0600_and_reused(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    state = tmp_path / "state"
    token = load_or_create_token(state)
    path = state / TOKEN_FILE
    assert len(token) >= 40 and path.read_text() == token + "\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert os.listdir(state) == [TOKEN_FILE]  # the temporary file was renamed, not left
    assert load_or_create_token(state) == token
    assert f"new viewer token written to {path}" in caplog.text and token not in caplog.text


def test_a_readable_token_file_is_made_private_and_a_bad_one_replaced(tmp_path, caplog):
    path = tmp_path / TOKEN_FILE
    path.write_text(TOKEN + "\n")
    path.chmod(0o644)
    assert load_or_create_token(tmp_path) == TOKEN
    assert path.stat().st_mode & 0o777 == 0o600
    assert f"{path} was readable by other users; made it 0600" in caplog.text
    path.write_text("short\n")
    fresh = load_or_create_token(tmp_path)
    assert fresh not in (TOKEN, "short") and path.read_text() == fresh + "\n"
    assert f"{path} does not hold a valid token; writing a new one" in caplog.text


def test_write_private_replaces_whole(tmp_path):
    path = tmp_path / "f"
    write_private(path, "one")
    write_private(path, "two")
    assert path.read_text() == "two" and path.stat().st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["f"]


# -- configuration


def test_auth_defaults_to_a_token():
    c = load()
    assert (c.auth.mode, c.auth.token, c.auth.protect_metrics, c.auth.protect_healthz) == ("token", "", True, False)
    assert c.http.allowed_hosts == ()


def test_auth_from_file_environment_and_flags():
    encoded = hash_password(PASSWORD)
    text = f'[auth]\nmode = "password"\nuser = "viewer"\npassword_hash = "{encoded}"\nprotect_metrics = false\n'
    c = load(text)
    assert (c.auth.mode, c.auth.user, c.auth.password_hash, c.auth.protect_metrics) == (
        "password", "viewer", encoded, False,
    )  # fmt: skip
    c = load(text, {"CAMRELAY_AUTH_MODE": "token", "CAMRELAY_AUTH_TOKEN": TOKEN, "CAMRELAY_HTTP_ALLOWED_HOSTS": "a b"})
    assert (c.auth.mode, c.auth.token, c.http.allowed_hosts) == ("token", TOKEN, ("a", "b"))
    c = load(text, {"CAMRELAY_AUTH_MODE": "token"}, {"auth.mode": "none", "http.allowed_hosts": ["Cam.Local."]})
    assert c.auth.mode == "none" and c.http.allowed_hosts == ("cam.local",)
    assert TOKEN not in repr(load(None, {"CAMRELAY_AUTH_TOKEN": TOKEN}))
    assert encoded not in repr(load(text))


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (f'[auth]\ntoken = "{TOKEN[:10]}"', "auth.token: must be at least 16 letters, digits, '-' or '_'"),
        ('[auth]\ntoken = "has spaces in it, many of them"', "auth.token: must be at least 16 letters"),
        (f'[auth]\npassword_hash = "{PASSWORD}"', "auth.password_hash: is not a password hash"),
        ("[auth]\npassword_hash = 123456789", "auth.password_hash: expected a string, got ***"),
        ("[rtsp]\nuser = 'a'\npassword = 123456789", "rtsp.password: expected a string, got ***"),
    ],
)
def test_config_errors_never_quote_a_secret(toml, message):
    with pytest.raises(ConfigError) as info:
        load(toml)
    assert str(info.value).startswith(message)
    assert "123456789" not in str(info.value) and PASSWORD not in str(info.value) and TOKEN[:10] not in str(info.value)


def test_secrets_in_a_config_file_are_named_by_key():
    text = (
        f'[auth]\npassword_hash = "{CLEAN_HASH}"\n[rtsp]\nuser = "nvr"\npassword = "{RTSP_PASSWORD}"\n'
        '[streams]\nfront = "rtsp://admin:pw@10.0.0.5/s"\nback = "rtsp://10.0.0.6/s"\n'
    )
    assert secrets_in_file(text) == ["auth.password_hash", "rtsp.password", "streams.front"]
    assert secrets_in_file('[auth]\nmode = "none"\n') == []


def test_a_config_file_with_secrets_others_can_read_gets_one_warning(tmp_path, caplog):
    path = tmp_path / "camrelay.toml"
    text = f'[rtsp]\nuser = "nvr"\npassword = "{RTSP_PASSWORD}"\n'
    path.write_text(text)
    path.chmod(0o644)
    warn_if_exposed(path, text)
    assert [r.getMessage() for r in caplog.records] == [
        f"config file {path} holds secrets (rtsp.password) and every user can read it; chmod o-r {path}"
    ]
    caplog.clear()
    for mode in (0o600, 0o640):  # 0640 root:camrelay is what install-service leaves: the relay's user reads it
        path.chmod(mode)
        warn_if_exposed(path, text)
    path.chmod(0o644)
    warn_if_exposed(path, "[http]\nport = 8080\n")
    assert caplog.records == []


@pytest.mark.parametrize("mode", [0o602, 0o620, 0o666])
def test_a_config_file_others_can_change_gets_a_warning_secrets_or_not(tmp_path, caplog, mode):
    """Whoever can write the config can name the program the relay starts as its mediamtx."""
    path = tmp_path / "camrelay.toml"
    path.write_text("[http]\nport = 8080\n")
    path.chmod(mode)
    warn_if_exposed(path, path.read_text())
    assert [r.getMessage() for r in caplog.records] == [
        f"config file {path} can be changed by users other than its owner, who could then run programs as this"
        f" relay's user; chmod go-w {path}"
    ]


def test_redact_and_the_log_filter():
    assert redact("a secret and a secret-longer one", ["secret", "secret-longer", ""]) == "a *** and a *** one"
    log_filter = SecretFilter()
    log_filter.secrets.add(TOKEN)
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "url %s", (f"/?token={TOKEN}",), None)
    log_filter.filter(plain)
    assert plain.getMessage() == "url /?token=***"
    shown = logging.LogRecord("x", logging.INFO, __file__, 1, "url %s", (f"/?token={TOKEN}",), None)
    shown.__dict__.update(SHOWS_SECRET)
    log_filter.filter(shown)
    assert shown.getMessage() == f"url /?token={TOKEN}"


# -- a real relay


def token_config(tmp_path: Path, **kw):
    config = make_config(auth=AuthConfig(mode="token"), state_dir=str(tmp_path / "state"), **kw)
    record = dataclasses.replace(config.record, enabled=True, root=str(tmp_path / "rec"))
    return dataclasses.replace(config, record=record)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(user, password)}


async def wait_for_file(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        await asyncio.sleep(0.05)


class AccessClock:
    """The access guard's clock and waits, injected: its clock stands still (no guess is refunded by time passing),
    and each wait before an answer to wrong credentials is noted (and waited: the answer still comes after it)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        await REAL_SLEEP(seconds)

    def waited_once(self, since: int) -> bool:
        """Whether exactly one wait, of a length in ``FAILURE_DELAY``, was noted after the first ``since``."""
        return len(self.waits) == since + 1 and FAILURE_DELAY[0] <= self.waits[-1] <= FAILURE_DELAY[1]


REAL_SLEEP = asyncio.sleep


@pytest.fixture
def access_clock(monkeypatch) -> AccessClock:
    import signalling.access as access_module

    clock = AccessClock()
    monkeypatch.setattr(access_module, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    monkeypatch.setattr(access_module, "asyncio", types.SimpleNamespace(**{**vars(asyncio), "sleep": clock.sleep}))
    return clock


async def status_of(http: aiohttp.ClientSession, url: str, **kw) -> tuple[int, str, str]:
    """(status, WWW-Authenticate, body) of a GET; an MJPEG stream is left after its headers."""
    async with http.get(url, **kw) as resp:
        body = "" if resp.content_type.startswith("multipart/") else await resp.text(errors="replace")
        return resp.status, resp.headers.get("WWW-Authenticate", ""), body


async def test_every_protected_url_wants_the_token_in_any_of_its_three_forms(tmp_path, http, access_clock):
    runner, relay = await start_relay(token_config(tmp_path))
    try:
        access = runner.app[ACCESS]
        token = access.token
        assert (tmp_path / "state" / TOKEN_FILE).read_text() == token + "\n"
        await wait_for_file(tmp_path / "rec" / "cam0" / "latest_image.jpg")
        for path in PROTECTED:
            url = relay.base + path
            assert await status_of(http, url) == (401, 'Bearer realm="camrelay"', "401: no viewer token\n"), path
            waits = len(access_clock.waits)
            assert await status_of(http, url, headers={"Authorization": "Bearer wrong-token"}) == (
                401, 'Bearer realm="camrelay"', "401: wrong viewer token\n",
            ), path  # fmt: skip
            assert access_clock.waited_once(waits), access_clock.waits  # answered after a random delay
            assert (await status_of(http, url, params={"token": token}))[0] == 200, path
            assert (await status_of(http, url, headers={"Authorization": f"Bearer {token}"}))[0] == 200, path
            assert (await status_of(http, url, headers={"Cookie": f"{access.cookie}={token}"}))[0] == 200, path
            assert len(access_clock.waits) == waits + 1  # the right token waits for nothing
        # Open by default: liveness, the page's JS and CSS, CORS preflights.
        for path in ("/healthz", "/static/whep.js"):
            assert (await status_of(http, relay.base + path))[0] == 200, path
        async with http.options(relay.whep()) as resp:
            assert resp.status == 204

        # WHEP: a new session wants it. (PATCH and DELETE of a session need only its URL:
        # test_players.py::test_the_session_url_is_the_capability_for_patch_and_delete.)
        async with http.post(relay.whep(), data="v=0\r\n", headers={"Content-Type": "application/sdp"}) as resp:
            assert (resp.status, await resp.text()) == (401, "401: no viewer token\n")
        viewer = WhepViewer(relay.whep(), http, headers={"Authorization": f"Bearer {token}"})
        try:
            await viewer.connect()
            await viewer.read_frames(3, clock=False)
            fragment = {"Content-Type": "application/trickle-ice-sdpfrag"}
            async with http.patch(
                viewer.location, data="a=end-of-candidates\r\n", headers={**fragment, **viewer.headers}
            ) as resp:
                assert resp.status == 204
        finally:
            await viewer.close()  # DELETE with the token
        assert relay.relay.sessions.count("cam0") == 0
        anonymous = WhepViewer(relay.whep(), http)
        try:
            with pytest.raises(WhepError) as info:
                await anonymous.connect()
            assert info.value.status == 401
        finally:
            await anonymous.close()
    finally:
        await runner.cleanup()


async def test_password_mode_wants_basic_and_metrics_healthz_are_configurable(tmp_path, http, access_clock):
    auth = AuthConfig(
        mode="password", user="viewer", password_hash=hash_password(PASSWORD), protect_metrics=False,
        protect_healthz=True,
    )  # fmt: skip
    config = make_config(auth=auth)
    runner, relay = await start_relay(config)
    good = basic("viewer", PASSWORD)
    challenge = 'Basic realm="camrelay", charset="UTF-8"'
    try:
        for path in [p for p in PROTECTED if "recordings" not in p and p != "/metrics"] + ["/healthz"]:
            url = relay.base + path
            assert await status_of(http, url) == (401, challenge, "401: user name and password required\n"), path
            for wrong in (basic("viewer", PASSWORD + "!"), basic("other", PASSWORD)):
                waits = len(access_clock.waits)
                assert await status_of(http, url, headers=wrong) == (
                    401, challenge, "401: wrong user name or password\n",
                ), path  # fmt: skip
                assert access_clock.waited_once(waits), access_clock.waits  # answered after a random delay
            waits = len(access_clock.waits)
            assert (await status_of(http, url, headers=good))[0] == 200, path
            assert len(access_clock.waits) == waits  # the right password waits for nothing
        assert (await status_of(http, relay.base + "/metrics"))[0] == 200  # protect_metrics = false
        for header in ("Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode()):
            assert (await status_of(http, relay.base + "/", headers={"Authorization": header}))[2] == (
                "401: malformed Basic credentials\n"
            )
        assert (await status_of(http, relay.base + "/", headers={"Authorization": f"Bearer {TOKEN}"}))[0] == 401
        viewer = WhepViewer(relay.whep(), http, headers=good)
        try:
            await viewer.connect()
            await viewer.read_frames(3, clock=False)
        finally:
            await viewer.close()
        assert relay.relay.sessions.count("cam0") == 0  # the DELETE was let in
    finally:
        await runner.cleanup()


async def raw_get(base: str, head: bytes) -> bytes:
    """The status line of a GET sent as bytes: headers no HTTP client would send."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /api/v1/streams HTTP/1.1\r\n" + head + b"Connection: close\r\n\r\n")
        return await reader.readline()
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"Host: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe\r\n", b"401"),
        (b"Host: 127.0.0.1\r\nCookie: camrelay_token_1=\xff\r\n", b"401"),
        (b"Host: 127.0.0.1\r\nAuthorization: Basic \xff\r\n", b"401"),
        (b"Host: \xff.example\r\n", b"403"),
        (b"Host: 127.0.0.1\r\nOrigin: \xff\r\n", b"401"),
    ],
)
async def test_undecodable_credentials_and_hosts_are_refused_not_a_500(head, status):
    runner, relay = await start_relay(make_config(auth=AuthConfig(mode="token", token=TOKEN)), wait=False)
    try:
        assert (await raw_get(relay.base, head)).split()[1] == status
    finally:
        await runner.cleanup()


async def test_the_token_survives_a_restart_and_a_configured_one_is_used_as_is(tmp_path, http):
    config = make_config(auth=AuthConfig(mode="token"), state_dir=str(tmp_path))
    tokens = []
    for _ in range(2):
        runner, relay = await start_relay(config, wait=False)
        tokens.append(runner.app[ACCESS].token)
        await runner.cleanup()
    assert tokens[0] == tokens[1] == (tmp_path / TOKEN_FILE).read_text().strip()
    assert (tmp_path / TOKEN_FILE).stat().st_mode & 0o777 == 0o600

    other = tmp_path / "other"
    runner, relay = await start_relay(make_config(auth=AuthConfig(mode="token", token=TOKEN), state_dir=str(other)))
    try:
        assert (await status_of(http, relay.base + "/api/v1/streams", params={"token": TOKEN}))[0] == 200
        assert not other.exists()  # nothing written for a configured token
    finally:
        await runner.cleanup()


async def test_the_page_flow_token_in_the_url_then_a_cookie_for_everything_else(tmp_path):
    runner, relay = await start_relay(token_config(tmp_path))
    token = runner.app[ACCESS].token
    html = {"Accept": "text/html,application/xhtml+xml"}
    # A browser's jar: it keeps cookies for IP addresses too.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        try:
            async with browser.get(relay.base + "/view/cam0", headers=html) as resp:
                page = await resp.text()
                assert resp.status == 401 and resp.content_type == "text/html"
                assert "401: no viewer token." in page and "viewer-token" in page and "?token=" in page
            async with browser.get(relay.base + "/view/cam0", params={"token": token}, headers=html) as resp:
                assert resp.status == 200
                cookie = resp.cookies[runner.app[ACCESS].cookie]
                assert cookie.value == token and cookie["httponly"] and cookie["samesite"] == "Strict"
                assert cookie["path"] == "/" and int(cookie["max-age"]) > 86400
            # What the page then fetches by itself carries only the cookie.
            for path in ("/api/v1/status", "/snapshot/cam0.jpg", "/mjpeg/cam0", "/recordings/cam0"):
                assert (await status_of(browser, relay.base + path))[0] == 200, path
            viewer = WhepViewer(relay.whep(), browser, headers={"Origin": relay.base})  # as fetch() sends it
            try:
                await viewer.connect()
                await viewer.read_frames(3, clock=False)
            finally:
                await viewer.close()
            assert relay.relay.sessions.count("cam0") == 0  # the DELETE, by cookie, ended it
        finally:
            await runner.cleanup()


async def test_a_host_that_is_not_ours_is_refused_even_with_the_token(tmp_path, http):
    config = make_config(auth=AuthConfig(mode="token", token=TOKEN), allowed_hosts=("cam.example.org",))
    runner, relay = await start_relay(config)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    try:
        for host in ("rebind.evil.example", "rebind.evil.example:8080"):
            assert await status_of(http, relay.base + "/api/v1/streams", headers={**bearer, "Host": host}) == (
                403, "", "403: Host 'rebind.evil.example' is not a name of this relay; add it to http.allowed_hosts\n"
            )  # fmt: skip
        assert (await status_of(http, relay.base + "/healthz", headers={"Host": "evil.example"}))[0] == 403
        hostname = socket.gethostname()
        for host in ("cam.example.org", "localhost:1234", f"{hostname}.local", hostname, "127.0.0.1"):
            assert (await status_of(http, relay.base + "/api/v1/streams", headers={**bearer, "Host": host}))[0] == 200
    finally:
        await runner.cleanup()


CROSS_SITE = "403: cross-site request from Origin 'https://evil.example' refused; allow it in http.cors_origins\n"


@pytest.mark.relay_config(cors_origins=("https://dashboard.example.org",))
async def test_whep_from_another_site_is_refused_unless_configured(relay_server, http):
    sdp = {"Content-Type": "application/sdp"}
    async with http.post(relay_server.whep(), data="v=0\r\n", headers={**sdp, "Origin": "https://evil.example"}) as r:
        assert (r.status, await r.text()) == (403, CROSS_SITE)
        assert "Access-Control-Allow-Origin" not in r.headers
    # A form can post only form types: the offer must be application/sdp (415 before anything is parsed).
    async with http.post(relay_server.whep(), data="v=0", headers={"Content-Type": "text/plain"}) as r:
        assert r.status == 415
    for origin in (relay_server.base, "https://dashboard.example.org", None):
        viewer = WhepViewer(relay_server.whep(), http, headers={"Origin": origin} if origin else {})
        try:
            await viewer.connect()
            await viewer.read_frames(1, clock=False)
            if origin is None:
                async with http.delete(viewer.location, headers={"Origin": "https://evil.example"}) as r:
                    assert (r.status, await r.text()) == (403, CROSS_SITE)
        finally:
            await viewer.close()
    assert relay_server.relay.sessions.count("cam0") == 0


async def test_no_secret_in_any_log_line_but_the_start_up_url(http, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    encoded = hash_password(PASSWORD)
    token_relay = await start_relay(token_config(tmp_path, rtsp=True, rtsp_user="nvr", rtsp_password=RTSP_PASSWORD))
    password_relay = await start_relay(
        make_config(auth=AuthConfig(mode="password", user="viewer", password_hash=encoded))
    )
    runners = [token_relay[0], password_relay[0]]
    try:
        relay, access = token_relay[1], runners[0].app[ACCESS]
        token = access.token
        announce(runners[0].app[RELAY], access)
        for url in (relay.base + "/api/v1/status", relay.base + "/api/v1/rtsp", relay.base + "/api/v1/streams"):
            body = (await status_of(http, url, params={"token": token}))[2]
            for secret in (token, RTSP_PASSWORD):
                assert secret not in body, url
        for kw in ({}, {"params": {"token": "wrong-" + token}}, {"headers": {"Authorization": f"Bearer {token}x"}}):
            assert token not in (await status_of(http, relay.base + "/view/cam0", **kw))[2]
        viewer = WhepViewer(relay.whep(), http, headers={"Authorization": f"Bearer {token}"})
        try:
            await viewer.connect()
            await viewer.read_frames(3, clock=False)
        finally:
            await viewer.close()
        async with http.get(relay.base + "/mjpeg/cam0", params={"token": token}) as resp:
            await resp.content.readuntil(b"\r\n\r\n")
        base = password_relay[1].base + "/api/v1/status"
        for auth in (basic("viewer", PASSWORD), basic("viewer", "not-" + PASSWORD)):
            body = (await status_of(http, base, headers=auth))[2]
            assert PASSWORD not in body and encoded not in body
    finally:
        for runner in runners:
            await runner.cleanup()
    lines = caplog.text.splitlines()
    url_lines = [line for line in lines if token in line]
    assert url_lines and all(f"viewer page: http://127.0.0.1:{relay.base.rsplit(':', 1)[1]}/?token={token}" in line
                             for line in url_lines), url_lines  # fmt: skip
    for secret in (PASSWORD, encoded, RTSP_PASSWORD, encoded.rsplit("$", 1)[1]):
        assert not [line for line in lines if secret in line]
    assert any("mediamtx" in line for line in lines) and any("stream=cam0" in line for line in lines)


async def test_open_mode_and_open_rtsp_are_said_at_start(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    runner, relay = await start_relay(make_config(rtsp=True), wait=False)
    try:
        announce(runner.app[RELAY], runner.app[ACCESS])
    finally:
        await runner.cleanup()
    port = relay.relay.config.http.port
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"auth.mode = none: the relay is open; anyone who can reach port {port} can watch every stream" in warnings
    caplog.clear()
    runner, relay = await start_relay(token_config(tmp_path, rtsp=True), wait=False)
    try:
        announce(runner.app[RELAY], runner.app[ACCESS])
    finally:
        await runner.cleanup()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    rtsp_port = relay.relay.config.rtsp.port
    assert [w for w in warnings if w.startswith(("rtsp:", "auth."))] == [
        f"rtsp: no [rtsp] user and password set; anyone who can reach port {rtsp_port} can read the streams over RTSP"
    ]


class CountingVerify:
    """Wraps ``verify_password`` (one scrypt each) to count runs and the most running at once."""

    def __init__(self, real) -> None:
        self.real = real
        self.runs = self.running = self.most_at_once = 0
        self.lock = threading.Lock()

    def __call__(self, password: str, encoded: str) -> bool:
        with self.lock:
            self.runs += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            return self.real(password, encoded)
        finally:
            with self.lock:
                self.running -= 1


async def test_a_password_flood_is_throttled_and_never_locks_the_right_password_out(monkeypatch, http, access_clock):
    import signalling.access as access_module

    counting = CountingVerify(access_module.verify_password)
    monkeypatch.setattr(access_module, "verify_password", counting)
    config = make_config(auth=AuthConfig(mode="password", user="viewer", password_hash=hash_password(PASSWORD)))
    runner, relay = await start_relay(config)
    attackers = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    # 16 connections an address: under the per-address connection cap, so every guess reaches the password check.
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(a, 0), limit=16)) for a in attackers]
    statuses: list[int] = []

    async def guess(session: aiohttp.ClientSession, n: int) -> None:
        async with session.get(relay.base + "/api/v1/streams", headers=basic("viewer", f"guess-{n}")) as resp:
            statuses.append(resp.status)
            if resp.status == 429:
                assert resp.headers["Retry-After"].isdigit()
                assert (await resp.text()).startswith("429: too many wrong passwords from 127.0.0.")

    try:
        rounds = [
            asyncio.gather(*(guess(s, i) for s in sessions for i in range(r * 50, r * 50 + 50))) for r in range(4)
        ]
        flood = asyncio.ensure_future(asyncio.gather(*rounds))
        await asyncio.sleep(0)  # the flood is under way
        # The right password from another address gets in while the flood runs.
        assert (await status_of(http, relay.base + "/api/v1/streams", headers=basic("viewer", PASSWORD)))[0] == 200
        await flood
        # One address guessing one at a time gets its burst of answers, then 429 without a scrypt.
        before = counting.runs
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.6", 0))) as patient:
            for n in range(AUTH_FAILURE_BURST + 10):
                await guess(patient, n)
        # The guard's clock stands still (access_clock): no guess comes back with time, so the counts are exact.
        assert statuses[-(AUTH_FAILURE_BURST + 10) :] == [401] * AUTH_FAILURE_BURST + [429] * 10
        assert counting.runs - before == AUTH_FAILURE_BURST
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
        await runner.cleanup()
    assert len(statuses) == 800 + AUTH_FAILURE_BURST + 10 and set(statuses) <= {401, 429}
    assert counting.most_at_once == 1  # at most one scrypt at a time: at most one core, however many guess
    # Each address got its burst and no more (one guess per 1/AUTH_FAILURE_RATE seconds after it, but the clock
    # stood still); the rest cost no scrypt. The right password's scrypt is the one more.
    print(f"flood: {before} scrypts, {statuses[:800].count(401)} answered 401")
    assert before <= len(attackers) * AUTH_FAILURE_BURST + 1
    assert statuses[:800].count(429) >= 800 - (len(attackers) * AUTH_FAILURE_BURST + 1)
