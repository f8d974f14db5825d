"""H.264 as it comes from a camera, without decoding it: NAL units, parameter sets, profiles.

Sans-io: plain bytes in, plain values or an ``H264Error`` naming what is wrong
out. Used on both sides of the pipe: the camera's worker turns what a camera
or a file delivers (Annex B, or AVCC from MP4/MKV, parameter sets in-band, in
the container's extradata or in the SDP's ``sprop-parameter-sets``) into
Annex B access units with the parameter sets in front of every IDR
(``ParameterSets``); the relay reads the SPS of what it sends (size, profile,
``profile-level-id`` for SDP answers, whether frames are reordered).

References: ITU-T H.264 7.3.2.1.1 (SPS), E.1.1 (VUI), 7.4.1 (emulation
prevention), ISO/IEC 14496-15 5.2.4.1 (avcC), RFC 6184 8.1 (profile-level-id,
sprop-parameter-sets).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass

START_CODE = b"\x00\x00\x00\x01"

# NAL unit types (Table 7-1)
NAL_SLICE = 1
NAL_IDR = 5
NAL_SEI = 6
NAL_SPS = 7
NAL_PPS = 8
NAL_AUD = 9
# 0 and 24..31 are unspecified by H.264 (RTP uses 24..29 for aggregation and fragments): never in a stream.
NAL_UNSPECIFIED = (0, *range(24, 32))

# Profiles whose SPS carries chroma format, bit depths and scaling matrices (7.3.2.1.1)
HIGH_PROFILES = (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135)
PROFILE_BASELINE = 66
PROFILE_MAIN = 77
PROFILE_EXTENDED = 88
PROFILE_HIGH = 100
MAX_EXP_GOLOMB_ZEROS = 31  # a 32-bit ue(v); more leading zeros means a corrupt SPS
MAX_PICTURE_SIDE = 16_384  # larger than any level allows (8192 at level 6.2): a corrupt SPS
# Bytes of an SPS or PPS: a real one is tens to a few hundred (scaling lists and VUI at most about 1 KiB). One is put
# in front of every IDR a viewer gets: a camera's 15 MiB SPS once made each 1 kB IDR 15 MiB to the relay.
MAX_PARAMETER_SET_BYTES = 4096
# The first two bytes of the profile-level-id browsers and media servers use for each profile (RFC 6184
# Table 5): what an offer names a stream's profile by (pion, in mediamtx, matches offers on exactly these).
SDP_PROFILES = {
    "Constrained Baseline": "42e0", "Baseline": "4200", "Main": "4d00", "High": "6400", "Progressive High": "6400",
    "Constrained High": "640c",
}  # fmt: skip
AVCC_LENGTH_SIZES = (1, 2, 4)  # lengthSizeMinusOne is 0, 1 or 3 (3 is what every muxer writes)


class H264Error(ValueError):
    """The bytes are not the H.264 they claim to be; ``str()`` says what and where."""


# -- NAL units and access units


def nal_type(nal: bytes) -> int:
    return nal[0] & 0x1F


def split_annexb(data: bytes) -> list[bytes]:
    """The NAL units of an Annex B byte stream (3- or 4-byte start codes), without their start codes.

    Trailing zero bytes of a NAL unit belong to the next start code
    (``trailing_zero_8bits``) and are dropped; empty units are skipped.
    """
    out = []
    start = data.find(b"\x00\x00\x01")
    if start < 0:
        if data:
            raise H264Error(f"no Annex B start code in {len(data)} bytes")
        return out
    while start >= 0:
        begin = start + 3
        nxt = data.find(b"\x00\x00\x01", begin)
        end = len(data) if nxt < 0 else nxt
        nal = data[begin:end].rstrip(b"\x00")
        if nal:
            out.append(nal)
        start = nxt
    return out


def _start_code_of(data: bytes, index: int) -> int:
    """Where the start code of the ``index``-th NAL unit of ``data`` begins (the zero byte of a 4-byte one with it)."""
    pos = data.find(b"\x00\x00\x01")
    for _ in range(index):
        pos = data.find(b"\x00\x00\x01", pos + 4)
    return pos - (pos > 0 and data[pos - 1] == 0)


def head_nals(data: bytes, starts: Sequence[int] | None = None) -> list[bytes]:
    """The NAL units of an Annex B access unit before its first slice (delimiter, SEI, parameter sets), without
    their start codes; the slices, most of the unit, neither searched nor copied. ``starts``: where each NAL unit
    begins (``nal_starts``), where the caller knows: then nothing is searched."""
    if starts is not None:
        out = []
        for nal in nals_at(data, starts):
            if nal[0] & 0x1F in (NAL_SLICE, NAL_IDR):
                break
            out.append(bytes(nal))
        return out
    pos = data.find(b"\x00\x00\x01")
    while pos >= 0 and pos + 3 < len(data):
        if data[pos + 3] & 0x1F in (NAL_SLICE, NAL_IDR):
            head = data[:pos]
            return split_annexb(head) if b"\x00\x00\x01" in head else []
        pos = data.find(b"\x00\x00\x01", pos + 4)
    return split_annexb(data)


def nal_types(data: bytes) -> list[int]:
    """The type of each NAL unit of an Annex B access unit, in order (no copy of the units)."""
    kinds = []
    pos = data.find(b"\x00\x00\x01")
    while pos >= 0 and pos + 3 < len(data):
        kinds.append(data[pos + 3] & 0x1F)
        pos = data.find(b"\x00\x00\x01", pos + 4)
    return kinds


def nals_at(data: bytes, starts: Sequence[int]) -> list[memoryview]:
    """The NAL units of an Annex B access unit whose NAL units begin at ``starts`` (``nal_starts``): views of
    ``data``, neither scanned for start codes nor copied."""
    if not starts or starts[0] < len(START_CODE) or starts[-1] >= len(data):
        raise H264Error(f"NAL places {tuple(starts[:4])}... do not fit a {len(data)}-byte unit")
    view = memoryview(data)
    ends = [*(start - len(START_CODE) for start in starts[1:]), len(data)]
    return [view[start:end] for start, end in zip(starts, ends, strict=True)]


def nal_starts(data: bytes) -> tuple[int, ...]:
    """Where each NAL unit of an Annex B access unit begins (its header byte), for one whose start codes are all 4
    bytes, each NAL unit ending where the next one's start code begins (as camrelay's depacketizer and
    ``join_annexb`` make them): ``nals_at`` takes them. A scan, for tests and for units made without them;
    ``H264Error`` for a 3-byte start code (an encoder's unit as it came: ``join_annexb(split_annexb(...))`` it)."""
    out = []
    pos = data.find(b"\x00\x00\x01")
    while pos >= 0:
        if pos == 0 or data[pos - 1] != 0:
            raise H264Error(f"3-byte start code at byte {pos}: NAL units' places are for 4-byte ones")
        out.append(pos + 3)
        pos = data.find(b"\x00\x00\x01", pos + 3)
    return tuple(out)


def join_annexb(nals: list[bytes]) -> bytes:
    return b"".join(START_CODE + nal for nal in nals)


def avcc_to_annexb(data: bytes, length_size: int = 4) -> bytes:
    """An AVCC access unit (each NAL unit after its big-endian length, as MP4 and MKV store them) as Annex B."""
    if length_size not in AVCC_LENGTH_SIZES:
        raise H264Error(f"AVCC length size {length_size} is not 1, 2 or 4")
    out = []
    pos = 0
    while pos < len(data):
        if pos + length_size > len(data):
            raise H264Error(f"AVCC unit cut off in its length field at byte {pos} of {len(data)}")
        size = int.from_bytes(data[pos : pos + length_size], "big")
        pos += length_size
        if size == 0 or pos + size > len(data):
            raise H264Error(f"AVCC NAL unit of {size} bytes at byte {pos} overruns the {len(data)}-byte unit")
        out.append(data[pos : pos + size])
        pos += size
    return join_annexb(out)


@dataclass(frozen=True, slots=True)
class AvcConfig:
    """An ``avcC`` box's payload (AVCDecoderConfigurationRecord): MP4's and MKV's extradata."""

    length_size: int
    sps: tuple[bytes, ...]
    pps: tuple[bytes, ...]


def parse_avcc(extradata: bytes) -> AvcConfig:
    """The NAL length size and parameter sets of an ``avcC`` record; ``H264Error`` for a malformed one."""
    if len(extradata) < 7 or extradata[0] != 1:
        raise H264Error(f"avcC record of {len(extradata)} bytes does not start with version 1")
    length_size = (extradata[4] & 0x03) + 1
    if length_size not in AVCC_LENGTH_SIZES:
        raise H264Error(f"avcC NAL length size {length_size} is not 1, 2 or 4")
    pos = 5
    sets: list[list[bytes]] = [[], []]
    for which, mask in ((0, 0x1F), (1, 0xFF)):
        if pos >= len(extradata):
            raise H264Error("avcC record cut off before its parameter set count")
        count = extradata[pos] & mask
        pos += 1
        for _ in range(count):
            if pos + 2 > len(extradata):
                raise H264Error("avcC record cut off in a parameter set's length")
            size = int.from_bytes(extradata[pos : pos + 2], "big")
            pos += 2
            if size == 0 or pos + size > len(extradata):
                raise H264Error(f"avcC parameter set of {size} bytes overruns the record")
            sets[which].append(extradata[pos : pos + size])
            pos += size
    return AvcConfig(length_size, tuple(sets[0]), tuple(sets[1]))


def extradata_parameter_sets(extradata: bytes) -> list[bytes]:
    """SPS and PPS NAL units from a decoder's extradata: an ``avcC`` record (MP4, MKV) or Annex B (RTSP's sprop)."""
    if not extradata:
        return []
    if extradata[0] == 1:
        avcc = parse_avcc(extradata)
        return [*avcc.sps, *avcc.pps]
    return [nal for nal in split_annexb(extradata) if nal_type(nal) in (NAL_SPS, NAL_PPS)]


def _check_parameter_set(nal: bytes) -> bytes:
    if len(nal) > MAX_PARAMETER_SET_BYTES:
        raise H264Error(f"{'SPS' if nal_type(nal) == NAL_SPS else 'PPS'} of {len(nal)} bytes is over the"
                        f" {MAX_PARAMETER_SET_BYTES} any encoder makes")  # fmt: skip
    return nal


def parse_sprop_parameter_sets(value: str) -> list[bytes]:
    """The NAL units of an SDP's ``sprop-parameter-sets`` (RFC 6184 8.1): base64 values, comma-separated."""
    out = []
    for i, part in enumerate(value.strip().split(",")):
        if not part:
            raise H264Error(f"sprop-parameter-sets value {i} is empty")
        try:
            nal = base64.b64decode(part, validate=True)
        except binascii.Error as exc:
            raise H264Error(f"sprop-parameter-sets value {i} is not base64: {exc}") from None
        if not nal:
            raise H264Error(f"sprop-parameter-sets value {i} is empty")
        if nal_type(nal) not in (NAL_SPS, NAL_PPS):
            raise H264Error(f"sprop-parameter-sets value {i} is NAL type {nal_type(nal)}, not an SPS (7) or PPS (8)")
        _check_parameter_set(nal)
        out.append(nal)
    return out


def with_profile_level_id(sdp: str, payload_type: int, value: str) -> str:
    """``sdp`` with the ``profile-level-id`` of its ``a=fmtp`` for ``payload_type`` set to ``value`` (RFC 6184 8.1):
    what an offer or answer says is sent, where aiortc, which knows Constrained Baseline only, wrote its own."""
    return re.sub(rf"^(a=fmtp:{payload_type} .*?profile-level-id=)[0-9A-Fa-f]{{6}}", rf"\g<1>{value}", sdp, flags=re.M)


def parameter_sets(data: bytes) -> bytes | None:
    """SPS and PPS NAL units (Annex B) from an access unit, for a muxer's extradata; None when it has none."""
    if b"\x00\x00\x01" not in data:
        return None
    found = [nal for nal in split_annexb(data) if nal_type(nal) in (NAL_SPS, NAL_PPS)]
    return join_annexb(found) if found else None


def with_profile_of(data: bytes, sps: Sps) -> bytes:
    """An Annex B access unit whose SPS has ``sps``'s profile_idc, with ``sps``'s constraint flags and level_idc:
    an encoder's picture (a slate) that says the same ``profile-level-id`` as the camera it stands in for. A unit
    without an SPS, or of another profile, comes back as it is. The two bytes replaced never make a start code:
    profile_idc before them and level_idc are never 0."""
    nals = split_annexb(data)
    if not any(nal_type(n) == NAL_SPS and len(n) > 3 and n[1] == sps.profile_idc for n in nals):
        return data
    stamped = [
        n[:2] + bytes((sps.constraints, sps.level_idc)) + n[4:] if nal_type(n) == NAL_SPS and n[1] == sps.profile_idc
        else n
        for n in nals
    ]  # fmt: skip
    return join_annexb(stamped)


def is_idr(data: bytes) -> bool:
    """Whether an Annex B access unit holds an IDR picture (a decoder can start there)."""
    return any(nal_type(nal) == NAL_IDR for nal in split_annexb(data))


class ParameterSets:
    """The latest SPS and PPS of one stream, put in front of every IDR access unit that lacks them.

    Cameras send their parameter sets in the SDP only, or once at the start,
    or before every IDR; a viewer (or a muxer) that starts at any IDR needs
    them right there. Seed it with what came out of band (extradata, sprop),
    then ``access_unit()`` each unit in decode order.
    """

    def __init__(self, out_of_band: list[bytes] | tuple[bytes, ...] = ()) -> None:
        self.sps: bytes | None = None
        self.pps: bytes | None = None
        self.changes = 0  # access units that changed the SPS or PPS after the first (a new resolution or profile)
        for nal in out_of_band:
            self._keep(nal)

    def _keep(self, nal: bytes) -> None:
        kind = nal_type(nal)
        if kind == NAL_SPS:
            self.sps = _check_parameter_set(nal)
        elif kind == NAL_PPS:
            self.pps = _check_parameter_set(nal)

    def access_unit(self, data: bytes, kinds: Sequence[int] | None = None) -> tuple[bytes, bool]:
        """(the unit as Annex B with SPS and PPS in front of its IDR, whether it is an IDR). Most units (no
        parameter set, no IDR) come back as they are, not copied.

        Only the NAL units before the first slice (delimiter, SEI, parameter sets: a few bytes) are split out
        and joined again; the slices, most of the unit, are copied once at most (an IDR that lacks the sets) or
        not at all (one that has them). Splitting and joining a whole 1080p keyframe (100-300 KiB) took 0.2 ms
        of a camera's worker at every IDR. A unit with a parameter set after its first slice (which no encoder
        sends) is split whole, as before. ``kinds``: the type of each of its NAL units in order, where the caller
        knows them (camrelay's RTP depacketizer notes them as it gathers the unit): the unit is not scanned for
        its start codes then, only its first few up to its first slice, where there is something to put in."""
        unit, idr, _ = self._access_unit(data, kinds, None)
        return unit, idr

    def access_unit_at(
        self, data: bytes, kinds: Sequence[int], starts: Sequence[int]
    ) -> tuple[bytes, bool, Sequence[int]]:
        """``access_unit`` of a unit whose NAL units' types (``kinds``) and places (``starts``, as ``nal_starts``
        gives them) the caller knows, camrelay's depacketizer: not scanned at all; and the places of the NAL units
        of the unit it returns (``starts`` itself when that is the unit as it came), which the relay packetizes
        by."""
        unit, idr, places = self._access_unit(data, kinds, starts)
        assert places is not None
        return unit, idr, places

    def _access_unit(
        self, data: bytes, kinds: Sequence[int] | None, starts: Sequence[int] | None
    ) -> tuple[bytes, bool, Sequence[int] | None]:
        if kinds is None:
            kinds = nal_types(data)
        if not kinds and data:
            raise H264Error(f"no Annex B start code in {len(data)} bytes")
        for kind in kinds:
            if kind in NAL_UNSPECIFIED:
                raise H264Error(f"NAL unit type {kind} cannot be in an H.264 stream (RTP-only or reserved)")
        if NAL_IDR not in kinds and NAL_SPS not in kinds and NAL_PPS not in kinds:
            return data, False, starts
        first_slice = next((i for i, k in enumerate(kinds) if k in (NAL_SLICE, NAL_IDR)), len(kinds))
        cut = len(data)  # where the first slice's start code begins (its zero byte with it): what is split
        if first_slice < len(kinds) and NAL_SPS not in kinds[first_slice:] and NAL_PPS not in kinds[first_slice:]:
            cut = _start_code_of(data, first_slice) if starts is None else starts[first_slice] - len(START_CODE)
        nals = split_annexb(data[:cut] if cut < len(data) else data)
        before = (self.sps, self.pps)
        for nal in nals:
            self._keep(nal)
        if None not in before and (self.sps, self.pps) != before:
            self.changes += 1
        idr = NAL_IDR in kinds
        if not idr or (NAL_SPS in kinds and NAL_PPS in kinds) or self.sps is None or self.pps is None:
            return data, idr, starts
        first = next((i for i, n in enumerate(nals) if nal_type(n) in (NAL_SLICE, NAL_IDR)), len(nals))
        head = [n for n in nals[:first] if nal_type(n) not in (NAL_SPS, NAL_PPS)]
        # An access unit delimiter stays first (7.4.1.2.3); the parameter sets go right after it.
        lead = [head.pop(0)] if head and nal_type(head[0]) == NAL_AUD else []
        joined = [*lead, self.sps, self.pps, *head, *nals[first:]]
        head_bytes = join_annexb(joined)
        if starts is None:
            return head_bytes + data[cut:], True, None
        places, at = [], 0
        for nal in joined:
            at += len(START_CODE)
            places.append(at)
            at += len(nal)
        if cut < len(data):  # the slices, as they came, moved by what was put in front
            places += [start + len(head_bytes) - cut for start in starts[first_slice:]]
        return head_bytes + data[cut:], True, tuple(places)


# -- the SPS


def unescape(nal: bytes) -> bytes:
    """A NAL unit's payload without its emulation prevention bytes (00 00 03 -> 00 00)."""
    if b"\x00\x00\x03" not in nal:
        return nal
    out = bytearray()
    zeros = 0
    for byte in nal:
        if zeros >= 2 and byte == 3:
            zeros = 0
            continue
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


class _Bits:
    """A big-endian bit reader over an RBSP; ``H264Error`` naming the field when it runs out."""

    def __init__(self, data: bytes) -> None:
        self._value = int.from_bytes(data, "big")
        self._left = len(data) * 8
        self.field = ""

    def u(self, n: int, field: str) -> int:
        if n > self._left:
            raise H264Error(f"SPS is truncated: it ends inside {field}")
        self._left -= n
        return (self._value >> self._left) & ((1 << n) - 1)

    def flag(self, field: str) -> bool:
        return bool(self.u(1, field))

    def ue(self, field: str) -> int:
        zeros = 0
        while not self.u(1, field):
            zeros += 1
            if zeros > MAX_EXP_GOLOMB_ZEROS:
                raise H264Error(f"SPS is corrupt: {field} has more than {MAX_EXP_GOLOMB_ZEROS} leading zero bits")
        return (1 << zeros) - 1 + (self.u(zeros, field) if zeros else 0)

    def se(self, field: str) -> int:
        k = self.ue(field)
        return (k + 1) // 2 if k % 2 else -(k // 2)


@dataclass(frozen=True, slots=True)
class Sps:
    """What a sequence parameter set says that a relay needs."""

    profile_idc: int
    constraints: int  # constraint_set0..5 flags and the reserved bits: the byte after profile_idc
    level_idc: int
    sps_id: int
    chroma_format_idc: int
    width: int  # after cropping: the picture a viewer sees
    height: int
    frame_mbs_only: bool  # False: interlaced coding is possible
    pic_order_cnt_type: int
    fps: float | None  # from the VUI's timing info, when present
    max_num_reorder_frames: int | None  # from the VUI's bitstream restriction, when present

    @property
    def profile_level_id(self) -> str:
        """RFC 6184's ``profile-level-id``: profile_idc, the constraint byte and level_idc, in hex."""
        return f"{self.profile_idc:02x}{self.constraints:02x}{self.level_idc:02x}"

    @property
    def sdp_profile_level_id(self) -> str:
        """The ``profile-level-id`` an SDP offer names this stream by: its profile as browsers write it (42e0 for
        any Constrained Baseline), at its level."""
        return SDP_PROFILES.get(self.profile, self.profile_level_id[:4]) + f"{self.level_idc:02x}"

    @property
    def profile(self) -> str:
        return profile_name(self.profile_idc, self.constraints)

    @property
    def level(self) -> str:
        if self.level_idc == 11 and self.constraints & 0x10 and self.profile_idc in (66, 77, 88):
            return "1b"
        return f"{self.level_idc // 10}.{self.level_idc % 10}"

    @property
    def reorders(self) -> bool | None:
        """Whether pictures may be output in another order than decoded (B-frames): None when the SPS does not say.

        Baseline and Constrained High have no B slices; picture order type 2
        ties output order to decode order; else the VUI's
        ``max_num_reorder_frames`` says, when the encoder wrote it.
        """
        if self.profile_idc == PROFILE_BASELINE or self.pic_order_cnt_type == 2:
            return False
        if self.profile_idc == PROFILE_HIGH and self.constraints & 0x0C == 0x0C:  # constraint_set4 and 5
            return False
        if self.max_num_reorder_frames is not None:
            return self.max_num_reorder_frames > 0
        return None

    def describe(self) -> str:
        """``High 4.0 1920x1080``: for log lines and the API."""
        return f"{self.profile} {self.level} {self.width}x{self.height}"


def profile_name(profile_idc: int, constraints: int = 0) -> str:
    if profile_idc == PROFILE_BASELINE:
        return "Constrained Baseline" if constraints & 0x40 else "Baseline"
    if profile_idc == PROFILE_HIGH:
        if constraints & 0x0C == 0x0C:
            return "Constrained High"
        return "Progressive High" if constraints & 0x08 else "High"
    names = {77: "Main", 88: "Extended", 110: "High 10", 122: "High 4:2:2", 244: "High 4:4:4", 44: "CAVLC 4:4:4"}
    return names.get(profile_idc, f"profile {profile_idc}")


def parse_sps(nal: bytes) -> Sps:
    """The fields of an SPS NAL unit (with its one-byte header); ``H264Error`` for anything else or a broken one."""
    if not nal:
        raise H264Error("SPS is empty")
    if nal[0] & 0x80:
        raise H264Error("SPS has its forbidden_zero_bit set")
    if nal_type(nal) != NAL_SPS:
        raise H264Error(f"NAL unit type {nal_type(nal)} is not an SPS (7)")
    b = _Bits(unescape(nal[1:]))
    profile_idc = b.u(8, "profile_idc")
    constraints = b.u(8, "constraint flags")
    level_idc = b.u(8, "level_idc")
    sps_id = b.ue("seq_parameter_set_id")
    if sps_id > 31:
        raise H264Error(f"SPS is corrupt: seq_parameter_set_id {sps_id} is over 31")
    chroma_format_idc = 1
    separate_planes = False
    if profile_idc in HIGH_PROFILES:
        chroma_format_idc = b.ue("chroma_format_idc")
        if chroma_format_idc > 3:
            raise H264Error(f"SPS is corrupt: chroma_format_idc {chroma_format_idc} is over 3")
        if chroma_format_idc == 3:
            separate_planes = b.flag("separate_colour_plane_flag")
        b.ue("bit_depth_luma_minus8")
        b.ue("bit_depth_chroma_minus8")
        b.flag("qpprime_y_zero_transform_bypass_flag")
        if b.flag("seq_scaling_matrix_present_flag"):
            for i in range(8 if chroma_format_idc != 3 else 12):
                if b.flag("seq_scaling_list_present_flag"):
                    _skip_scaling_list(b, 16 if i < 6 else 64)
    b.ue("log2_max_frame_num_minus4")
    poc_type = b.ue("pic_order_cnt_type")
    if poc_type == 0:
        b.ue("log2_max_pic_order_cnt_lsb_minus4")
    elif poc_type == 1:
        b.flag("delta_pic_order_always_zero_flag")
        b.se("offset_for_non_ref_pic")
        b.se("offset_for_top_to_bottom_field")
        cycle = b.ue("num_ref_frames_in_pic_order_cnt_cycle")
        if cycle > 255:
            raise H264Error(f"SPS is corrupt: num_ref_frames_in_pic_order_cnt_cycle {cycle} is over 255")
        for _ in range(cycle):
            b.se("offset_for_ref_frame")
    elif poc_type != 2:
        raise H264Error(f"SPS is corrupt: pic_order_cnt_type {poc_type} is over 2")
    b.ue("max_num_ref_frames")
    b.flag("gaps_in_frame_num_value_allowed_flag")
    width_mbs = b.ue("pic_width_in_mbs_minus1") + 1
    height_units = b.ue("pic_height_in_map_units_minus1") + 1
    frame_mbs_only = b.flag("frame_mbs_only_flag")
    if not frame_mbs_only:
        b.flag("mb_adaptive_frame_field_flag")
    b.flag("direct_8x8_inference_flag")
    crop = (0, 0, 0, 0)
    if b.flag("frame_cropping_flag"):
        crop = tuple(
            b.ue(name)
            for name in ("frame_crop_left_offset", "frame_crop_right_offset", "frame_crop_top_offset",
                         "frame_crop_bottom_offset")
        )  # fmt: skip
    # 7.4.2.1.1: the cropping unit follows the chroma subsampling (none without chroma, or with separate planes).
    sub_w, sub_h = {1: (2, 2), 2: (2, 1), 3: (1, 1)}.get(chroma_format_idc, (1, 1))
    if chroma_format_idc == 0 or separate_planes:
        sub_w, sub_h = 1, 1
    field_factor = 1 if frame_mbs_only else 2
    width = width_mbs * 16 - sub_w * (crop[0] + crop[1])
    height = field_factor * height_units * 16 - sub_h * field_factor * (crop[2] + crop[3])
    if not (0 < width <= MAX_PICTURE_SIDE and 0 < height <= MAX_PICTURE_SIDE):
        raise H264Error(f"SPS is corrupt: picture size {width}x{height} is outside 1..{MAX_PICTURE_SIDE}")
    fps = reorder = None
    if b.flag("vui_parameters_present_flag"):
        fps, reorder = _vui(b)
    return Sps(
        profile_idc, constraints, level_idc, sps_id, chroma_format_idc, width, height, frame_mbs_only, poc_type,
        fps, reorder,
    )  # fmt: skip


def _skip_scaling_list(b: _Bits, size: int) -> None:
    last = nxt = 8
    for _ in range(size):
        if nxt:
            delta = b.se("delta_scale")
            nxt = (last + delta + 256) % 256
        last = nxt or last


def _vui(b: _Bits) -> tuple[float | None, int | None]:
    """(frame rate, max_num_reorder_frames) from the VUI (E.1.1), each None when absent."""
    if b.flag("aspect_ratio_info_present_flag") and b.u(8, "aspect_ratio_idc") == 255:  # Extended_SAR
        b.u(32, "sar_width and sar_height")
    if b.flag("overscan_info_present_flag"):
        b.flag("overscan_appropriate_flag")
    if b.flag("video_signal_type_present_flag"):
        b.u(4, "video_format and video_full_range_flag")
        if b.flag("colour_description_present_flag"):
            b.u(24, "colour_primaries, transfer_characteristics and matrix_coefficients")
    if b.flag("chroma_loc_info_present_flag"):
        b.ue("chroma_sample_loc_type_top_field")
        b.ue("chroma_sample_loc_type_bottom_field")
    fps = None
    if b.flag("timing_info_present_flag"):
        units = b.u(32, "num_units_in_tick")
        scale = b.u(32, "time_scale")
        b.flag("fixed_frame_rate_flag")
        if units and scale:
            fps = scale / (2 * units)  # a frame is two ticks (field-based clock, E.2.1)
    nal_hrd = b.flag("nal_hrd_parameters_present_flag")
    if nal_hrd:
        _skip_hrd(b)
    vcl_hrd = b.flag("vcl_hrd_parameters_present_flag")
    if vcl_hrd:
        _skip_hrd(b)
    if nal_hrd or vcl_hrd:
        b.flag("low_delay_hrd_flag")
    b.flag("pic_struct_present_flag")
    reorder = None
    if b.flag("bitstream_restriction_flag"):
        b.flag("motion_vectors_over_pic_boundaries_flag")
        for field in ("max_bytes_per_pic_denom", "max_bits_per_mb_denom", "log2_max_mv_length_horizontal"):
            b.ue(field)
        b.ue("log2_max_mv_length_vertical")
        reorder = b.ue("max_num_reorder_frames")
        b.ue("max_dec_frame_buffering")
    return fps, reorder


def _skip_hrd(b: _Bits) -> None:
    count = b.ue("cpb_cnt_minus1") + 1
    if count > 32:
        raise H264Error(f"SPS is corrupt: cpb_cnt_minus1 {count - 1} is over 31")
    b.u(8, "bit_rate_scale and cpb_size_scale")
    for _ in range(count):
        b.ue("bit_rate_value_minus1")
        b.ue("cpb_size_value_minus1")
        b.flag("cbr_flag")
    b.u(20, "the HRD's delay lengths")


def sps_of(data: bytes) -> Sps | None:
    """The SPS in an Annex B access unit, parsed; None when it carries none."""
    for nal in split_annexb(data):
        if nal_type(nal) == NAL_SPS:
            return parse_sps(nal)
    return None


def out_of_order(pts: list[int | None]) -> bool:
    """Whether presentation timestamps in decode order ever go back: pictures are reordered (B-frames)."""
    known = [p for p in pts if p is not None]
    return any(b < a for a, b in zip(known, known[1:], strict=False))
