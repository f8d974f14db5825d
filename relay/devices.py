"""V4L2 capture devices: find them, and list the MJPEG modes each offers.

Discovery reads sysfs (``/sys/class/video4linux``) and the stable links under
``/dev/v4l/by-id`` and ``/dev/v4l/by-path``; modes come from the V4L2 ioctls
``VIDIOC_QUERYCAP``, ``VIDIOC_ENUM_FMT``, ``VIDIOC_ENUM_FRAMESIZES`` and
``VIDIOC_ENUM_FRAMEINTERVALS``. The roots and the ioctl are parameters, so
tests feed a fake sysfs tree and real packed structs.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .logsafe import printable

log = logging.getLogger(__name__)


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("V") << 8) | nr


_READ, _READWRITE = 2, 3
CAPABILITY = struct.Struct("=16s32s32sIII3I")  # struct v4l2_capability, 104 bytes
FMTDESC = struct.Struct("=III32sII3I")  # struct v4l2_fmtdesc, 64 bytes
FRMSIZE = struct.Struct("=III6I2I")  # struct v4l2_frmsizeenum, 44 bytes
FRMIVAL = struct.Struct("=IIIII6I2I")  # struct v4l2_frmivalenum, 52 bytes
VIDIOC_QUERYCAP = _ioc(_READ, 0, CAPABILITY.size)
VIDIOC_ENUM_FMT = _ioc(_READWRITE, 2, FMTDESC.size)
VIDIOC_ENUM_FRAMESIZES = _ioc(_READWRITE, 74, FRMSIZE.size)
VIDIOC_ENUM_FRAMEINTERVALS = _ioc(_READWRITE, 75, FRMIVAL.size)
CAP_VIDEO_CAPTURE = 0x00000001
MAX_DEVICE_NAME = 128  # characters of a device's name kept: a USB string descriptor holds at most 126
CAP_DEVICE_CAPS = 0x80000000
BUF_TYPE_VIDEO_CAPTURE = 1
FRMSIZE_TYPE_DISCRETE = 1
FRMIVAL_TYPE_DISCRETE = 1
MJPEG_FOURCCS = (int.from_bytes(b"MJPG", "little"), int.from_bytes(b"JPEG", "little"))
H264_FOURCC = int.from_bytes(b"H264", "little")  # a UVC camera's own H.264 (Logitech C920, C930e, ...)
MAX_ENUM = 256  # drivers end enumeration with EINVAL; a buggy one must not loop forever

Ioctl = Callable[[int, int, bytearray], object]


@dataclass(frozen=True, slots=True)
class Mode:
    width: int
    height: int
    fps: tuple[float, ...]


@dataclass(slots=True)
class Device:
    node: str  # /dev/videoN
    name: str  # what the driver calls it
    by_id: str | None = None
    by_path: str | None = None
    modes: list[Mode] = field(default_factory=list)
    usb: str | None = None  # the USB device (its sysfs path) the camera is part of, where it is USB

    @property
    def path(self) -> str:
        """The most stable path: by-id survives re-plugging into another port."""
        return self.by_id or self.by_path or self.node


def _enum(fd: int, ioctl: Ioctl, request: int, layout: struct.Struct, *fields: object) -> list[tuple]:
    """Every answer to an enumerating ioctl: ``layout`` is packed from (index, *fields, 0, ...)."""
    pad = (0,) * (len(layout.unpack(bytes(layout.size))) - 1 - len(fields))
    out = []
    for index in range(MAX_ENUM):
        buf = bytearray(layout.pack(index, *fields, *pad))
        try:
            ioctl(fd, request, buf)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOTTY):
                break
            raise
        out.append(layout.unpack(bytes(buf)))
    return out


def capture_caps(fd: int, ioctl: Ioctl) -> int:
    buf = bytearray(CAPABILITY.size)
    ioctl(fd, VIDIOC_QUERYCAP, buf)
    fields = CAPABILITY.unpack(bytes(buf))
    caps, device_caps = fields[4], fields[5]
    return device_caps if caps & CAP_DEVICE_CAPS else caps


def fourccs(fd: int, ioctl: Ioctl) -> set[int]:
    """The pixel formats a capture node offers, as fourcc numbers."""
    return {fmt[4] for fmt in _enum(fd, ioctl, VIDIOC_ENUM_FMT, FMTDESC, BUF_TYPE_VIDEO_CAPTURE, 0, b"")}


def offers_h264(
    node: str,
    ioctl: Ioctl | None = None,
    open_node: Callable[[str], int] = lambda p: os.open(p, os.O_RDWR | os.O_NONBLOCK),
) -> bool:
    """Whether the camera at ``node`` can send H.264 itself (to pass through); False when it cannot be asked."""
    if ioctl is None:
        import fcntl

        ioctl = fcntl.ioctl
    try:
        fd = open_node(node)
    except OSError:
        return False
    try:
        return H264_FOURCC in fourccs(fd, ioctl)
    except OSError:
        return False
    finally:
        os.close(fd)


def mjpeg_modes(fd: int, ioctl: Ioctl) -> list[Mode]:
    """The MJPEG sizes and frame rates a capture node offers (discrete sizes only)."""
    formats = _enum(fd, ioctl, VIDIOC_ENUM_FMT, FMTDESC, BUF_TYPE_VIDEO_CAPTURE, 0, b"")
    modes = []
    for fmt in formats:
        fourcc = fmt[4]
        if fourcc not in MJPEG_FOURCCS:
            continue
        sizes = _enum(fd, ioctl, VIDIOC_ENUM_FRAMESIZES, FRMSIZE, fourcc)
        for size in sizes:
            if size[2] != FRMSIZE_TYPE_DISCRETE:
                continue
            width, height = size[3], size[4]
            ivals = _enum(fd, ioctl, VIDIOC_ENUM_FRAMEINTERVALS, FRMIVAL, fourcc, width, height)
            rates = sorted(
                {round(iv[6] / iv[5], 2) for iv in ivals if iv[4] == FRMIVAL_TYPE_DISCRETE and iv[5]}, reverse=True
            )
            modes.append(Mode(width, height, tuple(rates)))
    return modes


def usb_device(entry: Path) -> str | None:
    """The USB device a sysfs class entry (``/sys/class/video4linux/video0``, ``/sys/class/sound/card1``) belongs
    to: the nearest directory above where the entry really lies that has a USB vendor id; None if none has."""
    try:
        real = Path(os.path.realpath(entry))
    except OSError:
        return None
    for directory in real.parents:
        if (directory / "idVendor").is_file():
            return str(directory)
    return None


def _links(directory: Path) -> dict[str, str]:
    """Real node -> link path, for the symlinks in /dev/v4l/by-id or by-path."""
    out: dict[str, str] = {}
    if directory.is_dir():
        for link in sorted(directory.iterdir()):
            try:
                out.setdefault(os.path.realpath(link), str(link))
            except OSError:
                continue
    return out


def list_devices(
    sysfs: Path = Path("/sys/class/video4linux"),
    dev: Path = Path("/dev"),
    ioctl: Ioctl | None = None,
    open_node: Callable[[str], int] = lambda p: os.open(p, os.O_RDWR | os.O_NONBLOCK),
) -> list[Device]:
    """Every V4L2 capture node that offers MJPEG; metadata and output nodes are skipped."""
    if not sysfs.is_dir():
        return []  # not Linux, or no V4L2 at all
    if ioctl is None:
        import fcntl  # Linux only; imported here so the rest of camrelay runs elsewhere too

        ioctl = fcntl.ioctl
    by_id = _links(dev / "v4l" / "by-id")
    by_path = _links(dev / "v4l" / "by-path")
    devices = []
    for entry in sorted(sysfs.iterdir(), key=lambda p: (len(p.name), p.name)):
        if not entry.name.startswith("video"):
            continue
        node = str(dev / entry.name)
        try:  # a USB device's own product string: text it chose, shown in logs, `camrelay devices` and the API
            name = printable((entry / "name").read_text(errors="replace").strip(), MAX_DEVICE_NAME)
        except OSError:
            name = entry.name
        try:
            fd = open_node(node)
        except OSError as exc:
            log.info("device=%s cannot open: %s", node, exc.strerror)
            continue
        try:
            if not capture_caps(fd, ioctl) & CAP_VIDEO_CAPTURE:
                continue  # a metadata or output node
            modes = mjpeg_modes(fd, ioctl)
        except OSError as exc:
            log.info("device=%s cannot query: %s", node, exc.strerror)
            continue
        finally:
            os.close(fd)
        if modes:
            real = os.path.realpath(node)
            devices.append(Device(node, name, by_id.get(real), by_path.get(real), modes, usb_device(entry)))
    return devices


# The frame rate worth asking a camera for, for latency: a 60 fps mode halves the time a frame waits for the next
# (about 17 ms against 33 at 30). Past it, small sizes at 90-120 fps cost more encoding for a few ms.
FAST_FPS = 60.0


def fastest_mode(modes: list[Mode]) -> tuple[int, int, float] | None:
    """(width, height, fps) of the largest size at the highest frame rate up to ``FAST_FPS`` any mode offers;
    None when no mode names one."""
    rated = [(fps, m.width * m.height, m.width, m.height) for m in modes for fps in m.fps if fps <= FAST_FPS]
    if not rated:
        return None
    fps, _, width, height = max(rated)
    return width, height, fps


def describe(devices: list[Device], sound: dict[str, str], other_sound: list[str]) -> list[str]:
    """What ``camrelay devices`` prints: each camera, its modes and its sound (V4L2 node -> ALSA device, where
    one is on the same USB device), then the ALSA capture devices that belong to no camera."""
    lines = []
    if not devices:
        lines.append("no V4L2 capture device with MJPEG found (the relay will stream the test pattern)")
    for d in devices:
        lines.append(f"{d.path}  ({d.name}, {d.node})")
        for m in d.modes:
            rates = ", ".join(f"{r:g}" for r in m.fps) or "?"
            lines.append(f"    {m.width}x{m.height} @ {rates} fps")
        if d.node in sound:
            lines.append(f"    sound: alsa:{sound[d.node]} (on the same USB device)")
        lines.append(f"    use: camrelay serve --source cam0=v4l2:{d.path}")
        if fastest := fastest_mode(d.modes):
            width, height, fps = fastest
            lines.append(
                f"    at {fps:g} fps: camrelay serve --source 'cam0=v4l2:{d.path}#size={width}x{height}&fps={fps:g}'"
            )
    if other_sound:
        lines.append("ALSA capture devices on no camera:")
        lines += [f"    alsa:{name}" for name in other_sound]
    return lines
