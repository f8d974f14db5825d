"""The synthetic camera: real JPEG frames carrying the pixel clock.

Behaves like a USB MJPEG camera (``shared/spec/test-pattern.md``): frames of
the configured size at the configured rate, each one a real JPEG, each one
stamped in its pixels with the wall-clock millisecond it was produced. Below
the band the picture scrolls and has fine detail, so it costs an encoder about
what a real scene costs.
"""

from __future__ import annotations

import time

import av
import numpy as np

from . import pixelclock
from .encode import JpegEncoder

SCROLL_PX_PER_FRAME = 4  # horizontal motion, like a slow pan
BOX_SIDE_FRACTION = 6  # the moving box is 1/6 of the frame height
GRID_STEP_PX = 40  # divides every common width (320, 640, 1280, 1920)


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
        self._u = np.broadcast_to(cx, (ch, cw)).astype(np.uint8)
        self._v = np.broadcast_to(cy, (ch, cw)).astype(np.uint8)
        self._encoder = JpegEncoder()

    def planes(self, t_ms: int) -> np.ndarray:
        """The frame for capture time ``t_ms`` as one (H*3/2, W) yuv420p array."""
        w, h = self.width, self.height
        buf = np.empty((h * 3 // 2, w), dtype=np.uint8)
        y = buf[:h]
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
        u = buf[h : h + h // 4].reshape(h // 2, w // 2)
        v = buf[h + h // 4 :].reshape(h // 2, w // 2)
        u[:] = self._u
        v[:] = self._v
        pixelclock.draw_chroma(u, w)
        pixelclock.draw_chroma(v, w)
        self._index += 1
        return buf

    def jpeg(self, t_ms: int) -> bytes:
        """A real JPEG of the frame for capture time ``t_ms``."""
        frame = av.VideoFrame.from_ndarray(self.planes(t_ms), format="yuvj420p")
        frame.color_range = 2  # full range, as JPEG is
        return self._encoder.encode(frame)


def now_ms() -> int:
    return int(time.time() * 1000)
