"""benchmarks.loopcost's report: each callback's CPU inside each point's measured window, and its slope per added
viewer, from a relay's snapshots and the load benchmark's JSON."""

from __future__ import annotations

import json

import pytest

from benchmarks import loopcost


def _snapshots(path, rows):
    path.write_text("".join(json.dumps({"t": t, "cpu": cpu, "callbacks": cb}) + "\n" for t, cpu, cb in rows))


def test_the_report_takes_each_points_window_and_gives_each_callbacks_cost_per_added_viewer(tmp_path):
    # 1 viewer: pid 10, window 100-110; 5 viewers: pid 11, window 200-210. Snapshots outside a window are not read.
    _snapshots(tmp_path / "lc-10.jsonl", [
        (99.0, 0.0, {}),  # before the window
        (100.5, 1.0, {"publish": [0.5, 300], "rtcp": [0.0, 0]}),
        (110.5, 1.2, {"publish": [0.6, 600], "rtcp": [0.0, 0]}),  # after: the window's last is 100.5 alone
        (109.5, 1.2, {"publish": [0.6, 600], "rtcp": [0.0, 0]}),
    ])  # fmt: skip
    _snapshots(tmp_path / "lc-11.jsonl", [
        (200.5, 5.0, {"publish": [1.0, 0], "rtcp": [0.0, 0]}),
        (209.5, 5.9, {"publish": [1.45, 900], "rtcp": [0.36, 90]}),
    ])  # fmt: skip
    load = tmp_path / "load.json"
    points = [{"peers": 1, "window": [100, 110], "serving_pids": [10]}, {"peers": 5, "window": [200, 210],
                                                                       "serving_pids": [11]}]  # fmt: skip
    load.write_text(json.dumps({"runs": {"camrelay": points}}))
    lines = loopcost.report(load, str(tmp_path / "lc"))
    # CPU: 0.2 s in 9 s at 1 viewer (2.22 %), 0.9 s in 9 s at 5 (10 %): 1.944 % per added viewer
    assert lines[0] == "camrelay: 2.22 % of a core at 1 viewers, 10.00 % at 5: 1.9444 % per added viewer"
    # publish: 0.1/9 then 0.45/9 a second: (5 - 1.11) % / 4, 100 calls a second, 500 us each;
    # rtcp: 4 % / 4, 10 calls a second, 4,000 us each
    assert lines[3:] == ["| rtcp | 1.0000 | 51.4 % | 10 | 4000.0 |", "| publish | 0.9722 | 50.0 % | 100 | 500.0 |"]


def test_a_window_without_two_snapshots_is_refused_naming_the_point(tmp_path):
    _snapshots(tmp_path / "lc-10.jsonl", [(100.5, 1.0, {})])
    load = tmp_path / "load.json"
    load.write_text(json.dumps({"runs": {"camrelay": [{"peers": 1, "window": [100, 110], "serving_pids": [10]}]}}))
    with pytest.raises(SystemExit, match="1-viewer window"):
        loopcost.report(load, str(tmp_path / "lc"))
