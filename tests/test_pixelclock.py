import av
import numpy as np
import pytest

from relay.camera import pixelclock
from relay.camera.testpattern import PatternRenderer

T = 1_795_310_649_314  # a real capture time, ms since the epoch


def test_bits_follow_the_spec_layout():
    bits = pixelclock.encode_bits(T)
    assert len(bits) == 48
    assert bits[0] == 1 and bits[1] == 0 and bits[47] == 0
    value = int("".join(map(str, bits[2:46])), 2)
    assert value == T
    assert bits[46] == bin(T).count("1") % 2


def test_round_trip_through_a_luma_plane():
    y = np.full((360, 640), 100, dtype=np.uint8)
    pixelclock.draw(y, T)
    assert pixelclock.read(y) == T


def test_cells_are_square_and_start_at_origin():
    y = np.full((720, 1280), 77, dtype=np.uint8)
    pixelclock.draw(y, T)
    s = 1280 // 48
    assert (y[:s, :s] == 255).all()  # cell 0 white
    assert (y[:s, s : 2 * s] == 0).all()  # cell 1 black
    assert (y[s:, :] == 77).all()  # nothing below the band


def test_broken_sync_cell_reads_invalid():
    y = np.zeros((360, 640), dtype=np.uint8)
    pixelclock.draw(y, T)
    y[:13, :13] = 0
    assert pixelclock.read(y) is None


def test_broken_parity_reads_invalid():
    y = np.zeros((360, 640), dtype=np.uint8)
    pixelclock.draw(y, T)
    s = 640 // 48
    y[:s, 46 * s : 47 * s] = 255 - y[0, 46 * s]
    assert pixelclock.read(y) is None


def test_flat_picture_reads_invalid():
    assert pixelclock.read(np.full((360, 640), 200, dtype=np.uint8)) is None


def test_narrow_frames_are_refused():
    with pytest.raises(ValueError, match="below the pattern's minimum of 320"):
        pixelclock.cell_size(319)
    assert pixelclock.read(np.zeros((200, 319), dtype=np.uint8)) is None


def test_time_must_fit_44_bits():
    with pytest.raises(ValueError, match="does not fit in 44 bits"):
        pixelclock.encode_bits(1 << 44)


@pytest.mark.parametrize("size", [(320, 240), (640, 360), (1280, 720), (1920, 1080)])
def test_pattern_jpeg_reads_back_after_decode(size):
    renderer = PatternRenderer(*size)
    jpeg = renderer.jpeg(T)
    assert jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9"  # a real JPEG
    frame = av.CodecContext.create("mjpeg", "r").decode(av.Packet(jpeg))[0]
    assert (frame.width, frame.height) == size
    assert pixelclock.read(frame.to_ndarray(format="gray")) == T


def test_pattern_moves_below_the_band():
    renderer = PatternRenderer(640, 360)
    a = renderer.planes(T)[:360].copy()
    b = renderer.planes(T)[:360]
    s = 640 // 48
    assert (a[s:] != b[s:]).mean() > 0.5  # the scene changes every frame


def test_pattern_jpeg_is_the_picture_planes_draws():
    """The JPEG is a baseline 4:2:0 JFIF that FFmpeg's decoder (the worker's) reads back as the frame ``planes``
    draws for the same time and index, within JPEG's loss: luma and chroma alike."""
    drawn, encoded = PatternRenderer(640, 360), PatternRenderer(640, 360)
    for i in range(3):
        planes, jpeg = drawn.planes(T + i), encoded.jpeg(T + i)
        assert jpeg[:4] == b"\xff\xd8\xff\xe0" and b"JFIF" in jpeg[:16]  # SOI, then the JFIF APP0
        assert b"\xff\xc0" in jpeg and b"\xff\xc2" not in jpeg  # baseline, not progressive
        frame = av.CodecContext.create("mjpeg", "r").decode(av.Packet(jpeg))[0]
        assert frame.format.name == "yuvj420p"
        decoded = frame.to_ndarray()  # (H*3/2, W) like planes'
        error = np.abs(decoded.astype(np.int16) - planes.astype(np.int16))
        assert error[:360].mean() < 3 and error[360:].mean() < 2, (error[:360].mean(), error[360:].mean())
        assert pixelclock.read(decoded[:360]) == T + i
