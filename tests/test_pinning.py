"""benchmarks.load --pin: the system under test and the load generator on the cores it says, read back from the
kernel (os.sched_getaffinity of every thread), and a split of the CPUs that is checked before anything starts."""

from __future__ import annotations

import asyncio
import os

import psutil
import pytest

from benchmarks.load import start_system
from benchmarks.peers import PeerPlan, run_worker
from benchmarks.pinning import Split, pin_tree, split_cores, thread_on
from benchmarks.resources import process_tree

from .conftest import end_workers

USABLE = sorted(os.sched_getaffinity(0))
two_cpus = pytest.mark.skipif(len(USABLE) < 2, reason="pinning needs two CPUs to split")


def test_by_default_the_system_gets_the_first_half_of_the_cpus_and_the_generator_the_rest():
    assert split_cores(available={0, 1}) == Split((0,), (1,))
    assert split_cores(available={0, 1, 2, 3}) == Split((0, 1), (2, 3))
    assert split_cores("2-3", "0,1", available={0, 1, 2, 3}) == Split((2, 3), (0, 1))
    assert split_cores("1", available={0, 1, 2}) == Split((1,), (0, 2))


@pytest.mark.parametrize(
    ("system", "generator", "available", "error"),
    [
        pytest.param("", "", {0}, r"--pin needs at least 2 CPUs to split; this process may use \[0\]", id="one-cpu"),
        pytest.param("zero", "", {0, 1}, "--system-cores: 'zero' is not a list of CPUs", id="not-a-number"),
        pytest.param("1-0", "", {0, 1}, "--system-cores: '1-0' counts down", id="counts-down"),
        pytest.param("0", "3", {0, 1}, r"--generator-cores: \[3\] not among the usable CPUs \[0, 1\]", id="absent"),
        pytest.param("0-1", "", {0, 1}, "--generator-cores: no CPU left for it", id="none-left"),
        pytest.param("0", "0,1", {0, 1}, r"--system-cores and --generator-cores share \[0\]", id="overlap"),
    ],
)
def test_a_split_that_cannot_be_is_refused_naming_the_option(system, generator, available, error):
    with pytest.raises(ValueError, match=error):
        split_cores(system, generator, available)


def _threads_cores(proc: psutil.Process) -> set[tuple[int, ...]]:
    """The CPU sets of ``proc``'s threads, each as read back."""
    return {tuple(sorted(os.sched_getaffinity(t.id))) for t in proc.threads()}


@two_cpus
@pytest.mark.timeout(90)
async def test_the_system_and_the_peers_workers_run_where_the_pin_says(spawn):
    """camrelay started as the load benchmark starts it, pinned: its relay and camera worker, every thread of
    each, on the system's CPU by inheritance, and so read back after ``pin_tree``; the starting thread back where
    it was; a light peers' worker on the generator's CPU, watching the pinned relay, and (``--light-idle``) every
    thread of it at SCHED_IDLE, below the probes and the system's source, yet counting frames."""
    split = Split((USABLE[0],), (USABLE[1],))
    before = os.sched_getaffinity(0)
    with thread_on(split.system):  # as benchmarks.load does, from the thread that starts it
        system = start_system("camrelay", "320x180", 15, "200k")
    procs = []
    ready, results, go = spawn.Queue(), spawn.Queue(), spawn.Event()
    try:
        assert os.sched_getaffinity(0) == before
        tree = process_tree(system.serving()[0])
        assert len(tree) >= 2, "the relay and its camera worker"
        for proc in tree:  # born there: every thread, those started after the relay came up too
            assert _threads_cores(proc) == {split.system}, proc
        placed = pin_tree(tree, split.system)
        assert [p["cores"] for p in placed] == [list(split.system)] * len(tree)
        plan = PeerPlan("webrtc-rtp", system.url, 2, False, 2.0, 15, 10, light_idle=True, cores=split.generator)
        procs.append(spawn.Process(target=run_worker, args=(plan, ready, go, results), daemon=True))
        procs[0].start()
        assert (await asyncio.to_thread(ready.get, True, 60))[0] == "ready"
        assert os.sched_getaffinity(procs[0].pid) == set(split.generator)
        lowered = {
            (os.sched_getscheduler(t.id), os.getpriority(os.PRIO_PROCESS, t.id))
            for t in psutil.Process(procs[0].pid).threads()
        }
        assert lowered == {(os.SCHED_IDLE, 10)}, "every thread of the light peers' worker"
        go.set()
        peers = await asyncio.to_thread(results.get, True, 60)
        assert [(p["cores"], p["error"]) for p in peers] == [(list(split.generator), "")] * 2
        assert all(p["frames"] > 0 for p in peers)
        for proc in tree:  # the peers' load changed nothing of where the system runs
            assert _threads_cores(proc) == {split.system}, proc
    finally:
        go.set()
        await end_workers(procs, 30)
        for q in (ready, results):
            q.close()
            q.join_thread()
        await asyncio.to_thread(system.close)


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--systems", "camrelay_base"], "camrelay_base and --base-tree go together"),
        (["--systems", "camrelay", "--base-tree", "."], "camrelay_base and --base-tree go together"),
        (["--systems", "camrelay_base", "--base-tree", "/nonexistent"], "holds no relay package"),
    ],
)
def test_a_two_tree_run_is_refused_without_its_tree_or_its_system(argv, error, capsys):
    """``camrelay_base`` (the relay of another checkout, beside this one's in the same run) needs ``--base-tree``,
    a checkout with a relay package, and the tree needs the system: refused before anything starts."""
    from benchmarks import load

    with pytest.raises(SystemExit):
        load.main(["--pin", "--peers", "1", *argv])
    assert error in capsys.readouterr().err
