"""The encoder with real JPEGs from the test pattern: what browsers need from the bitstream."""

import pytest
from av.video.frame import PictureType

from relay.camera.encode import DecodeError, EncoderSettings, H264Encoder, JpegDecoder, h264_level
from relay.camera.testpattern import PatternRenderer


def nal_units(data: bytes) -> list[bytes]:
    out, i = [], data.find(b"\x00\x00\x01")
    while i != -1:
        j = data.find(b"\x00\x00\x01", i + 3)
        nal = data[i + 3 : j if j != -1 else len(data)]
        out.append(nal.rstrip(b"\x00") if j != -1 else nal)
        i = j
    return out


def encode_pattern(frames: int, fps: float = 30, force_at: tuple[int, ...] = (), interval: float = 1.0):
    renderer = PatternRenderer(640, 360)
    decoder = JpegDecoder()
    encoder = H264Encoder(EncoderSettings(1_000_000, fps, interval, "libx264"))
    units = []
    for i in range(frames):
        picture = decoder.decode(renderer.jpeg(1_700_000_000_000 + i))
        assert picture.pict_type == PictureType.I  # what MJPEG decoding hands the encoder
        units += encoder.encode(picture, i * 3000, i in force_at)
    return units


def test_decoded_mjpeg_does_not_make_every_frame_an_idr():
    units = encode_pattern(60)
    keyframes = [i for i, (_, key, _) in enumerate(units) if key]
    assert keyframes == [0, 30]  # one a second at 30 fps, not 60


def test_forced_keyframe_is_an_idr_with_sps_and_pps():
    units = encode_pattern(20, force_at=(7,))
    assert [i for i, (_, key, _) in enumerate(units) if key] == [0, 7]
    for data, key, _ in units:
        types = [n[0] & 0x1F for n in nal_units(data)]
        if key:
            # SPS and PPS in-band before the IDR slice, every time.
            assert types.index(7) < types.index(8) < types.index(5)
        else:
            assert 5 not in types and 7 not in types


def test_constrained_baseline_no_b_frames_and_pts_kept():
    units = encode_pattern(15)
    sps = next(n for n in nal_units(units[0][0]) if n[0] & 0x1F == 7)
    profile_idc, constraints = sps[1], sps[2]
    assert profile_idc == 66  # baseline
    assert constraints & 0x40  # constraint_set1: constrained baseline, what browsers' 42e01f means
    assert [pts for _, _, pts in units] == [i * 3000 for i in range(15)]  # one out per one in: no reordering delay


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda j: b"\x00" * 100, "not a JPEG"),
        (lambda j: j[: len(j) // 3], "truncated JPEG"),
        (lambda j: j[:2] + bytes(len(j) - 4) + j[-2:], "corrupt JPEG"),
    ],
)
def test_corrupt_or_truncated_jpeg_is_a_decode_error(mangle, reason):
    jpeg = PatternRenderer(640, 360).jpeg(0)
    with pytest.raises(DecodeError, match=reason):
        JpegDecoder().decode(mangle(jpeg))


def test_levels_fit_the_stream():
    assert h264_level(1280, 720, 30) == "3.1"
    assert h264_level(1920, 1080, 30) == "4"
    assert h264_level(1920, 1080, 60) == "4.2"


def test_auto_falls_back_to_libx264_when_the_hardware_encoder_fails(monkeypatch, caplog):
    import relay.camera.encode as enc

    monkeypatch.setattr(enc, "pick_encoder", lambda requested: "h264_v4l2m2m")  # as on a Pi 4
    encoder = enc.H264Encoder(enc.EncoderSettings(1_000_000, 30, 1.0, "auto"))
    assert encoder.name == "h264_v4l2m2m"
    picture = JpegDecoder().decode(PatternRenderer(640, 360).jpeg(0))
    units = encoder.encode(picture, 0, False)  # no /dev/video11 here: opening fails
    assert encoder.name == "libx264" and units and units[0][1]
    assert "encoder=h264_v4l2m2m does not open" in caplog.text
