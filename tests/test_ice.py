"""ICE servers with plain values: what the relay gathers with and what viewers are handed.

The TURN server itself (coturn taking minted credentials, refusing expired ones) is in tests/test_remote.py.
"""

import asyncio
import gc
import json
import string
from pathlib import Path

import aioice.ice
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from benchmarks.chromium import chromium
from relay.config import ConfigError, IceServer, load, secret_values, secrets_in_file
from relay.webrtc import borrowed
from relay.webrtc.ice import (
    add_host_candidates,
    for_relay,
    for_viewer,
    link_headers,
    parse_links,
    resolve,
    resolver,
)

from .test_browser import mediamtx_reader_js

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_700_000_000.7  # the clock the minted credentials are made with; they expire at int(NOW + lifetime)
SECRET = "north-gate-7"
# base64(HMAC-SHA1(SECRET, username)), computed apart from camrelay:
#   printf %s 1700000600:camrelay | openssl dgst -sha1 -hmac north-gate-7 -binary | base64
MINTED = {"1700000600:camrelay": "gE1M45cUCZJ7XMXdmHwTd7rgbxo=", "1700000600:frontdoor": "S07uHIaiqmdimANCnZyVIqgeSXg="}


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
    assert load().webrtc.additional_hosts == ()


TABLES = """
[webrtc]
ice_servers = [
  "stun:stun.example.org",
  { urls = ["turn:a.example:3478?transport=udp", "turns:a.example:5349"], username = "cam", credential = "pw-a" },
  { urls = "turn:b.example", username = "other", credential = "pw,\\"b\\"" },
]
"""


def test_tables_shaped_like_rtciceserver_give_each_server_its_own_credentials():
    w = load(TABLES).webrtc
    assert for_viewer(w, NOW) == [
        IceServer(("stun:stun.example.org",)),
        IceServer(("turn:a.example:3478?transport=udp", "turns:a.example:5349"), "cam", "pw-a"),
        IceServer(("turn:b.example",), "other", 'pw,"b"'),
    ]
    assert [(s.urls, s.username, s.credential) for s in for_relay(w, NOW)] == [
        (["stun:stun.example.org"], None, None),
        (["turn:a.example:3478?transport=udp", "turns:a.example:5349"], "cam", "pw-a"),
        (["turn:b.example"], "other", 'pw,"b"'),
    ]
    links = link_headers(for_viewer(w, NOW))
    assert links == [
        '<stun:stun.example.org>; rel="ice-server"',
        '<turn:a.example:3478?transport=udp>; rel="ice-server"; username="cam"; credential="pw-a";'
        ' credential-type="password"',
        '<turns:a.example:5349>; rel="ice-server"; username="cam"; credential="pw-a"; credential-type="password"',
        '<turn:b.example>; rel="ice-server"; username="other"; credential="pw,\\"b\\""; credential-type="password"',
    ]
    # What a WHEP player reads back, each URL a server, from separate headers or one joined with commas.
    one_per_url = [IceServer((url,), s.username, s.credential) for s in for_viewer(w, NOW) for url in s.urls]
    assert parse_links(links) == one_per_url
    assert parse_links([", ".join(links)]) == one_per_url
    assert parse_links(['</whep/x>; rel="self"', *links[:1]]) == one_per_url[:1]


def test_turn_credentials_are_minted_per_session_from_the_secret_and_expire():
    w = load(
        '[webrtc]\nice_servers = ["stun:stun.example.org", "turn:t.example.org?transport=tcp",'
        ' { urls = "turns:t.example.org", username = "frontdoor" }]\n'
        f'turn_secret = "{SECRET}"\nturn_credential_lifetime = "10m"'
    ).webrtc
    assert for_viewer(w, NOW) == [
        IceServer(("stun:stun.example.org",)),
        IceServer(("turn:t.example.org?transport=tcp",), "1700000600:camrelay", MINTED["1700000600:camrelay"]),
        IceServer(("turns:t.example.org",), "1700000600:frontdoor", MINTED["1700000600:frontdoor"]),
    ]
    assert [(s.username, s.credential) for s in for_relay(w, NOW)][1:] == [
        ("1700000600:camrelay", MINTED["1700000600:camrelay"]),
        ("1700000600:frontdoor", MINTED["1700000600:frontdoor"]),
    ]
    later = for_viewer(w, NOW + 60)[1]
    assert later.username == "1700000660:camrelay" and later.credential != MINTED["1700000600:camrelay"]
    assert SECRET not in "".join(link_headers(for_viewer(w, NOW)))


PRINTABLE = "may hold only printable ASCII without spaces"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[webrtc]\nice_servers = [{ urls = "turn:t.example.org", username = "u", credential = "pw", foo = 1 }]',
            "webrtc.ice_servers[0].foo: unknown key (a table takes urls, username, credential)",
        ),
        (
            '[webrtc]\nice_servers = ["stun:s", { urls = "turn:t", username = "u", credential = 12345 }]',
            "webrtc.ice_servers[1].credential: expected a string",
        ),
        ("[webrtc]\nice_servers = [{}]", "webrtc.ice_servers[0].urls: expected a URL or a list of URLs"),
        ("[webrtc]\nice_servers = [{ urls = [] }]", "webrtc.ice_servers[0].urls: expected a URL or a list of URLs"),
        (
            '[webrtc]\nice_servers = [{ urls = "turn:t", credential = "pw" }]',
            "webrtc.ice_servers[0].username: a credential needs its username",
        ),
        (
            "[webrtc]\nice_servers = [5]",
            "webrtc.ice_servers[0]: expected a URL or a table with urls, username and credential",
        ),
        (
            "[webrtc]\nice_servers = 5",
            "webrtc.ice_servers: expected a list of URLs or {urls, username, credential} tables",
        ),
        (
            '[webrtc]\nice_servers = ["turn:t.example.org:99999"]',
            "webrtc.ice_servers: ICE server 'turn:t.example.org:99999' is not scheme:host[:port]"
            " (turn: and turns: may add ?transport=udp or tcp)",
        ),
        (
            '[webrtc]\nice_servers = ["stun:s.example.org?transport=udp"]',
            "webrtc.ice_servers: ICE server 'stun:s.example.org?transport=udp' is not scheme:host[:port]"
            " (turn: and turns: may add ?transport=udp or tcp)",
        ),
        (
            '[webrtc]\nice_servers = ["turn:t.example.org"]',
            "webrtc.ice_servers[0]: TURN server turn:t.example.org has no credential: give it username and credential,"
            " or set webrtc.turn_secret (coturn's use-auth-secret)",
        ),
        (
            '[webrtc]\nice_servers = [{ urls = "turn:t", username = "u" }]',
            "webrtc.ice_servers[0]: TURN server turn:t has no credential: give it username and credential,"
            " or set webrtc.turn_secret (coturn's use-auth-secret)",
        ),
        (
            '[webrtc]\nturn_secret = "a"\nice_credential = "b"',
            "webrtc.turn_secret: set it or webrtc.ice_credential, not both (a table in webrtc.ice_servers may give"
            " a server credentials of its own)",
        ),
        ('[webrtc]\nturn_credential_lifetime = "5s"', "webrtc.turn_credential_lifetime: must be in 60s..1d, got '5s'"),
        ('[webrtc]\nturn_secret = 7', "webrtc.turn_secret: expected a string, got ***"),
        (
            '[webrtc]\nadditional_hosts = ["cam.example.org:8189"]',
            "webrtc.additional_hosts: 'cam.example.org:8189' is not an IP address or a host name (no scheme, no port)",
        ),
        *(
            (
                f'[webrtc]\nadditional_hosts = ["203.0.113.7", "{host}"]',
                f"webrtc.additional_hosts: '{host}' is not an IP address or a host name (no scheme, no port)",
            )
            for host in ("-", "...", "999.1.1.1", "1.2.3", "cam..example.org", "-cam.example.org", "cam-.example.org",
                         "x" * 64 + ".example.org", ".".join(["a" * 63] * 4))
        ),  # fmt: skip
        # A TURN username or credential goes to viewers in a Link header: a control character would fail the
        # response, a space would split it for mediamtx's reader.js. Named by key, never quoted.
        *(
            (f'[webrtc]\nice_servers = [{{ urls = "turn:t", {key} }}]', f"webrtc.ice_servers[0].{where}: {PRINTABLE}")
            for key, where in (
                ('username = "u\\r\\nX-Evil: 1", credential = "pw"', "username"),
                ('username = "u", credential = "s3cr\\u0007t"', "credential"),
                ('username = "u", credential = "s3cr, \\"t\\""', "credential"),
                ('username = "u", credential = "s3cr\u00e9t"', "credential"),
            )
        ),
        ('[webrtc]\nice_servers = ["turn:t"]\nice_username = "cam\\n"\nice_credential = "pw"',
         f"webrtc.ice_username: {PRINTABLE}"),
        ('[webrtc]\nice_servers = ["turn:t"]\nice_username = "cam"\nice_credential = "s3cr\\tt"',
         f"webrtc.ice_credential: {PRINTABLE}"),
        ('[webrtc]\nice_servers = [{ urls = "turn:t", username = "front door" }]\nturn_secret = "x"',
         f"webrtc.ice_servers[0].username: {PRINTABLE}"),  # minted into "<expiry>:<username>"
    ],  # fmt: skip
)  # fmt: skip
def test_bad_ice_settings_name_the_key_and_quote_no_credential(toml, message):
    with pytest.raises(ConfigError) as info:
        load(toml)
    assert str(info.value) == message
    assert "s3cr" not in str(info.value)


def test_strings_and_tables_come_from_the_file_urls_from_the_environment_too():
    w = load(TABLES, {"CAMRELAY_WEBRTC_ADDITIONAL_HOSTS": "203.0.113.7 cam.example.org"}).webrtc
    assert [s.urls[0] for s in w.ice_servers] == ["stun:stun.example.org", "turn:a.example:3478?transport=udp",
                                                  "turn:b.example"]  # fmt: skip
    assert w.additional_hosts == ("203.0.113.7", "cam.example.org")
    w = load(None, {"CAMRELAY_WEBRTC_ICE_SERVERS": "stun:s.example.org turn:t.example.org",
                    "CAMRELAY_WEBRTC_TURN_SECRET": SECRET}).webrtc  # fmt: skip
    assert [s.username for s in for_viewer(w, NOW)] == ["", "1700000600:camrelay"]


def test_turn_passwords_and_the_secret_are_known_secrets():
    text = TABLES + 'turn_credential_lifetime = 600\n[auth]\ntoken = "t0ken-t0ken-t0ken-t0ken"\n'
    assert secret_values(load(text)) == {"pw-a", 'pw,"b"', "t0ken-t0ken-t0ken-t0ken"}
    assert secrets_in_file(text) == ["auth.token", "webrtc.ice_servers"]
    minted = f'[webrtc]\nice_servers = ["turn:t"]\nturn_secret = "{SECRET}"'
    assert secret_values(load(minted)) == {SECRET} and secrets_in_file(minted) == ["webrtc.turn_secret"]


def test_additional_hosts_are_host_candidates_at_the_relays_own_ports():
    answer = (
        "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 102\r\nc=IN IP4 192.168.1.20\r\n"
        "a=candidate:a1b2 1 udp 2130706431 192.168.1.20 41234 typ host\r\n"
        "a=candidate:c3d4 1 udp 2130706431 fd00::20 41500 typ host\r\n"
        "a=candidate:e5f6 1 udp 16777215 198.51.100.9 50000 typ relay raddr 0.0.0.0 rport 9\r\n"
        "a=end-of-candidates\r\n"
    )
    assert add_host_candidates(answer, ["203.0.113.7", "2001:db8::7", "198.51.100.1"]) == (
        "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 102\r\nc=IN IP4 192.168.1.20\r\n"
        "a=candidate:a1b2 1 udp 2130706431 192.168.1.20 41234 typ host\r\n"
        "a=candidate:ff99fe724511ee6d61b7b55ee4f0e5c6 1 udp 2130706175 203.0.113.7 41234 typ host\r\n"
        "a=candidate:42788db10d4189669500d5795929269f 1 udp 2130705919 198.51.100.1 41234 typ host\r\n"
        "a=candidate:c3d4 1 udp 2130706431 fd00::20 41500 typ host\r\n"
        "a=candidate:7018f48a42e4b46ec0ad89530b691af2 1 udp 2130706175 2001:db8::7 41500 typ host\r\n"
        "a=candidate:e5f6 1 udp 16777215 198.51.100.9 50000 typ relay raddr 0.0.0.0 rport 9\r\n"
        "a=end-of-candidates\r\n"
    )
    assert add_host_candidates(answer, []) == answer


async def test_additional_hosts_names_are_looked_up_and_addresses_kept_as_they_are():
    threads = resolver()
    try:
        addresses = await resolve(["203.0.113.7", "localhost", "2001:db8::7"], threads)  # localhost: /etc/hosts
    finally:
        threads.shutdown()
    assert addresses[0] == "203.0.113.7" and "127.0.0.1" in addresses and addresses[-1] == "2001:db8::7"


@pytest.mark.browser
async def test_the_page_reads_the_link_headers_as_the_relay_writes_them():
    links = link_headers(for_viewer(load(TABLES).webrtc, NOW))
    async with chromium() as browser:
        page = await browser.new_page()
        await page.add_script_tag(path=str(ROOT / "static" / "whep.js"))
        read = await page.evaluate("(header) => iceServersFromLinks(header)", ", ".join(links))  # as fetch joins them
    assert read == [
        {"urls": "stun:stun.example.org"},
        {"urls": "turn:a.example:3478?transport=udp", "username": "cam", "credential": "pw-a"},
        {"urls": "turns:a.example:5349", "username": "cam", "credential": "pw-a"},
        {"urls": "turn:b.example", "username": "other", "credential": 'pw,"b"'},
    ]


# mediamtx's WHEP player, run on the Link header of an OPTIONS as camrelay answers it (its fetch stands in for the
# relay); the ICE servers it gives its peer connection come back (that constructor stops it there).
READER = """async ([header, url]) => {
  window.fetch = async () => new Response(null, { status: 204, headers: { Link: header } });
  let iceServers;
  window.RTCPeerConnection = class extends RTCPeerConnection {
    constructor(config) {
      if (config.iceServers.length) { iceServers = config.iceServers; throw new Error("read"); }
      super(config);  // reader.js asks which audio codecs the browser has first
    }
  };
  return await new Promise((resolve) => {
    const reader = new MediaMTXWebRTCReader({ url, onError: () => { reader.close(); resolve(iceServers); } });
  });
}"""


@pytest.mark.browser
async def test_any_credential_the_config_takes_reaches_the_page_and_mediamtx_reader_js_intact():
    # Every character but letters and digits a TURN username or credential may hold: , ; = " \\ and the rest.
    table = f"{{ urls = 'turn:c.example', username = {json.dumps(string.punctuation)}, credential = 'x,y;z=\\\\' }}"
    servers = for_viewer(load(TABLES.replace("\n]", f"\n  {table},\n]")).webrtc, NOW)
    assert servers[-1] == IceServer(("turn:c.example",), string.punctuation, "x,y;z=\\\\")
    header = ", ".join(link_headers(servers))  # as fetch joins them
    async with chromium() as browser:
        page = await browser.new_page()
        await page.add_script_tag(path=str(ROOT / "static" / "whep.js"))
        await page.add_script_tag(path=str(mediamtx_reader_js()))
        ours = await page.evaluate("(header) => iceServersFromLinks(header)", header)
        theirs = await page.evaluate(READER, [header, "http://relay.invalid/whep/cam0"])
    per_url = [(url, s.username, s.credential) for s in servers for url in s.urls]
    assert [(s["urls"], s.get("username", ""), s.get("credential", "")) for s in ours] == per_url
    assert [(s["urls"][0], s.get("username", ""), s.get("credential", "")) for s in theirs] == per_url


async def _left_open_by_cancelled_gathering(steps: int) -> tuple[list[int], bool]:
    """For each k below ``steps``: a connection's gathering (``setLocalDescription``) cancelled after k passes of
    the event loop, then the connection closed. The ks after which an ICE socket of it was still open (each closed
    here, found among the live objects of this loop: no list of aioice's holds them), and whether the last k let
    the gathering finish (so the ks spanned all of it)."""
    leaked, finished = [], False
    loop = asyncio.get_running_loop()
    for k in range(steps):
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # host candidates only: no STUN server to ask
        pc.addTransceiver("video", direction="sendonly")
        offer = await pc.createOffer()
        gathering = asyncio.ensure_future(pc.setLocalDescription(offer))
        for _ in range(k):
            await asyncio.sleep(0)
        finished = gathering.done()
        gathering.cancel()
        await asyncio.wait([gathering])
        await pc.close()
        await asyncio.sleep(0)  # a transport closes its socket on the next pass
        left = [
            o for o in gc.get_objects()
            if isinstance(o, aioice.ice.StunProtocol) and getattr(o, "transport", None) is not None
            and o.transport._loop is loop and not o.transport.is_closing()
        ]  # fmt: skip
        for protocol in left:
            protocol.transport.close()
        if left:
            leaked.append(k)
    await asyncio.sleep(0)
    return leaked, finished


async def test_a_gathering_cancelled_at_any_step_leaves_no_socket_open_once_its_connection_is_closed():
    """A WHIP publisher stopped, a shard closed, while a connection gathers: with ``borrowed.CLOSE_ALL_BOUND`` held
    (by every relay and WHIP publisher) the connection's close closes every socket it bound, wherever the
    cancellation came. Without it, it does not (aioice keeps the host sockets bound so far in a list of its own):
    shown here first, on the same two host addresses, so that this test cannot pass by not reaching the window."""
    release = borrowed.restrict_host_addresses(["127.0.0.1", "127.0.0.2"])
    try:
        plain, plain_finished = await _left_open_by_cancelled_gathering(40)
        release_bound = borrowed.CLOSE_ALL_BOUND.hold()
        try:
            leaked, finished = await _left_open_by_cancelled_gathering(40)
        finally:
            release_bound()
    finally:
        release()
    assert plain_finished and finished, "the steps spanned the whole gathering"
    assert plain, "aioice's own close, its gathering cancelled between the two addresses, leaves a socket open"
    assert leaked == []
