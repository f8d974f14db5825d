"""The pixel clock of ``shared/spec/test-pattern.md``: write and read it.

Sans-io: plain numpy arrays in, plain values out. The writer paints the
timecode band into a luma plane; the reader recovers the capture time from
any decoded picture (an aiortc frame, a browser canvas, an RTSP client, a
recorded MP4), so latency is measured from the pixels, not from metadata.
"""

from __future__ import annotations

import numpy as np

CELLS = 48  # the band is one row of 48 square cells
TIME_BITS = 44  # cells 2..45 hold T, milliseconds since the epoch
MIN_WIDTH = 320  # the spec does not support narrower frames
WHITE = 255
BLACK = 0
THRESHOLD = 128  # a cell reads 1 when its mean luma is above this
TIME_MASK = (1 << TIME_BITS) - 1


def cell_size(width: int) -> int:
    """Side of one cell, in pixels, for a frame ``width`` pixels wide."""
    if width < MIN_WIDTH:
        raise ValueError(f"frame width {width} is below the pattern's minimum of {MIN_WIDTH}")
    return width // CELLS


def encode_bits(t_ms: int) -> list[int]:
    """The 48 cell values (1 white, 0 black) for capture time ``t_ms``."""
    if not 0 <= t_ms <= TIME_MASK:
        raise ValueError(f"time {t_ms} does not fit in {TIME_BITS} bits")
    time_bits = [(t_ms >> (TIME_BITS - 1 - i)) & 1 for i in range(TIME_BITS)]
    parity = sum(time_bits) & 1
    return [1, 0, *time_bits, parity, 0]


def decode_bits(bits: list[int]) -> int | None:
    """``T`` from 48 cell values, or None when the sync or parity cells disagree."""
    if len(bits) != CELLS or bits[0] != 1 or bits[1] != 0 or bits[47] != 0:
        return None
    time_bits = bits[2 : 2 + TIME_BITS]
    if (sum(time_bits) & 1) != bits[46]:
        return None
    value = 0
    for bit in time_bits:
        value = (value << 1) | bit
    return value


def draw(luma: np.ndarray, t_ms: int) -> None:
    """Paint the band for ``t_ms`` into a luma plane (H x W, uint8), in place."""
    s = cell_size(luma.shape[1])
    # One row of cells, widened to s pixels each and repeated s rows deep.
    row = np.repeat(np.array(encode_bits(t_ms), dtype=np.uint8) * WHITE, s)
    luma[:s, : CELLS * s] = row


def draw_chroma(chroma: np.ndarray, width: int, sub_x: int = 2, sub_y: int = 2) -> None:
    """Make the band neutral in a chroma plane subsampled by ``sub_x`` x ``sub_y``.

    Without this, colour from the picture under the band bleeds into its cells.
    """
    s = cell_size(width)
    chroma[: -(-s // sub_y), : -(-CELLS * s // sub_x)] = 128


def read(luma: np.ndarray) -> int | None:
    """The capture time ``T`` (ms) read from a luma plane, or None if it is not valid."""
    height, width = luma.shape[:2]
    if width < MIN_WIDTH:
        return None
    s = width // CELLS
    if height < s:
        return None
    side = max(2, s // 2)
    start = (s - side) // 2
    # Central square of every cell at once: rows [start, start+side), and for
    # each cell i columns [i*s+start, i*s+start+side).
    band = luma[start : start + side, : CELLS * s].astype(np.float32)
    cells = band.reshape(side, CELLS, s)[:, :, start : start + side]
    means = cells.mean(axis=(0, 2))
    return decode_bits([int(m > THRESHOLD) for m in means])
