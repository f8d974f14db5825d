import random

import pytest

from relay.backoff import Backoff, Restarts, Retry


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


def test_a_thing_that_keeps_failing_is_restarted_at_once_then_after_a_growing_wait_until_it_runs_well():
    r = Restarts(Backoff(jitter=0, stable_after=60.0))
    assert r.due(0.0) and r.restarted(0.0) == 0.5  # the first failure restarts it at once
    assert not r.failed(0.2) and not r.failed(0.4) and r.waiting == 2  # too soon: counted, not restarted
    assert r.failed(0.5) and r.restarted(0.5) == 1
    assert not r.due(1.4) and r.restarted(1.5) == 2 and r.restarts == 3 and r.waiting == 0
    assert not r.first
    for _ in range(10):
        r.restarted(100.0)
    assert r.restarted(100.0) == 30, "the cap"
    assert not r.due(129.0) and r.due(159.0) and not r.first, "59 s before it failed again: still the cap's wait"
    assert r.restarted(159.0) == 30
    assert r.due(219.0) and r.first, "a minute's run before it failed again: the schedule starts again"
    assert r.restarted(219.0) == 0.5
