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


def benchmark_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first paragraph as the description, the rest after the usage
    example (the second paragraph) as the epilog."""
    return argparse.ArgumentParser(
        prog=prog,
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", 2)[2],
    )


def run_facts(command: str) -> dict[str, str]:
    """When, where and how a run was made: its report's ``date``, ``machine`` and ``command``."""
    import platform
    import time

    import psutil

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores,"
        f" {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.platform()}",
        "command": command,
    }
