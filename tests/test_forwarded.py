"""The client behind a reverse proxy: X-Forwarded-For and -Proto believed from trusted proxies only."""

import pytest

from relay.config import ConfigError, load, parse_networks
from signalling.forwarded import forwarded_client

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
