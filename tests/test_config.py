"""MpopApi's constructor: every bad value raises ConfigError naming the parameter, good
values are accepted, and construction allocates nothing until the app is used."""

import ctypes
import os

import pytest

import mpop
from _helpers import app_factory, live_children, no_leaks_fixture

# Every app of this file uses this segment-name prefix, so the leak check below only looks
# at segments this test process made (other test runs may share /dev/shm).
PREFIX = f"mpop-cfg{os.getpid()}"


no_leaks = no_leaks_fixture(PREFIX)


def _shm_entries() -> set:
    return {e for e in os.listdir("/dev/shm") if e.startswith(PREFIX)}


make_app = app_factory(PREFIX)


def increment(x, step=1):
    return x + step


class NoArgs(ctypes.Structure):
    _fields_ = [("tsk_id", ctypes.c_uint32), ("fn_id", ctypes.c_uint32), ("meta", ctypes.c_uint8 * 40)]


class ArgsWrongType(ctypes.Structure):
    _fields_ = [("tsk_id", ctypes.c_uint32), ("fn_id", ctypes.c_uint32), ("args", ctypes.c_int32 * 4)]


class NoTskId(ctypes.Structure):
    _fields_ = [("fn_id", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("args", ctypes.c_int64 * 4)]


class FnIdFloat(ctypes.Structure):
    _fields_ = [("tsk_id", ctypes.c_uint32), ("fn_id", ctypes.c_float), ("args", ctypes.c_int64 * 4)]


class CargsWrongType(ctypes.Structure):
    _fields_ = [("tsk_id", ctypes.c_uint32), ("fn_id", ctypes.c_uint32), ("args", ctypes.c_int64 * 4),
                ("c_args", ctypes.c_int64 * 4)]


class MetaWrongType(ctypes.Structure):
    _fields_ = [("tsk_id", ctypes.c_uint32), ("fn_id", ctypes.c_uint32), ("args", ctypes.c_int64 * 4),
                ("meta", ctypes.c_char * 40)]


class GoodCustomSlot(ctypes.Structure):
    _fields_ = [("tsk_id", ctypes.c_uint32), ("fn_id", ctypes.c_uint32), ("args", ctypes.c_int64 * 3),
                ("c_args", ctypes.c_char * 24), ("meta", ctypes.c_uint8 * 32)]


BAD_VALUES = [
    ("workers", 0),
    ("workers", -1),
    ("workers", 1.5),
    ("workers", "2"),
    ("workers", True),
    ("queue_slots", 1000),
    ("queue_slots", 0),
    ("queue_slots", 1),
    ("queue_slots", 3),
    ("queue_slots", -4),
    ("queue_slots", 64.0),
    ("queue_slots", "64"),
    ("worker_batch_size", 0),
    ("worker_batch_size", -1),
    ("worker_batch_size", 2.5),
    ("worker_batch_size", None),
    ("start_method", "threads"),
    ("start_method", "SPAWN"),
    ("start_method", None),
    ("max_retries", -1),
    ("max_retries", 1.0),
    ("max_retries", None),
    ("task_timeout", 0),
    ("task_timeout", -1.5),
    ("task_timeout", "5"),
    ("task_timeout", True),
    ("task_timeout", float("nan")),
    ("max_tasks_per_worker", 0),
    ("max_tasks_per_worker", -3),
    ("max_tasks_per_worker", 2.5),
    ("cpu_affinity", "yes"),
    ("cpu_affinity", 1),
    ("cpu_affinity", []),
    ("cpu_affinity", [10**6]),
    ("cpu_affinity", [0.5]),
    ("cpu_affinity", [-1]),
    ("name", ""),
    ("name", "has space"),
    ("name", "a/b"),
    ("name", "x" * 65),
    ("name", 123),
    ("slot_class", int),
    ("slot_class", "TaskSlot128"),
    ("slot_class", NoArgs),
    ("slot_class", ArgsWrongType),
    ("slot_class", NoTskId),
    ("slot_class", FnIdFloat),
    ("slot_class", CargsWrongType),
    ("slot_class", MetaWrongType),
    ("display", "yes"),
    ("auto_terminate", 1),
    ("debug", None),
    ("max_performance", "no"),
    ("debug_delay", -1),
    ("debug_delay", "0.1"),
    ("debug_delay", float("nan")),
    ("debug_delay", float("inf")),
    ("handler_module", 123),
]


def _id(v):
    r = repr(v)
    return r if len(r) < 20 else r[:17] + "..."


@pytest.mark.parametrize(("param", "value"), BAD_VALUES,
                         ids=[f"{p}={_id(v)}" for p, v in BAD_VALUES])
def test_bad_value_raises_config_error_naming_parameter(param, value):
    kw = {param: value}
    if param != "workers":
        kw["workers"] = 1
    with pytest.raises(mpop.ConfigError) as info:
        mpop.MpopApi(name=PREFIX, **kw) if param != "name" else mpop.MpopApi(**kw)
    err = info.value
    assert isinstance(err, ValueError)
    assert isinstance(err, mpop.MpopError)
    assert param in str(err), f"message does not name {param!r}: {err}"


def test_slot_class_problem_names_the_class_and_field():
    with pytest.raises(mpop.ConfigError) as info:
        make_app(slot_class=NoArgs)
    msg = str(info.value)
    assert "slot_class" in msg and "NoArgs" in msg and "args" in msg


def test_slot_class_instance_instead_of_class_is_rejected():
    with pytest.raises(mpop.ConfigError, match="slot_class"):
        make_app(slot_class=mpop.TaskSlot128())


def test_queue_slots_message_says_power_of_2():
    with pytest.raises(mpop.ConfigError, match="power of 2") as info:
        make_app(queue_slots=1000)
    assert "queue_slots" in str(info.value)
    assert "1000" in str(info.value)


@pytest.mark.parametrize(("param", "value", "range_text"), [
    ("workers", 0, "from 1 to 1024"),
    ("worker_batch_size", 0, ">= 1"),
    ("max_retries", -1, ">= 0"),
    ("task_timeout", 0, "> 0"),
    ("max_tasks_per_worker", 0, ">= 1"),
])
def test_message_states_accepted_range(param, value, range_text):
    kw = {"workers": 1, param: value}
    with pytest.raises(mpop.ConfigError) as info:
        mpop.MpopApi(name=PREFIX, **kw)
    assert range_text in str(info.value)


def test_bad_start_method_message_lists_choices():
    with pytest.raises(mpop.ConfigError) as info:
        make_app(start_method="thread")
    msg = str(info.value)
    for choice in ("spawn", "fork", "forkserver"):
        assert choice in msg


def test_several_problems_are_listed_at_once():
    with pytest.raises(mpop.ConfigError) as info:
        mpop.MpopApi(workers=0, queue_slots=1000, worker_batch_size=0, start_method="nope",
                     max_retries=-2, task_timeout=0, name="bad name")
    msg = str(info.value)
    for param in ("workers", "queue_slots", "worker_batch_size", "start_method", "max_retries",
                  "task_timeout", "name"):
        assert param in msg, f"{param!r} missing from: {msg}"
    assert "power of 2" in msg


def test_bad_value_creates_no_segment():
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(mpop.ConfigError):
        make_app(queue_slots=1000)
    assert {e for e in set(os.listdir("/dev/shm")) - before if e.startswith(PREFIX)} == set()


GOOD_VALUES = [
    ("workers", 1),
    ("workers", 2),
    ("queue_slots", 2),
    ("queue_slots", 64),
    ("queue_slots", 1 << 16),
    ("worker_batch_size", 1),
    ("worker_batch_size", 24),
    ("worker_batch_size", 7),
    ("worker_batch_size", 5000),  # any int >= 1; a claim takes at most queue_slots
    ("start_method", "spawn"),
    ("start_method", "fork"),
    ("start_method", "forkserver"),
    ("max_retries", 0),
    ("max_retries", 5),
    ("task_timeout", None),
    ("task_timeout", 0.5),
    ("task_timeout", 3),
    ("max_tasks_per_worker", None),
    ("max_tasks_per_worker", 1),
    ("max_tasks_per_worker", 1000),
    ("name", "my-app.v1_x"),
    ("name", "x" * 64),
    ("slot_class", mpop.TaskSlot128),
    ("slot_class", mpop.TaskSlot128_cargs),
    ("slot_class", mpop.TaskSlot196),
    ("slot_class", mpop.TaskSlot196_cargs),
    ("display", True),
    ("auto_terminate", False),
    ("debug_delay", 0),
    ("debug_delay", 0.25),
    ("max_performance", True),
]


@pytest.mark.parametrize(("param", "value"), GOOD_VALUES,
                         ids=[f"{p}={_id(v)}" for p, v in GOOD_VALUES])
def test_good_value_is_accepted_and_shown_in_config(param, value):
    kw = {"workers": 1, "name": PREFIX, param: value}
    app = mpop.MpopApi(**kw)
    try:
        shown = app.config[param]
        if param == "slot_class":
            assert shown in (value, value.__name__)
        else:
            assert shown == value
    finally:
        app.shutdown()


def test_a_batch_larger_than_the_ring_claims_at_most_the_ring():
    app = make_app(queue_slots=8, worker_batch_size=5000)
    try:
        for i in range(100):
            app.enqueue(mpop.ProcTaskFnID.INCREMENT, args=(i,))
        assert app.run(timeout=60).values() == [i + 1 for i in range(100)]
    finally:
        app.shutdown()


def test_cpu_affinity_true_and_list_are_accepted():
    allowed = sorted(os.sched_getaffinity(0))
    app0 = make_app(cpu_affinity=False)
    app1 = make_app(cpu_affinity=True)
    app2 = make_app(cpu_affinity=[allowed[0]])
    try:
        assert not app0.config["cpu_affinity"]
        assert list(app1.config["cpu_affinity"]) == allowed
        assert list(app2.config["cpu_affinity"]) == [allowed[0]]
    finally:
        app0.shutdown()
        app1.shutdown()
        app2.shutdown()


def test_custom_slot_class_is_accepted():
    app = make_app(slot_class=GoodCustomSlot)
    try:
        assert app.config["slot_class"] in (GoodCustomSlot, "GoodCustomSlot")
    finally:
        app.shutdown()


def test_workers_none_means_cpus_this_process_may_use():
    app = mpop.MpopApi(name=PREFIX)
    try:
        assert app.config["workers"] == len(os.sched_getaffinity(0))
    finally:
        app.shutdown()


def test_defaults_in_config():
    app = mpop.MpopApi(workers=1)
    try:
        c = app.config
        assert c["queue_slots"] == 4096
        assert c["slot_class"] in (mpop.TaskSlot196_cargs, "TaskSlot196_cargs")
        assert c["worker_batch_size"] == 16
        assert c["display"] is False
        assert c["auto_terminate"] is True
        assert c["debug"] is False
        assert c["start_method"] == "spawn"
        assert c["max_retries"] == 1
        assert c["task_timeout"] is None
        assert c["max_tasks_per_worker"] is None
        assert c["max_performance"] is False
    finally:
        app.shutdown()


def test_config_property_is_a_snapshot_not_a_handle():
    app = make_app(queue_slots=64)
    try:
        c = app.config
        c["queue_slots"] = 8
        c["workers"] = 99
        assert app.config["queue_slots"] == 64
        assert app.config["workers"] == 1
    finally:
        app.shutdown()


def test_config_is_in_status():
    app = make_app(queue_slots=128, worker_batch_size=24)
    try:
        st = app.status()["config"]
        assert st["queue_slots"] == 128
        assert st["worker_batch_size"] == 24
        assert st["workers"] == 1
    finally:
        app.shutdown()


def test_construction_creates_no_segment_until_used():
    before = _shm_entries()
    app = make_app(workers=1)
    try:
        assert app.segment_name is None
        assert _shm_entries() == before
        app.register(increment)
        app.list_functions()
        app.status()
        assert app.segment_name is None
        assert _shm_entries() == before
        assert app.enqueue(increment, args=(1,))
        name = app.segment_name
        assert name is not None and name.startswith(PREFIX)
        assert os.path.exists(os.path.join("/dev/shm", name.lstrip("/")))
    finally:
        app.shutdown()
    assert not os.path.exists(os.path.join("/dev/shm", name.lstrip("/")))
    assert _shm_entries() == before


def test_construction_starts_no_process():
    kids = live_children()
    app = make_app(workers=2)
    try:
        assert live_children() == kids
    finally:
        app.shutdown()


def test_unused_app_garbage_collected_leaves_nothing():
    before = _shm_entries()
    app = make_app()
    del app
    assert _shm_entries() == before


def test_segment_name_uses_name_prefix():
    app = make_app(name=PREFIX + "-pfx.1")
    try:
        app.enqueue(increment, args=(1,))
        assert app.segment_name.startswith(PREFIX + "-pfx.1")
    finally:
        app.shutdown()


@pytest.mark.parametrize("batch", [24, 3])
def test_non_power_of_two_batch_size_runs(batch):
    with make_app(workers=2, worker_batch_size=batch, queue_slots=64) as app:
        for i in range(300):
            app.enqueue(increment, args=(i,))
        res = app.run()
    assert res.exit_code == 0
    assert res.values() == [i + 1 for i in range(300)]


def test_smallest_queue_runs_everything():
    with make_app(queue_slots=2, worker_batch_size=1) as app:
        for i in range(50):
            app.enqueue(increment, args=(i,), step=10)
        res = app.run()
    assert res.values() == [i + 10 for i in range(50)]
