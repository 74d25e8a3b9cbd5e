"""The benchmark harness itself (python -m mpop bench): that it runs, prints its table and
measures what it says. Behaviour only: no speed is asserted here."""

from __future__ import annotations

import json
import re

from mpop import _bench
from mpop._workloads import inc
from _helpers import leak_check, run_python


def test_rounds_interleave_sides_and_take_self_timed_values():
    order = []
    times = _bench._rounds({"a": lambda: order.append("a"), "b": lambda: order.append("b") or 0.25,
                            "c": lambda: order.append("c")}, 3, self_timed=("b",))
    # Side by side in each round, not one side's runs in a row; each round starts one later.
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert times["b"] == [0.25] * 3
    assert all(t >= 0 for t in times["a"] + times["c"]) and len(times["a"]) == 3


def test_slice_times_in_children_one_a_slice():
    times = _bench._slice_times_in_children(inc, 10_000, 2)
    assert len(times) == 2 and all(0 < t < 60 for t in times)


def test_fork_slices_runs_each_slice_once_and_leaves_no_child():
    import multiprocessing

    out, elapsed = _bench._fork_slices(lambda lo, hi: (lo, hi), 10, 3)
    assert sorted(out) == [(0, 4), (4, 8), (8, 10)] and elapsed > 0
    assert multiprocessing.active_children() == []


def test_static_partition_times_from_the_go_signal_and_leaves_no_child():
    import multiprocessing

    t = _bench._static_partition(inc, 10_000, 2)
    assert 0 < t < 60
    assert multiprocessing.active_children() == []


def test_prototype_rounds_shrink_as_a_run_grows():
    assert [_bench._prototype_rounds(s) for s in (0.003, 1.9, 7, 65, 599, 1200)] == [9, 9, 5, 3, 3, 1]
    assert _bench._prototype_rounds(0.003, quick=True) == 3


def test_bench_cli_prints_each_scenario_with_its_ratio():
    with leak_check():
        proc = run_python(["-m", "mpop", "bench", "--quick", "--only", "cpu", "--only", "latency",
                           "--only", "idle", "--only", "startup"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"parallel efficiency, medium x 400, map \(ceiling [0-9.]+\)\s+[0-9.]+\s+[0-9.]+ efficiency\s+"
                     r"[0-9.]+x\s+>= 0.97", out), out
    assert "parallel efficiency, medium x 400, enqueue+run" in out
    assert re.search(r"round trip median \(submit -> result\)\s+[0-9.]+\s+[0-9.]+\s+us", out), out
    assert "idle workers, % of one core" in out
    for label in ("spawn, the default", "start_method='fork'"):
        assert re.search(rf"worker start-up to first result \({label}\)\s+[0-9.e-]+\s+[0-9.e-]+\s+s\s+[0-9.]+x\s+"
                         r"reported", out), out
    # The efficiency rows' note: each side against the ceiling of its own round.
    assert re.search(r"share of the ceiling in the same round \(median of 2\): map [0-9.]+, enqueue\+run [0-9.]+, "
                     r"Pool.map [0-9.]+, static partition [0-9.]+; static partition's efficiency [0-9.]+", out), out


def test_bench_cli_rejects_an_unknown_scenario():
    proc = run_python(["-m", "mpop", "bench", "--only", "nonsense"], timeout=60)
    assert proc.returncode == 2
    assert "unknown scenario(s): nonsense" in proc.stdout


def test_bench_persistent_rows_compare_with_an_in_process_pool():
    with leak_check():
        proc = run_python(["-m", "mpop", "bench", "--quick", "--only", "persistent"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"persistent pool: submit\+result vs in-process\s+[0-9.e+]+\s+[0-9.e+]+\s+tasks/s\s+[0-9.]+x",
                     out), out
    assert re.search(r"persistent pool: map 100,000 vs in-process\s+[0-9.e+]+\s+[0-9.e+]+\s+tasks/s", out), out
    assert "the 'stdlib' column is an in-process mpop pool in the same run" in out


def test_dask_scenario_says_why_it_is_skipped_without_distributed():
    # sys.modules[...] = None makes `import distributed` fail, as when it is not installed.
    code = ("import sys; sys.modules['distributed'] = None; from mpop import _bench; "
            "print(_bench.bench_dask(2, 10, 10, 1)); print('dask' in _bench.SCENARIOS)")
    proc = run_python(["-c", code])
    assert proc.returncode == 0, proc.stderr
    assert "dask scenario skipped: it needs Dask distributed (pip install 'mpop[dask]')" in proc.stdout
    assert proc.stdout.splitlines()[-2:] == ["[]", "True"]


def test_joblib_rows_compare_with_loky_and_name_joblibs_floor():
    # In a child: loky keeps its executor and resource tracker for the life of the process.
    code = ("import json; from mpop import _bench; rows = _bench.bench_joblib(2, 2000, 1); "
            "print(json.dumps([[r.scenario, r.mpop, r.stdlib, r.unit, r.higher_is_better, r.extra] for r in rows]))")
    with leak_check():
        proc = run_python(["-c", code], timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.splitlines()[-1])
    assert [r[0] for r in rows] == ["joblib 2,000 tiny calls, mpop backend vs loky",
                                    "joblib GridSearchCV (40 fits) wall time, mpop vs loky"]
    assert [r[3:5] for r in rows] == [["calls/s", True], ["s", False]]
    assert all(r[1] > 0 and r[2] > 0 for r in rows)
    assert re.search(r"joblib alone \(n_jobs=1, in this process\) took [\d.e-]+ s, so no backend can beat "
                     r"loky by more than [\d.]+x here", rows[0][5]["note"])
