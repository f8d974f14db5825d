"""WHEP as standard players speak it: browsers' own offers, ICE servers in ``Link``
headers, trickle PATCHes and DELETEs that carry no credentials.

The offers in ``tests/data`` (see its README) are replayed by a real aiortc
peer: its own ICE credentials, fingerprint and candidates go into the browser's
offer, and the relay's answer to the whole offer is cut back to the one video
section aiortc offered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.config import AuthConfig
from relay.webrtc import ice
from relay.webrtc.whepclient import WhepError, WhepViewer
from signalling.access import ICE_SERVERS_HEADER

from .conftest import EncodedFrames, capture_ms, make_config, session_of, start_relay
from .stun import stun_server

DATA = Path(__file__).parent / "data"
# As the browsers wrote them, CRLF line ends included.
OFFERS = {
    name: (DATA / f"offer_{name}.sdp").read_bytes().decode()
    for name in ("chromium_156", "firefox_153", "firefox_99_audio_first", "safari_16")
}
TOKEN = "players-test-token-0123456789abcdef"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
SDPFRAG = {"Content-Type": "application/trickle-ice-sdpfrag"}
NO_SUCH_SESSION = "no such session"
NO_ENTITY_TAG = (
    "If-Match names an entity-tag this relay never gave (its sessions have none); send If-Match: * or none\n"
)
NO_ICE_RESTART = (
    "ICE restart is not supported: this session keeps its ICE credentials; for new ones DELETE it and POST\n"
)


def sections(sdp: str) -> list[list[str]]:
    """The lines of each m-section, its m= line first (session-level lines are not in any)."""
    out: list[list[str]] = []
    for line in sdp.splitlines():
        if line.startswith("m="):
            out.append([line])
        elif out:
            out[-1].append(line)
    return out


def mid_of(section: list[str]) -> str | None:
    return next((line[len("a=mid:") :] for line in section if line.startswith("a=mid:")), None)


def video_mid(sdp: str) -> str | None:
    return next(mid_of(s) for s in sections(sdp) if s[0].startswith("m=video") and s[0].split()[1] != "0")


def audio_mid(sdp: str) -> str | None:
    return next((mid_of(s) for s in sections(sdp) if s[0].startswith("m=audio") and s[0].split()[1] != "0"), None)


def opus_payload_type(section: list[str]) -> str:
    return next(x.split(":")[1].split()[0] for x in section if x.startswith("a=rtpmap:") and " opus/48000/2" in x)


def shaped_like(recorded: str, answers: list[str]) -> Callable[[str, str], str]:
    """A ``rewrite_sdp`` hook for ``WhepViewer``: aiortc's offer in the shape of ``recorded``.

    The offer is the recorded one with aiortc's transport in it: ICE ufrag and
    password, DTLS fingerprint (SHA-256) and candidates (in the video section).
    The relay's answer is kept in ``answers``; aiortc gets its video section
    alone, under aiortc's own mid.
    """
    ours: dict[str, str] = {}

    def rewrite(kind: str, sdp: str) -> str:
        lines = sdp.splitlines()
        if kind == "offer":
            for key in ("a=ice-ufrag:", "a=ice-pwd:", "a=fingerprint:sha-256 ", "a=mid:"):
                ours[key] = next(line for line in lines if line.startswith(key))
            candidates = [line for line in lines if line.startswith("a=candidate:")] + ["a=end-of-candidates"]
            out, in_video = [], False
            for line in recorded.splitlines():
                if line.startswith("m="):
                    if in_video:
                        out += candidates
                    in_video = line.startswith("m=video")
                if line.startswith(("a=candidate:", "a=end-of-candidates")):
                    continue
                key = next((k for k in ("a=ice-ufrag:", "a=ice-pwd:", "a=fingerprint:") if line.startswith(k)), None)
                out.append(ours["a=fingerprint:sha-256 " if key == "a=fingerprint:" else key] if key else line)
            if in_video:
                out += candidates
            return "\r\n".join(out) + "\r\n"
        answers.append(sdp)
        mid = video_mid(sdp)
        head = lines[: next(i for i, x in enumerate(lines) if x.startswith("m="))]
        head = [f"a=group:BUNDLE {ours['a=mid:'][6:]}" if x.startswith("a=group:") else x for x in head]
        video = next(s for s in sections(sdp) if mid_of(s) == mid)
        video = [ours["a=mid:"] if x.startswith("a=mid:") else x for x in video]
        return "\r\n".join(head + video) + "\r\n"

    return rewrite


@pytest.mark.parametrize("browser", OFFERS)
async def test_offers_as_browsers_write_them_get_201_and_video_with_a_valid_pixel_clock(relay_server, http, browser):
    recorded, answers = OFFERS[browser], []
    viewer = WhepViewer(relay_server.whep(), http, rewrite_sdp=shaped_like(recorded, answers))
    try:
        with EncodedFrames(relay_server.relay.streams["cam0"]) as encoded:
            await viewer.connect()  # a 201, or WhepError
            clocks = [capture_ms(s) for s in await viewer.read_frames(30)]
            assert None not in clocks and set(clocks) <= set(encoded.clocks), clocks  # frames the relay encoded

        # One answer m-section per offered one, in order (RFC 3264); the video and, for the stream has sound (the
        # test pattern's), the audio served; all else rejected.
        [answer] = answers
        offered, answered = sections(recorded), sections(answer)
        assert [s[0].split()[0] for s in answered] == [s[0].split()[0] for s in offered]
        assert [mid_of(s) for s in answered] == [mid_of(s) for s in offered]
        served = [mid_of(s) for s in offered if mid_of(s) in (video_mid(recorded), audio_mid(recorded))]
        for section, offered_section in zip(answered, offered, strict=True):
            if mid_of(section) in served:
                assert section[0].split()[1] != "0" and "a=sendonly" in section, section
            else:
                assert section[0].split()[1] == "0", section
                assert ("a=inactive" in section) == ("RTP" in section[0]), section
            if mid_of(section) == audio_mid(recorded):  # Opus, under the number the offer gave it
                assert section[0].split()[3:] == [opus_payload_type(offered_section)], section
        groups = [line for line in answer.splitlines() if line.startswith("a=group:")]
        assert groups == [f"a=group:BUNDLE {' '.join(served)}"]

        # Nothing is held for what the answer declined: no SCTP association; a sender for the video and the audio.
        session = session_of(relay_server, viewer)
        assert [t.kind for t in session.pc.getTransceivers()] == ["video", "audio"] and session.pc.sctp is None
    finally:
        await viewer.close()
    assert relay_server.relay.sessions.count() == 0


async def test_the_201_and_a_viewers_options_name_the_ice_servers_in_link_headers(http):
    async with stun_server() as (stun, url):
        config = make_config(auth=AuthConfig(mode="token", token=TOKEN))
        config = dataclasses.replace(
            config, webrtc=dataclasses.replace(config.webrtc, ice_servers=(ice.IceServer((url,)),))
        )
        links = ice.link_headers(ice.for_viewer(config.webrtc))
        assert links == [f'<{url}>; rel="ice-server"']
        runner, relay = await start_relay(config)
        try:
            # A preflight carries no credentials: no ICE servers for it.
            async with http.options(relay.whep()) as resp:
                assert resp.status == 204 and "Link" not in resp.headers
            for credentials in ({"headers": BEARER}, {"params": {"token": TOKEN}}):
                async with http.options(relay.whep(), **credentials) as resp:
                    assert resp.status == 204 and resp.headers.getall("Link") == links, credentials
            async with http.options(relay.whep(), headers={"Authorization": "Bearer wrong"}) as resp:
                assert (resp.status, await resp.text()) == (401, "401: wrong viewer token\n")
            # camrelay's page marks its own: without credentials that is a challenge, alike for every path.
            for path in ("/whep/cam0", "/whep/nope", "/whep/cam0/nosuchsession"):
                async with http.options(relay.base + path, headers={ICE_SERVERS_HEADER: "1"}) as resp:
                    challenge = (resp.status, resp.headers.get("WWW-Authenticate"), await resp.text())
                    assert challenge == (401, 'Bearer realm="camrelay"', "401: no viewer token\n"), path

            async with http.post(
                relay.whep(), data=OFFERS["chromium_156"], headers={**BEARER, "Content-Type": "application/sdp"}
            ) as resp:
                assert resp.status == 201, await resp.text()
                assert resp.headers.getall("Link") == links
                assert "ETag" not in resp.headers  # no ICE restarts: no entity-tag (draft-ietf-wish-whep-03 §4.5.1)
                location = resp.headers["Location"]
            assert stun.clients, "the relay did not gather with the STUN server it hands its viewers"
            async with http.delete(relay.base + location) as resp:  # the session URL alone ends it
                assert resp.status == 200
            assert relay.relay.sessions.count() == 0
        finally:
            await runner.cleanup()


def fragment(ufrag: str, pwd: str, mid: str, *candidates: str) -> str:
    """A trickle fragment as mediamtx's reader.js sends it (RFC 8840)."""
    lines = [f"a=ice-ufrag:{ufrag}", f"a=ice-pwd:{pwd}", "m=video 9 UDP/TLS/RTP/SAVPF 96", f"a=mid:{mid}"]
    return "\r\n".join([*lines, *candidates]) + "\r\n"


async def test_the_session_url_is_the_capability_for_patch_and_delete(http):
    runner, relay = await start_relay(make_config(auth=AuthConfig(mode="token", token=TOKEN)))
    viewer = WhepViewer(relay.whep(), http, headers=BEARER)  # the token goes with the POST, and nothing else
    try:
        await viewer.connect()
        await viewer.read_frames(3)
        offer = viewer.pc.localDescription.sdp.splitlines()
        ufrag, pwd = (next(x.split(":", 1)[1] for x in offer if x.startswith(k)) for k in ("a=ice-ufrag", "a=ice-pwd"))
        mid = video_mid(viewer.pc.localDescription.sdp)
        assert mid is not None
        trickle = fragment(
            ufrag, pwd, mid, "a=candidate:1 1 udp 2113937151 127.0.0.1 9 typ host", "a=end-of-candidates"
        )
        async with http.patch(viewer.location, data=trickle, headers={**SDPFRAG, "If-Match": "*"}) as resp:
            assert resp.status == 204 and "ETag" not in resp.headers
        # A candidate under the mid of a section the answer rejected is dropped (its transport is gone).
        async with http.patch(
            viewer.location, data=fragment(ufrag, pwd, "1", trickle.splitlines()[4]), headers=SDPFRAG
        ) as resp:
            assert resp.status == 204
        async with http.patch(viewer.location, data=trickle, headers={**SDPFRAG, "If-Match": '"xyzzy"'}) as resp:
            assert (resp.status, await resp.text()) == (412, NO_ENTITY_TAG)
        restart = fragment("n3wU", "n3wpasswordn3wpassword", mid, "a=end-of-candidates")
        async with http.patch(viewer.location, data=restart, headers={**SDPFRAG, "If-Match": "*"}) as resp:
            assert (resp.status, await resp.text()) == (422, NO_ICE_RESTART)
        await viewer.read_frames(3)  # the session and its ICE went on

        # Unknown sessions: the same 404 for a stream that exists and one that does not.
        for path in (
            "/whep/cam0/nosuchsession",
            "/whep/nope/nosuchsession",
            "/whep/nope/" + viewer.location.rsplit("/", 1)[1],
        ):
            async with http.delete(relay.base + path) as resp:
                assert (resp.status, (await resp.text()).strip()) == (404, NO_SUCH_SESSION), path
            async with http.patch(relay.base + path, data=trickle, headers=SDPFRAG) as resp:
                assert (resp.status, (await resp.text()).strip()) == (404, NO_SUCH_SESSION), path
        # The Origin check still stands on every state-changing request.
        async with http.delete(viewer.location, headers={"Origin": "https://evil.example"}) as resp:
            assert resp.status == 403
        async with http.delete(viewer.location) as resp:
            assert resp.status == 200
        assert relay.relay.sessions.count() == 0
        # A new session still needs the token.
        anonymous = WhepViewer(relay.whep(), http)
        try:
            with pytest.raises(WhepError) as info:
                await anonymous.connect()
            assert (info.value.status, info.value.reason) == (401, "401: no viewer token")
        finally:
            await anonymous.close()
    finally:
        await viewer.close(delete=False)
        await runner.cleanup()
