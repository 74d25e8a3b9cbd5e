"""map(): ordered and unordered results, several iterables, bounded memory for inputs much
longer than the ring, errors raised from the iterator, progress."""

from __future__ import annotations

import re
import time

import pytest

from mpop import MpopApi, ProcTaskFnID
from mpop._map import ChunkSizer
from _helpers import leak_check

TIMEOUT = 60


@pytest.fixture(autouse=True)
def _no_leaks():
    with leak_check():
        yield


@pytest.fixture(scope="module")
def app():
    with leak_check():
        a = MpopApi(workers=2, queue_slots=64, auto_terminate=False)
        a.start()  # before any test's own leak check: the app outlives single tests
        try:
            yield a
        finally:
            a.shutdown()


def square(x: int) -> int:
    return x * x


def jittery_square(x: int) -> int:
    if x % 5 == 0:
        time.sleep(0.005)
    return x * x


def inc(x: int) -> int:
    return x + 1


def concat_ints(a: int, b: int) -> int:
    return a + b


def fails_at_five(x: int) -> int:
    if x == 5:
        raise KeyError(f"no item {x}")
    return x


def concat(a: str, b: str, c: str = "") -> str:
    return a + b + c


def test_ordered(app):
    assert list(app.map(jittery_square, range(300))) == [x * x for x in range(300)]


def test_unordered_same_multiset(app):
    got = list(app.map(jittery_square, range(300), ordered=False))
    assert len(got) == 300
    assert sorted(got) == sorted(x * x for x in range(300))


def test_multiple_iterables(app):
    assert list(app.map(pow, [2, 3, 4], [5, 2, 3])) == [32, 9, 64]
    assert list(app.map(concat, ["a", "b"], ["x", "y"], ["1", "2"])) == ["ax1", "by2"]
    # Like the builtin map: stops at the shortest iterable.
    assert list(app.map(ProcTaskFnID.ADD, range(10), range(3))) == [0, 2, 4]


def test_empty_iterable(app):
    assert list(app.map(square, [])) == []
    assert list(app.map(square, iter(()), ordered=False)) == []


def test_builtin_by_id(app):
    assert list(app.map(ProcTaskFnID.INCREMENT, range(5))) == [1, 2, 3, 4, 5]


def test_long_generator_input_runs_in_bounded_flight(app):
    n = 50_000
    produced = 0
    in_flight_max = 0

    def source():
        nonlocal produced
        for i in range(n):
            produced += 1
            yield i

    consumed = 0
    total = 0
    for v in app.map(ProcTaskFnID.INCREMENT, source()):
        total += v
        consumed += 1
        in_flight_max = max(in_flight_max, produced - consumed)
    assert consumed == n and produced == n
    assert total == sum(range(1, n + 1))
    # The generator is never read far ahead of the results (queue_slots=64): memory stays flat.
    assert in_flight_max <= 4 * 64 + 1, in_flight_max


def test_a_range_gets_a_wider_default_window_than_other_inputs(monkeypatch):
    """Over a range (sub-ranges, nothing built ahead) the default window is 64 rings,
    over other inputs 4: with queue_slots=16 and one worker, chunks of at most 512 and 32
    items (a chunk is at most half a worker's share of the window)."""
    with MpopApi(workers=1, queue_slots=16) as one:
        sizes: list[tuple[str, int]] = []
        push = one._submitter.push

        def spy(h, tsk_id, args, *rest):
            if rest[-1]:  # claim_alone: a map() chunk
                items = args[3]
                sizes.append((type(items).__name__, len(items)))
            return push(h, tsk_id, args, *rest)

        monkeypatch.setattr(one._submitter, "push", spy)
        assert list(one.map(inc, range(1000), chunksize=1000)) == [i + 1 for i in range(1000)]
        assert {n for kind, n in sizes if kind == "range"} == {512, 1000 - 512}
        sizes.clear()
        assert list(one.map(inc, list(range(1000)), chunksize=1000)) == [i + 1 for i in range(1000)]
        assert {n for kind, n in sizes if kind == "list"} == {32, 1000 - 31 * 32}
        sizes.clear()
        assert list(one.map(inc, range(1000), chunksize=1000, max_in_flight=64)) == [i + 1 for i in range(1000)]
        assert max(n for _, n in sizes) == 32  # an explicit window applies to ranges too


@pytest.mark.parametrize("ordered", [True, False])
def test_max_in_flight(app, ordered):
    produced = 0

    def source():
        nonlocal produced
        for i in range(500):
            produced += 1
            yield i

    ahead = []
    got = []
    for v in app.map(inc, source(), max_in_flight=8, ordered=ordered):
        got.append(v)
        ahead.append(produced - len(got))
    assert sorted(got) == [i + 1 for i in range(500)]
    if ordered:
        assert got == [i + 1 for i in range(500)]
    assert max(ahead) <= 8, max(ahead)


def test_failing_item_raises_from_the_iterator(app):
    it = app.map(fails_at_five, range(10))
    got = [next(it) for _ in range(5)]
    assert got == [0, 1, 2, 3, 4]
    with pytest.raises(KeyError, match="no item 5"):
        next(it)


def test_failing_item_unordered(app):
    got = []
    with pytest.raises(KeyError, match="no item 5"):
        for v in app.map(fails_at_five, range(10), ordered=False):
            got.append(v)
    assert 5 not in got and set(got) <= set(range(10))


def _raises_at(n: int):
    for i in range(n + 1000):
        if i == n:
            raise ValueError(f"the input failed at item {n}")
        yield i


@pytest.mark.parametrize("ordered", [True, False])
def test_an_input_that_raises_fails_at_its_position(app, ordered):
    # Like Pool.imap: every item read before the input raised gets its result first.
    got = []
    with pytest.raises(ValueError, match="failed at item 5000"):
        for v in app.map(square, _raises_at(5000), ordered=ordered):
            got.append(v)
    assert sorted(got) == [x * x for x in range(5000)]
    if ordered:
        assert got == [x * x for x in range(5000)]


def test_an_input_that_raises_at_once_raises_at_once(app):
    with pytest.raises(ValueError, match="failed at item 0"):
        next(iter(app.map(square, _raises_at(0))))
    assert list(app.map(square, range(3))) == [0, 1, 4]  # the app is fine


def test_app_usable_after_abandoned_map(app):
    it = app.map(jittery_square, range(1000))
    assert next(it) == 0
    it.close()  # abandon with tasks still in flight
    assert list(app.map(inc, range(200), timeout=TIMEOUT)) == [i + 1 for i in range(200)]
    assert app.submit(inc, 41).result(timeout=TIMEOUT) == 42


def slow_identity(x: int) -> int:
    time.sleep(0.02)
    return x


def test_new_map_while_the_ring_is_full_of_other_work():
    # The abandoned map leaves the ring full of slow tasks; the next map's first item
    # finds no room and must wait for room, not for a result it never sent.
    with MpopApi(workers=1, queue_slots=64, auto_terminate=False) as a:
        it = a.map(slow_identity, range(1000))
        assert next(it) == 0
        it.close()
        assert list(a.map(inc, range(3), timeout=20)) == [1, 2, 3]


def test_map_timeout(app):
    it = app.map(time.sleep, [2.0, 2.0], timeout=0.2)
    with pytest.raises(TimeoutError):
        list(it)
    assert app.wait(timeout=TIMEOUT)


def test_progress(app, capsys):
    assert list(app.map(square, range(30), progress=True)) == [x * x for x in range(30)]
    err = capsys.readouterr().err
    assert "mpop" in err
    assert "30/30" in err and "0/30" in err, err  # a sized input: the bar has its total


def test_progress_of_an_input_without_a_length_counts_without_a_total(app, capsys):
    assert list(app.map(square, (x for x in range(12)), progress=True)) == [x * x for x in range(12)]
    err = capsys.readouterr().err
    assert re.search(r"\b12 *task", err) and "/12" not in err, err


def test_map_starts_workers_by_itself():
    with MpopApi(workers=1) as a:
        assert list(a.map(square, range(4))) == [0, 1, 4, 9]


def test_map_rejects_no_iterables(app):
    with pytest.raises(TypeError):
        app.map(square)


def wrapped_or_plain(x: int):
    """Returns a TaskResult for odd x and the bare value for even x; fails at 13."""
    from mpop import TaskResult

    if x == 13:
        return TaskResult(success=False, error=LookupError("thirteen"))
    return TaskResult(success=True, value=x * 2) if x % 2 else x * 2


def test_taskresults_returned_by_the_handler_are_unwrapped(app):
    assert list(app.map(wrapped_or_plain, range(13))) == [2 * x for x in range(13)]
    assert list(app.map(wrapped_or_plain, range(13), chunksize=4)) == [2 * x for x in range(13)]


def test_a_failed_taskresult_raises_from_map_in_order(app):
    got = []
    with pytest.raises(LookupError, match="thirteen"):
        for v in app.map(wrapped_or_plain, range(40), chunksize=8):
            got.append(v)
    assert got == [2 * x for x in range(13)]


def test_the_window_is_topped_up_after_each_chunk_returned(app, monkeypatch):
    """Four chunks in flight (max_in_flight=16, chunks of 4): the iterator sends the next
    chunk as soon as the caller has the previous one, not once it has gone through every
    chunk that is already back (the workers would sit idle meanwhile)."""
    pushes = 0
    push = app._submitter.push

    def spy(*args):
        nonlocal pushes
        pushes += 1
        return push(*args)

    monkeypatch.setattr(app._submitter, "push", spy)
    seen = []
    for i, v in enumerate(app.map(inc, range(64), chunksize=4, max_in_flight=16)):
        assert v == i + 1
        if i % 4 == 0:
            seen.append(pushes)
    assert seen == [min(16, 4 + j) for j in range(16)]


def slow_inc(x: int) -> int:
    time.sleep(0.001)
    return x + 1


def test_until_the_first_chunk_is_back_two_chunks_a_worker_go_out(app, monkeypatch):
    """Before any chunk has come back, an item's cost is unknown: two small chunks a worker
    are sent, not the whole window of eight a worker; the rest go out once the first
    result has sized them."""
    d = app._lifecycle.runtime.router
    before_first = []
    push = app._submitter.push

    def spy(h, tsk_id, args, *rest):
        if rest[-1]:  # a map() chunk
            state = next(iter(d.maps.values()))
            if state.received == 0:
                before_first.append(tsk_id)
        return push(h, tsk_id, args, *rest)

    monkeypatch.setattr(app._submitter, "push", spy)
    assert sorted(app.map(slow_inc, range(400), ordered=False)) == [i + 1 for i in range(400)]
    assert len(before_first) == 2 * app.config["workers"], before_first


def _chunk_sizes(app, monkeypatch):
    sizes = []
    push = app._submitter.push

    def spy(h, tsk_id, args, *rest):
        if rest[-1]:  # a map() chunk: (fn_id, star, items)
            sizes.append(len(args[3]))
        return push(h, tsk_id, args, *rest)

    monkeypatch.setattr(app._submitter, "push", spy)
    return sizes


def test_chunks_after_the_first_are_sized_from_the_time_an_item_took(app, monkeypatch):
    """Once a chunk is back, later chunks hold about _CHUNK_TARGET_NS of work: items that
    sleep at least 1 ms go at most target / 1 ms to a chunk (the first, of 16, went out
    before anything was known)."""
    sizes = _chunk_sizes(app, monkeypatch)
    monkeypatch.setattr(ChunkSizer, "TARGET_NS", 4_000_000)
    assert list(app.map(slow_inc, range(200))) == [i + 1 for i in range(200)]
    probes = 2 * app.config["workers"]
    assert sizes[:probes] == [16] * probes
    assert max(sizes[probes:]) <= 4, sizes


def test_any_input_of_known_length_gets_guided_chunks(monkeypatch):
    """A list, or several sized iterables zipped, is guided as a range is: later chunks
    shrink to a share of what is left (here, with the floor at 0, down to one item), so the
    workers finish together. A generator's length is unknown: its chunks do not shrink."""
    monkeypatch.setattr(ChunkSizer, "FLOOR_NS", 0)
    with MpopApi(workers=1) as one:
        sizes = _chunk_sizes(one, monkeypatch)
        for args in ((list(range(5000)),), (list(range(5000)), (1,) * 6000)):
            sizes.clear()
            out = list(one.map(inc if len(args) == 1 else concat_ints, *args, max_in_flight=10**6))
            assert out == [i + 1 for i in range(5000)]
            later = sizes[2:]
            assert sum(sizes) == 5000 and later[-1] == 1 and later == sorted(later, reverse=True), sizes
        sizes.clear()
        assert list(one.map(inc, (i for i in range(5000)), max_in_flight=10**6)) == [i + 1 for i in range(5000)]
        assert sum(sizes) == 5000 and len(set(sizes[2:-1])) <= 2, sizes  # sized from timings only


def test_a_generator_gets_shorter_chunks_than_a_sized_input(app, monkeypatch):
    """Without a length there is no guiding the last chunks, so an input of unknown length
    is cut to _CHUNK_TARGET_UNSIZED_NS of work a chunk rather than _CHUNK_TARGET_NS."""
    sizes = _chunk_sizes(app, monkeypatch)
    monkeypatch.setattr(ChunkSizer, "TARGET_NS", 3600 * 10**9)
    monkeypatch.setattr(ChunkSizer, "TARGET_UNSIZED_NS", 4_000_000)
    assert list(app.map(slow_inc, (i for i in range(200)))) == [i + 1 for i in range(200)]
    probes = 2 * app.config["workers"]
    assert sizes[:probes] == [16] * probes and max(sizes[probes:]) <= 4, sizes


def test_a_finished_map_does_not_wake_the_background_thread(app):
    """A map that ends with nothing else in flight leaves the background thread asleep (a
    wake-up costs it, and a core the workers need, tens of microseconds a map)."""
    d = app._lifecycle.runtime.router
    app.wait()
    d._bg_wake.clear()
    assert list(app.map(inc, range(100))) == [i + 1 for i in range(100)]
    assert not d._bg_wake.is_set()


def test_guided_range_chunks_shrink_no_further_than_the_floor(monkeypatch):
    """Over a range, the last chunks shrink to a share of what is left, but not below
    _CHUNK_FLOOR_NS of work: with the floor at 0 they halve down to one item; with a floor
    of an hour, what is left after the first 16-item chunks goes as one chunk."""

    def chunk_sizes(app):
        sizes = []
        push = app._submitter.push

        def spy(h, tsk_id, args, *rest):
            if rest[-1] and type(args[3]) is range:  # a map() chunk of a range
                sizes.append(len(args[3]))
            return push(h, tsk_id, args, *rest)

        monkeypatch.setattr(app._submitter, "push", spy)
        out = list(app.map(inc, range(5000), max_in_flight=10**6))
        assert out == [i + 1 for i in range(5000)]
        return [n for n in sizes if n != 16]  # after the first chunks, of 16 items

    with MpopApi(workers=1) as one:
        monkeypatch.setattr(ChunkSizer, "FLOOR_NS", 0)
        later = chunk_sizes(one)
        assert later[-1] == 1 and later == sorted(later, reverse=True) and len(later) > 5, later
        monkeypatch.setattr(ChunkSizer, "FLOOR_NS", 3600 * 10**9)
        later = chunk_sizes(one)
        assert len(later) == 1 and later[0] > 4000, later


def test_background_thread_leaves_a_driven_map_alone(app):
    """_maps_driven: true only while every task in flight is a chunk of an open map whose
    caller touched it in the last 10 ms."""
    from mpop._router import MapState

    d = app._lifecycle.runtime.router
    app.wait()
    assert not d._maps_driven()  # no map
    state = MapState()
    state.sent, state.received = 3, 1
    d.maps[-1] = state
    try:
        assert d._maps_driven()
        state.touched = time.monotonic() - 1.0
        assert not d._maps_driven()  # its caller went away: the thread drains for it
        state.touched = time.monotonic() + 60.0
        state.closed = True
        assert not d._maps_driven()
    finally:
        del d.maps[-1]


def test_the_background_thread_steps_aside_for_a_driven_map_in_long_turns(app, monkeypatch):
    """While a map's caller drives it, the background thread sleeps on its own event in
    turns of _STEP_ASIDE_POLL_S (each turn costs it CPU on a core the workers need), and
    is woken early only by whoever hands results back to it."""
    import threading

    d = app._lifecycle.runtime.router
    timeouts = []

    class SpyEvent(threading.Event):
        def wait(self, timeout=None):
            timeouts.append(timeout)
            return super().wait(timeout)

    spy = SpyEvent()
    monkeypatch.setattr(d, "_bg_wake", spy)
    spy.set()  # the thread may be asleep on the old event: let it come round to this one
    assert sorted(app.map(slow_inc, range(300), chunksize=5, ordered=False)) == [i + 1 for i in range(300)]
    assert timeouts and set(timeouts) == {d._STEP_ASIDE_POLL_S}, timeouts
    assert d._STEP_ASIDE_POLL_S >= 0.05


def test_an_abandoned_map_is_still_drained(app):
    """A map iterator left unconsumed (not closed): the background thread drains the
    chunks it had in flight, and a future's callback submitted meanwhile still runs."""
    it = app.map(inc, range(100_000), chunksize=1000)
    assert next(it) == 1
    state = next(s for s in app._lifecycle.runtime.router.maps.values())
    done = []
    app.submit(inc, 41).add_done_callback(lambda f: done.append(f.result()))
    deadline = time.monotonic() + TIMEOUT
    while (state.received < state.sent or not done) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state.received == state.sent and done == [42]
    it.close()


def test_the_iterator_waits_for_a_run_of_chunks(app, monkeypatch):
    """Waiting for a chunk, the iterator asks the native wait for half the chunks in
    flight (up to about 16k items), so it is woken once per run of results rather than
    once per chunk (the wait still ends within its 50 ms step when fewer come)."""
    d = app._lifecycle.runtime.router
    wants = []
    help_until = d.help_until

    def spy(done, deadline, check=None, want=None, spin=False):
        wants.append(want() if want is not None else 1)
        return help_until(done, deadline, check, want, spin)

    monkeypatch.setattr(d, "help_until", spy)
    assert list(app.map(inc, range(640), chunksize=10, max_in_flight=160)) == [i + 1 for i in range(640)]
    assert wants and max(wants) == 8 and min(wants) >= 1, wants
    # A run holds at most about 16k items' values (decoded before the first is returned):
    # chunks of 8k go two at a time, chunks of 16k one at a time.
    for size, most in ((8192, 2), (16384, 1)):
        wants.clear()
        out = list(app.map(inc, range(8 * size), chunksize=size, max_in_flight=8 * size))
        assert out == [i + 1 for i in range(8 * size)]
        assert wants and max(wants) == most, (size, wants)


def mixed_value(x: int):
    return (x, -x * 1.5, None, 1 << 70, str(x), True, [x, x + 1])[x % 7]


def test_chunk_values_of_mixed_kinds_come_back_exactly(app):
    """Ints travel by a fast path of their own; every other kind around them (and an int
    too big for 64 bits, which goes pickled) must come back as it was."""
    out = list(app.map(mixed_value, range(700)))
    assert out == [mixed_value(x) for x in range(700)]
    assert [type(v) for v in out[:7]] == [int, float, type(None), int, str, bool, list]


def test_a_wait_never_asks_for_more_chunks_than_are_still_to_come(app, monkeypatch):
    """Ordered, with chunks finishing out of order: chunks already back but not yet
    returned must not count towards the run waited for, or the wait would sit out its
    50 ms step for results that never come."""
    d = app._lifecycle.runtime.router
    seen = []
    help_until = d.help_until

    def spy(done, deadline, check=None, want=None, spin=False):
        state = next(iter(d.maps.values()))
        seen.append((want() if want is not None else 1, state.sent - state.received))
        return help_until(done, deadline, check, want, spin)

    monkeypatch.setattr(d, "help_until", spy)
    out = list(app.map(jittery_square, range(400), chunksize=1, max_in_flight=32))
    assert out == [x * x for x in range(400)]
    assert seen and all(1 <= want <= max(1, to_come) for want, to_come in seen), seen
    assert any(want > 1 for want, _ in seen)  # runs were waited for
