"""Small, faithful implementations of the approaches camrelay is compared with."""

from __future__ import annotations

import argparse

from benchmarks.options import add_stream_options


def arguments(doc: str, port_required: bool = True) -> argparse.ArgumentParser:
    """The options every baseline takes, so the load benchmark starts them all the same way."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=port_required, default=None)
    add_stream_options(ap)  # MJPEG takes --bitrate too and ignores it: JPEG quality is the source's
    return ap
