"""The load benchmark runs end to end for every system (2 peers, a few seconds), so it cannot silently rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.load import SYSTEMS, light_peers_overflowed, markdown, per_viewer_cpu, summarise

ROOT = Path(__file__).resolve().parent.parent


def test_load_benchmark_smoke_every_system(tmp_path):
    out = tmp_path / "load"
    cmd = [sys.executable, "-m", "benchmarks.load", "--peers", "2", "--probes", "1", "--duration", "2",
           "--size", "640x360", "--fps", "15", "--bitrate", "500k", "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert list(data["runs"]) == list(SYSTEMS)
    for name, (point,) in data["runs"].items():
        # Every figure is there for every system; what they are is for a full run on a quiet machine to say.
        assert point["peers"] == 2 and point["errors"] == [], (name, point)
        assert point["latency_ms"]["samples"] > 0 and point["latency_ms"]["p50"] is not None, (name, point)
        assert point["frames"] > 0 and point["fps"]["min"] > 0, (name, point)  # every peer got frames
        assert point["egress_mbps"] > 0 and point["relay_cpu_pct"] > 0, (name, point)
    # camrelay's own counts over the window: where its frames went (the others have no such API).
    counts = data["runs"]["camrelay"][0]["relay_overload"]
    assert counts["frames_encoded"] > 0 and counts["per_viewer"]["frames_delivered"] > 0, counts
    assert counts["resyncs"] >= 0 and counts["frames_dropped"] >= 0, counts
    table = out.with_suffix(".md").read_text()
    for name in SYSTEMS:
        assert f"| {name} | 2 |" in table
    assert "camrelay's own counts over each point's window" in table
    for what in ("latency", "cpu"):
        png = tmp_path / f"load-{what}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _peer(frames=300, lost=0, probe=False, lat=(), first=50.0, fps=30.0, error=""):
    return {"probe": probe, "frames": frames, "bytes": 1000 * frames, "lost": lost, "fps": fps,
            "first_frame_ms": first, "latencies_ms": list(lat), "error": error}  # fmt: skip


def test_summary_flags_a_saturated_generator_and_a_system_that_gave_out():
    peers = [_peer(), _peer(fps=12.0, lost=150), _peer(probe=True, lat=[40, 50, 60], fps=13.0)]
    p = summarise(3, 1, peers, serving_cpu=50.0, source_cpu=40.0, gen_cpu=150.0, rss=[2**20], duration=10, fps=30)
    assert p["gave_out"]  # median fps 13 < half of 30
    assert p["generator_saturated"] == (150 + 90 > 0.85 * 100 * __import__("psutil").cpu_count())
    assert p["frames_lost"] == 150 and round(p["lost_pct"], 1) == round(100 * 150 / 1050, 1)
    assert p["latency_ms"]["p50"] == 50 and p["egress_mbps"] == 900 * 1000 * 8 / 10 / 1e6
    assert "(gave out)" in markdown({"x": [p]})


def test_per_viewer_cpu_is_the_slope_and_ignores_points_past_the_limit():
    pts = [{"peers": n, "relay_cpu_pct": 40 + 0.5 * n, "gave_out": False} for n in (1, 10, 20)]
    pts.append({"peers": 30, "relay_cpu_pct": 200.0, "gave_out": True})
    assert per_viewer_cpu(pts) == 0.5
    assert per_viewer_cpu(pts[:1]) is None


def test_light_peers_behind_while_probes_keep_up_is_the_generators_limit():
    peers = [_peer(fps=20.0), _peer(fps=21.0), _peer(probe=True, lat=[50], fps=30.0)]
    p = summarise(3, 1, peers, serving_cpu=5.0, source_cpu=40.0, gen_cpu=30.0, rss=[2**20], duration=10, fps=30)
    assert p["generator_saturated"] and not p["gave_out"]
    assert "(saturated)" in markdown({"x": [p]})


@pytest.mark.parametrize(
    ("rcvbuf", "probe_lost", "overflowed"),
    [
        pytest.param(120, 0, True, id="light-sockets-dropped"),
        pytest.param(0, 0, False, id="nothing-dropped"),
        pytest.param(120, 3, False, id="the-probes-lost-too"),  # the system's: not told apart, not excused
    ],
)
def test_receive_buffers_overflowing_while_the_probes_lose_nothing_is_the_generators_limit(
    rcvbuf, probe_lost, overflowed
):
    """Light peers (niced, or at SCHED_IDLE) that are not run in time overflow their sockets: their losses are the
    generator's, where the probes got every frame."""
    peers = [_peer(fps=30.0), _peer(probe=True, lat=[50], fps=30.0)]
    peers[1]["lost"] = probe_lost
    assert light_peers_overflowed({"rcvbuf": rcvbuf, "sndbuf": 0}, peers) is overflowed
    assert not light_peers_overflowed({}, peers)


def _pinned_search(out: Path, *options: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    """``benchmarks.load --pin`` with a tiny search (one point of 2 viewers after the baseline, 2 s a point, a
    small stream) and ``options``: the finished run, its JSON and its report."""
    cmd = [sys.executable, "-m", "benchmarks.load", "--pin", *options, "--probes", "1", "--duration", "2",
           "--search-start", "2", "--search-points", "1", "--size", "640x360", "--fps", "15", "--bitrate", "500k",
           "--no-plots", "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".md").read_text()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs to split")
@pytest.mark.timeout(180)
def test_pinned_search_reports_viewers_per_core_for_camrelay_and_mediamtx_and_where_each_side_ran(tmp_path):
    """--pin without --peers: for each system its 1-viewer point and a tiny search, every point pinned (the
    system's processes and the peers' workers on the CPUs the report names, as read back), the light peers
    counting headers, and a viewers-per-core line for each system."""
    result, data, report = _pinned_search(tmp_path / "pinned", "--systems", "camrelay,mediamtx")
    system, generator = data["meta"]["system_cores"], data["meta"]["generator_cores"]
    assert data["meta"]["mode"] == "pinned" and not set(system) & set(generator)
    for name in ("camrelay", "mediamtx"):
        points = data["runs"][name]
        assert [p["peers"] for p in points] == [1, 2]
        for p in points:
            assert p["mode"] == "pinned" and p["errors"] == [] and p["frames"] > 0, (name, p)
            assert p["generator_workers_cores"] == generator, (name, p)
            # camrelay: the relay and its camera worker; mediamtx: it, and the camrelay (and worker) feeding it.
            assert len(p["system_processes"]) >= 2 and {tuple(q["cores"]) for q in p["system_processes"]} == {
                tuple(system)
            }, (name, p)
        found = data["capacity"][name]
        assert found["points"] == [2] and found["system_cores"] == system, found
        assert found["viewers_per_core"] == (found["viewers"] / len(system)), found
    assert f"Mode: pinned. The system under test (all its processes) on CPUs {system[0]}" in report
    assert "| camrelay |" in report.split("Viewers per core:")[1] and "| mediamtx |" in report
    assert f"the load generator (peer workers) on CPUs {','.join(map(str, generator))}" in result.stdout


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs to split")
@pytest.mark.timeout(180)
def test_a_pinned_search_with_the_source_apart_measures_each_point_twice_and_puts_the_worker_with_the_peers(
    tmp_path,
):
    """--source-apart --point-repeats 2: the relay alone on the system's CPUs, its camera worker on the
    generator's; every point of the search run twice, and the search's summary judged from both."""
    _, data, report = _pinned_search(
        tmp_path / "apart", "--source-apart", "--point-repeats", "2", "--systems", "camrelay"
    )
    system, generator = data["meta"]["system_cores"], data["meta"]["generator_cores"]
    assert data["meta"]["source_apart"] is True and data["meta"]["point_repeats"] == 2
    points = data["runs"]["camrelay"]
    assert [p["peers"] for p in points] == [1, 1, 2, 2]
    for p in points:
        assert p["errors"] == [] and p["frames"] > 0 and p["source_apart"] is True, p
        relay, worker = p["system_processes"]  # the relay first, then its camera worker
        assert relay["cores"] == system and worker["cores"] == generator, p
    found = data["capacity"]["camrelay"]
    assert found["points"] == [2], found
    assert found["at_best"] is None or found["at_best"]["peers"] == 2, found  # None: 2 was not carried
    assert f"The system under test (its fan-out) on CPUs {system[0]}" in report
    assert "Each point of the search measured 2 times, judged by the medians." in report


def test_lipsync_benchmark_smoke(tmp_path):
    """benchmarks.lipsync end to end, a few seconds each: every figure is there (what they are is for a full run)."""
    out = tmp_path / "lipsync.json"
    cmd = [sys.executable, "-m", "benchmarks.lipsync", "--duration", "3", "--rounds", "1", "--ab-duration", "3",
           "--settle", "1", "--viewers", "2", "--size", "640x360", "--fps", "15", "--bitrate", "500k",
           "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    for listener in ("aiortc", "delivered"):
        heard = data[listener]
        assert heard["bursts"] >= 2 and heard["bursts_slipped"] == 0, heard
        assert heard["audio_latency_ms"]["p50"] is not None and heard["lip_sync_ms"]["median"] is not None, heard
    assert data["delivered"]["sender_report_error_ms"]["video"]["n"] > 0
    assert [a["audio"] for a in data["ab"]["arms"]] == [True, False]
    with_sound, without = data["per_viewer"]["arms"]
    assert with_sound["packets_per_viewer_s"] > without["packets_per_viewer_s"]  # the Opus packets reached them
    assert data["ab"]["with_audio"]["audio_thread_cpu_pct"] > 0 == data["ab"]["without_audio"]["audio_thread_cpu_pct"]


def test_burst_benchmark_smoke(tmp_path):
    """benchmarks.burst end to end with three joiners and one watcher: every figure is there."""
    out = tmp_path / "burst"
    cmd = [sys.executable, "-m", "benchmarks.burst", "--joiners", "3", "--watchers", "1", "--repeats", "1",
           "--baseline", "1", "--hold", "1", "--size", "640x360", "--fps", "15", "--bitrate", "500k",
           "--out", str(out), "--raw"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr[-3000:]
    (repeat,) = json.loads(out.with_suffix(".json").read_text())["repeats"]
    assert repeat["connected"] == "3/3" and repeat["errors"] == [], repeat
    # --raw: each joiner's own steps, the relay's for it among them (its answer, its connection, its first frame)
    assert len(repeat["joiners"]) == 3, repeat["joiners"]
    assert all({"answered", "connected", "first_sent"} <= set(j["relay"]) for j in repeat["joiners"]), repeat
    assert repeat["first_picture_p50_ms"] is not None and repeat["first_age_max_ms"] is not None, repeat
    # where the p95 joiner's time went, phase by phase (its own steps and the relay's): every phase seen, and they
    # add up to its time from POST to its first picture
    from benchmarks.burst import PHASES, phases

    ranked = sorted(repeat["joiners"], key=lambda j: j["first_picture_ms"] - j["offered_ms"])
    assert all(v is not None for v in phases(ranked[-1]).values()), phases(ranked[-1])
    assert sum(phases(ranked[-1]).values()) == pytest.approx(
        ranked[-1]["first_picture_ms"] - ranked[-1]["offered_ms"], abs=1
    )  # each phase rounded to 0.1 ms
    assert set(repeat["phases_p95_joiner_ms"]) == {phase for phase, _ in PHASES}, repeat
    assert repeat["loop_lag_ms"]["before"]["samples"] > 0 and repeat["loop_lag_ms"]["during"]["samples"] > 0, repeat
    (watcher,) = repeat["watchers"]
    assert watcher["before"]["frames"] > 0 and watcher["error"] == "", watcher


def test_burst_benchmark_chromium_probe_smoke(tmp_path):
    """benchmarks.burst --probe chromium,browser: two Chromium pages join, then two model joiners, against one relay;
    every page connected with a picture, its own steps, the relay's steps for it and its getStats are there."""
    out = tmp_path / "burst"
    cmd = [sys.executable, "-m", "benchmarks.burst", "--probe", "chromium,browser", "--joiners", "2",
           "--watchers", "1", "--repeats", "1", "--baseline", "1", "--hold", "1", "--settle", "1",
           "--size", "640x360", "--fps", "15", "--bitrate", "500k", "--out", str(out), "--raw"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    pages, model = json.loads(out.with_suffix(".json").read_text())["repeats"]
    assert (pages["probe"], model["probe"]) == ("chromium", "browser")
    for repeat in (pages, model):
        assert repeat["connected"] == "2/2" and repeat["errors"] == [], repeat
        assert repeat["from_post_p50_p95_max_ms"][2] is not None, repeat
    for page in pages["joiners"]:
        assert page["browser"]["visibility"] == "visible", page  # a hidden page's timers would be throttled
        # its steps from its POST, each seen: the answer, ICE, DTLS, connected, its first frame decoded and shown
        assert all(page[k] is not None for k in ("answered_ms", "ice_ms", "connected_ms", "presented_ms")), page
        assert page["first_picture_ms"] is not None, page
        assert {"pair_ms", "dtls_ms", "remote_set_ms"} <= set(page["browser"]), page
        assert {"answered", "connected", "first_sent"} <= set(page["relay"]), page  # the relay's trace found it
        assert page["browser"]["iceRole"] == "controlling" and page["frames_after"] > 0, page
    assert pages["presented_p50_p95_max_ms"][2] is not None and pages["browser_roles"], pages


def test_sendpath_benchmark_smoke():
    """The send path's micro-benchmark: every viewer is pushed to and takes the packets of every frame."""
    cmd = [sys.executable, "-m", "benchmarks.sendpath", "--viewers", "2", "--frames", "20", "--repeats", "1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert out["viewers"] == 2 and out["pushed"] == 2, out  # both live, sent to from the publish
    assert out["packets_received_min"] >= 80 * 12, out  # 80 frames (60 to start, 20 measured), 12 packets or more each
    assert out["us_per_viewer_frame"] > 0, out


def _sendpath(paths: str) -> dict:
    """``benchmarks.sendpath --paths PATHS`` on 2 viewers, 10 frames, 2 repeats at 720p: its JSON (skipped where the
    C send path is not built)."""
    from relay.webrtc import borrowed

    if not borrowed.C_SEND_BUILT:
        pytest.skip("relay.webrtc._fastsend is not built here")
    cmd = [sys.executable, "-m", "benchmarks.sendpath", "--viewers", "2", "--frames", "10", "--repeats", "2",
           "--size", "720p", "--paths", paths]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_sendpath_benchmark_alternates_the_c_and_python_send_paths():
    """``--paths c,python``: both send paths on the same viewers, each repeat both, with their ratio."""
    out = _sendpath("c,python")
    assert out["size"] == "720p" and out["pushed"] == 2, out
    assert all(len(out[p]["each_repeat_us_per_viewer_frame"]) == 2 for p in ("c", "python")), out
    assert out["ratio_c_to_python"] > 0 and out["packets_received_min"] >= 80 * 6, out


def test_sendpath_benchmark_alternates_the_batch_and_the_per_viewer_paths():
    """``--paths batch,c,python``: one C call a frame for every viewer, one a viewer-frame and the Python path on the
    same viewers, each repeat all three (the order reversed every other repeat); the viewers are in the batch
    after each batch run and in no other."""
    out = _sendpath("batch,c,python")
    assert all(len(out[p]["each_repeat_us_per_viewer_frame"]) == 2 for p in ("batch", "c", "python")), out
    assert out["in_batch_after_each_run"] == [2, 0, 0, 0, 0, 2], out
    assert out["pushed_after_each_run"] == [2] * 6 and out["packets_received_min"] >= 80 * 6, out
