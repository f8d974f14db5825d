"""Secrets hidden by value, everywhere: a camera's password in any shape, in any form an error quotes it."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from urllib.parse import quote, unquote

import av
import psutil
import pytest

from benchmarks.ports import free_port
from relay.config import ConfigError, StreamConfig, load, secret_values
from relay.logsafe import redact, redact_text
from relay.source import parse_source_spec

from .conftest import make_config, start_relay

# A camera password of every shape that once slipped through or might: "s3cr3t<i>a" + the shape + "s3cr3t<i>b",
# as written in the camera's URL. Either word showing anywhere, however the rest was escaped, is a leak.
SHAPES = {
    "backslash": "\\",
    "single quote": "'",
    "double quote": '"',
    "both quotes": "'\"",
    "backslash and both quotes": "\\'\"",
    "percent": "%",
    "percent-encoded % @ : /": "%25%40%3A%2F",  # how a URL must carry them
    "non-ASCII": "äß€",
    "space": " ",
}
PASSWORDS = {shape: f"s3cr3t{i}a{chars}s3cr3t{i}b" for i, (shape, chars) in enumerate(SHAPES.items())}
CLOSED_PORT = 9  # nothing listens there: every open fails at once, with PyAV's error naming the URL

# The forms a text may show a secret in: the ways Python, JSON and URLs quote or escape it.
FORMS = {
    "as given": lambda s: s,
    "percent-decoded": unquote,
    "percent-encoded": lambda s: quote(s, safe=""),
    "percent-encoded, / kept": quote,
    "repr": lambda s: repr(s)[1:-1],
    "repr in ' quotes": lambda s: repr(s + '"')[1:-2],
    "repr of the decoded": lambda s: repr(unquote(s))[1:-1],
    "ascii": lambda s: ascii(s)[1:-1],
    "JSON": lambda s: json.dumps(s)[1:-1],
    "unicode_escape": lambda s: s.encode("unicode_escape").decode("ascii"),
    "backslashes doubled": lambda s: s.replace("\\", "\\\\"),
}


def camera_url(password: str) -> str:
    return f"rtsp://admin:{password}@127.0.0.1:{CLOSED_PORT}/stream"


def leaks(text: str, password: str) -> list[str]:
    """The words of ``password`` that ``text`` shows."""
    return [word for word in re.findall(r"s3cr3t\d+[ab]", password) if word in text]


@pytest.mark.parametrize("shape", PASSWORDS)
def test_every_form_of_a_secret_is_hidden(shape):
    password = PASSWORDS[shape]
    for form, show in FORMS.items():
        assert redact(f"x {show(password)} y", [password]) == "x *** y", form


@pytest.mark.parametrize("shape", PASSWORDS)
def test_pyavs_error_for_a_camera_hides_its_password(shape):
    url = camera_url(PASSWORDS[shape])
    with pytest.raises(OSError) as info:
        av.open(url, options={"rtsp_transport": "tcp"}, timeout=10)
    shown = f"rtsp://admin:***@127.0.0.1:{CLOSED_PORT}/stream"
    assert redact_text(str(info.value), url) in {f"[Errno 111] Connection refused: {q}{shown}{q}" for q in "'\""}


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("source 'rtspx://admin:pw@10.0.0.5/s' is odd", "source 'rtspx://admin:***@10.0.0.5/s' is odd"),
        ("rtsp:/admin:pw@host/s", "rtsp:/admin:***@host/s"),
        ("rtsp:admin:pw@host/s", "rtsp:admin:***@host/s"),
        ("refused: 'rtsp://admin:a\\\\b\\'c\"d@127.0.0.1:9/s'", "refused: 'rtsp://admin:***@127.0.0.1:9/s'"),
        ("rtsp://admin:p@ss@host/s and rtsp://u:v@w/", "rtsp://admin:***@host/s and rtsp://u:***@w/"),
        ("['rtsp://admin:pw@host/s']", "['rtsp://admin:***@host/s']"),
        # nothing to hide
        ("rtsp://127.0.0.1:8554/cam0", "rtsp://127.0.0.1:8554/cam0"),
        ("rtsp://admin@host/s", "rtsp://admin@host/s"),
        ("rtsp://[fe80::1]:554/s", "rtsp://[fe80::1]:554/s"),
        ("stream=cam0 source error: cannot open /dev/video9", "stream=cam0 source error: cannot open /dev/video9"),
    ],
)  # fmt: skip
def test_a_urls_password_is_hidden_though_nobody_said_it_was_one(text, shown):
    assert redact(text, []) == shown


def test_an_at_in_the_path_is_not_taken_for_the_end_of_the_password():
    from relay.logsafe import redact_url, url_passwords

    url = "rtsp://admin:s3cret@cam/x@1080p"
    assert url_passwords(url) == ["s3cret", base64.b64encode(b"admin:s3cret").decode()]  # and Basic's credential
    assert redact_url(url) == "rtsp://admin:***@cam/x@1080p"
    assert (
        redact("error: 's3cret' and " + repr(url), url_passwords(url))
        == "error: '***' and 'rtsp://admin:***@cam/x@1080p'"
    )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (  # Dahua, Amcrest
            "rtsp://cam/cam/realmonitor?channel=1&subtype=0&user=admin&password=hunter2",
            "rtsp://cam/cam/realmonitor?channel=1&subtype=0&user=admin&password=***",
        ),
        (  # XMEye
            "rtsp://10.0.0.5:554/user=admin_password=hunter2_channel=1_stream=0.sdp",
            "rtsp://10.0.0.5:554/user=admin_password=***_channel=1_stream=0.sdp",
        ),
        ("rtsp://cam/live?PWD=hunter2&x=1#mode=passthrough", "rtsp://cam/live?PWD=***&x=1#mode=passthrough"),
        ("rtsp://cam/live?token=hunter2", "rtsp://cam/live?token=***"),
    ],
)
def test_a_password_in_a_cameras_path_or_query_is_hidden_too(url, shown):
    """Some cameras take their password as a parameter: it was shown in full in the API, the page and the log."""
    from relay.logsafe import url_passwords
    from relay.source import parse_source_spec

    assert str(parse_source_spec(url)) == shown
    assert redact(f"could not open {url!r}", url_passwords(url)) == f"could not open {shown!r}"
    assert "hunter2" in parse_source_spec(url).unredacted()  # the worker still gets it


def test_a_huge_word_costs_no_quadratic_scan():
    # The URL pattern backtracks over a word; thousands of "a:" without an @ after them took half a second.
    word = "a:" * 8000 + "@"
    assert redact(word) == "***"
    assert redact("a:" * 8000 + " @") == "a:" * 8000 + " @"  # no @ in that word: left as it is


KINDS = "; expected test, v4l2, rtsp or file"


@pytest.mark.parametrize(
    ("toml", "env", "sources", "message"),
    [
        (
            '[streams]\ncam1 = "rtspx://admin:secret@10.0.0.5/s"', {}, None,
            f"streams.cam1: source 'rtspx://admin:***@10.0.0.5/s' has unknown kind 'rtspx'{KINDS}",
        ),
        (
            None, {"CAMRELAY_STREAMS": "cam1=rtsp:/admin:secret@host/s"}, None,
            f"streams.cam1: source 'rtsp:/admin:***@host/s' has unknown kind 'rtsp'{KINDS}",
        ),
        (
            None, {}, ["cam1=rtspx://admin:se\\cr'e\"t@host/s"],
            f"streams.cam1: source 'rtspx://admin:***@host/s' has unknown kind 'rtspx'{KINDS}",
        ),
        (
            None, {}, ["cam1=rtspx://admin:my secret@host/s"],
            f"streams.cam1: source 'rtspx://admin:***@host/s' has unknown kind 'rtspx'{KINDS}",
        ),
        (  # no "://" at all: not a URL, but what lies between the first : and the last @ may be a password
            '[streams]\ncam1 = "rtsp//admin:secret@cam"', {}, None,
            f"streams.cam1: source 'rtsp//admin:***@cam' has unknown kind 'rtsp//admin'{KINDS}",
        ),
        (
            '[streams]\ncam1 = "admin:secret@cam:554/x"', {}, None,
            f"streams.cam1: source 'admin:***@cam:554/x' has unknown kind 'admin'{KINDS}",
        ),
        (
            '[streams]\ncam1 = ["rtsp://admin:secret@host/s"]', {}, None,
            "streams.cam1: expected a source spec string, got ['rtsp://admin:***@host/s']",
        ),
        (
            '[rtsp]\npublish_url = "rtsp://nvr:secret@10.0.0.9:8554/path"', {}, None,
            "rtsp.publish_url: expected rtsp://host:port (no path), got 'rtsp://nvr:***@10.0.0.9:8554/path'",
        ),
        ('[auth]\ntoken = ["secret"]', {}, None, "auth.token: expected a string, got ***"),
        ("[auth]\npassword_hash = { hash = 'se\\cret' }", {}, None, "auth.password_hash: expected a string, got ***"),
        ("[rtsp]\nuser = 'nvr'\npassword = ['se\"cret']", {}, None, "rtsp.password: expected a string, got ***"),
        ('[webrtc]\nice_credential = ["se\\\\cr\'et"]', {}, None, "webrtc.ice_credential: expected a string, got ***"),
    ],
)  # fmt: skip
def test_config_errors_quote_no_secret(toml, env, sources, message):
    with pytest.raises(ConfigError) as info:
        load(toml, env, None, sources)
    assert str(info.value) == message


def test_the_secrets_a_configuration_holds_are_known():
    config = load(
        '[auth]\ntoken = "t0ken-t0ken-t0ken-t0ken"\n[rtsp]\nuser = "nvr"\npassword = "rtsp-pw"\n'
        'publish_url = "rtsp://me:publish-pw@10.0.0.9:8554"\n[webrtc]\nice_credential = "turn-pw"\n'
        '[streams]\ncam0 = "test:"\ncam1 = "rtsp://admin:cam-pw@10.0.0.5/s"\ncam2 = "rtsp://10.0.0.6/s"\n'
    )
    basic = {base64.b64encode(b).decode() for b in (b"me:publish-pw", b"admin:cam-pw")}  # as RTSP's Basic sends them
    assert secret_values(config) == {"t0ken-t0ken-t0ken-t0ken", "rtsp-pw", "publish-pw", "turn-pw", "cam-pw", *basic}


def test_a_cameras_basic_credential_quoted_back_is_hidden():
    """A camera that quotes the Authorization it was sent in its answer's reason (which the API shows viewers as the
    stream's last error): the credential is hidden, percent-encoded user and password decoded as the client sends."""
    from relay.logsafe import url_passwords

    secrets = url_passwords("rtsp://ad%40min:hunter%32@cam/s")
    assert redact("answered DESCRIBE with 403 Forbidden Basic YWRAbWluOmh1bnRlcjI=", secrets) == (
        "answered DESCRIBE with 403 Forbidden Basic ***"
    )


async def test_no_camera_password_shows_in_the_log_or_the_api(http, caplog):
    caplog.set_level(logging.DEBUG)
    names = {shape: f"ipcam{i}" for i, shape in enumerate(PASSWORDS)}
    streams = tuple(StreamConfig(names[s], parse_source_spec(camera_url(p))) for s, p in PASSWORDS.items())
    runner, relay = await start_relay(make_config(streams, fps=5), wait=False)
    try:
        deadline = time.monotonic() + 60
        while any(s.stats.source_errors < 1 for s in relay.relay.streams.values()):
            assert time.monotonic() < deadline, "some camera was never tried"
            await asyncio.sleep(0.1)
        shown = {}
        for path in ("/api/v1/streams", "/api/v1/status"):
            async with http.get(relay.base + path) as resp:
                shown[path] = await resp.text()
        for shape, name in names.items():
            last_error = relay.relay.streams[name].stats.last_error
            assert last_error.startswith(f"cannot open rtsp://admin:***@127.0.0.1:{CLOSED_PORT}/stream: "), shape
            assert "Connection refused" in last_error, shape
    finally:
        await runner.cleanup()
    shown["log"] = caplog.text
    assert "ipcam0" in caplog.text and "admin:***@127.0.0.1" in shown["/api/v1/streams"]
    for shape, password in PASSWORDS.items():
        for where, text in shown.items():
            assert not leaks(text, password), f"the {shape} password shows in {where}"


TOKEN = "t0ken-only-the-relay-needs"
UNRELATED = "a-secret-of-some-other-program"
STARTUP_TIMEOUT = 30.0


def test_a_password_on_the_command_line_is_warned_of_and_workers_get_no_secret_variable(tmp_path):
    password = PASSWORDS["backslash and both quotes"]
    port = free_port()
    env = dict(
        os.environ, CAMRELAY_AUTH_TOKEN=TOKEN, UNRELATED_PASSWORD=UNRELATED, CAMRELAY_STATE_DIR=str(tmp_path),
        CAMRELAY_VIDEO_SIZE="640x360", CAMRELAY_VIDEO_FPS="5",
    )  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--no-rtsp", "--http-host", "127.0.0.1", "--http-port", str(port),
         "--ice-address", "127.0.0.1", "--source", "cam0=test:", "--source", f"ipcam={camera_url(password)}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip

    def streams() -> dict[str, dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/streams")
        request.add_header("Authorization", f"Bearer {TOKEN}")
        with urllib.request.urlopen(request, timeout=5) as resp:
            return {s["name"]: s for s in json.load(resp)["streams"]}

    def wait_for(ready) -> dict[str, dict]:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                if ready(now := streams()):
                    return now
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the relay did not get there"
            time.sleep(0.2)

    try:
        before = wait_for(lambda s: s["cam0"]["frames_encoded"] > 0 and s["ipcam"]["source_errors"] > 0)
        workers = [p for p in psutil.Process(proc.pid).children() if "relay.camera.worker" in p.cmdline()]
        assert len(workers) == 2
        for worker in workers:
            environ = worker.environ()  # /proc/<pid>/environ
            assert "CAMRELAY_WORKER_CONFIG" in environ
            assert not {"CAMRELAY_AUTH_TOKEN", "UNRELATED_PASSWORD"} & environ.keys()
            assert not [k for k, v in environ.items() if TOKEN in v or UNRELATED in v]
        wait_for(lambda s: s["cam0"]["frames_encoded"] > before["cam0"]["frames_encoded"])  # still streaming
        assert all(worker.is_running() for worker in workers)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    warnings = [line for line in out.splitlines() if "--source" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        "WARNING relay: stream=ipcam: a password given with --source is visible to every local user (ps);"
        " give the source in the config file's [streams] table (chmod 600) or in CAMRELAY_STREAMS instead"
    ), warnings
    assert "stream=ipcam source error: cannot open rtsp://admin:***@127.0.0.1" in out
    assert not leaks(out, password)
