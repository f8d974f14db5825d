"""The "no signal" slate a stream shows while its camera is gone.

Same size and rate as the stream, so viewers and NVRs stay connected: the
stream's name, NO SIGNAL, the time, and the pixel clock band, drawn with a
small built-in bitmap font (no font files, no imaging library).
"""

from __future__ import annotations

import time

import numpy as np

from . import pixelclock

# 5x7 glyphs, one string per row, "#" = ink.
_FONT_ROWS = {
    "A": [" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"],
    "B": ["#### ", "#   #", "#   #", "#### ", "#   #", "#   #", "#### "],
    "C": [" ### ", "#   #", "#    ", "#    ", "#    ", "#   #", " ### "],
    "D": ["#### ", "#   #", "#   #", "#   #", "#   #", "#   #", "#### "],
    "E": ["#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"],
    "F": ["#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#    "],
    "G": [" ### ", "#   #", "#    ", "# ###", "#   #", "#   #", " ####"],
    "H": ["#   #", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"],
    "I": [" ### ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "],
    "J": ["  ###", "   # ", "   # ", "   # ", "   # ", "#  # ", " ##  "],
    "K": ["#   #", "#  # ", "# #  ", "##   ", "# #  ", "#  # ", "#   #"],
    "L": ["#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####"],
    "M": ["#   #", "## ##", "# # #", "# # #", "#   #", "#   #", "#   #"],
    "N": ["#   #", "##  #", "# # #", "#  ##", "#   #", "#   #", "#   #"],
    "O": [" ### ", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "],
    "P": ["#### ", "#   #", "#   #", "#### ", "#    ", "#    ", "#    "],
    "Q": [" ### ", "#   #", "#   #", "#   #", "# # #", "#  # ", " ## #"],
    "R": ["#### ", "#   #", "#   #", "#### ", "# #  ", "#  # ", "#   #"],
    "S": [" ####", "#    ", "#    ", " ### ", "    #", "    #", "#### "],
    "T": ["#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "],
    "U": ["#   #", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "],
    "V": ["#   #", "#   #", "#   #", "#   #", "#   #", " # # ", "  #  "],
    "W": ["#   #", "#   #", "#   #", "# # #", "# # #", "## ##", "#   #"],
    "X": ["#   #", "#   #", " # # ", "  #  ", " # # ", "#   #", "#   #"],
    "Y": ["#   #", "#   #", " # # ", "  #  ", "  #  ", "  #  ", "  #  "],
    "Z": ["#####", "    #", "   # ", "  #  ", " #   ", "#    ", "#####"],
    "0": [" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "],
    "1": ["  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "],
    "2": [" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"],
    "3": ["#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "],
    "4": ["   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "],
    "5": ["#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "],
    "6": ["  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "],
    "7": ["#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "],
    "8": [" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "],
    "9": [" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "],
    ":": ["     ", "  #  ", "  #  ", "     ", "  #  ", "  #  ", "     "],
    "-": ["     ", "     ", "     ", "#####", "     ", "     ", "     "],
    "_": ["     ", "     ", "     ", "     ", "     ", "     ", "#####"],
    ".": ["     ", "     ", "     ", "     ", "     ", " ##  ", " ##  "],
    " ": ["     "] * 7,
}
FONT = {ch: np.array([[c == "#" for c in row] for row in rows], dtype=bool) for ch, rows in _FONT_ROWS.items()}
GLYPH_W, GLYPH_H = 5, 7
BACKGROUND = 40  # dark grey: clearly not a picture, still not black
INK = 220


def text_mask(text: str, scale: int) -> np.ndarray:
    """A boolean bitmap of ``text`` (unknown characters as spaces), each font pixel ``scale`` wide."""
    glyphs = [FONT.get(ch, FONT[" "]) for ch in text.upper()]
    gap = np.zeros((GLYPH_H, 1), dtype=bool)
    row = np.hstack([g for glyph in glyphs for g in (glyph, gap)]) if glyphs else np.zeros((GLYPH_H, 1), dtype=bool)
    return np.kron(row, np.ones((scale, scale), dtype=bool))


def draw_text(luma: np.ndarray, text: str, center_y: int, scale: int) -> None:
    """``text`` centred on row ``center_y``, font pixels ``scale`` wide, shrunk to fit 90 % of the width."""
    fit = int(luma.shape[1] * 0.9) // max(1, len(text) * (GLYPH_W + 1))
    mask = text_mask(text, max(1, min(scale, fit)))
    h, w = mask.shape
    H, W = luma.shape
    top, left = max(0, center_y - h // 2), max(0, (W - w) // 2)
    mask = mask[: H - top, : W - left]
    luma[top : top + mask.shape[0], left : left + mask.shape[1]][mask] = INK


def render(width: int, height: int, stream: str, t_ms: int | None = None) -> np.ndarray:
    """The slate as one (H*3/2, W) yuv420p array, stamped with the pixel clock for ``t_ms`` (default: now)."""
    if t_ms is None:
        t_ms = int(time.time() * 1000)
    buf = np.full((height * 3 // 2, width), 128, dtype=np.uint8)  # neutral chroma
    y = buf[:height]
    y[:] = BACKGROUND
    clock = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_ms / 1000))
    draw_text(y, stream, height * 3 // 10, height // 70)
    draw_text(y, "NO SIGNAL", height // 2, height // 45)
    draw_text(y, clock, height * 7 // 10, height // 100)
    if width >= pixelclock.MIN_WIDTH:
        pixelclock.draw(y, t_ms)
    return buf
