"""map(): items travel in chunks, each chunk one task run by the built-in chunk runner.

ChunkSizer decides how many items go in each chunk (a pure object: it sees only counts
and timings); ChunkFeed reads the input into chunks of that size; MapRun keeps a bounded
window of chunks in flight, pushes them, and yields their values as they come back;
MapIterator flattens those lists in C. (amap(), in _amap.py, shares the first two.)"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Iterable, Iterator

from ._config import is_int
from ._core import RESULT_STATUS
from ._errors import MpopError
from ._registry import Handler
from ._router import MapState, ResultRouter, unpack_error
from ._runtime import MAX_TSK_ID

STATUS_OK = RESULT_STATUS["OK"]

__all__ = ["ChunkSizer", "ChunkFeed", "MapRun", "MapIterator", "known_length"]


def known_length(iterables: tuple) -> int | None:
    """How many items map() will draw from `iterables` (zipped: the shortest), or None when
    one of them has no length (a generator, an iterator). Only a hint for sizing chunks."""
    try:
        return min(len(it) for it in iterables)
    except (TypeError, ValueError, OverflowError):  # unsized, or a length len() cannot give
        return None


class ChunkSizer:
    """How many items the next chunk of a map() takes.

    Until the first chunk is back, nothing is known of an item's cost: chunks of 16 (or
    `chunksize`), two a worker. Then each chunk is sized to take a worker about 20 ms (5 ms
    for an input of unknown length, whose end comes unannounced, so that its last chunk
    cannot keep the others waiting long), from a running average of the time per item.
    When the length is known, no chunk takes more than a 1/(2 x workers) share of what is
    left (guided chunks: the workers finish together), but not less than about 0.2 ms of
    work, which costs more in its trip through the owner than it saves."""

    TARGET_NS = 20_000_000
    TARGET_UNSIZED_NS = 5_000_000
    FLOOR_NS = 200_000
    MAX = 16384
    SPREAD_MAX = 250  # items as arguments of their own (arrays): a task carries <= 255

    def __init__(self, workers: int, items_limit: int, total: int | None, chunksize: int | None,
                 one_item_each: bool) -> None:
        """`items_limit`: the items allowed in flight; `total`: the input's length if known;
        `one_item_each`: every chunk holds one item (recycling and timeouts count items)."""
        self.workers = workers
        self.total = total
        self.chunksize = chunksize
        self.target_ns = self.TARGET_NS if total is not None else self.TARGET_UNSIZED_NS
        # Chunks of at most half a worker's share of the window.
        self.cap = 1 if one_item_each else max(1, min(self.MAX, items_limit // (2 * workers)))
        self.size = min(chunksize or 16, self.cap)
        self.per_item_ns: float | None = None
        self.taken = 0  # items handed out so far

    @property
    def window(self) -> int:
        """How many chunks may be in flight: eight a worker once an item's cost is known
        (the owner is off its core for milliseconds at a time, and each worker must have
        work queued for that long), two a worker until then."""
        if self.per_item_ns is not None or self.chunksize:
            return max(8 * self.workers, 4)
        return 2 * self.workers

    def next_size(self, room: int) -> int:
        """Items for the next chunk, with `room` items left in the in-flight window."""
        if self.chunksize is None and self.total is not None:
            left = self.total - self.taken
            floor = 1 if self.per_item_ns is None else int(self.FLOOR_NS / max(self.per_item_ns, 1.0))
            room = min(room, max(1, floor, -(-left // (2 * self.workers))))
        return max(1, min(self.size, room))

    def took(self, n: int) -> None:
        self.taken += n

    def spread(self, item_bytes: int, pool_bytes: int) -> int:
        """Items are arrays that travel as arguments of their own: a chunk's take at most an
        eighth of the pool. Returns the new chunk size."""
        fit = pool_bytes // (8 * max(1, item_bytes))
        self.cap = max(1, min(self.cap, self.SPREAD_MAX, fit))
        self.size = min(self.size, self.cap)
        return self.size

    def learn(self, items: int, elapsed_ns: int) -> None:
        """A chunk of `items` took a worker `elapsed_ns`."""
        if self.chunksize is not None or not items:
            return
        sample = elapsed_ns / items
        self.per_item_ns = sample if self.per_item_ns is None else 0.5 * self.per_item_ns + 0.5 * sample
        self.size = int(min(self.cap, max(1, self.target_ns / max(self.per_item_ns, 1.0))))


class MapIterator(itertools.chain):
    """What map() returns: an iterator over the values, flattened from each chunk's list in C
    (a generator yielding item by item cost more per item than the whole trip through a
    worker). ``close()`` abandons the map, like a generator's."""

    source: Iterator[list]  # the generator of the chunks' value lists (MapRun.chunks)

    @classmethod
    def over(cls, chunks: Iterator[list]) -> MapIterator:
        it = cls.from_iterable(chunks)
        it.source = chunks
        return it

    def close(self) -> None:
        """Abandons the map: no more chunks are sent; those in flight are drained."""
        self.source.close()


class ChunkFeed:
    """The input side of a map (map() and amap()): reads the items as chunks are needed,
    sized by a ChunkSizer, and turns each chunk into the chunk runner's arguments."""

    def __init__(self, h: Handler, iterables: tuple, *, workers: int, queue_slots: int, pool_bytes: int,
                 one_item_each: bool, max_in_flight: int | None, chunksize: int | None) -> None:
        """Raises ValueError for a `chunksize` or `max_in_flight` that is not None or an
        int >= 1."""
        if chunksize is not None and (not is_int(chunksize) or chunksize < 1):
            raise ValueError(f"chunksize must be an int >= 1 or None, got {chunksize!r}")
        if max_in_flight is not None and (not is_int(max_in_flight) or max_in_flight < 1):
            raise ValueError(f"max_in_flight must be an int >= 1 or None, got {max_in_flight!r}")
        self.h = h
        self.pool_bytes = pool_bytes
        self.single = len(iterables) == 1
        self.source: Iterator = iter(iterables[0]) if self.single else zip(*iterables)
        # A range travels as sub-ranges (a few bytes a chunk): no list to build or pickle.
        self.span = iterables[0] if self.single and type(iterables[0]) is range else None
        # Read ahead at most this many items, so memory stays flat for any input length:
        # four rings' worth, or sixty-four for a range, whose items cost nothing until they
        # run (trivial items then go in chunks of 16k, up to eight a worker).
        self.items_limit = max_in_flight or (64 if self.span is not None else 4) * queue_slots
        self.sizer = ChunkSizer(workers, self.items_limit, known_length(iterables), chunksize, one_item_each)
        # What each chunk's runner binds before an item: a partial's arguments, a function
        # sent by value (see Registry.resolve).
        self.call = (h.sends, h.binds_kw) if h.bound else None
        self.spread = False  # items as separate arguments (arrays), not one list
        self.checked = False
        self.exhausted = False
        self.source_error: Exception | None = None  # what the input raised, once reached

    def next_chunk(self, room: int) -> tuple[tuple, int] | None:
        """(the chunk runner's arguments, items) for the next chunk, of at most `room`
        items; None once the input is exhausted."""
        items = self._read(self.sizer.next_size(room))
        if not items:
            self.exhausted = True
            return None
        if not self.checked:
            items = self._first(items)
        fn_id = self.h.fn_id
        args = (fn_id, self.call, False, None, *items) if self.spread else (fn_id, self.call, not self.single, items)
        self.sizer.took(len(items))
        return args, len(items)

    def _read(self, n: int) -> Any:
        """The next `n` items (fewer at the end; a sub-range of a range)."""
        if self.span is not None:
            return self.span[self.sizer.taken:self.sizer.taken + n]
        # extend() keeps the items read before the input raised: they go out, and the error
        # is raised in their place, after their values.
        items: list = []
        try:
            items.extend(itertools.islice(self.source, n))
        except Exception as e:
            self.source_error, self.source = e, iter(())
        return items

    def _first(self, items: Any) -> Any:
        """The first chunk: checks the call against the handler, and sends numpy arrays as
        arguments of their own (they travel through the pool without pickling and reach
        the handler as views)."""
        self.checked = True
        self.h.check_args((items[0],) if self.single else tuple(items[0]), None)
        self.spread = self.single and type(items[0]).__name__ == "ndarray"
        if self.spread:
            size = self.sizer.spread(items[0].nbytes, self.pool_bytes)
            if len(items) > size:
                self.source = itertools.chain(items[size:], self.source)
                items = items[:size]
        return items

    def learn(self, values: list, elapsed_ns: int) -> None:
        """A chunk came back with `values`, after `elapsed_ns` in its worker."""
        self.sizer.learn(len(values), elapsed_ns)


class MapRun:
    """One map() call: reads the input as chunks are needed (ChunkFeed), keeps a bounded
    window of chunks in flight, and yields each chunk's values (in order, or as they
    come)."""

    _WAIT_RUN_ITEMS = 16384  # at most this many items' worth of chunks woken for at once

    def __init__(self, feed: ChunkFeed, *, router: ResultRouter, push: Callable[..., int], runner: Handler,
                 check: Callable[[], None], ordered: bool, timeout: float | None, progress_bar: Any) -> None:
        self.feed = feed
        self.router, self.push, self.runner, self.check = router, push, runner, check
        self.ordered = ordered
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.bar = progress_bar
        self.sizes: dict[int, int] = {}  # chunk key -> items, while in flight
        self.out = 0  # items in flight: the sum of `sizes`
        self.done = 0  # chunks returned (state.sent counts those sent)
        self.route, self.state = router.open_map()

    def chunks(self) -> Iterator[list]:
        """Yields the values of each chunk, as a list, in the order map() returns them."""
        state, feed = self.state, self.feed
        try:
            while True:
                state.touched = time.monotonic()  # the background thread leaves us alone
                self._fill()
                if self.done == state.sent and feed.exhausted:
                    if feed.source_error is not None:
                        raise feed.source_error
                    return
                values, error = self._next_result()
                # One chunk at a time, then the window is topped up again: the caller's work
                # on a backlog of results takes milliseconds, and the workers would sit idle
                # for want of chunks if it went through all of them first.
                yield values
                if error is not None:
                    raise unpack_error(error)
        finally:
            self.router.close_map(self.route, state)
            if self.bar is not None:
                self.bar.close()

    def _fill(self) -> None:
        """Sends chunks while the window has room and the input has items."""
        state, feed = self.state, self.feed
        limit = feed.items_limit
        while not feed.exhausted and state.sent - self.done < feed.sizer.window and self.out < limit:
            chunk = feed.next_chunk(limit - self.out)
            if chunk is None:
                return
            args, n = chunk
            key = state.sent & MAX_TSK_ID
            self._push_chunk(key, args)
            self.sizes[key] = n
            self.out += n
            state.sent += 1

    def _push_chunk(self, key: int, args: tuple) -> None:
        """Pushes one chunk, waiting for room if there is none.

        A chunk's pooled arguments are freed when its result is drained. While this map's
        own chunks hold the room, this thread drains them itself, one result at a time, and
        tries again: a push blocked in the native wait would leave the draining to the
        background thread, which steps aside while a map is driven. With none of its chunks
        in flight, the room is held by other tasks: the native wait, while the background
        thread drains those."""
        state = self.state
        while not self.push(self.runner, key, args, None, None, False, None, self.route, True):
            received = state.received
            if state.sent == received:
                self.push(self.runner, key, args, None, None, True, None, self.route, True)
                return
            if not self.router.help_until(lambda: state.received != received, self.deadline, self.check):
                raise TimeoutError("map() timed out waiting for room for its next chunk")

    def _next_result(self) -> tuple[list, Any]:
        """The next chunk's (values, packed error or None), waiting for it."""
        state = self.state
        if self.ordered:
            key = self.done & MAX_TSK_ID
            if key not in state.results:
                self._wait()
            status, value = state.results.pop(key)
        else:
            if not state.results:
                self._wait()
            key, (status, value) = state.results.popitem()
        self.done += 1
        n = self.sizes.pop(key, 0)
        self.out -= n
        if status != STATUS_OK:
            raise value
        values, elapsed_ns, error = value
        self.feed.learn(values, elapsed_ns)
        if self.bar is not None:
            self.bar.update(len(values) + (1 if error is not None else 0))
        if error is None and len(values) != n:  # pragma: no cover - defensive
            raise MpopError(f"map() chunk returned {len(values)} values for {n} items")
        return values, error

    def _wait(self) -> None:
        state = self.state
        key = self.done & MAX_TSK_ID
        ready = (lambda: key in state.results) if self.ordered else (lambda: bool(state.results))
        # Woken once per run of chunks, not per chunk (each wake-up costs this thread tens of
        # microseconds, on a core the workers need): up to half the chunks still to come
        # back (never more than will come: the wait would sit out its step), but no more
        # than about 16k items, whose values are all decoded before the first is returned.
        run = self._WAIT_RUN_ITEMS // self.feed.sizer.size

        def want() -> int:
            return max(1, min((state.sent - state.received) // 2, run))

        if not self.router.help_until(ready, self.deadline, self.check, want=want):
            raise TimeoutError("map() timed out waiting for results")
