import random

import pytest

from relay.backoff import Backoff, Retry


def test_schedule_doubles_from_half_a_second_to_the_cap():
    b = Backoff(jitter=0)
    assert [b.delay(i) for i in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


def test_jitter_stays_within_twenty_percent():
    b = Backoff()
    assert b.delay(2, rand=0.0) == pytest.approx(2 * 0.8)
    assert b.delay(2, rand=0.999999) == pytest.approx(2 * 1.2, rel=1e-5)
    assert b.delay(100, rand=0.999999) == 30  # never above the cap


def test_negative_attempt_is_an_error():
    with pytest.raises(ValueError, match="attempt must be >= 0, got -1"):
        Backoff().delay(-1)


def test_stable_run_resets_the_schedule():
    r = Retry(Backoff(jitter=0), random.Random(1))
    assert [r.next_delay() for _ in range(3)] == [0.5, 1, 2]
    r.ran(3.0)  # short run: keep backing off
    assert r.next_delay() == 4
    r.ran(60.0)  # stable: start over
    assert r.next_delay() == 0.5
