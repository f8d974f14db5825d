"""relay.h264: NAL units, AVCC, parameter sets and the SPS, from real libx264 output and one fixture per bad case.

The SPS and PPS below are libx264's (PyAV 18, FFmpeg 8.1, x264 "veryfast" unless said), written as global
headers (``Flags.global_header``) for the size, profile and B-frames named::

    cc = av.CodecContext.create("libx264", "w"); cc.width, cc.height = W, H; cc.framerate = 30
    cc.options = {"preset": "veryfast", "profile": PROFILE, "x264-params": f"bframes={B}:keyint=30"}
"""

from __future__ import annotations

import base64
import dataclasses

import pytest

from relay import h264
from relay.h264 import H264Error, ParameterSets, parse_sps

BASELINE_1080 = bytes.fromhex("6742c028da01e0089f9610000003001000000303c0f1832a")  # 1920x1088 cropped to 1080
MAIN_720 = bytes.fromhex("674d401fda014016e840000003004000000f03c60ca8")
HIGH_1080_BFRAMES = bytes.fromhex("67640028acd940780227e584000003000400000300f03c60c658")  # bframes=3
HIGH_360 = bytes.fromhex("6764001eacb405017fcb08000003000800000301e078b175")
MAIN_360_BFRAMES = bytes.fromhex("674d401eeca05017fcb080000003008000001e078b16cb")  # "ultrafast", bframes=2
PPS_BASELINE = bytes.fromhex("68ce0fc8")
PPS_HIGH = bytes.fromhex("68ef8fcb")
IDR = b"\x65\x88\x84\x00\x21"  # the start of an IDR slice: its header is all a relay reads
P_SLICE = b"\x41\x9a\x02\x03"
AUD = b"\x09\xf0"
SEI = b"\x06\x05\x01\x00\x80"


def baseline_sps(*fields: str) -> bytes:
    """A Constrained Baseline 3.0 SPS whose fields after level_idc are the bit strings ``fields``."""
    bits = "".join(fields) + "1"  # rbsp_stop_one_bit, then zeros to the byte
    bits += "0" * (-len(bits) % 8)
    return b"\x67\x42\xc0\x1e" + int(bits, 2).to_bytes(len(bits) // 8, "big")


def annexb(*nals: bytes) -> bytes:
    return b"".join(b"\x00\x00\x00\x01" + n for n in nals)


# -- the SPS, from real encoders


@pytest.mark.parametrize(
    ("sps", "expected"),
    [
        (BASELINE_1080, ("42c028", "Constrained Baseline", "4.0", 1920, 1080, False)),
        (MAIN_720, ("4d401f", "Main", "3.1", 1280, 720, False)),
        (HIGH_1080_BFRAMES, ("640028", "High", "4.0", 1920, 1080, True)),
        (HIGH_360, ("64001e", "High", "3.0", 640, 360, False)),
        (MAIN_360_BFRAMES, ("4d401e", "Main", "3.0", 640, 360, True)),
    ],
)
def test_an_sps_gives_profile_level_size_rate_and_reordering(sps, expected):
    s = parse_sps(sps)
    assert (s.profile_level_id, s.profile, s.level, s.width, s.height, s.reorders) == expected
    assert s.fps == 30.0
    assert s.describe() == f"{expected[1]} {expected[2]} {expected[3]}x{expected[4]}"


def test_the_cropped_height_is_the_picture_height():
    s = parse_sps(BASELINE_1080)
    assert (s.width, s.height, s.frame_mbs_only) == (1920, 1080, True)  # 68 macroblock rows are 1088 lines


def test_reordering_is_unknown_when_the_sps_does_not_say():
    s = dataclasses.replace(parse_sps(HIGH_360), pic_order_cnt_type=0, max_num_reorder_frames=None)
    assert s.reorders is None
    assert dataclasses.replace(s, constraints=0x0C).reorders is False  # Constrained High has no B slices
    assert dataclasses.replace(s, profile_idc=66).reorders is False  # nor has Baseline


def test_emulation_prevention_bytes_are_removed_before_parsing():
    escaped = b"\x67\x00\x00\x03\x01\x00\x00\x03\x00\x00\x00\x03"
    assert h264.unescape(escaped) == b"\x67\x00\x00\x01\x00\x00\x00\x00\x00"
    assert h264.unescape(b"\x00\x03\x00") == b"\x00\x03\x00"  # one zero before 03: not an escape
    # Every fixture holds 00 00 03: read without unescaping, the VUI's fields shift and the rate comes out wrong.
    assert b"\x00\x00\x03" in HIGH_360 and parse_sps(HIGH_360).fps == 30.0


@pytest.mark.parametrize(
    ("nal", "message"),
    [
        (b"", "SPS is empty"),
        (HIGH_360[:6], "SPS is truncated: it ends inside"),
        (BASELINE_1080[:10], "SPS is truncated: it ends inside"),
        (PPS_HIGH, "NAL unit type 8 is not an SPS (7)"),
        (bytes([0x80 | 0x67]) + HIGH_360[1:], "forbidden_zero_bit"),
        (b"\x67\x64\x00\x1e" + b"\x00" * 8, "more than 31 leading zero bits"),
        (baseline_sps("00000100001"), "seq_parameter_set_id 32 is over 31"),
        (baseline_sps("1", "1", "00100"), "pic_order_cnt_type 3 is over 2"),
        # width: ue(2000) macroblocks, 32016 pixels
        (baseline_sps("1", "1", "011", "1", "0", "000000000011111010001", "1", "1", "1", "0", "0"), "32016x16"),
    ],
    ids=["empty", "truncated", "truncated-in-vui", "pps", "forbidden-bit", "golomb", "sps-id", "poc-type", "size"],
)
def test_a_broken_sps_is_an_error_naming_what_is_wrong(nal, message):
    with pytest.raises(H264Error, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_sps(nal)


# -- Annex B, AVCC, avcC, sprop-parameter-sets


def test_annexb_splits_on_three_and_four_byte_start_codes():
    data = b"\x00\x00\x00\x01" + HIGH_360 + b"\x00\x00\x01" + PPS_HIGH + b"\x00\x00\x00\x00\x01" + IDR
    assert h264.split_annexb(data) == [HIGH_360, PPS_HIGH, IDR]
    assert h264.split_annexb(b"") == []


def test_bytes_without_a_start_code_are_not_annexb():
    with pytest.raises(H264Error, match="no Annex B start code in 4 bytes"):
        h264.split_annexb(P_SLICE)


def test_avcc_becomes_annexb():
    avcc = b"".join(len(n).to_bytes(4, "big") + n for n in (HIGH_360, PPS_HIGH, IDR))
    assert h264.avcc_to_annexb(avcc) == annexb(HIGH_360, PPS_HIGH, IDR)
    two = b"".join(len(n).to_bytes(2, "big") + n for n in (P_SLICE,))
    assert h264.avcc_to_annexb(two, 2) == annexb(P_SLICE)


@pytest.mark.parametrize(
    ("data", "size", "message"),
    [
        (b"\x00\x00\x00\x09" + P_SLICE, 4, "overruns the 8-byte unit"),
        (b"\x00\x00\x00\x04" + P_SLICE + b"\x00\x00", 4, "cut off in its length field at byte 8"),
        (b"\x00\x00\x00\x00", 4, "NAL unit of 0 bytes"),
        (P_SLICE, 3, "length size 3 is not 1, 2 or 4"),
    ],
    ids=["overrun", "cut-length", "zero-length", "length-size"],
)
def test_a_broken_avcc_unit_is_an_error(data, size, message):
    with pytest.raises(H264Error, match=message):
        h264.avcc_to_annexb(data, size)


def avcc_record(sps: bytes, pps: bytes) -> bytes:
    """An avcC record as MP4 muxers write it (ISO/IEC 14496-15 5.2.4.1)."""
    return (
        bytes([1, sps[1], sps[2], sps[3], 0xFF, 0xE1]) + len(sps).to_bytes(2, "big") + sps
        + b"\x01" + len(pps).to_bytes(2, "big") + pps
    )  # fmt: skip


def test_extradata_gives_the_parameter_sets_in_avcc_and_in_annexb():
    assert h264.extradata_parameter_sets(avcc_record(HIGH_360, PPS_HIGH)) == [HIGH_360, PPS_HIGH]
    assert h264.parse_avcc(avcc_record(HIGH_360, PPS_HIGH)).length_size == 4
    assert h264.extradata_parameter_sets(annexb(HIGH_360, PPS_HIGH, SEI)) == [HIGH_360, PPS_HIGH]
    assert h264.extradata_parameter_sets(b"") == []


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (b"\x02" + avcc_record(HIGH_360, PPS_HIGH)[1:], "does not start with version 1"),
        (avcc_record(HIGH_360, PPS_HIGH)[:12], "overruns the record"),
        (avcc_record(HIGH_360, PPS_HIGH)[:7], "cut off in a parameter set's length"),
        (avcc_record(HIGH_360, PPS_HIGH)[: 8 + len(HIGH_360)], "cut off before its parameter set count"),
    ],
    ids=["version", "overrun", "cut-length", "cut-count"],
)
def test_a_broken_avcc_record_is_an_error(record, message):
    with pytest.raises(H264Error, match=message):
        h264.parse_avcc(record)


def test_sprop_parameter_sets_are_base64_sps_and_pps():
    value = f"{base64.b64encode(HIGH_360).decode()},{base64.b64encode(PPS_HIGH).decode()}"
    assert h264.parse_sprop_parameter_sets(value) == [HIGH_360, PPS_HIGH]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("Z0IAH!!,aM48gA==", "value 0 is not base64"),
        ("Z0IAH5WoFAFuQA==,", "value 1 is empty"),
        (base64.b64encode(IDR).decode(), "value 0 is NAL type 5, not an SPS"),
        (
            base64.b64encode(HIGH_360 + bytes(h264.MAX_PARAMETER_SET_BYTES)).decode(),
            "SPS of 4.* bytes is over the 4096",
        ),
    ],
    ids=["not-base64", "empty", "not-a-parameter-set", "huge"],
)
def test_a_broken_sprop_is_an_error(value, message):
    with pytest.raises(H264Error, match=message):
        h264.parse_sprop_parameter_sets(value)


def test_parameter_sets_are_taken_from_a_keyframe():
    au = b"\x00\x00\x00\x01\x67AB\x00\x00\x00\x01\x68CD\x00\x00\x01\x65slice"
    assert h264.parameter_sets(au) == b"\x00\x00\x00\x01\x67AB\x00\x00\x00\x01\x68CD"
    assert h264.parameter_sets(b"\x00\x00\x01\x41slice") is None
    assert h264.parameter_sets(b"not annex b") is None


# -- parameter sets in front of IDRs


def test_an_idr_without_parameter_sets_gets_those_from_out_of_band():
    sets = ParameterSets([HIGH_360, PPS_HIGH])  # from the SDP's sprop-parameter-sets, or the file's avcC
    assert sets.access_unit(annexb(SEI, IDR)) == (annexb(HIGH_360, PPS_HIGH, SEI, IDR), True)
    assert sets.access_unit(annexb(P_SLICE)) == (annexb(P_SLICE), False)  # only IDRs get them
    assert sets.changes == 0


def test_an_idr_that_has_its_parameter_sets_keeps_them_as_they_are():
    sets = ParameterSets()
    assert sets.access_unit(annexb(HIGH_360, PPS_HIGH, IDR)) == (annexb(HIGH_360, PPS_HIGH, IDR), True)
    assert sets.access_unit(annexb(IDR)) == (annexb(HIGH_360, PPS_HIGH, IDR), True)  # sent once, repeated after


def test_a_parameter_set_too_large_for_any_encoder_makes_its_unit_corrupt_and_is_not_kept():
    """An SPS or PPS over ``MAX_PARAMETER_SET_BYTES``, in band or out of band, is an error: the unit carrying it is
    dropped as corrupt by its caller, and the sets kept before it go on in front of the next IDRs."""
    huge_sps, huge_pps = HIGH_360 + b"\x55" * h264.MAX_PARAMETER_SET_BYTES, PPS_HIGH + b"\x55" * 4096
    with pytest.raises(H264Error, match="SPS of .* bytes is over the 4096"):
        ParameterSets([huge_sps])
    sets = ParameterSets([HIGH_360, PPS_HIGH])
    for unit, kind in ((annexb(huge_sps, PPS_HIGH, IDR), "SPS"), (annexb(HIGH_360, huge_pps, IDR), "PPS")):
        with pytest.raises(H264Error, match=f"{kind} of"):
            sets.access_unit(unit)
    assert sets.access_unit(annexb(IDR)) == (annexb(HIGH_360, PPS_HIGH, IDR), True)
    largest = HIGH_360 + b"\x55" * (h264.MAX_PARAMETER_SET_BYTES - len(HIGH_360))
    assert sets.access_unit(annexb(largest, PPS_HIGH, IDR))[1] and sets.sps == largest


def test_an_access_unit_delimiter_stays_first():
    sets = ParameterSets([HIGH_360, PPS_HIGH])
    assert sets.access_unit(annexb(AUD, IDR))[0] == annexb(AUD, HIGH_360, PPS_HIGH, IDR)


@pytest.mark.parametrize(
    "nals", [(IDR,), (SEI, IDR), (AUD, HIGH_360, PPS_HIGH, SEI, IDR, IDR), (P_SLICE, SEI), (HIGH_360, PPS_HIGH), ()]
)
def test_the_nal_units_before_the_first_slice_are_those_a_whole_split_finds_there(nals):
    data = annexb(*nals) if nals else b""
    whole = h264.split_annexb(data)
    first = next((i for i, n in enumerate(whole) if h264.nal_type(n) in (1, 5)), len(whole))
    assert h264.head_nals(data) == whole[:first]
    assert h264.head_nals(b"\x00\x00\x01" + SEI + b"\x00\x00\x01" + IDR) == [SEI]  # 3-byte start codes too


def _split_and_joined(sets: ParameterSets, data: bytes) -> bytes:
    """What access_unit made of an IDR before: every NAL unit split out, the parameter sets put after the access
    unit delimiter, joined again with 4-byte start codes."""
    nals = h264.split_annexb(data)
    lead = nals[:1] if h264.nal_type(nals[0]) == h264.NAL_AUD else []
    return h264.join_annexb([*lead, sets.sps, sets.pps, *nals[len(lead) :]])


@pytest.mark.parametrize(
    "nals", [(IDR,), (SEI, IDR), (AUD, IDR), (AUD, SEI, IDR, IDR), (IDR, IDR, SEI)], ids=lambda n: str(len(n))
)
def test_an_idr_gets_the_parameter_sets_with_its_own_bytes_copied_once_the_same_as_split_and_joined(nals):
    """An IDR without parameter sets is no longer split into NAL units and joined again (a 1080p keyframe took
    0.2 ms of the camera's worker that way): the sets go in where they went, and the bytes are the same."""
    sets = ParameterSets([HIGH_360, PPS_HIGH])
    data = annexb(*nals)
    assert sets.access_unit(data) == (_split_and_joined(sets, data), True)
    # Given the types the depacketizer took (it gathered the unit), the same without scanning the unit for them.
    assert sets.access_unit(data, [h264.nal_type(n) for n in nals]) == (_split_and_joined(sets, data), True)


def test_an_idr_with_3_byte_start_codes_keeps_its_slices_bytes_as_they_came():
    """What is joined again is what comes before the first slice (4-byte start codes); the slices are the camera's
    own bytes (before, split and joined, their start codes became 4-byte ones too)."""
    sets = ParameterSets([HIGH_360, PPS_HIGH])
    short = b"\x00\x00\x01"
    unit, idr = sets.access_unit(short + AUD + short + SEI + short + IDR + short + IDR)
    assert idr and unit == annexb(AUD, HIGH_360, PPS_HIGH, SEI) + short + IDR + short + IDR
    assert [h264.nal_type(n) for n in h264.split_annexb(unit)] == [9, 7, 8, 6, 5, 5]


def test_an_idr_before_any_parameter_set_is_passed_on_as_it_is():
    assert ParameterSets().access_unit(annexb(IDR)) == (annexb(IDR), True)


def test_new_parameter_sets_mid_stream_replace_the_old_and_are_counted():
    sets = ParameterSets([HIGH_360, PPS_HIGH])
    sets.access_unit(annexb(BASELINE_1080, PPS_BASELINE, IDR))  # the camera switched to 1080p
    assert sets.changes == 1
    assert sets.access_unit(annexb(IDR))[0] == annexb(BASELINE_1080, PPS_BASELINE, IDR)
    assert h264.sps_of(sets.access_unit(annexb(IDR))[0]).height == 1080


@pytest.mark.parametrize("kind", [0, 24, 28, 31])
def test_a_nal_type_h264_never_carries_is_an_error(kind):
    with pytest.raises(H264Error, match=f"NAL unit type {kind} cannot be in an H.264 stream"):
        ParameterSets().access_unit(annexb(bytes([0x60 | kind, 0x00]), IDR))


def test_is_idr_and_sps_of():
    assert h264.is_idr(annexb(HIGH_360, PPS_HIGH, IDR)) and not h264.is_idr(annexb(P_SLICE))
    assert h264.sps_of(annexb(P_SLICE)) is None
    assert h264.sps_of(annexb(MAIN_720, PPS_BASELINE, IDR)).profile_level_id == "4d401f"


@pytest.mark.parametrize(
    ("idc", "constraints", "name"),
    [(66, 0xC0, "Constrained Baseline"), (66, 0, "Baseline"), (77, 0, "Main"), (100, 0, "High"),
     (100, 0x0C, "Constrained High"), (100, 0x08, "Progressive High"), (110, 0, "High 10"), (9, 0, "profile 9")],
)  # fmt: skip
def test_profile_names(idc, constraints, name):
    assert h264.profile_name(idc, constraints) == name


def test_timestamps_that_go_back_in_decode_order_are_reordered_pictures():
    assert h264.out_of_order([0, 3000, 9000, 6000])  # I P B: B-frames
    assert not h264.out_of_order([0, 3000, None, 6000, 9000])  # unknown timestamps say nothing
    assert not h264.out_of_order([])


def test_an_encoders_sps_is_stamped_with_the_constraint_flags_and_level_of_the_camera_it_stands_in_for():
    camera = dataclasses.replace(parse_sps(HIGH_360), constraints=0x0C, level_idc=0x28)  # Constrained High 4.0
    idr = b"\x65\x88\x84"
    unit = h264.join_annexb([HIGH_360, b"\x68\xeb\xe3\xcb", idr])
    stamped = h264.with_profile_of(unit, camera)
    sps = h264.sps_of(stamped)
    assert sps.profile_level_id == "640c28" and (sps.width, sps.height) == (640, 360)
    assert h264.split_annexb(stamped)[1:] == h264.split_annexb(unit)[1:]  # the rest as it was
    main = dataclasses.replace(camera, profile_idc=77)
    assert h264.with_profile_of(unit, main) is unit, "another profile: left as it is"
    assert h264.with_profile_of(slice_only := h264.join_annexb([idr]), camera) is slice_only, "no SPS: as it is"


@pytest.mark.parametrize(
    ("profile_idc", "constraints", "offered"),
    [(66, 0xC0, "42e01e"), (66, 0x00, "42001e"), (77, 0x40, "4d001e"), (100, 0x00, "64001e"), (100, 0x0C, "640c1e")],
)
def test_an_offer_names_a_profile_as_browsers_write_it(profile_idc, constraints, offered):
    sps = dataclasses.replace(parse_sps(HIGH_360), profile_idc=profile_idc, constraints=constraints)
    assert sps.sdp_profile_level_id == offered


def test_nal_places_are_for_four_byte_start_codes_and_a_three_byte_one_is_refused():
    unit = h264.join_annexb([SEI, IDR])
    assert h264.nal_starts(unit) == (4, 8 + len(SEI))
    assert [bytes(n) for n in h264.nals_at(unit, h264.nal_starts(unit))] == [SEI, IDR]
    for bad in ((), (2,), (4, len(unit))):  # none, inside the first start code, past the unit
        with pytest.raises(H264Error, match="do not fit"):
            h264.nals_at(unit, bad)
    with pytest.raises(H264Error, match="3-byte start code at byte 0"):
        h264.nal_starts(b"\x00\x00\x01" + IDR)
