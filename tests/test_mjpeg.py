"""Snapshots and MJPEG over HTTP: the camera's own JPEGs, newest first, no backlog.

Judged by which frames, not by how old they are on the clock: a JPEG's pixel clock is its capture time, and the
relay's newest JPEG (``stream.jpegs.latest``) is the one to compare with. The ages themselves are measured by
``benchmarks/mjpeg.py``."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import aiohttp
import av
import pytest

from relay.camera import pixelclock
from relay.config import StreamConfig
from relay.mjpeg import JpegFeed
from relay.source import parse_source_spec

from .conftest import make_config, start_relay


def clock_of(jpeg: bytes) -> int | None:
    frame = av.CodecContext.create("mjpeg", "r").decode(av.Packet(jpeg))[0]
    return pixelclock.read(frame.to_ndarray(format="gray"))


def newest_clock(stream) -> int:
    """The capture time (ms) of the newest JPEG the relay has."""
    return int(stream.jpegs.latest.capture_time * 1000)


async def test_snapshot_is_the_newest_frame_as_the_camera_sent_it(relay_server, http):
    stream = relay_server.relay.streams["cam0"]
    clocks = []
    for _ in range(2):  # the first switches the camera's JPEGs on; the second finds them flowing
        had = stream.jpegs.latest and newest_clock(stream)
        async with http.get(relay_server.base + "/snapshot/cam0.jpg") as resp:
            assert resp.status == 200
            assert resp.content_type == "image/jpeg" and resp.headers["Cache-Control"] == "no-store"
            body = await resp.read()
        assert body[:2] == b"\xff\xd8"
        clocks.append(clock_of(body))
        assert clocks[-1] is not None and (had is None or clocks[-1] > had), (had, clocks)  # newer than it had
    async with http.get(relay_server.base + "/snapshot/nope.jpg") as resp:
        assert resp.status == 404


async def read_parts(resp: aiohttp.ClientResponse, count: int) -> list[bytes]:
    """The JPEGs of ``count`` parts of a multipart/x-mixed-replace body."""
    reader = aiohttp.MultipartReader.from_response(resp)
    out = []
    while len(out) < count:
        part = await reader.next()
        assert part is not None
        out.append(bytes(await part.read()))
    return out


async def test_mjpeg_stream_parts_are_jpegs_with_a_valid_clock(relay_server, http):
    async with http.get(relay_server.base + "/mjpeg/cam0") as resp:
        assert resp.status == 200 and resp.content_type == "multipart/x-mixed-replace"
        parts = await read_parts(resp, 20)
    clocks = [clock_of(jpeg) for jpeg in parts]
    assert None not in clocks and clocks == sorted(set(clocks)), clocks  # each a newer frame than the one before


async def slow_client(base: str, frames: int, pause: float, newest: Callable[[], int]) -> list[tuple[bytes, int]]:
    """An MJPEG client behind a slow link: a small receive buffer, and a pause after each frame. Per frame: the
    JPEG, and ``newest()`` (what the relay had) once it had read it.

    (A reader that merely pauses would have the kernel buffer megabytes for it;
    a slow link keeps the bytes on the relay's side, which is what the relay must handle.)
    """
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_LINK_BUFFER)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=SLOW_LINK_BUFFER)
    try:
        writer.write(f"GET /mjpeg/cam0 HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())  # 1.0: no chunking
        await reader.readuntil(b"\r\n\r\n")  # response headers
        out = []
        while len(out) < frames:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
            jpeg = await reader.readexactly(length)
            out.append((jpeg, newest()))
            await asyncio.sleep(pause)
        return out
    finally:
        writer.close()
        await writer.wait_closed()


SLOW_LINK_BUFFER = 4096  # far less than a frame: the bytes wait on the relay's side, as behind a slow link


async def test_a_slow_mjpeg_client_skips_frames_and_the_others_keep_up(relay_server):
    stream = relay_server.relay.streams["cam0"]
    fast_n, frames = 5, 45
    async with aiohttp.ClientSession() as session:

        async def fast():
            async with session.get(relay_server.base + "/mjpeg/cam0") as resp:
                first = await read_parts(resp, 1)
                start = stream.jpegs.latest.version
                rest = await read_parts(resp, frames - 1)
                return first + rest, stream.jpegs.latest.version - start

        async with asyncio.TaskGroup() as group:  # one failing cancels the rest
            tasks = [group.create_task(fast()) for _ in range(fast_n)]
            tasks.append(group.create_task(slow_client(relay_server.base, 6, 0.5, lambda: newest_clock(stream))))
        results = [t.result() for t in tasks]
    got, had = [clock_of(jpeg) for jpeg, _ in results[-1]], [newest for _, newest in results[-1]]
    # The relay sends the slow client a frame once it has taken the last one: each frame it gets is at least as
    # new as the relay's newest when it had read the one before the last. (A backlog would hand it frame after
    # frame of what it was too slow for, ever further behind.)
    assert None not in got and all(got[k] >= had[k - 2] for k in range(2, len(got))), (got, had)
    # Each fast client saw every frame published while it read, beside the slow one.
    for parts, published in results[:-1]:
        assert len(parts) - 1 >= published - 2, (len(parts), published)


@pytest.mark.relay_config()
async def test_non_mjpeg_sources_get_jpegs_encoded_on_demand(http, tmp_path):
    from .test_sources import write_pattern_file

    video = tmp_path / "clip.mp4"
    write_pattern_file(video)
    config = make_config((StreamConfig("clip", parse_source_spec(f"file:{video}")),), fps=15)
    runner, relay = await start_relay(config)
    try:
        async with http.get(relay.base + "/snapshot/clip.jpg") as resp:
            assert resp.status == 200
            assert clock_of(await resp.read()) is not None
    finally:
        await runner.cleanup()


async def test_the_jpeg_demand_rises_at_once_and_falls_after_the_linger():
    """A recorder wants a picture a second (keyframes do), an MJPEG client every frame: the feed asks the stream
    for the most anyone wants at once, and for less only ``linger`` after the last who wanted more left."""
    asked: list[float | None] = []
    feed = JpegFeed(asked.append, linger=0.05)
    feed.acquire(1.0)
    feed.acquire(0.0)
    feed.release(0.0)
    assert asked == [1.0, 0.0] and feed.demand == 0.0, "still every frame, for the linger"
    await asyncio.sleep(0.2)
    feed.release(1.0)
    await asyncio.sleep(0.2)
    assert asked == [1.0, 0.0, 1.0, None] and not feed.on
    await feed.close()
