"""amap() and asubmit(): map() and submit() for asyncio code, never blocking the event
loop.

The input is read into chunks as map() reads it (ChunkFeed, sized by ChunkSizer), and each
chunk is one task of the built-in chunk runner, submitted as a future without waiting for
room; the result thread settles the future, and its done callback wakes the loop
(asyncio.wrap_future: loop.call_soon_threadsafe). When the ring is full of other tasks,
the iterator sleeps in the loop (asyncio.sleep) and tries again; so does asubmit() for its
one task."""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from ._map import ChunkFeed
from ._router import unpack_error

__all__ = ["amap_values", "value_when_room"]

if TYPE_CHECKING:
    import asyncio

_ROOM_POLL_S = (0.0005, 0.02)  # first and longest wait for room in a ring full of other tasks


async def value_when_room(try_submit: Callable[[], Future | None]) -> Any:
    """The value of the task `try_submit()` pushes (None: no room yet; it is called again
    after a sleep in the loop, 0.5 ms growing to 20 ms), awaited as its future: the
    handler's exception is raised as itself. Cancelled while it waits for room, nothing
    was sent; cancelled while the task waits, the future is cancelled."""
    import asyncio

    poll = _ROOM_POLL_S[0]
    fut = try_submit()
    while fut is None:
        await asyncio.sleep(poll)  # the ring is full: room comes as workers claim tasks
        poll = min(2 * poll, _ROOM_POLL_S[1])
        fut = try_submit()
    return await fut


async def amap_values(feed: ChunkFeed, try_submit: Callable[[tuple], Future | None],
                      ordered: bool) -> AsyncIterator[Any]:
    """Yields the values of `feed`'s chunks (in input order, or as chunks finish), each
    chunk submitted by `try_submit(args)` (None: no room yet). A chunk's failure is raised
    after the values before it; leaving early (break, aclose(), a cancelled task)
    cancels the chunks that have not started."""
    import asyncio  # here: `import mpop` does not import asyncio

    loop = asyncio.get_running_loop()
    # The chunks in flight, in the order they were sent: asyncio future -> (task's
    # future, items). At most the sizer's window of them, and feed.items_limit items.
    in_flight: dict[asyncio.Future, tuple[Future, int]] = {}
    out = 0
    chunk = None  # a chunk read but not sent yet: no room for it
    poll = _ROOM_POLL_S[0]
    try:
        while True:
            while len(in_flight) < feed.sizer.window and out < feed.items_limit:
                if chunk is None:
                    chunk = None if feed.exhausted else feed.next_chunk(feed.items_limit - out)
                    if chunk is None:
                        break
                fut = try_submit(chunk[0])
                if fut is None:
                    break
                in_flight[asyncio.wrap_future(fut, loop=loop)] = (fut, chunk[1])
                out += chunk[1]
                chunk = None
            if not in_flight:
                if chunk is None:  # the input is exhausted, and every chunk is back
                    if feed.source_error is not None:
                        raise feed.source_error
                    return
                await asyncio.sleep(poll)  # the ring is full of other tasks: room comes
                poll = min(2 * poll, _ROOM_POLL_S[1])
                continue
            poll = _ROOM_POLL_S[0]
            if ordered:
                first = next(iter(in_flight))
                if not first.done():
                    await asyncio.wait((first,))
                ready = [first]
            else:
                ready = [f for f in in_flight if f.done()]
                if not ready:
                    done, _ = await asyncio.wait(tuple(in_flight), return_when=asyncio.FIRST_COMPLETED)
                    ready = [f for f in in_flight if f in done]
            for waiter in ready:
                fut, n = in_flight.pop(waiter)
                out -= n
                values, elapsed_ns, error = fut.result()  # a crash or timeout raises for its chunk
                feed.learn(values, elapsed_ns)
                for v in values:
                    yield v
                if error is not None:
                    raise unpack_error(error)
    finally:
        for fut, _ in in_flight.values():
            fut.cancel()  # those that have not started never run; the rest finish unseen
