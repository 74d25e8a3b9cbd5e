"""Slot classes: the fixed-size records of the task ring, and their native layout."""

from __future__ import annotations

import ctypes
from typing import Any

__all__ = [
    "Slot",
    "TaskSlot128",
    "TaskSlot128_cargs",
    "TaskSlot196",
    "TaskSlot196_cargs",
    "slot_layout",
    "is_slot_class",
]


class Slot(ctypes.Structure):
    """Base of the built-in slot classes. Any ``ctypes.Structure`` with ``tsk_id``,
    ``fn_id`` and an int64 ``args`` array may serve as a slot class."""

    _fields_: list = []


class TaskSlot128(Slot):
    """128 bytes: ten int64 arguments."""

    _fields_ = [
        ("tsk_id", ctypes.c_uint32),
        ("fn_id", ctypes.c_uint32),
        ("args", ctypes.c_int64 * 10),
        ("meta", ctypes.c_uint8 * 40),
    ]


class TaskSlot128_cargs(Slot):
    """128 bytes: two int64 arguments and 64 bytes of characters."""

    _fields_ = [
        ("tsk_id", ctypes.c_uint32),
        ("fn_id", ctypes.c_uint32),
        ("args", ctypes.c_int64 * 2),
        ("c_args", ctypes.c_char * 64),
        ("meta", ctypes.c_uint8 * 40),
    ]


class TaskSlot196(Slot):
    """196 bytes: fifteen int64 arguments."""

    _fields_ = [
        ("tsk_id", ctypes.c_uint32),
        ("fn_id", ctypes.c_uint32),
        ("args", ctypes.c_int64 * 15),
        ("meta", ctypes.c_uint8 * 64),
    ]


class TaskSlot196_cargs(Slot):
    """196 bytes (the default): five int64 arguments and 92 bytes of characters."""

    _fields_ = [
        ("tsk_id", ctypes.c_uint32),
        ("fn_id", ctypes.c_uint32),
        ("args", ctypes.c_int64 * 5),
        ("c_args", ctypes.c_char * 92),
        ("meta", ctypes.c_uint8 * 56),
    ]


_UINTS = (ctypes.c_uint32, ctypes.c_int32, ctypes.c_uint64, ctypes.c_int64)


def is_slot_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, ctypes.Structure)


def slot_layout(cls: type) -> dict:
    """Offsets and sizes of a slot class's fields, as the native core needs them.

    Raises ValueError naming the problem when the class cannot serve as a slot."""
    if not is_slot_class(cls):
        raise ValueError(f"slot_class must be a ctypes.Structure subclass, got {cls!r}")
    fields = {}
    for klass in reversed(cls.__mro__):
        for f in klass.__dict__.get("_fields_", []) or []:
            fields[f[0]] = f[1]
    name = cls.__name__

    def field(fname: str):
        return getattr(cls, fname)

    out = {"size": ctypes.sizeof(cls)}
    for key in ("tsk_id", "fn_id"):
        if key not in fields:
            raise ValueError(f"slot_class {name} has no field {key!r}")
        if fields[key] not in _UINTS:
            raise ValueError(f"slot_class {name}.{key} must be a 32- or 64-bit integer")
        out[f"{key}_off"] = field(key).offset
        out[f"{key}_size"] = field(key).size
    args = fields.get("args")
    if args is None or not (isinstance(args, type) and issubclass(args, ctypes.Array)) or args._type_ is not ctypes.c_int64:
        raise ValueError(f"slot_class {name} needs an 'args' field of type ctypes.c_int64 * N")
    out["args_off"] = field("args").offset
    out["args_count"] = args._length_
    cargs = fields.get("c_args")
    if cargs is not None:
        if not (issubclass(cargs, ctypes.Array) and cargs._type_ is ctypes.c_char):
            raise ValueError(f"slot_class {name}.c_args must be ctypes.c_char * N")
        out["cargs_off"], out["cargs_len"] = field("c_args").offset, cargs._length_
    else:
        out["cargs_off"], out["cargs_len"] = 0, 0
    meta = fields.get("meta")
    if meta is not None:
        if not (issubclass(meta, ctypes.Array) and meta._type_ is ctypes.c_uint8):
            raise ValueError(f"slot_class {name}.meta must be ctypes.c_uint8 * N")
        out["meta_off"], out["meta_len"] = field("meta").offset, meta._length_
    else:
        out["meta_off"], out["meta_len"] = 0, 0
    return out


def _typespec(t: Any) -> tuple:
    if isinstance(t, type) and issubclass(t, ctypes.Array):
        return ("array", _typespec(t._type_), t._length_)
    if isinstance(t, type) and issubclass(t, ctypes.Structure):
        return ("struct", describe(t))
    name = getattr(t, "__name__", "")
    if getattr(ctypes, name, None) is t:
        return ("simple", name)
    raise ValueError(f"slot field type {t!r} cannot be described")


def _build(spec: tuple) -> Any:
    kind = spec[0]
    if kind == "array":
        return _build(spec[1]) * spec[2]
    if kind == "struct":
        return rebuild(spec[1])
    return getattr(ctypes, spec[1])


def describe(cls: type) -> tuple:
    """A picklable description of a slot class (name, fields, packing), for classes that
    cannot travel by reference, e.g. ones defined in ``__main__``."""
    fields = []
    for klass in reversed(cls.__mro__):
        for f in klass.__dict__.get("_fields_", []) or []:
            fields.append((f[0], _typespec(f[1])))
    return (cls.__name__, fields, getattr(cls, "_pack_", None))


def rebuild(desc: tuple) -> type:
    """The ctypes.Structure class a description came from (same layout)."""
    name, fields, pack = desc
    ns: dict = {"_fields_": [(n, _build(t)) for n, t in fields]}
    if pack:
        ns["_pack_"] = pack
    return type(name, (ctypes.Structure,), ns)
