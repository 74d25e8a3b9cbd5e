"""Slot classes: the four built-in layouts, slot-mode handlers (a ctypes instance with args,
c_args and the runtime's meta), users' own slot classes, and c_args limits."""

import ctypes
import struct
import os

import pytest

import mpop
from _helpers import app_factory, no_leaks_fixture

PREFIX = f"mpop-slt{os.getpid()}"
TIMEOUT = 120  # a safety net against hangs, never a performance expectation

BUILTIN_SLOTS = [mpop.TaskSlot128, mpop.TaskSlot128_cargs, mpop.TaskSlot196, mpop.TaskSlot196_cargs]


no_leaks = no_leaks_fixture(PREFIX)
make_app = app_factory(PREFIX)


# -- users' own slot classes (module level: workers import them by reference) ------------------

class MySlot(ctypes.Structure):
    _fields_ = [
        ("tsk_id", ctypes.c_uint32),
        ("fn_id", ctypes.c_uint32),
        ("args", ctypes.c_int64 * 3),
        ("c_args", ctypes.c_char * 40),
        ("meta", ctypes.c_uint8 * 32),
    ]


class MinimalSlot(ctypes.Structure):
    """Only the required fields: no c_args, no meta."""

    _fields_ = [("tsk_id", ctypes.c_uint32), ("fn_id", ctypes.c_uint32), ("args", ctypes.c_int64 * 2)]


class WideIdSlot(ctypes.Structure):
    """64-bit ids, fields in an unusual order, meta before args."""

    _fields_ = [
        ("meta", ctypes.c_uint8 * 48),
        ("fn_id", ctypes.c_uint64),
        ("args", ctypes.c_int64 * 4),
        ("tsk_id", ctypes.c_uint64),
    ]


class MySlotSubclass(mpop.Slot):
    _fields_ = [
        ("tsk_id", ctypes.c_uint32),
        ("fn_id", ctypes.c_uint32),
        ("args", ctypes.c_int64 * 6),
        ("meta", ctypes.c_uint8 * 32),
    ]


class PackedSlot(ctypes.Structure):
    """Packed: args at an unaligned offset, c_args not next to args, an odd size."""

    _pack_ = 1
    _fields_ = [
        ("tsk_id", ctypes.c_uint32),
        ("c_args", ctypes.c_char * 3),
        ("fn_id", ctypes.c_uint32),
        ("args", ctypes.c_int64 * 2),
        ("meta", ctypes.c_uint8 * 33),
    ]


class BigSlot(ctypes.Structure):
    """Larger than any built-in slot."""

    _fields_ = [
        ("tsk_id", ctypes.c_uint32),
        ("fn_id", ctypes.c_uint32),
        ("args", ctypes.c_int64 * 120),
        ("c_args", ctypes.c_char * 500),
        ("meta", ctypes.c_uint8 * 64),
    ]


# -- handlers ------------------------------------------------------------------------------------

def describe_slot(slot):
    """Slot mode by parameter name: reports what the worker received."""
    field = getattr(type(slot), "c_args", None)
    c_args = ctypes.string_at(ctypes.addressof(slot) + field.offset, field.size) if field else None
    return {
        "type": type(slot).__name__,
        "is_structure": isinstance(slot, ctypes.Structure),
        "args": list(slot.args),
        "tsk_id": slot.tsk_id,
        "fn_id": slot.fn_id,
        "c_args_value": slot.c_args if hasattr(slot, "c_args") else None,
        "c_args_raw": c_args,
    }


def plus_one(slot):
    return mpop.TaskResult(success=True, value=slot.args[0] + 1)


def annotated_128(s: mpop.TaskSlot128):
    return mpop.TaskResult(success=True, value=(type(s).__name__, sum(s.args)))


def annotated_string(s: "mpop.TaskSlot128"):
    return (type(s).__name__, s.args[9])


def annotated_custom(s: MySlot):
    return (type(s).__name__, list(s.args), s.c_args)


def custom_subclass_handler(slot):
    return (type(slot).__name__, list(slot.args))


def slot_fails(slot):
    if slot.args[0] < 0:
        return mpop.TaskResult(success=False, error=ValueError(f"negative {slot.args[0]}"))
    return mpop.TaskResult(success=True, value=slot.args[0])


def slot_raises(slot):
    raise KeyError(slot.args[0])


def read_slot_meta(slot):
    # What the runtime writes at the start of `meta` (TaskMeta in slot_layout.hpp): three
    # int64 timestamps, the attempt and the worker id (uint16 each), 4 bytes reserved.
    meta = bytes(getattr(slot, "meta", b""))
    if len(meta) < 32:
        return None
    enqueue_ns, start_ns, end_ns, attempts, worker_id = struct.unpack_from("<qqqHH", meta)
    return {"enqueue_ns": enqueue_ns, "start_ns": start_ns, "end_ns": end_ns,
            "attempts": attempts, "worker_id": worker_id}


def args_mode(a, b=0):
    return a * b


def echo_all(*args, **kwargs):
    return (args, kwargs)


def listing(app, fn):
    for d in app.list_functions():
        if d["name"] == fn.__qualname__:
            return d
    raise AssertionError(f"{fn.__qualname__} not registered")


# -- layouts -------------------------------------------------------------------------------------

EXPECTED_FIELDS = {
    mpop.TaskSlot128: [("tsk_id", ctypes.c_uint32, None), ("fn_id", ctypes.c_uint32, None),
                       ("args", ctypes.c_int64, 10), ("meta", ctypes.c_uint8, 40)],
    mpop.TaskSlot128_cargs: [("tsk_id", ctypes.c_uint32, None), ("fn_id", ctypes.c_uint32, None),
                             ("args", ctypes.c_int64, 2), ("c_args", ctypes.c_char, 64),
                             ("meta", ctypes.c_uint8, 40)],
    mpop.TaskSlot196: [("tsk_id", ctypes.c_uint32, None), ("fn_id", ctypes.c_uint32, None),
                       ("args", ctypes.c_int64, 15), ("meta", ctypes.c_uint8, 64)],
    mpop.TaskSlot196_cargs: [("tsk_id", ctypes.c_uint32, None), ("fn_id", ctypes.c_uint32, None),
                             ("args", ctypes.c_int64, 5), ("c_args", ctypes.c_char, 92),
                             ("meta", ctypes.c_uint8, 56)],
}


@pytest.mark.parametrize("cls", BUILTIN_SLOTS, ids=lambda c: c.__name__)
def test_builtin_slot_layout_matches_the_contract(cls):
    assert issubclass(cls, ctypes.Structure)
    assert issubclass(cls, mpop.Slot)
    fields = cls._fields_
    expected = EXPECTED_FIELDS[cls]
    assert [f[0] for f in fields] == [e[0] for e in expected]
    offset = 0
    for (name, ctype), (_, elem, length) in zip(fields, expected):
        if length is None:
            assert ctype is elem, f"{name} is {ctype}"
        else:
            assert issubclass(ctype, ctypes.Array) and ctype._type_ is elem and ctype._length_ == length, name
        # fields follow each other with no gaps
        assert getattr(cls, name).offset == offset, name
        offset += ctypes.sizeof(ctype)
    # no more than the alignment padding at the end
    assert offset <= ctypes.sizeof(cls) < offset + ctypes.alignment(cls)


@pytest.mark.parametrize(("cls", "size"), [(mpop.TaskSlot128, 128), (mpop.TaskSlot128_cargs, 128)],
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_128_byte_slots_are_128_bytes(cls, size):
    assert ctypes.sizeof(cls) == size


def test_field_bytes_of_the_196_slots():
    # the table's fields add up to 192 and 196 bytes
    assert ctypes.sizeof(mpop.TaskSlot196) == 4 + 4 + 15 * 8 + 64
    assert mpop.TaskSlot196_cargs.meta.offset + mpop.TaskSlot196_cargs.meta.size == 196


def test_default_slot_class_is_196_cargs():
    with make_app() as app:
        app.enqueue(describe_slot, args=(1,))
        out = app.run(timeout=TIMEOUT).values()[0]
    assert out["type"] == "TaskSlot196_cargs"


def test_meta_has_room_for_the_runtime_record():
    for cls in BUILTIN_SLOTS:
        assert cls.meta.size >= 32


# -- slot-mode handlers --------------------------------------------------------------------------

def test_slot_parameter_name_selects_slot_mode():
    with make_app() as app:
        app.register(describe_slot, fn_id=0xB001)
        assert listing(app, describe_slot)["mode"] == "slot"
        app.enqueue(describe_slot, args=(3, -4, 2**62), tsk_id=77)
        app.enqueue(describe_slot)
        res = app.run(timeout=TIMEOUT)
    first, empty = res.values()
    assert first["type"] == "TaskSlot196_cargs"
    assert first["is_structure"] is True
    assert first["args"] == [3, -4, 2**62, 0, 0]
    assert first["tsk_id"] == 77
    assert first["fn_id"] == 0xB001
    assert empty["args"] == [0, 0, 0, 0, 0]


def test_slot_mode_handler_returning_task_result():
    with make_app() as app:
        for i in range(5):
            app.enqueue(plus_one, args=(i * 100,))
        res = app.run(timeout=TIMEOUT)
    assert res.values() == [1, 101, 201, 301, 401]
    assert all(r.success for r in res.results)


def test_slot_mode_limits_of_int64():
    with make_app() as app:
        app.enqueue(describe_slot, args=(2**63 - 1, -(2**63)))
        out = app.run(timeout=TIMEOUT).values()[0]
    assert out["args"][:2] == [2**63 - 1, -(2**63)]


@pytest.mark.parametrize("handler", [annotated_128, annotated_string], ids=["class", "string"])
def test_annotation_with_a_slot_class_selects_slot_mode(handler):
    with make_app(slot_class=mpop.TaskSlot128) as app:
        app.register(handler)
        assert listing(app, handler)["mode"] == "slot"
        app.enqueue(handler, args=tuple(range(1, 11)))
        out = app.run(timeout=TIMEOUT).values()[0]
    assert out[0] == "TaskSlot128"
    assert out[1] == (55 if handler is annotated_128 else 10)


def annotated_196_cargs(s: mpop.TaskSlot196_cargs):
    return list(s.args)


@pytest.mark.parametrize(("app_slot", "handler"), [(mpop.TaskSlot128, annotated_196_cargs),
                                                   (mpop.TaskSlot196_cargs, annotated_128)],
                         ids=["bigger-than-app-slot", "other-layout"])
def test_handler_annotated_with_another_slot_class_is_rejected_early(app_slot, handler):
    # the worker would build the handler's class from the app's slot bytes: a layout
    # mismatch must be refused when registering or enqueuing, not fail later in a worker
    with make_app(slot_class=app_slot) as app:
        with pytest.raises((mpop.MpopError, TypeError, ValueError)):
            app.register(handler)
            app.enqueue(handler, args=(1, 2))


def test_slot_mode_failure_through_task_result():
    with make_app() as app:
        app.enqueue(slot_fails, args=(-5,))
        app.enqueue(slot_fails, args=(5,))
        app.enqueue(slot_raises, args=(9,))
        res = app.run(timeout=TIMEOUT)
    bad, good, raised = res.results
    assert bad.success is False and type(bad.error) is ValueError and str(bad.error) == "negative -5"
    assert good.value == 5
    assert type(raised.error) is KeyError


def test_slot_mode_rejects_non_int_arguments_at_enqueue():
    with make_app() as app:
        with pytest.raises(TypeError):
            app.enqueue(plus_one, args=("text",))
        with pytest.raises(TypeError):
            app.enqueue(plus_one, args=(1.5,))
        with pytest.raises(TypeError):
            app.enqueue(plus_one, args=(2**64,))
        with pytest.raises(TypeError):
            app.enqueue(plus_one, args=(1,), kwargs={"x": 1})
        assert app.status()["queue"]["submitted"] == 0


def test_slot_mode_rejects_too_many_arguments_at_enqueue():
    with make_app() as app:  # TaskSlot196_cargs: 5 args
        with pytest.raises(TypeError):
            app.enqueue(describe_slot, args=(1, 2, 3, 4, 5, 6))
        app.enqueue(describe_slot, args=(1, 2, 3, 4, 5))
        assert app.run(timeout=TIMEOUT).values()[0]["args"] == [1, 2, 3, 4, 5]


def test_slot_mode_through_submit_and_map():
    with make_app() as app:
        assert app.submit(plus_one, 41).result(timeout=TIMEOUT) == 42
        assert list(app.map(plus_one, range(5))) == [1, 2, 3, 4, 5]


# -- c_args --------------------------------------------------------------------------------------

def test_c_args_reach_the_slot():
    with make_app() as app:
        app.enqueue(describe_slot, args=(1, 2), c_args=b"hello")
        app.enqueue(describe_slot, c_args=b"no ints")
        app.enqueue(describe_slot, args=(3,), c_args=b"\x01\x02\x03\x00\x04")
        a, b, c = app.run(timeout=TIMEOUT).values()
    assert a["args"][:2] == [1, 2]
    assert a["c_args_value"] == b"hello"
    assert a["c_args_raw"] == b"hello" + b"\x00" * 87
    assert b["c_args_value"] == b"no ints" and b["args"] == [0] * 5
    assert c["c_args_raw"][:5] == b"\x01\x02\x03\x00\x04"  # raw bytes, NUL included
    assert c["c_args_value"] == b"\x01\x02\x03"


def test_c_args_as_bytearray():
    # enqueue accepts bytes-like c_args (it checks for bytes or bytearray)
    with make_app() as app:
        app.enqueue(describe_slot, args=(3,), c_args=bytearray(b"\x01\x02\x03"))
        out = app.run(timeout=TIMEOUT).values()[0]
    assert out["c_args_value"] == b"\x01\x02\x03"


@pytest.mark.parametrize(("cls", "room"), [(mpop.TaskSlot196_cargs, 92), (mpop.TaskSlot128_cargs, 64)],
                         ids=["196_cargs", "128_cargs"])
def test_c_args_of_exactly_the_field_size(cls, room):
    data = bytes((i % 250) + 1 for i in range(room))  # no NUL
    with make_app(slot_class=cls) as app:
        app.enqueue(describe_slot, args=(1,), c_args=data)
        out = app.run(timeout=TIMEOUT).values()[0]
    assert out["c_args_raw"] == data
    assert out["c_args_value"] == data


@pytest.mark.parametrize(("cls", "room"), [(mpop.TaskSlot196_cargs, 92), (mpop.TaskSlot128_cargs, 64),
                                           (MySlot, 40)], ids=["196_cargs", "128_cargs", "custom"])
def test_too_long_c_args_raise_value_error_at_enqueue(cls, room):
    with make_app(slot_class=cls) as app:
        with pytest.raises(ValueError) as info:
            app.enqueue(describe_slot, args=(1,), c_args=b"x" * (room + 1))
        assert str(room) in str(info.value)
        assert app.status()["queue"]["submitted"] == 0


@pytest.mark.parametrize("cls", [mpop.TaskSlot128, mpop.TaskSlot196, MinimalSlot], ids=lambda c: c.__name__)
def test_c_args_on_a_slot_class_without_c_args(cls):
    with make_app(slot_class=cls) as app:
        with pytest.raises(ValueError):
            app.enqueue(describe_slot, args=(1,), c_args=b"x")


def test_c_args_must_be_bytes():
    with make_app() as app:
        with pytest.raises(TypeError):
            app.enqueue(describe_slot, args=(1,), c_args="text")


# -- meta ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", BUILTIN_SLOTS + [MySlot, WideIdSlot], ids=lambda c: c.__name__)
def test_meta_carries_timestamps_attempts_and_worker(cls):
    with make_app(workers=2, slot_class=cls) as app:
        for i in range(6):
            app.enqueue(read_slot_meta, args=(i,))
        res = app.run(timeout=TIMEOUT)
        worker_ids = {w["id"] for w in app.status()["workers"]}
    assert res.exit_code == 0, [r.error for r in res.failures]
    for r in res.results:
        m = r.value
        assert m is not None
        assert m["enqueue_ns"] > 0
        assert m["enqueue_ns"] <= m["start_ns"]
        assert m["end_ns"] == 0 or m["end_ns"] >= m["start_ns"]
        assert m["attempts"] == 1
        assert m["worker_id"] == r.worker_id
        assert m["worker_id"] in worker_ids


def test_meta_is_absent_from_a_slot_without_meta():
    with make_app(slot_class=MinimalSlot) as app:
        app.enqueue(read_slot_meta, args=(1,))
        app.enqueue(describe_slot, args=(5, 6))
        meta, desc = app.run(timeout=TIMEOUT).values()
    assert meta is None
    assert desc["type"] == "MinimalSlot" and desc["args"] == [5, 6]


def test_meta_enqueue_time_precedes_start_across_a_backlog():
    with make_app(queue_slots=4) as app:
        for i in range(50):
            app.enqueue(read_slot_meta, args=(i,))
        res = app.run(timeout=TIMEOUT)
    starts = [r.value["start_ns"] for r in res.results]
    assert all(r.value["enqueue_ns"] <= r.value["start_ns"] for r in res.results)
    assert starts == sorted(starts)  # one worker runs them in order


# -- users' own slot classes ---------------------------------------------------------------------

def test_custom_slot_class_end_to_end():
    with make_app(slot_class=MySlot) as app:
        app.register(annotated_custom)
        assert listing(app, annotated_custom)["mode"] == "slot"
        app.enqueue(annotated_custom, args=(1, 2, 3), c_args=b"custom!")
        app.enqueue(describe_slot, args=(-1,), tsk_id=9)
        app.enqueue(args_mode, args=(6, 7))                       # argument mode, inline ints
        app.enqueue(echo_all, args=("a" * 100, b"b" * 300), k=1.5)  # argument mode, pooled
        res = app.run(timeout=TIMEOUT)
    assert res.exit_code == 0, [r.error for r in res.failures]
    ann, desc, prod, echoed = res.values()
    assert ann == ("MySlot", [1, 2, 3], b"custom!")
    assert desc["type"] == "MySlot" and desc["args"] == [-1, 0, 0] and desc["tsk_id"] == 9
    assert prod == 42
    assert echoed == (("a" * 100, b"b" * 300), {"k": 1.5})


def test_minimal_custom_slot_class_end_to_end():
    with make_app(slot_class=MinimalSlot, workers=2) as app:
        for i in range(20):
            app.enqueue(args_mode, args=(i, 2))
        app.enqueue(echo_all, args=(1, 2, 3), z="zz")  # more ints than the slot holds
        app.enqueue(plus_one, args=(10,))
        res = app.run(timeout=TIMEOUT)
    assert res.values() == [2 * i for i in range(20)] + [((1, 2, 3), {"z": "zz"}), 11]


def test_wide_id_custom_slot_class_end_to_end():
    with make_app(slot_class=WideIdSlot) as app:
        fid = app.register(describe_slot, fn_id=0xFFFF0001)
        app.enqueue(describe_slot, args=(4, 3, 2, 1), tsk_id=2**32 - 1)
        app.enqueue(args_mode, args=(3,), b=3)
        res = app.run(timeout=TIMEOUT)
    desc, nine = res.values()
    assert desc["type"] == "WideIdSlot"
    assert desc["args"] == [4, 3, 2, 1]
    assert desc["fn_id"] == fid and desc["tsk_id"] == 2**32 - 1
    assert res.results[0].tsk_id == 2**32 - 1
    assert nine == 9


def test_slot_class_defined_inside_a_function():
    class LocalSlot(ctypes.Structure):
        _fields_ = [("tsk_id", ctypes.c_uint32), ("fn_id", ctypes.c_uint32),
                    ("args", ctypes.c_int64 * 4), ("c_args", ctypes.c_char * 16),
                    ("meta", ctypes.c_uint8 * 40)]

    def local_handler(s: LocalSlot):
        return (type(s).__name__, list(s.args), s.c_args)

    with make_app(slot_class=LocalSlot) as app:
        app.enqueue(local_handler, args=(9, 8, 7), c_args=b"local")
        app.enqueue(describe_slot, args=(1,))
        app.enqueue(args_mode, args=(2, 21))
        res = app.run(timeout=TIMEOUT)
    assert res.exit_code == 0, [r.error for r in res.failures]
    local, desc, prod = res.values()
    assert local == ("LocalSlot", [9, 8, 7, 0], b"local")
    assert desc["args"] == [1, 0, 0, 0] and desc["c_args_raw"] == b"\x00" * 16
    assert prod == 42


@pytest.mark.parametrize("cls", [PackedSlot, BigSlot], ids=lambda c: c.__name__)
def test_unusual_custom_slot_layouts_end_to_end(cls):
    assert cls is not PackedSlot or (ctypes.sizeof(cls) == 60 and cls.args.offset == 11)
    with make_app(slot_class=cls) as app:
        app.enqueue(describe_slot, args=(7, -8), c_args=b"ab")
        app.enqueue(read_slot_meta, args=(1,))
        app.enqueue(echo_all, args=tuple(range(50)), k="v" * 1000)
        app.enqueue(args_mode, args=(6, 7))
        res = app.run(timeout=TIMEOUT)
    assert res.exit_code == 0, [r.error for r in res.failures]
    desc, meta, echoed, prod = res.values()
    assert desc["type"] == cls.__name__ and desc["args"][:2] == [7, -8] and desc["c_args_value"] == b"ab"
    assert meta["attempts"] == 1 and meta["enqueue_ns"] <= meta["start_ns"]
    assert echoed == (tuple(range(50)), {"k": "v" * 1000})
    assert prod == 42


def test_slot_subclass_of_mpop_slot():
    with make_app(slot_class=MySlotSubclass) as app:
        app.enqueue(custom_subclass_handler, args=(1, 2, 3, 4, 5, 6))
        out = app.run(timeout=TIMEOUT).values()[0]
    assert out == ("MySlotSubclass", [1, 2, 3, 4, 5, 6])


@pytest.mark.parametrize("cls", BUILTIN_SLOTS, ids=lambda c: c.__name__)
def test_every_builtin_slot_class_runs_argument_and_slot_mode(cls):
    n_args = cls.args.size // 8
    with make_app(slot_class=cls) as app:
        app.enqueue(describe_slot, args=tuple(range(n_args)))
        app.enqueue(args_mode, args=(5, 8))
        app.enqueue(echo_all, args=tuple(range(n_args + 3)), s="x" * 500)
        res = app.run(timeout=TIMEOUT)
    desc, prod, echoed = res.values()
    assert desc["type"] == cls.__name__ and desc["args"] == list(range(n_args))
    assert prod == 40
    assert echoed == (tuple(range(n_args + 3)), {"s": "x" * 500})
