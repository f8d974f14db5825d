"""Viewers per core (benchmarks/capacity.py): which points the search runs, how each is judged, what it finds."""

from __future__ import annotations

import pytest

from benchmarks.capacity import Verdict, median_point, next_viewers, result, verdict


def _search(limit: int, start: int = 16, ceiling: int = 512, max_points: int = 8) -> list[int]:
    """The points a search runs against a system that carries up to ``limit`` viewers."""
    tried: dict[int, bool] = {}
    while (n := next_viewers(tried, start, ceiling, max_points)) is not None:
        assert n not in tried, f"{n} twice"
        tried[n] = n <= limit
    return list(tried)


def test_the_search_doubles_until_a_point_fails_then_bisects_to_an_eighth():
    assert _search(150) == [16, 32, 64, 128, 256, 192, 160, 144]
    assert _search(40) == [16, 32, 64, 48, 40, 44]


def test_a_system_that_fails_the_first_point_is_searched_below_it():
    assert _search(5) == [16, 8, 4, 6, 5]


def test_the_search_stops_at_its_ceiling_and_at_its_point_budget():
    assert _search(10_000, ceiling=100) == [16, 32, 64, 100]
    assert len(_search(150, max_points=3)) == 3


def _point(fps=30.0, lost_pct=0.0, p95=50.0, errors=(), saturated=False) -> dict:
    return {"fps": {"median": fps}, "lost_pct": lost_pct, "latency_ms": {"p95": p95}, "errors": list(errors),
            "generator_saturated": saturated}  # fmt: skip


@pytest.mark.parametrize(
    ("point", "reason"),
    [
        pytest.param(_point(fps=28.9), "median fps 28.9 < 29", id="fps"),
        pytest.param(_point(lost_pct=0.5), "lost 0.50 % >= 0.5 %", id="lost"),
        pytest.param(_point(p95=57.6), "p95 58 ms > 1.15 x 50 ms", id="latency"),
        pytest.param(_point(p95=None), "no latency sample", id="no-latency"),
        pytest.param(_point(errors=["no frame for 5 s"]), "errors: no frame for 5 s", id="errors"),
        pytest.param(
            {"peers": 64, "errors": ["peers not connected after 120 s"], "gave_out": True},
            "not connected: peers not connected after 120 s",
            id="not-connected",
        ),  # fmt: skip
    ],
)
def test_a_point_is_not_carried_for_each_reason_named(point, reason):
    v = verdict(point, 50.0, 30.0)
    assert not v.carried and v.reasons == (reason,) and not v.generator_bound


def test_a_point_within_every_bound_is_carried():
    assert verdict(_point(fps=29.0, lost_pct=0.49, p95=57.0), 50.0, 30.0) == Verdict(True, ())


def test_viewers_per_core_is_the_most_carried_below_the_first_failure():
    tried = {16: Verdict(True, ()), 32: Verdict(True, ()), 64: Verdict(False, ("lost",)), 48: Verdict(True, ()),
             56: Verdict(True, ())}  # fmt: skip
    r = result(tried, 1)
    assert (r.viewers, r.per_core, r.at_least, r.first_failure, r.why) == (56, 56.0, False, 64, ("lost",))
    assert result(tried, 2).per_core == 28.0


def test_a_failure_of_the_generator_or_none_at_all_makes_it_a_lower_bound():
    bound = {16: Verdict(True, ()), 32: Verdict(False, ("load generator saturated",), generator_bound=True)}
    assert result(bound, 1).at_least and result(bound, 1).viewers == 16
    assert result({16: Verdict(True, ()), 32: Verdict(True, ())}, 1).at_least


def test_a_point_is_judged_by_the_median_of_its_repeats():
    one_bad = [_point(p95=49.0, fps=29.5), _point(p95=80.0, lost_pct=2.0, fps=28.0), _point(p95=55.0)]
    folded = median_point(one_bad)
    assert folded["latency_ms"]["p95"] == 55.0 and folded["lost_pct"] == 0.0 and folded["fps"]["median"] == 29.5
    assert verdict(folded, 50.0, 30.0).carried
    cpu = [{**_point(), "relay_cpu_pct": c, "generator_cpu_pct": 10.0} for c in (40.0, 90.0, 50.0)]
    assert median_point(cpu)["relay_cpu_pct"] == 50.0 and median_point(cpu)["generator_cpu_pct"] == 10.0
    two_bad = [_point(p95=49.0), _point(p95=80.0), _point(p95=61.0)]
    assert verdict(median_point(two_bad), 50.0, 30.0).reasons == ("p95 61 ms > 1.15 x 50 ms",)


def test_repeats_that_did_not_connect_count_against_the_point():
    lost = {"peers": 64, "errors": ["peers not connected after 120 s"], "gave_out": True}
    assert verdict(median_point([_point(), lost, lost]), 50.0, 30.0).reasons == (
        "not connected: peers not connected after 120 s",
    )
    folded = median_point([_point(), _point(), lost])  # outvoted, but kept to read
    assert verdict(folded, 50.0, 30.0).carried
    assert folded["repeat_errors"] == ["peers not connected after 120 s"]


def test_the_generator_bound_a_point_when_it_did_in_most_repeats():
    assert not verdict(median_point([_point(saturated=True), _point(), _point()]), 50.0, 30.0).generator_bound
    assert verdict(median_point([_point(saturated=True), _point(saturated=True), _point()]), 50.0, 30.0).generator_bound


def test_a_single_repeat_is_the_point_itself_and_none_is_an_error():
    p = _point()
    assert median_point([p]) is p
    with pytest.raises(ValueError, match="at least one repeat"):
        median_point([])


def test_probes_join_last_or_spread_through_the_join_order():
    from benchmarks.load import LAST, SPREAD, join_order

    def probe_positions(order):
        at, positions = 0, []
        for probe, count in order:
            positions += list(range(at, at + count)) if probe else []
            at += count
        return positions, at

    assert join_order(62, 2, 50, LAST) == [(False, 50), (False, 12), (True, 2)]
    assert probe_positions(join_order(62, 2, 50, SPREAD)) == ([16, 48], 64)  # a quarter and three quarters in
    assert probe_positions(join_order(126, 2, 50, SPREAD)) == ([32, 96], 128)
    assert all(count <= 50 for _, count in join_order(126, 2, 50, SPREAD))  # light peers still 50 a process
    assert join_order(0, 1, 50, SPREAD) == [(True, 1)]  # the 1-viewer baseline
    assert join_order(5, 0, 50, SPREAD) == [(False, 5)]
    with pytest.raises(ValueError, match="probes_at: 'first'"):
        join_order(5, 2, 50, "first")


def test_a_probe_splits_each_decoded_frames_latency_at_its_packets_arrivals():
    """``ArrivalTrace``: packets in (their RTP timestamps, the clock), decoded frames in with aiortc's pts (counted
    from its first frame), each frame's arrivals out in ms after its capture; not RTP (RTCP, STUN) is ignored."""
    import struct

    from benchmarks.peers import OFFSET_FRAMES, ArrivalTrace

    def rtp(timestamp, marker=False):
        return struct.pack("!BBHII", 0x80, 0x65 | (0x80 if marker else 0), 1, timestamp, 7) + bytes(100)

    trace = ArrivalTrace()
    origin, t0 = 4_000_000_000, 1000.0  # the timestamps wrap around 2**32 on the way
    steps = [0, 2900, 6100, 9000, 12050, 15000, 18100, 21000, 24000]  # 90 kHz; each interval differs a little
    for i, step in enumerate(steps):
        ts, at = (origin + step) & 0xFFFFFFFF, t0 + i / 30
        trace.seen(rtp(ts), at + 0.020)  # first packet 20 ms after capture at t0 + i/30
        trace.seen(rtp(ts, marker=True), at + 0.022)
        trace.seen(bytes([0x80, 200]) + bytes(30), at + 0.030)  # an RTCP sender report: not a frame
        trace.seen(b"\x00\x01" + bytes(18), at + 0.030)  # STUN
    for i, step in enumerate(steps[: OFFSET_FRAMES + 2]):
        trace.decoded(step, t0 + i / 30 + 0.060, 60.0)  # decoded 60 ms after capture
    split = trace.split
    assert len(split["decoded"]) == OFFSET_FRAMES + 2  # the ones waiting for the offset included
    assert [round(v, 3) for v in split["first_packet"]] == [20.0] * len(split["decoded"])
    assert [round(v, 3) for v in split["last_packet"]] == [22.0] * len(split["decoded"])
    assert [round(v, 1) for v in split["next_frame"]] == [53.3] * len(split["decoded"])  # 20 ms + a frame later
    assert split["packets"] == [2] * len(split["decoded"]) and split["bytes"] == [112 * 2] * len(split["decoded"])
