"""Device discovery on a fake sysfs/dev tree, with real packed V4L2 structs."""

import errno
import logging
import os
import struct
from pathlib import Path

import pytest

from relay import devices as d
from relay.source import parse_source_spec

MJPG = int.from_bytes(b"MJPG", "little")
YUYV = int.from_bytes(b"YUYV", "little")


class FakeCamera:
    """Answers V4L2 ioctls the way a UVC camera's capture node does."""

    def __init__(
        self,
        caps: int,
        formats: list[int],
        sizes: dict[int, list[tuple[int, int]]],
        fps: dict[tuple[int, int], list[int]],
    ):
        self.caps, self.formats, self.sizes, self.fps = caps, formats, sizes, fps

    def ioctl(self, fd, request, buf):
        if request == d.VIDIOC_QUERYCAP:
            buf[:] = d.CAPABILITY.pack(
                b"uvcvideo",
                b"Fake Cam",
                b"usb-0000:01:00.0-1",
                0x60000,
                self.caps | d.CAP_DEVICE_CAPS,
                self.caps,
                0,
                0,
                0,
            )
        elif request == d.VIDIOC_ENUM_FMT:
            index, kind = struct.unpack_from("=II", buf)
            if index >= len(self.formats):
                raise OSError(errno.EINVAL, "Invalid argument")
            buf[:] = d.FMTDESC.pack(index, kind, 0, b"fmt", self.formats[index], 0, 0, 0, 0)
        elif request == d.VIDIOC_ENUM_FRAMESIZES:
            index, fourcc = struct.unpack_from("=II", buf)
            sizes = self.sizes.get(fourcc, [])
            if index >= len(sizes):
                raise OSError(errno.EINVAL, "Invalid argument")
            w, h = sizes[index]
            buf[:] = d.FRMSIZE.pack(index, fourcc, d.FRMSIZE_TYPE_DISCRETE, w, h, 0, 0, 0, 0, 0, 0)
        elif request == d.VIDIOC_ENUM_FRAMEINTERVALS:
            index, fourcc, w, h = struct.unpack_from("=IIII", buf)
            rates = self.fps.get((w, h), [])
            if index >= len(rates):
                raise OSError(errno.EINVAL, "Invalid argument")
            buf[:] = d.FRMIVAL.pack(index, fourcc, w, h, d.FRMIVAL_TYPE_DISCRETE, 1, rates[index], 0, 0, 0, 0, 0, 0)
        else:
            raise OSError(errno.ENOTTY, "Inappropriate ioctl")


@pytest.fixture
def tree(tmp_path: Path):
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    for n, name in [(0, "HD Webcam: HD Webcam"), (1, "HD Webcam: HD Webcam"), (2, "Capture Card"), (10, "YUYV only")]:
        (sysfs / f"video{n}").mkdir(parents=True)
        (sysfs / f"video{n}" / "name").write_text(name + "\n")
        (dev).mkdir(exist_ok=True)
        (dev / f"video{n}").write_text("")
    (dev / "v4l" / "by-id").mkdir(parents=True)
    (dev / "v4l" / "by-path").mkdir(parents=True)
    os.symlink(dev / "video0", dev / "v4l" / "by-id" / "usb-Acme_HD_Webcam-video-index0")
    os.symlink(dev / "video2", dev / "v4l" / "by-path" / "platform-xhci-usb-0:2:1.0-video-index0")
    webcam = FakeCamera(
        d.CAP_VIDEO_CAPTURE, [YUYV, MJPG], {MJPG: [(1280, 720), (640, 480)]}, {(1280, 720): [30, 15], (640, 480): [30]}
    )
    metadata = FakeCamera(0x00800000, [], {}, {})  # V4L2_CAP_META_CAPTURE only
    card = FakeCamera(d.CAP_VIDEO_CAPTURE, [MJPG], {MJPG: [(1920, 1080)]}, {(1920, 1080): [60, 30]})
    yuyv = FakeCamera(d.CAP_VIDEO_CAPTURE, [YUYV], {YUYV: [(640, 480)]}, {})
    by_fd = {}

    def open_node(path: str) -> int:
        fd = os.open(path, os.O_RDONLY)  # a real file descriptor on the fake node
        by_fd[fd] = {"video0": webcam, "video1": metadata, "video2": card, "video10": yuyv}[Path(path).name]
        return fd

    def ioctl(fd, request, buf):
        return by_fd[fd].ioctl(fd, request, buf)

    return sysfs, dev, ioctl, open_node


def test_lists_mjpeg_capture_nodes_with_modes_and_stable_paths(tree):
    sysfs, dev, ioctl, open_node = tree
    found = d.list_devices(sysfs, dev, ioctl, open_node)
    assert [x.node for x in found] == [str(dev / "video0"), str(dev / "video2")]  # metadata and YUYV-only skipped
    cam, card = found
    assert cam.name == "HD Webcam: HD Webcam"
    assert cam.path == str(dev / "v4l" / "by-id" / "usb-Acme_HD_Webcam-video-index0")
    assert cam.modes == [d.Mode(1280, 720, (30.0, 15.0)), d.Mode(640, 480, (30.0,))]
    assert card.path == str(dev / "v4l" / "by-path" / "platform-xhci-usb-0:2:1.0-video-index0")
    assert card.modes == [d.Mode(1920, 1080, (60.0, 30.0))]


def test_no_sysfs_means_no_devices(tmp_path):
    assert d.list_devices(tmp_path / "missing", tmp_path) == []


def test_a_node_that_cannot_be_opened_is_skipped(tree, caplog):
    sysfs, dev, ioctl, _ = tree

    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied")

    with caplog.at_level(logging.INFO, logger="relay.devices"):
        assert d.list_devices(sysfs, dev, ioctl, refuse) == []
    assert "cannot open: Permission denied" in caplog.text


def test_ioctl_numbers_match_the_kernel_headers():
    assert d.VIDIOC_QUERYCAP == 0x80685600
    assert d.VIDIOC_ENUM_FMT == 0xC0405602
    assert d.VIDIOC_ENUM_FRAMESIZES == 0xC02C564A
    assert d.VIDIOC_ENUM_FRAMEINTERVALS == 0xC034564B


@pytest.mark.parametrize(("formats", "offers"), [([MJPG, d.H264_FOURCC], True), ([MJPG, YUYV], False)])
def test_a_uvc_camera_that_sends_h264_itself_is_asked_for_it(tmp_path, formats, offers):
    """A C920 lists H264 beside MJPG: its worker reads it as H.264 (to pass through) unless the stream transcodes."""
    camera = FakeCamera(d.CAP_VIDEO_CAPTURE, formats, {}, {})
    node = tmp_path / "video0"
    node.write_bytes(b"")
    assert d.offers_h264(str(node), ioctl=camera.ioctl, open_node=lambda p: os.open(p, os.O_RDONLY)) is offers


def test_a_camera_that_cannot_be_asked_is_read_as_mjpeg(tmp_path):
    assert d.offers_h264(str(tmp_path / "gone")) is False  # no such device: the MJPEG path says why


def test_the_fastest_mode_up_to_60_fps_is_suggested_as_a_spec_that_selects_it():
    modes = [d.Mode(1920, 1080, (30.0,)), d.Mode(1280, 720, (60.0, 30.0)), d.Mode(640, 480, (60.0,)),
             d.Mode(320, 240, (120.0,))]  # fmt: skip
    assert d.fastest_mode(modes) == (1280, 720, 60.0)  # the largest at 60; 120 fps at 320x240 is not worth it
    assert d.fastest_mode([d.Mode(640, 480, (15.0,))]) == (640, 480, 15.0)
    assert d.fastest_mode([d.Mode(640, 480, ())]) is None
    width, height, fps = d.fastest_mode(modes)
    spec = parse_source_spec(f"v4l2:/dev/video0#size={width}x{height}&fps={fps:g}")  # what `devices` prints
    assert (spec.width, spec.height, spec.fps) == (1280, 720, 60.0)
