"""Small, faithful implementations of the approaches camrelay is compared with."""

from __future__ import annotations

import argparse


def arguments(doc: str, port_required: bool = True) -> argparse.ArgumentParser:
    """The options every baseline takes, so the load benchmark starts them all the same way."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=port_required, default=None)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--bitrate", default="2M", help="H.264 bit rate (MJPEG ignores it: JPEG quality is the source's)")
    return ap
