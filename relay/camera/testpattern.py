"""The synthetic camera: real JPEG frames carrying the pixel clock.

Behaves like a USB MJPEG camera (``shared/spec/test-pattern.md``): frames of
the configured size at the configured rate, each one a real JPEG, each one
stamped in its pixels with the wall-clock millisecond it was produced. Below
the band the picture scrolls and has fine detail, so it costs an encoder about
what a real scene costs.

A camera makes its JPEGs in its own hardware; this one makes them on the
relay's CPU, in its capture thread, and the time that takes is in every
frame's latency. libjpeg-turbo (through simplejpeg) makes them from the
planes as they are (no colour conversion, no resampling): a 720p frame in
about 2.5 ms of CPU where FFmpeg's mjpeg encoder took 6-7 ms, at a quality
whose frames are as big and take FFmpeg's decoder as long as before
(``docs/benchmarks.md``, issue 16's 60 fps).
"""

from __future__ import annotations

import time

import numpy as np
import simplejpeg

from . import pixelclock

SCROLL_PX_PER_FRAME = 4  # horizontal motion, like a slow pan
BOX_SIDE_FRACTION = 6  # the moving box is 1/6 of the frame height
GRID_STEP_PX = 40  # divides every common width (320, 640, 1280, 1920)
# libjpeg's quality (0-100). At 90 a 720p frame is 228 kB and FFmpeg's decoder (the worker's) takes as long on it
# as on the 217 kB FFmpeg's mjpeg encoder made at its q5 before ("about what a good USB camera delivers").
JPEG_QUALITY = 90


class PatternRenderer:
    """Draws pattern frames as yuvj420p planes and encodes them to JPEG."""

    def __init__(self, width: int, height: int, label: str = "test") -> None:
        pixelclock.cell_size(width)  # raises for frames the band cannot fit
        if width % 2 or height % 2:
            raise ValueError(f"test pattern size must be even, got {width}x{height}")
        self.width = width
        self.height = height
        self.label = label
        self._band = width // pixelclock.CELLS
        self._index = 0
        rng = np.random.default_rng(0x5EED)
        # A texture twice as wide as the frame, scrolled one step per frame:
        # smooth bands for the eye, fine noise for the encoder.
        # Wave periods divide the width, so the texture wraps without a seam.
        xs = np.arange(2 * width, dtype=np.float32) * (2 * np.pi / width)
        ys = np.arange(height, dtype=np.float32)[:, None]
        waves = 70 * np.sin(xs * 24) * np.cos(ys / 31.0) + 40 * np.sin(xs * 7 + ys / 50.0)
        noise = rng.normal(0, 3, (height, width)).astype(np.float32)
        texture = np.clip(128 + waves + np.tile(noise, 2), 16, 235).astype(np.uint8)
        texture[:, ::GRID_STEP_PX] = 235  # thin sharp lines: detail an encoder must keep
        texture[::GRID_STEP_PX, :] = 16
        self._texture = texture
        cw, ch = width // 2, height // 2
        cx = np.linspace(64, 192, cw, dtype=np.float32)[None, :]
        cy = np.linspace(192, 64, ch, dtype=np.float32)[:, None]
        self._u = np.ascontiguousarray(np.broadcast_to(cx, (ch, cw)), dtype=np.uint8)  # rows as libjpeg reads them
        self._v = np.ascontiguousarray(np.broadcast_to(cy, (ch, cw)), dtype=np.uint8)
        pixelclock.draw_chroma(self._u, width)
        pixelclock.draw_chroma(self._v, width)
        self._luma = np.empty((height, width), dtype=np.uint8)  # the JPEG's: the chroma never changes

    def planes(self, t_ms: int) -> np.ndarray:
        """The frame for capture time ``t_ms`` as one (H*3/2, W) yuv420p array."""
        w, h = self.width, self.height
        buf = np.empty((h * 3 // 2, w), dtype=np.uint8)
        self._draw_luma(buf[:h], t_ms)
        buf[h : h + h // 4] = self._u.reshape(-1, w)
        buf[h + h // 4 :] = self._v.reshape(-1, w)
        return buf

    def jpeg(self, t_ms: int) -> bytes:
        """A real JPEG (baseline, 4:2:0, JFIF) of the frame for capture time ``t_ms``."""
        self._draw_luma(self._luma, t_ms)
        return simplejpeg.encode_jpeg_yuv_planes(self._luma, self._u, self._v, quality=JPEG_QUALITY)

    def _draw_luma(self, y: np.ndarray, t_ms: int) -> None:
        """The next frame's luma, stamped ``t_ms``, into ``y`` (H x W)."""
        w, h = self.width, self.height
        offset = (self._index * SCROLL_PX_PER_FRAME) % w
        y[:] = self._texture[:, offset : offset + w]
        # A bright box bouncing across the picture, below the band.
        side = max(8, h // BOX_SIDE_FRACTION)
        top_min = 2 * self._band
        span_x, span_y = w - side, h - side - top_min
        step = self._index * 7
        bx = step % (2 * span_x)
        bx = bx if bx < span_x else 2 * span_x - bx
        by = (step // 2) % (2 * span_y)
        by = top_min + (by if by < span_y else 2 * span_y - by)
        y[by : by + side, bx : bx + side] = 235
        pixelclock.draw(y, t_ms)
        self._index += 1


def now_ms() -> int:
    return int(time.time() * 1000)
