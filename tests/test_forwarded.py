"""The client behind a reverse proxy: X-Forwarded-For and -Proto believed from trusted proxies only."""

import dataclasses

import pytest
from multidict import CIMultiDict

from relay.config import ConfigError, load, parse_networks
from signalling.forwarded import forwarded_client

from .conftest import make_config, start_relay

LOCAL = parse_networks(("127.0.0.1", "10.0.0.0/8", "::1"))


@pytest.mark.parametrize(
    ("peer", "xff", "proto", "trusted", "expected"),
    [
        ("127.0.0.1", "192.168.1.7", "https", LOCAL, ("192.168.1.7", "https")),
        ("10.1.2.3", "192.168.1.7", "http", LOCAL, ("192.168.1.7", "http")),
        # The last entry is the one the proxy added; earlier ones are the client's own claims.
        ("127.0.0.1", "6.6.6.6, 192.168.1.7", "https", LOCAL, ("192.168.1.7", "https")),
        ("127.0.0.1", "192.168.1.7:51000", None, LOCAL, ("192.168.1.7", None)),
        ("127.0.0.1", "[fe80::1]:51000", None, LOCAL, ("fe80::1", None)),
        ("::1", "2001:db8::7", "HTTPS", LOCAL, ("2001:db8::7", "https")),
        # A dual-stack socket ("::" in http.host) shows an IPv4 proxy as IPv4-mapped.
        ("::ffff:127.0.0.1", "192.168.1.7", "https", LOCAL, ("192.168.1.7", "https")),
        # Not from a trusted proxy: the headers are the client's own and prove nothing.
        ("192.168.1.50", "127.0.0.1", "https", LOCAL, (None, None)),
        ("127.0.0.1", "192.168.1.7", "https", (), (None, None)),
        # Garbage from the proxy changes nothing.
        ("127.0.0.1", "not-an-address", "gopher", LOCAL, (None, None)),
        ("127.0.0.1", None, None, LOCAL, (None, None)),
        (None, "192.168.1.7", "https", LOCAL, (None, None)),
    ],
)
def test_forwarded_client(peer, xff, proto, trusted, expected):
    assert forwarded_client(peer, xff, proto, trusted) == expected


def test_trusted_proxies_are_addresses_or_networks():
    assert load('[http]\ntrusted_proxies = ["127.0.0.1", "10.0.0.0/8"]').http.trusted_proxies == (
        "127.0.0.1",
        "10.0.0.0/8",
    )
    with pytest.raises(ConfigError) as info:
        load('[http]\ntrusted_proxies = ["proxy.lan"]')
    assert str(info.value) == (
        "http.trusted_proxies: 'proxy.lan' is not an IP address or network (like 127.0.0.1 or 10.0.0.0/8)"
    )


async def test_a_header_on_two_lines_is_read_as_one_list(http):
    """A proxy that adds its own X-Forwarded-For line (rather than appending) must not let the client's win."""
    from .test_whep import CHROMIUM_OFFER

    config = make_config(session_rate=0.01, session_burst=1)
    config = dataclasses.replace(config, http=dataclasses.replace(config.http, trusted_proxies=("127.0.0.1",)))
    runner, relay = await start_relay(config)
    try:
        answers = []
        for _ in range(2):
            headers = CIMultiDict([("Content-Type", "application/sdp")])
            headers.add("X-Forwarded-For", "6.6.6.6")  # the client's own claim
            headers.add("X-Forwarded-For", "192.168.1.50")  # the line the proxy added
            async with http.post(relay.whep(), data=CHROMIUM_OFFER, headers=headers) as resp:
                answers.append((resp.status, (await resp.text()).strip()))
    finally:
        await runner.cleanup()
    assert answers == [(201, answers[0][1]), (429, "too many new sessions from 192.168.1.50; retry later")]
