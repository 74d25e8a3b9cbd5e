"""The handler registry: fn_id <-> handler, argument checks done at enqueue, and how a
handler travels to workers (cloudpickle: by reference when importable, by value otherwise).

Functions that a program defines once (importable ones, a script's module-level functions)
are registered for the app's life. Functions made at run time (lambdas, closures, partials,
bound methods, callable objects) are not: they travel with each of their tasks, so that an
app that submits a million different closures keeps no record of them."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib
import inspect
import io
import pickle
import sys
import threading
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

import cloudpickle

from ._builtins import (BOOT_FN_ID, BUILTIN_HANDLERS, CALL_BY_VALUE_ID, MAP_CHUNK_ID, RESERVED_MAX, STATE_PARAM,
                        ProcTaskFnID, call_by_value, run_chunk)
from ._errors import RegistryError
from ._slots import describe, is_slot_class, rebuild, slot_layout

__all__ = ["Handler", "Registry", "FIRST_AUTO_ID", "MAX_FN_ID"]

FIRST_AUTO_ID = 0x1000
MAX_FN_ID = BOOT_FN_ID - 1  # the registry's boot entry takes the last id


def task_signature(fn: Callable, worker_state: bool = False) -> inspect.Signature | None:
    """`fn`'s signature as its tasks' arguments see it: without the ``worker_state``
    parameter, which the worker passes itself when the app has worker_state=True. None when
    it has no signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    if worker_state and STATE_PARAM in sig.parameters:
        sig = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != STATE_PARAM])
    return sig


def _check_state_param(fn: Callable, name: str) -> None:
    """The worker passes worker_state by keyword: it must be a parameter that can take it
    without displacing the task's own arguments."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return
    for i, p in enumerate(params):
        if p.name != STATE_PARAM:
            continue
        after = [q for q in params[i + 1:] if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
        if p.kind is p.POSITIONAL_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and after):
            raise RegistryError(f"handler {name!r}: the worker passes worker_state by keyword, so declare it "
                                f"after the task's own parameters or keyword-only (..., *, worker_state)")


def _slot_mode(fn: Callable, default_slot: type, worker_state: bool = False) -> type | None:
    """The slot class a slot-mode handler wants, or None for an argument-mode handler.

    Slot mode: a single parameter (besides worker_state) named ``slot`` or annotated with
    a slot class."""
    sig = task_signature(fn, worker_state)
    if sig is None:
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
    # A call that is not a registered function as such (see Registry.resolve): arguments
    # pushed before the caller's (a function sent by value, then a partial's arguments),
    # the ones of those the signature sees (a partial's), and keywords given first.
    sends: tuple = ()
    binds: tuple = ()
    binds_kw: dict | None = None

    @property
    def slot_mode(self) -> bool:
        return self.slot_class is not None

    @property
    def bound(self) -> bool:
        """Whether calls push more than the caller's arguments (see `sends`)."""
        return bool(self.sends or self.binds_kw)

    def call_args(self, args: tuple, kwargs: dict | None) -> tuple[tuple, dict | None]:
        """The arguments to push for a call with `args` and `kwargs`."""
        if not self.bound:
            return args, kwargs
        if self.binds_kw:
            kwargs = {**self.binds_kw, **(kwargs or {})}
        return self.sends + args, kwargs

    def check_args(self, args: tuple, kwargs: dict | None) -> None:
        """Raises TypeError naming the handler when the call could not bind."""
        if self.slot_mode:
            return  # arguments go to slot.args; checked by the native encoder
        if self.binds or self.binds_kw:
            args, kwargs = self.binds + args, {**(self.binds_kw or {}), **(kwargs or {})}
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


def _by_value_key(fn: Any) -> Any:
    """How the registry finds a function it sent by value before: by identity (each entry
    holds its function, so the id stays its own), except a bound method, which is a new
    object at every `obj.method` but equal to the last one (same object, same function)."""
    if type(fn) is types.MethodType:
        try:
            hash(fn)
            return fn
        except TypeError:  # its object is unhashable
            pass
    return id(fn)


def _reserved_name(fn_id: int) -> str:
    try:
        return ProcTaskFnID(fn_id).name
    except ValueError:
        return "the runtime"


def _defined_once(fn: Any) -> bool:
    """Whether `fn` is a function the program defines once, which may be registered for
    the app's life: one found again by module and name (importable, or a module-level
    function or class of the script's ``__main__``). Lambdas, closures, partials, bound
    methods and callable objects are made at run time and are not."""
    if _by_reference(fn):
        return True
    if getattr(fn, "__module__", None) != "__main__" or not isinstance(fn, (types.FunctionType, type)):
        return False
    found: Any = sys.modules.get("__main__")
    for part in fn.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is fn


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


def _introspect(h: Handler, worker_state: bool = False) -> None:
    sig = task_signature(h.fn, worker_state)
    if sig is None:
        return
    h.signature = sig
    pos = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    h.min_pos = sum(1 for p in pos if p.default is p.empty)
    has_var = any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values())
    h.max_pos = float("inf") if has_var else len(pos)
    h.needs_kw = any(p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in sig.parameters.values())


class Registry:
    """fn_id -> Handler for one app. Thread-safe."""

    def __init__(self, default_slot: type,
                 on_register: Callable[[Handler, Handler | None], None] | None = None,
                 worker_state: bool = False):
        """`on_register(handler, replaced)` is called for every registration after the
        built-ins (`replaced`: the handler it replaces, or None). `worker_state`: the
        app's setting; a handler's ``worker_state`` parameter is then the worker's, not
        its tasks'."""
        self._default_slot = default_slot
        self._worker_state = worker_state
        self._by_id: dict[int, Handler] = {}
        self._by_name: dict[str, int] = {}
        self._by_fn: dict[Any, int] = {}
        self._handler_of: dict[Any, Handler] = {}  # resolve()'s one-lookup path, by function
        # Handlers of the latest functions sent by value (see resolve), by id (each entry
        # holds its function, so the id stays its own): one pickle of a lambda however
        # often it is submitted. Bounded in entries and in pickled bytes.
        self._by_value: dict[Any, Handler] = {}
        self._by_value_bytes = 0
        self._next_auto = FIRST_AUTO_ID
        self._lock = threading.RLock()
        self.on_register = None
        for fn_id, fn in BUILTIN_HANDLERS.items():
            self._add(int(fn_id), fn, fn_id.name, builtin=True)
        self._add(MAP_CHUNK_ID, run_chunk, "mpop.map_chunk", builtin=True).internal = True
        self._add(CALL_BY_VALUE_ID, call_by_value, "mpop.call_by_value", builtin=True).internal = True
        self.on_register = on_register

    def _remove_lookups(self, h: Handler) -> None:
        """Forgets how to find `h` by its function (it is being replaced)."""
        try:
            if self._by_fn.get(h.fn) == h.fn_id:
                del self._by_fn[h.fn]
            if self._handler_of.get(h.fn) is h:
                del self._handler_of[h.fn]
        except TypeError:  # unhashable
            pass

    def _add(self, fn_id: int, fn: Callable, name: str, builtin: bool = False,
             replaces: Handler | None = None) -> Handler:
        if self._worker_state:
            _check_state_param(fn, name)
        slot_class = _slot_mode(fn, self._default_slot, self._worker_state)
        if slot_class is not None and slot_class is not self._default_slot:
            if slot_layout(slot_class) != slot_layout(self._default_slot):
                raise RegistryError(
                    f"handler {name!r} takes a {slot_class.__name__} "
                    f"({ctypes.sizeof(slot_class)} bytes) but the app's slot_class is "
                    f"{self._default_slot.__name__} ({ctypes.sizeof(self._default_slot)} bytes) with "
                    f"another layout; annotate it with the app's slot class or pass "
                    f"slot_class={slot_class.__name__} to MpopApi")
        h = Handler(fn_id=fn_id, name=name, fn=fn, slot_class=slot_class, builtin=builtin)
        _introspect(h, self._worker_state)
        self._by_id[fn_id] = h
        self._by_name[name] = fn_id
        try:
            self._by_fn.setdefault(fn, fn_id)
            self._handler_of.setdefault(fn, self._by_id[self._by_fn[fn]])
        except TypeError:  # unhashable callable
            pass
        if self.on_register is not None:
            self.on_register(h, replaces)
        return h

    def reserve_auto_ids(self, first: int, taken) -> None:
        """Automatic fn_ids from `first` on, above any of `taken` (ids in use elsewhere: a
        persistent pool's clients each take ids from a range of their own)."""
        with self._lock:
            above = [i for i in taken if first <= i < first + (1 << 20)]
            self._next_auto = max([first, *(i + 1 for i in above)])

    def register(self, fn: Callable, fn_id: int | None = None, name: str | None = None) -> int:
        if not callable(fn):
            raise RegistryError(f"a handler must be callable, got {fn!r}")
        with self._lock:
            own_name = name or getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
            old = self._by_id.get(fn_id) if isinstance(fn_id, int) else None
            if old is not None and old.name == own_name and not old.builtin:
                # The same handler registered again under its id (a notebook cell run
                # again): the new function replaces it for every task that starts from
                # now on (those enqueued before and not yet started included).
                self._remove_lookups(old)
                self._add(fn_id, fn, own_name, replaces=old)
                return fn_id
            if name is None:
                name = own_name
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
                what = _reserved_name(fn_id)
                raise RegistryError(f"fn_id {fn_id:#x} is reserved (ids up to {RESERVED_MAX:#x} belong "
                                    f"to the runtime; {fn_id:#x} is {what}); use {FIRST_AUTO_ID:#x} or above")
            if fn_id > MAX_FN_ID:
                raise RegistryError(f"fn_id {fn_id:#x} is out of range (at most {MAX_FN_ID:#x})")
            if fn_id in self._by_id:
                raise RegistryError(f"fn_id {fn_id:#x} is already registered to {self._by_id[fn_id].name!r} "
                                    f"(registering a handler of that name again replaces it)")
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
        if type(key) is functools.partial:
            return self._partial(key)
        h = self._by_value.get(_by_value_key(key))  # a function made at run time, sent before
        if h is not None and (h.fn is key or type(key) is types.MethodType):
            return h
        if _defined_once(key) or _slot_mode(key, self._default_slot, self._worker_state) is not None:
            # Registered for the app's life: a program defines such functions once. (A
            # slot-mode handler is found by the fn_id in its slot, so it is registered too.)
            with self._lock:
                fid = self._lookup_fn(key)
                if fid is None:
                    fid = self.register(key)
            return self._by_id[fid]
        return self._sent_by_value(key)

    def _partial(self, p: functools.partial) -> Handler:
        """A partial's calls: its function's handler, with its arguments pushed first."""
        inner = self.resolve(p.func)
        if inner.slot_mode:
            raise RegistryError(f"functools.partial of the slot-mode handler {inner.name!r}: a slot-mode "
                                f"handler takes only its slot")
        kw = {**(inner.binds_kw or {}), **p.keywords}
        return dataclasses.replace(inner, name=f"partial({inner.name})", sends=inner.sends + p.args,
                                   binds=inner.binds + p.args, binds_kw=kw or None)

    _BY_VALUE_MAX = 1024
    _BY_VALUE_MAX_BYTES = 16 << 20

    def _sent_by_value(self, fn: Callable) -> Handler:
        """A function made at run time (a lambda, a closure, a bound method, a callable
        object): its tasks call it through the built-in call_by_value, with its pickle as
        their first argument. Nothing is registered."""
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
        buf = io.BytesIO()
        try:
            _SpecPickler(buf, protocol=5).dump(fn)
        except Exception as e:
            raise RegistryError(f"{name!r} cannot be sent to workers: {e!r}") from e
        blob = buf.getvalue()
        if self._worker_state:
            _check_state_param(fn, name)
        h = Handler(fn_id=CALL_BY_VALUE_ID, name=name, fn=fn, slot_class=None, sends=(blob,))
        _introspect(h, self._worker_state)
        with self._lock:
            while self._by_value and (len(self._by_value) >= self._BY_VALUE_MAX
                                      or self._by_value_bytes + len(blob) > self._BY_VALUE_MAX_BYTES):
                oldest = self._by_value.pop(next(iter(self._by_value)))  # first in, first out
                self._by_value_bytes -= len(oldest.sends[0])
            self._by_value[_by_value_key(fn)] = h
            self._by_value_bytes += len(blob)
        return h

    def _lookup_fn(self, fn: Any) -> int | None:
        try:
            return self._by_fn.get(fn)
        except TypeError:  # unhashable
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

    def problems(self) -> list[str]:
        """What keeps a handler from reaching the workers, one line each."""
        out = []
        for h in self.handlers():
            try:
                pickle.loads(h.spec())
            except Exception as e:
                out.append(f"handler {h.name!r} (fn_id {h.fn_id:#x}) cannot be sent to workers: {e!r}")
        return out

    def get(self, fn_id: int) -> Handler | None:
        """The handler registered under `fn_id`, or None."""
        return self._by_id.get(fn_id)

    def name_of(self, fn_id: int) -> str:
        """The name of the handler under `fn_id`, for messages."""
        h = self._by_id.get(fn_id)
        return h.name if h is not None else f"fn_id {fn_id:#x}"
