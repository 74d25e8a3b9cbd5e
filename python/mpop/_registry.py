"""The handler registry: fn_id <-> handler, argument checks done at enqueue, and how a
handler travels to workers (cloudpickle: by reference when importable, by value otherwise)."""

from __future__ import annotations

import ctypes
import importlib
import inspect
import io
import threading
import weakref
import typing
from dataclasses import dataclass
from typing import Any, Callable

import cloudpickle

from ._builtins import BUILTIN_HANDLERS, MAP_CHUNK_ID, RESERVED_MAX, ProcTaskFnID
from ._errors import RegistryError
from ._slots import describe, is_slot_class, rebuild, slot_layout

__all__ = ["Handler", "Registry", "FIRST_AUTO_ID", "MAX_FN_ID"]

FIRST_AUTO_ID = 0x1000
MAX_FN_ID = 0xFFFFFFFE  # 0xFFFFFFFF marks the registry's boot entry


def _slot_mode(fn: Callable, default_slot: type) -> type | None:
    """The slot class a slot-mode handler wants, or None for an argument-mode handler.

    Slot mode: a single parameter named ``slot`` or annotated with a slot class."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = [p for p in sig.parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) != 1:
        return None
    p = params[0]
    ann = p.annotation
    if isinstance(ann, str):
        try:
            ann = typing.get_type_hints(fn).get(p.name, ann)
        except Exception:
            pass
    if is_slot_class(ann):
        return ann
    if p.name == "slot":
        return default_slot
    return None


@dataclass
class Handler:
    fn_id: int
    name: str
    fn: Callable
    slot_class: type | None  # slot mode when set
    builtin: bool = False
    internal: bool = False  # runtime machinery, not listed
    signature: inspect.Signature | None = None
    min_pos: int = 0
    max_pos: float = float("inf")
    needs_kw: bool = False

    @property
    def slot_mode(self) -> bool:
        return self.slot_class is not None

    def check_args(self, args: tuple, kwargs: dict | None) -> None:
        """Raises TypeError naming the handler when the call could not bind."""
        if self.slot_mode:
            return  # arguments go to slot.args; checked by the native encoder
        if not kwargs and not self.needs_kw and self.min_pos <= len(args) <= self.max_pos:
            return
        if self.signature is None:
            return
        try:
            self.signature.bind(*args, **(kwargs or {}))
        except TypeError as e:
            raise TypeError(f"handler {self.name!r} (fn_id {self.fn_id:#x}) cannot take these "
                            f"arguments: {e}") from None

    def describe(self) -> dict:
        return {
            "fn_id": self.fn_id,
            "name": self.name,
            "mode": "slot" if self.slot_mode else "args",
            "builtin": self.builtin,
            "signature": str(self.signature) if self.signature is not None else None,
            "module": getattr(self.fn, "__module__", None),
        }

    def spec(self) -> bytes:
        """What a worker needs to call this handler."""
        return handler_spec(self.fn, self.slot_class)


def _by_reference(obj: Any) -> bool:
    """Whether `obj` can be found again by module and qualified name in another process."""
    mod = getattr(obj, "__module__", None)
    if not mod or mod == "__main__":
        return False
    try:
        found: Any = importlib.import_module(mod)
        for part in obj.__qualname__.split("."):
            found = getattr(found, part)
        return found is obj
    except Exception:
        return False


class _SpecPickler(cloudpickle.Pickler):
    """cloudpickle, except that a ctypes.Structure class that cannot be imported in the
    worker (one from __main__, a notebook cell or a function body) travels as its field
    layout: ctypes classes cannot be pickled by value, and handlers refer to them in
    annotations and bodies."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type) and issubclass(obj, ctypes.Structure) and not _by_reference(obj):
            return rebuild, (describe(obj),)
        return super().reducer_override(obj)


def handler_spec(fn: Callable, slot_class: type | None) -> bytes:
    """(handler, slot class) as bytes for workers: importable functions by reference,
    others by value (cloudpickle)."""
    buf = io.BytesIO()
    _SpecPickler(buf, protocol=5).dump((fn, slot_class))
    return buf.getvalue()


def _introspect(h: Handler) -> None:
    try:
        sig = inspect.signature(h.fn)
    except (TypeError, ValueError):
        return
    h.signature = sig
    pos = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    h.min_pos = sum(1 for p in pos if p.default is p.empty)
    has_var = any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values())
    h.max_pos = float("inf") if has_var else len(pos)
    h.needs_kw = any(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in sig.parameters.values())


class Registry:
    """fn_id -> Handler for one app. Thread-safe."""

    def __init__(self, default_slot: type, on_register: Callable[[Handler], None] | None = None):
        self._default_slot = default_slot
        self._by_id: dict[int, Handler] = {}
        self._by_name: dict[str, int] = {}
        self._by_fn: dict[Any, int] = {}
        self._handler_of: dict[Any, Handler] = {}  # resolve()'s one-lookup path, by function
        # Auto-registered functions, weakly, and by their spec: a lambda written in a loop is
        # a new object each time but the same handler, so it reuses one fn_id.
        self._auto_fn: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._by_spec: dict[bytes, int] = {}
        self._next_auto = FIRST_AUTO_ID
        self._lock = threading.RLock()
        self.on_register = on_register
        for fn_id, fn in BUILTIN_HANDLERS.items():
            self._add(int(fn_id), fn, fn_id.name, builtin=True)
        from ._worker import run_chunk

        self._add(MAP_CHUNK_ID, run_chunk, "mpop.map_chunk", builtin=True).internal = True

    def _add(self, fn_id: int, fn: Callable, name: str, builtin: bool = False) -> Handler:
        slot_class = _slot_mode(fn, self._default_slot)
        if slot_class is not None and slot_class is not self._default_slot:
            if slot_layout(slot_class) != slot_layout(self._default_slot):
                raise RegistryError(
                    f"handler {name!r} takes a {slot_class.__name__} "
                    f"({ctypes.sizeof(slot_class)} bytes) but the app's slot_class is "
                    f"{self._default_slot.__name__} ({ctypes.sizeof(self._default_slot)} bytes) with "
                    f"another layout; annotate it with the app's slot class or pass "
                    f"slot_class={slot_class.__name__} to MpopApi")
        h = Handler(fn_id=fn_id, name=name, fn=fn, slot_class=slot_class, builtin=builtin)
        _introspect(h)
        self._by_id[fn_id] = h
        self._by_name[name] = fn_id
        try:
            self._by_fn.setdefault(fn, fn_id)
            self._handler_of.setdefault(fn, self._by_id[self._by_fn[fn]])
        except TypeError:  # unhashable callable
            pass
        if self.on_register is not None:
            self.on_register(h)
        return h

    def register(self, fn: Callable, fn_id: int | None = None, name: str | None = None) -> int:
        if not callable(fn):
            raise RegistryError(f"a handler must be callable, got {fn!r}")
        with self._lock:
            if name is None:
                name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
                if name in self._by_name:  # same-named functions from different places
                    name = f"{name}#{len(self._by_id)}"
            if fn_id is None:
                while self._next_auto in self._by_id:
                    self._next_auto += 1
                fn_id = self._next_auto
                self._next_auto += 1
            if isinstance(fn_id, bool) or not isinstance(fn_id, int):
                raise RegistryError(f"fn_id must be an int, got {fn_id!r}")
            if fn_id <= RESERVED_MAX:
                what = ProcTaskFnID(fn_id).name if fn_id in ProcTaskFnID._value2member_map_ else "the runtime"
                raise RegistryError(f"fn_id {fn_id:#x} is reserved (ids up to {RESERVED_MAX:#x} belong "
                                    f"to the runtime; {fn_id:#x} is {what}); use {FIRST_AUTO_ID:#x} or above")
            if fn_id > MAX_FN_ID:
                raise RegistryError(f"fn_id {fn_id:#x} is out of range (at most {MAX_FN_ID:#x})")
            if fn_id in self._by_id:
                raise RegistryError(f"fn_id {fn_id:#x} is already registered to {self._by_id[fn_id].name!r}")
            if name in self._by_name:
                raise RegistryError(f"a handler named {name!r} is already registered "
                                    f"(fn_id {self._by_name[name]:#x})")
            self._add(fn_id, fn, name)
            return fn_id

    def resolve(self, fn: Any = None, fn_id: int | None = None, *, auto: bool = True) -> Handler:
        """The handler for a function, an fn_id or a ProcTaskFnID; registers an unknown
        function when `auto`. Raises RegistryError for an unknown id."""
        if fn_id is None:
            try:
                h = self._handler_of.get(fn)  # a registered function: the usual case
            except TypeError:  # unhashable
                h = None
            if h is not None:
                return h
        if fn is not None and fn_id is not None:
            raise TypeError("pass either fn or fn_id, not both")
        key = fn_id if fn is None else fn
        if key is None:
            raise TypeError("enqueue needs a handler: fn or fn_id")
        if isinstance(key, int) and not isinstance(key, bool):
            h = self._by_id.get(int(key))
            if h is None:
                raise RegistryError(f"no handler is registered under fn_id {int(key):#x}")
            return h
        if isinstance(key, str):
            with self._lock:
                if key in self._by_name:
                    return self._by_id[self._by_name[key]]
            raise RegistryError(f"no handler is registered under the name {key!r}")
        fid = self._lookup_fn(key)
        if fid is not None:
            return self._by_id[fid]
        if not callable(key):
            raise RegistryError(f"{key!r} is neither a registered function nor an fn_id")
        if not auto:
            raise RegistryError(f"{key!r} is not registered")
        with self._lock:
            fid = self._lookup_fn(key)
            if fid is None:
                try:
                    spec = handler_spec(key, _slot_mode(key, self._default_slot))
                except Exception:
                    spec = None
                fid = self._by_spec.get(spec) if spec is not None else None
                if fid is None:
                    fid = self.register(key)
                    if spec is not None:
                        self._by_spec[spec] = fid
                try:
                    self._auto_fn[key] = fid
                except TypeError:
                    pass
        return self._by_id[fid]

    def _lookup_fn(self, fn: Any) -> int | None:
        try:
            fid = self._by_fn.get(fn)
            if fid is None:
                fid = self._auto_fn.get(fn)
            return fid
        except TypeError:  # unhashable or not weakly referenceable
            return None

    def resolves_directly(self, h: Handler) -> bool:
        """Whether resolve(h.fn) finds `h` by its one-lookup path (a hashable function that
        is registered under h's fn_id first)."""
        try:
            return self._handler_of.get(h.fn) is h
        except TypeError:
            return False

    def handlers(self, internal: bool = False) -> list[Handler]:
        with self._lock:
            return sorted((h for h in self._by_id.values() if internal or not h.internal),
                          key=lambda h: h.fn_id)

    def get(self, fn_id: int) -> Handler | None:
        return self._by_id.get(fn_id)
