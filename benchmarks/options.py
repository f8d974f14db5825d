"""Command-line options every benchmark shares."""

from __future__ import annotations

import argparse


def add_stream_options(
    ap: argparse.ArgumentParser, size: str = "1280x720", fps: float = 30.0, bitrate: bool = True
) -> None:
    """``--size``, ``--fps`` and (unless ``bitrate`` is False) ``--bitrate``: the stream the system is fed."""
    ap.add_argument("--size", default=size, help=f"test pattern size (default {size})")
    ap.add_argument("--fps", type=float, default=fps, help=f"frames per second (default {fps:g})")
    if bitrate:
        ap.add_argument("--bitrate", default="2M", help="H.264 bit rate (default 2M; MJPEG has none)")
