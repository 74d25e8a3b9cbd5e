"""The original prototype's documented programs run as written, and its known failures do
not happen: a ring filled to exactly queue_slots, a non-power-of-2 worker_batch_size,
handlers with only int parameters, an enqueue_callback that adds work after the workers
went idle, and debug log lines thrown away when display was off."""

from __future__ import annotations

import logging
import re
import time

import pytest

import mpop
from mpop import MpopApi, ProcTaskFnID, TaskResult, TaskSlot196
from _helpers import EXAMPLES, leak_check, run_python


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


@pytest.fixture
def mpop_logger():
    """Restores the "mpop" logger after a test that turns debug logging on."""
    logger = logging.getLogger("mpop")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield logger
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


# -- the prototype's programs ----------------------------------------------------------------


def test_basic_usage_example_runs_and_logs_each_task():
    proc = run_python([str(EXAMPLES / "basic_usage.py")])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # print_status(config=True, queue=True, workers=True) printed all three sections.
    for section in ("mpop config", "mpop queue", "mpop workers"):
        assert section in out
    values = {int(m[1]): int(m[2]) for m in re.finditer(r"^task (\d+): (-?\d+)$", out, re.M)}
    assert values == {i + 1: i * 10 + 1 for i in range(100)}
    # debug=True with display=False (the default): one log line per task reaches stderr.
    logged = {int(m[1]) for m in re.finditer(r"task (\d+) INCREMENT\b", proc.stderr)}
    assert logged == set(range(1, 101)), proc.stderr[-2000:]


def test_typed_handler_example():
    proc = run_python([str(EXAMPLES / "typed_handler.py")])
    assert proc.returncode == 0, proc.stderr
    values = {int(m[1]): int(m[2]) for m in re.finditer(r"^task (\d+): (-?\d+)$", proc.stdout, re.M)}
    assert values == {i: i * 10 + 1 for i in range(100)}


def test_futures_and_map_example():
    proc = run_python([str(EXAMPLES / "futures_and_map.py")])
    assert proc.returncode == 0, proc.stderr
    for i in range(10):
        assert f"square({i}) = {i * i}" in proc.stdout
    assert "map: [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]" in proc.stdout
    assert f"unordered sum: {sum(i * i for i in range(1000))}" in proc.stdout
    assert "two iterables: [32, 9, 64]" in proc.stdout


# -- the prototype's known failures ------------------------------------------------------------


@pytest.mark.parametrize("queue_slots", [2, 64])
def test_ring_filled_to_exactly_queue_slots(queue_slots):
    with MpopApi(workers=2, queue_slots=queue_slots) as app:
        for i in range(queue_slots):
            assert app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(i * 10, 1), tsk_id=i + 1) is True
        result = app.run()
        assert [r.tsk_id for r in result.results] == list(range(1, queue_slots + 1))
        assert result.values() == [i * 10 + 1 for i in range(queue_slots)]
        # And once more, on the same app, while it is reused after auto-termination.
        for i in range(queue_slots):
            app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(i, 2))
        assert app.run().values() == [i + 2 for i in range(queue_slots)]


def test_ring_filled_exactly_while_workers_run():
    with MpopApi(workers=2, queue_slots=64, auto_terminate=False) as app:
        app.start()
        for i in range(64):
            app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(i, 1), tsk_id=i)
        assert app.wait(timeout=60)
        results = sorted(app.results(timeout=60), key=lambda r: r.seq)
        assert [r.value for r in results] == [i + 1 for i in range(64)]


def test_worker_batch_size_24():
    # 24 divides neither the ring size nor the task count: claims wrap around the ring.
    with MpopApi(workers=2, queue_slots=64, worker_batch_size=24) as app:
        for i in range(1000):
            app.enqueue(fn_id=ProcTaskFnID.ADD, args=(i, 7), tsk_id=i)
        result = app.run()
        assert result.values() == [i + 7 for i in range(1000)]
        assert result.failures == []
        assert sum(w["completed"] for w in app.status()["workers"]) == 1000


def int_pair(a: int, b: int) -> int:
    return a * 100 + b


def int_one(x: int) -> int:
    return -x


def test_handlers_with_only_int_parameters():
    with MpopApi(workers=2) as app:
        app.register_handlers(handlers_dict={0xB001: int_pair, 0xB002: int_one})
        modes = {f["fn_id"]: f["mode"] for f in app.list_functions()}
        assert modes[0xB001] == "args" and modes[0xB002] == "args"
        for i in range(20):
            app.enqueue(fn_id=0xB001, args=(i, 3), tsk_id=i)
            app.enqueue(fn_id=0xB002, args=(i,), tsk_id=100 + i)
        result = app.run()
        assert result.failures == []
        by = result.by_tsk_id
        assert [by[i].value for i in range(20)] == [i * 100 + 3 for i in range(20)]
        assert [by[100 + i].value for i in range(20)] == [-i for i in range(20)]


def typed_slot_handler(slot: TaskSlot196):
    arg1 = slot.args[0]
    arg2 = slot.args[1] if len(slot.args) > 1 else 1
    return TaskResult(success=True, value=arg1 * 10 + arg2 + 1)


def test_typed_slot_handler_layout_is_checked_at_registration():
    # The prototype's handler is annotated with TaskSlot196. On an app whose ring holds
    # TaskSlot196 slots it runs; on the default TaskSlot196_cargs ring (another layout) it is
    # refused when registered, naming both classes, instead of reading garbage in a worker.
    with MpopApi(workers=2, slot_class=TaskSlot196) as app:
        app.register_handlers(handlers_dict={0xB000: typed_slot_handler})
        for i in range(30):
            app.enqueue(fn_id=0xB000, args=(i, 0), tsk_id=i)
        assert app.run().values() == [i * 10 + 1 for i in range(30)]
    with MpopApi(workers=1) as app:
        with pytest.raises(mpop.RegistryError, match="TaskSlot196_cargs") as info:
            app.register_handlers(handlers_dict={0xB000: typed_slot_handler})
        assert "TaskSlot196 " in str(info.value)
        assert 0xB000 not in {f["fn_id"] for f in app.list_functions()}


def test_enqueue_callback_after_workers_went_idle():
    calls = {"n": 0}

    def callback():
        calls["n"] += 1
        if calls["n"] <= 3:
            time.sleep(0.3)  # the first 10 tasks finish meanwhile: the workers go idle
            return None
        base = 1000 * calls["n"]
        for i in range(25):
            app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(base + i,), tsk_id=base + i)
        return False if calls["n"] >= 5 else True

    with MpopApi(workers=2) as app:
        for i in range(10):
            app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(i,), tsk_id=i)
        result = app.run(enqueue_callback=callback)
        assert calls["n"] == 5
        expected = {i: i + 1 for i in range(10)}
        expected.update({b + i: b + i + 1 for b in (4000, 5000) for i in range(25)})
        assert {r.tsk_id: r.value for r in result.results} == expected
        assert len(result.results) == 60
        assert result.exit_code == 0


def test_debug_log_lines_reach_logging_with_display_off(caplog, mpop_logger):
    caplog.set_level(logging.DEBUG, logger="mpop")
    with MpopApi(workers=2, debug=True, display=False) as app:
        for i in range(12):
            app.enqueue(fn_id=ProcTaskFnID.INCREMENT, args=(i * 10, 1), tsk_id=i + 1)
        assert app.run().values() == [i * 10 + 1 for i in range(12)]
    messages = [r.getMessage() for r in caplog.records if r.name == "mpop"]
    logged = {int(m[1]) for msg in messages for m in re.finditer(r"task (\d+) INCREMENT", msg)}
    assert logged == set(range(1, 13)), messages


def test_debug_log_lines_reach_stderr_with_no_logging_configured():
    script = (
        "import mpop\n"
        "app = mpop.MpopApi(workers=1, debug=True, display=False)\n"
        "for i in range(5):\n"
        "    app.enqueue(fn_id=mpop.ProcTaskFnID.ADD, args=(i, 100), tsk_id=i)\n"
        "print(app.run().values())\n"
        "app.shutdown()\n"
    )
    proc = run_python(["-c", script])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[100, 101, 102, 103, 104]"
    logged = {int(m[1]) for m in re.finditer(r"task (\d+) ADD", proc.stderr)}
    assert logged == set(range(5)), proc.stderr


def test_no_debug_lines_without_debug():
    script = (
        "import mpop\n"
        "app = mpop.MpopApi(workers=1)\n"
        "for i in range(5):\n"
        "    app.enqueue(fn_id=mpop.ProcTaskFnID.ADD, args=(i, 100), tsk_id=i)\n"
        "print(app.run().values())\n"
        "app.shutdown()\n"
    )
    proc = run_python(["-c", script])
    assert proc.returncode == 0, proc.stderr
    assert "ADD" not in proc.stderr
    assert proc.stdout.strip() == "[100, 101, 102, 103, 104]"


def test_prototype_names_are_exported():
    for name in ("MpopApi", "ProcTaskFnID", "TaskResult", "TaskSlot196", "TaskSlot196_cargs"):
        assert hasattr(mpop, name)
    assert int(ProcTaskFnID.INCREMENT) < 0x1000
