"""The relay <-> worker pipe, with plain bytes."""

import pytest

from relay import ipc


def test_messages_round_trip_across_arbitrary_read_boundaries():
    stream = (
        ipc.pack(
            ipc.UNIT, b"\x00\x00\x00\x01\x65abc", flags=ipc.FLAG_KEYFRAME | ipc.FLAG_FORCED, pts=9000, capture_time=1.5
        )
        + ipc.pack_json(ipc.STATUS, {"state": "live"})
        + ipc.pack(ipc.JPEG, b"\xff\xd8\xff\xd9", capture_time=2.0)
    )
    for cut in range(len(stream) + 1):
        first, rest = ipc.parse(stream[:cut])
        second, left = ipc.parse(rest + stream[cut:])
        messages = first + second
        assert left == b""
        assert [m.kind for m in messages] == [ipc.UNIT, ipc.STATUS, ipc.JPEG]
    unit, status, jpeg = messages
    assert unit.keyframe and unit.forced and unit.pts == 9000 and unit.capture_time == 1.5
    assert status.json() == {"state": "live"}
    assert jpeg.payload == b"\xff\xd8\xff\xd9" and not jpeg.keyframe


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (ipc.HEADER.pack(9, 0, 0, 0.0, 0), "unknown message type 9"),
        (ipc.HEADER.pack(ipc.UNIT, 0, 0, 0.0, ipc.MAX_PAYLOAD + 1), "over the"),
    ],
)
def test_corrupt_headers_are_refused(header, reason):
    with pytest.raises(ipc.ProtocolError, match=reason):
        ipc.parse(header)


def test_commands_with_arguments_split_across_reads():
    cmds, rest = ipc.parse_commands(b"KJ" + ipc.CMD_MAX_FPS)
    assert cmds == [(b"K", None), (b"J", None)] and rest == ipc.CMD_MAX_FPS
    cmds, rest = ipc.parse_commands(rest + bytes([22]) + b"jx")
    assert cmds == [(ipc.CMD_MAX_FPS, 22), (b"j", None)] and rest == b""  # unknown "x" skipped
