"""Automatic mode: cameras found at start and plugged in later become streams, with names that stick."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

from relay.devices import Device, Mode
from relay.discovery import StreamNames, device_key

from .conftest import make_config, start_relay

PORT1 = "/dev/v4l/by-path/platform-xhci-hcd.0-usb-0:1:1.0-video-index0"
PORT2 = "/dev/v4l/by-path/platform-xhci-hcd.1-usb-0:2:1.0-video-index0"


def camera(node: str, by_path: str) -> Device:
    return Device(node, "USB Camera", None, by_path, [Mode(1280, 720, (30.0,))])


def test_names_are_stable_and_persisted(tmp_path):
    path = tmp_path / "names.json"
    names = StreamNames(path)
    assert names.name_for(PORT1, set()) == "cam0"
    assert names.name_for(PORT2, set()) == "cam1"
    assert names.name_for(PORT1, set()) == "cam0"  # plugged back in: same name
    again = StreamNames(path)  # after a restart
    assert again.name_for(PORT2, set()) == "cam1" and again.name_for(PORT1, set()) == "cam0"
    assert again.name_for("/dev/v4l/by-path/third", set()) == "cam2"
    assert json.loads(path.read_text())[PORT1] == "cam0"


def test_taken_names_are_skipped_and_a_damaged_file_starts_over(tmp_path):
    path = tmp_path / "names.json"
    path.write_text("{not json")
    names = StreamNames(path)
    assert names.name_for(PORT1, {"cam0", "cam1"}) == "cam2"


def test_a_name_in_the_file_that_is_no_stream_name_is_not_kept(tmp_path):
    """A damaged or edited file's ``../x`` would name a recordings directory: such names are dropped, and the
    device gets a fresh camN; the good names stay."""
    path = tmp_path / "names.json"
    path.write_text(json.dumps({PORT1: "../x", PORT2: "cam4", "/dev/video9": 7, "/dev/video8": "live"}))
    names = StreamNames(path)
    assert names.name_for(PORT2, set()) == "cam4"
    assert names.name_for(PORT1, set()) == "cam0"
    assert names.name_for("/dev/video9", set()) == "cam1" and names.name_for("/dev/video8", set()) == "cam2"


def test_device_key_prefers_the_physical_port():
    assert device_key(Device("/dev/video0", "x", "/dev/v4l/by-id/usb-Acme", PORT1)) == PORT1
    assert device_key(Device("/dev/video0", "x", "/dev/v4l/by-id/usb-Acme", None)) == "/dev/v4l/by-id/usb-Acme"
    assert device_key(Device("/dev/video0", "x")) == "/dev/video0"


async def wait_for(predicate, timeout=10.0, what=""):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.05)


async def test_no_camera_then_hot_plug_then_unplug_and_back(http, tmp_path):
    plugged: list[Device] = []
    looks = [0]  # how often the relay has looked for cameras

    def list_devices() -> list[Device]:
        looks[0] += 1
        return list(plugged)

    async def two_more_looks() -> None:
        """Until the relay has looked twice more: it has seen the cameras as they are now, and acted on them."""
        target = looks[0] + 2
        await wait_for(lambda: looks[0] >= target, what="discovery looking again")

    config = dataclasses.replace(make_config(), streams=(), state_dir=str(tmp_path))
    config = dataclasses.replace(config, devices=dataclasses.replace(config.devices, discover_interval=0.2))
    runner, relay = await start_relay(config, list_devices=list_devices)
    try:
        r = relay.relay
        assert list(r.streams) == ["cam0"] and str(r.streams["cam0"].spec) == "test:"  # nothing plugged: the pattern
        plugged.append(camera("/dev/video0", PORT1))
        await wait_for(lambda: "cam1" in r.streams, what="plugged camera becomes a stream")
        assert str(r.streams["cam1"].spec) == f"v4l2:{PORT1}"
        # This machine has no such device, so its worker cannot open it: the slate, not a crash.
        await wait_for(lambda: r.streams["cam1"].state == "no_signal", what="slate for a camera that cannot open")
        async with http.get(relay.base + "/api/v1/streams") as resp:
            assert [s["name"] for s in (await resp.json())["streams"]] == ["cam0", "cam1"]
        plugged.clear()  # unplugged: the stream stays (showing the slate)
        await two_more_looks()
        assert list(r.streams) == ["cam0", "cam1"]
        plugged.append(camera("/dev/video2", PORT1))  # back in the same port, another node number
        await two_more_looks()
        assert list(r.streams) == ["cam0", "cam1"]  # same stream, same name, same URLs
    finally:
        await runner.cleanup()


async def test_cameras_present_at_start_keep_their_names_across_restarts(tmp_path):
    plugged = [camera("/dev/video0", PORT1), camera("/dev/video2", PORT2)]
    config = dataclasses.replace(make_config(), streams=(), state_dir=str(tmp_path))
    config = dataclasses.replace(config, devices=dataclasses.replace(config.devices, discover=False))
    runner, relay = await start_relay(config, list_devices=lambda: list(plugged), wait=False)
    first = {name: str(s.spec) for name, s in relay.relay.streams.items()}
    await runner.cleanup()
    assert first == {"cam0": f"v4l2:{PORT1}", "cam1": f"v4l2:{PORT2}"}
    plugged.reverse()  # enumerated in the other order after a reboot
    runner, relay = await start_relay(config, list_devices=lambda: list(plugged), wait=False)
    try:
        assert {name: str(s.spec) for name, s in relay.relay.streams.items()} == first
    finally:
        await runner.cleanup()
