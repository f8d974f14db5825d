"""ALSA capture devices: find them, and pair each with the camera on the same USB device.

sysfs lists every sound card (``/sys/class/sound/cardN``: its ``id``, such as
``C920`` or ``MS2109``) and every PCM (``pcmCNDMc``: capture device M of card
N). A USB webcam or HDMI capture card is one USB device with a video
interface and an audio interface, so the V4L2 node and the card found under
the same USB device are one camera's picture and sound. Cards are named for
ALSA by their id (``hw:CARD=C920,DEV=0``), which, unlike the card number,
does not change with the order devices were plugged in. The sysfs root is a
parameter, so tests feed a fake tree laid out as the kernel lays it out.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .devices import Device, usb_device

SOUND_SYSFS = Path("/sys/class/sound")
VIDEO_SYSFS = Path("/sys/class/video4linux")
_CARD = re.compile(r"card(\d+)")
_CAPTURE_PCM = re.compile(r"pcmC(\d+)D(\d+)c")


@dataclass(frozen=True, slots=True)
class SoundCard:
    index: int  # ALSA's card number: changes with plug order, so only for display
    id: str  # ALSA's card id: stable, what a PCM name uses
    capture: tuple[int, ...]  # the card's capture PCM device numbers, lowest first
    usb: str | None  # the USB device (its sysfs path) the card belongs to; None for one that is not USB

    @property
    def pcm(self) -> str:
        """ALSA's name for the card's first capture device, as PyAV's ``alsa`` input takes it."""
        return f"hw:CARD={self.id},DEV={self.capture[0]}"


def list_cards(sysfs: Path = SOUND_SYSFS) -> list[SoundCard]:
    """Every sound card that can capture, by card number; [] where there is no ALSA at all."""
    if not sysfs.is_dir():
        return []
    capture: dict[int, list[int]] = {}
    cards: dict[int, Path] = {}
    for entry in sysfs.iterdir():
        if m := _CAPTURE_PCM.fullmatch(entry.name):
            capture.setdefault(int(m.group(1)), []).append(int(m.group(2)))
        elif m := _CARD.fullmatch(entry.name):
            cards[int(m.group(1))] = entry
    found = []
    for index in sorted(cards):
        if index not in capture:
            continue  # playback only (HDMI out, a headphone jack)
        try:
            card_id = (cards[index] / "id").read_text().strip()
        except OSError:
            continue  # gone while we looked
        if card_id:
            found.append(SoundCard(index, card_id, tuple(sorted(capture[index])), usb_device(cards[index])))
    return found


def pair(devices: Iterable[Device], cards: Iterable[SoundCard]) -> dict[str, SoundCard]:
    """Each camera's sound: V4L2 node -> the card on the same USB device (the first one, if several)."""
    by_usb: dict[str, SoundCard] = {}
    for card in cards:
        if card.usb is not None:
            by_usb.setdefault(card.usb, card)
    return {d.node: by_usb[d.usb] for d in devices if d.usb is not None and d.usb in by_usb}


def sound_names(devices: list[Device], cards: list[SoundCard]) -> tuple[dict[str, str], list[str]]:
    """For ``devices.describe``: each camera's sound (V4L2 node -> PCM name), and the cards on no camera."""
    paired = pair(devices, cards)
    return {node: card.pcm for node, card in paired.items()}, [c.pcm for c in cards if c not in paired.values()]


def sound_for(video: str, video_sysfs: Path = VIDEO_SYSFS, sound_sysfs: Path = SOUND_SYSFS) -> str:
    """The PCM name of the card on the same USB device as the V4L2 camera at ``video`` (``/dev/video0``, or a
    ``/dev/v4l/by-id`` link to it); "" when it has none, is not USB, or is not there now."""
    usb = usb_device(video_sysfs / Path(os.path.realpath(video)).name)
    if usb is None:
        return ""
    return next((card.pcm for card in list_cards(sound_sysfs) if card.usb == usb), "")
