"""A start that fails unwinds exactly what it started, in reverse: no child process, no task, no socket,
no process-wide patch is left (the autouse guards in conftest.py check threads and file descriptors too)."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path

import pytest

from relay.config import StreamConfig
from relay.rtsp import MediamtxSettings, RtspError, check_ports_free
from relay.service import Relay
from relay.source import SourceSpec
from relay.webrtc import borrowed, udpbatch

from .conftest import children_running, make_config


def _nothing_left_running(config) -> None:
    left = children_running()
    assert not left, f"children left running: {[(p.pid, p.cmdline()) for p in left]}"
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert not tasks, f"tasks left running: {tasks}"
    assert not (borrowed.WATCH_ICE.holders or udpbatch.PATCH.holders or borrowed.HOST_ADDRESSES.holders)
    r = config.rtsp
    check_ports_free(MediamtxSettings(r.host, r.port, r.rtp_port, r.rtcp_port))  # mediamtx's sockets are closed


async def test_a_start_that_fails_at_mediamtx_leaves_nothing_running():
    config = make_config(rtsp=True)
    config = dataclasses.replace(config, rtsp=dataclasses.replace(config.rtsp, mediamtx=shutil.which("false")))
    relay = Relay(config)
    with pytest.raises(RtspError, match="mediamtx did not start"):
        await relay.start()
    assert relay.streams == {}  # no camera was opened
    _nothing_left_running(config)


async def test_a_start_that_fails_at_a_later_stream_stops_the_streams_and_mediamtx_it_started(tmp_path: Path):
    streams = (StreamConfig("cam0", SourceSpec("test", "")), StreamConfig("cam1", SourceSpec("test", "")))
    config = make_config(streams, rtsp=True)
    root = tmp_path / "rec"
    config = dataclasses.replace(config, record=dataclasses.replace(config.record, enabled=True, root=str(root)))
    root.mkdir()
    (root / "cam1").symlink_to(tmp_path / "nowhere")  # cam1's recordings cannot be kept: its recorder cannot start
    relay = Relay(config)
    with pytest.raises(FileNotFoundError):
        await relay.start()
    cam0, cam1 = relay.streams["cam0"], relay.streams["cam1"]
    assert (cam0.state, cam1.state) == ("closed", "closed") and cam0.pid is None and cam1.pid is None
    assert relay.mediamtx is not None and relay.mediamtx.pid is None
    assert cam0.hub.subscribers == [] and cam1.hub.subscribers == []
    _nothing_left_running(config)
