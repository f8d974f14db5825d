"""Fixtures: test RTSP cameras (``benchmarks/rtspcams.py``) on a private mediamtx, stopped after each test.

    def test_something(start_camera):
        cam = start_camera("cam0", encoding=Encoding(profile="high", gop=10.0))  # a LiveCamera, publishing
        spec = parse_source_spec(cam.url)                                          # rtsp://127.0.0.1:<port>/cam0

    start_camera("door", ResolutionChangeCamera, every=2.0)
    start_camera("yard", LoopedCamera, clip=small_clip)
    start_camera("cam1", start=False)                                              # made, not started

``camera_server`` is the mediamtx they publish into (``.ready(path)``, ``.url(path)``); each camera has
``url``, ``start()``, ``stop()`` and ``kill()`` (a ``ResolutionChangeCamera`` with ``every=0`` also ``change()``).
A test module whose cameras need a password overrides ``camera_server`` with
``CameraServer(tmp_path, credentials=(user, password))`` (``tests/test_passthrough.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from benchmarks.rtspcams import Camera, CameraServer, LiveCamera, make_clip

# A small clip for looped cameras: encoding it takes a second or two, once per session.
CLIP_SIZE, CLIP_FPS, CLIP_BITRATE, CLIP_SECONDS = (640, 360), 30.0, "1M", 2


@pytest.fixture
def camera_server(tmp_path) -> Iterator[CameraServer]:
    with CameraServer(tmp_path) as server:
        yield server


@pytest.fixture
def start_camera(camera_server) -> Iterator[Callable[..., Camera]]:
    """``start_camera(path, kind=LiveCamera, start=True, **fields)``: a camera on ``camera_server``, publishing
    (start waits until the server has its stream); every one is stopped at the end of the test."""
    made: list[Camera] = []

    def start(path: str, kind: type[Camera] = LiveCamera, start: bool = True, **fields) -> Camera:
        camera = kind(camera_server, path, **fields)
        made.append(camera)
        if start:
            camera.start()
        return camera

    try:
        yield start
    finally:
        for camera in made:
            camera.stop()


@pytest.fixture(scope="session")
def small_clip(tmp_path_factory):
    """A 2 s 640x360 30 fps clip of the test pattern (H.264 High, 1 s GOP, no B-frames) for ``LoopedCamera``."""
    return make_clip(tmp_path_factory.mktemp("clips"), *CLIP_SIZE, CLIP_FPS, CLIP_BITRATE, seconds=CLIP_SECONDS)
