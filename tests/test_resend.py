"""A viewer's NACKs answered within a budget (``relay.webrtc.resend``), sans-io. On a real sender, aiortc's own handling
of a crafted NACK: tests/test_batchsend.py."""

from __future__ import annotations

import pytest

from relay.webrtc.resend import RESEND_KEPT, ResendBudget


def test_a_packet_is_sent_again_once_within_again_after_then_again():
    b = ResendBudget(rate=100, burst=10, again_after=0.05)
    assert [b.allow(7, 0.0), b.allow(7, 0.049), b.allow(8, 0.049), b.allow(7, 0.05)] == [True, False, True, True]
    assert (b.allowed, b.refused) == (3, 1)


def test_past_the_burst_packets_are_refused_until_the_rate_refills_the_bucket():
    b = ResendBudget(rate=100, burst=10, again_after=0.0)
    assert [b.allow(s, 0.0) for s in range(12)] == [True] * 10 + [False] * 2
    assert not b.allow(12, 0.009)  # 0.9 of a token
    assert b.allow(13, 0.0101) and not b.allow(14, 0.0101)  # a token in 10 ms at 100 a second
    assert [b.allow(s, 10.0) for s in range(100, 112)] == [True] * 10 + [False] * 2  # refilled to the burst, no more
    assert (b.allowed, b.refused) == (21, 6)


def test_a_clock_that_goes_back_refills_nothing():
    b = ResendBudget(rate=100, burst=1, again_after=0.0)
    assert b.allow(1, 5.0) and not b.allow(2, 4.0) and not b.allow(3, 5.0) and b.allow(4, 5.0101)


def test_what_is_remembered_is_bounded():
    b = ResendBudget(rate=1e9, burst=10**6, again_after=1.0)
    for s in range(RESEND_KEPT * 3):
        assert b.allow(s, s * 1e-6)
    assert len(b._sent) <= RESEND_KEPT
    assert not b.allow(RESEND_KEPT * 3 - 1, 0.01)  # the newest are still remembered


@pytest.mark.parametrize(("rate", "burst", "again_after"), [(0, 1, 0.0), (1, 0, 0.0), (1, 1, -1.0)])
def test_a_budget_that_could_send_nothing_is_refused(rate, burst, again_after):
    with pytest.raises(ValueError, match="resend budget"):
        ResendBudget(rate, burst, again_after)
