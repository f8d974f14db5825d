"""``camrelay`` as a user runs it: a real process, real signals."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from benchmarks.ports import free_port, free_rtp_pair
from relay import sched

STARTUP_TIMEOUT = 20.0


def kernel_has_slices() -> bool:
    """The kernel reports a thread's slice (Linux 6.12 or later, on a machine relay.sched knows), asked without
    setting one: whether the relay then sets its own is what the test checks, not a condition of it."""
    try:
        return sched.get_slice() != 0.0
    except sched.SchedError:
        return False


def slices_of(proc: psutil.Process) -> set[float]:
    """The slice of each of ``proc``'s threads, but those that ended meanwhile."""
    slices = set()
    for thread in proc.threads():
        try:
            slices.add(sched.get_slice(thread.id))
        except sched.SchedError as exc:
            assert "ESRCH" in str(exc), exc  # gone: a thread that ended
    return slices


def run(*args, env=None, timeout=30, input=None):
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], capture_output=True, text=True, timeout=timeout, env=env, input=input
    )


def test_serve_with_no_camera_streams_the_test_pattern_and_stops_on_sigterm(tmp_path):
    port = free_port()
    rtp = free_rtp_pair()
    env = dict(
        os.environ,
        CAMRELAY_VIDEO_SIZE="640x360",
        CAMRELAY_STATE_DIR=str(tmp_path / "state"),  # made by camrelay, under its umask
        CAMRELAY_RTSP_HOST="127.0.0.1",
        CAMRELAY_RTSP_PORT=str(free_port()),
        CAMRELAY_RTSP_RTP_PORT=str(rtp),
        CAMRELAY_RTSP_RTCP_PORT=str(rtp + 1),
        CAMRELAY_RTSP_API_PORT=str(free_port()),
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relay",
            "serve",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(port),
            "--ice-address",
            "127.0.0.1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    token_file = tmp_path / "state" / "viewer-token"

    def get(path: str):  # with the viewer token camrelay made on its first start (auth is on by default)
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
        request.add_header("Authorization", f"Bearer {token_file.read_text().strip()}")
        return urllib.request.urlopen(request, timeout=2)

    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                with get("/api/v1/streams") as resp:
                    body = resp.read().decode()
                if '"frames_encoded": 0' not in body:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "relay did not come up"
            time.sleep(0.2)
        assert '"name": "cam0"' in body and '"source": "test:"' in body and '"width": 640' in body
        with get("/api/v1/rtsp") as resp:
            mediamtx_pid = json.load(resp)["mediamtx_pid"]
        assert psutil.pid_exists(mediamtx_pid)
        if kernel_has_slices():  # the relay, its camera worker and its mediamtx: every thread with the short slice
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            assert mediamtx_pid in {p.pid for p in family} and len(family) >= 3, family
            for p in family:
                with contextlib.suppress(psutil.NoSuchProcess):  # one that ended meanwhile
                    assert slices_of(p) == {sched.DEFAULT_SLICE}, p.cmdline()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0
        assert "stream=cam0 no camera found; streaming the test pattern" in out
        assert "relay stopped" in out
        if kernel_has_slices():
            assert "cpu slice: 0.2 ms for camrelay's threads and processes" in out
        token = token_file.read_text().strip()
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        assert oct(token_file.parent.stat().st_mode & 0o777) == "0o750"  # umask 027: nothing for other users
        url_lines = [line for line in out.splitlines() if token in line]
        assert len(url_lines) == 1 and url_lines[0].endswith(f"viewer page: http://127.0.0.1:{port}/?token={token}")
        assert not psutil.pid_exists(mediamtx_pid), "mediamtx outlived the relay"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize(
    ("args", "env", "line"),
    [
        (
            ["serve", "--http-port", "99999"],
            {},
            "camrelay: configuration error: http.port: must be in 1..65535, got 99999",
        ),
        (
            ["serve", "--source", "cam0=usb:0"],
            {},
            "camrelay: configuration error: streams.cam0: source 'usb:0' has unknown kind 'usb';"
            " expected test, v4l2, rtsp or file",
        ),
        (
            ["serve"],
            {"CAMRELAY_VIDEO_BITRATE": "lots"},
            "camrelay: configuration error: video.bitrate: expected a bit rate like 2M or 800k, got 'lots'",
        ),
        (
            ["serve", "--config", "/nonexistent.toml"],
            {},
            "camrelay: configuration error: config file /nonexistent.toml: No such file or directory",
        ),
    ],
)
def test_bad_configuration_exits_2_with_one_line(args, env, line):
    result = run(*args, env=dict(os.environ, **env))
    assert result.returncode == 2
    assert result.stderr.strip() == line


def test_a_config_file_that_is_not_text_is_one_clear_error(tmp_path):
    latin1 = tmp_path / "camrelay.toml"
    latin1.write_bytes('[http]\nhost = "caf\xe9"\n'.encode("latin-1"))
    cases = [
        (["serve", "--config", str(latin1)], {}, f"config file {latin1}: not UTF-8 text (byte 18)"),
        (
            ["serve"],
            {"CAMRELAY_CONFIG": "/dev/zero"},  # read without a limit, this never ended
            "config file /dev/zero: larger than 1048576 bytes; is it the right file?",
        ),
    ]
    for args, env, message in cases:
        result = run(*args, env=dict(os.environ, **env))
        assert result.returncode == 2
        assert result.stderr.strip() == f"camrelay: configuration error: {message}"


def test_port_in_use_is_one_clear_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run("serve", "--http-host", "127.0.0.1", "--http-port", str(port), "--size", "640x360", timeout=60)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"configuration error: http.port: cannot listen on 127.0.0.1:{port}: Address already in use"
            " (is another camrelay running? pick another port with --http-port)"
        )
    )
    assert "opened" not in result.stderr  # no camera was opened before the port was checked


def test_hash_password_reads_stdin_and_prints_a_hash_that_verifies():
    from relay.auth import verify_password

    result = run("hash-password", input="correct horse\n")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith("scrypt$16384$8$1$") and "correct horse" not in line
    assert verify_password("correct horse", line) and not verify_password("correct horse ", line)


def test_hash_password_refuses_an_empty_password():
    result = run("hash-password", input="\n")
    assert (result.returncode, result.stdout, result.stderr) == (2, "", "camrelay: empty password\n")


def test_devices_without_cameras_says_so():
    result = run("devices")
    assert result.returncode == 0
    assert "no V4L2 capture device with MJPEG found" in result.stdout


def test_rtsp_port_in_use_is_one_clear_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        env = dict(
            os.environ, CAMRELAY_RTSP_HOST="127.0.0.1", CAMRELAY_RTSP_PORT=str(taken), CAMRELAY_STATE_DIR=str(tmp_path)
        )
        result = run("serve", "--http-host", "127.0.0.1", "--http-port", str(free_port()), "--size", "640x360", env=env)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"cannot start: rtsp.port: port {taken} is taken (Address already in use); is another mediamtx or"
            " camrelay running? Stop it, or choose another rtsp.port"
        )
    )
    assert "opened" not in result.stderr  # no camera was started


def test_flags_of_every_section_reach_the_config():
    from relay.cli import build_parser, load_config

    args = build_parser().parse_args(["serve", "--no-audio", "--no-rtsp", "--mode", "transcode"])
    config = load_config(args, {})
    assert (config.audio.enabled, config.rtsp.enabled, config.video.mode) == (False, False, "transcode")
    assert load_config(build_parser().parse_args(["serve"]), {}).audio.enabled is True
