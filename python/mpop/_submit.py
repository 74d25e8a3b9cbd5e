"""Submitter: how a task gets into the ring. enqueue() and submit() take the native fast
path when they can (a registered function, positional arguments, workers running: one
native call); otherwise the handler is resolved and its arguments checked here, the task
gets its label (tsk_id), and the native producer encodes and pushes it. Errors of the push
become the errors the API promises (TypeError for an argument that cannot be serialised,
QueueFull, ShutdownError)."""

from __future__ import annotations

import pickle
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable, Coroutine, Iterable, Iterator

from ._amap import amap_values, value_when_room
from ._builtins import MAP_CHUNK_ID
from ._config import Config, is_int
from ._errors import MpopError, QueueFull, ShutdownError
from ._map import ChunkFeed
from ._registry import Handler, Registry
from ._router import ROUTE_FUTURE, ROUTE_PLAIN
from ._runtime import MAX_TSK_ID, Lifecycle

__all__ = ["Submitter"]

_UNSERIALISABLE = (pickle.PicklingError, TypeError, AttributeError)


class Submitter:
    """Puts one app's tasks into its ring (see the module's docstring)."""

    def __init__(self, config: Config, registry: Registry, lifecycle: Lifecycle, labels: Iterator[int]) -> None:
        self.config = config
        self.registry = registry
        self.lifecycle = lifecycle
        self.labels = labels  # shared with the native fast path

    def label(self, tsk_id: Any) -> int:
        """The task's label: `tsk_id` checked, or the next of the app's counter."""
        if tsk_id is None:
            return next(self.labels) & MAX_TSK_ID
        if not is_int(tsk_id) or not 0 <= tsk_id <= MAX_TSK_ID:
            raise ValueError(f"tsk_id must be an int from 0 to {MAX_TSK_ID}, got {tsk_id!r}")
        return tsk_id

    def push(self, h: Handler, tsk_id: int, args: tuple, kwargs: dict | None, c_args: Any = None,
             blocking: bool = True, timeout: float | None = None, route: int = ROUTE_PLAIN,
             claim_alone: bool = False) -> int:
        """Encodes and pushes one task; returns its seq, or 0 when the ring stayed full
        (`blocking=False`, or past `timeout`)."""
        rt = self.lifecycle.runtime or self.lifecycle.ensure()
        if h.fn_id not in rt.written:
            rt.write_handler(h)
        try:
            return rt.producer.enqueue(h.fn_id, tsk_id, args, kwargs, c_args, h.slot_mode, blocking,
                                       timeout, route, claim_alone, rt.check_workers)
        except RecursionError as e:  # a RuntimeError, but a fault of the argument, not the app
            raise TypeError(f"an argument of task {tsk_id} for {h.name!r} cannot be serialised: "
                            f"it is nested too deeply ({e})") from None
        except _UNSERIALISABLE as e:
            if isinstance(e, TypeError) and str(e).startswith("mpop:"):
                raise TypeError(str(e)[6:]) from None
            raise TypeError(f"an argument of task {tsk_id} for {h.name!r} cannot be serialised: {e}") from e
        except ValueError as e:
            msg = str(e)
            raise ValueError(msg[6:] if msg.startswith("mpop: ") else msg) from None
        except RuntimeError as e:
            if self.lifecycle.shut_down:
                raise ShutdownError("this MpopApi was shut down") from None
            raise MpopError(str(e)) from None

    def enqueue(self, fn: Any, fn_id: int | None, args: Iterable, kwargs: dict | None, tsk_id: int | None,
                c_args: Any, blocking: bool, timeout: float | None) -> bool:
        """MpopApi.enqueue after its native fast path (see there)."""
        self.lifecycle.check_open()
        h = self.registry.resolve(fn, fn_id)
        args = tuple(args)
        h.check_args(args, kwargs)
        if c_args is not None:
            if not isinstance(c_args, (bytes, bytearray, memoryview)):
                raise TypeError(f"c_args must be bytes, got {type(c_args).__name__}")
            c_args = bytes(c_args)
        label = self.label(tsk_id)
        args, kwargs = h.call_args(args, kwargs)
        if self.push(h, label, args, kwargs, c_args, blocking, timeout, ROUTE_PLAIN):
            return True
        if not blocking:
            return False
        raise QueueFull(f"the task ring ({self.config.queue_slots} slots) stayed full for {timeout}s")

    @staticmethod
    def enqueue_many(tasks: Iterable, enqueue: Callable[..., bool]) -> int:
        """MpopApi.enqueue_many: each of `tasks` through `enqueue` (see there)."""
        n = 0
        for t in tasks:
            if isinstance(t, dict):
                spec = dict(t)
                fn = spec.pop("fn", None)
                enqueue(fn, **spec)
            elif isinstance(t, (tuple, list)) and t:
                enqueue(t[0], args=tuple(t[1:]))
            else:
                raise TypeError(f"enqueue_many takes tuples (fn, *args) or dicts, got {t!r}")
            n += 1
        return n

    def checked_call(self, fn: Any, args: tuple, kwargs: dict | None) -> tuple[Handler, tuple, dict | None]:
        """``fn(*args, **kwargs)`` as a task: its handler, and the arguments in the
        handler's form. Raises what submit() raises at the call for a bad handler or
        arguments, and ShutdownError after shutdown."""
        self.lifecycle.check_open()
        h = self.registry.resolve(fn)
        h.check_args(args, kwargs)
        args, kwargs = h.call_args(args, kwargs or None)
        return h, args, kwargs

    def submit(self, fn: Any, args: tuple, kwargs: dict) -> Future:
        """MpopApi.submit after its native fast path (see there)."""
        h, args, kwargs = self.checked_call(fn, args, kwargs)
        router = self.lifecycle.start().router
        fut = router.future_cls()
        seq = self.push(h, self.label(None), args, kwargs, route=ROUTE_FUTURE)
        router.register_future(seq, fut)
        router.ensure_background()
        return fut

    def asubmit(self, fn: Any, args: tuple, kwargs: dict) -> Coroutine[Any, Any, Any]:
        """MpopApi.asubmit (see there): the arguments checked now, the task sent from the
        coroutine, when the ring has room."""
        h, args, kwargs = self.checked_call(fn, args, kwargs)
        return value_when_room(lambda: self.try_submit(h, args, kwargs))

    def amap(self, feed: ChunkFeed, ordered: bool) -> AsyncIterator[Any]:
        """MpopApi.amap (see there) over its checked input: each chunk a task of the
        built-in chunk runner, claimed alone, sent without waiting for room."""
        runner = self.registry.get(MAP_CHUNK_ID)
        return amap_values(feed, lambda args: self.try_submit(runner, args, claim_alone=True), ordered)

    def try_submit(self, h: Handler, args: tuple, kwargs: dict | None = None,
                   claim_alone: bool = False) -> Future | None:
        """Pushes ``h(*args, **kwargs)`` (arguments already in the handler's form, see
        checked_call) as a future's task without waiting for room: its future, or None
        while the ring is full. For callers that must not block (amap() and asubmit() in
        an event loop)."""
        rt = self.lifecycle.start()
        router = rt.router
        seq = self.push(h, self.label(None), args, kwargs, blocking=False, route=ROUTE_FUTURE,
                        claim_alone=claim_alone)
        if not seq:
            return None
        fut = router.future_cls()
        router.register_future(seq, fut)
        router.ensure_background()
        return fut
