"""ICE servers with plain values: what the relay gathers with and what viewers are handed."""

from relay.config import load
from relay.ice import IceServer, for_relay, for_viewer, link_headers


def test_turn_servers_get_the_credentials_and_stun_ones_do_not():
    w = load(
        '[webrtc]\nice_servers = ["stun:stun.example.org:3478", "turn:turn.example.org:3478?transport=tcp"]\n'
        'ice_username = "cam"\nice_credential = "s3\\"cret"'
    ).webrtc
    assert for_viewer(w) == [
        IceServer(("stun:stun.example.org:3478",)),
        IceServer(("turn:turn.example.org:3478?transport=tcp",), "cam", 's3"cret'),
    ]
    assert [(s.urls, s.username, s.credential) for s in for_relay(w)] == [
        (["stun:stun.example.org:3478"], None, None),
        (["turn:turn.example.org:3478?transport=tcp"], "cam", 's3"cret'),
    ]
    assert link_headers(for_viewer(w)) == [
        '<stun:stun.example.org:3478>; rel="ice-server"',
        '<turn:turn.example.org:3478?transport=tcp>; rel="ice-server"; username="cam"; credential="s3\\"cret";'
        ' credential-type="password"',
    ]


def test_no_servers_by_default():
    assert for_relay(load().webrtc) == [] and link_headers(for_viewer(load().webrtc)) == []
