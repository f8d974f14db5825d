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


def test_a_devices_own_name_is_shown_printable_and_cut(tree):
    """A USB device names itself: a BadUSB "camera" whose name held a newline forged a log line of its own, and
    an escape sequence reached the terminal; bytes that are not UTF-8 stopped the listing."""
    sysfs, dev, ioctl, open_node = tree
    (sysfs / "video0" / "name").write_bytes(b"Cam\nWARNING signalling.access: forged\x1b[31m\xff" + b"x" * 200 + b"\n")
    cam = d.list_devices(sysfs, dev, ioctl, open_node)[0]
    shown = "Cam?WARNING signalling.access: forged?[31m\ufffd"
    assert cam.name == shown + "x" * (d.MAX_DEVICE_NAME - len(shown))


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


# -- sound: ALSA cards paired with cameras by USB device ------------------------------------------------------

USB_HOST = "devices/pci0000:00/0000:00:14.0/usb1"


def _usb_device(root: Path, port: str) -> Path:
    device = root / USB_HOST / port
    device.mkdir(parents=True)
    (device / "idVendor").write_text("046d\n")
    return device


def _class_link(root: Path, kind: str, name: str, real: Path) -> None:
    """As the kernel lays it out: /sys/class/<kind>/<name> is a link to where the entry really is."""
    real.mkdir(parents=True)
    (root / "class" / kind).mkdir(parents=True, exist_ok=True)
    os.symlink(real, root / "class" / kind / name)


def _card(root: Path, parent: Path, index: int, card_id: str, capture: list[int], playback: list[int] = ()) -> None:
    card = parent / "sound" / f"card{index}"
    _class_link(root, "sound", f"card{index}", card)
    (card / "id").write_text(card_id + "\n")
    for n in capture:
        _class_link(root, "sound", f"pcmC{index}D{n}c", card / f"pcmC{index}D{n}c")
    for n in playback:
        _class_link(root, "sound", f"pcmC{index}D{n}p", card / f"pcmC{index}D{n}p")


@pytest.fixture
def usb_tree(tmp_path: Path):
    """A webcam with a microphone (USB 1-2), an HDMI capture card with sound (1-3), a webcam without sound
    (1-4), the machine's own PCI sound card (capture, no USB) and an HDMI output (playback only)."""
    root, dev = tmp_path / "sys", tmp_path / "dev"
    dev.mkdir()
    webcam, capture_card, mute = (_usb_device(root, p) for p in ("1-2", "1-3", "1-4"))
    for n, parent in [(0, webcam), (2, capture_card), (4, mute)]:
        _class_link(root, "video4linux", f"video{n}", parent / f"{parent.name}:1.0" / "video4linux" / f"video{n}")
        (root / "class" / "video4linux" / f"video{n}" / "name").write_text(f"camera {n}\n")
        (dev / f"video{n}").write_text("")
    _card(root, root / "devices/pci0000:00/0000:00:1f.3", 0, "PCH", capture=[0], playback=[0, 3])
    _card(root, webcam / "1-2:1.2", 1, "C920", capture=[0])
    _card(root, capture_card / "1-3:1.3", 2, "MS2109", capture=[0])
    _card(root, root / "devices/platform/hdmi", 3, "vc4hdmi0", capture=[], playback=[0])
    camera = FakeCamera(d.CAP_VIDEO_CAPTURE, [MJPG], {MJPG: [(1280, 720)]}, {(1280, 720): [30]})

    def open_node(path: str) -> int:
        return os.open(path, os.O_RDONLY)

    return root, dev, camera.ioctl, open_node, {"webcam": webcam, "card": capture_card}


def test_sound_cards_that_capture_are_listed_by_their_stable_id(usb_tree):
    from relay import alsa

    root, _dev, _ioctl, _open, usb = usb_tree
    cards = alsa.list_cards(root / "class" / "sound")
    assert [(c.index, c.id, c.capture) for c in cards] == [(0, "PCH", (0,)), (1, "C920", (0,)), (2, "MS2109", (0,))]
    assert [c.pcm for c in cards] == ["hw:CARD=PCH,DEV=0", "hw:CARD=C920,DEV=0", "hw:CARD=MS2109,DEV=0"]
    assert [c.usb for c in cards] == [None, str(usb["webcam"]), str(usb["card"])]


def test_each_camera_is_paired_with_the_sound_card_on_its_usb_device(usb_tree):
    from relay import alsa

    root, dev, ioctl, open_node, _usb = usb_tree
    devices = d.list_devices(root / "class" / "video4linux", dev, ioctl, open_node)
    assert [x.node for x in devices] == [str(dev / f"video{n}") for n in (0, 2, 4)]
    paired = alsa.pair(devices, alsa.list_cards(root / "class" / "sound"))
    assert {node: card.id for node, card in paired.items()} == {
        str(dev / "video0"): "C920",
        str(dev / "video2"): "MS2109",
    }


def test_no_sound_sysfs_means_no_cards(tmp_path):
    from relay import alsa

    assert alsa.list_cards(tmp_path / "none") == []


def test_devices_lists_each_cameras_sound_and_the_sound_of_no_camera(usb_tree):
    from relay import alsa

    root, dev, ioctl, open_node, _usb = usb_tree
    devices = d.list_devices(root / "class" / "video4linux", dev, ioctl, open_node)
    cards = alsa.list_cards(root / "class" / "sound")
    paired = alsa.pair(devices, cards)
    lines = d.describe(
        devices, {n: c.pcm for n, c in paired.items()}, [c.pcm for c in cards if c not in paired.values()]
    )
    text = "\n".join(lines)
    assert f"{dev / 'video0'})\n    1280x720 @ 30 fps\n    sound: alsa:hw:CARD=C920,DEV=0" in text
    assert f"{dev / 'video4'})\n    1280x720 @ 30 fps\n    use:" in text  # no sound line for the mute webcam
    assert text.endswith("ALSA capture devices on no camera:\n    alsa:hw:CARD=PCH,DEV=0")


def test_a_configured_cameras_sound_is_found_by_its_node_or_its_stable_link(usb_tree):
    from relay import alsa

    root, dev, _ioctl, _open, _usb = usb_tree
    video, sound = root / "class" / "video4linux", root / "class" / "sound"
    (dev / "v4l" / "by-id").mkdir(parents=True)
    link = dev / "v4l" / "by-id" / "usb-Acme_C920-video-index0"
    os.symlink(dev / "video0", link)
    assert alsa.sound_for(str(dev / "video0"), video, sound) == "hw:CARD=C920,DEV=0"
    assert alsa.sound_for(str(link), video, sound) == "hw:CARD=C920,DEV=0"
    assert alsa.sound_for(str(dev / "video2"), video, sound) == "hw:CARD=MS2109,DEV=0"
    assert alsa.sound_for(str(dev / "video4"), video, sound) == ""  # no microphone
    assert alsa.sound_for(str(dev / "video9"), video, sound) == ""  # not plugged in


def test_the_fastest_mode_up_to_60_fps_is_suggested_as_a_spec_that_selects_it():
    modes = [d.Mode(1920, 1080, (30.0,)), d.Mode(1280, 720, (60.0, 30.0)), d.Mode(640, 480, (60.0,)),
             d.Mode(320, 240, (120.0,))]  # fmt: skip
    assert d.fastest_mode(modes) == (1280, 720, 60.0)  # the largest at 60; 120 fps at 320x240 is not worth it
    assert d.fastest_mode([d.Mode(640, 480, (15.0,))]) == (640, 480, 15.0)
    assert d.fastest_mode([d.Mode(640, 480, ())]) is None
    width, height, fps = d.fastest_mode(modes)
    spec = parse_source_spec(f"v4l2:/dev/video0#size={width}x{height}&fps={fps:g}")  # what `devices` prints
    assert (spec.width, spec.height, spec.fps) == (1280, 720, 60.0)
