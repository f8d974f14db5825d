"""The HTTP server bounded: header timeouts, connection caps, fds, and quiet, secret-free error logs.

Real relays on loopback and real sockets; 127.0.0.0/8 is all loopback on
Linux, so binding a client socket to 127.0.0.2 makes it another client
address. The last two tests run ``camrelay serve`` as a process: under
``prlimit`` with 1,024 fds, and with its own log handler and secret filter.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
import types
from dataclasses import replace

import aiohttp
import psutil
import pytest

from benchmarks.ports import free_port
from relay import logsafe
from relay.config import ConfigError, load
from relay.logsafe import SecretFilter
from relay.webrtc.whepclient import WhepViewer
from signalling.server import LoopErrors

from .conftest import make_config, start_relay

SHORT = 0.5  # seconds: the header timeout of the relays that test it
LONG = 3600.0  # seconds: a header timeout that never fires during a test, so only the caps close connections
DEADLINE = 30.0  # seconds to wait for something that comes far sooner
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
HEAD_START = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # a request's head, unfinished


def bounded(**http):
    config = make_config()
    return replace(config, http=replace(config.http, **http))


async def connect(base: str, source: str = "127.0.0.1"):
    host, port = base.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port), local_addr=(source, 0))


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the relay sends until it closes the connection."""
    got = b""
    async with asyncio.timeout(DEADLINE):
        while True:
            try:
                data = await reader.read(65536)
            except ConnectionResetError:
                return got
            if not data:
                return got
            got += data


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """The status line of a keep-alive request's response; the connection stays open."""
    writer.write(HEALTHZ)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
    length = int(re.search(rb"Content-Length: (\d+)", head, re.IGNORECASE).group(1))
    await reader.readexactly(length)
    return head.split(b"\r\n")[0]


async def closed_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Whether the relay closed the connection without answering a request sent on it."""
    writer.write(HEALTHZ)
    return await until_closed(reader) == b""


async def slowloris(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """A request's head a line at a time, never finished, until the relay closes the connection."""
    writer.write(HEAD_START)
    while True:
        try:
            return await asyncio.wait_for(until_closed(reader), SHORT / 5)
        except TimeoutError:
            writer.write(b"X-Slow: 1\r\n")


async def mjpeg(base: str, source: str = "127.0.0.1"):
    reader, writer = await connect(base, source)
    writer.write(b"GET /mjpeg/cam0 HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)).startswith(b"HTTP/1.0 200")
    await next_jpeg(reader)
    return reader, writer


async def next_jpeg(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    jpeg = await reader.readexactly(length + 2)
    assert jpeg.startswith(b"\xff\xd8")
    return jpeg


def close_all(*connections) -> None:
    for _, writer in connections:
        writer.close()


def logged(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def test_idle_and_slowloris_connections_are_closed_while_an_mjpeg_stream_goes_on():
    runner, relay = await start_relay(bounded(header_timeout=SHORT))
    idle, slow, kept, stream = [], [], [], []
    try:
        stream.append(await mjpeg(relay.base))
        idle += [await connect(relay.base) for _ in range(5)]
        slow += [await connect(relay.base) for _ in range(5)]
        kept.append(await connect(relay.base))
        assert await answer(*kept[0]) == b"HTTP/1.1 200 OK"  # then idle, kept alive
        results = await asyncio.gather(
            *(until_closed(r) for r, _ in idle), *(slowloris(*c) for c in slow), until_closed(kept[0][0])
        )
        assert results == [b""] * 11  # closed, without an answer
        # The stream began before all of those and outlived them: it is never timed out.
        for _ in range(5):
            await next_jpeg(stream[0][0])
    finally:
        close_all(*idle, *slow, *kept, *stream)
        await runner.cleanup()


async def test_a_client_that_stops_reading_is_closed_and_its_slot_freed(monkeypatch, caplog):
    import signalling.server as server

    monkeypatch.setattr(server, "WRITE_STALL", 1.0)
    monkeypatch.setattr(server, "SWEEP_INTERVAL", 0.2)
    runner, relay = await start_relay(bounded(max_connections=6, max_connections_per_address=6, header_timeout=SHORT))
    guard = runner.app[server.GUARD]
    stalled, stream, frames = [], [], [0]

    async def watch() -> None:  # a viewer that keeps reading, however long its response runs: never cut
        while True:
            await next_jpeg(stream[0][0])
            frames[0] += 1

    host, port = relay.base.removeprefix("http://").split(":")
    try:
        stream.append(await mjpeg(relay.base))
        watching = asyncio.ensure_future(watch())
        for _ in range(5):  # the other slots: pipelined requests (files, sent by sendfile) never read
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            sock.bind(("127.0.0.3", 0))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"GET /static/whep.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 400)
            stalled.append((reader, writer))
        # Each is closed once its unsent bytes have not moved for WRITE_STALL ...
        async with asyncio.timeout(DEADLINE):
            while "127.0.0.3" in guard.per_client:
                await asyncio.sleep(0.1)
        # ... a newcomer gets a slot, and the viewer that kept reading goes on.
        stalled.append(await connect(relay.base, "127.0.0.2"))
        assert await answer(*stalled[-1]) == b"HTTP/1.1 200 OK"
        seen = frames[0]
        async with asyncio.timeout(DEADLINE):
            while frames[0] < seen + 5:
                await asyncio.sleep(0.05)
        assert not watching.done()
        watching.cancel()
        closed = logged(caplog, "bytes unread for")
        assert closed and all(
            re.fullmatch(r"http closed connection from 127\.0\.0\.3: \d+ bytes unread for 1s.*", line)
            for line in closed
        )
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no asyncio callback errors
    finally:
        close_all(*stalled, *stream)
        await runner.cleanup()


async def test_an_address_over_its_cap_is_refused_at_once_and_others_are_served(http, caplog):
    cap, extra = 4, 3
    runner, relay = await start_relay(bounded(max_connections_per_address=cap, header_timeout=LONG))
    held = []
    try:
        held += [await connect(relay.base, "127.0.0.2") for _ in range(cap + extra)]
        async with http.get(relay.base + "/healthz") as resp:  # from 127.0.0.1, meanwhile
            assert resp.status == 200
        refused = await asyncio.gather(*(closed_at_once(*c) for c in held[cap:]))
        assert refused == [True] * extra
        assert [await answer(*c) for c in held[:cap]] == [b"HTTP/1.1 200 OK"] * cap
        lines = logged(caplog, "http refused connection from 127.0.0.2")
        assert 1 <= len(lines) <= extra and lines[0] == "http refused connection from 127.0.0.2: per-address cap 4"
    finally:
        close_all(*held)
        await runner.cleanup()


async def test_at_the_cap_the_longest_idle_connection_makes_room_and_streams_are_never_cut(caplog):
    cap = 6
    runner, relay = await start_relay(bounded(max_connections=cap, header_timeout=LONG))
    streams, idle, kept, new = [], [], [], []
    try:
        streams += [await mjpeg(relay.base) for _ in range(2)]  # busy for as long as they last
        idle += [await connect(relay.base, "127.0.0.3") for _ in range(3)]  # idle since they connected
        kept.append(await connect(relay.base, "127.0.0.4"))
        assert await answer(*kept[0]) == b"HTTP/1.1 200 OK"  # idle since its response: after the three
        for gone in [*idle, *kept]:  # at the cap: each newcomer closes the connection idle the longest
            new.append(await connect(relay.base, "127.0.0.5"))
            assert await until_closed(gone[0]) == b""
            assert await answer(*new[-1]) == b"HTTP/1.1 200 OK"
        assert logged(caplog, "http closed idle connection from 127.0.0.3 for one from 127.0.0.5: 6 connections open")
        close_all(*new)
        streams += [await mjpeg(relay.base, "127.0.0.6") for _ in range(4)]
        late = await connect(relay.base, "127.0.0.7")  # every connection is busy: no room
        assert await closed_at_once(*late)
        close_all(late)
        assert logged(caplog, "http refused connection from 127.0.0.7: all 6 connections busy")
        for reader, _ in streams:
            await next_jpeg(reader)
    finally:
        close_all(*streams, *idle, *kept, *new)
        await runner.cleanup()


def test_connection_limits_are_validated_naming_the_key():
    assert load(env={"CAMRELAY_HTTP_HEADER_TIMEOUT": "500ms"}).http.header_timeout == 0.5
    for toml, error in (
        ("[http]\nheader_timeout = inf", "http.header_timeout: must be a finite duration, got inf"),
        ("[http]\nheader_timeout = nan", "http.header_timeout: must be a finite duration, got nan"),
        ("[http]\nmax_connections = 0", "http.max_connections: must be in 1..100000, got 0"),
        ("[http]\nmax_connections_per_address = 'x'", "http.max_connections_per_address: expected a whole number"),
    ):
        with pytest.raises(ConfigError) as caught:
            load(toml)
        assert str(caught.value).startswith(error), str(caught.value)


def test_secret_filter_redacts_tracebacks_and_stacks():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    secrets = SecretFilter()
    secrets.secrets.add("hunter2-secret-token")
    handler.addFilter(secrets)
    logger = logging.getLogger("tests.secret_filter")
    logger.addHandler(handler)
    try:
        try:
            raise ValueError("header holds hunter2-secret-token")
        except ValueError:
            logger.error("request failed", exc_info=True, stack_info=True)
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert "hunter2" not in text
    assert "ValueError: header holds ***" in text and "Stack (most recent call last)" in text


async def test_loop_errors_are_one_line_a_second_with_a_count(caplog, monkeypatch):
    clock = types.SimpleNamespace(now=1000.0)
    monkeypatch.setattr(logsafe, "time", types.SimpleNamespace(monotonic=lambda: clock.now))  # the throttle's clock
    handler, loop = LoopErrors(), asyncio.get_running_loop()
    emfile = OSError(24, "Too many open files")
    for ms in range(3000):  # what asyncio reports while the process is out of fds: here 1,000 a second for 3 s
        clock.now = 1000.0 + ms / 1000
        handler(loop, {"message": "socket.accept() out of system resource", "exception": emfile})
    records = [r for r in caplog.records if "socket.accept()" in r.getMessage()]
    line = "http socket.accept() out of system resource: [Errno 24] Too many open files"
    more = f"{line} (and 999 more like it)"
    assert [r.getMessage() for r in records] == [line, more, more]  # at 0 s, 1 s and 2 s; the last 999 wait
    assert not any(r.exc_info for r in records)
    handler(loop, {"message": "Task exception was never retrieved", "exception": ValueError("a bug")})
    (bug,) = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert bug.getMessage() == "event loop: Task exception was never retrieved: ValueError('a bug')" and bug.exc_info


# -- camrelay serve as a process

SOURCE_ADDRESSES = [f"127.0.1.{i}" for i in range(1, 21)]  # the attack's client addresses
FD_LIMIT = 1024  # the relay's, as systemd's default soft limit
# Sockets the attack opens: more than the relay's fds (1,000 would leave an unbounded relay, which needs only
# about 10 fds of its own, room for one more viewer).
SLOWLORIS = 1200
FOLDED = re.compile(r" \(and (\d+) more like it\)$")  # a throttled line's count of the like ones it stands for


def folded(lines: list[str]) -> bool:
    """Whether log lines are throttled (``Throttled``: one a second, tested with its clock injected above): a
    single line, or later lines that count the like ones they stand for. Unthrottled, each event is a line."""
    return len(lines) == 1 or any(FOLDED.search(line) for line in lines)


def serve(tmp_path, *args: str, prefix: tuple[str, ...] = (), env: dict[str, str] | None = None):
    """``camrelay serve`` on a free port with the test pattern, logging to a file: (process, base URL, log)."""
    port = free_port()
    log = tmp_path / "relay.log"
    command = [
        *prefix, sys.executable, "-m", "relay", "serve", "--http-host", "127.0.0.1", "--http-port", str(port),
        "--ice-address", "127.0.0.1", "--no-rtsp", "--size", "640x360", "--fps", "15", "--source", "cam0=test:",
        "--state-dir", str(tmp_path), *args,
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    return proc, f"http://127.0.0.1:{port}", log


async def wait_for_frames(proc, base: str, log, headers: dict[str, str] | None = None) -> None:
    async with aiohttp.ClientSession(headers=headers) as http:
        async with asyncio.timeout(DEADLINE):
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    async with http.get(base + "/snapshot/cam0.jpg") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)


def stop(proc) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -9


def connections_held(pid: int, base: str) -> int:
    port = int(base.rsplit(":", 1)[1])
    held = psutil.Process(pid).net_connections(kind="tcp")
    return sum(1 for c in held if c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


@pytest.fixture
def fds_for_the_attack():
    """This process holds the attacking sockets: its soft fd limit goes up for the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = SLOWLORIS + FD_LIMIT
    if hard < needed:
        pytest.skip(f"the hard fd limit {hard} is below the {needed} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_viewer_is_served_during_a_slowloris_of_1200_sockets_under_a_1024_fd_limit(
    tmp_path, fds_for_the_attack
):
    proc, base, log = serve(
        tmp_path,
        "--auth",
        "none",
        prefix=("prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}"),
        env={"CAMRELAY_HTTP_HEADER_TIMEOUT": "1h"},  # only the caps can free the relay's fds
    )
    attack = []

    async def slowloris_socket(source: str) -> None:
        attack.append(await connect(base, source))
        attack[-1][1].write(HEAD_START)

    tasks = []
    try:
        await wait_for_frames(proc, base, log)
        tasks += [
            asyncio.create_task(slowloris_socket(SOURCE_ADDRESSES[i % len(SOURCE_ADDRESSES)])) for i in range(SLOWLORIS)
        ]
        await asyncio.wait(tasks, timeout=DEADLINE)  # all connected (the relay refused or closed some)
        async with asyncio.timeout(DEADLINE):
            while connections_held(proc.pid, base) < FD_LIMIT // 4:
                await asyncio.sleep(0.1)

        # The viewer's every request on a new connection: each must get in while the attack holds on.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=DEADLINE)) as http:
            async with http.get(base + "/snapshot/cam0.jpg") as resp:
                assert resp.status == 200 and (await resp.read()).startswith(b"\xff\xd8")
            viewer = WhepViewer(base + "/whep/cam0", http)
            try:
                await viewer.connect()
                assert len(await viewer.read_frames(10)) == 10
            finally:
                await viewer.close()
        assert len(attack) == SLOWLORIS  # the whole attack connected
        assert proc.poll() is None, "the relay died"
        held = connections_held(proc.pid, base)
        assert FD_LIMIT // 4 <= held <= FD_LIMIT // 2, held  # the attack goes on, within the relay's cap
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        close_all(*attack)
        assert stop(proc) == 0
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if re.search(r"http (refused|closed)|accept\(\)", line)]
    assert lines and folded(lines), lines


async def test_bad_requests_are_one_log_line_a_second_with_a_count(relay_server, monkeypatch, caplog):
    # The throttle's clock, injected: past every line logged before (the filter is process-wide), and it moves
    # only when told.
    clock = types.SimpleNamespace(now=time.monotonic() + 60)
    monkeypatch.setattr(logsafe, "time", types.SimpleNamespace(monotonic=lambda: clock.now))

    async def bad_request() -> bytes:
        reader, writer = await connect(relay_server.base)
        writer.write(b"GET /?pad=" + b"x" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # past the line limit
        try:
            return (await until_closed(reader))[:12]
        finally:
            writer.close()

    statuses = [await bad_request() for _ in range(50)]  # within one second of the throttle's clock
    clock.now += 1.0
    statuses.append(await bad_request())
    assert all(re.fullmatch(rb"HTTP/1\.[01] 400", s) for s in statuses), statuses
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("http bad request from ")]
    line = "http bad request from 127.0.0.1: LineTooLong: Got more than 8190 bytes when reading"
    assert lines == [line, f"{line} (and 49 more like it)"]
    assert not any(r.exc_info for r in caplog.records)


async def test_serve_raises_its_soft_fd_limit_to_the_hard_one(tmp_path):
    proc, base, log = serve(tmp_path, "--auth", "none", prefix=("prlimit", "--nofile=1024:4096"))
    try:
        await wait_for_frames(proc, base, log)
        assert psutil.Process(proc.pid).rlimit(psutil.RLIMIT_NOFILE) == (4096, 4096)
    finally:
        assert stop(proc) == 0
    assert "INFO signalling.server: fd limit raised from 1024 to 4096" in log.read_text()


async def test_malformed_requests_carrying_the_token_are_4xx_and_one_log_line_a_second(tmp_path):
    proc, base, log = serve(tmp_path)
    token_file = tmp_path / "viewer-token"
    try:
        async with asyncio.timeout(DEADLINE):
            while not token_file.exists():
                await asyncio.sleep(0.1)
        token = token_file.read_text().strip().encode()
        await wait_for_frames(proc, base, log, headers={"Authorization": f"Bearer {token.decode()}"})
        pad = b"x" * 9000  # past aiohttp's 8190-byte line limit
        port = base.rsplit(":", 1)[1].encode()
        shapes = [
            HEAD_START + b"Authorization: Bearer " + token + b" " + pad + b"\r\n\r\n",
            HEAD_START + b"Cookie: camrelay_token_" + port + b"=" + token + b"; pad=" + pad + b"\r\n\r\n",
            b"GET /?token=" + token + b"&pad=" + pad + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            HEAD_START + b"Bad Header " + token + b"\r\n\r\n",
        ]

        async def bad_requests(shape: bytes, n: int) -> list[bytes]:
            statuses = []
            for _ in range(n):
                reader, writer = await connect(base)
                writer.write(shape)
                statuses.append((await until_closed(reader))[:12])
                writer.close()
            return statuses

        results = await asyncio.gather(*(bad_requests(shape, 250) for shape in shapes for _ in range(2)))
        statuses = [s for r in results for s in r]
        assert len(statuses) == 2000 and all(re.fullmatch(rb"HTTP/1\.[01] 4\d\d", s) for s in statuses), set(statuses)
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert [line for line in text.splitlines() if token.decode() in line] == [
        line for line in text.splitlines() if "viewer page: " in line
    ]  # the start-up URL, the one line that may show it
    lines = [line for line in text.splitlines() if "http bad request from 127.0.0.1: " in line]
    assert lines and folded(lines), lines
    assert "http bad request from 127.0.0.1: LineTooLong: Got more than 8190 bytes when reading" in text
