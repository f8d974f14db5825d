"""Viewers per core: the most viewers a system carries on its cores, found by a short search (sans-io).

A point carries its viewers (issue 17) when the median viewer gets at least
29 of 30 frames a second, under 0.5 % of frames are lost, and the probes'
p95 glass-to-glass latency is at most 1.15 times the system's own 1-viewer
p95. The search doubles from a start until a point fails, then bisects
between the last that passed and the first that failed until the two are
within an eighth of each other, in a few points. A point where the load
generator was the limit (its cores full) fails too, but the result says the
generator bound it: the system may carry more.

``next_viewers`` says which point to run next from those run so far;
``median_point`` folds the repeats of one point into the point judged (one
15 s repeat against a p95 limit a few milliseconds above the baseline flips
from run to run; the median of three does not as easily); ``verdict`` judges
one point; ``result`` sums up. Plain values in and out.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

FPS_SLACK = 1.0  # frames a second the median viewer may get fewer than the source: 29 of 30
MAX_LOST_PCT = 0.5  # % of frames lost, under which a point carries its viewers
MAX_P95_RATIO = 1.15  # p95 latency over the 1-viewer p95
RESOLUTION = 1 / 8  # the search stops once the first failure is within this share above the last pass
START = 16  # viewers: the first point after the 1-viewer baseline
CEILING = 512  # viewers: the search goes no higher (the result is then "at least")
MAX_POINTS = 8  # points after the baseline, at most
CPU_KEYS = ("relay_cpu_pct", "serving_cpu_pct", "generator_cpu_pct")  # a point's CPU figures, folded as medians too


def median_point(repeats: list[dict]) -> dict:
    """One point from its repeats (``benchmarks.load`` sweep points of one viewer count): the median of the
    median viewer's fps, of the lost share and of the probes' p95 over the repeats that connected; a repeat that
    did not connect counts as one with no frame, so a point whose repeats mostly failed to connect fails. Errors
    and the generator's bound count when most repeats had them. ValueError for no repeats."""
    if not repeats:
        raise ValueError("a point needs at least one repeat")
    if len(repeats) == 1:
        return repeats[0]
    connected = [p for p in repeats if "fps" in p]
    if 2 * len(connected) <= len(repeats):  # most did not connect: judged as the first that did not
        return next(p for p in repeats if "fps" not in p)
    errors = sorted({e for p in repeats for e in p.get("errors", [])})
    p95s = [p["latency_ms"]["p95"] for p in connected if p["latency_ms"]["p95"] is not None]
    fps = [p["fps"]["median"] for p in connected] + [0.0] * (len(repeats) - len(connected))
    lost = [p["lost_pct"] for p in connected] + [100.0] * (len(repeats) - len(connected))
    return {
        "peers": repeats[0].get("peers"),
        "repeats": len(repeats),
        "fps": {"median": statistics.median(fps)},
        "lost_pct": statistics.median(lost),
        "latency_ms": {"p95": statistics.median(p95s) if 2 * len(p95s) > len(repeats) else None},
        "errors": errors if 2 * sum(bool(p.get("errors")) for p in repeats) > len(repeats) else [],
        "repeat_errors": errors,  # every repeat's, judged or not
        "generator_saturated": 2 * sum(bool(p.get("generator_saturated")) for p in repeats) > len(repeats),
        **{key: statistics.median(p[key] for p in connected) for key in CPU_KEYS if all(key in p for p in connected)},
    }


@dataclass(frozen=True)
class Verdict:
    carried: bool
    reasons: tuple[str, ...]  # why not, each as a reader would put it
    generator_bound: bool = False  # the load generator, not the system, was the limit


def verdict(point: dict, base_p95: float | None, fps: float) -> Verdict:
    """Whether ``point`` (a ``benchmarks.load`` sweep point) carried its viewers, against the 1-viewer p95."""
    if "fps" not in point:  # peers never connected
        return Verdict(False, (f"not connected: {'; '.join(point.get('errors', [])) or 'no result'}",))
    reasons = []
    median = point["fps"]["median"]
    if median < fps - FPS_SLACK:
        reasons.append(f"median fps {median:.1f} < {fps - FPS_SLACK:g}")
    if point["lost_pct"] >= MAX_LOST_PCT:
        reasons.append(f"lost {point['lost_pct']:.2f} % >= {MAX_LOST_PCT:g} %")
    p95 = point["latency_ms"]["p95"]
    if p95 is None or base_p95 is None:
        reasons.append("no latency sample")
    elif p95 > MAX_P95_RATIO * base_p95:
        reasons.append(f"p95 {p95:.0f} ms > {MAX_P95_RATIO:g} x {base_p95:.0f} ms")
    if point.get("errors"):
        reasons.append(f"errors: {'; '.join(point['errors'])}")
    bound = bool(point.get("generator_saturated"))
    if bound:
        reasons.append("load generator saturated")
    return Verdict(not reasons, tuple(reasons), bound)


def next_viewers(
    tried: dict[int, bool], start: int = START, ceiling: int = CEILING, max_points: int = MAX_POINTS
) -> int | None:
    """The next point's viewers from the points run so far (viewers: carried), or None when the search is done.
    Doubling from ``start`` until a point fails, then bisecting; never above ``ceiling``."""
    if len(tried) >= max_points:
        return None
    if not tried:
        return min(start, ceiling)
    failed = [n for n, ok in tried.items() if not ok]
    if not failed:
        best = max(tried)
        return None if best >= ceiling else min(2 * best, ceiling)
    hi = min(failed)
    lo = max((n for n, ok in tried.items() if ok and n < hi), default=0)
    if hi - lo <= max(1, int(lo * RESOLUTION)):
        return None
    return (lo + hi) // 2


@dataclass(frozen=True)
class Result:
    viewers: int  # the most carried (0: not even the smallest point tried)
    per_core: float
    at_least: bool  # no point failed (the ceiling or the point budget came first), or the generator bound it
    first_failure: int | None  # the fewest viewers not carried
    why: tuple[str, ...]  # that point's reasons


def result(tried: dict[int, Verdict], system_cores: int) -> Result:
    """The search summed up: the most viewers carried below the first point that was not."""
    failed = sorted(n for n, v in tried.items() if not v.carried)
    first = failed[0] if failed else None
    carried = [n for n, v in tried.items() if v.carried and (first is None or n < first)]
    best = max(carried, default=0)
    bounded = first is not None and tried[first].generator_bound
    return Result(
        best, best / system_cores, bounded or first is None, first, tried[first].reasons if first is not None else ()
    )
